"""Sequence-parallel S²-Attn and full attention equal single-process attention, 2 and 4 ranks over gloo.

Outputs and dq, dk, dv of every rank's slice, fp32, relative to the largest reference value.
Halo exchange: L ≥ G and L < G (groups over 2 and 3 ranks), N not a multiple of G, GQA 9/3, MQA, odd
head count, documents anywhere (at a rank boundary, inside a halo), left/right padding, full attention,
full attention with a sliding window shorter than the row (the halo is then only window - 1 keys).
Ulysses (DeepSpeed's all-to-all around megalong's kernel; the shifted half by the global head index):
MHA, KV heads ≥ sp and < sp (DeepSpeed repeats them; the module's ``num_key_value_groups`` must come
back unchanged), MQA, L < G, documents, padding, full attention (also with a sliding window); and a tiny MQA Llama: one Ulysses
training step (token-loss sum and every gradient summed over the group equal one process over the whole
row, packed documents with restarting positions), then a plain evaluation without sequence parallelism;
and a tiny Mistral with a sliding window shorter than the row under full attention, both sp modes.
On 2 ranks, both modes also train one step of a tiny Qwen3, Gemma 3 and Phi-3 the same way (every gradient,
q/k norms and the final logit cap included) and compare with one process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.assets import REPO, free_port, port_was_taken, rank_env

pytestmark = pytest.mark.dist

TOL = 1e-5
FAMILIES = ("qwen3", "gemma3", "phi3")


def _check_families(world: int, rank: dict) -> None:
    """The tiny Qwen3 / Gemma 3 / Phi-3 training steps (2 ranks only) equal one process."""
    for family in FAMILIES:
        res = rank["results"].pop(f"family {family}", None)
        if world != 2:
            assert res is None
            continue
        assert res["count"] == 1.0 and res["params_without_grad"] == 0.0, (family, res)
        assert max(res["loss"], res["grads"]) <= TOL, (world, rank["rank"], family, res)


def _spawn(world: int, tmp_path, mode: str = "halo") -> list[dict]:
    for _attempt in range(3):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "tests.dist.sp_attention_worker", mode], cwd=REPO,
                                  env=rank_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for r in range(world)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        if all(p.returncode == 0 for p in procs) or not port_was_taken("".join(outs)):
            break
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return [json.loads(next(ln for ln in o.splitlines() if ln.startswith("RESULT "))[7:]) for o in outs]


@pytest.mark.parametrize("world", [2, 4])
def test_halo_attention_equals_single_process(world, tmp_path):
    ranks = _spawn(world, tmp_path)
    for rank in ranks:
        _check_families(world, rank)
    names = set(ranks[0]["results"])
    assert len(names) >= 8
    for rank in ranks:
        for name, res in rank["results"].items():
            for key in ("out", "dq", "dk", "dv"):
                assert res[key] <= TOL, (world, rank["rank"], name, key, res[key])
    # rank 0 never receives; the L = 2G case moves exactly the shifted half's G/2 keys and values
    first = {r["rank"]: r["results"]["L=2G"] for r in ranks}
    g, hk, d = 8, 2, 16
    per_boundary = 2 * (g // 2) * (hk // 2) * d * 4  # K and V, G/2 tokens, the shifted half's kv heads, fp32
    assert first[world - 1]["bytes_fwd"] == 0  # the last rank sends to nobody
    assert all(first[r]["bytes_fwd"] == per_boundary for r in range(world - 1)), first
    assert first[0]["bytes_bwd"] == 0 and all(first[r]["bytes_bwd"] == per_boundary for r in range(1, world))
    # full attention with a sliding window of 9 < L: each rank needs only the previous rank's last 8 keys
    windowed = {r["rank"]: r["results"]["full attention, window 9 < L"]["bytes_fwd"] for r in ranks}
    assert windowed == {r: 0 if r == world - 1 else 2 * 8 * hk * d * 4 for r in range(world)}, windowed


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_equals_single_process(world, tmp_path):
    ranks = _spawn(world, tmp_path, "ulysses")
    for rank in ranks:
        _check_families(world, rank)
    names = set(ranks[0]["results"])
    assert len(names) == 9, names
    windows = [rank["results"].pop("window_model") for rank in ranks]  # Mistral, window 12 < 48 tokens
    assert max(w["cut"] for w in windows) > 1e-3, windows  # the window changes the later ranks' tokens
    assert all(max(w["s2_halo"], w["ulysses"]) <= TOL for w in windows), (world, windows)
    for rank in ranks:
        model = rank["results"].pop("model")  # a tiny MQA Llama: one training step, then plain evaluation
        assert model["count"] == 1.0 and model["kv_groups_kept"] == 1.0, model
        assert max(model["loss"], model["grads"], model["plain_eval"]) <= TOL, (world, rank["rank"], model)
        for name, res in rank["results"].items():
            for key in ("out", "dq", "dk", "dv"):
                assert res[key] <= TOL, (world, rank["rank"], name, key, res[key])
            assert res["kv_groups_kept"] == 1.0, (world, rank["rank"], name)

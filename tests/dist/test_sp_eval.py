"""Evaluation under sequence parallelism through the real deepspeed launcher equals one process.

One launch of 2 CPU ranks (tests/dist/sp_eval_worker.py runs the real tools one after the other):
``tools/eval_ppl.py --sp 3`` refuses the 2 processes; then for each ``--sp-mode`` (s2_halo,
ulysses) ``tools/eval_ppl.py --sp 2`` scores both protocols (window lengths even and odd, so padded
and not; batches of 3 windows; 2 documents; the chunked lm_head) and must equal ``--sp 1`` run in
this process to rtol 1e-5, and ``tools/passkey.py --sp 2`` must generate the same tokens, answers
and accuracy as ``--sp 1`` (``generate`` with a KV cache), and ``tools/ruler.py --sp 2`` (the task
suite: 128- and 50-token answers decoded over the distributed KV cache) the same answers, token for
token, and scores as ``--sp 1`` (batched ``generate``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.assets import run_launcher

pytestmark = [pytest.mark.dist, pytest.mark.e2e]

RTOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(assets, tmp_path_factory) -> Path:
    """A random tiny Llama (GQA 4/2) with the test tokenizer beside it; weights 10x HF's init scale, so
    that attention is sharp and a wrong position or a missing key changes the losses (at the default
    scale, local position ids under sp = 2 move the loss by only 5e-6)."""
    import torch

    from megalong.models import create_model, save_hf_model
    from tests.conftest import tiny_config

    out = tmp_path_factory.mktemp("sp_eval") / "model"
    torch.manual_seed(0)
    save_hf_model(create_model(tiny_config("llama", vocab_size=assets["vocab_size"], max_position_embeddings=256,
                                               initializer_range=0.2)),
                  out)
    for f in Path(assets["tokenizer"]).iterdir():
        if f.is_file() and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_eval_ppl_and_passkey_at_sp2_equal_sp1(assets, model_dir, tmp_path, capsys):
    from tools import eval_ppl, passkey

    # valid: 2 documents (3192 and 391 tokens) -> standard windows of 64 predictions and tails of 55 and 6
    ppl_args = ["--model", str(model_dir), "--data", assets["valid"], "--seq-len", "64", "--protocol", "longlora",
                "standard", "--stride", "200", "--batch-size", "3", "--loss-chunk-size", "16", "--no-progress"]
    key_args = ["--model", str(model_dir), "--lengths", "120", "257", "--trials", "2", "--no-progress"]
    # the suite: prompt lengths 272-ish and 387-ish (odd: padded under sp = 2), no chat template -> completion
    ruler_args = ["--model", str(model_dir), "--lengths", "400", "515", "--tasks", "niah_single_1", "fwe",
                  "--samples", "2", "--no-progress"]
    assert eval_ppl.main(ppl_args) == 0
    want = {r["protocol"]: r for r in _json_lines(capsys.readouterr().out)}
    assert want["standard"]["windows"] == 57 and want["longlora"]["windows"] == 18
    assert passkey.main(key_args + ["--out", str(tmp_path / "sp1")]) == 0
    from tools import ruler

    assert ruler.main(ruler_args + ["--out", str(tmp_path / "ruler_sp1"), "--batch-size", "2"]) == 0
    capsys.readouterr()

    runs = [["eval_ppl", *ppl_args[:6], "--sp", "3"]]  # refused: 2 processes
    for mode in ("s2_halo", "ulysses"):
        runs += [["eval_ppl", *ppl_args, "--sp", "2", "--sp-mode", mode],
                 ["passkey", *key_args, "--sp", "2", "--sp-mode", mode, "--out", str(tmp_path / f"sp2_{mode}")],
                 ["ruler", *ruler_args, "--sp", "2", "--sp-mode", mode, "--out", str(tmp_path / f"ruler_{mode}")]]
    res = run_launcher(["--num_gpus", "2"], [a for r in runs for a in [*r, "--"]][:-1],
                       script="tests/dist/sp_eval_worker.py", timeout=240)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    codes = [line for line in res.stdout.splitlines() if line.startswith("RUN ")]
    assert codes == ["RUN 0 eval_ppl rc=2", "RUN 1 eval_ppl rc=0", "RUN 2 passkey rc=0", "RUN 3 ruler rc=0",
                     "RUN 4 eval_ppl rc=0", "RUN 5 passkey rc=0", "RUN 6 ruler rc=0"], out[-6000:]
    assert "2 processes were launched for --sp 3" in out
    got = {(r["sp_mode"], r["protocol"]): r for r in _json_lines(res.stdout) if "protocol" in r}
    assert len(got) == 4  # rank 0 only: one line per protocol and mode
    for (mode, protocol), g in got.items():
        ref = want[protocol]
        assert (g["sp"], ref["sp"], g["windows"], g["tokens"], g["documents"]) == (
            2, 1, ref["windows"], ref["tokens"], ref["documents"]), mode
        assert g["loss"] == pytest.approx(ref["loss"], rel=RTOL) and g["ppl"] == pytest.approx(ref["ppl"], rel=RTOL)
        assert len(g["peak_mem_gb"]) == 2

    one = json.loads((tmp_path / "sp1.json").read_text())
    fields = ("length", "key", "depth", "prompt_tokens", "answer_ids", "answer", "correct")
    assert len(one["trials"]) == 4 and all(t["answer_ids"] for t in one["trials"])
    for mode in ("s2_halo", "ulysses"):
        two = json.loads((tmp_path / f"sp2_{mode}.json").read_text())
        assert (two["sp"], two["sp_mode"]) == (2, mode) and one["accuracy_by_length"] == two["accuracy_by_length"]
        assert [[t[f] for f in fields] for t in two["trials"]] == [[t[f] for f in fields] for t in one["trials"]]

    def cells(run: str) -> list[dict]:
        rows = []
        for path in sorted((tmp_path / run / "cells").rglob("*.jsonl")):
            rows += [json.loads(x) for x in path.read_text().splitlines()[1:]]
        return [{k: r[k] for k in ("task", "length", "index", "prompt_sha", "generated_ids", "generated", "score")}
                for r in rows]

    want_cells = cells("ruler_sp1")
    assert len(want_cells) == 8 and all(len(r["generated_ids"]) > 10 for r in want_cells)
    want_summary = json.loads((tmp_path / "ruler_sp1" / "results.json").read_text())
    for mode in ("s2_halo", "ulysses"):
        assert cells(f"ruler_{mode}") == want_cells, mode
        got = json.loads((tmp_path / f"ruler_{mode}" / "results.json").read_text())
        assert (got["scores"], got["average"]) == (want_summary["scores"], want_summary["average"]), mode

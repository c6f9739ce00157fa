"""Sequence-parallel evaluation helpers (megalong.eval.sp) and the tools' refusals; the 2-rank parity
of eval_ppl and passkey through the launcher is tests/dist/test_sp_eval.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megalong.config.schema import ConfigError
from megalong.eval import sp as sp_eval
from megalong.eval.sp import (
    SequenceParallelEval,
    merge_rank_losses,
    owner_of,
    pad_window,
    padded_length,
    start_eval_parallel,
)


def test_padded_length_and_owner():
    assert [padded_length(n, 2) for n in (1, 2, 63, 64)] == [2, 2, 64, 64]
    assert [padded_length(n, 4) for n in (1, 5, 8, 9)] == [4, 8, 8, 12]
    assert padded_length(7, 1) == 7
    # n' = 12 over 4 ranks: L = 3; position 8 is rank 2's third token
    assert owner_of(8, 3) == (2, 2) and owner_of(0, 3) == (0, 0) and owner_of(11, 3) == (3, 2)


def test_pad_window_pads_after_the_window_and_ignores_the_pad_labels():
    x = torch.arange(1, 8).reshape(1, 7)
    inputs, labels = pad_window(x[:, :-1], x[:, 1:], 4)  # 6 predictions -> 8
    assert inputs.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0]] and labels.tolist() == [[2, 3, 4, 5, 6, 7, -100, -100]]
    same = pad_window(x[:, :-1], x[:, 1:], 3)  # 6 is a multiple of 3: untouched
    assert same[0].shape == (1, 6) and same[1].tolist() == x[:, 1:].tolist()


def test_merge_rank_losses_rebuilds_the_row_and_drops_the_padding():
    rng = np.random.default_rng(0)
    full = torch.as_tensor(rng.random((3, 13)), dtype=torch.float32)  # b = 3 windows of 13 predictions
    padded = torch.cat([full, torch.zeros(3, 3)], dim=1)  # sp = 4: n' = 16, L = 4
    parts = list(padded.split(4, dim=1))  # what each rank scored, in rank order
    torch.testing.assert_close(merge_rank_losses(parts, 13), full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different lengths"):
        merge_rank_losses([torch.zeros(1, 4), torch.zeros(1, 3)], 7)
    with pytest.raises(ValueError, match="at least one rank"):
        merge_rank_losses([], 3)


def test_sequence_parallel_eval_refuses_stock_attention_and_bad_modes():
    from megalong.models import create_model
    from tests.conftest import tiny_config

    dims = SimpleNamespace(sp=2, sp_rank=0, groups={"sp": None})
    with pytest.raises(ConfigError, match="not one of s2_halo, ulysses"):
        SequenceParallelEval(dims, "ring")
    model = create_model(tiny_config("llama"))
    model.set_attn_implementation("sdpa")
    with pytest.raises(ConfigError, match="use_full_attention"):
        SequenceParallelEval(dims).token_losses(model, torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ConfigError, match="positive --loss-chunk-size"):
        SequenceParallelEval(dims).token_losses(model, torch.zeros(1, 9, dtype=torch.long), loss_chunk_size=0)


def test_full_logits_under_sp_are_refused_before_scoring():
    from megalong.eval.perplexity import evaluate_perplexity

    with pytest.raises(ValueError, match="positive --loss-chunk-size"):
        evaluate_perplexity(torch.nn.Linear(1, 1), [np.arange(10)], 4, "standard", loss_chunk_size=0,
                            parallel=object())


def test_start_refuses_sp_without_the_launcher_and_bad_values():
    with pytest.raises(ConfigError, match="deepspeed --num_gpus 2 tools/passkey.py ... --sp 2"):
        start_eval_parallel(2, env={}, tool="tools/passkey.py")
    with pytest.raises(ConfigError, match="must be >= 1"):
        start_eval_parallel(0, env={})
    with pytest.raises(ConfigError, match="--sp-mode 'ring'"):
        start_eval_parallel(1, "ring", env={})
    parallel, rank, device = start_eval_parallel(1, env={}, device="cpu")  # one process, nothing to start
    assert (parallel, rank, device) == (None, 0, torch.device("cpu"))
    sp_eval.finish_eval_parallel()  # no process group: a no-op


def test_tools_refuse_sp_without_the_launcher(tmp_path, capsys, monkeypatch):
    from tools import eval_ppl, passkey

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert eval_ppl.main(["--model", str(tmp_path), "--data", str(tmp_path / "d"), "--seq-len", "64",
                          "--sp", "2"]) == 2
    assert "deepspeed --num_gpus 2 tools/eval_ppl.py ... --sp 2" in capsys.readouterr().err
    assert passkey.main(["--model", str(tmp_path), "--lengths", "64", "--sp", "4"]) == 2
    assert "deepspeed --num_gpus 4 tools/passkey.py ... --sp 4" in capsys.readouterr().err


def test_settings_the_sp_argmax_does_not_apply_are_named():
    from megalong.eval.passkey import eos_ids, unapplied_processors
    from megalong.models import create_model
    from tests.conftest import tiny_config

    model = create_model(tiny_config("llama"))
    assert unapplied_processors(model) == [] and eos_ids(model) == (model.generation_config.eos_token_id,)
    model.generation_config.repetition_penalty = 1.2
    model.generation_config.no_repeat_ngram_size = 3
    assert unapplied_processors(model) == ["repetition_penalty=1.2", "no_repeat_ngram_size=3"]
    model.generation_config.eos_token_id = [2, 7]
    assert eos_ids(model) == (2, 7)


@pytest.mark.parametrize("window", [None, 7])
def test_cached_decode_partials_combine_to_attention_over_the_whole_cache(window):
    """Three ranks' caches (prefill slices of 6, the last one half padding, then 3 decoded tokens on every
    rank): each rank's partial softmax over what it contributes, combined, equals dense attention of the
    query over the prompt's 15 real keys and the decoded ones (GQA 6/2; a sliding window of 7)."""
    from megalong.eval.sp import CachedDecode, combine_partials, partial_attention

    torch.manual_seed(0)
    sp, local, n, decoded, h, hkv, d = 3, 6, 15, 3, 6, 2, 8
    prompt_k, prompt_v = torch.randn(1, hkv, sp * local, d), torch.randn(1, hkv, sp * local, d)
    dec_k, dec_v = torch.randn(1, hkv, decoded, d), torch.randn(1, hkv, decoded, d)
    q = torch.randn(1, h, 1, d)
    position = n + decoded - 1  # the query is the last decoded token
    lses, parts = [], []
    for r in range(sp):
        ctx = CachedDecode(None, r, local, real_len=min(local, max(0, n - r * local)), first_position=n,
                           position=position)
        k = torch.cat([prompt_k[:, :, r * local:(r + 1) * local], dec_k], dim=2)
        v = torch.cat([prompt_v[:, :, r * local:(r + 1) * local], dec_v], dim=2)
        lse, part = partial_attention(q, k, v, ctx._valid(k.shape[2], window, k.device), 0.3)
        lses.append(lse)
        parts.append(part)
    got = combine_partials(lses, parts).reshape(1, h, 1, d)
    keys = torch.cat([prompt_k[:, :, :n], dec_k], dim=2).repeat_interleave(h // hkv, dim=1)  # (1, H, n + 3, D)
    vals = torch.cat([prompt_v[:, :, :n], dec_v], dim=2).repeat_interleave(h // hkv, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * 0.3
    if window is not None:
        pos = torch.arange(n + decoded)
        scores = scores.masked_fill((position - pos) >= window, float("-inf"))
    want = scores.softmax(-1) @ vals
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

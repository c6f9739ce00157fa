"""Perplexity protocols against a hand computation; passkey scoring on models that do / do not see the key."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megalong.eval.passkey import build_prompt, run_passkey
from megalong.eval.perplexity import evaluate_perplexity, longlora_windows, standard_windows

V = 7


class PositionModel(torch.nn.Module):
    """Knows the data (token t is followed by t+1 mod V) and is more sure of itself later in a window:
    at window position p the true next token gets logit p, all others 0. Its loss at p is therefore
    log(e^p + V - 1) - p, which the test sums by hand."""

    def forward(self, input_ids, use_cache=False):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, V)
        nxt = (input_ids + 1) % V
        logits.scatter_(2, nxt.unsqueeze(-1), torch.arange(n, dtype=torch.float).expand(b, n).unsqueeze(-1))
        return SimpleNamespace(logits=logits)


def loss_at(p: int) -> float:
    return math.log(math.exp(p) + V - 1) - p


def test_window_layouts():
    assert longlora_windows(10, 4, 2) == [(0, 5), (2, 7), (4, 9)]
    assert longlora_windows(4, 4, 2) == []  # needs seq_len + 1 tokens
    assert standard_windows(10, 4) == [(0, 5), (4, 9), (8, 10)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_both_protocols_match_hand_computation(batch_size):
    docs = [np.arange(L) % V for L in (12, 5, 9)]
    N, stride = 4, 3
    # longlora: docs with >= 5 tokens; windows start at 0,3,6,... while start+5 <= len
    #   doc 12: starts 0,3,6 (3 windows); doc 5: start 0; doc 9: starts 0,3 -> 6 windows, each 4 predictions
    window_mean = sum(loss_at(p) for p in range(N)) / N
    res = evaluate_perplexity(PositionModel(), docs, N, "longlora", stride=stride, batch_size=batch_size)
    assert (res.windows, res.tokens, res.documents) == (6, 24, 3)
    assert res.loss == pytest.approx(window_mean, rel=1e-6) and res.ppl == pytest.approx(math.exp(window_mean))
    # standard: doc 12 -> windows of 5,5,4 tokens (4+4+3 predictions), doc 5 -> 5 tokens (4), doc 9 -> 5,5 (4+4)
    preds = [4, 4, 3, 4, 4, 4]
    total = sum(sum(loss_at(p) for p in range(k)) for k in preds)
    res = evaluate_perplexity(PositionModel(), docs, N, "standard", batch_size=batch_size)
    assert (res.windows, res.tokens) == (6, sum(preds)) == (6, 23)
    assert res.loss == pytest.approx(total / 23, rel=1e-6)
    assert res.loss != pytest.approx(window_mean)  # the protocols weigh windows differently


def test_no_long_enough_document_is_an_error():
    with pytest.raises(ValueError, match="no document"):
        evaluate_perplexity(PositionModel(), [np.arange(3)], 8, "longlora")


class _Tok:
    """Character-level tokenizer: one id per character."""

    def encode(self, s):
        return [ord(c) for c in s]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class CopyKeyModel:
    """'Sees the key verbatim': generates the digits that follow 'passkey is ' in its prompt."""

    config = SimpleNamespace(eos_token_id=0)

    def generate(self, input_ids, max_new_tokens, **kw):
        text = _Tok().decode(input_ids[0].tolist())
        key = text.split("The passkey is ")[1][:5]
        new = torch.tensor([[ord(" ")] + [ord(c) for c in key]])[:, :max_new_tokens]
        return torch.cat([input_ids, new], dim=1)


class RandomDigitModel(CopyKeyModel):
    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def generate(self, input_ids, max_new_tokens, **kw):
        digits = torch.randint(ord("0"), ord("9") + 1, (1, max_new_tokens), generator=self.g)
        return torch.cat([input_ids, digits], dim=1)


def test_passkey_scores_a_model_that_sees_the_key_and_a_random_one():
    tok = _Tok()
    good = run_passkey(CopyKeyModel(), tok.encode, tok.decode, [600, 900], trials=5, seed=1)
    assert good.accuracy_by_length() == {600: 1.0, 900: 1.0}
    assert all(t.prompt_tokens <= t.length for t in good.trials)
    bad = run_passkey(RandomDigitModel(), tok.encode, tok.decode, [600], trials=10, seed=1)
    assert bad.accuracy_by_length()[600] <= 0.1
    grid = run_passkey(CopyKeyModel(), tok.encode, tok.decode, [600], trials=2, depths=[0.0, 0.5, 1.0])
    assert grid.accuracy_grid() == {600: {0.0: 1.0, 0.5: 1.0, 1.0: 1.0}}


def test_prompt_places_key_at_depth_and_length():
    tok = _Tok()
    for depth in (0.0, 0.5, 1.0):
        ids = build_prompt(tok.encode, 2000, depth, 12345)
        text = tok.decode(ids)
        assert text.count("12345") == 2 and len(ids) <= 2000 and len(ids) > 1800
        pos = text.index("12345") / len(text)
        assert abs(pos - depth) < 0.1


def test_eval_ppl_cli_on_a_real_model_and_a_too_large_vocabulary(assets, tmp_path, capsys):
    import json

    from megalong.models import create_model, save_hf_model
    from tests.conftest import tiny_config
    from tools import eval_ppl

    good, small = tmp_path / "good", tmp_path / "small"
    save_hf_model(create_model(tiny_config("llama", vocab_size=assets["vocab_size"])), good)
    assert eval_ppl.main(["--model", str(good), "--data", assets["valid"], "--seq-len", "64",
                          "--protocol", "standard", "--max-windows", "4"]) == 0
    res = json.loads(capsys.readouterr().out.strip())
    assert res["protocol"] == "standard" and res["windows"] == 4 and res["ppl"] > 1
    save_hf_model(create_model(tiny_config("llama", vocab_size=96)), small)
    assert eval_ppl.main(["--model", str(small), "--data", assets["valid"], "--seq-len", "64"]) == 2
    assert "vocabulary has only 96" in capsys.readouterr().err


def test_passkey_cli_without_matplotlib_writes_the_json_and_says_how_to_get_the_plot(
        assets, tmp_path, capsys, monkeypatch):
    import json
    import sys

    from megalong.data.tokenizer import save_hf_tokenizer
    from megalong.models import create_model, save_hf_model
    from tests.conftest import tiny_config
    from tools import passkey

    model = tmp_path / "model"
    save_hf_model(create_model(tiny_config("llama", vocab_size=assets["vocab_size"], max_position_embeddings=256)),
                  model)
    save_hf_tokenizer(assets["tokenizer"], model)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "not installed"
    out = tmp_path / "pk" / "passkey"
    assert passkey.main(["--model", str(model), "--lengths", "160", "--trials", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(out.with_suffix(".json").read_text())["accuracy_by_length"].keys() == {"160"}
    assert not out.with_suffix(".png").exists()
    assert "pip install 'megalong[plot]'" in captured.err and "Traceback" not in captured.err
    assert "passkey 2/2 (100%)" in captured.err  # a progress line (stderr is not a terminal here)

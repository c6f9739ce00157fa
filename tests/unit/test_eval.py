"""Perplexity protocols against a hand computation; passkey scoring on models that do / do not see the key."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megalong.eval.passkey import build_prompt, run_passkey
from megalong.eval.perplexity import (
    evaluate_perplexity,
    long_context_count,
    longlora_windows,
    standard_windows,
    token_losses,
)

V = 7


class PositionModel(torch.nn.Module):
    """Knows the data (token t is followed by t+1 mod V) and is more sure of itself later in a window:
    at window position p the true next token gets logit p, all others 0. Its loss at p is therefore
    log(e^p + V - 1) - p, which the test sums by hand.

    Shaped like an HF causal LM: a decoder at ``.model`` whose "hidden states" are those logits, and an
    identity lm_head, so both the full-logits and the chunked scoring paths run on it."""

    base_model_prefix = "model"

    def __init__(self):
        super().__init__()
        self.model = _PositionDecoder()
        self.lm_head = torch.nn.Linear(V, V, bias=False)
        self.lm_head.weight.data = torch.eye(V)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids).last_hidden_state))


class _PositionDecoder(torch.nn.Module):
    def forward(self, input_ids, use_cache=False):
        b, n = input_ids.shape
        hidden = torch.zeros(b, n, V)
        nxt = (input_ids + 1) % V
        hidden.scatter_(2, nxt.unsqueeze(-1), torch.arange(n, dtype=torch.float).expand(b, n).unsqueeze(-1))
        return SimpleNamespace(last_hidden_state=hidden)


def loss_at(p: int) -> float:
    return math.log(math.exp(p) + V - 1) - p


def test_window_layouts():
    assert longlora_windows(10, 4, 2) == [(0, 5), (2, 7), (4, 9)]
    assert longlora_windows(4, 4, 2) == []  # needs seq_len + 1 tokens
    assert standard_windows(10, 4) == [(0, 5), (4, 9), (8, 10)]


@pytest.mark.parametrize("batch_size,chunk", [(1, 1024), (3, 3), (3, 0)])
def test_both_protocols_match_hand_computation(batch_size, chunk):
    docs = [np.arange(L) % V for L in (12, 5, 9)]
    N, stride = 4, 3
    # longlora: docs with >= 5 tokens; windows start at 0,3,6,... while start+5 <= len
    #   doc 12: starts 0,3,6 (3 windows); doc 5: start 0; doc 9: starts 0,3 -> 6 windows, each 4 predictions
    window_mean = sum(loss_at(p) for p in range(N)) / N
    res = evaluate_perplexity(PositionModel(), docs, N, "longlora", stride=stride, batch_size=batch_size,
                              loss_chunk_size=chunk)
    assert (res.windows, res.tokens, res.documents) == (6, 24, 3)
    assert res.loss == pytest.approx(window_mean, rel=1e-6) and res.ppl == pytest.approx(math.exp(window_mean))
    # standard: doc 12 -> windows of 5,5,4 tokens (4+4+3 predictions), doc 5 -> 5 tokens (4), doc 9 -> 5,5 (4+4)
    preds = [4, 4, 3, 4, 4, 4]
    total = sum(sum(loss_at(p) for p in range(k)) for k in preds)
    res = evaluate_perplexity(PositionModel(), docs, N, "standard", batch_size=batch_size, loss_chunk_size=chunk)
    assert (res.windows, res.tokens) == (6, sum(preds)) == (6, 23)
    assert res.loss == pytest.approx(total / 23, rel=1e-6)
    assert res.loss != pytest.approx(window_mean)  # the protocols weigh windows differently


class RandomLM(torch.nn.Module):
    """Logits from a fixed random embedding of (token, position) that also depend on the previous token:
    every window gets its own losses. Counts the windows it ran."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.tok, self.pos = torch.randn(V, V, generator=g), torch.randn(64, V, generator=g)
        self.rows = 0

    def forward(self, input_ids, use_cache=False):
        self.rows += input_ids.shape[0]
        prev = torch.roll(input_ids, 1, dims=1)
        return SimpleNamespace(logits=self.tok[input_ids] + 0.5 * self.tok[prev] + self.pos[:input_ids.shape[1]])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_windows_shared_by_the_protocols_are_scored_once_with_the_same_result(batch_size):
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, V, L) for L in (30, 17, 9, 40)]
    N = 8
    for min_doc_len, max_windows in ((0, None), (N + 1, 1), (N + 1, 3)):
        fresh, shared, scored = RandomLM(), RandomLM(), {}
        for protocol in ("longlora", "standard"):
            kw = dict(stride=4, batch_size=batch_size, max_windows=max_windows, min_doc_len=min_doc_len,
                      loss_chunk_size=0)
            ref = evaluate_perplexity(fresh, iter(docs), N, protocol, **kw)
            got = evaluate_perplexity(shared, iter(docs), N, protocol, scored=scored, **kw)
            assert got == ref
        # the standard protocol's windows that start at a multiple of the stride and are full are the
        # longlora protocol's too: run once
        ll = {(i, s) for i, d in enumerate(docs) if len(d) >= min_doc_len for s, _ in longlora_windows(len(d), N, 4)}
        st = {(i, s) for i, d in enumerate(docs) if len(d) >= min_doc_len for s, e in standard_windows(len(d), N)
              if e - s == N + 1}
        if max_windows is None:
            assert shared.rows == fresh.rows - len(ll & st) and len(ll & st) > 0
        else:  # the first document only: longlora starts 0, 4, 8 / standard 0, 8, 16 -> shared 0 (and 8)
            assert shared.rows == fresh.rows - {1: 1, 3: 2}[max_windows]


def test_windows_per_document_spread_the_windows_and_each_window_is_reported():
    rng = np.random.default_rng(6)
    docs = [rng.integers(0, V, L) for L in (40, 9, 30, 20)]
    N = 8
    every = evaluate_perplexity(RandomLM(), iter(docs), N, "longlora", stride=4, loss_chunk_size=0)
    spread = evaluate_perplexity(RandomLM(), iter(docs), N, "longlora", stride=4, max_windows=3,
                                 max_windows_per_doc=1, loss_chunk_size=0)
    starts = [len(longlora_windows(len(d), N, 4)) for d in docs]  # windows per document: 8, 1, 6, 3
    firsts = np.cumsum([0] + starts[:-1])[:3]  # each document's first window in the full list
    assert spread.documents == 3 and spread.windows == 3 and len(spread.window_loss) == 3
    assert spread.window_loss == [every.window_loss[i] for i in firsts]
    assert spread.loss == pytest.approx(float(np.mean(spread.window_loss)))
    assert "window_loss" not in spread.to_dict()


def test_no_long_enough_document_is_an_error():
    with pytest.raises(ValueError, match="no document"):
        evaluate_perplexity(PositionModel(), [np.arange(3)], 8, "longlora")


def test_long_context_counts_are_exact_and_min_doc_len_leaves_short_documents_out():
    assert [long_context_count(L, 7) for L in (7, 3, 4)] == [4, 0, 1]  # contexts >= 4 of 1..L
    docs = [np.arange(L) % V for L in (20, 5, 9, 1)]
    N = 8  # long context: >= 4 tokens; a window of L predictions has L - 3 such tokens
    # standard: doc 20 -> 8, 8, 3 predictions (5 + 5 + 0 long); doc 5 -> 4 (1, and short); doc 9 -> 8 (5); doc 1: none
    res = evaluate_perplexity(PositionModel(), docs, N, "standard")
    assert (res.tokens, res.long_context_tokens, res.documents, res.short_documents, res.skipped_documents) == (
        31, 16, 3, 1, 1)
    assert res.long_context_fraction == 16 / 31
    full = evaluate_perplexity(PositionModel(), docs, N, "standard", min_doc_len=N + 1)  # docs 20 and 9
    assert (full.tokens, full.long_context_tokens, full.documents, full.short_documents,
            full.skipped_documents, full.min_doc_len) == (24 + 3, 15, 2, 0, 2, 9)
    # longlora, stride 4: doc 20 -> starts 0, 4, 8; doc 9 -> start 0; 4 full windows of 8 (5 long each)
    ll = evaluate_perplexity(PositionModel(), docs, N, "longlora", stride=4)
    assert (ll.windows, ll.tokens, ll.long_context_tokens, ll.short_documents, ll.skipped_documents) == (
        4, 32, 20, 0, 2)
    with pytest.raises(ValueError, match="lower --min-doc-len"):
        evaluate_perplexity(PositionModel(), docs, N, "standard", min_doc_len=21)


@pytest.mark.parametrize("family,over", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                         ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 2}),
                                         ("gemma3_text", {"head_dim": 16, "final_logit_softcapping": 0.05})])
def test_chunked_scoring_equals_full_logits_on_random_models(family, over):
    from megalong.models import create_model
    from megalong.models.loading import lm_head_of
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = create_model(tiny_config(family, **over)).eval()
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if over.get("tie_word_embeddings"):
        assert lm_head_of(model).weight is model.get_input_embeddings().weight
    x = torch.randint(0, 96, (2, 41))  # N = 40 predictions per row
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits.float()
        ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    for chunk in (8, 7, 40, 1000):  # divides N, does not, N itself, more than N
        out = token_losses(model, x, chunk)
        assert out.shape == ref.shape == (2, 40)
        torch.testing.assert_close(out.sum(), ref.sum(), rtol=1e-5, atol=0)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_losses(model, x, 0), ref)


def test_chunked_scoring_of_a_peft_wrapped_model():
    from peft import LoraConfig, get_peft_model

    from megalong.models import create_model
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = get_peft_model(create_model(tiny_config("llama")), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a LoRA that changes the output
    model.eval()
    x = torch.randint(0, 96, (1, 30))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(input_ids=x[:, :-1]).logits.float()[0], x[0, 1:],
                                                reduction="none")
    torch.testing.assert_close(token_losses(model, x, 6)[0], ref, rtol=1e-5, atol=1e-5)


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


def test_eval_ppl_cli_reports_long_context_and_require_full_context(tmp_path, capsys):
    import json

    from megalong.data.indexed import IndexedDatasetBuilder
    from megalong.models import create_model, save_hf_model
    from tests.conftest import tiny_config
    from tools import eval_ppl

    lengths = [70, 10, 33, 20]  # at --seq-len 32: two documents fill a window (70, 33), two do not
    with IndexedDatasetBuilder(tmp_path / "docs") as b:
        b.add_documents(np.arange(sum(lengths)) % 90, lengths)
        b.finalize()
    torch.manual_seed(0)
    save_hf_model(create_model(tiny_config("llama")), tmp_path / "m")
    base = ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "docs"), "--seq-len", "32",
            "--protocol", "standard", "--no-progress"]
    assert eval_ppl.main(base + ["--loss-chunk-size", "5"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out.strip())
    # windows: 70 -> 32, 32, 5 predictions; 10 -> 9; 33 -> 32; 20 -> 19; long (>= 16 of context): L - 15
    assert (res["tokens"], res["long_context_tokens"], res["documents"], res["short_documents"]) == (
        129, 17 + 17 + 0 + 0 + 17 + 4, 4, 2)
    assert res["loss_chunk_size"] == 5 and "2 of 4 documents are shorter than 33 tokens" in out.err
    assert eval_ppl.main(base + ["--loss-chunk-size", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["ppl"] == pytest.approx(res["ppl"], rel=1e-5)
    assert eval_ppl.main(base + ["--require-full-context"]) == 0
    full = json.loads(capsys.readouterr().out.strip())
    assert (full["documents"], full["short_documents"], full["skipped_documents"], full["min_doc_len"]) == (2, 0, 2, 33)
    assert eval_ppl.main(base + ["--min-doc-len", "71"]) == 2
    assert "lower --min-doc-len or without --require-full-context" in capsys.readouterr().err


def test_passkey_generation_computes_logits_only_at_answer_positions():
    from megalong.eval.passkey import greedy_answer
    from megalong.models import create_model
    from tests.conftest import tiny_config

    model = create_model(tiny_config("llama", vocab_size=128, max_position_embeddings=512)).eval()
    model.generation_config.eos_token_id = None  # a random model may emit EOS; decode all 4 tokens
    seen = []
    model.lm_head.register_forward_hook(lambda m, inp, out: seen.append(tuple(out.shape)))
    prompt = build_prompt(_Tok().encode, 300, 0.5, 12345)
    answer = greedy_answer(model, prompt, 4, torch.device("cpu"))
    assert len(answer) == 4 and seen == [(1, 1, 128)] * 4  # never (1, len(prompt), V)


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

"""The task suite (megalong.eval.ruler): generators at exact lengths on two real tokenizer kinds, scoring,
the rule-based readers that prove the suite measures context use, and the resumable runner.

Tokenizers: Mistral's 32k SentencePiece model (shipped by mistral-common; Llama-style, BOS, byte
fallback) with a Llama-2-style chat template, and a byte-level BPE trained here on standard-library
sources with a ChatML template and a default system turn (SmolLM2-Instruct's layout).
"""

from __future__ import annotations

import glob
import json
import re
import sysconfig
from pathlib import Path

import pytest

from megalong.eval.ruler import TASKS, PromptFormat, SampleBuilder, SuiteConfig, SuiteError, run_suite
from megalong.eval.ruler.prompts import PromptTooShort, fit_units
from megalong.eval.ruler.readers import OracleReader, RandomReader, WindowReader
from megalong.eval.ruler.score import (
    averages,
    effective_length,
    postprocess,
    relative_scores,
    score_sample,
    string_match_all,
    string_match_part,
)

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\n"
          "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + "
          "m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
          "' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    mistral_common = pytest.importorskip("mistral_common")
    from transformers import AutoTokenizer

    from megalong.data.tokenizer import save_hf_tokenizer

    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    tok = AutoTokenizer.from_pretrained(str(save_hf_tokenizer(model, tmp_path_factory.mktemp("sp"))))
    tok.chat_template = LLAMA2
    return tok


@pytest.fixture(scope="module")
def bpe_tok():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:40]
    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>", chat_template=CHATML)


def _tokenizers(sp_tok, bpe_tok):
    return {"sentencepiece": sp_tok, "byte-bpe": bpe_tok}


def _samples(tok, chat, length, tasks=None, n=2, seed=0, depths=None):
    fmt = PromptFormat(tok, chat)
    return {t: [SampleBuilder(TASKS[t], length, fmt, seed=seed, depths=depths).build(i) for i in range(n)]
            for t in (tasks or TASKS)}


@pytest.mark.parametrize("length", [1000, 1537])
def test_every_prompt_has_the_requested_length_within_one_unit(sp_tok, bpe_tok, length):
    for kind, tok in _tokenizers(sp_tok, bpe_tok).items():
        for chat in (False, True):
            for task, samples in _samples(tok, chat, length).items():
                budget = length - TASKS[task].tokens_to_generate
                for s in samples:
                    where = f"{kind} chat={chat} {task} #{s.index}"
                    assert len(s.input_ids) <= budget, where
                    assert budget - len(s.input_ids) < s.unit_tokens, where  # one more unit would not fit
                    assert 0 < s.unit_tokens <= 100, where  # a UUID distractor needle is the largest unit
                    text = tok.decode(s.input_ids, skip_special_tokens=False)
                    if chat:
                        assert text.count("<|im_start|>assistant\n" if kind == "byte-bpe" else "[/INST]") == 1, where
                    for e in s.expected:
                        assert e in text, where


def test_needles_once_at_their_depth_and_distractors_never_the_answer(sp_tok, bpe_tok):
    needle = re.compile(r"One of the special magic \w+ for (\S+) is: (\S+?)\.")
    for kind, tok in _tokenizers(sp_tok, bpe_tok).items():
        by_task = _samples(tok, True, 2048, tasks=[t for t in TASKS if t.startswith("niah")], n=3,
                           depths=[0.1, 0.5, 0.9])
        for task, samples in by_task.items():
            for s in samples:
                text = tok.decode(s.input_ids)
                found = needle.findall(text)
                for value in s.expected:  # each answer stated exactly once, in exactly one needle
                    assert text.count(value) == 1 and sum(v == value for _, v in found) == 1, (kind, task)
                answer_keys = {k for k, v in found if v in s.expected}
                others = [(k, v) for k, v in found if k not in answer_keys]
                assert all(v not in s.expected for _, v in others), (kind, task)
                if task in ("niah_multikey_1", "niah_multikey_2", "niah_multikey_3"):
                    assert len(others) >= 3, (kind, task)  # distractor needles are there ...
                    assert len(answer_keys) == 1  # ... and never carry the queried key
                if len(s.depths) == 1:  # the fixed depth grid: the needle sits at that fraction of the haystack
                    assert s.depths == [[10, 50, 90][s.index]]
                    start, end = s.context_span
                    frac = (s.needle_positions[0] - start) / (end - start)
                    # noise/needle haystacks: depth counts units; essay: sentences of unequal length, as RULER
                    tol = 0.02 + 2 / s.units if TASKS[task].haystack != "essay" else 0.15
                    assert abs(frac - s.depths[0] / 100) < tol, (kind, task, frac, s.depths)
                    piece = tok.decode(s.input_ids[s.needle_positions[0]:s.needle_positions[0] + 12])
                    assert "special magic" in piece or piece.strip().startswith("One"), (kind, task, piece)


def test_same_seed_same_prompts_other_seed_other_prompts(bpe_tok):
    a = _samples(bpe_tok, True, 1200, n=2, seed=3)
    b = _samples(bpe_tok, True, 1200, n=2, seed=3)
    c = _samples(bpe_tok, True, 1200, n=2, seed=4)
    for t in TASKS:
        assert [s.input_ids for s in a[t]] == [s.input_ids for s in b[t]]
        assert [s.input_ids for s in a[t]] != [s.input_ids for s in c[t]]
        assert a[t][0].input_ids != a[t][1].input_ids  # samples of a cell differ


def test_too_short_lengths_are_refused_with_the_reason(bpe_tok):
    with pytest.raises(PromptTooShort, match="vt at 300 tokens"):
        SampleBuilder(TASKS["vt"], 300, PromptFormat(bpe_tok, True)).build(0)
    with pytest.raises(PromptTooShort, match="answer budget"):
        SampleBuilder(TASKS["niah_single_1"], 100, PromptFormat(bpe_tok, False))
    tok = type("T", (), {"chat_template": None})()
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat(tok, True)


def test_fit_units_finds_the_largest_fitting_count():
    for hint in (0, 5, 40, 1000):
        n, ids, longer = fit_units(lambda k: [0] * (7 + 3 * k), 100, hint)
        assert (n, len(ids), longer) == (31, 100, 103)
    with pytest.raises(PromptTooShort):
        fit_units(lambda k: [0] * (200 + k), 100)


def test_scoring_matches_ruler():
    assert postprocess("  a\x00b\tc \n") == "a\nb\nc"
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert string_match_part("The numbers are 123 and 456.", ["789", "456"]) == 100.0
    assert score_sample(" ABCDE fghij", ["abcde", "FGHIJ"]) == {"all": 100.0, "part": 100.0}
    avg = averages({1024: {"a": 90.0, "b": 100.0}, 2048: {"a": 80.0, "b": 95.0}, 4096: {"a": 99.0, "b": 99.0}},
                   ["a", "b"])
    assert avg == {1024: 95.0, 2048: 87.5, 4096: 99.0}
    assert effective_length(avg) == 4096 and effective_length(avg, 90.0) == 1024
    assert effective_length({1024: 50.0, 2048: 99.0}) is None  # a later pass after a failure does not count
    assert effective_length({1024: 99.0, 2048: None}) == 1024
    assert relative_scores(avg, 2048) == {1024: pytest.approx(95 / 0.875), 2048: 100.0, 4096: pytest.approx(99 / 0.875)}
    assert averages({1024: {"a": 1.0}}, ["a", "b"]) == {1024: None}


def _score(reader, samples):
    return [score_sample(g.text, s.expected)["all"] for s, g in zip(samples, reader(samples))]


def test_oracle_full_window_and_random_readers(sp_tok, bpe_tok):
    for kind, tok in _tokenizers(sp_tok, bpe_tok).items():
        for task, samples in _samples(tok, kind == "byte-bpe", 1800, n=3).items():
            assert _score(OracleReader(), samples) == [100.0] * 3, (kind, task)
            assert _score(WindowReader(tok, 1800), samples) == [100.0] * 3, (kind, task)  # the answer is in the prompt
            assert sum(_score(RandomReader(1), samples)) <= 10.0, (kind, task)


def test_a_reader_of_the_last_k_tokens_fails_exactly_the_deeper_needles(sp_tok, bpe_tok):
    window = 600
    for kind, tok in _tokenizers(sp_tok, bpe_tok).items():
        tasks = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_2", "niah_multikey_3", "vt"]
        seen = {"inside": 0, "deeper": 0}
        for task, samples in _samples(tok, True, 2500, tasks=tasks, n=6).items():
            for s, score in zip(samples, _score(WindowReader(tok, window), samples)):
                start = len(s.input_ids) - window
                if min(s.needle_positions) >= start + 2:
                    assert score == 100.0, (kind, task, s.needle_positions, start)
                    seen["inside"] += 1
                elif max(s.needle_positions) + 60 < start:
                    assert score == 0.0, (kind, task, s.needle_positions, start)
                    seen["deeper"] += 1
        assert seen["inside"] >= 3 and seen["deeper"] >= 10, (kind, seen)


class _Killed(RuntimeError):
    pass


class _Dying:
    """A generator that answers ``lives`` samples, then fails (a killed run)."""

    def __init__(self, reader, lives):
        self.reader, self.lives = reader, lives

    def __call__(self, samples):
        if self.lives < len(samples):
            raise _Killed
        self.lives -= len(samples)
        return self.reader(samples)


def test_suite_resumes_after_a_kill_and_refuses_another_configuration(bpe_tok, tmp_path):
    def cfg(seed=0):
        return SuiteConfig([1100, 1500], ["niah_single_2", "cwe", "vt"], samples=3, seed=seed, chat=True,
                           base_length=1100)
    ident = {"model": "reader", "model_sha": "x", "tokenizer_sha": "y"}
    reader = WindowReader(bpe_tok, 700)
    clean = run_suite(reader, bpe_tok, cfg(), tmp_path / "clean", identity=ident, progress=False)
    with pytest.raises(_Killed):
        run_suite(_Dying(reader, 10), bpe_tok, cfg(), tmp_path / "resumed", identity=ident, progress=False)
    lines = sum(len(p.read_text().splitlines()) - 1 for p in (tmp_path / "resumed" / "cells").rglob("*.jsonl"))
    assert lines == 10
    again = _Dying(reader, 8)  # exactly the 18 - 10 samples still missing
    resumed = run_suite(again, bpe_tok, cfg(), tmp_path / "resumed", identity=ident, progress=False)
    assert again.lives == 0
    for key in ("scores", "average", "effective_length", "relative_to_base", "depth_grid", "complete"):
        assert resumed[key] == clean[key], key
    assert clean["complete"] and clean["relative_to_base"]["1100"] == 100.0
    recs = [json.loads(x) for x in (tmp_path / "clean" / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 18 and {"task", "length", "depths", "expected", "generated", "score"} <= set(recs[0])
    for name in ("results.json", "table.md", "tasks.png", "depth.png"):
        assert (tmp_path / "clean" / name).is_file(), name
    assert "| niah_single_2 |" in (tmp_path / "clean" / "table.md").read_text()
    with pytest.raises(SuiteError, match="another configuration .*seed"):
        run_suite(reader, bpe_tok, cfg(seed=1), tmp_path / "clean", identity=ident, progress=False)
    other = run_suite(reader, bpe_tok, cfg(seed=1), tmp_path / "clean", identity=ident, progress=False,
                      overwrite=True)
    assert other["seed"] == 1 and other["complete"]
    ref = run_suite(OracleReader(), bpe_tok, cfg(), tmp_path / "oracle", identity=ident, progress=False,
                    reference=clean)
    assert ref["average"] == {"1100": 100.0, "1500": 100.0}
    assert ref["reference"]["delta"]["1100"] == pytest.approx(100.0 - clean["average"]["1100"])


def test_suite_config_refuses_bad_options():
    with pytest.raises(SuiteError, match="lengths"):
        SuiteConfig([16])
    with pytest.raises(SuiteError, match="samples"):
        SuiteConfig([1024], samples=0)
    with pytest.raises(SuiteError, match="depths"):
        SuiteConfig([1024], depths=[1.5])
    with pytest.raises(ValueError, match="unknown tasks"):
        SuiteConfig([1024], tasks=["qa_1"])

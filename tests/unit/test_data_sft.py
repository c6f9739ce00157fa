"""SFT: prompt masking at preprocessing, padded and packed rows, truncation."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from megalong.data.corpus import stdlib_dir
from megalong.data.indexed import DataFileError, IndexedDataset
from megalong.data.preprocess import preprocess
from megalong.data.sft import TEMPLATES, SFTDataset, mask_prefix, render
from megalong.data.tokenizer import load_tokenizer, train_sentencepiece

RECORDS = [
    {"instruction": "Summarise the module below.", "input": "import os\nprint(os.sep)\n", "output": "It prints the path separator."},
    {"instruction": "Name a prime number.", "input": "", "output": "Seven."},
    {"instruction": "Write a long answer.", "output": "word " * 60},
    {"instruction": "Empty answers are skipped.", "input": "", "output": ""},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sft")
    tok = train_sentencepiece([stdlib_dir() / "json" / "decoder.py", stdlib_dir() / "textwrap.py"], d / "sp", 500)
    (d / "data.json").write_text(json.dumps(RECORDS))  # LongAlpaca ships a JSON array
    s = preprocess([d / "data.json"], d / "sft", tok, workers=0, sft_template="alpaca", prepend_bos=True,
                   progress=False)
    assert s["documents"] == 4 and s["skipped"] == 1
    return d / "sft", tok


def test_prompt_is_masked(sft_data):
    prefix, tok_path = sft_data
    tok = load_tokenizer(tok_path)
    tokens, mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    assert mask.dtype == np.uint8 and np.array_equal(tokens.doc_lengths, mask.doc_lengths)
    kept = [r for r in RECORDS if r["output"]]
    for i, rec in enumerate(kept):
        ids, m = tokens[i], mask[i].astype(bool)
        prompt, response = render(rec, "alpaca")
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and m[-1] and not m[0]
        assert tok.decode(ids[1:-1].tolist()) == prompt + response
        assert np.all(np.diff(m.astype(int)) >= 0)  # 0 … 0 1 … 1: prompt first, then the targets
        assert tok.decode(ids[~m][1:].tolist()) == prompt
        assert tok.decode(ids[m][:-1].tolist()).strip() == response.strip()
    assert "### Input:" in render(RECORDS[0], "alpaca")[0] and "### Input:" not in render(RECORDS[1], "alpaca")[0]
    assert render(RECORDS[1], "plain")[0] == "Name a prime number.\n\n" and set(TEMPLATES) >= {"alpaca", "plain"}
    with pytest.raises(DataFileError, match="needs a string 'output'"):
        render({"instruction": "x"}, "alpaca", "f.json:3")


def test_padded_rows(sft_data):
    prefix, tok_path = sft_data
    tokens, mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    lengths = sorted(tokens.doc_lengths.tolist())
    n = lengths[-2] + 3  # only the long example is longer than n + 1: it gets truncated
    assert lengths[-1] > n + 1
    ds = SFTDataset(prefix, n, num_samples=10, seed=0, pad_id=0, packing=False)
    assert ds.truncated_examples == 1 and len(ds) >= 10
    for i in range(len(ds)):
        ex = int(ds.order[i])
        ids, m = np.asarray(tokens[ex], np.int64), mask[ex].astype(bool)
        k = min(len(ids), n + 1)
        item = ds[i]
        row = np.full(n + 1, 0)
        row[:k] = ids[:k]
        np.testing.assert_array_equal(item["input_ids"], row[:n])
        want = np.where(np.append(m[1:k], np.zeros(n + 1 - k, bool)), row[1:], -100)
        np.testing.assert_array_equal(item["labels"], want)
        assert np.all(item["labels"][k - 1:] == -100)  # pads never train
        np.testing.assert_array_equal(item["segment_ids"], (np.arange(n) >= k).astype(np.int32))
        np.testing.assert_array_equal(item["position_ids"], np.arange(n))


def test_packed_rows(sft_data):
    prefix, _ = sft_data
    tokens, mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    n = int(tokens.doc_lengths.max() + tokens.doc_lengths.min()) + 5  # nothing truncated; some rows hold several
    ds = SFTDataset(prefix, n, num_samples=6, seed=1, pad_id=0, packing=True, reset_position_ids=True)
    assert ds.truncated_examples == 0
    multi = 0
    for i in range(len(ds)):
        exs = ds.order[int(ds.row_bounds[i]): int(ds.row_bounds[i + 1])]
        multi += len(exs) > 1
        ids = np.concatenate([np.asarray(tokens[int(e)], np.int64) for e in exs])
        tgt = np.concatenate([mask[int(e)].astype(bool) for e in exs])
        seg = np.concatenate([np.full(len(tokens[int(e)]), s) for s, e in enumerate(exs)])
        first = np.concatenate([[True], seg[1:] != seg[:-1]])
        k = len(ids)
        assert k <= n + 1
        item = ds[i]
        np.testing.assert_array_equal(item["input_ids"][:min(k, n)], ids[:n])
        want = np.full(n, -100)
        ok = tgt[1:] & ~first[1:]  # a target token of the same example
        want[:k - 1] = np.where(ok, ids[1:], -100)
        np.testing.assert_array_equal(item["labels"], want)
        np.testing.assert_array_equal(item["segment_ids"][:min(k, n)], seg[:n])
        pos = np.arange(k) - np.maximum.accumulate(np.where(first, np.arange(k), 0))
        np.testing.assert_array_equal(item["position_ids"][:min(k, n)], pos[:n])
        if k < n:
            assert np.all(item["segment_ids"][k:] == len(exs)) and np.all(item["input_ids"][k:] == 0)
    assert multi >= 1  # packing actually put several examples in one row


def test_mask_must_match(sft_data, tmp_path):
    prefix, _ = sft_data
    import shutil

    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f"{prefix}{ext}", tmp_path / f"x{ext}")
    with pytest.raises(DataFileError, match="no such file"):
        SFTDataset(tmp_path / "x", 16, 4, 0, 0)


# ---------------------------------------------------------------- chat SFT (--sft chat)
CHAT = [  # OpenAI messages with a system turn, two assistant turns; ShareGPT without one (default system)
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
                  {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "An even one?"},
                  {"role": "assistant", "content": "Two, caf\u00e9 \u2603."}]},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"},
                       {"from": "human", "value": "Thanks."}]},
    {"messages": []},  # nothing to train on: skipped, counted
    {"conversations": [{"from": "system", "value": "x"}, {"from": "human", "value": "no reply"}]},  # skipped
    {"messages": [{"role": "user", "content": "Once more"}, {"role": "assistant", "content": "Sure: once."}]},
]
ASSISTANT = [["Seven.", "Two, caf\u00e9 \u2603."], ["Hi!"], ["Sure: once."]]
HISTORY_PRUNING = (  # like templates that drop past reasoning: earlier replies render differently
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}(...)"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tool(name: str, *args: str) -> int:
    """Run tools/NAME.py's main in this process."""
    import importlib.util

    from tests.assets import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(list(args))


def _preprocess_tool(*args: str) -> int:
    return _tool("preprocess_data", *args, "--workers", "0", "--no-progress")


@pytest.fixture(scope="module")
def chat_data(sft_data) -> tuple[Path, str]:
    from tests.assets import build_chat_tokenizer

    _, spm = sft_data
    d = spm.parent / "chat"
    tok = build_chat_tokenizer(spm, d / "tok")
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _preprocess_tool("--input", str(d / "chat.jsonl"), "--output-prefix", str(d / "chat"),
                                "--tokenizer", tok, "--sft", "chat") == 0
    assert "3 documents (2 empty or without an assistant reply skipped)" in out.getvalue()
    return d / "chat", tok


def _target_runs(ids: np.ndarray, m: np.ndarray) -> list[list[int]]:
    """The contiguous runs of target tokens (mask 1)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
    return [ids[a:b].tolist() for a, b in zip(edges[::2], edges[1::2])]


def test_chat_loss_on_assistant_turns_only(chat_data, capsys):
    from transformers import AutoTokenizer

    prefix, tok_dir = chat_data
    hf = AutoTokenizer.from_pretrained(tok_dir)
    end = hf.convert_tokens_to_ids("<|im_end|>")
    tokens, mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    assert len(tokens) == 3 and mask.dtype == np.uint8 and np.array_equal(tokens.doc_lengths, mask.doc_lengths)
    assert tokens.meta["chat"]["mask"] == "prefix" and tokens.meta["chat"]["end_token_ids"] == [end]
    kept = [r for r in CHAT if r.get("messages") or len(r.get("conversations", [])) == 3]
    for i, (rec, replies) in enumerate(zip(kept, ASSISTANT)):
        ids, m = np.asarray(tokens[i], np.int64), mask[i].astype(bool)
        msgs = rec.get("messages") or [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                                       for t in rec["conversations"]]
        assert ids.tolist() == hf.apply_chat_template(msgs, return_dict=False)  # what inference sees
        runs = _target_runs(ids, m)
        # loss on each reply and its <|im_end|>: not the header, the "\n" after it, system or user turns
        assert [hf.decode(r) for r in runs] == [f"{a}<|im_end|>" for a in replies]
        assert all(r[-1] == end for r in runs)
        rest = hf.decode(ids[~m].tolist())
        assert rest.count("<|im_start|>assistant\n") == len(replies) and not any(a in rest for a in replies)
    assert "You are a helpful assistant." in hf.decode(tokens[1].tolist())  # the template's default system turn
    assert _tool("inspect_data", str(prefix), "--doc", "0") == 0  # shows the user what carries loss
    shown = capsys.readouterr().out.split("loss on ")[1]
    assert "2 runs:" in shown and repr("Seven.<|im_end|>") in shown
    # packed (the alpaca road): all three in one row, one segment each; labels are exactly the targets
    ds = SFTDataset(prefix, int(tokens.doc_lengths.sum()), num_samples=1, seed=0, pad_id=end, packing=True)
    row = ds[0]
    assert ds.truncated_examples == 0 and set(row["segment_ids"].tolist()) == {0, 1, 2}
    assert (row["labels"] != -100).sum() == sum(int(mask[i].sum()) for i in range(3))


def test_chat_bad_records(sft_data, tmp_path):
    from tests.assets import build_chat_tokenizer

    tok = build_chat_tokenizer(sft_data[1], tmp_path / "tok")
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    cases = [
        ({"conversations": [{"from": "bot", "value": "x"}]}, r":2: conversations\[0\]: unknown role 'bot'; use one of "
                                                              "human, user, gpt, assistant, system, tool"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, r":2: messages\[0\]: 'content' is list, not a string"),
        ({"messages": {"role": "user"}}, r":2: 'messages' is dict, not a list"),
        ({"messages": [], "conversations": []}, ":2: a chat record needs exactly one of 'messages'"),
        ({"text": "x"}, r":2: a chat record needs exactly one of .* keys: text"),
        ({"messages": [{"speaker": "user"}]}, r":2: messages\[0\]: a message needs 'role' and 'content'"),
        ({"conversations": [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Hi."}]},
         r":2: conversations\[0\] is an assistant turn: .* start the conversation with a system or user turn"),
    ]
    for k, (bad, match) in enumerate(cases):
        f = tmp_path / f"bad{k}.jsonl"
        f.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataFileError, match=f"bad{k}.jsonl" + match):
            preprocess([f], tmp_path / f"o{k}", tok, workers=0, sft_template="chat", progress=False)
        assert not (tmp_path / f"o{k}.bin").exists()


def test_chat_template_problems(sft_data, chat_data, tmp_path):
    from megalong.data.tokenizer import TokenizerError
    from tests.assets import CHATML_TEMPLATE, build_chat_tokenizer

    prefix, _ = chat_data
    src = prefix.parent / "chat.jsonl"
    plain = build_chat_tokenizer(sft_data[1], tmp_path / "tok", template=None)
    with pytest.raises(TokenizerError, match="has no chat template .* pass --chat-template FILE"):
        preprocess([src], tmp_path / "x", plain, workers=0, sft_template="chat", progress=False)
    with pytest.raises(TokenizerError, match="--sft chat needs an HF tokenizer directory"):
        preprocess([src], tmp_path / "x", sft_data[1], workers=0, sft_template="chat", progress=False)
    (tmp_path / "chatml.jinja").write_text(CHATML_TEMPLATE)  # --chat-template supplies one: the same files
    assert _preprocess_tool("--input", str(src), "--output-prefix", str(tmp_path / "own"), "--tokenizer", plain,
                            "--sft", "chat", "--chat-template", str(tmp_path / "chatml.jinja")) == 0
    for suffix in (".bin", "_mask.bin"):
        assert (tmp_path / f"own{suffix}").read_bytes() == Path(f"{prefix}{suffix}").read_bytes()
    (tmp_path / "pruning.jinja").write_text(HISTORY_PRUNING)  # not prefix-stable: refused up front
    with pytest.raises(TokenizerError, match=r"pruning.jinja, on a probe .*: messages\[1\] \(assistant\): .*\(not prefix-stable"):
        preprocess([src], tmp_path / "x", plain, workers=0, sft_template="chat", chat_template=tmp_path / "pruning.jinja",
                   progress=False)
    with pytest.raises(DataFileError, match="drop --append-eod"):
        preprocess([src], tmp_path / "x", plain, workers=0, sft_template="chat", append_eod=True, progress=False)
    # {% generation %} blocks: the template author's marking (transformers' assistant mask), same targets here
    gen = CHATML_TEMPLATE.replace("message['content'] + '<|im_end|>' + '\\n' }}",
                                  "'' }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + "
                                  "'<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
                                  "{% endif %}{{ '\\n' }}")
    assert gen != CHATML_TEMPLATE
    (tmp_path / "gen.jinja").write_text(gen)
    s = preprocess([src], tmp_path / "gen", plain, workers=0, sft_template="chat", chat_template=tmp_path / "gen.jinja",
                   progress=False)
    assert s["meta"]["chat"]["mask"] == "generation" and s["open_turns"] == 0
    for suffix in (".bin", "_mask.bin"):
        assert (tmp_path / f"gen{suffix}").read_bytes() == Path(f"{prefix}{suffix}").read_bytes()
    # tokenizer worker processes write the same files
    preprocess([src], tmp_path / "w2", plain, workers=2, batch_size=2, sft_template="chat",
               chat_template=tmp_path / "chatml.jinja", progress=False)
    for suffix in (".bin", "_mask.bin"):
        assert (tmp_path / f"w2{suffix}").read_bytes() == Path(f"{prefix}{suffix}").read_bytes()

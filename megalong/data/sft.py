"""Instruction data (LongAlpaca-style ``instruction`` / ``input`` / ``output``) with masked prompt labels.

Preprocessing (``tools/preprocess_data.py --sft TEMPLATE``) writes two datasets with the same
document lengths: ``PREFIX`` (tokens: [BOS] prompt response EOS) and ``PREFIX_mask`` (uint8, 1 where
the token is a training target: the response and its EOS). The prompt is found by encoding the
prompt alone and the whole example, and masking their common prefix. ``--sft chat`` writes the same
two files for conversations (one example each; targets: every assistant turn and its end-of-turn
token), rendered with the tokenizer's chat template (``megalong.data.chat``).

Rows (same item contract as pretraining, see ``megalong.data.samples``)::

    padded:  [ prompt₀ response₀ EOS  pad pad pad ]      one example per row
    packed:  [ prompt₀ resp₀ EOS prompt₁ resp₁ EOS pad ] consecutive examples while they fit
    labels:    -100 … next token on response/EOS targets … -100 on prompts, pads and across examples
    segment:     0 0 0 0 0 0       1 1 1 1 1 1     2      one id per example, pads get the next id

An example longer than N + 1 tokens is truncated (counted, and logged once per index build).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from megalong.data.batch import IGNORE_INDEX
from megalong.data.indexed import DataFileError, IndexedDataset
from megalong.data.samples import default_cache_dir, load_or_build, row_layout

log = logging.getLogger(__name__)

TEMPLATES: dict[str, dict[str, str]] = {
    "alpaca": {
        "with_input": ("Below is a task, together with material to work from. Write a reply that carries out "
                       "the task.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
        "no_input": ("Below is a task. Write a reply that carries out the task.\n\n"
                     "### Instruction:\n{instruction}\n\n### Response:\n"),
    },
    "plain": {"with_input": "{instruction}\n\n{input}\n\n", "no_input": "{instruction}\n\n"},
}
"""Prompt templates; ``{instruction}`` and ``{input}`` are filled in, the response follows the prompt."""

SFT_FORMATS = (*TEMPLATES, "chat")
"""What ``tools/preprocess_data.py --sft`` takes: a prompt template above, or ``chat`` (conversations
under the tokenizer's chat template, loss on assistant turns: ``megalong.data.chat``)."""


def mask_prefix(prefix: str | os.PathLike) -> str:
    """Prefix of the loss-mask dataset that goes with an SFT token dataset."""
    return f"{os.fspath(prefix)}_mask"


def render(record: dict, template: str, where: str = "") -> tuple[str, str]:
    """(prompt, response) of one record under a template."""
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataFileError(f"{where}: SFT record needs a string {key!r} (keys: {', '.join(map(str, record))}); "
                                "expected LongAlpaca-style instruction/input/output fields")
    t = TEMPLATES[template]
    extra = record.get("input") or ""
    prompt = (t["with_input"] if extra else t["no_input"]).format(instruction=record["instruction"], input=extra)
    return prompt, record["output"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(diff[0]) if len(diff) else m


def encode_sft_records(tok, records: list[dict], template: str, dtype: np.dtype, source: str = "", first: int = 1,
                       prepend_bos: bool = False):
    """Encode SFT records into flat tokens + loss mask (an ``Encoded`` from megalong.data.preprocess).

    ``source`` and ``first`` (the first record's line/number) only serve error messages.
    """
    from megalong.data.preprocess import Encoded

    pairs = [render(r, template, f"{source}:{first + k}") if r else ("", "") for k, r in enumerate(records)]
    keep = [(p, r) for p, r in pairs if r.strip()]
    prompts = tok.encode_batch([p for p, _ in keep]) if keep else []
    fulls = tok.encode_batch([p + r for p, r in keep]) if keep else []
    bos = [tok.bos_id] if prepend_bos else []
    toks, masks, lengths = [], [], []
    for p_ids, f_ids in zip(prompts, fulls):
        n_prompt = _common_prefix(p_ids, f_ids)
        ids = bos + f_ids + [tok.eos_id]
        m = np.zeros(len(ids), dtype=np.uint8)
        m[len(bos) + n_prompt:] = 1
        toks.append(np.asarray(ids, dtype=dtype))
        masks.append(m)
        lengths.append(len(ids))
    if not toks:
        return Encoded(np.zeros(0, dtype), np.zeros(0, np.int64), np.zeros(0, np.uint8), len(records))
    return Encoded(np.concatenate(toks), np.asarray(lengths, np.int64), np.concatenate(masks),
                   len(records) - len(keep))


def _pack_rows(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Row boundaries (into the example order): consecutive examples while their tokens fit."""
    bounds, fill = [0], 0
    for k, n in enumerate(np.minimum(lengths, capacity).tolist()):
        if fill and fill + n > capacity:
            bounds.append(k)
            fill = 0
        fill += n
    bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


def build_sft_index(tokens: IndexedDataset, max_seq_len: int, num_samples: int, seed: int, packing: bool,
                    cache_dir: str | os.PathLike | None = None):
    """Example order over epochs and row boundaries (one example per row unless packing); cached."""
    parts = {"kind": "sft", "data": tokens.identity, "max_seq_len": int(max_seq_len), "num_samples": int(num_samples),
             "seed": int(seed), "packing": bool(packing)}
    cap = max_seq_len + 1

    def build() -> tuple[dict, dict]:
        lens = tokens.doc_lengths
        ids = np.flatnonzero(lens > 0)
        if not len(ids):
            raise DataFileError(f"{tokens.prefix}: SFT dataset has no examples; re-run tools/preprocess_data.py --sft")
        rng = np.random.default_rng(seed)
        orders, bounds, rows = [], [np.zeros(1, np.int64)], 0
        while rows < num_samples:  # add epochs until there are enough rows
            order = rng.permutation(ids)
            b = np.arange(1, len(order) + 1) if not packing else _pack_rows(lens[order], cap)[1:]
            bounds.append(b + sum(len(o) for o in orders))
            orders.append(order)
            rows += len(b)
        order = np.concatenate(orders).astype(np.int64)
        truncated = int((lens[ids] > cap).sum())
        if truncated:
            log.warning("%s: %d of %d examples are longer than max_seq_len + 1 = %d tokens and are truncated",
                        tokens.prefix, truncated, len(ids), cap)
        return {"order": order, "row_bounds": np.concatenate(bounds)}, {"truncated_examples": truncated,
                                                                         "examples": len(ids)}

    name = f"{Path(tokens.prefix).name}_sft"
    return load_or_build(default_cache_dir(tokens.prefix, cache_dir), name, parts, build)


class SFTDataset:
    """Rows of SFT examples, padded (one per row) or packed; items follow the pretraining contract.

    Args:
        prefix: SFT token dataset prefix (its mask lives at ``PREFIX_mask``).
        max_seq_len: N.
        num_samples: at least this many rows.
        seed: shuffle seed.
        pad_id: token id used for padding (labels there are -100; the EOS id is a fine choice).
        packing: several examples per row.
        reset_position_ids: restart positions at each example.
        cache_dir: index cache directory.
    """

    def __init__(self, prefix: str | os.PathLike, max_seq_len: int, num_samples: int, seed: int, pad_id: int,
                 packing: bool = True, reset_position_ids: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.tokens = IndexedDataset(prefix)
        self.mask = IndexedDataset(mask_prefix(prefix))
        if not np.array_equal(self.tokens.doc_lengths, self.mask.doc_lengths):
            raise DataFileError(f"{mask_prefix(prefix)}: loss mask does not match {prefix} (different document "
                                "lengths); re-run tools/preprocess_data.py --sft")
        self.max_seq_len, self.pad_id, self.reset_position_ids = max_seq_len, pad_id, reset_position_ids
        self.index = build_sft_index(self.tokens, max_seq_len, num_samples, seed, packing, cache_dir)
        self.order, self.row_bounds = self.index.arrays["order"], self.index.arrays["row_bounds"]
        self.key = self.index.key
        self.truncated_examples = int(self.index.info["truncated_examples"])

    def __len__(self) -> int:
        return len(self.row_bounds) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range ({len(self)} rows)")
        n, cap = self.max_seq_len, self.max_seq_len + 1
        row = np.full(cap, self.pad_id, dtype=np.int64)
        target = np.zeros(cap, dtype=bool)  # is this token a training target
        lengths, fill = [], 0
        for ex in self.order[int(self.row_bounds[i]): int(self.row_bounds[i + 1])]:
            k = min(int(self.tokens.doc_lengths[ex]), cap - fill)
            row[fill: fill + k] = self.tokens.get(int(ex), 0, k)
            target[fill: fill + k] = self.mask.get(int(ex), 0, k) > 0
            lengths.append(k)
            fill += k
        if fill < cap:
            lengths.append(cap - fill)  # the padding: one more segment
        seg_full, _ = row_layout(np.asarray(lengths), cap, False)  # (N + 1,)
        seg, pos = row_layout(np.asarray(lengths), n, self.reset_position_ids)
        valid = target[1:] & (seg_full[1:] == seg_full[:-1])  # target token, same example as its input
        labels = np.where(valid, row[1:], IGNORE_INDEX)
        return {"input_ids": row[:n], "labels": labels, "position_ids": pos, "segment_ids": seg}

"""Greedy answers from a model: batched, KV-cached ``generate`` on one device, or sequence parallel.

    HFGenerator      samples (one task, one length) in batches of ``batch_size``, left-padded to the
                     longest prompt; prefill once, then one cached step per answer token; stops at the
                     model's EOS tokens or after the task's ``tokens_to_generate``
    ParallelGenerator one prompt at a time split over a sequence-parallel group
                     (``megalong.eval.sp.SequenceParallelEval.greedy``): same greedy tokens

Both return the decoded answer without special tokens (the string RULER scores) and its ids.
"""

from __future__ import annotations

import torch

from megalong.eval.passkey import eos_ids
from megalong.eval.ruler.prompts import Generation, Sample


def _decode(tokenizer, ids: list[int], eos: tuple[int, ...]) -> tuple[str, list[int]]:
    for i, t in enumerate(ids):
        if t in eos:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True), ids


class HFGenerator:
    """Batched greedy decoding with transformers' ``generate`` (KV cache, last-position logits only)."""

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu", batch_size: int = 1):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, torch.device(device), batch_size
        self.eos = tuple(dict.fromkeys([*eos_ids(model), *([tokenizer.eos_token_id]
                                                           if tokenizer.eos_token_id is not None else [])]))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos[0] if self.eos else 0)

    @torch.no_grad()
    def _batch(self, samples: list[Sample]) -> list[Generation]:
        width = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):  # left padding: every prompt ends at the last column
            ids[i, width - len(s.input_ids):] = torch.tensor(s.input_ids)
            mask[i, width - len(s.input_ids):] = 1
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=max(s.max_new_tokens for s in samples), do_sample=False,
                                  num_beams=1, eos_token_id=list(self.eos) or None, pad_token_id=self.pad)
        gens = []
        for i, s in enumerate(samples):
            text, new = _decode(self.tokenizer, out[i, width:width + s.max_new_tokens].tolist(), self.eos)
            gens.append(Generation(text, new))
        return gens

    def __call__(self, samples: list[Sample]) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(samples), self.batch_size):
            out += self._batch(samples[i:i + self.batch_size])
        return out


class ParallelGenerator:
    """One prompt at a time over a sequence-parallel group (every rank calls it alike)."""

    def __init__(self, model, tokenizer, parallel, device: torch.device | str = "cpu"):
        self.model, self.tokenizer, self.parallel, self.device = model, tokenizer, parallel, torch.device(device)
        self.eos = tuple(dict.fromkeys([*eos_ids(model), *([tokenizer.eos_token_id]
                                                           if tokenizer.eos_token_id is not None else [])]))

    def __call__(self, samples: list[Sample]) -> list[Generation]:
        out = []
        for s in samples:
            new = self.parallel.greedy(self.model, s.input_ids, s.max_new_tokens, self.device, self.eos)
            text, new = _decode(self.tokenizer, new, self.eos)
            out.append(Generation(text, new))
        return out

"""Passkey retrieval (the protocol LongLoRA reports, after Mohtashami & Jaggi 2023).

    [task line] [filler × k] [key sentence: key stated twice] [filler × m] [question]
                 ◄──────────────── about `length` tokens ────────────────►
    depth = k / (k + m), uniform at random (or a fixed grid for the heat-map)

The key is a random 5-digit integer; the model decodes greedily as many tokens as the answer
has (plus one, for a word-boundary piece); the first number in the decoded text must equal the key. Accuracy per length (and per depth).

Under sequence parallelism (``parallel``) each prompt is split over the group's ranks and every
answer token re-runs the sharded forward (``megalong.eval.sp``): plain greedy argmax, stopping after
an EOS as ``generate`` does; every rank draws the same trials and gets the same answers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TASK = "A passkey is hidden somewhere in the long text below. Read everything and remember the passkey.\n"
FILLER = "The river runs to the sea. The hills stand still. The wind moves the grass. Day follows night. "
KEY_LINE = "The passkey is {key}. Remember {key}, it is the passkey. "
QUESTION = "\nWhat is the passkey? The passkey is "


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: int
    answer: str
    prompt_tokens: int
    correct: bool
    answer_ids: list[int] = field(default_factory=list)
    """The greedy tokens ``answer`` decodes from."""


@dataclass
class PasskeyReport:
    trials: list[PasskeyTrial] = field(default_factory=list)

    def accuracy_by_length(self) -> dict[int, float]:
        out: dict[int, list[bool]] = {}
        for t in self.trials:
            out.setdefault(t.length, []).append(t.correct)
        return {k: sum(v) / len(v) for k, v in sorted(out.items())}

    def accuracy_grid(self) -> dict[int, dict[float, float]]:
        grid: dict[int, dict[float, list[bool]]] = {}
        for t in self.trials:
            grid.setdefault(t.length, {}).setdefault(round(t.depth, 3), []).append(t.correct)
        return {n: {d: sum(v) / len(v) for d, v in sorted(row.items())} for n, row in sorted(grid.items())}

    def to_dict(self) -> dict:
        return {
            "accuracy_by_length": {str(k): v for k, v in self.accuracy_by_length().items()},
            "accuracy_grid": {str(n): {str(d): a for d, a in row.items()} for n, row in self.accuracy_grid().items()},
            "trials": [t.__dict__ for t in self.trials],
        }


def build_prompt(encode: Callable[[str], list[int]], length: int, depth: float, key: int) -> list[int]:
    """Token ids of a prompt of about ``length`` tokens with the key sentence at ``depth``."""
    head, key_ids, tail = encode(TASK), encode(KEY_LINE.format(key=key)), encode(QUESTION)
    filler = encode(FILLER)
    budget = max(0, length - len(head) - len(key_ids) - len(tail))
    n_fill = max(1, budget // max(1, len(filler)))
    before = int(round(n_fill * depth))
    return head + filler * before + key_ids + filler * (n_fill - before) + tail


def eos_ids(model) -> tuple[int, ...]:
    """The token ids that end greedy generation (the model's generation config, else its config)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
               "min_length": 0, "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
               "forced_eos_token_id": None}


def unapplied_processors(model) -> list[str]:
    """Settings of the model's generation config that change ``generate``'s greedy tokens but that the
    sequence-parallel argmax does not apply (empty for a plain config)."""
    gen = getattr(model, "generation_config", None)
    return [f"{k}={getattr(gen, k)!r}" for k, neutral in _PROCESSORS.items()
            if getattr(gen, k, neutral) not in (neutral, None)]


@torch.no_grad()
def greedy_answer(model, prompt: list[int], n_tokens: int, device: torch.device, parallel=None) -> list[int]:
    """``n_tokens`` greedy tokens after ``prompt`` (``parallel``: split over a sequence-parallel group).

    Memory: ``generate`` asks the model for the last position's logits only (``logits_to_keep=1``,
    for Llama, Mistral and Qwen2), so a long prompt never holds (prompt × vocab) logits; a unit test
    checks the lm_head's output shapes."""
    if parallel is not None:
        return parallel.greedy(model, prompt, n_tokens, device, eos_ids(model))
    x = torch.tensor([prompt], device=device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_tokens,
                         do_sample=False, num_beams=1, pad_token_id=getattr(model.config, "eos_token_id", 0))
    return out[0, len(prompt):].tolist()


def run_passkey(
    model,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    lengths: list[int],
    *,
    trials: int = 10,
    depths: list[float] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    parallel=None,
) -> PasskeyReport:
    """``trials`` per length at uniformly random depths, or per (length, depth) when ``depths`` is given.

    ``progress``: report trials done (a bar on a terminal, else a line at least every 20 s).
    ``parallel``: a ``megalong.eval.sp.SequenceParallelEval``; every rank of its group calls this alike."""
    from megalong.utils.progress import Progress

    rng = random.Random(seed)
    device = torch.device(device)
    report = PasskeyReport()
    per_length = trials * (len(depths) if depths else 1)
    bar = Progress(per_length * len(lengths), "passkey", every=per_length, enabled=progress, unit="trial")
    for length in lengths:
        cells = [(d, t) for d in depths for t in range(trials)] if depths else [(rng.random(), t)
                                                                                for t in range(trials)]
        for depth, _ in cells:
            key = rng.randint(10000, 50000)
            n_answer = len(encode(str(key))) + 1  # +1: a tokenizer may emit a word-boundary piece first
            prompt = build_prompt(encode, length - n_answer, depth, key)  # prompt + answer fit in `length`
            answer_ids = greedy_answer(model, prompt, n_answer, device, parallel)
            answer = decode(answer_ids)
            found = re.search(r"\d+", answer)
            correct = found is not None and found.group() == str(key)
            report.trials.append(PasskeyTrial(length, depth, key, answer, len(prompt), correct, answer_ids))
            done = [t.correct for t in report.trials if t.length == length]
            bar.update(1, length=length, accuracy=sum(done) / len(done))
    bar.close()
    return report


def plot_heatmap(report: PasskeyReport, path: str) -> None:
    """Accuracy heat-map: rows are depths, columns are lengths."""
    from megalong.utils.optional import require

    matplotlib = require("matplotlib", "plot", "the passkey heat-map")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = report.accuracy_grid()
    lengths = sorted(grid)
    depths = sorted({d for row in grid.values() for d in row})
    mat = np.array([[grid[n].get(d, np.nan) for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title("passkey retrieval accuracy")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Scoring as RULER: string match per sample, the average per length, the effective length.

    pred = generated text, stripped, control characters turned into newlines   (RULER's postprocess)
    all  = 100 · (expected strings found in pred, case-insensitive) / (expected strings)
    part = 100 if any expected string is found, else 0
    task score at a length = mean over its samples of the task's metric (``all`` for every task here;
                             RULER uses ``part`` only for its QA tasks)
    average at a length    = mean of the task scores                    (RULER's "Avg.", over 11 tasks)
    effective length       = the longest evaluated length L such that the average is >= the threshold
                             at L and at every shorter evaluated length (RULER: 85.6, Llama-2-7B's
                             average at 4k)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

RULER_THRESHOLD = 85.6
"""RULER's pass mark: Llama-2-7B-chat's average over its 13 tasks at 4k tokens."""

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(text: str) -> str:
    """RULER's cleaning of a prediction: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(pred: str, expected: list[str]) -> float:
    """Percent of ``expected`` strings that occur in ``pred`` (case-insensitive)."""
    p = pred.lower()
    return 100.0 * sum(e.lower() in p for e in expected) / len(expected)


def string_match_part(pred: str, expected: list[str]) -> float:
    """100 if any of ``expected`` occurs in ``pred`` (case-insensitive), else 0."""
    p = pred.lower()
    return 100.0 if any(e.lower() in p for e in expected) else 0.0


def score_sample(generated: str, expected: list[str]) -> dict[str, float]:
    pred = postprocess(generated)
    return {"all": string_match_all(pred, expected), "part": string_match_part(pred, expected)}


def task_scores(records: Iterable[Mapping], metrics: Mapping[str, str]) -> dict[int, dict[str, float]]:
    """{length: {task: mean score}} from per-sample records (``task``, ``length``, ``score``: {all, part})."""
    grouped: dict[int, dict[str, list[float]]] = {}
    for r in records:
        metric = metrics.get(r["task"], "all")
        grouped.setdefault(int(r["length"]), {}).setdefault(r["task"], []).append(r["score"][metric])
    return {n: {t: sum(v) / len(v) for t, v in by_task.items()} for n, by_task in sorted(grouped.items())}


def averages(scores: Mapping[int, Mapping[str, float]], tasks: list[str]) -> dict[int, float | None]:
    """Mean task score per length; None at a length where some task has no samples yet."""
    out: dict[int, float | None] = {}
    for n, by_task in sorted(scores.items()):
        out[n] = sum(by_task[t] for t in tasks) / len(tasks) if all(t in by_task for t in tasks) else None
    return out


def effective_length(avg: Mapping[int, float | None], threshold: float = RULER_THRESHOLD) -> int | None:
    """The longest length whose average, and every shorter length's, is >= ``threshold`` (None: the
    shortest evaluated length already falls short, or it is not scored yet)."""
    best = None
    for n in sorted(avg):
        a = avg[n]
        if a is None or a < threshold:
            break
        best = n
    return best


def relative_scores(avg: Mapping[int, float | None], base_length: int | None) -> dict[int, float | None]:
    """Each length's average as a percentage of the average at ``base_length`` (the model's own context)."""
    ref = avg.get(base_length) if base_length is not None else None
    if not ref:
        return {}
    return {n: (None if a is None else 100.0 * a / ref) for n, a in sorted(avg.items())}


def depth_grid(records: Iterable[Mapping], bins: int = 10) -> dict[int, dict[float, float]]:
    """{length: {depth bin start (fraction): mean ``all`` score}} over single-answer-needle samples."""
    grid: dict[int, dict[float, list[float]]] = {}
    for r in records:
        depths = r.get("depths") or []
        if len(depths) != 1 or len(r["expected"]) != 1:
            continue
        b = min(bins - 1, int(depths[0] / 100 * bins))
        grid.setdefault(int(r["length"]), {}).setdefault(b / bins, []).append(r["score"]["all"])
    return {n: {d: sum(v) / len(v) for d, v in sorted(row.items())} for n, row in sorted(grid.items())}

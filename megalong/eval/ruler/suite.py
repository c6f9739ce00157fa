"""Running the suite: cells of (task, length), stored as they finish, resumed after a kill.

    OUT/cells/<length>/<task>.jsonl   line 1: the cell's key (task spec, length, seed, prompt format,
                                              model and tokenizer identity); then one line per finished
                                              sample (expected, generated, score, seconds), appended
                                              and flushed as each batch finishes
    OUT/results.json                  summary: scores per task and length, averages (± standard error
                                      over samples), effective length, score relative to the base
                                      length, seconds per length, and a reference run's deltas
    OUT/samples.jsonl                 every sample record (task, length, depth, expected, generated, score)

A rerun with the same options reads the finished samples and continues with the next one; a cell
written under another key (another seed, model, tokenizer, chat setting ...) is refused unless
``overwrite``. ``agree`` lets ranks of a sequence-parallel group take rank 0's view of what is done
(only rank 0 writes).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megalong.eval.ruler.prompts import Generation, PromptFormat, Sample, SampleBuilder
from megalong.eval.ruler.score import (
    RULER_THRESHOLD,
    averages,
    depth_grid,
    effective_length,
    relative_scores,
    score_sample,
    task_scores,
)
from megalong.eval.ruler.tasks import TaskSpec, resolve_tasks
from megalong.eval.ruler.text import essay_source


class SuiteError(ValueError):
    """An output directory or option the suite cannot use; says which and what to do."""


@dataclass
class SuiteConfig:
    """What the suite runs (everything that changes a prompt or a score)."""

    lengths: list[int]
    tasks: list[str] = field(default_factory=lambda: ["all"])
    samples: int = 2
    """Samples per (task, length); RULER's paper uses 500."""
    seed: int = 0
    chat: bool = False
    haystack_file: str | None = None
    depths: list[float] | None = None
    """Fixed needle depths in [0, 1] for single-needle tasks, cycled over the samples (default: RULER's
    random choice from 40 depths)."""
    threshold: float = RULER_THRESHOLD
    base_length: int | None = None
    """The model's own (pre-extension) context: the relative score is each length's average over this one's."""

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise SuiteError(f"--lengths {self.lengths}: give one or more lengths of at least 64 tokens")
        if self.samples < 1:
            raise SuiteError(f"--samples {self.samples} must be >= 1")
        if self.depths and any(not 0 <= d <= 1 for d in self.depths):
            raise SuiteError(f"--depths {self.depths} must lie in [0, 1]")
        self.lengths = sorted(set(self.lengths))
        self.specs: list[TaskSpec] = resolve_tasks(self.tasks)

    def cell_key(self, spec: TaskSpec, length: int, identity: dict) -> dict:
        return {"task": asdict(spec), "length": length, "seed": self.seed, "chat": self.chat,
                "haystack": essay_source(self.haystack_file), "depths": self.depths,
                **{k: v for k, v in identity.items() if k != "model"}}  # the path may move; its hashes may not


class CellStore:
    """The jsonl file of one (task, length) cell."""

    def __init__(self, out: Path, spec: TaskSpec, length: int, key: dict, *, writer: bool, overwrite: bool):
        self.path = out / "cells" / str(length) / f"{spec.name}.jsonl"
        self.key, self.writer = key, writer
        self.records: list[dict] = self._load(overwrite)

    def _load(self, overwrite: bool) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        if not lines:
            return []
        if lines[0].get("key") != self.key:
            if overwrite:
                return []
            diff = sorted(k for k in set(self.key) | set(lines[0].get("key", {}))
                          if self.key.get(k) != lines[0].get("key", {}).get(k))
            raise SuiteError(f"{self.path} was written by another configuration (differs in {', '.join(diff)}); "
                             "use another --out, or --overwrite to discard it")
        return [r for r in lines[1:] if "index" in r]

    def done(self) -> set[int]:
        return {r["index"] for r in self.records}

    def append(self, records: list[dict]) -> None:
        self.records += records
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.is_file() or len(self.records) == len(records)
        with open(self.path, "w" if fresh else "a") as f:
            if fresh:
                f.write(json.dumps({"key": self.key}) + "\n")
                records = self.records
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())


Generator = Callable[[list[Sample]], list[Generation]]


def run_suite(generate: Generator, tokenizer, cfg: SuiteConfig, out: str | Path, *, identity: dict,
              batch: int = 1, overwrite: bool = False, writer: bool = True, progress: bool = True,
              agree: Callable[[object], object] = lambda x: x, reference: dict | None = None) -> dict:
    """Run every missing sample of every cell, then write and return the summary.

    Args:
        generate: a model generator or a rule-based reader (``samples -> generations``).
        tokenizer: the evaluated model's tokenizer (prompts are built with it).
        cfg: tasks, lengths, samples, seed, prompt format.
        out: the output directory (cells, results.json, samples.jsonl).
        identity: what identifies model and tokenizer (part of every cell's key).
        batch: samples handed to ``generate`` at a time (each batch is stored when it finishes).
        overwrite: discard cells written under another key instead of refusing.
        writer: this process writes files (rank 0).
        progress: report samples done (a bar on a terminal, else a line at least every 20 s).
        agree: makes every rank take rank 0's view of what is done (identity for one process).
        reference: another run's summary (e.g. the base model): deltas at common lengths.
    """
    from megalong.utils.progress import Progress

    out = Path(out)
    fmt = PromptFormat(tokenizer, cfg.chat)
    cells = [(spec, n) for n in cfg.lengths for spec in cfg.specs]
    stores = {(s.name, n): CellStore(out, s, n, cfg.cell_key(s, n, identity), writer=writer, overwrite=overwrite)
              for s, n in cells}
    todo = agree({k: sorted(set(range(cfg.samples)) - st.done()) for k, st in stores.items()})
    bar = Progress(sum(len(v) for v in todo.values()), "ruler", enabled=progress, unit="sample")
    for spec, n in cells:
        missing = todo[(spec.name, n)]
        if not missing:
            continue
        builder = SampleBuilder(spec, n, fmt, seed=cfg.seed, haystack_file=cfg.haystack_file, depths=cfg.depths)
        for i in range(0, len(missing), batch):
            samples = [builder.build(j) for j in missing[i:i + batch]]
            start = time.perf_counter()
            gens = generate(samples)
            seconds = (time.perf_counter() - start) / len(samples)
            records = [{**s.record(), "generated": g.text, "generated_ids": g.ids,
                        "score": score_sample(g.text, s.expected), "seconds": round(seconds, 3)}
                       for s, g in zip(samples, gens)]
            stores[(spec.name, n)].append(records)
            cell = stores[(spec.name, n)].records
            bar.update(len(samples), length=n, task=spec.name,
                       score=sum(r["score"][spec.metric] for r in cell) / len(cell))
    bar.close()
    records = [r for s, n in cells for r in sorted(stores[(s.name, n)].records, key=lambda r: r["index"])
               if r["index"] < cfg.samples]
    summary = summarize(records, cfg, identity, reference)
    if writer:
        write_outputs(out, summary, records)
    return summary


def _standard_error(records: list[dict], specs: list[TaskSpec], length: int) -> float | None:
    """Standard error of the per-length average (mean of task means) from the spread over samples."""
    var = 0.0
    for spec in specs:
        vals = [r["score"][spec.metric] for r in records if r["task"] == spec.name and r["length"] == length]
        if len(vals) < 2:
            return None
        mean = sum(vals) / len(vals)
        var += sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals)
    return math.sqrt(var) / len(specs)


def summarize(records: list[dict], cfg: SuiteConfig, identity: dict, reference: dict | None = None) -> dict:
    """The results summary (pure: from sample records)."""
    names = [s.name for s in cfg.specs]
    scores = task_scores(records, {s.name: s.metric for s in cfg.specs})
    avg = averages(scores, names)
    counts = {n: sum(1 for r in records if r["length"] == n) for n in cfg.lengths}
    summary = {
        **identity, "chat": cfg.chat, "seed": cfg.seed, "samples": cfg.samples, "tasks": names,
        "lengths": cfg.lengths, "haystack": essay_source(cfg.haystack_file), "depths": cfg.depths,
        "threshold": cfg.threshold, "base_length": cfg.base_length,
        "complete": all(counts[n] == cfg.samples * len(names) for n in cfg.lengths),
        "scores": {str(n): {t: round(v, 2) for t, v in by.items()} for n, by in scores.items()},
        "average": {str(n): (None if a is None else round(a, 2)) for n, a in avg.items()},
        "average_se": {str(n): (None if (se := _standard_error(records, cfg.specs, n)) is None else round(se, 2))
                       for n in scores},
        "effective_length": effective_length(avg, cfg.threshold),
        "relative_to_base": {str(n): (None if v is None else round(v, 1))
                             for n, v in relative_scores(avg, cfg.base_length).items()},
        "seconds": {str(n): round(sum(r["seconds"] for r in records if r["length"] == n), 1) for n in cfg.lengths},
        "depth_grid": {str(n): {str(d): round(v, 2) for d, v in row.items()}
                       for n, row in depth_grid(records).items()},
    }
    if reference:
        summary["reference"] = {
            "model": reference.get("model"), "average": reference.get("average", {}),
            "delta": {n: round(a - reference["average"][n], 2) for n, a in summary["average"].items()
                      if a is not None and reference.get("average", {}).get(n) is not None},
        }
    return summary


def write_outputs(out: Path, summary: dict, records: list[dict]) -> None:
    from megalong.eval.ruler.report import results_table, write_heatmaps

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k != "generated_ids"}) + "\n")
    (out / "table.md").write_text(results_table(summary) + "\n")
    write_heatmaps(summary, out)

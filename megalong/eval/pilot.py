"""LongLoRA's pilot study and LoRA ablation as a plan of runs, and the tables of its results.

One base model, pretrained at a short context L, is extended to each factor × L with every variant
and every seed; all runs of one seed see the same data in the same order, for the same steps and
learning-rate schedule; only the attention used in training and the trainable parameters differ:

    variant           attention   trainable                      paper (Llama-2-7B, PG19)
    full              full        everything                     Table 1 "Full"
    short             short       everything                     Table 1 "Short" (groups, no shift)
    s2                S²-Attn     everything                     Table 1 "S²-Attn" / Table 2 "Full FT"
    lora              S²-Attn     LoRA (q, k, v, o)              Table 2 "LoRA"
    lora_norm         S²-Attn     LoRA + norms                   Table 2 "+ Norm"
    lora_embed        S²-Attn     LoRA + embeddings              Table 2 "+ Embed"
    lora_embed_norm   S²-Attn     LoRA + embeddings + norms      Table 2 "+ Embed + Norm"

Every model is evaluated with full attention. This module only plans and summarises; running
the plan is ``tools/pilot.py`` (the entry point reads files and starts processes).

The same runner extends a real pretrained model (``base_model``; launch/configs/pilot/real_*.yaml)
with the variants users choose between, beside training-free floors (``floors``: RoPE scaling of the
base without training) and with every model also scored by the task suite and passkey retrieval:

    lora_embed_norm        LongLoRA: S²-Attn + LoRA + embeddings + norms + PI
    full_lora_embed_norm   the same with full attention in training
    yarn_lora_embed_norm   LongLoRA with YaRN instead of PI
    s2_then_full           LongLoRA, the last eighth of the steps with full attention
                           (attention.full_last_steps): the pilot found S²-Attn models not using
                           context beyond a group; this lets them meet full attention before the end
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megalong.config.schema import ConfigError


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    attention: str
    """attention.train: ``full``, ``short`` or ``s2``."""
    trainable: tuple[str, ...] | None
    """lora.trainable with LoRA on; None: full fine-tuning (lora.enabled=false)."""
    rope: str = "linear"
    """rope.type of the extension."""
    full_last: float = 0.0
    """Fraction of the steps trained with full attention at the end (attention.full_last_steps)."""


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("full", "Full attention, full FT", "full", None),
    Variant("short", "Short attention, full FT", "short", None),
    Variant("s2", "S²-Attn, full FT", "s2", None),
    Variant("lora", "S²-Attn, LoRA", "s2", ()),
    Variant("lora_norm", "S²-Attn, LoRA + norm", "s2", ("norm",)),
    Variant("lora_embed", "S²-Attn, LoRA + embed", "s2", ("embed",)),
    Variant("lora_embed_norm", "S²-Attn, LoRA + embed + norm", "s2", ("embed", "norm")),
    Variant("full_lora_embed_norm", "Full attention, LoRA + embed + norm", "full", ("embed", "norm")),
    Variant("yarn_lora_embed_norm", "S²-Attn + YaRN, LoRA + embed + norm", "s2", ("embed", "norm"), rope="yarn"),
    Variant("s2_then_full", "S²-Attn, last 1/8 full, LoRA + embed + norm", "s2", ("embed", "norm"), full_last=0.125),
)}
PILOT_VARIANTS = ("full", "short", "s2", "lora", "lora_norm", "lora_embed", "lora_embed_norm")
"""The paper's Table 1 and Table 2 variants (a study's default)."""
FLOOR_TYPES = ("linear", "yarn", "dynamic")
"""RoPE scalings of the untrained base (training-free floors): PI, YaRN, dynamic NTK."""
ATTENTION_TABLE = ("full", "short", "s2")
PARAMETER_TABLE = ("lora", "lora_norm", "lora_embed", "lora_embed_norm", "s2")
PARAMETER_LABELS = {"lora": "LoRA", "lora_norm": "LoRA + norm", "lora_embed": "LoRA + embed",
                    "lora_embed_norm": "LoRA + embed + norm", "s2": "full fine-tune"}
FLOOR = "pi_untrained"

# The paper's numbers (LongLoRA, Table 1 and Table 2: Llama-2-7B from 4k, PG19 validation).
PAPER_ATTENTION = {  # extension factor -> variant -> perplexity (8k / 16k / 32k from 4k)
    2: {"full": 8.02, "short": 8.29, "s2": 8.04},
    4: {"full": 8.05, "short": 8.83, "s2": 8.03},
    8: {"full": 8.04, "short": 9.47, "s2": 8.08},
}
PAPER_PARAMETERS = {"lora": 11.44, "lora_norm": 10.49, "lora_embed": 8.29, "lora_embed_norm": 8.12, "s2": 8.08}
"""At 32k (factor 8)."""


@dataclass
class StudySpec:
    """One study: the base, the factors, variants, seeds, and how to evaluate (a YAML under
    ``launch/configs/pilot/``)."""

    name: str
    out_dir: str
    base_length: int
    """The base model's trained context L; factor f trains at f × L."""
    extend_recipe: str
    """A megalong recipe (YAML) every extension run starts from."""
    train_data: str
    valid_data: str
    factors: list[int] = field(default_factory=lambda: [4, 8])
    extend_steps: int = 100
    variants: list[str] = field(default_factory=lambda: list(PILOT_VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    base_recipe: str | None = None
    """Pretrain the base from this recipe (CPU scale), or ..."""
    base_model: str | None = None
    """... start from this HF model directory (GPU scale: a 7B base), ..."""
    base_gguf: str | None = None
    """... or import this GGUF file into ``OUT/base_hf`` first (tools/import_gguf.py; sets base_model)."""
    base_steps: int = 0
    corpus: dict | None = None
    """Build the default corpus with these options (tools/build_default_corpus.py), or None."""
    eval_max_windows: int | None = None
    """Windows per (model, length, protocol); None: all."""
    eval_windows_per_doc: int | None = None
    """At most this many windows from each document (None: all), so few windows still span several documents."""
    eval_stride: int | None = None
    """longlora protocol stride; None: half the length."""
    eval_shorter: bool = True
    """Evaluate every model also at the shorter factors' lengths (8× models at 4× too)."""
    require_full_context: bool = True
    """Score only documents longer than the evaluated length (both protocols)."""
    launcher: list[str] = field(default_factory=lambda: ["python"])
    """How a training run starts: ``[python]`` (one process) or e.g. ``[deepspeed, --num_gpus, "8"]``."""
    extra_overrides: list[str] = field(default_factory=list)
    """Further ``--section.key=value`` for every extension run."""
    floors: list[str] = field(default_factory=lambda: ["linear"])
    """Untrained floors: the base with each of these RoPE scalings to every extended length."""
    eval_lengths: list[int] | None = None
    """Perplexity lengths for every model (None: each run's own length and the shorter factors')."""
    eval_base: bool = False
    """Score the base itself (no RoPE scaling) at the evaluation lengths, not only at its own length."""
    suite: dict | None = None
    """Task suite on every final model and floor: ``{lengths, samples, tasks, chat, seed}``
    (megalong.eval.ruler; None: none)."""
    passkey: dict | None = None
    """Passkey retrieval on every final model and floor: ``{lengths, trials}`` (None: none)."""
    curve: dict | None = None
    """Intermediate checkpoints: ``{every, ppl_lengths, protocols, suite_lengths, suite_tasks, suite_samples}``
    — every ``every`` steps each run is saved and scored (the curve of ppl and suite vs steps; ``protocols``
    defaults to both)."""
    eval_threads: int | None = None
    """torch threads for evaluation in the study process (None: OMP_NUM_THREADS, else 1)."""

    def __post_init__(self) -> None:
        if self.base_gguf is not None:
            if self.base_model not in (None, f"{self.out_dir}/base_hf"):
                raise ConfigError("give base_gguf or base_model, not both (base_gguf is imported to OUT/base_hf)")
            self.base_model = f"{self.out_dir}/base_hf"
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown pilot variants {unknown}; choose from {list(VARIANTS)}")
        if (self.base_recipe is None) == (self.base_model is None):
            raise ConfigError("a pilot study needs exactly one of base_recipe (pretrain a base) or base_model "
                              "(an HF directory)")
        if self.base_recipe is not None and self.base_steps < 1:
            raise ConfigError("base_steps must be >= 1 when the study pretrains its base (base_recipe)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds}: give at least one seed, each once (two or more show the spread)")
        if not self.factors or any(f < 1 for f in self.factors):
            raise ConfigError(f"factors={self.factors} must be integers >= 1")
        if self.extend_steps < 1:
            raise ConfigError("extend_steps must be >= 1")
        bad = [f for f in self.floors if f not in FLOOR_TYPES]
        if bad:
            raise ConfigError(f"floors {bad}: choose from {list(FLOOR_TYPES)}")
        every = (self.curve or {}).get("every")
        if self.curve is not None and (not isinstance(every, int) or not 0 < every < self.extend_steps):
            raise ConfigError(f"curve.every={every} must be an integer step count in (0, extend_steps)")
        bad = [p for p in (self.curve or {}).get("protocols", []) if p not in ("longlora", "standard")]
        if bad:
            raise ConfigError(f"curve.protocols {bad}: choose from ['longlora', 'standard']")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySpec:
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(data) - known)
        if extra:
            raise ConfigError(f"unknown pilot study keys {extra}; known: {sorted(known)}")
        return cls(**data)

    def lengths(self) -> list[int]:
        return sorted(f * self.base_length for f in self.factors)


@dataclass(frozen=True)
class PlannedRun:
    variant: str
    factor: int
    seed: int
    seq_len: int
    name: str
    overrides: tuple[str, ...]
    eval_lengths: tuple[int, ...]


def variant_overrides(variant: Variant, steps: int = 0) -> list[str]:
    """The recipe overrides that make a run this variant: attention and trainable parameters."""
    out = [f"--attention.train={variant.attention}"]
    if variant.rope != "linear":
        out.append(f"--rope.type={variant.rope}")
    if variant.full_last:
        out.append(f"--attention.full_last_steps={max(1, round(variant.full_last * steps))}")
    if variant.trainable is None:
        out.append("--lora.enabled=false")
    else:
        out += ["--lora.enabled=true", f"--lora.trainable=[{','.join(variant.trainable)}]"]
    return out


def curve_overrides(spec: StudySpec) -> list[str]:
    """Keep a checkpoint every ``curve.every`` steps (all of them) for the curve's evaluations."""
    if not spec.curve:
        return []
    return [f"--checkpoint.save_interval={spec.curve['every']}", "--checkpoint.keep_last=0"]


def curve_steps(spec: StudySpec) -> list[int]:
    """The intermediate steps the curve scores (the final model is scored in full anyway)."""
    if not spec.curve:
        return []
    return list(range(spec.curve["every"], spec.extend_steps, spec.curve["every"]))


def eval_lengths(spec: StudySpec, factor: int) -> tuple[int, ...]:
    """Lengths a model extended by ``factor`` is evaluated at: its own, and (eval_shorter) the shorter
    factors' (never below 2×: the base's own length is not an extension)."""
    own = factor * spec.base_length
    if spec.eval_lengths:
        return tuple(sorted(spec.eval_lengths))
    if not spec.eval_shorter:
        return (own,)
    return tuple(sorted({own} | {n for n in spec.lengths() if n < own}))


def plan_runs(spec: StudySpec, base_hf: str, run_root: str) -> list[PlannedRun]:
    """Every extension run of the study, seed-major (all variants of seed 1 first, then seed 2, ...).

    The seed sets ``train.seed`` (LoRA initialisation) and ``data.seed`` (the sample order); all
    variants of one seed share both, the step count and the learning-rate schedule of the recipe."""
    runs = []
    for seed in spec.seeds:
        for factor in spec.factors:
            n = factor * spec.base_length
            for name in spec.variants:
                run = f"{name}_x{factor}_s{seed}"
                overrides = (
                    f"--model.name_or_path={base_hf}",
                    f"--data.prefixes=[{spec.train_data}]",
                    f"--data.valid_prefixes=[{spec.valid_data}]",
                    f"--data.max_seq_len={n}",
                    f"--rope.target_length={n}",
                    f"--train.max_steps={spec.extend_steps}",
                    f"--train.seed={seed}",
                    f"--data.seed={seed}",
                    f"--train.run_dir={run_root}/{run}",
                    *variant_overrides(VARIANTS[name], spec.extend_steps),
                    *curve_overrides(spec),
                    *spec.extra_overrides,
                )
                runs.append(PlannedRun(name, factor, seed, n, run, overrides, eval_lengths(spec, factor)))
    return runs


# ------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Cell:
    """One (variant, length, protocol) over seeds."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def spread(self) -> float:
        """max - min over seeds (0 with one seed)."""
        return max(self.values) - min(self.values)

    def text(self, digits: int = 2) -> str:
        if len(self.values) == 1:
            return f"{self.values[0]:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.spread / 2:.{digits}f}"


def is_tie(a: Cell, b: Cell) -> bool:
    """Differences smaller than the larger seed spread (max - min) of the two are ties."""
    return abs(a.mean - b.mean) < max(a.spread, b.spread)


def cells(results: dict, protocol: str) -> dict[tuple[str, int, int], Cell]:
    """(variant, factor, eval length) -> Cell for the finished runs in a results dict."""
    grouped: dict[tuple[str, int, int], list[float]] = {}
    for run in results.get("runs", []):
        for length, by_protocol in run.get("ppl", {}).items():
            value = by_protocol.get(protocol)
            if value is not None and math.isfinite(value):
                grouped.setdefault((run["variant"], run["factor"], int(length)), []).append(value)
    for key, by_len in results.get("floor", {}).items():  # key "x4": the base + PI x4, untrained
        if not key[1:].isdigit():  # other floors (yarn_x2, ...) are in the real-model tables only
            continue
        factor = int(key[1:])
        for length, by_protocol in by_len.items():
            if by_protocol.get(protocol) is not None:
                grouped[(FLOOR, factor, int(length))] = [by_protocol[protocol]]
    return {k: Cell(tuple(v)) for k, v in grouped.items()}


def per_seed(results: dict, protocol: str, a: tuple, b: tuple) -> list[float]:
    """a - b seed by seed (both runs of a seed saw the same data in the same order); the floor has no seed."""
    def by_seed(key: tuple) -> dict[int | None, float]:
        variant, factor, length = key
        if variant == FLOOR:
            value = results.get("floor", {}).get(f"x{factor}", {}).get(str(length), {}).get(protocol)
            return {None: value} if value is not None else {}
        return {r["seed"]: r["ppl"][str(length)][protocol] for r in results.get("runs", [])
                if r["variant"] == variant and r["factor"] == factor and str(length) in r.get("ppl", {})}

    va, vb = by_seed(a), by_seed(b)
    if None in va or None in vb:
        fixed = va.get(None, vb.get(None))
        other = vb if None in va else va
        sign = 1 if None in va else -1
        return [sign * (fixed - v) for _, v in sorted(other.items())]
    return [va[s] - vb[s] for s in sorted(set(va) & set(vb))]


def compare(c: dict, a: tuple, b: tuple, paired: list[float] | None = None) -> str:
    """'tie' or the signed difference a - b of the means, with the per-seed differences when given."""
    if a not in c or b not in c:
        return "n/a"
    seeds = f"; per seed {', '.join(f'{d:+.2f}' for d in paired)}" if paired and len(paired) > 1 else ""
    if is_tie(c[a], c[b]):
        return f"tie ({c[a].mean - c[b].mean:+.2f}{seeds})"
    return f"{c[a].mean - c[b].mean:+.2f}" + (f" ({seeds[2:]})" if seeds else "")


def _fmt(c: dict, key: tuple, best: Cell | None) -> str:
    if key not in c:
        return "—"
    cell = c[key]
    text = cell.text()
    if best is not None and key[0] != FLOOR and (cell is best or is_tie(cell, best)):
        text = f"**{text}**"
    return text


def attention_table(results: dict, factors: list[int], base_length: int, protocol: str) -> str:
    """Markdown: attention variants (full FT) × extended length, best and ties with it in bold."""
    c = cells(results, protocol)
    head = "| variant | " + " | ".join(f"{f}× = {f * base_length} (paper {PAPER_ATTENTION.get(f) and f * 4}k)"
                                        for f in factors) + " |"
    lines = [head, "|---|" + "---|" * len(factors)]
    best = {f: min((c[(v, f, f * base_length)] for v in ATTENTION_TABLE if (v, f, f * base_length) in c),
                   key=lambda x: x.mean, default=None) for f in factors}
    for v in ATTENTION_TABLE:
        row = []
        for f in factors:
            paper = PAPER_ATTENTION.get(f, {}).get(v)
            row.append(_fmt(c, (v, f, f * base_length), best[f]) + (f" ({paper})" if paper else ""))
        lines.append(f"| {VARIANTS[v].label} | " + " | ".join(row) + " |")
    lines.append("| base + PI, untrained (floor) | "
                 + " | ".join(_fmt(c, (FLOOR, f, f * base_length), None) for f in factors) + " |")
    return "\n".join(lines)


def parameter_table(results: dict, factors: list[int], base_length: int, protocol: str) -> str:
    """Markdown: trainable-parameter variants (S²-Attn) × extended length; paper at 32k alongside."""
    c = cells(results, protocol)
    lines = ["| trainable (S²-Attn) | " + " | ".join(f"{f}× = {f * base_length}" for f in factors)
             + " | paper, 32k |", "|---|" + "---|" * (len(factors) + 1)]
    best = {f: min((c[(v, f, f * base_length)] for v in PARAMETER_TABLE if (v, f, f * base_length) in c),
                   key=lambda x: x.mean, default=None) for f in factors}
    for v in PARAMETER_TABLE:
        lines.append(f"| {PARAMETER_LABELS[v]} | "
                     + " | ".join(_fmt(c, (v, f, f * base_length), best[f]) for f in factors)
                     + f" | {PAPER_PARAMETERS[v]} |")
    return "\n".join(lines)


def shorter_length_table(results: dict, factors: list[int], base_length: int, protocol: str) -> str:
    """Markdown: the models extended to the largest factor, evaluated at every extended length."""
    c = cells(results, protocol)
    top = max(factors)
    lengths = sorted({k[2] for k in c if k[1] == top})
    lines = [f"| variant (trained at {top * base_length}) | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for v in [*VARIANTS, FLOOR]:
        if not any((v, top, n) in c for n in lengths):
            continue
        label = VARIANTS[v].label if v in VARIANTS else f"base + PI ×{top}, untrained"
        lines.append(f"| {label} | " + " | ".join(_fmt(c, (v, top, n), None) for n in lengths) + " |")
    return "\n".join(lines)


def throughput_table(results: dict, factors: list[int], base_length: int) -> str:
    """Markdown: median training tokens/s per attention variant (full FT) and length, over seeds."""
    lines = ["| attention (full FT) | " + " | ".join(f"{f * base_length}" for f in factors) + " |",
             "|---|" + "---|" * len(factors)]
    for v in ATTENTION_TABLE:
        row = []
        for f in factors:
            vals = [r["tokens_per_s"] for r in results.get("runs", [])
                    if r["variant"] == v and r["factor"] == f and r.get("tokens_per_s")]
            row.append(Cell(tuple(vals)).text(0) if vals else "—")
        lines.append(f"| {VARIANTS[v].label.split(',')[0]} | " + " | ".join(row) + " |")
    return "\n".join(lines)

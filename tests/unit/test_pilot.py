"""The pilot study's plan (variants x factors x seeds -> configs), the tie rule and the renderer.

Nothing here trains or reads the committed results: the plan is checked through the real config
loader, the renderer on a small made-up results dict.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from megalong.config.loader import load_config
from megalong.config.schema import ConfigError
from megalong.eval.pilot import PILOT_VARIANTS, VARIANTS, Cell, StudySpec, cells, is_tie, plan_runs

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import pilot_render  # noqa: E402


def _spec(name: str = "cpu.yaml", **over) -> StudySpec:
    data = yaml.safe_load((REPO / "launch/configs/pilot" / name).read_text())
    return StudySpec.from_dict({**data, **over})


def _configs(spec: StudySpec):
    runs = plan_runs(spec, "runs/pilot/cpu/base_hf", "runs/pilot/cpu/runs")
    return runs, [load_config(REPO / spec.extend_recipe, list(r.overrides)) for r in runs]


def test_cpu_plan_is_every_variant_factor_and_seed():
    spec = _spec()
    runs, cfgs = _configs(spec)
    assert len(runs) == 7 * 2 * 2 and len({r.name for r in runs}) == len(runs)
    assert {(r.variant, r.factor, r.seed) for r in runs} == {(v, f, s) for v in PILOT_VARIANTS for f in (4, 8)
                                                              for s in (1, 2)}
    for run, cfg in zip(runs, cfgs):
        variant = VARIANTS[run.variant]
        assert cfg.attention.train == variant.attention and cfg.attention.eval == "full"
        if variant.trainable is None:
            assert not cfg.lora.enabled
        else:
            assert cfg.lora.enabled and sorted(cfg.lora.trainable) == sorted(variant.trainable)
        assert cfg.data.max_seq_len == run.seq_len == 256 * run.factor
        assert cfg.rope.type == "linear" and cfg.rope_target_length == run.seq_len
        assert cfg.group_size == run.seq_len // 4
        assert (cfg.train.seed, cfg.data.seed) == (run.seed, run.seed)
        assert cfg.train.run_dir.endswith(run.name)
        assert run.eval_lengths == ((1024,) if run.factor == 4 else (1024, 2048))


def test_variants_of_one_seed_share_data_order_steps_and_schedule():
    runs, cfgs = _configs(_spec())

    def shared(cfg):
        t = cfg.train
        return (tuple(cfg.data.prefixes), cfg.data.seed, cfg.data.max_seq_len, t.max_steps, t.lr, t.min_lr, t.warmup_steps,
                t.schedule, t.micro_batch_size, t.grad_accum, t.seed, cfg.model.name_or_path, cfg.rope.type)

    by_group: dict = {}
    for run, cfg in zip(runs, cfgs):
        by_group.setdefault((run.seed, run.factor), set()).add(shared(cfg))
    assert all(len(v) == 1 for v in by_group.values())
    seeds = {(run.seed, cfg.data.seed, cfg.train.seed) for run, cfg in zip(runs, cfgs)}
    assert seeds == {(1, 1, 1), (2, 2, 2)}  # the seed changes the data order and LoRA init


def test_gpu_plan_is_the_paper_scale():
    spec = _spec("gpu_7b.yaml")
    runs, cfgs = _configs(spec)
    assert sorted({r.seq_len for r in runs}) == [8192, 16384, 32768]
    assert spec.launcher[0] == "deepspeed" and all(c.train.dtype == "bf16" for c in cfgs)
    assert {c.attention.train for c in cfgs} == {"full", "short", "s2"}


def test_gpu_plan_passes_the_dry_run():
    """The 7B plan's configs pass the start-up checks for one 8-GPU node (meta device, no weights)."""
    from megalong.engine.dryrun import dry_run

    runs, cfgs = _configs(_spec("gpu_7b.yaml"))
    for run, cfg in zip(runs, cfgs):
        if run.seed == 1 and run.factor == 8 and run.variant in ("short", "lora_embed_norm"):
            report = dry_run(cfg, nodes=1, gpus_per_node=8, gpu_memory_gb=80, host_memory_gb=1000)
            assert report.errors == [], (run.name, report.errors)


def test_spec_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="unknown pilot variants"):
        _spec(variants=["full", "nope"])
    with pytest.raises(ConfigError, match="exactly one of base_recipe"):
        _spec(base_model="/models/x")
    with pytest.raises(ConfigError, match="unknown pilot study keys"):
        _spec(stepz=3)


def test_tie_rule():
    a, b = Cell((10.0, 10.4)), Cell((10.3, 10.35))
    assert is_tie(a, b) and is_tie(b, a)  # 0.175 apart, a's range is 0.4
    assert not is_tie(Cell((10.0, 10.1)), Cell((10.5, 10.55)))
    assert not is_tie(Cell((10.0,)), Cell((10.01,)))  # one seed: no spread, no tie
    assert Cell((10.0, 10.4)).text() == "10.20 ± 0.20"


def _fake_results(complete: bool = True) -> dict:
    spec = _spec().__dict__
    runs = []
    ppl = {"full": 20.0, "short": 24.0, "s2": 20.1, "lora": 30.0, "lora_norm": 29.0, "lora_embed": 22.0,
           "lora_embed_norm": 21.0}
    for v, base in ppl.items():
        for seed, jitter in ((1, -0.2), (2, 0.2)):
            for f in (4, 8):
                scores = {str(n): {"longlora": base + jitter + f / 10, "standard": base + jitter + f / 10 + 1}
                          for n in ((1024,) if f == 4 else (1024, 2048))}
                runs.append({"variant": v, "factor": f, "seed": seed, "ppl": scores, "tokens_per_s": 1000.0 + seed,
                             "loss_curve": [[1, 5.0], [2, 4.0]]})
    floor = {"x4": {"1024": {"longlora": 40.0, "standard": 41.0}},
             "x8": {"1024": {"longlora": 45.0, "standard": 46.0}, "2048": {"longlora": 50.0, "standard": 51.0}}}
    return {"spec": spec, "runs": runs if complete else runs[:3], "floor": floor, "complete": complete,
            "command": "python tools/pilot.py run", "wall_s": 120.0, "machine": {"threads": 1},
            "base": {"valid_loss": [[100, 5.0], [200, 4.5]], "train_loss": [[1, 8.0], [200, 4.4]],
                     "ppl": {"256": {"longlora": 30.0, "standard": 31.0}}}}


def test_renderer_tables_ties_and_markers(tmp_path):
    results = _fake_results()
    c = cells(results, "longlora")
    assert c[("s2", 8, 2048)].values == pytest.approx((20.7, 21.1)) and c[("pi_untrained", 8, 2048)].values == (50.0,)
    text = pilot_render.block(results, [])
    assert "Status: complete" in text
    assert "| Full attention, full FT | **20.40 ± 0.20** (8.05) | **20.80 ± 0.20** (8.04) |" in text
    assert "| S²-Attn, full FT | **20.50 ± 0.20** (8.03) | **20.90 ± 0.20** (8.08) |" in text  # tied: bold too
    assert "| Short attention, full FT | 24.40 ± 0.20 (8.83) | 24.80 ± 0.20 (9.47) |" in text
    assert "S²-Attn − Full tie (+0.10; per seed +0.10, +0.10)" in text
    assert "Short − Full +4.00 (per seed +4.00, +4.00)" in text and "floor − S²-Attn +29.10 (per seed +29.30, +28.90)" in text
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\n## Other\n\ntext\n")
    pilot_render.write_block(doc, text)
    pilot_render.write_block(doc, pilot_render.block(_fake_results(complete=False), []))  # replaced, not added
    out = doc.read_text()
    assert out.count("## LongLoRA pilot study") == 1 and out.count("<!-- pilot:end -->") == 1
    assert "PARTIAL: 3 of 28 runs" in out and out.startswith("# Benchmarks\n\n## Other\n\ntext\n")
    prose = out.replace("<!-- pilot:end -->", "<!-- pilot:end -->\n\nhand-written write-up\n")
    doc.write_text(prose)
    pilot_render.write_block(doc, text)
    assert "hand-written write-up" in doc.read_text() and "Status: complete" in doc.read_text()


def test_renderer_plots(tmp_path):
    pytest.importorskip("matplotlib")
    written = pilot_render.plot(_fake_results(), tmp_path)
    assert sorted(Path(p).name for p in written) == ["base.png", "loss.png", "ppl.png"]
    assert all(Path(p).stat().st_size > 1000 for p in written)


def _fake_real_results() -> dict:
    spec = {"base_length": 8192, "factors": [2], "extend_steps": 3, "seeds": [1], "eval_max_windows": 1,
            "variants": ["lora_embed_norm", "full_lora_embed_norm"], "eval_lengths": [2048, 16384],
            "suite": {"lengths": [16384], "samples": 1, "tasks": ["niah_single_1", "niah_single_2"]},
            "passkey": None, "curve": {"every": 2, "ppl_lengths": [16384], "protocols": ["longlora"]}}

    def model(p2, p16, s1, s2):
        return {"ppl": {"2048": {"longlora": p2, "standard": p2 + 0.5}, "16384": {"longlora": p16, "standard": p16 + 1}},
                "suite": {"scores": {"16384": {"niah_single_1": s1, "niah_single_2": s2}},
                          "average": {"16384": (s1 + s2) / 2}, "effective_length": None}}

    run = {"name": "lora_embed_norm_x2_s1", "variant": "lora_embed_norm", "factor": 2, "seed": 1, "seq_len": 16384,
           **model(7.1, 4.2, 100.0, 0.0), "final_loss": 1.234, "tokens_per_s": 61.0, "step_time_s": 268.0,
           "peak_mem_gb_per_rank": 2.5, "planned_mem_gb_per_rank": 2.73, "train_wall_s": 900.0, "eval_wall_s": 720.0,
           "curve": [{"step": 2, "ppl": {"16384": {"longlora": 4.4}}}]}
    return {"spec": spec, "study_file": "launch/configs/pilot/real_cpu.yaml", "command": "python tools/pilot.py run "
            "--scale real", "wall_s": 600.0, "machine": {"platform": "Linux", "cpus_visible": 2, "torch": "2.13"},
            "complete": False, "base": {"model": "runs/real/cpu/base_hf", **model(6.8, 13.4, 0.0, 0.0)},
            "floors": {"x2": {"rope": "linear", **model(7.0, 4.6, 100.0, 0.0)},
                       "yarn_x2": {"rope": "yarn", **model(6.9, 4.5, 0.0, 100.0)}}, "runs": [run]}


def test_real_study_renderer(tmp_path):
    """The real-model block: one row per model (base, floors, runs) with both protocols and each task, the
    curve from the untrained floor to the final step, training speed and memory beside the plan."""
    results = _fake_real_results()
    text = pilot_render.real_block(results, [], "real", "docs/benchmarks/real/results.json")
    assert "**PARTIAL: 1 of 2 trained runs finished**" in text
    assert "| base, no RoPE scaling | 6.80 / 7.30 | 13.40 / 14.40 | 0 | 0 | 0.0 |" in text
    assert "| PI ×2, untrained | 7.00 / 7.50 | 4.60 / 5.60 | 100 | 0 | 50.0 |" in text
    assert "| YaRN ×2, untrained | 6.90 / 7.40 | 4.50 / 5.50 | 0 | 100 | 50.0 |" in text
    label = "S²-Attn, LoRA + embed + norm, trained 3 steps at 16384"
    assert f"| {label} | 7.10 / 7.60 | 4.20 / 5.20 | 100 | 0 | 50.0 |" in text
    curve = [line for line in text.splitlines() if line.startswith(f"| {label} | ") and line.count("|") == 4]
    assert curve == [f"| {label} | 0 | 4.60 |", f"| {label} | 2 | 4.40 |", f"| {label} | 3 | 4.20 |"]
    assert "| lora_embed_norm_x2_s1 | 1.234 | 61 | 268 | 2.50 | 2.73 | 15.0 | 12.0 |" in text
    assert "windows at 16384" not in text  # no per-window losses stored: no spread table
    results["base"]["ppl"]["16384"]["longlora_window_ppl"] = [5.14, 21.31, 21.81]
    text = pilot_render.real_block(results, [], "real", "docs/benchmarks/real/results.json")
    assert "| base, no RoPE scaling | — | 5.14, 21.31, 21.81 |" in text
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\n## LongLoRA pilot study\n\n<!-- pilot:begin x -->\n<!-- pilot:end -->\n")
    for _ in range(2):  # replaced, not added; the pilot's block stays
        pilot_render.write_block(doc, text, "real", pilot_render.REAL_SECTIONS["real"])
    out = doc.read_text()
    assert out.count(pilot_render.REAL_SECTIONS["real"]) == 1 and out.count("<!-- real:end -->") == 1
    assert "<!-- pilot:begin x -->\n<!-- pilot:end -->" in out
    if importlib.util.find_spec("matplotlib"):
        written = pilot_render.real_plots(results, tmp_path / "png")
        assert sorted(Path(p).name for p in written) == ["curve.png", "ppl.png"]


def test_base_recipe_loads():
    cfg = load_config(REPO / "launch/configs/pilot/base_cpu.yaml")
    assert cfg.data.max_seq_len == 256 and cfg.attention.train == "full" and not cfg.lora.enabled
    assert cfg.train.eval_interval > 0  # the validation curve that shows the base has flattened


SMOLLM2_CONFIG = {  # SmolLM2-135M-Instruct's architecture (its GGUF's config), for plans without the weights
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}


@pytest.mark.parametrize("study", ["real_cpu.yaml", "real_cpu_full.yaml", "real_gpu.yaml"])
def test_real_model_plans(study, tmp_path):
    """The real-model studies: variants become their overrides (S²-Attn / full, YaRN, the full-attention tail),
    the curve keeps its checkpoints, floors and suite are set, and one run's config passes the dry run."""
    from megalong.engine.dryrun import dry_run

    base = tmp_path / "smollm2"
    base.mkdir()
    (base / "config.json").write_text(__import__("json").dumps(SMOLLM2_CONFIG))
    spec = _spec(study)
    assert spec.base_model == f"{spec.out_dir}/base_hf" and spec.base_gguf.endswith(".gguf")
    spec = _spec(study, base_model=str(base), base_gguf=None)
    runs = plan_runs(spec, str(base), str(tmp_path / "runs"))
    cfgs = {r.variant: load_config(REPO / spec.extend_recipe, list(r.overrides)) for r in runs}
    assert set(cfgs) == set(spec.variants) and spec.floors[:2] == ["linear", "yarn"] and spec.suite["lengths"]
    n = spec.factors[0] * 8192
    for variant, cfg in cfgs.items():
        assert cfg.data.max_seq_len == n and cfg.lora.enabled and sorted(cfg.lora.trainable) == ["embed", "norm"]
        assert cfg.checkpoint.save_interval == spec.curve["every"] and cfg.checkpoint.keep_last == 0
        assert cfg.attention.train == ("full" if variant.startswith("full") else "s2")
        assert cfg.rope.type == ("yarn" if variant.startswith("yarn") else "linear")
        assert cfg.attention.full_last_steps == (spec.extend_steps // 8 if variant == "s2_then_full" else 0)
        assert runs[0].eval_lengths == tuple(spec.eval_lengths)
    cpu = study.startswith("real_cpu")
    report = dry_run(cfgs["lora_embed_norm"], nodes=1, gpus_per_node=2 if cpu else 1, gpu_memory_gb=139,
                     host_memory_gb=24 if cpu else 1000, accelerator="cpu" if cpu else "cuda")
    assert report.errors == [] and report.fits, report.errors
    with pytest.raises(ConfigError, match="curve.every"):
        _spec(study, curve={"every": spec.extend_steps})
    with pytest.raises(ConfigError, match="floors"):
        _spec(study, floors=["ntk"])
    with pytest.raises(ConfigError, match="curve.protocols"):
        _spec(study, curve={**spec.curve, "protocols": ["sliding"]})


def test_gpu_study_script_dry_run_on_cpu(tmp_path):
    """tools/real_study_gpu.sh --dry-run: the GPU study's plan, checked on a machine without a GPU."""
    import json
    import os
    import subprocess

    base = tmp_path / "smollm2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    env = {**os.environ, "PYTHON": sys.executable, "BASE_MODEL": str(base)}
    res = subprocess.run(["bash", "tools/real_study_gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [x for x in res.stdout.splitlines() if "tokens):" in x]
    assert len(lines) == 4 and all(": ok (planned peak" in x for x in lines), res.stdout
    assert "--attention.full_last_steps=25" in res.stdout and "--rope.type=yarn" in res.stdout


def test_a_study_continues_only_with_its_own_settings(tmp_path):
    import pilot

    spec, out = _spec("real_cpu.yaml"), tmp_path / "study"
    pilot.check_spec(spec, out)
    pilot.check_spec(spec, out)  # a plain rerun continues
    pilot.check_spec(_spec("real_cpu.yaml", variants=[*spec.variants, "s2_then_full"], floors=["linear"]), out)
    assert "s2_then_full" in (out / "spec.json").read_text()  # runs added; a dropped floor's results stay
    for change, field in (({"extend_steps": spec.extend_steps + 1}, "extend_steps"),
                          ({"eval_max_windows": 2}, "eval_max_windows"),
                          ({"suite": {**spec.suite, "samples": 3}}, "suite")):
        with pytest.raises(SystemExit, match=rf"other settings \({field}: .*--out"):
            pilot.check_spec(_spec("real_cpu.yaml", **change), out)
    pilot.check_spec(_spec("real_cpu.yaml", eval_threads=1), out)  # changes no number

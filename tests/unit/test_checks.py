"""One home for run checks: the dry run and the trainer's start-up give the same verdict.

Every shipped recipe and a set of broken ones go through both ``dry_run`` (what ``--dry-run``
prints and its exit code follows) and ``Trainer.preflight`` (what ``Trainer.setup`` raises before
any weight is built). Model directories the recipes name are stood in for by directories holding
the published architecture's config.json and a real tokenizer, so both sides read real files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalong.config import load_config
from megalong.config.schema import ConfigError
from megalong.engine import checks
from megalong.engine.dryrun import dry_run
from megalong.engine.trainer import Trainer
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "launch" / "configs").glob("*.yaml"))
WORLD = {"tiny_cpu": 2, "tiny_base_cpu": 2}  # others: one 8-GPU node


@pytest.fixture(scope="module")
def model_dirs(assets, tmp_path_factory):
    """Stand-ins for the model directories the recipes name: config.json + the test tokenizer."""
    import shutil

    from megalong.utils.model_shapes import known_arch_config

    root = tmp_path_factory.mktemp("models")
    configs = {arch: known_arch_config(arch) for arch in ("llama2-7b", "llama2-13b", "llama2-70b")}
    configs["tiny"] = tiny_config("llama", vocab_size=assets["vocab_size"], max_position_embeddings=256)
    configs["mistral"] = tiny_config("mistral", vocab_size=assets["vocab_size"], sliding_window=64)
    made = {}
    for name, config in configs.items():
        made[name] = root / name
        made[name].mkdir()
        config.to_json_file(str(made[name] / "config.json"))
        shutil.copytree(assets["tokenizer"], made[name], dirs_exist_ok=True)
    return made


def _recipe(path: Path, model_dirs: dict, assets: dict, extra: list[str] = ()):
    raw = path.read_text()
    over = []
    if "init_config" in raw:
        over.append(f"--model.tokenizer={assets['tokenizer']}")
    else:
        arch = next((a for a in ("llama2-70b", "llama2-13b", "llama2-7b") if f"arch: {a}" in raw), "tiny")
        over.append(f"--model.name_or_path={model_dirs[arch]}")
    return load_config(path, over + list(extra))


def _verdicts(cfg, world: int, accelerator: str = "cuda") -> tuple[list[str], list[str]]:
    """(dry-run errors, trainer start-up errors) for the same recipe and world size."""
    report = dry_run(cfg, nodes=1, gpus_per_node=world)
    try:
        Trainer(cfg).preflight(world, accelerator)
        trainer = []
    except ConfigError as e:
        trainer = [line.strip() for line in str(e).splitlines()[1:]]
    return report.errors, trainer


def _same(dry: list[str], trainer: list[str]) -> None:
    assert len(dry) == len(trainer), (dry, trainer)
    for line in trainer:  # the dry run may add where the world size came from
        assert any(d.startswith(line) for d in dry), (line, dry)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_passes_both(path, model_dirs, assets):
    cfg = _recipe(path, model_dirs, assets)
    dry, trainer = _verdicts(cfg, WORLD.get(path.stem, 8))
    assert dry == [] and trainer == [], (dry, trainer)


BROKEN = {
    # recipe, world, overrides, a phrase of the fix
    "sliding_window": ("tiny_cpu", 2, ["--model.name_or_path={mistral}", "--attention.group_size=128"],
                       "set attention.group_size <= 64"),
    "sp_world": ("llama2_7b_100k", 8, ["--parallel.sp=3"], "does not divide the world size 8"),
    "sp_length": ("tiny_cpu", 2, ["--parallel.sp=2", "--data.max_seq_len=1023", "--attention.group_size=254"],
                  "does not divide data.max_seq_len=1023"),
    "ulysses_heads": ("tiny_cpu", 8, ["--parallel.sp=8", "--parallel.sp_mode=ulysses"],
                      "does not divide the 4 attention heads"),
    "vocab": ("tiny_base_cpu", 2, ["--model.init_config.vocab_size=100"], "smaller than"),
    "template": ("tiny_cpu", 2, ["--zero.template=no_such.json"], "not found"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_recipes_fail_both_with_the_same_errors(case, model_dirs, assets):
    name, world, extra, phrase = BROKEN[case]
    extra = [e.format(mistral=model_dirs["mistral"]) for e in extra]
    cfg = _recipe(REPO / "launch" / "configs" / f"{name}.yaml", model_dirs, assets, extra)
    dry, trainer = _verdicts(cfg, world)
    assert trainer and any(phrase in t for t in trainer), (phrase, trainer)
    _same(dry, trainer)
    assert not dry_run(cfg, nodes=1, gpus_per_node=world).fits


def test_flash_backend_is_refused_on_cpu_and_fine_on_gpus(model_dirs, assets):
    cfg = _recipe(REPO / "launch" / "configs" / "tiny_cpu.yaml", model_dirs, assets,
                  ["--attention.backend=flash", "--train.dtype=bf16"])
    from megalong.engine.setup import base_hf_config

    hf, _ = base_hf_config(cfg)
    on_cpu = checks.errors(checks.run_checks(cfg, hf, 2, "cpu", 512))
    assert on_cpu and "attention.backend=sdpa" in on_cpu[0]
    assert checks.errors(checks.run_checks(cfg, hf, 2, "cuda", 512)) == []
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        Trainer(cfg).preflight(2, "cpu")


def test_bf16_on_a_cpu_without_bf16_units_is_a_warning_with_the_fix(model_dirs, assets):
    """bf16 on an AVX2-only CPU: a warning (not an error: it runs, slowly) naming the flags and fp32; none with
    avx512_bf16, none for fp32, none on GPUs; start-up logs the same finding as the dry run reports."""
    from megalong.engine.setup import base_hf_config

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    bf16_cpu = avx2.replace("avx2", "avx2 avx512f avx512_bf16")
    cfg = _recipe(REPO / "launch" / "configs" / "tiny_cpu.yaml", model_dirs, assets, ["--train.dtype=bf16"])
    found = checks.check_cpu_dtype(cfg, "cpu", avx2)
    assert [f.level for f in found] == ["warn"] and "train.dtype=fp32" in found[0].message
    assert "avx512_bf16" in found[0].message and "emulates" in found[0].message
    assert checks.check_cpu_dtype(cfg, "cpu", bf16_cpu) == [] and checks.check_cpu_dtype(cfg, "cuda", avx2) == []
    fp32 = _recipe(REPO / "launch" / "configs" / "tiny_cpu.yaml", model_dirs, assets, [])
    assert checks.check_cpu_dtype(fp32, "cpu", avx2) == []
    from megalong.utils.cpu_runtime import cpu_bf16_native

    assert not cpu_bf16_native(avx2) and cpu_bf16_native(bf16_cpu)
    hf, _ = base_hf_config(cfg)
    here = [f for f in checks.run_checks(cfg, hf, 2, "cpu", 512) if f.what == "train.dtype"]
    assert len(here) == (0 if cpu_bf16_native() else 1)  # this machine's own CPU


def test_flash_with_fp32_is_refused_before_the_first_forward(model_dirs, assets):
    """flash-attn has no fp32 kernels: tiny_cpu.yaml (fp32) with backend=flash fails the checks on GPUs too."""
    cfg = _recipe(REPO / "launch" / "configs" / "tiny_cpu.yaml", model_dirs, assets, ["--attention.backend=flash"])
    dry, trainer = _verdicts(cfg, 2)
    assert trainer == ["attention: attention.backend=flash runs in fp16/bf16 only (flash-attn has no fp32 kernels) "
                       "but train.dtype=fp32: set train.dtype=bf16, or attention.backend=sdpa to train in fp32"]
    _same(dry, trainer)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_position_dependent_rope_is_refused_under_sp(model_dirs, assets, rope_type):
    """transformers picks dynamic/longrope frequencies from max(position_ids) + 1 of the forward: rank 0's
    slice [0, L) of a 4L-token row (L = the base's 256) rotates unlike the whole row, so sp > 1 is refused."""
    from megalong.engine.setup import base_hf_config
    from megalong.models import create_model

    extra = ["--parallel.sp=4", "--attention.group_size=128", f"--rope.type={rope_type}"]
    if rope_type == "longrope":
        extra.append("--rope.extra={short_factor: [1, 1, 1, 1, 1, 1, 1, 1], long_factor: [1, 2, 3, 4, 5, 6, 7, 8]}")
    cfg = _recipe(REPO / "launch" / "configs" / "tiny_cpu.yaml", model_dirs, assets, extra)
    dry, trainer = _verdicts(cfg, 4)
    assert len(trainer) == 1 and f"rope_type={rope_type}" in trainer[0] and "use parallel.sp=1" in trainer[0]
    _same(dry, trainer)
    hf, _ = base_hf_config(cfg)
    x, pos = torch.zeros(1, 1), torch.arange(cfg.data.max_seq_len)[None]
    whole, _ = create_model(hf).model.rotary_emb(x, pos)  # one process, the whole row
    rank0, _ = create_model(hf).model.rotary_emb(x, pos[:, :256])  # rank 0's slice, a fresh process
    assert not torch.allclose(rank0, whole[:, :256], atol=1e-4)


def test_dry_run_exit_code_follows_the_verdict(model_dirs, assets, tmp_path):
    """The entry point's --dry-run exits 1 on a recipe the trainer would refuse, 0 on a good one."""
    import subprocess
    import sys

    base = [sys.executable, str(REPO / "launch" / "pretrain_extend.py"), "--config",
            str(REPO / "launch" / "configs" / "tiny_cpu.yaml"), "--dry-run", "--gpus-per-node", "2",
            f"--model.name_or_path={model_dirs['mistral']}"]
    bad = subprocess.run(base + ["--attention.group_size=128"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "INVALID" in bad.stdout and "sliding_window=64" in bad.stdout
    summary = json.loads(bad.stdout.strip().splitlines()[-1])
    assert summary["errors"] and not summary["fits"]
    good = subprocess.run(base + ["--attention.group_size=64"], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-2000:]

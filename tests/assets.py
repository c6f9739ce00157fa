"""Real, offline test assets: a small SentencePiece tokenizer and mmap datasets built from Python's
standard-library sources, plus helpers that run megalong's entry point as N real ranks."""

from __future__ import annotations

import copy
import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def build_assets(root: Path, max_mb: float = 0.6, vocab_size: int = 512) -> dict:
    """Corpus -> tokenizer -> train/valid datasets under ``root`` (about two seconds)."""
    from megalong.data.corpus import build_corpus
    from megalong.data.preprocess import preprocess
    from megalong.data.tokenizer import save_hf_tokenizer, train_sentencepiece

    build_corpus(root / "corpus", max_mb=max_mb, valid_every=10)
    model = train_sentencepiece([root / "corpus" / "train.jsonl"], root / "tok" / "spm", vocab_size=vocab_size,
                                input_sentence_size=20000, num_threads=1)
    hf = save_hf_tokenizer(model, root / "tok" / "hf")
    for split in ("train", "valid"):
        preprocess([root / "corpus" / f"{split}.jsonl"], root / "data" / split, hf, workers=0, append_eod=True,
                   progress=False)
    return {"tokenizer": str(hf), "spm": str(model), "train": str(root / "data" / "train"),
            "valid": str(root / "data" / "valid"), "vocab_size": vocab_size}


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""SmolLM2-Instruct's ChatML template (its default system message shortened)."""


def build_chat_tokenizer(spm_model: str | Path, out_dir: Path, template: str | None = CHATML_TEMPLATE) -> str:
    """A SmolLM2-Instruct-style HF tokenizer from a SentencePiece model: ChatML special tokens
    ``<|im_start|>`` / ``<|im_end|>`` added, ``<|im_end|>`` as EOS, the ChatML template (or none)."""
    from transformers import AutoTokenizer

    from megalong.data.tokenizer import save_hf_tokenizer

    base = save_hf_tokenizer(spm_model, Path(out_dir) / "base")
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tok.chat_template = template
    out = Path(out_dir) / ("chat" if template else "plain")
    tok.save_pretrained(str(out))
    return str(out)


def tiny_run_config(assets: dict, run_dir: Path, **sections) -> dict:
    """A LongLoRA (S²-Attn + LoRA+ + PI) recipe on a tiny Llama built from a config, fp32."""
    cfg = {
        "model": {
            "tokenizer": assets["tokenizer"],
            "init_config": {
                "model_type": "llama", "vocab_size": assets["vocab_size"], "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
            },
        },
        "rope": {"type": "linear"},
        "attention": {"train": "s2", "group_size": 32},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "zero": {"stage": 3},
        "data": {"prefixes": [assets["train"]], "valid_prefixes": [assets["valid"]], "max_seq_len": 128},
        "train": {"run_dir": str(run_dir), "max_steps": 6, "micro_batch_size": 2, "grad_accum": 1, "lr": 5e-3,
                  "warmup_steps": 2, "dtype": "fp32", "grad_clip": 1.0, "eval_batches": 1,
                  "eval_interval": 3},
        "checkpoint": {"save_interval": 3},
        "logging": {"log_interval": 1, "progress_bar": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(copy.deepcopy(values))
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".torch_extensions"), TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def start_ranks(cfg: dict, world: int, workdir: Path, overrides: list[str] = (), worker_args: list[str] = ()):
    """Start ``world`` processes of the real entry point (through tests/dist/worker.py), like torchrun."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"cfg_{time.monotonic_ns()}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    procs = []
    for r in range(world):
        log = open(workdir / f"rank{r}.log", "w")
        cmd = [sys.executable, "-m", "tests.dist.worker", *worker_args, "--", "--config", str(cfg_path), *overrides]
        procs.append(subprocess.Popen(cmd, env=rank_env(r, world, port), cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_ranks(procs, workdir: Path, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"ranks timed out; logs:\n{read_logs(workdir)}") from None
    return codes


def read_logs(workdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(workdir.glob("rank*.log")))


PORT_TAKEN = ("EADDRINUSE", "Address already in use", "address already in use")


def port_was_taken(text: str) -> bool:
    """A rendezvous port picked by free_port() can be taken by someone else before rank 0 binds it."""
    return any(m in text for m in PORT_TAKEN)


def run_ranks(cfg: dict, world: int, workdir: Path, overrides: list[str] = (), timeout: float = 300,
              worker_args: list[str] = (), expect: int | None = 0) -> list[int]:
    for _attempt in range(3):  # a new port when the one we picked was taken in the meantime
        codes = wait_ranks(start_ranks(cfg, world, workdir, overrides, worker_args), workdir, timeout)
        if not (any(codes) and port_was_taken(read_logs(workdir))):
            break
    if expect is not None and any(c != expect for c in codes):
        raise AssertionError(f"exit codes {codes} (expected {expect}); logs:\n{read_logs(workdir)}")
    return codes


def step_metric(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric from a run's metrics.jsonl (steps that recorded it)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def step_losses(run_dir: Path) -> dict[int, float]:
    return step_metric(run_dir, "loss")


def check_launcher_run(run: Path, world: int, steps: int, output: str | None = None) -> None:
    """What every launcher run of the tiny recipes leaves (micro batch 2, 128 tokens, a save every 2 steps):
    metrics per step, the rendered DeepSpeed JSON, a complete last checkpoint with every rank's RNG state,
    the base model dir; with ``output``: one progress line per step from rank 0 (not a terminal)."""
    from megalong.engine import checkpoint as ckpt

    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    for r in recs:
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gb"):
            assert key in r, key
        assert r["tokens"] == 2 * world * 128 and r["loss"] > 0 and r["tokens_per_s"] > 0
    tag = (run / "checkpoints" / "latest").read_text()
    meta = ckpt.read_meta(run / "checkpoints", tag)
    assert tag == f"step_{steps:08d}" and meta["world_size"] == world and meta["consumed_samples"] == steps * 2 * world
    assert (run / "config.yaml").is_file() and json.loads((run / "ds_config.json").read_text())[
        "train_batch_size"] == 2 * world
    for r in range(world):
        assert (run / "checkpoints" / tag / f"rng_rank{r}.safetensors").is_file()
    assert (run / "base_model" / "config.json").is_file()  # the tiny recipe's base saved as an HF dir
    if output is not None:
        assert "run directory:" in output
        lines = [ln for ln in output.splitlines() if "| loss " in ln and " train " in ln]
        assert [ln.split(" train ")[1].split(" ")[0] for ln in lines] == [f"{i}/{steps}" for i in range(1, steps + 1)]
        assert "ETA" in lines[0] and "tok s" in lines[0] and "elapsed" in lines[-1] and "rank0" in lines[0]


def trained_weights(run_dir: Path, tag: str = "latest") -> dict:
    """fp32 trained tensors of a run's checkpoint (any ZeRO stage / rank count)."""
    from megalong.engine.export import open_checkpoint, trained_tensors

    return trained_tensors(open_checkpoint(run_dir, tag))


def clean_shm() -> None:
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.remove(path)
        except OSError:
            pass


# ---------------------------------------------------------------- exports and the deepspeed launcher
def launcher_env() -> dict:
    """Environment for the real ``deepspeed`` launcher: rank_env without the per-rank variables."""
    env = rank_env(0, 1, 0)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_launcher(launcher_args: list[str], script_args: list[str], timeout: float = 300,
                 env: dict | None = None, script: str = "launch/pretrain_extend.py") -> subprocess.CompletedProcess:
    """``deepspeed <launcher_args> --master_port P <script> <script_args>`` from the repo root; picks a
    new port and retries when the one picked was taken before rank 0 could bind it."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    for _attempt in range(3):
        cmd = [deepspeed, *launcher_args, "--master_port", str(free_port()), script, *script_args]
        res = subprocess.run(cmd, cwd=REPO, env=env or launcher_env(), capture_output=True, text=True,
                             timeout=timeout)
        clean_shm()
        if res.returncode == 0 or not port_was_taken(res.stdout + res.stderr):
            return res
    return res


def start_launcher(launcher_args: list[str], script_args: list[str], log_path: Path, port: int,
                   script: str = "launch/pretrain_extend.py") -> subprocess.Popen:
    """``deepspeed <launcher_args> --master_port PORT <script> <script_args>`` in the background, output
    to ``log_path`` (``script`` may be tests/dist/worker.py to inject faults)."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, *launcher_args, "--master_port", str(port), script, *script_args]
    return subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def run_nodes(hostfile: Path, nodes: int, script_args: list[str], workdir: Path,
              timeout: float = 300) -> list[tuple[int, str]]:
    """One launcher per "node" of ``hostfile``, started together on this machine as a cluster would
    start them (``--no_ssh --node_rank N --master_addr 127.0.0.1``, one port); [(exit code, output)]
    per node. A new port for all when the one picked was taken."""
    for attempt in range(3):
        port, logs = free_port(), [workdir / f"node{n}_{attempt}.log" for n in range(nodes)]
        procs = [start_launcher(["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
                                 "--master_addr", "127.0.0.1"], script_args, logs[n], port) for n in range(nodes)]
        deadline = time.monotonic() + timeout
        try:
            codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("launchers timed out:\n" + "\n".join(x.read_text()[-3000:] for x in logs)) from None
        finally:
            clean_shm()
        out = [(c, log.read_text()) for c, log in zip(codes, logs)]
        if not (any(codes) and any(port_was_taken(o) for _, o in out)):
            return out
    return out


def build_megalong_model(cfg, base_dir: Path, trained: dict):
    """A model as megalong holds it after training: base (with the run's RoPE scaling) + LoRA+ +
    ``trained`` tensors (HF-side names, as ``trained_tensors`` returns them), full attention, eval mode."""
    from megalong.attention import use_full_attention
    from megalong.engine.setup import base_hf_config
    from megalong.lora import apply_lora_plus
    from megalong.models import create_model

    hf_cfg, _ = base_hf_config(cfg, Path(base_dir))
    model = apply_lora_plus(create_model(hf_cfg, path=str(base_dir)), cfg.lora)
    prefix = "base_model.model." if cfg.lora.enabled else ""
    _, unexpected = model.load_state_dict({prefix + k: v for k, v in trained.items()}, strict=False)
    assert not unexpected, unexpected
    use_full_attention(model)
    return model.eval()


def megalong_model(run_dir: Path, tag: str = "latest"):
    """(model, RunCheckpoint) of a run's checkpoint: see ``build_megalong_model``."""
    from megalong.engine.export import open_checkpoint, trained_tensors

    rc = open_checkpoint(run_dir, tag)
    return build_megalong_model(rc.cfg, rc.base_dir, trained_tensors(rc)), rc


def real_rows(assets: dict, n: int = 100):
    """Two rows of ``n`` real tokens from one validation document, shape (2, n) int64."""
    import numpy as np
    import torch

    from megalong.data import IndexedDataset

    ds = IndexedDataset(assets["valid"])
    doc = next(ds[i] for i in range(len(ds)) if len(ds[i]) > 2 * n)
    return torch.as_tensor(np.stack([doc[:n], doc[n:2 * n]]).astype(np.int64))


def safetensors_of(model_dir: Path) -> dict:
    """Every tensor of an HF model directory's *.safetensors files."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_adapter_logits(run_dir: Path, base_dir: Path, adapter_dir: Path, x, want) -> None:
    """The adapter directory loads in stock peft (base loaded with the adapter dir's config.json, as the
    README says) and gives ``want`` logits on ``x``."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, config=AutoConfig.from_pretrained(adapter_dir),
                                                local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, want, rtol=1e-4, atol=1e-5)


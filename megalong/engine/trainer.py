"""The training loop: setup / train / train_step / evaluate / save / load.

    setup():  process groups ─► run dir (config.yaml, ds_config.json) ─► tokenizer + data checks
              ─► base model (built once from a config, or a local HF dir) ─► RoPE scaling
              ─► S²-Attn ─► LoRA+ ─► activation checkpointing ─► deepspeed.initialize ─► resume
    train():  train_step() until max_steps; metrics.jsonl every step; checkpoints on interval,
              at the end, and on SIGTERM/SIGINT (finish the step, save, exit 0)

Loss normalisation: a step's loss is Σ token losses / (valid tokens of the whole step, over
grad-accumulation micro-batches and all ranks). DeepSpeed divides by grad_accum and averages
over data-parallel ranks, so each micro-batch backpropagates ``local_sum · GA · dp / global_count``.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megalong.config.deepspeed import batch_arithmetic, render_deepspeed_config, write_deepspeed_config
from megalong.config.loader import config_to_dict, save_config
from megalong.config.schema import Config, ConfigError
from megalong.data.batch import BATCH_KEYS, IGNORE_INDEX
from megalong.engine import checkpoint as ckpt
from megalong.engine import liveness
from megalong.engine import setup as build
from megalong.engine.checks import Finding, raise_on_errors, run_checks
from megalong.engine.schedule import lr_multiplier
from megalong.engine.tiling import activation_offload
from megalong.lora import count_parameters
from megalong.parallel.dims import DeepSpeedMPU, ParallelDims, init_distributed
from megalong.parallel.s2_halo import HaloStats
from megalong.parallel.sharding import shard_batch
from megalong.utils.metrics import (
    MetricsWriter,
    device_peak_tflops,
    gather_peak_memory_gb,
    peak_memory_gb,
    train_flops_per_token,
)
from megalong.utils.progress import Progress, StepProgress

log = logging.getLogger("megalong")


def _fmt(layout: dict[str, int]) -> str:
    return f"dp={layout['dp']} × sp={layout['sp']}, ZeRO-{layout['zero_stage']}"


class NonFiniteLossError(RuntimeError):
    """Raised (with policy ``stop``) when a step's loss or gradients are NaN/inf."""


class Trainer:
    """Owns the DeepSpeed engine, the data loaders and the run directory of one training run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.consumed_samples = 0
        self.engine = None
        self.step_progress: StepProgress | None = None
        self._stop_signal: int | None = None
        self._last_saved_step = -1
        self.train_attention = "train"
        """``train`` (attention.train) or ``full`` once attention.full_last_steps switched it."""

    # ------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        cfg = self.cfg
        init_distributed(cfg.parallel.init_timeout_s)
        from deepspeed.accelerator import get_accelerator

        self.accelerator = get_accelerator().device_name()
        self.device = torch.device(get_accelerator().current_device_name())
        self.tokenizer = build.load_run_tokenizer(cfg)
        self.preflight(dist.get_world_size() if dist.is_initialized() else 1, self.accelerator, self.tokenizer)
        self.dims = ParallelDims.from_env(cfg.parallel.sp).build()
        self.halo_stats = HaloStats() if self.dims.sp > 1 and self.cfg.parallel.sp_mode == "s2_halo" else None
        self.rank, self.is_main = self.dims.rank, self.dims.rank == 0
        self.batch = batch_arithmetic(cfg, self.dims.dp)
        self.ds_config = render_deepspeed_config(cfg, self.dims.dp, self.accelerator)
        self.resume_tag = ckpt.find_resume_tag(self.ckpt_dir, cfg.checkpoint.resume)
        self.resume_universal = self._resume_needs_universal()
        if self.resume_universal:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self._prepare_run_dir()
        if self.resume_universal:
            ckpt.ensure_universal(self.ckpt_dir, self.resume_tag, self.is_main)
        self.base_dir = build.materialize_base_model(cfg, self.run_dir, self.tokenizer, self.is_main, self._barrier)
        base = build.base_hf_config(cfg, self.base_dir)
        self.data = build.build_data(cfg, self.tokenizer, self.batch, self.dims, self._barrier, base[0].vocab_size)
        self.model, self.rope = build.build_model(cfg, self.base_dir, self.ds_config, self.dims, self.tokenizer, base)
        self._build_engine()
        if self.resume_tag is not None:
            self.load(self.resume_tag)
        self.loader = self.data.train_loader(self.consumed_samples)
        return self

    def preflight(self, world: int, accelerator: str, tokenizer=None) -> list[Finding]:
        """The start-up checks of this recipe on ``world`` ranks (megalong.engine.checks, the same
        ones ``--dry-run`` reports); raises ConfigError listing every error. Every rank runs them,
        so a bad recipe stops all ranks before any of them waits at a barrier."""
        cfg = self.cfg
        tokenizer = tokenizer if tokenizer is not None else build.load_run_tokenizer(cfg)
        hf_cfg, _ = build.base_hf_config(cfg)
        findings = run_checks(cfg, hf_cfg, world, accelerator, tokenizer.vocab_size, tokenizer.name)
        raise_on_errors(findings)
        for f in findings:
            if f.level == "warn":
                log.warning("%s: %s", f.what, f.message)
        return findings

    def _layout(self) -> dict[str, int]:
        return {"dp": self.dims.dp, "sp": self.dims.sp, "zero_stage": self.cfg.zero.stage}

    def _resume_needs_universal(self) -> bool:
        """True when the checkpoint to resume was partitioned for another layout (dp, sp or ZeRO stage):
        it is then loaded through DeepSpeed's universal checkpoint, which re-partitions the trainable
        weights and their optimizer state for this run."""
        if self.resume_tag is None:
            return False
        saved = ckpt.layout_of(ckpt.read_meta(self.ckpt_dir, self.resume_tag))
        if saved == self._layout():
            return False
        if self.is_main:
            log.warning("checkpoint %s was written with %s, this run has %s: resuming through DeepSpeed's universal "
                        "checkpoint (converted once, kept in %s/%s)", self.resume_tag, _fmt(saved),
                        _fmt(self._layout()), self.resume_tag, ckpt.UNIVERSAL)
        return True

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _prepare_run_dir(self) -> None:
        cfg = self.cfg
        if ckpt.complete_tags(self.ckpt_dir) and self.resume_tag is None:  # every rank checks: all stop
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints and checkpoint.resume={cfg.checkpoint.resume!r}; "
                "continue it with --checkpoint.resume=auto or choose a new --train.run_dir"
            )
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            write_deepspeed_config(self.ds_config, self.run_dir / "ds_config.json")
        self._barrier()

    def _build_engine(self) -> None:
        import deepspeed

        from megalong.engine.model import TrainModule

        module = TrainModule(self.model, self.cfg.train.loss_chunk_size)
        module.pass_segment_ids = self.cfg.data.doc_mask
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("nothing to train: no parameter requires grad (check lora.targets / lora.trainable)")
        mult = lr_multiplier(self.cfg.train)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=params,
            config=self.ds_config,
            mpu=DeepSpeedMPU(self.dims),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, mult),
        )
        self.n_params = count_parameters(self.model)
        trainable, total = self.n_params
        self._flops_per_token = train_flops_per_token(
            total, trainable, self.model.config.num_hidden_layers, self.model.config.hidden_size, self._attn_span()
        )

    def _attn_span(self) -> float:
        n = self.cfg.data.max_seq_len
        return self.cfg.group_size / 2 if self.cfg.attention.train in ("s2", "short") else n / 2

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        """Train until ``train.max_steps``; returns the last step's metrics."""
        cfg = self.cfg
        metrics = MetricsWriter(self.run_dir, cfg.logging.tensorboard, enabled=self.is_main)
        bar = self._progress()
        self.step_progress = self._step_progress()
        if self.is_main:
            log.info("training: step %d of %d, %d rows of %d tokens per step (dp %d × sp %d)", self.step,
                     cfg.train.max_steps, self.batch.train_batch, cfg.data.max_seq_len, self.dims.dp, self.dims.sp)
        last: dict = {}
        old_handlers = self._install_signal_handlers()
        beat = liveness.Heartbeat(self.run_dir / "heartbeats", self.rank, self.step) if self.dims.world > 1 else None
        end = ("done", None)
        try:
            while self.step < cfg.train.max_steps:
                self._switch_to_full_attention()
                last = self.train_step()
                self.step += 1
                self.consumed_samples += self.batch.train_batch
                last.update(step=self.step, consumed_samples=self.consumed_samples)
                if beat:
                    beat.update(self.step)
                self._after_step(last, metrics, bar)
                if last.pop("stop_signal"):  # every rank agreed in this step's all-reduce: all are alive
                    log.warning("signal %s received: saving at step %d and exiting", self._stop_signal, self.step)
                    self.save()
                    break
            if self.step >= cfg.train.max_steps and cfg.checkpoint.save_at_end and self._last_saved_step != self.step:
                self.save()
        except Exception as exc:  # a failed collective never reaches save(): no partial checkpoint, `latest` stays
            collective = beat is not None and liveness.is_collective_failure(exc)  # a survivor, not the cause
            lost = self._lost_rank(exc, beat) if collective else None
            end = ("peer-lost" if collective else "error", (str(lost) if lost else f"{type(exc).__name__}: {exc}")[:300])
            if lost:
                raise lost from exc
            raise
        finally:
            if beat:
                beat.stop(*end)
            self._restore_signal_handlers(old_handlers)
            metrics.close()
            bar.close()
            if self.step_progress is not None:
                self.step_progress.close()
                self.step_progress = None
        return last

    def _switch_to_full_attention(self) -> None:
        """attention.full_last_steps: from step max_steps - K on, train with full attention."""
        k = self.cfg.attention.full_last_steps
        if k and self.train_attention != "full" and self.step >= self.cfg.train.max_steps - k:
            self.train_attention = "full"
            build.set_attention(self.cfg, self.model, mode="full")
            if self.is_main:
                log.info("attention.full_last_steps=%d: steps %d..%d train with full attention (before: %s)", k,
                         self.step + 1, self.cfg.train.max_steps, self.cfg.attention.train)

    def _lost_rank(self, exc: BaseException, beat: liveness.Heartbeat) -> liveness.LostRankError | None:
        """A LostRankError naming the peer that made the collective ``exc`` fail, if one is shown to be gone."""
        beat.set_state("peer-lost")  # other survivors must not take this rank for the cause
        try:
            tag = ckpt.find_resume_tag(self.ckpt_dir, "auto")
            return liveness.lost_rank_error(exc, beat.path.parent, self.rank, self.dims.world, self.step,
                                            str(self.ckpt_dir / tag) if tag else None)
        except Exception as e:  # noqa: BLE001 - the diagnosis must never hide the failure itself
            log.warning("rank %d: could not tell which peer is gone: %s", self.rank, e)
            return None

    def _after_step(self, rec: dict, metrics: MetricsWriter, bar) -> None:
        cfg = self.cfg
        evaluated = cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and self.data.has_valid
        if evaluated:
            rec.update(self.evaluate())
        if evaluated or self.step % cfg.logging.log_interval == 0 or self.step == cfg.train.max_steps:
            rec["mem_gb_ranks"] = gather_peak_memory_gb()
            metrics.write({k: v for k, v in rec.items() if k != "stop_signal"})
        bar.update(1, loss=rec["loss"], tok_s=round(rec["tokens_per_s"]))
        if cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0:
            self.save()

    def _progress(self) -> Progress:
        """Rank 0: the tqdm bar on a terminal (logging.progress_bar), else a line per log interval
        and at least every logging.progress_interval_s seconds."""
        lg = self.cfg.logging
        return Progress(self.cfg.train.max_steps, "train", initial=self.step, every=lg.log_interval,
                        interval_s=lg.progress_interval_s, enabled=self.is_main, bar=lg.progress_bar)

    def _step_progress(self) -> StepProgress | None:
        """Rank 0: lines from inside a step that runs longer than logging.progress_interval_s (the
        layer being computed), so a step of minutes on a CPU shows where it is."""
        if not self.is_main:
            return None
        from megalong.models.loading import decoder_of

        layers = getattr(decoder_of(self.model), "layers", None)
        return StepProgress(layers if layers is not None else [], self.cfg.train.max_steps,
                            self.cfg.logging.progress_interval_s)

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        t0 = time.perf_counter()
        engine, ga = self.engine, self.batch.grad_accum
        micro = [self._to_device(next(self.loader)) for _ in range(ga)]
        local_valid = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        global_valid = int(self._all_reduce([float(local_valid)])[0])
        scale = self._grad_scale(global_valid)
        loss_sum = torch.zeros((), dtype=torch.float64)
        sp_ = getattr(self, "step_progress", None)
        if sp_ is not None:
            sp_.begin(self.step + 1, ga)
        for m, b in enumerate(micro, 1):
            with activation_offload(self.model):  # train.offload_activations: forward and backward inside it
                if sp_ is not None:
                    sp_.mark("forward", m)
                local_loss, _ = engine(**b)
                if sp_ is not None:
                    sp_.mark("backward", m)
                engine.backward(local_loss * scale)
            if sp_ is not None:
                sp_.mark("optimizer step", m)
            engine.step()
            loss_sum += local_loss.detach().double().cpu()
        if sp_ is not None:
            sp_.end()
        stop = 1.0 if self._stop_signal is not None else 0.0
        total, nonfinite, stop_any = self._all_reduce(
            [float(loss_sum), 0.0 if math.isfinite(float(loss_sum)) else 1.0, stop]
        )
        loss = total / max(1, global_valid)
        applied = engine.was_step_applied()
        if nonfinite or not applied or not math.isfinite(loss):
            self._on_nonfinite(loss, applied)
        dt = time.perf_counter() - t0
        tokens = self.batch.train_batch * self.cfg.data.max_seq_len
        peak = device_peak_tflops()
        grad_norm = engine.get_global_grad_norm()
        halo = None
        if self.halo_stats is not None:  # bytes this rank sent in halo exchanges this step (fwd + bwd)
            halo = self.halo_stats.forward_bytes + self.halo_stats.backward_bytes
            self.halo_stats.forward_bytes = self.halo_stats.backward_bytes = 0
        return {
            "loss": loss,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "grad_norm": None if grad_norm is None or not math.isfinite(float(grad_norm)) else float(grad_norm),
            "tokens": tokens,
            "valid_tokens": global_valid,
            "step_time_s": dt,
            "tokens_per_s": tokens / dt,
            "mfu": (self._flops_per_token * tokens / dt / (peak * 1e12 * self.dims.world)) if peak else None,
            "mem_gb": round(peak_memory_gb(), 3),
            "skipped": not applied,
            "halo_mb": None if halo is None else round(halo / 2**20, 3),
            "attention": self.cfg.attention.train if self.train_attention == "train" else self.train_attention,
            "stop_signal": bool(stop_any),
        }

    def _grad_scale(self, global_valid: int) -> float:
        """What each micro-batch's local loss sum is multiplied by before backward, so that the
        reduced gradient is d(Σ token losses / valid tokens of the whole step).

        DeepSpeed divides by grad_accum, then (measured on 0.19.8, see tests/dist/test_sp_engine.py)
        averages over the data-parallel ranks under ZeRO-1/2 (summing over the sp ranks of a row) but
        over all dp × sp ranks under ZeRO-3's reduce-scatter."""
        ranks = self.dims.dp * (self.dims.sp if self.cfg.zero.stage == 3 else 1)
        return self.batch.grad_accum * ranks / max(1, global_valid)

    def _on_nonfinite(self, loss: float, applied: bool) -> None:
        first = self.consumed_samples
        msg = (
            f"non-finite loss/gradients at step {self.step + 1} (loss={loss}, optimizer step "
            f"{'applied' if applied else 'skipped by DeepSpeed'}; samples {first}..{first + self.batch.train_batch - 1})"
        )
        if self.cfg.train.nan_policy == "skip":
            log.warning("%s: step skipped (train.nan_policy=skip)", msg)
            return
        raise NonFiniteLossError(
            f"{msg}. Nothing was saved after the last checkpoint, which is intact. Lower train.lr, check the data "
            "around those samples (tools/inspect_data.py), use train.dtype=fp32 to rule out overflow, or set "
            "train.nan_policy=skip to skip such steps"
        )

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if dist.is_initialized() and self.dims.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _to_device(self, batch: dict) -> dict:
        """The model's inputs on this rank's device; with sequence parallelism, this rank's part of the row."""
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in BATCH_KEYS}
        out = shard_batch(out, self.dims, self.cfg.data.doc_mask, self.halo_stats, self.cfg.parallel.sp_mode)
        if not self.cfg.data.doc_mask:
            out.pop("segment_ids", None)
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss / perplexity with the evaluation attention (full by default)."""
        module = self.engine.module
        module.eval()
        build.set_attention(self.cfg, self.model, mode="eval")
        loss = count = 0.0
        try:
            for b in self.data.valid_batches():
                s, c = self.engine(**self._to_device(b))
                loss += float(s)
                count += float(c)
        finally:
            build.set_attention(self.cfg, self.model, mode=self.train_attention)
            module.train()
        loss, count = self._all_reduce([loss, count])
        val = loss / max(1.0, count)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "val_tokens": int(count)}

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Loss of a fixed batch (the first training sample on every rank): proves a resume continued the run."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            s, c = self.engine(**self._to_device(self.data.probe_batch()))
        finally:
            module.train(was_training)
        s, c = float(s), float(c)
        if self.dims.sp > 1:  # the row is spread over the sequence-parallel group
            t = torch.tensor([s, c], dtype=torch.float64)
            dist.all_reduce(t, group=self.dims.groups["sp"])
            s, c = t.tolist()
        return s / max(1.0, c)

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "base_model": c.model.name_or_path or {"init_config": c.model.init_config, "seed": c.train.seed},
            "rope": self.rope.to_dict() if self.rope else None,
            "group_size": c.group_size,
            "attention_train": c.attention.train,
            "lora": config_to_dict(c)["lora"],
            "data_prefixes": list(c.data.prefixes),
            "data_files": self._data_identity(),
            "data_weights": c.data.weights,
            "max_seq_len": c.data.max_seq_len,
            "data_seed": c.data.seed,
            "train_batch": self.batch.train_batch,
        }

    def _data_identity(self) -> dict[str, str]:
        """Content fingerprint of every training data file (hash of the .idx, sampled hash of the .bin):
        a resume refuses data that changed under the run, even under the same name."""
        if not hasattr(self, "_data_ids"):
            from megalong.data.indexed import IndexedDataset

            self._data_ids = {str(p): IndexedDataset(p).identity for p in self.cfg.data.prefixes}
        return self._data_ids

    def save(self) -> str:
        """Save a complete checkpoint of the current step (all ranks). A failed write (a full disk)
        raises CheckpointError on the rank that hit it; ``latest`` and every earlier checkpoint stay."""
        tag = ckpt.tag_for_step(self.step)
        tag_dir = self.ckpt_dir / tag
        probe = self.probe_loss()
        if self.is_main and tag_dir.exists():  # left by a save that died (resume re-reached this step)
            shutil.rmtree(tag_dir, ignore_errors=True)
        self._barrier()
        client = {"step": self.step, "consumed_samples": self.consumed_samples}
        try:
            self.engine.save_checkpoint(
                str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False,
                exclude_frozen_parameters=self.cfg.lora.enabled,
            )
            ckpt.save_rng(tag_dir, self.rank)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            if liveness.is_collective_failure(e):  # a peer is gone: the train loop names it
                raise
            free = shutil.disk_usage(self.ckpt_dir).free
            raise ckpt.CheckpointError(
                f"rank {self.rank}: saving checkpoint {tag} failed ({str(e).strip().splitlines()[-1]}; "
                f"{free / 2**20:.1f} MiB free in {self.ckpt_dir}). It is incomplete and will be ignored; `latest` "
                f"still names {ckpt.find_latest(self.ckpt_dir) or 'no checkpoint'}, which is intact. Free space "
                "there (or lower checkpoint.keep_last), then rerun with --checkpoint.resume=auto"
            ) from e
        self._barrier()
        if self.is_main:
            meta = {
                "step": self.step, "consumed_samples": self.consumed_samples, "probe_loss": probe,
                "world_size": self.dims.world, "dp": self.dims.dp, "sp": self.dims.sp,
                "zero_stage": self.cfg.zero.stage, "dtype": self.cfg.train.dtype,
                "base_model_dir": self._base_dir_record(), "code_version": ckpt.code_version(),
                "fingerprint": self._fingerprint(), "config": config_to_dict(self.cfg),
                "manifest": ckpt.build_manifest(tag_dir, self.cfg.checkpoint.hash_files),
            }
            ckpt.mark_complete(self.ckpt_dir, tag, meta)
            ckpt.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        self._barrier()
        self._last_saved_step = self.step
        log.info("saved checkpoint %s", tag_dir)
        return tag

    def _base_dir_record(self) -> str:
        """The base model directory, relative when it lives inside the run dir (so a run can be moved)."""
        try:
            return str(Path(self.base_dir).resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(Path(self.base_dir).resolve())

    def load(self, tag: str) -> None:
        """Resume from a complete checkpoint: weights, optimizer, scheduler, step, data position, RNG."""
        meta = ckpt.read_meta(self.ckpt_dir, tag)
        ckpt.check_compatible(meta, self._fingerprint())
        if self.resume_universal:  # DeepSpeed reads CKPT_DIR/<tag>/universal
            path, client = self.engine.load_checkpoint(
                str(self.ckpt_dir / tag), tag=ckpt.UNIVERSAL, load_module_strict=not self.cfg.lora.enabled,
                load_optimizer_states=True, load_lr_scheduler_states=True,
            )
        else:
            path, client = self.engine.load_checkpoint(
                str(self.ckpt_dir), tag=tag, load_module_strict=not self.cfg.lora.enabled,
                load_optimizer_states=True, load_lr_scheduler_states=True,
            )
        if path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {self.ckpt_dir / tag}")
        self.step, self.consumed_samples = int(client["step"]), int(client["consumed_samples"])
        self._last_saved_step = self.step
        self._apply_config_lr()
        self._verify_probe(meta)
        if not ckpt.load_rng(self.ckpt_dir / tag, self.rank) and self.cfg.lora.dropout > 0:
            log.warning("no RNG state for rank %d in %s: dropout randomness will differ", self.rank, tag)
        log.info("resumed from %s at step %d (%d samples consumed)", tag, self.step, self.consumed_samples)

    def _apply_config_lr(self) -> None:
        """The scheduler state in a checkpoint carries the old peak LR; the config's wins (and says so)."""
        sched, lr = self.scheduler, self.cfg.train.lr
        if any(b != lr for b in sched.base_lrs):
            log.warning("train.lr changed on resume (%s -> %s): continuing with the new value", sched.base_lrs[0], lr)
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, mult in zip(sched.optimizer.param_groups, sched.lr_lambdas):
            group["lr"] = lr * mult(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    def _verify_probe(self, meta: dict) -> None:
        saved = meta.get("probe_loss")
        if saved is None:
            return
        now = self.probe_loss()
        tol = 1e-4 if self.cfg.train.dtype == "fp32" else 2e-2
        if not math.isclose(now, saved, rel_tol=tol, abs_tol=tol):
            raise ckpt.CheckpointError(
                f"after loading {meta.get('tag')}, the probe batch's loss is {now:.6f} but was {saved:.6f} at save: "
                "the restored weights are not the saved ones (mismatched base model or a damaged checkpoint)"
            )
        log.info("probe loss after resume %.6f matches the saved %.6f", now, saved)

    def close(self, clean: bool = True) -> None:
        """Tear down the process groups (after a barrier when every rank got here cleanly): leaving
        them to interpreter exit lets gloo's threads abort the process ("terminate called ...")."""
        if dist.is_initialized():
            if clean and dist.get_world_size() > 1:
                dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            self._stop_signal = signum

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def _restore_signal_handlers(self, old: dict) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)


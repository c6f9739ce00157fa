"""Evaluation under sequence parallelism: one window spread over the ranks of a sequence-parallel group.

    window x (b, n + 1) ─► inputs x[:, :-1], labels x[:, 1:]        (b, n): shifted before the split
    pad both to n' = ⌈n / sp⌉ · sp at the END (labels -100)          causal: no real token sees a pad
    rank r keeps tokens [r·L, (r+1)·L), L = n' / sp, global positions  (megalong.parallel.sharding)
      └─ decoder(sp_context) ─► hidden (b, L, d) ─► chunked lm_head ─► losses (b, L)
    all_gather over the sp group ─► (b, n') ─► drop the pads ─► (b, n): the tokens sp = 1 scores

Greedy decoding (passkey, the task suite) prefills the sharded prompt once with a KV cache, so each
rank keeps the keys/values of its own slice; the rank holding the last real token computes that one
position's logits (1, V), takes the argmax and broadcasts it. Every further token runs on every rank
(the same token, its global position) against the distributed cache (``CachedDecode``):

    rank r: q (1 token) · its cached keys [real slice tokens; decoded tokens on rank 0 only]
            -> partial softmax output o_r and log-sum-exp l_r          (B, H, 1, D), (B, H, 1)
    all_gather (o_r, l_r) -> o = Σ_r e^(l_r - l) o_r,  l = log Σ_r e^(l_r)   (exact: one softmax)

so a rank holds only its slice of the cache and a new token costs one small all-gather per layer.

The attention layers must be megalong's (``megalong_full`` / ``megalong_s2``): stock ``sdpa`` would
ignore ``sp_context`` and attend inside each rank's slice only; ``check_model`` refuses that.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalong.config.schema import ConfigError
from megalong.data.batch import IGNORE_INDEX

SP_MODES = ("s2_halo", "ulysses")
PAD_TOKEN = 0
"""Input id of the padding after a window (never attended by a real token, its loss is dropped)."""


# ----------------------------------------------------------------------------------- pure helpers
def padded_length(n: int, sp: int) -> int:
    """The smallest multiple of ``sp`` that holds ``n`` tokens."""
    return -(-n // sp) * sp


def owner_of(index: int, local_len: int) -> tuple[int, int]:
    """(sp rank, index inside its slice) of row position ``index`` when each rank holds ``local_len``."""
    return divmod(index, local_len)


def merge_rank_losses(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Per-rank token losses [(b, L)] * sp in rank order -> the row's (b, n), padding dropped."""
    if not parts:
        raise ValueError("merge_rank_losses needs the losses of at least one rank")
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:
        raise ValueError(f"ranks hold slices of different lengths {sorted(widths)}; every rank must hold L tokens")
    full = torch.cat(parts, dim=1)  # (b, sp·L)
    if n > full.shape[1]:
        raise ValueError(f"n={n} tokens requested from {full.shape[1]} gathered ones")
    return full[:, :n]


def pad_window(inputs: torch.Tensor, labels: torch.Tensor, sp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels (b, n) padded at the end to a multiple of ``sp``: pad id 0, label -100."""
    n = inputs.shape[1]
    extra = padded_length(n, sp) - n
    if not extra:
        return inputs, labels
    return F.pad(inputs, (0, extra), value=PAD_TOKEN), F.pad(labels, (0, extra), value=IGNORE_INDEX)


# ----------------------------------------------------------------------------------- the evaluator
@dataclass
class SequenceParallelEval:
    """Scores windows and decodes greedily with each row split over ``dims``' sequence-parallel group.

    Every rank of the group must call the same methods with the same inputs, in the same order.

    Attributes:
        dims: the built ParallelDims (world = sp; one sequence-parallel group).
        sp_mode: ``s2_halo`` or ``ulysses`` (the attention context ``shard_batch`` builds).
    """

    dims: object
    sp_mode: str = "s2_halo"

    def __post_init__(self) -> None:
        if self.sp_mode not in SP_MODES:
            raise ConfigError(f"--sp-mode {self.sp_mode!r} is not one of {', '.join(SP_MODES)}")

    @property
    def sp(self) -> int:
        return self.dims.sp

    @property
    def group(self):
        return self.dims.groups["sp"]

    def check_model(self, model) -> None:
        """Refuse a model whose attention would ignore ``sp_context`` (scores would be silently wrong)."""
        from megalong.attention import FULL_IMPLEMENTATION, S2_IMPLEMENTATION, unwrap_model

        impl = getattr(unwrap_model(model).config, "_attn_implementation", None)
        if impl not in (FULL_IMPLEMENTATION, S2_IMPLEMENTATION):
            raise ConfigError(f"sequence-parallel evaluation needs megalong's attention, the model runs {impl!r}; "
                              "call megalong.attention.use_full_attention(model) (or use_s2_attention) first")

    def _shard(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict:
        """This rank's part of padded (b, n') inputs/labels with global positions and ``sp_context``."""
        b, n = inputs.shape
        positions = torch.arange(n, device=inputs.device).expand(b, n)
        from megalong.parallel.sharding import shard_batch

        return shard_batch({"input_ids": inputs, "labels": labels, "position_ids": positions}, self.dims,
                           doc_mask=False, sp_mode=self.sp_mode)

    def _hidden(self, model, part: dict) -> torch.Tensor:
        """This rank's last hidden states (b, L, d)."""
        from megalong.models.loading import decoder_of

        return decoder_of(model)(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=False,
                                 sp_context=part["sp_context"]).last_hidden_state

    def _gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """``local`` of every rank of the group, in rank order."""
        parts = [torch.empty_like(local) for _ in range(self.sp)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return parts

    @torch.no_grad()
    def token_losses(self, model, x: torch.Tensor, loss_chunk_size: int = 1024) -> torch.Tensor:
        """Next-token losses (b, n) fp32 of windows ``x`` (b, n + 1), the same on every rank of the group."""
        from megalong.engine.loss import chunked_token_losses, logit_softcap_of
        from megalong.models.loading import lm_head_of

        if loss_chunk_size < 1:
            raise ConfigError(f"loss_chunk_size={loss_chunk_size}: sequence-parallel scoring uses the chunked "
                              "lm_head; pass a positive --loss-chunk-size (the scores equal the full-logits ones)")
        self.check_model(model)
        inputs, labels = pad_window(x[:, :-1], x[:, 1:], self.sp)  # (b, n'), n' = sp·L
        part = self._shard(inputs, labels)
        hidden = self._hidden(model, part)  # (b, L, d)
        head = lm_head_of(model)
        local = chunked_token_losses(hidden, head.weight, part["labels"], bias=getattr(head, "bias", None),
                                     chunk_size=loss_chunk_size, softcap=logit_softcap_of(model))  # (b, L)
        return merge_rank_losses(self._gather(local.float()), x.shape[1] - 1)  # (b, n)

    @torch.no_grad()
    def greedy(self, model, prompt: list[int], n_tokens: int, device: torch.device,
               eos_token_ids: tuple[int, ...] = ()) -> list[int]:
        """Up to ``n_tokens`` greedy tokens after ``prompt`` (stops after an EOS, as ``generate`` does):
        one sharded prefill with a KV cache, then one cached step per token (``CachedDecode``)."""
        from transformers import DynamicCache

        from megalong.models.loading import decoder_of, lm_head_of

        self.check_model(model)
        head, decoder = lm_head_of(model), decoder_of(model)
        n = len(prompt)
        x = torch.tensor([prompt], device=device)  # (1, n)
        inputs, labels = pad_window(x, x, self.sp)  # labels unused: only hidden states are needed
        part = self._shard(inputs, labels)
        cache = DynamicCache()  # full-length layers: a rank's slice, not the last `window` tokens
        hidden = decoder(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=True,
                         cache=cache, sp_context=part["sp_context"]).last_hidden_state  # (1, L, d)
        local_len = inputs.shape[1] // self.sp
        owner, at = owner_of(n - 1, local_len)
        token = torch.zeros(1, dtype=torch.long, device=device)
        if self.dims.sp_rank == owner:
            token[0] = head(hidden[:, at]).argmax(dim=-1)[0]  # logits of one position: (1, V)
        dist.broadcast(token, src=self.dims.sp_group_ranks()[owner], group=self.group)
        out = [int(token)]
        ctx = CachedDecode(self.group, self.dims.sp_rank, local_len,
                           real_len=min(local_len, max(0, n - self.dims.sp_rank * local_len)), first_position=n)
        while len(out) < n_tokens and out[-1] not in eos_token_ids:
            ctx.position = n + len(out) - 1  # the global position of the token being fed
            step = torch.tensor([[out[-1]]], device=device)
            hidden = decoder(input_ids=step, position_ids=torch.tensor([[ctx.position]], device=device),
                             use_cache=True, cache=cache, sp_context=ctx).last_hidden_state  # (1, 1, d)
            token[0] = head(hidden[:, -1]).argmax(dim=-1)[0]  # the same on every rank
            dist.broadcast(token, src=self.dims.sp_group_ranks()[0], group=self.group)
            out.append(int(token))
        return out


@dataclass
class CachedDecode:
    """``sp_context`` for one decoded token after a sharded prefill: attention over the distributed cache.

    Each rank's cache holds its prefill slice (``local_len`` keys, the first ``real_len`` real, the rest
    padding after the prompt) and then every decoded token; the decoded tokens count on rank 0 only.
    Positions are global: slice key i of rank r sits at r·local_len + i, decoded key j at
    first_position + j; a model's sliding window is honoured with them."""

    group: object
    rank: int
    local_len: int
    real_len: int
    first_position: int
    position: int = 0
    """Global position of the query token (set before every step)."""

    def _valid(self, total: int, window: int | None, device) -> torch.Tensor:
        """(total,) which cached keys this rank contributes."""
        idx = torch.arange(total, device=device)
        slice_key = idx < self.local_len
        valid = torch.where(slice_key, idx < self.real_len, torch.tensor(self.rank == 0, device=device))
        if window is not None:
            pos = torch.where(slice_key, self.rank * self.local_len + idx, self.first_position + idx - self.local_len)
            valid &= (self.position - pos) < window
        return valid

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int | None,
               backend: str, scale: float | None, module: torch.nn.Module | None = None,
               window: int | None = None, deterministic: bool = False) -> torch.Tensor:
        """q (B, H, 1, D), this rank's cache k/v (B, H_kv, T, D) -> (B, H, 1, Dv), the same on every rank.
        Same signature as the training cores (``S2HaloContext.attend``): ``window`` is the layer's sliding
        window as attention/hf.py passes it (None: looked up on the module/config); ``deterministic`` is
        moot here (no backward)."""
        from megalong.models.families import sliding_window_of

        if group_size is not None:
            raise ConfigError("cached decoding runs full attention; call use_full_attention(model) first")
        b, h, q_len, d = query.shape
        total = key.shape[2]
        if window is None:
            window = (getattr(module, "sliding_window", None) if hasattr(module, "sliding_window")
                      else sliding_window_of(getattr(module, "config", None)))
        lse, part = partial_attention(query, key, value, self._valid(total, window, key.device), scale)
        lses = [torch.empty_like(lse) for _ in range(dist.get_world_size(self.group))]
        parts = [torch.empty_like(part) for _ in lses]
        dist.all_gather(lses, lse.contiguous(), group=self.group)
        dist.all_gather(parts, part.contiguous(), group=self.group)
        out = combine_partials(lses, parts)  # (B, H_kv, G, 1, Dv)
        return out.reshape(b, h, q_len, -1).to(query.dtype)


def partial_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
                      scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (B, H, Q, D) over the ``valid`` (T,) keys of k/v (B, H_kv, T, D), fp32:
    (log-sum-exp (B, H_kv, G, Q), output (B, H_kv, G, Q, Dv)); -inf and 0 where no key is valid."""
    b, h, q_len, d = query.shape
    hkv = key.shape[1]
    qg = query.float().reshape(b, hkv, h // hkv, q_len, d)  # GQA without repeating K/V
    scores = torch.einsum("bkgqd,bktd->bkgqt", qg, key.float()) * (scale if scale is not None else d ** -0.5)
    scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return lse, torch.einsum("bkgqt,bktv->bkgqv", probs, value.float())


def combine_partials(lses: list[torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    """One softmax from per-rank partial ones: Σ_r e^(l_r - l) o_r with l = log Σ_r e^(l_r)."""
    lse_all = torch.stack(lses)  # (sp, ...)
    weights = torch.exp(lse_all - torch.logsumexp(lse_all, dim=0)).nan_to_num(0.0)
    return (weights[..., None] * torch.stack(parts)).sum(dim=0)


# ----------------------------------------------------------------------------------- start-up
def add_sp_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation tools' --sp, --sp-mode, --timeout-s (and the launcher's --local_rank, unused)."""
    p.add_argument("--sp", type=int, default=1,
                   help="sequence-parallel degree: split every sequence over SP ranks; start SP processes with "
                        "`deepspeed --num_gpus SP`")
    p.add_argument("--sp-mode", choices=list(SP_MODES), default="ulysses",
                   help="sequence-parallel attention, as parallel.sp_mode; ulysses (default) needs the attention "
                        "heads divisible by SP and the KV heads divisible by SP or SP by them; s2_halo has no head "
                        "rule, but for full attention the last rank holds every earlier key")
    p.add_argument("--timeout-s", type=int, default=300,
                   help="process-group timeout under --sp: a hung rank fails after this long")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def start_eval_parallel(sp: int, sp_mode: str = "s2_halo", *, env: Mapping[str, str], device: str | None = None,
                        timeout_s: int = 300, tool: str = "tools/eval_ppl.py"):
    """(SequenceParallelEval or None, rank, device) for an evaluation tool.

    Args:
        sp: sequence-parallel degree; must equal the number of launched processes.
        sp_mode: ``s2_halo`` or ``ulysses``.
        env: the process environment (a launcher sets WORLD_SIZE, RANK, LOCAL_RANK).
        device: an explicit device, else the accelerator's device for LOCAL_RANK (or the CPU).
        timeout_s: process-group timeout (a hung peer fails after this long).
        tool: the script, for messages.
    """
    from megalong.eval.loading import pick_device

    launched = "WORLD_SIZE" in env
    local_rank = int(env.get("LOCAL_RANK", 0))
    if sp < 1:
        raise ConfigError(f"--sp {sp} must be >= 1")
    if sp_mode not in SP_MODES:
        raise ConfigError(f"--sp-mode {sp_mode!r} is not one of {', '.join(SP_MODES)}")
    if not launched:
        if sp > 1:
            raise ConfigError(f"--sp {sp} needs {sp} processes; start them with the launcher: "
                              f"deepspeed --num_gpus {sp} {tool} ... --sp {sp}")
        return None, 0, pick_device(device)
    from deepspeed.accelerator import get_accelerator

    from megalong.parallel.dims import ParallelDims, init_distributed

    init_distributed(timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != sp:
        raise ConfigError(f"{world} processes were launched for --sp {sp}; evaluation runs one sequence-parallel "
                          f"group: launch with --num_gpus {sp}, or pass --sp {world}")
    dims = ParallelDims(world=world, sp=sp, rank=rank).build()
    if device is None:
        accel = get_accelerator()
        if accel.device_name() == "cpu":
            device = "cpu"
        else:
            accel.set_device(local_rank)
            device = f"{accel.device_name()}:{local_rank}"
    return (SequenceParallelEval(dims, sp_mode) if sp > 1 else None), rank, torch.device(device)


def finish_eval_parallel(barrier: bool = True) -> None:
    """Tear down the process group a launched evaluation started (no-op otherwise); ``barrier``: wait
    for every rank first (not after an error, when a peer may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()

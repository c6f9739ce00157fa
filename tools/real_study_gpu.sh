#!/usr/bin/env bash
# The real-model study at scale on ONE GPU, as one script (launch/configs/pilot/real_gpu.yaml):
# SmolLM2-135M-Instruct 8k -> 32k, four variants x 200 steps, PI/YaRN floors, every model scored by
# perplexity, the task suite and passkey (docs/BENCHMARKS.md, "A real model ... at scale").
#
#   tools/real_study_gpu.sh --dry-run   # any machine, no GPU needed: every distinct run's --dry-run (plan + checks)
#   tools/real_study_gpu.sh             # the GPU machine: the study (resumable: rerun to continue), then the tables
#
# What the machine needs: torch with CUDA, transformers 5.x, peft, and the base as a GGUF at the path
# real_gpu.yaml names (or BASE_MODEL=an HF directory). deepspeed, wonderwords and gguf are installed from
# WHEELS (default wheels/) when missing; build them where PyPI is reachable:
#   pip wheel --no-deps deepspeed==0.19.8 wonderwords==3.0.1 gguf==0.19.0 -w wheels/
# Sized by estimate (not yet measured) to ~8 minutes on an H200 with SDPA; timeout_s leaves room for a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
base=()
[ -n "${BASE_MODEL:-}" ] && base=(--base-model "$BASE_MODEL")

for pkg in deepspeed wonderwords gguf; do
  if ! $PY -c "import $pkg" 2>/dev/null; then
    $PY -m pip install -q --no-index --find-links "${WHEELS:-wheels}" "$pkg" || {
      echo "error: $pkg is missing and not in ${WHEELS:-wheels}/ (pip wheel --no-deps $pkg -w wheels/ where PyPI is reachable)" >&2
      exit 2; }
  fi
done

if [ "${1:-}" = "--dry-run" ]; then
  exec $PY tools/pilot.py run --scale real-gpu "${base[@]}" --dry-run \
      --dry-run-args --nodes 1 --gpus-per-node 1 --gpu-memory-gb "${GPU_MEMORY_GB:-139}"
fi
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here: use --dry-run')"
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
start=$(date +%s)
$PY tools/pilot.py run --scale real-gpu "${base[@]}" --results docs/benchmarks/real_gpu/results.json "$@"
echo "study wall time: $(( $(date +%s) - start )) s"
$PY tools/pilot.py render --results docs/benchmarks/real_gpu/results.json --section real-gpu

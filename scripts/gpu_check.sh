#!/usr/bin/env bash
# The GPU check of issue #14 (benchmarks/gpu_check.py): model-step speed and MFU at micro-batch 256
# and 1024, the real Trainer end to end, torch.compile, on whatever CUDA card this runs on.
#
#   OUT=/some/folder bash scripts/gpu_check.sh     # prints the JSON and writes $OUT/gpu_check.json as it goes
#   bash scripts/gpu_check.sh --cpu-smoke          # every section on the CPU with tiny shapes (about a minute)
#
# Without a CUDA device it prints one line and exits 0. It needs no install: cliptune is taken from
# src/ (the GPU machine runs a copy of the working tree) with $PYTHON, else .venv's Python when it
# has torch, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  py=.venv/bin/python
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# No hub; tokenizers' own threads would fight the DataLoader workers it is forked into.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_check.py "$@"

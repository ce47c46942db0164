#!/usr/bin/env bash
# One-GPU check of mmkit's strategies (DDP vs DeepSpeed ZeRO-2 vs FSDP2, bf16, open_clip ViT-B-32):
# samples/s and peak GPU memory, a few minutes in all; prints a table and writes its section of
# benchmarks/RESULTS.md (not with --smoke / --no-write).
#
#   timeout 900 bash benchmarks/gpu_check.sh            # from the repository root
#   bash benchmarks/gpu_check.sh --smoke                 # 3 steps per strategy, no RESULTS.md write
#   bash benchmarks/gpu_check.sh --strategies ddp deepspeed_stage_2 --batch 128
#
# Exits 3 at once, with a message, when no CUDA GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False); run this on a machine with one GPU" >&2
  exit 3
fi
exec "$PY" benchmarks/gpu_check.py "$@"

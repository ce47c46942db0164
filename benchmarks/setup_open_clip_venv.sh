#!/usr/bin/env bash
# Separate venv for open_clip's own trainer (open_clip_train): the [training] extra pins
# webdataset<=0.2.86, which must not leak into mmkit's venv. torch/torchvision are pinned to
# the versions in mmkit's venv so both trainers run the same kernels.
# Usage: bash benchmarks/setup_open_clip_venv.sh [VENV_DIR]   (default benchmarks/_work/oc_venv)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/_work/oc_venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 'open_clip_torch[training]'
"$venv/bin/python" -c "import torch, open_clip, open_clip_train; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"

#!/usr/bin/env bash
# Creates .venv with UnitedLLM and its test tools. Idempotent: re-running only tops up.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
# An old pip (23.x) ignores extras whose names it does not normalise the way setuptools writes them.
pip install -q --upgrade "pip>=24"
pip install -q -e ".[mqtt-s3,serve,platform,build,tracking,test,dev]"
# DeepSpeed (the deepspeed extra; client silos under its launcher, and the tests run ZeRO-2/3 on the CPU).
# Without build isolation pip builds it against the torch above instead of pulling a CUDA torch, and
# DS_BUILD_OPS=0 compiles no CUDA kernels (the CPU ops it needs are built on first use).
python -c "import deepspeed" 2>/dev/null || {
    pip install -q "setuptools>=68,<81" wheel
    DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed>=0.15"
}

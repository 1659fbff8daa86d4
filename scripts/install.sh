#!/usr/bin/env bash
# Installs UnitedLLM (editable) with its extras and DeepSpeed into the active virtualenv, pinned by
# constraints.txt, or at the newest versions pyproject.toml allows when UNITEDLLM_UNLOCKED=1
# (scripts/lock.sh, nox -s latest). Used by scripts/setup.sh; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
EXTRAS="mqtt-s3,serve,platform,build,tracking,test,dev"
if [ "${UNITEDLLM_UNLOCKED:-0}" = 1 ]; then
    PIN=(--upgrade --upgrade-strategy eager)
else
    PIN=(-c constraints.txt)
fi
# The CPU build of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
# An old pip (23.x) ignores extras whose names it does not normalise the way setuptools writes them.
pip install -q --upgrade "pip>=24"
pip install -q "${PIN[@]}" -e ".[$EXTRAS]"
# DeepSpeed (the deepspeed extra; client silos under its launcher, and the tests run ZeRO-2/3 on the CPU).
# Without build isolation pip builds it against the torch above instead of pulling a CUDA torch, and
# DS_BUILD_OPS=0 compiles no CUDA kernels (the CPU ops it needs are built on first use).
# The torch above is pinned for this step too: an eager upgrade would otherwise replace it.
python -c "import deepspeed" 2>/dev/null || {
    pip install -q "setuptools>=68,<81" wheel
    TORCH="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
    DS_BUILD_OPS=0 pip install -q --no-build-isolation "${PIN[@]}" "deepspeed>=0.15" "$TORCH"
}

#!/usr/bin/env bash
# Prepares a node before the entry point starts; `unitedllm package run` stops if this exits non-zero.
# Install extra dependencies here (e.g. pip install -r requirements.txt).
set -euo pipefail

python3 -c "import unitedllm" 2>/dev/null || python -c "import unitedllm" || {
    echo "bootstrap: the unitedllm package is not installed on this node (pip install unitedllm)" >&2
    exit 1
}
echo "bootstrap: ok (rank ${UNITEDLLM_RANK:-?}, run ${UNITEDLLM_RUN_ID:-?})"

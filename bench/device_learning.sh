#!/usr/bin/env bash
# The learning check of issue 18 on one H100 or H200, in under 10 minutes (about 6 on an H200):
# bench/learning_gpu.py, a pythia-160m-shaped model from scratch on Dolly-15k over 8 simulated
# clients (one category each): data-parallel vs FedAvg vs DiLoCo vs DiLoCo with momentum restart at
# equal examples, 10 rounds x 50 local steps (4,000 client steps per federated method), bytes moved.
#
#   DATA_DIR=/path/to/shared/data bash bench/device_learning.sh    # from the repository root
#
# DATA_DIR must hold dolly/databricks-dolly-15k.jsonl, pythia/tokenizer.json and
# pythia/pythia-160m/config.json (about 16 MB; default: ../shared/data). Needs only python3 with
# torch and transformers. Writes learning_gpu.json/.log to $OUT (else bench/out). Runs alone or
# after bench/device_check.sh, as a separate command (each command has 10 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
PYTHON="${PYTHON:-python3}"
DATA_DIR="${DATA_DIR:-../shared/data}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv >"$OUT/learning_environment.txt" 2>&1 || true
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 540 "$PYTHON" bench/learning_gpu.py --data-dir "$DATA_DIR" --out "$OUT/learning_gpu.json" 2>&1 \
    | tee "$OUT/learning_gpu.log"
exit "${PIPESTATUS[0]}"

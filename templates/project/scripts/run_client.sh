#!/usr/bin/env bash
# Runs client RANK (1..N) from source: bash scripts/run_client.sh RANK RUN_ID [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
RANK="${1:?usage: run_client.sh RANK RUN_ID}"
RUN_ID="${2:?usage: run_client.sh RANK RUN_ID}"
shift 2
python launch.py --cf config/fedml_config.yaml --rank "$RANK" --run_id "$RUN_ID" "$@"

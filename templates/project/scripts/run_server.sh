#!/usr/bin/env bash
# Runs the aggregator (rank 0) from source: bash scripts/run_server.sh RUN_ID [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_ID="${1:?usage: run_server.sh RUN_ID}"
shift
python launch.py --cf config/fedml_config.yaml --rank 0 --run_id "$RUN_ID" "$@"

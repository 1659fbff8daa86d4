#!/usr/bin/env bash
# Starts the aggregator (rank 0) of run RUN_ID: bash scripts/run_server.sh RUN_ID [extra unitedllm args]
# CONFIG is $UNITEDLLM_CONFIG or config/fedml_config.yaml; connection secrets come from the
# UNITEDLLM_* environment variables (see examples/mqtt_s3.yaml).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 RUN_ID [extra unitedllm server options]" >&2
    exit 2
fi
RUN_ID="$1"; shift
CONFIG="${UNITEDLLM_CONFIG:-config/fedml_config.yaml}"
UNITEDLLM="${UNITEDLLM:-unitedllm}"
exec "$UNITEDLLM" server "$CONFIG" --run-id "$RUN_ID" "$@"

#!/usr/bin/env bash
# Starts client RANK (1..client_num_in_total) of run RUN_ID: bash scripts/run_client.sh RANK RUN_ID [extra args]
# CONFIG is $UNITEDLLM_CONFIG or config/fedml_config.yaml; connection secrets come from the
# UNITEDLLM_* environment variables (see examples/mqtt_s3.yaml).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 RANK RUN_ID [extra unitedllm client options]" >&2
    exit 2
fi
RANK="$1"; RUN_ID="$2"; shift 2
case "$RANK" in
    ''|*[!0-9]*) echo "$0: RANK must be a positive integer, got '$RANK'" >&2; exit 2 ;;
esac
CONFIG="${UNITEDLLM_CONFIG:-config/fedml_config.yaml}"
UNITEDLLM="${UNITEDLLM:-unitedllm}"
exec "$UNITEDLLM" client "$CONFIG" --rank "$RANK" --run-id "$RUN_ID" "$@"

#!/usr/bin/env bash
# Runs the aggregator and every client in one process, offline (a quick check of the config).
set -euo pipefail
cd "$(dirname "$0")/.."
unitedllm run config/fedml_config.yaml --set comm_args.backend=LOCAL "$@"

#!/usr/bin/env bash
# Builds build/dist-packages/{server,client}-package.zip from this project (run from the project root).
set -euo pipefail
cd "$(dirname "$0")/.."

unitedllm-build -t server -sf . -ep launch.py -cf config -df build -ig "build,scripts"
unitedllm-build -t client -sf . -ep launch.py -cf config -df build -ig "build,scripts"

#!/usr/bin/env bash
# Creates .venv with UnitedLLM and its test tools, at the versions pinned in constraints.txt.
# Idempotent: re-running only tops up.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
bash scripts/install.sh

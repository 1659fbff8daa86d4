#!/usr/bin/env bash
# Refreshes constraints.txt: the exact versions of everything scripts/setup.sh installs, taken from a
# new virtualenv that installed the newest versions pyproject.toml allows. Then run the tests on it:
#   bash scripts/lock.sh && rm -rf .venv && bash scripts/test.sh     # green? commit constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
. "$work/venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
UNITEDLLM_UNLOCKED=1 bash scripts/install.sh
{
    echo "# The exact versions the test suite is green with; scripts/setup.sh installs with -c constraints.txt."
    echo "# Made by scripts/lock.sh (pip freeze of a fresh install at the newest allowed versions) on $(date -u +%F)."
    echo "# Users' 'pip install unitedllm' keeps pyproject.toml's ranges; 'nox -s latest' tests the newest ones."
    # A local build label (torch 2.13.0+cpu) is dropped: ==2.13.0 accepts the build with or without it.
    pip freeze --exclude-editable | sed -E 's/^([A-Za-z0-9_.-]+==[^+ ]+)[+][^ ]*$/\1/' | LC_ALL=C sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins); now: rm -rf .venv && bash scripts/test.sh"

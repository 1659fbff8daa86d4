#!/usr/bin/env bash
# Installs everything the tests need (venv, mosquitto, SeaweedFS) and runs the default test session.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian packages the tests use for real: the MQTT broker, a headless browser for the pages, PostgreSQL.
MISSING=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || MISSING+=(mosquitto)
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
# PostgreSQL's server binaries: the platform's tests run its controller on a real PostgreSQL too.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || MISSING+=(postgresql)
if [ ${#MISSING[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null
fi
# The tests start their own broker; the Debian service must not hold port 1883 open meanwhile.
if command -v systemctl >/dev/null 2>&1; then systemctl stop mosquitto >/dev/null 2>&1 || true; fi
# Sessions run in this environment (nox's venv backend "none"), so put .venv first on PATH.
. .venv/bin/activate
exec nox -s tests -- "$@"

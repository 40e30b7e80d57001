#!/usr/bin/env bash
# Install everything the tests need (Python dev dependencies into .venv, Etsy
# StatsD from npm into tests/upstream), then run lint, format check, mypy
# --strict and the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
# --ignore-scripts/--omit=optional: statsd's optional syslog module would build
# native code; the daemon does not need it.
npm ci --no-audit --no-fund --omit=optional --ignore-scripts --loglevel=error --prefix tests/upstream

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy" --strict src
# pytest exits 5 when it collects no test; set -e turns that into a failure too.
exec "$VENV/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Install everything the tests need (Python dev dependencies into .venv, the
# Node.js test parts into tests/node, promtool and zsh), then run lint, format
# check, mypy --strict over the package and the tests, and the whole pytest
# suite under coverage (the proxy's own processes included), failing below the
# floor. Then, where Python 3.12 and 3.13 exist, a smoke run on each (unit
# tests and one end-to-end forwarding test) in its own venv.
# Extra arguments go to pytest (and skip the coverage floor and the smoke runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TOOLS="$VENV/tools"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# The C accelerator is built from source on every install; a stale build left
# in the tree must never stand in for one that no longer compiles.
rm -f src/statsd_filter/_fastio*.so
if command -v cc >/dev/null && "$VENV/bin/python" -c \
    'import sys, sysconfig, pathlib; sys.exit(not pathlib.Path(sysconfig.get_paths()["include"], "Python.h").exists())'
then
    # A compiler and Python's headers are here: a build failure is an error.
    export STATSD_FILTER_REQUIRE_ACCELERATOR=1
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
# --ignore-scripts/--omit=optional: statsd's optional syslog module would build
# native code; the daemon does not need it.
npm ci --no-audit --no-fund --omit=optional --ignore-scripts --loglevel=error --prefix tests/node
# hot-shots sends Unix datagrams through unix-dgram, a native module: build that one
# package (install scripts stay off for the rest) against the installed Node's headers
# when they are there, so nothing is downloaded. Where a C++ compiler exists, a build
# failure fails the test command, as for the C accelerator; elsewhere the hot-shots
# Unix datagram test is skipped, saying why.
NODEDIR=()
[ -f /usr/include/node/node.h ] && NODEDIR=(--nodedir=/usr)
if command -v c++ >/dev/null && command -v make >/dev/null; then
    npm rebuild unix-dgram --loglevel=error --prefix tests/node "${NODEDIR[@]}"
else
    npm rebuild unix-dgram --loglevel=error --prefix tests/node "${NODEDIR[@]}" ||
        echo "warning: unix-dgram not built (no C++ toolchain): hot-shots' uds test will skip" >&2
fi
# The status page test loads the admin page in headless Chromium (Debian's
# package). Installed only when missing and apt-get can (root); otherwise that
# test fails saying chromium is missing.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation; } >/dev/null \
        || echo "scripts/test.sh: could not install chromium" >&2
fi

# promtool (the /metrics lint test) is only in Debian's prometheus package; take
# the one binary out of it rather than install a Prometheus server.
if ! command -v promtool >/dev/null && [ ! -x "$TOOLS/usr/bin/promtool" ] && command -v apt-get >/dev/null; then
    mkdir -p "$TOOLS/deb"
    ( cd "$TOOLS/deb" && { apt-get download -qq prometheus 2>/dev/null \
        || { apt-get update -qq && apt-get download -qq prometheus; }; } )
    dpkg-deb --fsys-tarfile "$TOOLS"/deb/prometheus_*.deb | tar -x -C "$TOOLS" ./usr/bin/promtool
    rm -rf "$TOOLS/deb"
fi
# zsh: the completion script's syntax and registration test.
if ! command -v zsh >/dev/null && command -v apt-get >/dev/null; then
    apt-get install -y -qq zsh >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq zsh >/dev/null; }
fi

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy" --strict src tests
"$VENV/bin/coverage" erase
# pytest exits 5 when it collects no test; set -e turns that into a failure too.
"$VENV/bin/coverage" run -m pytest "$@"
"$VENV/bin/coverage" combine --quiet
if [ "$#" -eq 0 ]; then
    # 91% when the floor was set; timing-dependent paths (reconnects, races on
    # shutdown) move it by a point or two between runs.
    "$VENV/bin/coverage" report --fail-under=85
else
    "$VENV/bin/coverage" report | tail -1
    exit 0
fi

# The other supported Pythons: the unit tests and one end-to-end forwarding
# test, each in its own venv (.venv312, .venv313), where the interpreter exists
# (PYTHON3_12 / PYTHON3_13 name one; otherwise PATH, then pyenv is asked).
find_python() {
    local version="$1" candidate
    for candidate in "$2" "$(command -v "python$version" 2>/dev/null)" \
        "$(pyenv prefix "$version" 2>/dev/null | head -1)/bin/python$version" \
        "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version" 2>/dev/null | tail -1)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c \
            "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$version'.split('.'))))" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
SMOKE_TESTS=(tests/unit "tests/integration/test_forwarding.py::test_udp_multiline_datagrams_filtered_per_line")
for version in 3.12 3.13; do
    var="PYTHON${version/./_}"
    interpreter="$(find_python "$version" "${!var:-}")" || {
        echo "Python $version not found: smoke run skipped"
        continue
    }
    venv=".venv${version/./}"
    [ -x "$venv/bin/python" ] || "$interpreter" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "Python $version smoke run ($interpreter)"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${SMOKE_TESTS[@]}"
done

"""What an operator reads: /metrics that promtool accepts, the fast paths in use, JSON logs."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from statsd_filter import fastio
from statsd_filter.rules import multiprefix
from tests.integration.etsy import pick_free_port
from tests.integration.harness import LOCALHOST, Proxy, Sink, clean_env, http_get, wait_until

RULES = """
[[rules]]
name = "drop-debug"
match = { prefix = "debug." }
action = "drop"

[[rules]]
name = "sample-hot"
match = { name = "hot", type = "c" }
action = "sample"
keep_one_in = 2
"""


def promtool() -> str:
    """promtool on PATH, or the one scripts/test.sh unpacked into the venv."""
    found = shutil.which("promtool")
    local = Path(sys.prefix) / "tools" / "usr" / "bin" / "promtool"
    if found is None and local.exists():
        found = str(local)
    assert found, "promtool missing: scripts/test.sh unpacks it from Debian's prometheus"
    return found


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


def test_promtool_rejects_what_it_should() -> None:
    """The promtool used here does lint: a gauge named _total and a counter without it fail."""
    bad = (
        "# HELP x_bytes_total Waiting.\n# TYPE x_bytes_total gauge\nx_bytes_total 1\n"
        "# HELP x_drops Drops.\n# TYPE x_drops counter\nx_drops 1\n"
    )
    result = promtool_check(bad)
    assert result.returncode != 0
    assert 'non-counter metrics should not have "_total" suffix' in result.stdout + result.stderr


def test_metrics_pass_promtool_check(tmp_path: Path, sink: Sink) -> None:
    """The real /metrics, with rules and two upstreams, passes `promtool check metrics` with
    nothing to say; the renamed series are there and the old names are gone."""
    config = tmp_path / "rules.toml"
    config.write_text(RULES)
    with Sink("udp") as other:
        targets = ("--target", f"127.0.0.1:{sink.port}", "--target", f"127.0.0.1:{other.port}")
        with Proxy("--config", str(config), *targets) as proxy:
            proxy.udp(b"debug.x:1|c\nhot:1|c\nhot:1|c\nkept:1|c")
            proxy.wait_settled()
            _, body = proxy.get("/metrics")
    result = promtool_check(body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
    assert "# TYPE statsd_filter_udp_kernel_drops_total counter" in body
    assert "# TYPE statsd_filter_buffered_bytes gauge" in body
    assert "statsd_filter_upstream_buffered_bytes_total" not in body
    assert "statsd_filter_udp_kernel_drops " not in body


def _fallback(*argv: str) -> list[str]:
    """The command line of the real CLI in an interpreter that cannot import the C
    accelerator or Hyperscan (as on a host without a compiler or the hyperscan wheel)."""
    code = (
        "import sys; sys.modules['statsd_filter._fastio'] = None; sys.modules['hyperscan'] = None;"
        "from statsd_filter.cli import main; raise SystemExit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *argv]


def test_version_names_the_fast_paths() -> None:
    """--version says whether the C accelerator and Hyperscan are in use, with or without them."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "statsd-filter"), "--version"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("statsd-filter 0.")
    expected = "accelerator: c " if fastio.ACCELERATED else "accelerator: python "
    assert lines[1].startswith(expected)
    assert lines[2].startswith("hyperscan: yes" if multiprefix.AVAILABLE else "hyperscan: no")
    assert lines[3].startswith("python: 3.")
    if shutil.which("cc"):
        assert fastio.ACCELERATED  # scripts/test.sh requires the build where a compiler is
    slow = subprocess.run(
        _fallback("--version"), capture_output=True, text=True, env=clean_env(), timeout=30
    )
    assert slow.returncode == 0, slow.stderr
    assert slow.stdout.splitlines()[1].startswith("accelerator: python (slow path")
    assert slow.stdout.splitlines()[2].startswith("hyperscan: no")


def test_build_in_log_healthz_and_metrics(sink: Sink) -> None:
    """The start-up line, /healthz `build` and statsd_filter_build_info report the fast paths."""
    with Proxy("--target-port", str(sink.port)) as proxy:
        health = proxy.healthz()
        _, body = proxy.get("/metrics")
        output = proxy.output()
    accelerator = "c" if fastio.ACCELERATED else "python"
    hyperscan = "yes" if multiprefix.AVAILABLE else "no"
    assert f"; accelerator: {accelerator}, hyperscan: {hyperscan}" in output
    build = health["build"]
    assert build["accelerator"] == accelerator
    assert build["hyperscan"] is multiprefix.AVAILABLE
    assert build["version"] == health["version"]
    info = next(line for line in body.splitlines() if line.startswith("statsd_filter_build_info{"))
    assert f'accelerator="{accelerator}"' in info
    assert f'hyperscan="{hyperscan}"' in info
    assert info.endswith(" 1.0")


def test_slow_path_is_reported_by_the_running_proxy(sink: Sink) -> None:
    """A proxy without the C accelerator warns at start and says so in /healthz and /metrics."""
    port, admin = pick_free_port(), pick_free_port(udp=False)
    args = ("run", "--listen-port", str(port), "--admin-port", str(admin), "--workers", "1")
    proc = subprocess.Popen(
        _fallback(*args, "--target-port", str(sink.port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
        text=True,
    )
    try:
        health = wait_until(lambda: _running_healthz(admin), timeout=20)
        assert health, "the proxy did not start"
        assert health["build"]["accelerator"] == "python"
        assert health["build"]["hyperscan"] is False
        _, body = http_get(admin, "/metrics")
        assert 'accelerator="python"' in body
        assert 'hyperscan="no"' in body
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"slow:1|c", (LOCALHOST, port))
        assert sink.wait_for_lines(1) == [b"slow:1|c"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "WARNING supervisor: accelerator: python (slow path" in err
    assert "accelerator: python, hyperscan: no" in err


def _running_healthz(admin_port: int) -> dict[str, Any] | None:
    """/healthz once every worker runs (None before, or while nothing listens)."""
    try:
        _, body = http_get(admin_port, "/healthz")
    except OSError:
        return None
    health: dict[str, Any] = json.loads(body)
    return health if all(w["state"] == "running" for w in health["workers"]) else None


def test_json_logs_one_object_per_line(sink: Sink) -> None:
    """--log-format json: every line the supervisor and workers write is one JSON object
    with time, level, process, message and fields; the first and last lines carry data."""
    args = ("--target-port", str(sink.port), "--log-format", "json", "--log-level", "debug")
    with Proxy(*args) as proxy:
        proxy.udp(b"json.ok:1|c")
        sink.wait_for_lines(1)
        proxy.wait_settled()
        assert wait_until(lambda: "forwarded 'json.ok:1|c'" in proxy.output())
        status = proxy.stop()
    assert status == 0
    records = [json.loads(line) for line in proxy.output().splitlines()]
    assert records
    for record in records:
        assert set(record) == {"time", "level", "process", "message", "fields"}
        assert record["time"].endswith("Z")
        assert time.strptime(record["time"][:19], "%Y-%m-%dT%H:%M:%S")
        assert record["level"] in ("debug", "info", "warning", "error")
        assert isinstance(record["fields"]["pid"], int)
    start = next(r for r in records if "listening on" in r["message"])
    assert start["process"] == "supervisor"
    assert start["fields"]["listen"]["port"] == proxy.port
    assert start["fields"]["build"]["accelerator"] in ("c", "python")
    assert start["fields"]["upstreams"] == [
        {"address": f"localhost:{sink.port}", "protocol": "udp"}
    ]
    forwarded = next(r for r in records if r["message"] == "forwarded 'json.ok:1|c'")
    assert forwarded["process"].startswith("worker ")
    assert forwarded["level"] == "debug"
    last = records[-1]
    assert last["message"].startswith("stopped: ")
    assert last["fields"]["received"] == 1
    assert last["fields"]["forwarded"] == 1
    assert last["fields"]["exit_status"] == 0

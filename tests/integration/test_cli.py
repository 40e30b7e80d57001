"""The command line as a user meets it: flags, env, TOML, errors, tap, admin endpoint."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.integration.etsy import pick_free_port
from tests.integration.harness import BIN, LOCALHOST, Proxy, Sink, clean_env, wait_until


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, env=clean_env(env), timeout=30
    )


def test_version_and_help() -> None:
    """--version prints the version; --help lists the subcommands."""
    version = _run("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("statsd-filter 0.")
    helped = _run("--help")
    assert helped.returncode == 0
    for command in ("run", "check-config", "tap"):
        assert command in helped.stdout
    run_help = _run("run", "--help")
    assert "--target-port" in run_help.stdout
    assert "STATSD_FILTER_TARGET_PORT" in run_help.stdout


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (
            ["--target-port", "70000"],
            {},
            "invalid target_port from command-line flag --target-port",
        ),
        ([], {"STATSD_FILTER_WORKERS": "-1"}, "environment variable STATSD_FILTER_WORKERS"),
        ([], {"num_threads": "zero"}, "invalid workers from environment variable num_threads"),
        ([], {"target_port": "0"}, "invalid target_port from environment variable target_port"),
        (["--protocols", "udp,sctp"], {}, "'sctp' is not one of udp, tcp"),
        (["--config", "/nonexistent/statsd-filter.toml"], {}, "cannot read config file"),
    ],
)
def test_bad_values_exit_2_with_one_clear_message(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    """A bad setting exits 2 with one message naming the setting and its source."""
    for command in ("run", "check-config"):
        result = _run(command, *args, env=env)
        assert result.returncode == 2, result
        assert needle in result.stderr
        assert result.stderr.startswith("statsd-filter: error: ")
        assert result.stderr.count("\n") == 1


def test_unknown_toml_key_names_key_and_file(tmp_path: Path) -> None:
    """An unknown key in the TOML file is rejected with the key and the file's path."""
    config = tmp_path / "proxy.toml"
    config.write_text('target_port = 9000\nblock_list = ["a."]\n')
    result = _run("run", "--config", str(config))
    assert result.returncode == 2
    assert f"unknown setting 'block_list' in config file {config}" in result.stderr


def test_layers_toml_env_cli(tmp_path: Path) -> None:
    """check-config shows defaults < TOML < env < CLI, each value with its source."""
    config = tmp_path / "proxy.toml"
    config.write_text(
        'target_port = 9000\nworkers = 3\nblocklist = ["a.", "b."]\nmax_udp_size = 512\n'
    )
    env = {"STATSD_FILTER_WORKERS": "4", "target_host": "statsd.local", "num_threads": "6"}
    result = _run("check-config", "--config", str(config), "--max-udp-size", "1000", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"target_port = 9000  # config file {config}" in out
    assert "workers = 4  # environment variable STATSD_FILTER_WORKERS" in out
    assert 'target_host = "statsd.local"  # environment variable target_host' in out
    assert 'blocklist = ["a.", "b."]' in out
    assert "max_udp_size = 1000  # command-line flag --max-udp-size" in out
    assert "listen_port = 8125  # default" in out


def test_original_env_variables_drive_the_real_proxy(sink: Sink) -> None:
    """listen_port, target_host, target_port, blocklist, num_threads work as in the original."""
    port = pick_free_port()
    env = {
        "listen_port": str(port),
        "target_host": LOCALHOST,
        "target_port": str(sink.port),
        "blocklist": "legacy.,old.",
        "num_threads": "3",
    }
    admin = pick_free_port(udp=False)
    proc = subprocess.Popen(
        [str(BIN), "run", "--admin-port", str(admin)],
        env=clean_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://{LOCALHOST}:{admin}/healthz"

        def workers() -> int:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body: bytes = resp.read()
                    return body.count(b'"state": "running"')
            except OSError:
                return 0

        assert wait_until(lambda: workers() == 3, timeout=15)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"legacy.x:1|c\nnew.y:1|c\nold.z:1|c", (LOCALHOST, port))
        assert sink.wait_for_lines(1) == [b"new.y:1|c"]
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


def test_port_in_use_fails_fast_with_clear_message() -> None:
    """A listen port already taken exits 1 naming the address, before forking workers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOCALHOST, 0))
        port = taken.getsockname()[1]
        result = _run("run", "--listen-port", str(port), "--no-admin", "--workers", "1")
    assert result.returncode == 1
    assert f"cannot listen on udp 127.0.0.1:{port}: Address already in use" in result.stderr


def test_tap_prints_what_the_proxy_forwards() -> None:
    """`statsd-filter tap` prints every line it receives (UDP and TCP)."""
    tap_port = pick_free_port()
    tap = subprocess.Popen(
        [str(BIN), "tap", "--port", str(tap_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert tap.stderr is not None
        assert b"tap listening" in tap.stderr.readline()
        with Proxy("--target-port", str(tap_port), "--blocklist", "hidden.") as proxy:
            proxy.udp(b"shown.one:1|c\nhidden.x:1|c")
            with socket.create_connection((LOCALHOST, tap_port)) as direct:
                direct.sendall(b"direct.tcp:2|g\n")
            assert tap.stdout is not None
            fd = tap.stdout.fileno()
            printed = b""
            for _ in range(50):  # bounded in count and time (10 s per read)
                if printed.count(b"\n") >= 2:
                    break
                ready, _, _ = select.select([fd], [], [], 10)
                assert ready, f"tap printed only {printed!r}"
                printed += os.read(fd, 4096)
            got = set(printed.decode().split())
    finally:
        tap.terminate()
        tap.communicate(timeout=10)  # reaps it and closes its pipes
    assert got == {"shown.one:1|c", "direct.tcp:2|g"}


def test_metrics_and_healthz_shape(sink: Sink) -> None:
    """/metrics is Prometheus text with the promised series; /healthz lists each worker."""
    with Proxy("--target-port", str(sink.port), workers=3) as proxy:
        health = proxy.healthz()
        with urllib.request.urlopen(
            f"http://{LOCALHOST}:{proxy.admin_port}/metrics", timeout=2
        ) as r:
            content_type = r.headers["Content-Type"]
            body = r.read().decode()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{LOCALHOST}:{proxy.admin_port}/nope", timeout=2)
        missing.value.close()
    assert health["http_status"] == 200
    assert health["status"] == "ok"
    assert [w["state"] for w in health["workers"]] == ["running"] * 3
    assert all(isinstance(w["pid"], int) for w in health["workers"])
    assert health["upstream"] == {
        "address": f"localhost:{sink.port}",
        "protocol": "udp",
        "mode": "single",
        "state": "up",
    }
    assert [u["state"] for u in health["upstreams"]] == ["up"]
    assert content_type.startswith("text/plain; version=0.0.4")
    for series in (
        "statsd_filter_lines_received_total ",
        "statsd_filter_lines_forwarded_total ",
        "statsd_filter_lines_blocked_total ",
        'statsd_filter_lines_dropped_total{reason="oversize"} ',
        'statsd_filter_lines_dropped_total{reason="upstream"} ',
        'statsd_filter_lines_dropped_total{reason="queue_full"} ',
        "statsd_filter_datagrams_received_total ",
        "statsd_filter_bytes_sent_total ",
        "statsd_filter_tcp_connections_open ",
        "statsd_filter_upstream_errors_total ",
        "# TYPE statsd_filter_lines_received_total counter",
    ):
        assert series in body
    assert missing.value.code == 404


def test_admin_can_be_disabled(sink: Sink) -> None:
    """--no-admin opens no HTTP port; the proxy still forwards."""
    port = pick_free_port()
    admin = pick_free_port(udp=False)
    proc = subprocess.Popen(
        [
            str(BIN),
            "run",
            "--listen-port",
            str(port),
            "--target-port",
            str(sink.port),
            "--no-admin",
            "--admin-port",
            str(admin),
            "--workers",
            "1",
        ],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def forwarded() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"ping:1|c", (LOCALHOST, port))
            return bool(sink.wait_for_lines(1, timeout=0.2))

        assert wait_until(forwarded, timeout=15)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            with pytest.raises(OSError):
                probe.connect((LOCALHOST, admin))
    finally:
        proc.terminate()
        assert proc.wait(15) == 0

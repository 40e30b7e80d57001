"""Running under systemd: the unit file as systemd reads it, and sd_notify on a real socket."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import BIN, ROOT, Proxy, Sink, clean_env, wait_until

UNIT = ROOT / "contrib" / "systemd" / "statsd-filter.service"
INSTALLED_BIN = "/opt/statsd-filter/bin/statsd-filter"


class NotifySocket:
    """A datagram socket standing in for systemd's: collects every notification."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        """Read what arrived; returns every message so far, each as {KEY: value}."""
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def wait_for(self, key: str, value: str | None = None, after: int = 0) -> int:
        """Index of the first message from ``after`` on with ``key`` (= ``value``)."""

        def find() -> int | None:
            for i, message in enumerate(self.poll()[after:], after):
                if key in message and (value is None or message[key] == value):
                    return i
            return None

        index = wait_until(lambda: find() is not None, timeout=15) and find()
        assert index is not None, f"no {key} after #{after}: {self.messages}"
        return index

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[NotifySocket, str]]:
    path = tmp_path / "notify.sock"
    sock = NotifySocket(str(path))
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_notify_ready_reload_status_watchdog_stopping(
    tmp_path: Path, sink: Sink, notify: tuple[NotifySocket, str]
) -> None:
    """READY=1 only once every worker runs; RELOADING=1 (with MONOTONIC_USEC) then READY=1
    around a good and a rejected SIGHUP reload; STATUS lines with the forwarding rate;
    WATCHDOG=1 at half of WATCHDOG_USEC; STOPPING=1 on SIGTERM."""
    sock, path = notify
    config = tmp_path / "big.toml"
    # Thousands of prefixes take the workers a moment to compile: a READY=1 sent
    # before they run would be seen while /healthz still says "starting".
    prefixes = ", ".join(f'"p{i}.x."' for i in range(5000))
    config.write_text(f"blocklist = [{prefixes}]\n")
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    args = ("--config", str(config), "--target-port", str(sink.port))
    with Proxy(*args, env=env, wait=False) as proxy:
        ready = sock.wait_for("READY", "1")
        health = proxy.healthz()
        assert [w["state"] for w in health["workers"]] == ["running", "running"]
        assert "workers 2/2 running" in sock.messages[ready]["STATUS"]
        start = time.monotonic()
        proxy.udp(b"p1.x.blocked:1|c\nkept:1|c")
        sink.wait_for_lines(1)
        status = sock.wait_for("STATUS", after=ready + 1)
        while "forwarding:" not in sock.messages[status].get("STATUS", ""):
            status = sock.wait_for("STATUS", after=status + 1)
        assert re.search(r"forwarding: \d+ lines/s", sock.messages[status]["STATUS"])

        # A good reload: RELOADING=1 with a monotonic timestamp, then READY=1 once applied.
        config.write_text('blocklist = ["other."]\n')
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proxy.proc.send_signal(signal.SIGHUP)
        reloading = sock.wait_for("RELOADING", "1", after=status + 1)
        usec = int(sock.messages[reloading]["MONOTONIC_USEC"])
        assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        done = sock.wait_for("READY", "1", after=reloading + 1)
        assert "config generation 1 applied" in sock.messages[done]["STATUS"]
        assert proxy.healthz()["config"]["generation"] == 1

        # A rejected reload still ends with READY=1, and says why.
        config.write_text("blocklist = 3\n")
        proxy.proc.send_signal(signal.SIGHUP)
        reloading = sock.wait_for("RELOADING", "1", after=done + 1)
        rejected = sock.wait_for("READY", "1", after=reloading + 1)
        assert "config reload rejected" in sock.messages[rejected]["STATUS"]

        pings = sum(1 for m in sock.poll() if m.get("WATCHDOG") == "1")
        elapsed = time.monotonic() - start
        # Every 0.1 s; at least a third of them, however busy the machine is.
        assert pings >= max(3, int(elapsed / 0.1 / 3)), (pings, elapsed)
        assert proxy.stop() == 0
    stopping = sock.wait_for("STOPPING", "1", after=rejected + 1)
    assert "SIGTERM" in sock.messages[stopping]["STATUS"]
    assert not [m for m in sock.messages[stopping:] if m.get("READY") == "1"]


def test_notify_abstract_socket_and_foreign_watchdog(sink: Sink) -> None:
    """NOTIFY_SOCKET=@name reaches an abstract-namespace socket; a WATCHDOG_PID naming
    another process means no WATCHDOG=1 pings from this one."""
    name = f"statsd-filter-test-{uuid.uuid4().hex}"
    sock = NotifySocket(b"\0" + name.encode())
    try:
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
        with Proxy("--target-port", str(sink.port), env=env) as proxy:
            sock.wait_for("READY", "1")
            time.sleep(0.5)  # five would-be ping intervals
            assert not [m for m in sock.poll() if "WATCHDOG" in m]
            proxy.stop()
        sock.wait_for("STOPPING", "1")
    finally:
        sock.close()


def test_no_notify_socket_means_no_notifications(sink: Sink) -> None:
    """Without NOTIFY_SOCKET nothing is sent, and the start-up line says so in JSON."""
    with Proxy("--target-port", str(sink.port), "--log-format", "json") as proxy:
        proxy.stop()
    assert '"systemd_notify": false' in proxy.output()


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's statsd-filter (verify checks the
    binary exists), so systemd's checks run on everything else as shipped."""
    text = UNIT.read_text()
    assert INSTALLED_BIN in text
    unit = tmp_path / "statsd-filter.service"
    unit.write_text(text.replace(INSTALLED_BIN, str(BIN)))
    return unit


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze missing: apt-get install systemd"
    return found


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single warning (systemd warns,
    and still exits 0, about a misspelt value: any output fails the test)."""
    unit = _unit_for_this_machine(tmp_path)
    result = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    # The check itself catches a bad value (so a clean run above means something).
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHome=bogus"))
    bad = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "protect home value" in bad.stderr


def test_unit_file_is_hardened_and_runs_the_real_cli(tmp_path: Path) -> None:
    """The unit: Type=notify, its own user, restart on failure, SIGHUP reload, no
    capabilities, only the address families used, a low `systemd-analyze security`
    exposure; and its ExecStart arguments are valid statsd-filter flags."""
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify"
    assert settings["DynamicUser"] == "yes" or settings.get("User") not in (None, "root")
    assert settings["Restart"] == "on-failure"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["CapabilityBoundingSet"] == ""
    assert settings["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert settings[key] == "yes", key
    assert settings["ProtectSystem"] == "strict"
    assert "WatchdogSec" in settings
    unit = _unit_for_this_machine(tmp_path)
    security = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", "--threshold=30", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Exposure is scored 0-10 (the threshold in tenths): 2.8 when written; above 3.0 fails.
    assert security.returncode == 0, security.stdout + security.stderr
    exec_start = shlex.split(settings["ExecStart"])
    assert exec_start[0] == INSTALLED_BIN
    argv = exec_start[1:]
    config_at = argv.index("--config") + 1
    argv[config_at] = str(ROOT / "examples" / "statsd-filter.toml")
    argv[0] = "check-config"
    checked = subprocess.run(
        [str(BIN), *argv],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_notify_socket_gone_does_not_stop_the_proxy(tmp_path: Path, sink: Sink) -> None:
    """A NOTIFY_SOCKET nobody listens on is logged once; the proxy serves regardless."""
    missing = tmp_path / "nobody.sock"
    with Proxy(
        "--target-port", str(sink.port), env={"NOTIFY_SOCKET": str(missing)}, wait=True
    ) as proxy:
        proxy.udp(b"still:1|c")
        assert sink.wait_for_lines(1) == [b"still:1|c"]
        assert proxy.stop() == 0
    assert proxy.output().count("cannot notify systemd") == 1
    assert os.fspath(missing) in proxy.output()

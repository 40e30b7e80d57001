"""Unit tests for statsd_filter.supervisor.notify: sd_notify messages on a real socket."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from statsd_filter.supervisor.notify import Notifier


def receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_messages_are_newline_separated_assignments(tmp_path: Path) -> None:
    """Each call is one datagram of KEY=value lines; a newline inside STATUS is flattened."""
    path = str(tmp_path / "n.sock")
    with receiver(path) as sock:
        notifier = Notifier(path)
        try:
            assert notifier.enabled
            assert notifier.ready("up\nand running")
            assert sock.recv(4096) == b"READY=1\nSTATUS=up and running"
            assert notifier.stopping("bye")
            assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"
            assert notifier.status("s")
            assert sock.recv(4096) == b"STATUS=s"
            assert notifier.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1"
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert notifier.reloading("again")
            lines = sock.recv(4096).decode().split("\n")
            assert lines[0] == "RELOADING=1"
            assert lines[2] == "STATUS=again"
            key, usec = lines[1].split("=")
            assert key == "MONOTONIC_USEC"
            assert before <= int(usec) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        finally:
            notifier.close()


def test_abstract_namespace_address() -> None:
    """'@name' is sent to the abstract socket "\\0name"."""
    name = f"statsd-filter-unit-{uuid.uuid4().hex}"
    with receiver(b"\0" + name.encode()) as sock:
        notifier = Notifier("@" + name)
        try:
            assert notifier.ready("ok")
            assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
        finally:
            notifier.close()


def test_without_socket_nothing_is_sent() -> None:
    """No NOTIFY_SOCKET: disabled, every call returns False, no watchdog interval."""
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    notifier.close()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_ours(
    tmp_path: Path, env: dict[str, str], interval: float | None
) -> None:
    """Pings every WATCHDOG_USEC/2, only when WATCHDOG_PID is unset or this process."""
    env = {k: str(os.getpid()) if v == "self" else v for k, v in env.items()}
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "n.sock"), **env})
    try:
        assert notifier.watchdog_interval == interval
    finally:
        notifier.close()


def test_unreachable_socket_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sending to a socket nobody listens on fails quietly: False, one warning in all."""
    notifier = Notifier(str(tmp_path / "gone.sock"), log=logging.getLogger("test.notify"))
    try:
        with caplog.at_level(logging.WARNING, logger="test.notify"):
            assert not notifier.ready("x")
            assert not notifier.watchdog()
        warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
        assert len(warnings) == 1
        assert "gone.sock" in warnings[0].getMessage()
    finally:
        notifier.close()

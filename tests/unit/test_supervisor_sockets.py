"""Binding the listeners: every address of listen_host, one port for all, clear failures."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from statsd_filter.config import load_settings
from statsd_filter.supervisor import sockets as sockets_module
from statsd_filter.supervisor.sockets import StartupError, open_listen_sockets

LOG = logging.getLogger("test.sockets")


def _addresses(listen: sockets_module.ListenSockets) -> set[tuple[str, str]]:
    kinds = {socket.SOCK_DGRAM: "udp", socket.SOCK_STREAM: "tcp"}
    return {(kinds[s.type], s.getsockname()[0]) for s in (*listen.udp, *listen.tcp)}


def test_a_name_with_two_addresses_is_listened_on_at_both(monkeypatch: Any) -> None:
    """'localhost' resolving to 127.0.0.1 and ::1 gives UDP and TCP on both, one port."""
    real = socket.getaddrinfo

    def both(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":
            return real("127.0.0.1", port, *args, **kwargs) + real("::1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", both)  # the module sockets.py uses
    settings = load_settings({"listen_host": "localhost", "listen_port": 0}, env={})
    listen = open_listen_sockets(settings, LOG)
    try:
        assert _addresses(listen) == {
            ("udp", "127.0.0.1"),
            ("udp", "::1"),
            ("tcp", "127.0.0.1"),
            ("tcp", "::1"),
        }
        assert {s.getsockname()[1] for s in (*listen.udp, *listen.tcp)} == {listen.port}
        opened = listen.open_tcp()
        try:
            assert sorted(s.getsockname()[0] for s in opened) == ["127.0.0.1", "::1"]
        finally:
            for sock in opened:
                sock.close()
    finally:
        listen.close()


def test_an_address_this_host_lacks_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """An address not configured here (TEST-NET) is skipped with a warning, not fatal."""
    settings = load_settings({"listen_host": "127.0.0.1,192.0.2.1", "listen_port": 0}, env={})
    with caplog.at_level(logging.WARNING):
        listen = open_listen_sockets(settings, LOG)
    try:
        assert _addresses(listen) == {("udp", "127.0.0.1"), ("tcp", "127.0.0.1")}
        assert "192.0.2.1 is not available here; skipped" in caplog.text
    finally:
        listen.close()


def test_no_usable_address_is_a_startup_error() -> None:
    """When no address of listen_host exists here, start-up fails with a clear message."""
    settings = load_settings({"listen_host": "192.0.2.1", "listen_port": 0}, env={})
    with pytest.raises(StartupError, match="no usable address"):
        open_listen_sockets(settings, LOG)


def test_a_port_in_use_names_protocol_and_address() -> None:
    """A clash on any address fails start-up naming the protocol and the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        settings = load_settings({"listen_host": "127.0.0.1", "listen_port": port}, env={})
        with pytest.raises(StartupError, match=f"cannot listen on udp 127.0.0.1:{port}"):
            open_listen_sockets(settings, LOG)

"""recv_many/send_many: many datagrams per call, same semantics as socket.recv/send."""

from __future__ import annotations

import shutil
import socket
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from statsd_filter import fastio


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    sender.setblocking(False)
    yield receiver, sender
    receiver.close()
    sender.close()


def _settle() -> None:
    time.sleep(0.05)  # loopback delivery is immediate; this only bounds scheduling


def test_accelerator_is_built_where_it_can_be() -> None:
    """With a C compiler and Python's headers present, the install built the accelerator."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    can_build = sys.platform.startswith("linux") and headers.exists() and shutil.which("cc")
    if not can_build:
        pytest.skip("no C compiler or Python headers: the pure-Python fallback is in use")
    assert fastio.ACCELERATED


@pytest.mark.parametrize("impl", ["native", "python"])
def test_round_trip_keeps_every_datagram_whole(
    pair: tuple[socket.socket, socket.socket], impl: str
) -> None:
    """Datagrams (empty and 65,000-byte ones included) arrive whole, in order, none merged."""
    receiver, sender = pair
    send = fastio.send_many if impl == "native" else fastio._send_many_py
    recv = fastio.recv_many if impl == "native" else fastio._recv_many_py
    payloads = [b"a:1|c", b"", b"b" * 65000, *(b"m.%d:1|c" % i for i in range(100))]
    sent = 0
    while sent < len(payloads):
        sent += send(sender, payloads[sent:])
    _settle()
    got: list[bytes] = []
    for _ in range(10):
        batch = recv(receiver, 64)
        if not batch:
            break
        got += batch
    assert got == payloads
    assert recv(receiver, 64) == []


def test_refusal_surfaces_as_connection_refused() -> None:
    """A closed port's ICMP refusal is raised as ConnectionRefusedError, like socket.send."""
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.connect(address)
        sender.setblocking(False)
        fastio.send_many(sender, [b"x:1|c"])
        _settle()
        with pytest.raises(ConnectionRefusedError):
            fastio.send_many(sender, [b"y:1|c"])

"""Many datagrams per system call, with a pure-Python fallback.

``recv_many(sock, count, size)`` returns up to ``count`` datagrams waiting on a
non-blocking datagram socket (an empty list when none), each cut at ``size``
bytes (a caller that must detect longer ones asks for one byte more than it
accepts); ``send_many(sock, payloads)``
sends datagrams from the front of ``payloads`` and returns how many went.
Both raise what ``socket.recv``/``socket.send`` raise. The C version
(``_fastio``, Linux recvmmsg/sendmmsg) moves up to 64 datagrams per system
call; the fallback loops over plain socket calls, with the same semantics.
"""

from __future__ import annotations

import socket

__all__ = ["ACCELERATED", "DATAGRAM_MAX", "RECV_AREA", "recv_many", "send_many"]

try:
    from statsd_filter import _fastio  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _fastio = None

ACCELERATED = _fastio is not None
# Larger than any UDP payload, so a datagram is never truncated into a corrupt line.
DATAGRAM_MAX = 65536
# The largest ``size`` recv_many takes (the C version's receive area).
RECV_AREA = 64 * DATAGRAM_MAX


def _recv_many_py(sock: socket.socket, count: int, size: int = DATAGRAM_MAX) -> list[bytes]:
    out: list[bytes] = []
    recv = sock.recv
    for _ in range(count):
        try:
            out.append(recv(size))
        except BlockingIOError:
            break
        except OSError:
            if out:
                break  # report the error on the next call, after these datagrams
            raise
    return out


def _send_many_py(sock: socket.socket, payloads: list[bytes]) -> int:
    for sent, payload in enumerate(payloads):
        try:
            sock.send(payload)
        except OSError:
            if sent:
                return sent
            raise
    return len(payloads)


if _fastio is not None:
    _c_recv = _fastio.recv_many
    _c_send = _fastio.send_many

    def recv_many(sock: socket.socket, count: int, size: int = DATAGRAM_MAX) -> list[bytes]:
        """Up to ``count`` waiting datagrams of at most ``size`` bytes (empty list: none)."""
        try:
            return _c_recv(sock.fileno(), count, size)  # type: ignore[no-any-return]
        except BlockingIOError:
            return []

    def send_many(sock: socket.socket, payloads: list[bytes]) -> int:
        """Send from the front of ``payloads``; returns how many datagrams went."""
        return _c_send(sock.fileno(), payloads)  # type: ignore[no-any-return]

else:  # pragma: no cover

    def recv_many(sock: socket.socket, count: int, size: int = DATAGRAM_MAX) -> list[bytes]:
        """Up to ``count`` waiting datagrams of at most ``size`` bytes (empty list: none)."""
        return _recv_many_py(sock, count, size)

    def send_many(sock: socket.socket, payloads: list[bytes]) -> int:
        """Send from the front of ``payloads``; returns how many datagrams went."""
        return _send_many_py(sock, payloads)

"""Many datagrams per system call, with a pure-Python fallback.

``recv_many(sock, count)`` returns up to ``count`` datagrams waiting on a
non-blocking UDP socket (an empty list when none); ``send_many(sock, payloads)``
sends datagrams from the front of ``payloads`` and returns how many went.
Both raise what ``socket.recv``/``socket.send`` raise. The C version
(``_fastio``, Linux recvmmsg/sendmmsg) moves up to 64 datagrams per system
call; the fallback loops over plain socket calls, with the same semantics.
"""

from __future__ import annotations

import socket

__all__ = ["ACCELERATED", "recv_many", "send_many"]

try:
    from statsd_filter import _fastio  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _fastio = None

ACCELERATED = _fastio is not None
# Larger than any UDP payload, so a datagram is never truncated into a corrupt line.
_DATAGRAM_MAX = 65536


def _recv_many_py(sock: socket.socket, count: int) -> list[bytes]:
    out: list[bytes] = []
    recv = sock.recv
    for _ in range(count):
        try:
            out.append(recv(_DATAGRAM_MAX))
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

    def recv_many(sock: socket.socket, count: int) -> list[bytes]:
        """Up to ``count`` waiting datagrams (empty list: none)."""
        try:
            return _c_recv(sock.fileno(), count)  # type: ignore[no-any-return]
        except BlockingIOError:
            return []

    def send_many(sock: socket.socket, payloads: list[bytes]) -> int:
        """Send from the front of ``payloads``; returns how many datagrams went."""
        return _c_send(sock.fileno(), payloads)  # type: ignore[no-any-return]

else:  # pragma: no cover

    def recv_many(sock: socket.socket, count: int) -> list[bytes]:
        """Up to ``count`` waiting datagrams (empty list: none)."""
        return _recv_many_py(sock, count)

    def send_many(sock: socket.socket, payloads: list[bytes]) -> int:
        """Send from the front of ``payloads``; returns how many datagrams went."""
        return _send_many_py(sock, payloads)

"""The C accelerator's entry points, each with a pure-Python counterpart.

``recv_many(sock, count, size)`` returns up to ``count`` datagrams waiting on a
non-blocking datagram socket (an empty list when none), each cut at ``size``
bytes (a caller that must detect longer ones asks for one byte more than it
accepts); ``send_many(sock, payloads)``
sends datagrams from the front of ``payloads`` and returns how many went.
Both raise what ``socket.recv``/``socket.send`` raise. The C version
(``_fastio``, Linux recvmmsg/sendmmsg) moves up to 64 datagrams per system
call; the fallback loops over plain socket calls, with the same semantics.

``recv_filter_pack`` (C only; ``FAST_PATH`` says whether it exists) does a
whole UDP wake-up for a prefix blocklist in one call: receive, split lines,
drop oversize and blocked lines, pack the rest into upstream payloads. Its
reference is the Python path it replaces (``rules.filter.LineFilter`` and
``upstream.batcher.Batcher``), which the tests hold it to. ``Trie`` compiles
the prefixes it matches. ``pack_chunk`` (C only) packs a chunk the Python rules
have been over, as the batcher would.
"""

from __future__ import annotations

import socket
from array import array
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ACCELERATED",
    "DATAGRAM_MAX",
    "FAST_PATH",
    "RECV_AREA",
    "PackedRead",
    "Ring",
    "SampleArgs",
    "Sampled",
    "Trie",
    "pack_chunk",
    "recv_filter_pack",
    "recv_many",
    "send_many",
]

try:
    from statsd_filter import _fastio  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _fastio = None

ACCELERATED = _fastio is not None
FAST_PATH = ACCELERATED and hasattr(_fastio, "recv_filter_pack")
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


# With /top sampling (worker/sampler.py): (the next sample point from the start
# of the read, mean gap, random state, points allowed before the gap widens, the
# mean of the gap running now) in; (sampled lines as (line, bytes its points
# stand for, bytes it spans), the next point from the end of the read, the gap,
# the random state, points) out. After a read with points, the gap running is
# the returned gap's.
SampleArgs = tuple[int, int, int, int, int]
Sampled = tuple[list[tuple[bytes, int, int]], int, int, int, int]
# (payloads, lines per payload, datagrams, bytes in, lines received, lines blocked,
#  lines oversize, [(prefix position, lines, bytes) per prefix that blocked], errno,
#  what was sampled or None)
PackedRead = tuple[
    list[bytes], list[int], int, int, int, int, int, list[tuple[int, int, int]], int, Sampled | None
]


class Trie:
    """Prefixes compiled for the C filter: ``match(line)`` is the position (in the
    list given) of the earliest-listed prefix ``line`` starts with, or -1."""

    __slots__ = ("handle", "size")

    def __init__(self, prefixes: Sequence[bytes]) -> None:
        if _fastio is None or not FAST_PATH:  # pragma: no cover - built without the C part
            raise RuntimeError("the C accelerator is not built")
        # A trie of dicts, then flattened breadth first into the arrays C walks.
        root: dict[int, Any] = {}
        ends: dict[int, int] = {}  # id(node) -> earliest position of a prefix ending there
        for position, prefix in enumerate(prefixes):
            if not prefix:
                raise ValueError("prefixes must be non-empty")
            node = root
            for byte in prefix:
                node = node.setdefault(byte, {})
            ends.setdefault(id(node), position)
        order: list[int] = []
        first: list[int] = []
        count: list[int] = []
        child_byte: list[int] = []
        child_node: list[int] = []
        queue = [root]
        for node in queue:  # grows while walked: breadth first
            order.append(ends.get(id(node), -1))
            first.append(len(child_byte))
            count.append(len(node))
            for byte in sorted(node):
                child_byte.append(byte)
                child_node.append(len(queue))
                queue.append(node[byte])
        # The smallest position in each subtree, children before parents.
        min_below = list(order)
        for i in range(len(queue) - 1, -1, -1):
            own = min_below[i] if min_below[i] >= 0 else _NONE
            for j in range(first[i], first[i] + count[i]):
                below = min_below[child_node[j]]
                own = min(own, below if below >= 0 else _NONE)
            min_below[i] = own
        self.size = len(prefixes)
        self.handle = _fastio.trie_new(
            array("i", order).tobytes(),
            array("i", min_below).tobytes(),
            array("i", first).tobytes(),
            array("i", count).tobytes(),
            bytes(child_byte),
            array("i", child_node).tobytes(),
            len(prefixes),
        )

    def match(self, line: bytes) -> int:
        """The earliest-listed prefix ``line`` starts with, or -1."""
        assert _fastio is not None
        return int(_fastio.trie_lookup(self.handle, line))


_NONE = 2**31 - 1  # "no prefix below": larger than any position


class Ring:
    """A hash ring's points for the C router: ``route(line)`` is the index (in the
    ``owners`` given) of the upstream a line's name hashes to, or -1 when the name
    is not ASCII (Python then decides, decoding it as JavaScript does)."""

    __slots__ = ("handle",)

    def __init__(self, values: Sequence[int], owners: Sequence[int], targets: int) -> None:
        """``values``: sorted points; ``owners[i]``: the target of point i (one more
        entry than points: the first again, for the wrap-around)."""
        if _fastio is None or not FAST_PATH:  # pragma: no cover - built without the C part
            raise RuntimeError("the C accelerator is not built")
        self.handle = _fastio.ring_new(
            array("I", values).tobytes(), array("i", owners).tobytes(), targets
        )

    def route(self, line: bytes) -> int:
        """The target of ``line``'s name, or -1 when the name is not ASCII."""
        assert _fastio is not None
        return int(_fastio.ring_lookup(self.handle, line))


def pack_chunk(chunk: bytes, max_size: int) -> tuple[list[bytes], list[int]]:
    """The lines of ``chunk`` (``b"\\n"`` + lines) packed into payloads of at most
    ``max_size`` bytes, and each payload's line count: what ``Batcher.add`` and
    ``flush`` make of it (C only)."""
    assert _fastio is not None
    result: tuple[list[bytes], list[int]] = _fastio.pack_chunk(chunk, max_size)
    return result


def recv_filter_pack(
    sock: socket.socket,
    max_datagrams: int,
    trie: Trie | None,
    max_line: int,
    max_size: int,
    ring: Ring | None = None,
    sample: SampleArgs | None = None,
) -> PackedRead:
    """Read, filter and pack one wake-up's worth of datagrams (C only; see the module doc).

    With ``max_size`` 0 nothing is packed: the one "payload" is every kept line,
    each led by ``b"\n"`` (the shape ``LineFilter.filter`` returns), for the
    rules and routing that must still see lines in Python. With a ``ring``,
    ``payloads`` and ``lines`` hold one list per target, then a last list holding
    one chunk of the lines whose names Python must route.
    With ``sample``, also return the lines under the sample points that fall in
    this read (``Sampled``), found as the Python path's sampler finds them.
    """
    assert _fastio is not None
    handle = None if trie is None else trie.handle
    result: PackedRead = _fastio.recv_filter_pack(
        sock.fileno(),
        max_datagrams,
        handle,
        max_line,
        max_size,
        None if ring is None else ring.handle,
        sample,
    )
    return result

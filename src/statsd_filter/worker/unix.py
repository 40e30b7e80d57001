"""Unix socket inputs: DogStatsD's datagram socket and a stream socket, fed to the pipeline.

Both sockets are bound by the supervisor and shared by every worker (Linux has
no ``SO_REUSEPORT`` for Unix sockets).

* :class:`UnixDatagramInput` is the UDP input on an ``AF_UNIX`` socket: same
  shared-socket wake-ups (``EPOLLEXCLUSIVE``), same ``recvmmsg`` drain, one
  chunk per wake-up. A datagram may be up to ``unix_socket_max_payload``
  bytes: each is read into a buffer one byte larger, so a longer one shows as
  cut, and is dropped whole and counted as one oversize line (its lines cannot
  be told apart from a cut one) and as a rejected frame.
* :class:`UnixStreamInput` is the TCP input on the shared listening socket,
  with a framer per connection: DogStatsD's 4-byte little-endian length prefix
  (``unix_stream_framing = "length"``, :mod:`statsd_filter.protocol.prefixed`)
  or newline-delimited lines (``"newline"``, what Vector's ``mode = "unix"``
  reads). A length above ``unix_socket_max_payload`` closes that connection,
  as the agent does; the payload counts as one oversize line and a rejected
  frame. Every worker waits on the listener, and each wake-up accepts at
  most one client: the workers that are idle race for each new connection, so
  a burst of connections spreads over them instead of landing on whichever
  worker woke first. Connections are long-lived, so the wake-ups that find
  nothing to accept cost little.

Origin detection (``unix_origin_detection``), off by default and then costing
nothing: the sender's pid comes from ``SCM_CREDENTIALS`` on each datagram
(``SO_PASSCRED``, set by the supervisor) or from ``SO_PEERCRED`` once per
stream connection; :class:`ContainerResolver` maps it to a container id
through ``<procfs_path>/<pid>/cgroup`` (cached briefly), and lines without a
container field get ``|c:ci-<id>``. Datagrams are then read one ``recvmsg``
at a time (the credentials ride along as ancillary data).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from statsd_filter.protocol.lines import LineFramer
from statsd_filter.protocol.origin import add_container_field, container_id
from statsd_filter.protocol.prefixed import LengthPrefixFramer
from statsd_filter.stats import Stat
from statsd_filter.worker.pipeline import Pipeline
from statsd_filter.worker.tcp import Framer, TcpInput, _Connection
from statsd_filter.worker.udp import MAX_DATAGRAMS_PER_WAKEUP, UdpInput

__all__ = ["ContainerResolver", "UnixDatagramInput", "UnixStreamInput"]

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_CREDENTIALS_SPACE = socket.CMSG_SPACE(_UCRED.size)
# How long a pid's container id is trusted: pids are reused, containers come and go.
ORIGIN_CACHE_SECONDS = 10.0
ORIGIN_CACHE_SIZE = 4096


class ContainerResolver:
    """pid -> container id, read from ``<procfs_path>/<pid>/cgroup`` and cached briefly."""

    def __init__(self, procfs_path: str, counters: memoryview) -> None:
        self._root = Path(procfs_path)
        self._c = counters
        self._cache: dict[int, tuple[str | None, float]] = {}

    def lookup(self, pid: int) -> str | None:
        """The container id of ``pid``, or None (not in a container, gone, or unknown)."""
        if pid <= 0:  # 0: the sender is in a pid namespace we cannot see into
            return None
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            text = (self._root / str(pid) / "cgroup").read_text(errors="replace")
        except OSError:
            cid = None
        else:
            cid = container_id(text)
        if len(self._cache) >= ORIGIN_CACHE_SIZE:
            self._cache.clear()
        self._cache[pid] = (cid, now + ORIGIN_CACHE_SECONDS)
        return cid

    def tagger(self, pid: int) -> Callable[[bytes], bytes] | None:
        """A function adding ``pid``'s container field to a chunk, or None if it has none."""
        cid = self.lookup(pid)
        if cid is None:
            return None
        c = self._c

        def tag(chunk: bytes) -> bytes:
            tagged, lines = add_container_field(chunk, cid)
            c[Stat.UNIX_ORIGIN_TAGGED] += lines
            return tagged

        return tag


class UnixDatagramInput(UdpInput):
    """Reads the shared Unix datagram socket, like the UDP input."""

    transport = "unix"

    def __init__(
        self,
        sock: socket.socket,
        pipeline: Pipeline,
        counters: memoryview,
        log: logging.Logger,
        *,
        max_payload: int,
        origin: ContainerResolver | None = None,
    ) -> None:
        super().__init__(sock, pipeline, counters, log)
        self._max_payload = max_payload
        # One byte more than accepted: a longer datagram arrives cut, and shows it.
        self.recv_size = max_payload + 1
        self._origin = origin

    def _on_readable(self) -> int:
        if self._origin is not None:
            return self._read_with_origin()
        datagrams = self._receive()
        if not datagrams:
            return 0
        count = len(datagrams)
        size = sum(map(len, datagrams))
        longest = max(map(len, datagrams))
        c = self._c
        c[Stat.DATAGRAMS_IN] += count
        c[Stat.UNIX_DATAGRAMS_IN] += count
        c[Stat.BYTES_IN] += size
        c[Stat.UNIX_BYTES_IN] += size
        if longest > self._max_payload:
            datagrams = self._reject_oversize(datagrams)
            longest = self._max_payload
        if datagrams:
            self._deliver(datagrams, longest)
        return count

    def _reject_oversize(self, datagrams: list[bytes]) -> list[bytes]:
        limit = self._max_payload
        kept = [d for d in datagrams if len(d) <= limit]
        rejected = len(datagrams) - len(kept)
        self._c[Stat.UNIX_FRAMES_REJECTED] += rejected
        # Each counts as one line received and dropped: its lines were cut.
        self._pipeline.feed(b"", 0, rejected)
        self._log.warning(
            "unix: %d datagram(s) longer than unix_socket_max_payload=%d dropped",
            rejected,
            limit,
        )
        return kept

    def _read_with_origin(self) -> int:
        """Origin detection: one recvmsg per datagram, its sender's pid alongside."""
        assert self._origin is not None
        sock = self._sock
        size = self.recv_size
        datagrams: list[bytes] = []
        pids: list[int] = []
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data, ancillary, _, _ = sock.recvmsg(size, _CREDENTIALS_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._c[Stat.RECEIVE_ERRORS] += 1
                self._log.warning("unix receive error: %s", exc)
                break
            pid = 0
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack_from(value)[0]
            datagrams.append(data)
            pids.append(pid)
        if not datagrams:
            return 0
        count = len(datagrams)
        size_in = sum(map(len, datagrams))
        c = self._c
        c[Stat.DATAGRAMS_IN] += count
        c[Stat.UNIX_DATAGRAMS_IN] += count
        c[Stat.BYTES_IN] += size_in
        c[Stat.UNIX_BYTES_IN] += size_in
        if max(map(len, datagrams)) > self._max_payload:
            keep = [len(d) <= self._max_payload for d in datagrams]
            pids = [pid for pid, ok in zip(pids, keep, strict=True) if ok]
            datagrams = self._reject_oversize(datagrams)
        tagged = []
        for data, pid in zip(datagrams, pids, strict=True):
            tag = self._origin.tagger(pid)
            tagged.append(tag(data) if tag is not None else data)
        if tagged:
            self._deliver(tagged, None)  # tagging made lines longer
        return count


class UnixStreamInput(TcpInput):
    """Accepts clients on the shared Unix stream listener and frames what they send."""

    transport = "unix stream"
    accepts_per_wakeup = 1  # spread connections over the workers (see the module doc)
    stat_open = Stat.UNIX_CONNECTIONS_OPEN
    stat_accepted = Stat.UNIX_CONNECTIONS_ACCEPTED
    stat_rejected = Stat.UNIX_CONNECTIONS_REJECTED
    stat_idle_closed = Stat.UNIX_IDLE_CLOSED
    stat_bytes = Stat.UNIX_BYTES_IN

    def __init__(
        self,
        sock: socket.socket,
        pipeline: Pipeline,
        counters: memoryview,
        log: logging.Logger,
        *,
        framing: str,
        max_payload: int,
        max_line_bytes: int,
        max_connections: int,
        idle_timeout: float,
        origin: ContainerResolver | None = None,
    ) -> None:
        super().__init__(
            [sock],
            pipeline,
            counters,
            log,
            max_line_bytes=max_line_bytes,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
        )
        self._framing = framing
        self._max_payload = max_payload
        self._origin = origin

    def _new_framer(self) -> Framer:
        if self._framing == "newline":
            return LineFramer(self._max_line)
        return LengthPrefixFramer(self._max_payload)

    def _accepted(self, conn: _Connection) -> None:
        if self._origin is not None:
            try:
                creds = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            except OSError:
                return
            conn.origin = self._origin.tagger(_UCRED.unpack(creds)[0])

    def _refuse(self, conn: _Connection) -> None:
        self._c[Stat.UNIX_FRAMES_REJECTED] += 1
        super()._refuse(conn)

"""UDP input: read the shared UDP socket in batches and feed the pipeline.

The socket is driven straight from event-loop callbacks rather than an asyncio
``DatagramProtocol``: draining a UDP socket in a loop from one callback is
several times cheaper than a protocol's Python call and object per datagram.

Every wake-up has a fixed cost (the event loop's turn, the system calls, a
filter call, a send), whatever it carries, so how often the socket is read
matters as much as how. Three regimes, chosen by what the last read found
(interrupt mitigation, as network cards and the kernel's NAPI do it):

* sparse traffic: wait for readiness; the first datagram schedules a read
  ``max_read_delay`` later, so whatever arrives meanwhile shares that wake-up;
* steady traffic (a read found several datagrams): read again on a timer,
  every ``max_read_delay``, without waiting for readiness at all;
* busy (a read found at least :data:`MODERATE_READ` datagrams, a quarter of
  its batch): read again at once, back to back, until a read finds less.

A datagram therefore waits at most ``max_read_delay`` in the socket before it
is read (0 reads on every readiness, the lowest latency and the highest cost
at moderate rates).

While traffic is steady, one worker reads a shared socket on its timer and the
others stand by (``readrole.py``); a busy read rings them back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import time

from statsd_filter.fastio import DATAGRAM_MAX, RECV_AREA, recv_filter_pack, recv_many
from statsd_filter.protocol.lines import split_lines
from statsd_filter.stats import Stat, heartbeat_ms
from statsd_filter.worker.pipeline import PackedPath, Pipeline
from statsd_filter.worker.readrole import CLAIM_DELAYS, STANDBY_RECHECK, ReadRole

__all__ = ["UdpInput", "count_unread_lines"]

# Datagrams read per wake-up before filtering and flushing them. The first line
# of a wake-up waits for the whole batch, so smaller means lower latency near
# saturation, but every wake-up has fixed costs (a filter call, one sendmmsg per
# upstream): measured at 718k lines/s offered, 128 cut the added p99 from 8.5 to
# 5.8 ms, yet cost 15-20% of the throughput with 120 extra rules or 3 upstreams
# (BENCHMARKS.md). A metrics pipeline that aggregates for seconds wants the
# throughput.
MAX_DATAGRAMS_PER_WAKEUP = 512
# Datagrams per recvmmsg call (the C accelerator's maximum).
RECV_BATCH = 64
# A read finding fewer datagrams than this is moderate traffic: the next read
# waits for the timer, and one worker may read the socket alone (readrole.py). A
# busier read is followed by another at once, and keeps every worker reading:
# at a flood's rate a worker sleeping out the delay, or standing by, leaves more
# in the socket than its receive buffer holds (measured: 4 MiB overflowed, and
# 10-25% of a flood was lost, with rules making each read slower).
MODERATE_READ = MAX_DATAGRAMS_PER_WAKEUP // 4
# The span over which a worker measures the rate it reads at (for _wait).
RATE_WINDOW = 0.1


class UdpInput:
    """Reads a (possibly shared) UDP socket: on readiness, on a timer, or back to back.

    Also the base of the Unix datagram input (``unix.py``).
    """

    transport = "udp"  # in log messages
    recv_size = DATAGRAM_MAX  # bytes asked for per datagram

    def __init__(
        self,
        sock: socket.socket,
        pipeline: Pipeline,
        counters: memoryview,
        log: logging.Logger,
        max_read_delay: float = 0.0,
        role: ReadRole | None = None,
    ) -> None:
        self._sock = sock
        self._role = role
        self._standing_by = False
        self._loaded = False  # the last read was busy (and rang the bell)
        self._last_read = 0  # datagrams the last timed read found
        # Datagrams per second this worker read lately (over RATE_WINDOW).
        self._rate = 0.0
        self._window_start = 0.0
        self._window_read = 0
        self._pipeline = pipeline
        self._c = counters
        self._log = log
        self._delay = max_read_delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoll: select.epoll | None = None
        self._watched = -1  # the descriptor the loop watches for readiness
        self._armed = False
        self._next: asyncio.TimerHandle | asyncio.Handle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # All workers share this socket. Waiting on it directly, every datagram
        # would wake every worker. A private epoll holding the socket with
        # EPOLLEXCLUSIVE, itself watched by the event loop, makes the kernel
        # wake one waiting worker at a time (most of the time: measured, about
        # a quarter of the wake-ups at 1,000 datagrams/s still found nothing);
        # under load every worker is busy and gets its share anyway.
        try:
            self._epoll = select.epoll()
            self._epoll.register(self._sock.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
            self._watched = self._epoll.fileno()
        except (AttributeError, OSError):  # pragma: no cover - not Linux >= 4.5
            self._epoll = None
            self._watched = self._sock.fileno()
        self._arm()

    def set_delay(self, max_read_delay: float) -> None:
        """A reloaded ``max_read_delay``: applies from the next read on."""
        self._delay = max_read_delay
        if not max_read_delay and self._role is not None:
            self._role.release()  # every worker reads on readiness now

    def _arm(self) -> None:
        self._next = None
        if not self._armed and self._loop is not None:
            self._loop.add_reader(self._watched, self._on_ready)
            self._armed = True

    def _disarm(self) -> None:
        if self._armed and self._loop is not None:
            self._loop.remove_reader(self._watched)
            self._armed = False

    def _on_ready(self) -> None:
        if self._epoll is not None:
            self._epoll.poll(0)  # consume the notification
        if not self._delay:
            self._on_readable()
            return
        # Let what arrives in the next moment share this wake-up.
        self._disarm()
        assert self._loop is not None
        role = self._role
        if (
            role is not None
            and self._last_read < MODERATE_READ
            and role.holder(heartbeat_ms()) >= 0
        ):
            self._stand_by()  # another worker reads this socket on its timer
            return
        self._next = self._loop.call_later(self._wait(), self._poll)

    def _measure(self, read: int) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._window_read += read
        if now - self._window_start >= RATE_WINDOW:
            self._rate = self._window_read / (now - self._window_start)
            self._window_start, self._window_read = now, 0

    def _wait(self) -> float:
        """How long the next read waits: ``max_read_delay``, or less when the recent rate
        would bring MODERATE_READ datagrams sooner (a brief lull in a flood must not
        leave the socket unread for the whole delay)."""
        rate = self._rate
        return min(self._delay, MODERATE_READ / rate) if rate > 0 else self._delay

    def _poll(self) -> None:
        read = self._last_read = self._on_readable()
        assert self._loop is not None
        self._measure(read)
        role = self._role
        if read >= MODERATE_READ:
            # Busy: read again at once, and ring the workers standing by back (a read
            # short of a full batch is busy too: another worker may have taken the rest).
            if role is not None:
                role.release()
                if not self._loaded:
                    role.bell.ring()
            self._loaded = True
            self._next = self._loop.call_soon(self._poll)
            return
        if self._loaded:
            self._loaded = False
            if role is not None:
                role.bell.hush()
        if read > 1:
            if role is not None:
                now = heartbeat_ms()
                if 0 <= role.holder(now) < role.me:
                    # Two claimed at once: the lower index keeps reading.
                    role.release()
                    self._stand_by()
                    return
                role.claim(now + int(self._delay * CLAIM_DELAYS * 1000) + 1)
            self._next = self._loop.call_later(self._wait(), self._poll)  # steady: a timer
        else:
            if role is not None:
                role.release()
            self._arm()  # sparse: readiness wakes us again

    def _stand_by(self) -> None:
        """Leave the socket to the worker holding its read role, until it rings or lapses."""
        assert self._loop is not None
        assert self._role is not None
        if not self._standing_by:
            self._loop.add_reader(self._role.bell.fd, self._wake)
            self._standing_by = True
        self._next = self._loop.call_later(STANDBY_RECHECK, self._recheck)

    def _recheck(self) -> None:
        assert self._role is not None
        if self._role.holder(heartbeat_ms()) >= 0:
            assert self._loop is not None
            self._next = self._loop.call_later(STANDBY_RECHECK, self._recheck)
        else:
            self._wake()

    def _wake(self) -> None:
        """Back to watching the socket: the reader rang, or its claim lapsed."""
        self._end_standby()
        self._arm()

    def _end_standby(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None
        if self._standing_by and self._loop is not None and self._role is not None:
            self._loop.remove_reader(self._role.bell.fd)
            self._standing_by = False

    def stop(self, deadline: float) -> None:
        """Stop listening after reading everything queued in the socket.

        Reads until the socket is empty (every worker does the same, so the
        shared socket empties fast) or until ``deadline`` (time.monotonic)
        passes, whichever comes first.
        """
        self._end_standby()
        self._disarm()
        if self._role is not None:
            self._role.release()
        if self._epoll is not None:
            self._epoll.close()
        while self._on_readable() and time.monotonic() < deadline:
            pass

    def _receive(self) -> list[bytes]:
        """Every datagram waiting (up to MAX_DATAGRAMS_PER_WAKEUP), errors counted."""
        sock = self._sock
        size = self.recv_size
        # Datagrams larger than UDP's share the accelerator's receive area: fewer per call.
        batch = min(RECV_BATCH, RECV_AREA // size)
        datagrams: list[bytes] = []
        errors = 0
        while len(datagrams) < MAX_DATAGRAMS_PER_WAKEUP:
            try:
                got = recv_many(sock, batch, size)  # one recvmmsg: up to 64 datagrams
            except OSError as exc:
                errors += 1
                self._log.warning("%s receive error: %s", self.transport, exc)
                break
            if not got:
                break
            datagrams += got
            if len(got) < batch:
                break  # the socket is empty
        if errors:
            self._c[Stat.RECEIVE_ERRORS] += errors
        return datagrams

    def _on_readable(self) -> int:
        """Read, filter and forward one batch; returns how many datagrams it read."""
        packed = self._pipeline.packed
        if packed is not None:
            return self._read_packed(packed)
        # The Python path. The only per-datagram Python work is the recv call and
        # a list append: the datagrams read in this wake-up are joined with
        # newlines and filtered as one chunk (a datagram holds whole lines, so
        # joining never glues two lines together), then packed and flushed.
        datagrams = self._receive()
        if not datagrams:
            return 0
        c = self._c
        c[Stat.DATAGRAMS_IN] += len(datagrams)
        c[Stat.BYTES_IN] += sum(map(len, datagrams))
        # No line is longer than its datagram.
        self._deliver(datagrams, max(map(len, datagrams)))
        return len(datagrams)

    def _deliver(self, datagrams: list[bytes], longest: int | None) -> None:
        """Filter a wake-up's datagrams as one chunk and flush what passes."""
        chunk = b"\n".join(datagrams) if len(datagrams) > 1 else datagrams[0]
        pipeline = self._pipeline
        pipeline.feed(chunk, longest)
        pipeline.flush()

    def _read_packed(self, packed: PackedPath) -> int:
        """The C fast path: the whole batch in one call (see worker/pipeline.py)."""
        read = recv_filter_pack(
            self._sock,
            MAX_DATAGRAMS_PER_WAKEUP,
            packed.trie,
            packed.max_line,
            packed.max_size,
            self._pipeline.router.c_ring if packed.max_size else None,
            self._pipeline.sample_args(),
        )
        datagrams = read[2]
        c = self._c
        if read[8]:
            c[Stat.RECEIVE_ERRORS] += 1
            self._log.warning("udp receive error: %s", os.strerror(read[8]))
        if datagrams:
            c[Stat.DATAGRAMS_IN] += datagrams
            c[Stat.BYTES_IN] += read[3]
            self._pipeline.feed_packed(read)
        return datagrams


def count_unread_lines(sock: socket.socket, limit: int = 1 << 20) -> int:
    """Read what is left in a UDP socket nobody serves any more; how many lines it held."""
    lines = 0
    for _ in range(limit // RECV_BATCH):
        try:
            got = recv_many(sock, RECV_BATCH)
        except OSError:
            break
        lines += sum(len(split_lines(datagram)) for datagram in got)
        if len(got) < RECV_BATCH:
            break
    return lines

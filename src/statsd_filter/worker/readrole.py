"""One timed reader per shared UDP socket while traffic is moderate.

Every worker's wake-up has a fixed cost, and a timer wake-up is the dearest kind
(on a virtual machine a bare 10 ms sleep costs 60-100 us of CPU a turn). When
steady traffic puts the UDP input on its timer (``udp.py``), one worker reading
the shared socket every ``max_read_delay`` gets every datagram just as soon as
N workers each doing so would, at 1/N of the wake-ups. So the worker whose read
finds steady traffic *claims the socket's read role*: it stamps, in its own row
of the shared stats, the moment (heartbeat clock, milliseconds) until which it
will keep reading that socket on its timer, and renews the stamp at each read.

A worker that readiness wakes while another holds the role *stands by*: it
stops watching the socket and waits on the socket's :class:`ReadBell`, an
eventfd every worker inherits. The reader rings it when a read is busy (a
quarter batch or more: every worker is needed, as before), and hushes it once
the reads are moderate again.
A worker standing by also looks again every :data:`STANDBY_RECHECK` seconds,
in case the reader stopped without ringing: a claim lapses three read delays
after its last renewal, and the supervisor clears a dead worker's claims with
its other gauges. If two workers claim at once, the one with the higher index
stands by at its next read.

Nothing waits longer for it: the reader keeps the ``max_read_delay`` bound,
and a worker standing by only gives up wake-ups that would have found the
socket already drained.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from statsd_filter.stats import READER_ROLES

__all__ = ["CLAIM_DELAYS", "STANDBY_RECHECK", "ReadBell", "ReadRole"]

# A claim lasts this many read delays past its last renewal.
CLAIM_DELAYS = 3
# How often a worker standing by looks whether the reader still holds the role.
STANDBY_RECHECK = 1.0


class ReadBell:
    """The eventfd a reader rings for help with one shared socket; made before the fork."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def ring(self) -> None:
        os.eventfd_write(self.fd, 1)

    def hush(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass  # nobody rang, or another reader hushed it already

    def close(self) -> None:
        os.close(self.fd)


class ReadRole:
    """Who reads shared socket ``socket_index`` on a timer: this worker's view."""

    __slots__ = ("_rows", "_slot", "bell", "claimed", "me")

    def __init__(
        self, rows: Sequence[memoryview], me: int, socket_index: int, bell: ReadBell
    ) -> None:
        self._rows = rows
        self.me = me
        self._slot = READER_ROLES[socket_index]
        self.bell = bell
        self.claimed = False

    def claim(self, until_ms: int) -> None:
        """Hold the role until ``until_ms`` (heartbeat clock), or renew it."""
        self._rows[self.me][self._slot] = until_ms
        self.claimed = True

    def release(self) -> None:
        if self.claimed:
            self._rows[self.me][self._slot] = 0
            self.claimed = False

    def holder(self, now_ms: int) -> int:
        """The lowest index of another worker holding the role now, or -1."""
        slot = self._slot
        for index, row in enumerate(self._rows):
            if index != self.me and row[slot] > now_ms:
                return index
        return -1

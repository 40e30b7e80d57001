"""The sd_notify protocol for ``Type=notify`` systemd services, without libsystemd.

systemd gives a notify-type service the address of a datagram socket in
``NOTIFY_SOCKET``: a file system path, or ``@name`` for Linux's abstract
namespace (the ``@`` stands for a leading NUL byte). Each message is one
datagram of newline-separated ``KEY=value`` assignments:

* ``READY=1``: start-up is complete (systemd holds back units ordered after this
  one, and ``systemctl start`` waits, until it arrives);
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` (the CLOCK_MONOTONIC time it began),
  then ``READY=1`` when the reload is done;
* ``STOPPING=1`` when a stop begins;
* ``STATUS=`` a line of text ``systemctl status`` shows;
* ``WATCHDOG=1`` a keep-alive ping, expected every ``WATCHDOG_USEC``
  microseconds when the unit sets ``WatchdogSec=`` (systemd kills and, with
  ``Restart=``, restarts a service whose pings stop). ``WATCHDOG_PID``, when
  set, names the one process the watchdog is meant for.

Sending is fire-and-forget on a non-blocking socket: a lost notification must
never stall or kill the proxy, so errors are logged once and otherwise ignored.
Without ``NOTIFY_SOCKET`` every method does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    """Sends sd_notify messages to ``address`` (None: nowhere)."""

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self._log = log or logging.getLogger("statsd_filter")
        self._target: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._failed = False
        if address:
            # "@name" is the abstract namespace: a leading NUL, no file.
            self._target = b"\0" + address[1:].encode() if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self.watchdog_interval: float | None = None
        if self._sock is not None and watchdog_usec:
            # Pinging at half the deadline leaves a whole half for a slow tick.
            self.watchdog_interval = watchdog_usec / 2e6

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, log: logging.Logger | None = None
    ) -> Notifier:
        """The notifier systemd's environment asks for (a no-op one outside systemd)."""
        env = os.environ if environ is None else environ
        watchdog: int | None = None
        pid = env.get("WATCHDOG_PID", "")
        if env.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            watchdog = int(env["WATCHDOG_USEC"]) or None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog, log)

    @property
    def enabled(self) -> bool:
        """Whether there is a notify socket to talk to."""
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments as one message; whether it went."""
        if self._sock is None or self._target is None:
            return False
        message = "\n".join(
            a.replace("\n", " ") if a.startswith("STATUS=") else a for a in assignments
        )
        try:
            self._sock.sendto(message.encode(), self._target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                self._log.warning("cannot notify systemd (%s): %s", self._describe(), exc)
            return False
        return True

    def _describe(self) -> str:
        target = self._target
        if isinstance(target, bytes):
            return "@" + target[1:].decode(errors="replace")
        return str(target)

    def ready(self, status: str) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self, status: str) -> bool:
        """A reload begins now."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        """A stop begins now."""
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """A new status line."""
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        """The keep-alive ping."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

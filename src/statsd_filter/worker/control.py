"""The worker's end of the control channel, written without ever blocking the loop.

Every frame to the supervisor goes through :meth:`ControlChannel.send`, so
frames never interleave. A frame is written at once if the socket takes it;
what the socket does not take waits in a buffer and is written when the
socket is writable again. Frames that only report (``/top`` summaries, tap
lines) are *droppable*: while anything is still waiting they are dropped and
counted rather than queued, so a supervisor that reads slowly costs the data
path nothing and the buffer stays bounded. Replies the supervisor waits for
(reload acknowledgements) are always queued.
"""

from __future__ import annotations

import asyncio
import socket

from statsd_filter.protocol.frames import encode_frame

__all__ = ["ControlChannel"]


class ControlChannel:
    """Non-blocking, ordered frame writer on a (non-blocking) socket."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        self._pending = bytearray()
        self._writing = False
        self.dropped = 0  # droppable frames not sent
        self.closed = False

    def send(self, payload: bytes, *, droppable: bool = False) -> bool:
        """Queue one frame; False if it was dropped (or the channel is closed)."""
        if self.closed or (droppable and self._pending):
            self.dropped += 1
            return False
        self._pending += encode_frame(payload)
        if not self._writing:
            self._write()
        return True

    def _write(self) -> None:
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close()
            return
        del self._pending[:sent]
        if self._pending and not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
        elif not self._pending and self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())

    def _on_writable(self) -> None:
        self._write()

    def _close(self) -> None:
        self.closed = True
        self._pending.clear()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())

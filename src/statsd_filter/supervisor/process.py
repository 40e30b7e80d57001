"""The supervisor: forks N workers, restarts the ones that die, handles signals.

It knows nothing about StatsD: it is given ``target(index, control) -> exit
status`` and runs it in N forked children (``control`` is the child's end of a
socketpair to the supervisor). Signal handlers only record the signal; the
event loop acts on it (the uvicorn model):

* SIGTERM / SIGINT: graceful stop. Every worker gets SIGTERM and drains; a
  worker still alive after ``shutdown_timeout`` is killed.
* SIGCHLD: reap; a worker that died while we were not stopping is forked
  again at once (a crash loop backs off, up to ``MAX_RESTART_DELAY``).
* SIGHUP: passed to ``on_reload`` if given.

``on_stopping(why)`` hears when a graceful stop begins (systemd's STOPPING=1).

Each worker also gets one end of a socketpair: :meth:`Supervisor.send`
sends a frame to one live worker, and frames a worker sends back reach
``on_message(index, payload)``. The payloads are opaque here.

Workers are forked, not spawned, so they inherit the listening sockets and the
shared stats memory without any serialisation. The fork happens from the
supervisor's asyncio loop; the child resets signal dispositions and the wakeup
fd before running the target and never returns into the parent's loop.

A fork copies every descriptor the parent holds at that moment: its event
loop's, the admin endpoint's listening socket, and any admin connection being
served. A worker holding an admin client's socket would keep that connection
open (the client never sees the close) for as long as it lives. So the child
replaces every descriptor but stdin/stdout/stderr, its control socket and the
ones named in ``inherit`` by ``/dev/null`` before running the target:
replaced, not closed, so a stale Python object of the parent's that closes
"its" descriptor later can never hit a socket the worker opened since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from statsd_filter.protocol.frames import FrameDecoder, encode_frame

__all__ = ["Supervisor", "WorkerInfo"]

# A worker that lived shorter than this is "crash looping" and restarts with backoff.
MIN_HEALTHY_LIFETIME = 1.0
MAX_RESTART_DELAY = 5.0


class HasFileno(Protocol):
    """A socket, file or anything else that stands for one descriptor."""

    def fileno(self) -> int: ...


@dataclass
class WorkerInfo:
    """What the supervisor knows of one worker slot."""

    index: int
    pid: int = 0
    alive: bool = False
    started: float = 0.0
    restarts: int = 0
    fast_failures: int = 0
    last_exit: str = ""
    control: socket.socket | None = field(default=None, repr=False)
    decoder: FrameDecoder = field(default_factory=FrameDecoder, repr=False)


def _isolate(keep: Iterable[int]) -> None:
    """Point every descriptor of this process but 0-2 and ``keep`` at /dev/null."""
    try:
        open_fds = [int(entry.name) for entry in Path("/proc/self/fd").iterdir()]
    except OSError:  # pragma: no cover - no /proc: nothing we can list
        return
    keep = {0, 1, 2, *keep}
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in open_fds:
            if fd not in keep and fd != null:
                try:
                    os.dup2(null, fd)
                except OSError:  # the listing's own descriptor, closed since
                    continue
    finally:
        os.close(null)


class Supervisor:
    """Runs ``count`` copies of ``target`` and keeps them running until stopped."""

    def __init__(
        self,
        target: Callable[[int, socket.socket], int],
        count: int,
        shutdown_timeout: float,
        log: logging.Logger,
        *,
        on_worker_exit: Callable[[int], None] | None = None,
        on_reload: Callable[[], None] | None = None,
        on_message: Callable[[int, bytes], None] | None = None,
        on_worker_started: Callable[[int], None] | None = None,
        on_stopping: Callable[[str], None] | None = None,
        inherit: Sequence[HasFileno] = (),
    ) -> None:
        self._target = target
        self._inherit = tuple(inherit)
        self._timeout = shutdown_timeout
        self._log = log
        self._on_exit = on_worker_exit
        self._on_reload = on_reload
        self._on_message = on_message
        self._on_started = on_worker_started
        self._on_stopping = on_stopping
        self.workers = [WorkerInfo(i) for i in range(count)]
        self.stopping = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        """Start the workers and supervise them until a stop signal; returns exit status."""
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._hup)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for worker in self.workers:
            self._spawn(worker)
        await self._stop.wait()
        return await self._shutdown()

    def request_stop(self, why: str = "request") -> None:
        """Begin a graceful stop (idempotent)."""
        if not self.stopping and self._stop is not None:
            self._log.info("%s received: draining workers", why)
            self.stopping = True
            self._stop.set()
            if self._on_stopping is not None:
                self._on_stopping(why)

    def _hup(self) -> None:
        if self._on_reload is not None:
            self._on_reload()
        else:
            self._log.info("SIGHUP received: nothing to reload")

    def _spawn(self, worker: WorkerInfo) -> None:
        if self.stopping:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # child: never return into the parent's event loop
            status = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                parent_end.close()
                for other in self.workers:
                    if other.control is not None:
                        other.control.close()
                _isolate({child_end.fileno(), *(s.fileno() for s in self._inherit)})
                status = self._target(worker.index, child_end)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        child_end.close()
        parent_end.setblocking(False)
        worker.control = parent_end
        worker.decoder = FrameDecoder()
        assert self._loop is not None
        self._loop.add_reader(parent_end.fileno(), self._on_control, worker)
        worker.pid = pid
        worker.alive = True
        worker.started = time.monotonic()
        if self._on_started is not None:
            self._on_started(worker.index)
        self._log.debug("worker %d started (pid %d)", worker.index, pid)

    def _on_control(self, worker: WorkerInfo) -> None:
        sock = worker.control
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_control(worker)
            return
        try:
            frames = worker.decoder.feed(data)
        except ValueError as exc:
            self._log.warning("worker %d: bad control frame: %s", worker.index, exc)
            return
        if self._on_message is not None:
            for frame in frames:
                self._on_message(worker.index, frame)

    def _close_control(self, worker: WorkerInfo) -> None:
        if worker.control is not None:
            if self._loop is not None:
                self._loop.remove_reader(worker.control.fileno())
            worker.control.close()
            worker.control = None

    def indices(self) -> list[int]:
        """Every worker slot."""
        return [w.index for w in self.workers]

    def is_alive(self, index: int) -> bool:
        """Whether the worker in slot ``index`` is running."""
        return self.workers[index].alive

    def send(self, index: int, payload: bytes) -> bool:
        """Send ``payload`` to one worker (asynchronously); False if it is not alive."""
        assert self._loop is not None
        worker = self.workers[index]
        if not worker.alive or worker.control is None:
            return False
        task = self._loop.create_task(self._send(worker.control, encode_frame(payload)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _send(self, sock: socket.socket, frame: bytes) -> None:
        assert self._loop is not None
        with contextlib.suppress(OSError):
            await self._loop.sock_sendall(sock, frame)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid and w.alive), None)
            if worker is None:
                continue
            worker.alive = False
            self._close_control(worker)
            code = os.waitstatus_to_exitcode(status)
            worker.last_exit = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            if self._on_exit is not None:
                self._on_exit(worker.index)
            if self.stopping:
                self._log.debug(
                    "worker %d (pid %d) stopped: %s", worker.index, pid, worker.last_exit
                )
                continue
            lived = time.monotonic() - worker.started
            worker.fast_failures = worker.fast_failures + 1 if lived < MIN_HEALTHY_LIFETIME else 0
            # One death restarts at once; only repeated early deaths back off.
            delay = 0.0
            if worker.fast_failures > 1:
                delay = min(MAX_RESTART_DELAY, 0.1 * 2 ** (worker.fast_failures - 2))
            worker.restarts += 1
            self._log.warning(
                "worker %d (pid %d) died (%s); restarting in %.1fs",
                worker.index,
                pid,
                worker.last_exit,
                delay,
            )
            assert self._loop is not None
            self._loop.call_later(delay, self._spawn, worker)

    async def _shutdown(self) -> int:
        for worker in self.workers:
            if worker.alive:
                try:
                    os.kill(worker.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self._timeout
        while any(w.alive for w in self.workers) and time.monotonic() < deadline:
            self._reap()
            await asyncio.sleep(0.02)
        status = 0
        for worker in self.workers:
            if worker.alive:
                self._log.error(
                    "worker %d (pid %d) did not stop within %.1fs; killing it",
                    worker.index,
                    worker.pid,
                    self._timeout,
                )
                try:
                    os.kill(worker.pid, signal.SIGKILL)
                    os.waitpid(worker.pid, 0)  # noqa: ASYNC222 - it is dead; returns at once
                except (ProcessLookupError, ChildProcessError):
                    pass
                worker.alive = False
                worker.last_exit = "killed by signal 9"
                self._close_control(worker)
                if self._on_exit is not None:
                    self._on_exit(worker.index)
                status = 1
            elif worker.last_exit != "exit status 0":
                self._log.warning("worker %d ended with %s", worker.index, worker.last_exit)
        return status

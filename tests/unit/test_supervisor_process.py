"""Unit tests for statsd_filter.supervisor.process.Supervisor, with tiny forked targets.

The supervisor runs inside an asyncio loop in the test process and forks it;
each child only runs the small target given here and leaves by ``os._exit``
(the supervisor does that). Targets talk back over their control socket, and
every wait in them is bounded, so a broken supervisor cannot leave a child
running for long; the harness also kills and reaps any child it started that
is still there at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from statsd_filter.protocol.frames import MAX_FRAME, FrameDecoder, encode_frame
from statsd_filter.supervisor import process as process_module
from statsd_filter.supervisor.process import Supervisor

LOG = logging.getLogger("test.supervisor")
CHILD_LIFETIME = 10.0  # no target child outlives this, whatever happens to the test
Target = Callable[[int, socket.socket], int]


# ------------------------------------------------------------------ targets (run in the child)
def say(control: socket.socket, payload: bytes) -> None:
    control.sendall(encode_frame(payload))


def ready_message(index: int) -> bytes:
    return b"ready %d %d" % (index, os.getpid())


def wait_for_term(index: int, control: socket.socket) -> int:
    """Report ready, then wait (bounded) for SIGTERM and exit 0 on it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    say(control, ready_message(index))
    got = signal.sigtimedwait({signal.SIGTERM}, CHILD_LIFETIME)
    return 0 if got is not None else 2


def exit_at_once(index: int, control: socket.socket) -> int:
    """Die straight away (a crash loop)."""
    return 3


def ignore_term_if_first(index: int, control: socket.socket) -> int:
    """Worker 0 ignores SIGTERM and lingers; the others stop on SIGTERM."""
    if index != 0:
        return wait_for_term(index, control)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    say(control, ready_message(index))
    time.sleep(CHILD_LIFETIME)
    return 0


def echo(index: int, control: socket.socket) -> int:
    """Answer every frame with 'index:' + the payload reversed; 'bye' ends it."""
    decoder = FrameDecoder()
    control.settimeout(CHILD_LIFETIME)
    say(control, ready_message(index))
    while True:
        data = control.recv(65536)
        if not data:
            return 0
        for frame in decoder.feed(data):
            if frame == b"bye":
                return 0
            say(control, b"%d:" % index + frame[::-1])


def garbage_then_ok(index: int, control: socket.socket) -> int:
    """Send an impossible frame header, wait for a frame, then send a good frame."""
    control.settimeout(CHILD_LIFETIME)
    control.sendall(struct.pack(">I", MAX_FRAME + 1) + b"junk")
    control.recv(64)
    say(control, b"after garbage")
    return wait_for_term(index, control)


# ------------------------------------------------------------------ harness (runs in the parent)
@dataclass
class Events:
    """What the supervisor's callbacks reported."""

    messages: list[tuple[int, bytes]] = field(default_factory=list)
    started: list[tuple[int, int, float]] = field(default_factory=list)  # index, pid, when
    exited: list[int] = field(default_factory=list)
    reloads: int = 0

    def ready(self) -> list[tuple[int, int]]:
        """(index, pid) of every ready message, in order."""
        out = []
        for index, payload in self.messages:
            if payload.startswith(b"ready "):
                _, got_index, pid = payload.split()
                assert int(got_index) == index
                out.append((index, int(pid)))
        return out


def supervisor(
    target: Target,
    count: int,
    shutdown_timeout: float = 3.0,
    *,
    reload: bool = True,
    stop_after_starts: int = 0,
    inherit: tuple[socket.socket, ...] = (),
) -> tuple[Supervisor, Events]:
    events = Events()
    sup: Supervisor

    def on_started(index: int) -> None:
        events.started.append((index, sup.workers[index].pid, time.monotonic()))
        if stop_after_starts and len(events.started) >= stop_after_starts:
            sup.request_stop("enough starts")

    def on_reload() -> None:
        events.reloads += 1

    sup = Supervisor(
        target,
        count,
        shutdown_timeout,
        LOG,
        on_worker_exit=events.exited.append,
        on_reload=on_reload if reload else None,
        on_message=lambda index, payload: events.messages.append((index, payload)),
        on_worker_started=on_started,
        inherit=inherit,
    )
    return sup, events


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def supervise(
    sup: Supervisor,
    events: Events,
    scenario: Callable[[asyncio.Task[int]], Awaitable[None]],
    run_timeout: float = 10.0,
) -> int:
    """Run the supervisor, play ``scenario`` against it, stop it; return run()'s status.

    Whatever happens, every child it forked is reaped before returning, and a
    normal run must leave none for us to reap.
    """

    async def main() -> int:
        task = asyncio.create_task(sup.run())
        try:
            await scenario(task)
        finally:
            sup.request_stop("test over")
            done, _ = await asyncio.wait({task}, timeout=run_timeout)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert done, "Supervisor.run() did not return after the stop request"
        return task.result()

    leftovers: list[int] = []
    try:
        return asyncio.run(main())
    finally:
        for _, pid, _ in events.started:
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # reaped by the supervisor, as it should be
            leftovers.append(pid)
            if reaped == 0:  # still running: ours, unreaped, so the pid is not reused
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        for worker in sup.workers:  # in case a failure left a control socket open
            if worker.control is not None:
                worker.control.close()
        assert leftovers == [], f"children the supervisor did not reap: {leftovers}"


def restart_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The delay of every restart the supervisor scheduled, from its log."""
    delays = []
    for record in caplog.records:
        if record.name == LOG.name and "restarting in" in record.msg:
            assert isinstance(record.args, tuple)
            delay = record.args[-1]
            assert isinstance(delay, float)
            delays.append(delay)
    return delays


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` is still one of our (unreaped) children."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


# ------------------------------------------------------------------ tests
def test_forks_count_workers_with_their_index() -> None:
    """run() forks one child per slot, each running target(index, control) in its own pid."""
    sup, events = supervisor(wait_for_term, 3)

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 3)
        ready = sorted(events.ready())
        assert [index for index, _ in ready] == [0, 1, 2]
        pids = {pid for _, pid in ready}
        assert len(pids) == 3
        assert os.getpid() not in pids
        assert pids == {w.pid for w in sup.workers}
        assert all(sup.is_alive(i) for i in sup.indices())
        assert sup.indices() == [0, 1, 2]
        assert sorted(index for index, _, _ in events.started) == [0, 1, 2]
        assert not task.done()

    assert supervise(sup, events, scenario) == 0
    assert events.exited.count(0) == events.exited.count(1) == events.exited.count(2) == 1


@pytest.mark.parametrize("how", ["request_stop", "SIGTERM", "SIGINT"])
def test_graceful_stop_terms_workers_and_returns_0(how: str) -> None:
    """A stop (call, SIGTERM or SIGINT to the supervisor) TERMs every worker; run() returns 0."""
    sup, events = supervisor(wait_for_term, 3)
    elapsed: list[float] = []

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 3)
        started = time.monotonic()
        if how == "request_stop":
            sup.request_stop()
        else:
            os.kill(os.getpid(), getattr(signal, how))
        await asyncio.wait_for(asyncio.shield(task), 5.0)
        elapsed.append(time.monotonic() - started)

    assert supervise(sup, events, scenario) == 0
    assert sup.stopping is True
    assert elapsed[0] < 2.5  # well inside shutdown_timeout: nobody was killed
    for worker in sup.workers:
        assert worker.alive is False
        assert worker.last_exit == "exit status 0"  # they got SIGTERM and left cleanly
        assert worker.restarts == 0
    assert len(events.started) == 3  # a stop does not restart anyone
    assert sorted(events.exited) == [0, 1, 2]


def test_dead_worker_is_restarted_in_its_slot() -> None:
    """A worker killed by SIGKILL is reaped and forked again at once in the same slot."""
    sup, events = supervisor(wait_for_term, 2)

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 2)
        old = sup.workers[1].pid
        os.kill(old, signal.SIGKILL)
        await until(lambda: len(events.ready()) == 3)
        index, new = events.ready()[-1]
        assert index == 1
        assert new != old
        assert sup.workers[1].pid == new
        assert not pid_exists(old)  # reaped, not a zombie
        assert sup.workers[1].restarts == 1
        assert sup.workers[1].last_exit == "killed by signal 9"
        assert sup.workers[1].alive
        assert sup.workers[0].restarts == 0
        assert events.exited == [1]
        assert [index for index, _, _ in events.started] == [0, 1, 1]
        assert not task.done()

    assert supervise(sup, events, scenario) == 0
    assert sup.workers[1].last_exit == "exit status 0"  # the replacement stopped cleanly


def test_crash_loop_backs_off_with_growing_delays(caplog: pytest.LogCaptureFixture) -> None:
    """A target that keeps dying at once is restarted after 0, 0.1, 0.2, 0.4 s..."""
    caplog.set_level(logging.WARNING, logger=LOG.name)
    sup, events = supervisor(exit_at_once, 1, stop_after_starts=5)
    assert supervise(sup, events, lambda task: until(task.done)) == 0
    times = [when for _, _, when in events.started]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(gaps) == 4
    # Lower bounds hold however loaded the machine is: each restart waits its delay.
    for gap, delay in zip(gaps[1:], [0.1, 0.2, 0.4], strict=True):
        assert gap >= delay * 0.95, (gaps, delay)
    assert restart_delays(caplog) == [0.0, 0.1, 0.2, 0.4]
    worker = sup.workers[0]
    assert worker.restarts == 4
    assert worker.fast_failures == 4
    assert events.exited == [0] * 5  # four deaths, and the fifth at the stop


def test_crash_loop_delay_is_capped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The crash-loop delay stops growing at MAX_RESTART_DELAY."""
    monkeypatch.setattr(process_module, "MAX_RESTART_DELAY", 0.15)
    caplog.set_level(logging.WARNING, logger=LOG.name)
    sup, events = supervisor(exit_at_once, 1, stop_after_starts=6)
    assert supervise(sup, events, lambda task: until(task.done)) == 0
    assert restart_delays(caplog) == [0.0, 0.1, 0.15, 0.15, 0.15]


def test_long_lived_worker_restarts_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that lived at least MIN_HEALTHY_LIFETIME is not crash looping: no delay."""
    monkeypatch.setattr(process_module, "MIN_HEALTHY_LIFETIME", 0.0)
    caplog.set_level(logging.WARNING, logger=LOG.name)
    sup, events = supervisor(exit_at_once, 1, stop_after_starts=5)
    assert supervise(sup, events, lambda task: until(task.done)) == 0
    assert restart_delays(caplog) == [0.0] * 4
    assert sup.workers[0].fast_failures == 0
    assert sup.workers[0].restarts == 4


def test_worker_ignoring_sigterm_is_killed_after_timeout() -> None:
    """A worker still alive shutdown_timeout after SIGTERM is SIGKILLed; run() returns 1."""
    sup, events = supervisor(ignore_term_if_first, 2, shutdown_timeout=0.3)
    timing: list[float] = []
    pids: list[int] = []

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 2)
        pids.extend(w.pid for w in sup.workers)
        started = time.monotonic()
        sup.request_stop()
        await asyncio.wait_for(asyncio.shield(task), 5.0)
        timing.append(time.monotonic() - started)

    assert supervise(sup, events, scenario) == 1
    assert 0.3 <= timing[0] < 3.0
    assert sup.workers[0].last_exit == "killed by signal 9"
    assert sup.workers[1].last_exit == "exit status 0"
    assert not any(w.alive for w in sup.workers)
    assert sorted(events.exited) == [0, 1]
    assert not any(pid_exists(pid) for pid in pids)


def test_send_and_on_message_round_trip() -> None:
    """send() frames reach the chosen worker in order; its frames come back to on_message."""
    sup, events = supervisor(echo, 2)
    big = bytes(range(256)) * 1000  # larger than one read on either side

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 2)
        events.messages.clear()
        assert sup.send(0, b"abc") is True
        assert sup.send(1, b"xyz") is True
        assert sup.send(0, b"") is True
        assert sup.send(0, big) is True
        assert sup.send(1, b"second") is True
        await until(lambda: len(events.messages) == 5)
        assert [m for m in events.messages if m[0] == 0] == [
            (0, b"0:cba"),
            (0, b"0:"),
            (0, b"0:" + big[::-1]),
        ]
        assert [m for m in events.messages if m[0] == 1] == [(1, b"1:zyx"), (1, b"1:dnoces")]

    assert supervise(sup, events, scenario) == 0


def test_send_to_a_dead_worker_is_false() -> None:
    """send() returns False for a worker that is not alive (here: after the stop)."""
    sup, events = supervisor(echo, 1)

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 1)
        sup.request_stop()
        await asyncio.wait_for(asyncio.shield(task), 5.0)
        assert sup.send(0, b"anyone?") is False

    supervise(sup, events, scenario)


def test_worker_leaving_is_restarted_and_talks_again() -> None:
    """A worker that exits 0 on its own is restarted; the new one gets the next send()."""
    sup, events = supervisor(echo, 1)

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 1)
        assert sup.send(0, b"bye")
        await until(lambda: len(events.ready()) == 2)
        assert sup.workers[0].last_exit == "exit status 0"
        assert sup.send(0, b"again")
        await until(lambda: (0, b"0:niaga") in events.messages)

    assert supervise(sup, events, scenario) == 0
    assert sup.workers[0].restarts == 1


def test_bad_frame_from_worker_is_survived(caplog: pytest.LogCaptureFixture) -> None:
    """A worker sending an impossible frame is logged; later good frames still arrive."""
    caplog.set_level(logging.WARNING, logger=LOG.name)
    sup, events = supervisor(garbage_then_ok, 1)

    def garbage_seen() -> bool:
        return any("bad control frame" in record.msg for record in caplog.records)

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(garbage_seen)  # the garbage arrived, on its own
        assert events.messages == []
        assert sup.send(0, b"go")
        await until(lambda: len(events.ready()) == 1)
        assert events.messages[0] == (0, b"after garbage")
        assert sup.workers[0].restarts == 0

    assert supervise(sup, events, scenario) == 0


def test_sighup_calls_on_reload() -> None:
    """SIGHUP to the supervisor calls on_reload once per signal; workers are untouched."""
    sup, events = supervisor(wait_for_term, 1)

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 1)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: events.reloads == 1)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: events.reloads == 2)
        assert not task.done()
        assert sup.workers[0].alive

    assert supervise(sup, events, scenario) == 0
    assert sup.workers[0].restarts == 0
    assert len(events.started) == 1


def test_sighup_without_on_reload_is_harmless() -> None:
    """Without on_reload, SIGHUP neither stops the supervisor nor touches the workers."""
    sup, events = supervisor(wait_for_term, 1, reload=False)

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(events.ready()) == 1)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.1)
        assert not task.done()
        assert sup.workers[0].alive

    assert supervise(sup, events, scenario) == 0
    assert len(events.started) == 1


def test_worker_keeps_only_inherited_descriptors() -> None:
    """A worker can use the sockets named in inherit; other parent sockets are cut off."""
    kept_parent, kept_child = socket.socketpair()
    other_parent, other_child = socket.socketpair()

    def target(index: int, control: socket.socket) -> int:
        kept_child.sendall(b"through inherit %d" % index)
        try:
            other_child.sendall(b"must not arrive")
        except OSError:
            say(control, b"other is cut off")
        return wait_for_term(index, control)

    sup, events = supervisor(target, 1, inherit=(kept_child,))
    try:

        async def scenario(task: asyncio.Task[int]) -> None:
            await until(lambda: len(events.ready()) == 1)
            assert events.messages[0] == (0, b"other is cut off")

        assert supervise(sup, events, scenario) == 0
        kept_parent.settimeout(5.0)
        assert kept_parent.recv(100) == b"through inherit 0"
        other_parent.setblocking(False)
        with pytest.raises(BlockingIOError):
            other_parent.recv(100)
    finally:
        for sock in (kept_parent, kept_child, other_parent, other_child):
            sock.close()

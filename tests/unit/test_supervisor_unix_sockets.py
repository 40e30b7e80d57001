"""Unit tests for statsd_filter.supervisor.sockets.bind_unix: stale files, clashes, modes."""

from __future__ import annotations

import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from statsd_filter.supervisor.sockets import StartupError, bind_unix


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for socket files (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
@pytest.mark.parametrize("mode", [0o722, 0o600, 0o777])
def test_socket_file_gets_the_mode_asked_for(sockdir: Path, kind: int, mode: int) -> None:
    """After bind the socket file has exactly the configured permissions, whatever the umask."""
    bound = bind_unix(str(sockdir / "s"), socket.SocketKind(kind), mode)
    try:
        info = (sockdir / "s").lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == mode
    finally:
        bound.close()
    assert not (sockdir / "s").exists()  # ours: removed on close


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_stale_socket_file_is_replaced(sockdir: Path, kind: int) -> None:
    """A socket file nobody serves (a crashed predecessor's) is removed and bound afresh."""
    path = sockdir / "s"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old.bind(str(path))
    old.close()  # the file stays behind
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe,
        pytest.raises(ConnectionRefusedError),
    ):
        probe.connect(str(path))
    bound = bind_unix(str(path), socket.SocketKind(kind), 0o722)
    try:
        with socket.socket(socket.AF_UNIX, kind) as client:
            client.connect(str(path))  # it is ours now, and serving
    finally:
        bound.close()


@pytest.mark.parametrize("live_kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_live_socket_is_a_clash_and_left_alone(sockdir: Path, live_kind: int) -> None:
    """A socket some process still serves is not stolen: exit 1, 'Address already in use'."""
    path = sockdir / "s"
    live = socket.socket(socket.AF_UNIX, live_kind)
    try:
        live.bind(str(path))
        if live_kind == socket.SOCK_STREAM:
            live.listen(1)
        inode = path.lstat().st_ino
        with pytest.raises(StartupError) as err:
            bind_unix(str(path), socket.SOCK_DGRAM, 0o722)
        assert err.value.status == 1
        assert str(err.value) == (
            f"cannot listen on unix socket {path}: Address already in use "
            "(another process serves this socket)"
        )
        assert path.lstat().st_ino == inode
    finally:
        live.close()


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p: p.write_text("precious"), "not a socket"),
        (lambda p: p.mkdir(), "a directory"),
        (lambda p: p.symlink_to("/dev/null"), "not a socket"),
    ],
)
def test_non_socket_at_the_path_exits_2_untouched(sockdir: Path, make: object, what: str) -> None:
    """A file, directory or symlink at the path is never removed: exit status 2, a clear reason."""
    path = sockdir / "s"
    make(path)  # type: ignore[operator]
    before = path.lstat()
    with pytest.raises(StartupError) as err:
        bind_unix(str(path), socket.SOCK_STREAM, 0o722)
    assert err.value.status == 2
    assert str(err.value) == (
        f"cannot listen on unix stream socket {path}: the path exists and is {what}; "
        "it was left untouched (remove it or choose another path)"
    )
    after = path.lstat()
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )


def test_missing_directory_is_a_startup_error(sockdir: Path) -> None:
    """A path in a directory that does not exist fails at start with the system's reason."""
    with pytest.raises(StartupError) as err:
        bind_unix(str(sockdir / "no" / "s"), socket.SOCK_DGRAM, 0o722)
    assert err.value.status == 1
    assert (
        str(err.value) == f"cannot listen on unix socket {sockdir}/no/s: No such file or directory"
    )


def test_close_leaves_a_replacement_socket_alone(sockdir: Path) -> None:
    """On close, the file is removed only if it is still the one we bound."""
    path = sockdir / "s"
    bound = bind_unix(str(path), socket.SOCK_DGRAM, 0o722)
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        other.bind(str(path))  # someone else's socket now has the path
        bound.close()
        assert path.exists()
    finally:
        other.close()

"""The sockets the supervisor binds before any worker exists.

Binding first means a port clash fails fast, with a clear message and exit
status 1, before anything is forked. Workers inherit what is bound here.

UDP: one socket shared by all workers, not SO_REUSEPORT, because SO_REUSEPORT
hashes each UDP source (address, port) to one socket, so a single busy client
would land on one worker however many exist; workers reading one shared socket
split even a single client's datagrams between them.

TCP: one SO_REUSEPORT listening socket per worker (:meth:`ListenSockets.open_tcp`).
Connections are long-lived and the kernel spreads them evenly by hash; with one
shared listening socket a burst of 64 clients all landed on one worker. The
supervisor keeps the port bound but not listening, which reserves it.

A ``listen_host`` that names several addresses (a name resolving to several,
or a comma-separated list) is listened on at every one of them, on the same
port: ``localhost`` is 127.0.0.1 and ::1 where the hosts file lists both, so a
client resolving ``localhost`` to either (Node.js 17 and later prefers ::1)
reaches the proxy. An address this host does not have (``::1`` with IPv6 off)
is skipped, not fatal.

Unix sockets (:func:`bind_unix`): one datagram socket and one listening stream
socket, each shared by every worker (Linux has no SO_REUSEPORT for Unix
sockets). As the Datadog agent does, a stale socket file at the path is
removed before binding and the file is chmod-ed to ``unix_socket_mode`` after;
a socket file some live process still listens on is a clash (exit 1, like a
port in use), and a path holding anything but a socket is never touched
(exit 2: the configuration names the wrong path). The supervisor removes its
socket files when it stops, if they are still the ones it bound.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import stat
from pathlib import Path

from statsd_filter.config import Settings

__all__ = [
    "ListenSockets",
    "StartupError",
    "UnixSocket",
    "bind_admin_socket",
    "bind_unix",
    "open_listen_sockets",
    "raise_open_file_limit",
    "udp_kernel_drops",
]

TCP_BACKLOG = 4096


class StartupError(Exception):
    """A socket could not be opened; the message says which and why.

    ``status`` is the exit status: 1 for a clash or a system error, 2 when
    the configuration itself is wrong (a Unix socket path holding a file).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class UnixSocket:
    """A bound Unix socket and the file it created (removed on close if still ours)."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._identity = _identity(Path(path))

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            path = Path(self.path)
            if _identity(path) == self._identity:
                path.unlink()


def _identity(path: Path) -> tuple[int, int, int]:
    """What tells one file from another at the same path (an inode alone may be reused)."""
    info = path.lstat()
    return info.st_dev, info.st_ino, info.st_ctime_ns


class ListenSockets:
    """The proxy's listening sockets, bound in the supervisor (one per address)."""

    def __init__(
        self,
        udp: list[socket.socket],
        tcp: list[socket.socket],
        port: int,
        tcp_addresses: list[tuple[int, tuple[object, ...], str]] | None = None,
        unix: UnixSocket | None = None,
        unix_stream: UnixSocket | None = None,
    ) -> None:
        self.udp = udp
        # Shared by every worker: the Unix datagram socket and stream listener.
        self.unix = unix
        self.unix_stream = unix_stream
        # The TCP port on each address, bound (SO_REUSEPORT) but not listening:
        # it reserves the port and fails fast on a clash; each worker listens on
        # its own sockets.
        self.tcp = tcp
        self.port = port
        self._tcp_addresses = tcp_addresses or []

    def open_tcp(self) -> list[socket.socket]:
        """New listening sockets on the TCP port, one per address, for one worker."""
        socks = []
        for family, address, host in self._tcp_addresses:
            sock = _new_socket(family, socket.SOCK_STREAM, host)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(TCP_BACKLOG)
            sock.setblocking(False)
            socks.append(sock)
        return socks

    def close(self) -> None:
        for sock in (*self.udp, *self.tcp):
            sock.close()
        for unix in (self.unix, self.unix_stream):
            if unix is not None:
                unix.close()


def _bind_address(host: str, port: int, kind: socket.SocketKind) -> tuple[int, tuple[object, ...]]:
    return _bind_addresses(host, port, kind)[0]


def _bind_addresses(
    host: str, port: int, kind: socket.SocketKind
) -> list[tuple[int, tuple[object, ...]]]:
    """Every distinct address of ``host`` (a name, an address, or several, comma-
    separated), in the order given and resolved."""
    found: dict[tuple[int, tuple[object, ...]], None] = {}
    for name in (part.strip().removeprefix("[").removesuffix("]") for part in host.split(",")):
        if name:
            infos = socket.getaddrinfo(name, port, type=kind, flags=socket.AI_PASSIVE)
            found.update(dict.fromkeys((family, address) for family, _, _, _, address in infos))
    return list(found)


def _new_socket(family: int, kind: socket.SocketKind, host: str) -> socket.socket:
    sock = socket.socket(family, kind)
    if family == socket.AF_INET6 and host in ("::", ""):
        # "::" means every address, IPv4 included.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


def set_receive_buffer(sock: socket.socket, wanted: int, log: logging.Logger) -> int:
    """Ask for a ``wanted``-byte receive buffer; log clearly if the kernel caps it."""
    if wanted <= 0:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        # Privileged processes may exceed net.core.rmem_max; others fall back.
        if force is not None:
            sock.setsockopt(socket.SOL_SOCKET, force, wanted)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    # Linux reports twice the usable size (it counts its bookkeeping overhead).
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    if got < wanted:
        log.warning(
            "UDP receive buffer capped at %d bytes (asked for %d by so_rcvbuf); raise the "
            "kernel limit with: sysctl -w net.core.rmem_max=%d",
            got,
            wanted,
            wanted,
        )
    else:
        log.info("UDP receive buffer: %d bytes", got)
    return got


def _bind_at(
    family: int, address: tuple[object, ...], port: int, kind: socket.SocketKind, host: str
) -> socket.socket | None:
    """A socket bound to ``address`` with ``port``; None if this host lacks the address."""
    sock = _new_socket(family, kind, host)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address[0], port, *address[2:]))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            return None
        name = "udp" if kind == socket.SOCK_DGRAM else "tcp"
        raise StartupError(f"cannot listen on {name} {host}:{port}: {exc.strerror}") from exc
    return sock


def open_listen_sockets(settings: Settings, log: logging.Logger) -> ListenSockets:
    """Bind the UDP and TCP listeners on one port at every address of ``listen_host``
    (port 0 picks a free port, the same for all)."""
    host, port = settings.listen_host, settings.listen_port
    udp: list[socket.socket] = []
    tcp: list[socket.socket] = []
    tcp_addresses: list[tuple[int, tuple[object, ...], str]] = []
    try:
        kinds = [
            kind
            for kind, name in ((socket.SOCK_DGRAM, "udp"), (socket.SOCK_STREAM, "tcp"))
            if name in settings.protocols
        ]
        skipped = []
        for kind in kinds:
            for family, address in _bind_addresses(host, port, kind):
                sock = _bind_at(family, address, port, kind, host)
                if sock is None:
                    skipped.append(str(address[0]))
                    continue
                port = sock.getsockname()[1]
                if kind == socket.SOCK_DGRAM:
                    set_receive_buffer(sock, settings.so_rcvbuf, log)
                    sock.setblocking(False)
                    udp.append(sock)
                else:
                    tcp.append(sock)
                    tcp_addresses.append((family, sock.getsockname(), host))
    except socket.gaierror as exc:
        for sock in (*udp, *tcp):
            sock.close()
        raise StartupError(f"cannot resolve listen_host {host!r}: {exc}") from exc
    except BaseException:
        for sock in (*udp, *tcp):
            sock.close()
        raise
    if kinds and not (udp or tcp):
        raise StartupError(f"cannot listen on {host}:{port}: no usable address")
    for missing in dict.fromkeys(skipped):
        log.warning("listen_host %s: address %s is not available here; skipped", host, missing)
    unix = unix_stream = None
    try:
        if settings.unix_socket is not None:
            # No receive buffer to size: a Unix datagram queue is bounded by its
            # length (sysctl net.unix.max_dgram_qlen) and by each sender's send
            # buffer, and a full queue blocks (or EAGAINs) the sender: nothing is lost.
            unix = bind_unix(settings.unix_socket, socket.SOCK_DGRAM, settings.unix_socket_mode)
            if settings.unix_origin_detection:
                unix.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if settings.unix_stream_socket is not None:
            unix_stream = bind_unix(
                settings.unix_stream_socket, socket.SOCK_STREAM, settings.unix_socket_mode
            )
    except BaseException:
        for sock in (*udp, *tcp):
            sock.close()
        if unix is not None:
            unix.close()
        raise
    return ListenSockets(udp, tcp, port, tcp_addresses, unix, unix_stream)


def _clear_stale_socket(path: str, kind: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``path``."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot listen on {kind} {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(info.st_mode):
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a socket"
        raise StartupError(
            f"cannot listen on {kind} {path}: the path exists and is {what}; "
            "it was left untouched (remove it or choose another path)",
            status=2,
        )
    for probe_kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_UNIX, probe_kind) as probe:
            try:
                probe.connect(path)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EPROTOTYPE):
                    continue  # nobody there (or the other kind): try the next one
                break
            raise StartupError(
                f"cannot listen on {kind} {path}: Address already in use "
                "(another process serves this socket)"
            )
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {kind} {path}: cannot remove the stale socket: {exc.strerror}"
        ) from exc


def bind_unix(path: str, kind: socket.SocketKind, mode: int) -> UnixSocket:
    """Bind (and for a stream, listen on) a Unix socket at ``path``, chmod-ed to ``mode``."""
    name = "unix stream socket" if kind == socket.SOCK_STREAM else "unix socket"
    _clear_stale_socket(path, name)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {name} {path}: {exc.strerror or exc}") from exc
    try:
        Path(path).chmod(mode)
        bound = UnixSocket(sock, path)  # after chmod, which changes what identifies the file
        if kind == socket.SOCK_STREAM:
            sock.listen(TCP_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            Path(path).unlink()
        raise StartupError(f"cannot listen on {name} {path}: {exc.strerror or exc}") from exc
    return bound


def bind_admin_socket(settings: Settings) -> socket.socket:
    """The admin HTTP endpoint's listening socket."""
    host, port = settings.admin_host, settings.admin_port
    try:
        family, address = _bind_address(host, port, socket.SOCK_STREAM)
        sock = _new_socket(family, socket.SOCK_STREAM, host)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(TCP_BACKLOG)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on admin http {host}:{port}: {exc.strerror or exc}"
        ) from exc
    sock.setblocking(False)
    return sock


def raise_open_file_limit(log: logging.Logger) -> None:
    """Thousands of TCP clients need thousands of descriptors: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)


def udp_kernel_drops(socks: list[socket.socket]) -> int:
    """Datagrams the kernel dropped on these sockets (the ``drops`` column of /proc/net/udp)."""
    inodes = {str(os.fstat(sock.fileno()).st_ino) for sock in socks}
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 12 and fields[9] in inodes:
                    drops += int(fields[12])
    return drops

"""Upstream descriptions as configured: ``--target host:port`` and ``[[upstreams]]`` tables.

::

    [[upstreams]]
    address = "statsd-1.internal:8125"   # host:port, [v6]:port
    protocol = "udp"                     # udp (default: target_protocol) or tcp
    weight = 100                         # consistent-hash weight (proxy.js uses 100)
    admin_port = 8126                    # optional: StatsD admin port for `health` checks

    [[upstreams]]
    address = "unix:///var/run/datadog/dsd.socket"   # a Unix datagram socket
    # or "unix+stream:///path": a Unix stream socket, length-prefixed payloads

The node id on the hash ring is the address exactly as written (``host:port``,
``unix:///path``), which is what Etsy StatsD's proxy.js hashes, so the same
node list places every metric name on the same server. A Unix address names its
protocol (``unix`` or ``unix+stream``) by its scheme; ``protocol`` may repeat it
but not contradict it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "UNIX_PROTOCOLS",
    "UPSTREAM_KEYS",
    "UpstreamSpec",
    "check_socket_path",
    "parse_address",
    "parse_upstreams",
]

UPSTREAM_KEYS = ("address", "protocol", "weight", "admin_port")
MAX_UPSTREAMS = 64  # per-upstream counter rows reserved in shared memory
# Address scheme -> protocol of a Unix socket upstream.
UNIX_SCHEMES = {"unix://": "unix", "unix+stream://": "unix+stream"}
UNIX_PROTOCOLS = frozenset(UNIX_SCHEMES.values())
# sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


def check_socket_path(path: str) -> None:
    """ValueError unless ``path`` can name a Unix socket."""
    if "\0" in path:
        raise ValueError(f"{path!r} contains a NUL byte")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_SOCKET_PATH:
        raise ValueError(
            f"{path!r} is {size} bytes long; Unix socket paths are limited to "
            f"{MAX_SOCKET_PATH} bytes"
        )


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream server."""

    host: str
    port: int
    protocol: str = ""  # "" until settings fill in target_protocol
    weight: int = 100
    admin_port: int | None = None

    @property
    def is_unix(self) -> bool:
        """A Unix socket upstream: ``host`` is the socket's path, ``port`` is 0."""
        return self.protocol in UNIX_PROTOCOLS

    @property
    def address(self) -> str:
        """``host:port`` or ``unix:///path`` as written (the hash ring's node id)."""
        if self.is_unix:
            return f"{self.protocol}://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _parse_unix(text: str) -> tuple[str, str] | None:
    """``unix:///path`` or ``unix+stream:///path`` into (path, protocol); None if
    ``text`` is not a Unix address."""
    scheme, sep, path = text.partition("://")
    if not sep:
        return None
    protocol = UNIX_SCHEMES.get(scheme + sep)
    if protocol is None:
        if scheme in ("unixgram", "unixstream"):
            raise ValueError(
                f"{text!r}: write unix:///path (datagram) or unix+stream:///path (stream)"
            )
        raise ValueError(
            f"{text!r} is not host:port, unix:///path or unix+stream:///path "
            f"(unknown scheme {scheme!r})"
        )
    if not path.startswith("/"):
        raise ValueError(f"{text!r}: the socket path must be absolute ({scheme}:///path)")
    check_socket_path(path)
    return path, protocol


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into (host, port); ValueError with a reason."""
    text = text.strip()
    if "://" in text:
        raise ValueError(f"{text!r} is a Unix socket address, not host:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [address]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r} is not host:port (write IPv6 as [addr]:port)")
    if not host:
        raise ValueError(f"{text!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r} has no valid port") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range (1-65535)")
    return host, port


def parse_upstreams(raw: object, default_protocol: str = "") -> tuple[UpstreamSpec, ...]:
    """Validate ``[[upstreams]]`` tables (or a list of ``host:port`` strings)."""
    if isinstance(raw, str):
        raw = [part for part in raw.split(",") if part.strip()]
    if not isinstance(raw, list):
        raise ValueError("expected [[upstreams]] tables or a list of host:port strings")
    specs: list[UpstreamSpec] = []
    for i, item in enumerate(raw, 1):
        if isinstance(item, str):
            unix = _parse_unix(item.strip())
            if unix is not None:
                specs.append(UpstreamSpec(unix[0], 0, unix[1]))
                continue
            host, port = parse_address(item)
            specs.append(UpstreamSpec(host, port, default_protocol))
            continue
        if not isinstance(item, dict):
            raise ValueError(f"upstream #{i} must be a table or a host:port string")
        for key in item:
            if key not in UPSTREAM_KEYS:
                known = ", ".join(UPSTREAM_KEYS)
                raise ValueError(f"upstream #{i}: unknown key {key!r} (known: {known})")
        address = item.get("address")
        if not isinstance(address, str):
            raise ValueError(f'upstream #{i}: needs address = "host:port" or "unix:///path"')
        unix = _parse_unix(address.strip())
        if unix is not None:
            host, port = unix[0], 0
            protocol = item.get("protocol", unix[1])
            if protocol != unix[1]:
                raise ValueError(
                    f"upstream {address}: protocol {protocol!r} contradicts the address "
                    f"(a {unix[1]}:// address is protocol {unix[1]!r})"
                )
        else:
            host, port = parse_address(address)
            protocol = item.get("protocol", default_protocol)
            if protocol not in ("udp", "tcp", ""):
                raise ValueError(
                    f"upstream {address}: protocol {protocol!r} is not udp or tcp "
                    "(a Unix socket is written unix:///path or unix+stream:///path)"
                )
        weight = item.get("weight", 100)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ValueError(f"upstream {address}: weight must be an integer >= 1")
        admin_port = item.get("admin_port")
        if admin_port is not None and (
            isinstance(admin_port, bool)
            or not isinstance(admin_port, int)
            or not 1 <= admin_port <= 65535
        ):
            raise ValueError(f"upstream {address}: admin_port must be a port number")
        if admin_port is not None and unix is not None:
            raise ValueError(f"upstream {address}: admin_port needs a host:port upstream")
        specs.append(UpstreamSpec(host, port, protocol, weight, admin_port))
    addresses = [s.address for s in specs]
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        raise ValueError(f"upstream {duplicates[0]} is listed twice")
    if len(specs) > MAX_UPSTREAMS:
        raise ValueError(f"at most {MAX_UPSTREAMS} upstreams are supported, got {len(specs)}")
    return tuple(specs)

"""Every setting, described once: name, parser, default, help.

:data:`OPTIONS` is the single table the CLI flags, the environment reader, the
TOML reader and the README's settings table all derive from, so they cannot
drift apart. Each parser takes a raw value (a string from the environment or
the command line, or a TOML value) and returns the typed value or raises
ValueError with a reason; :mod:`statsd_filter.config` adds which setting and
which source.

The file is long on purpose: it is that table, one entry per setting (every
setting added since the first release landed here), and splitting a table
that must be read whole to know what can be configured would only scatter it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from statsd_filter.logs import LOG_FORMATS
from statsd_filter.rules.aggregate import FLAVORS
from statsd_filter.rules.model import parse_rules
from statsd_filter.upstream.spec import check_socket_path, parse_upstreams

__all__ = [
    "ENV_PREFIX",
    "HOT_SETTINGS",
    "LEGACY_ENV",
    "OPTIONS",
    "OPTIONS_BY_NAME",
    "PROTOCOLS",
    "Option",
]

ENV_PREFIX = "STATSD_FILTER_"
# The original proxy's variables, read exactly as it named them.
LEGACY_ENV = {
    "listen_port": "listen_port",
    "target_host": "target_host",
    "target_port": "target_port",
    "blocklist": "blocklist",
    "num_threads": "workers",
}
PROTOCOLS = ("udp", "tcp")
LOG_LEVELS = ("debug", "info", "warning", "error")
UPSTREAM_MODES = ("shard", "mirror")


# ---------------------------------------------------------------- value parsers
# Each parser takes the raw value (a string from env/CLI, or a TOML value) and
# returns the typed value or raises ValueError with a reason.


def _int_in(low: int, high: int | None) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip().replace("_", ""), 10)
            except ValueError:
                raise ValueError(f"{raw!r} is not an integer") from None
        else:
            raise ValueError(f"expected an integer, got {type(raw).__name__}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"{value} is out of range: must be {bound}")
        return value

    return parse


def _float_in(
    low: float, *, exclusive: bool = False, high: float | None = None
) -> Callable[[object], float]:
    def parse(raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError("expected a number, got a boolean")
        if isinstance(raw, int | float):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise ValueError(f"{raw!r} is not a number") from None
        else:
            raise ValueError(f"expected a number, got {type(raw).__name__}")
        if value != value or value in (float("inf"), float("-inf")):  # noqa: PLR0124 - NaN check
            raise ValueError(f"{raw!r} is not a finite number")
        if value < low or (exclusive and value == low):
            raise ValueError(
                f"{value:g} is out of range: must be {'>' if exclusive else '>='} {low:g}"
            )
        if high is not None and value > high:
            raise ValueError(f"{value:g} is out of range: must be <= {high:g}")
        return value

    return parse


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        value = _text(raw).lower()
        if value not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"{raw!r} is not a boolean (use true or false)")


def _str_list(raw: object) -> tuple[str, ...]:
    # Strings are comma-separated (env, CLI, and the original's `blocklist`).
    if isinstance(raw, str):
        items: list[object] = list(raw.split(","))
    elif isinstance(raw, list):
        items = list(raw)
    else:
        raise ValueError(f"expected a list of strings, got {type(raw).__name__}")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected a list of strings, found {item!r}")
        if "\n" in item:
            raise ValueError(f"{item!r} contains a newline")
        if item.strip():
            out.append(item.strip())
    return tuple(dict.fromkeys(out))


def _protocols(raw: object) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(v.lower() for v in _str_list(raw)))
    if not values:
        raise ValueError("at least one of udp, tcp is required")
    for value in values:
        if value not in PROTOCOLS:
            raise ValueError(f"{value!r} is not one of udp, tcp")
    return values


def _host(raw: object) -> str:
    value = _text(raw)
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return value


def _socket_path(raw: object) -> str | None:
    # An empty path means "no socket" (how check-config writes an unset one).
    if isinstance(raw, str) and not raw.strip():
        return None
    value = _text(raw)
    check_socket_path(value)
    return value


def _mode(raw: object) -> int:
    # Strings are octal as chmod writes them ("0722", "722", "0o722"); a TOML
    # integer must be written in octal (0o722): decimal 722 is not what anyone means.
    if isinstance(raw, bool):
        raise ValueError("expected a file mode, got a boolean")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str):
        text = raw.strip().lower().removeprefix("0o")
        try:
            value = int(text, 8)
        except ValueError:
            raise ValueError(f"{raw!r} is not an octal file mode (like 0722)") from None
    else:
        raise ValueError(f"expected an octal file mode, got {type(raw).__name__}")
    if not 0 <= value <= 0o777:
        raise ValueError(
            f'{raw!r} is not a file mode between 0 and 0777 (in TOML write 0o722 or "0722")'
        )
    return value


@dataclass(frozen=True)
class Option:
    """One setting: its name (TOML key), parser, default and help text."""

    name: str
    parse: Callable[[object], Any]
    default: Any
    help: str
    metavar: str = "VALUE"
    flag_kind: str = "value"  # "value", "bool", "list", or "toml" (config file only)
    default_text: str | None = None  # how the README shows a computed default
    choices: tuple[str, ...] = ()  # the values shell completion offers (the parser checks)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


_PORT = _int_in(0, 65535)
OPTIONS: tuple[Option, ...] = (
    Option(
        "listen_host",
        _host,
        "127.0.0.1",
        "address(es) to listen on: a name means every address it resolves to; "
        "comma-separated for several; 0.0.0.0 or :: for all",
        "HOST",
    ),
    Option("listen_port", _PORT, 8125, "UDP and TCP port to listen on", "PORT"),
    Option(
        "protocols",
        _protocols,
        ("udp", "tcp"),
        "listeners to open: udp,tcp",
        "LIST",
        "list",
        choices=PROTOCOLS,
    ),
    Option("target_host", _host, "localhost", "upstream StatsD host (name or address)", "HOST"),
    Option("target_port", _int_in(1, 65535), 8126, "upstream StatsD port", "PORT"),
    Option(
        "target_protocol",
        _choice(PROTOCOLS),
        "udp",
        "upstream protocol: udp or tcp",
        "PROTO",
        choices=PROTOCOLS,
    ),
    Option(
        "target",
        parse_upstreams,
        (),
        "several upstreams as host:port, unix:///path or unix+stream:///path "
        "(replaces target_host/target_port)",
        "ADDRESS",
        "list",
    ),
    Option(
        "upstream_mode",
        _choice(UPSTREAM_MODES),
        "shard",
        "with several upstreams: shard (consistent hash on the name) or mirror (all get all)",
        "MODE",
        choices=UPSTREAM_MODES,
    ),
    Option(
        "health_interval",
        _float_in(0.05),
        1.0,
        "seconds between upstream health checks",
        "SECONDS",
    ),
    Option(
        "blocklist", _str_list, (), "drop lines starting with these prefixes", "PREFIXES", "list"
    ),
    Option(
        "workers",
        _int_in(1, 1024),
        None,
        "worker processes",
        "N",
        default_text="CPUs available",
    ),
    Option("max_udp_size", _int_in(64, 65507), 1432, "largest upstream UDP datagram", "BYTES"),
    Option("max_line_bytes", _int_in(16, 1 << 20), 8192, "longest accepted line", "BYTES"),
    Option(
        "max_read_delay",
        _float_in(0, high=1.0),
        0.02,
        "longest a UDP datagram waits in the socket, so moderate traffic is read in batches "
        "(0: read at once)",
        "SECONDS",
    ),
    Option(
        "so_rcvbuf", _int_in(0, 1 << 30), 4 << 20, "UDP receive buffer (0: OS default)", "BYTES"
    ),
    Option("tcp_idle_timeout", _float_in(0), 300.0, "close idle TCP clients (0: never)", "SECONDS"),
    Option("max_connections", _int_in(1, 1 << 20), 10000, "TCP clients per worker", "N"),
    Option(
        "unix_socket",
        _socket_path,
        None,
        "also listen on this Unix datagram socket, e.g. DogStatsD's dsd.socket (empty: none)",
        "PATH",
        default_text="(none)",
    ),
    Option(
        "unix_stream_socket",
        _socket_path,
        None,
        "also listen on this Unix stream socket (empty: none)",
        "PATH",
        default_text="(none)",
    ),
    Option(
        "unix_stream_framing",
        _choice(("length", "newline")),
        "length",
        "unix stream payloads: length (4-byte little-endian prefix, DogStatsD) or newline",
        "FRAMING",
    ),
    Option(
        "unix_socket_mode",
        _mode,
        0o722,
        "permissions of the Unix socket files (octal), set after bind",
        "MODE",
        default_text="0722",
    ),
    Option(
        "unix_socket_max_payload",
        _int_in(512, 1 << 20),
        65536,
        "largest Unix datagram or stream payload accepted",
        "BYTES",
    ),
    Option(
        "unix_upstream_max_payload",
        _int_in(64, 1 << 20),
        8192,
        "largest datagram or frame sent to a unix:// or unix+stream:// upstream",
        "BYTES",
    ),
    Option(
        "unix_origin_detection",
        _bool,
        False,
        "tag lines from Unix sockets with the sender's container id (DogStatsD's c: field)",
        flag_kind="bool",
    ),
    Option(
        "procfs_path",
        _text,
        "/proc",
        "where /proc is mounted: origin detection reads its PID/cgroup files",
        "PATH",
    ),
    Option(
        "upstream_buffer_bytes",
        _int_in(1024, 1 << 32),
        8 << 20,
        "per-worker buffer for a slow or absent upstream (oldest lines dropped beyond it)",
        "BYTES",
    ),
    Option(
        "shutdown_timeout", _float_in(0, exclusive=True), 5.0, "graceful drain limit", "SECONDS"
    ),
    Option("admin", _bool, True, "serve /healthz and /metrics over HTTP", flag_kind="bool"),
    Option("admin_host", _host, "127.0.0.1", "admin HTTP address", "HOST"),
    Option("admin_port", _PORT, 8127, "admin HTTP port", "PORT"),
    Option(
        "top",
        _bool,
        True,
        "sample traffic for /top, /tap, the status page and `statsd-filter top`",
        flag_kind="bool",
    ),
    Option(
        "top_sample_rate",
        _int_in(1, 1_000_000),
        1000,
        "sample points per second per worker (less traffic than that is seen whole)",
        "N",
    ),
    Option(
        "top_window",
        # The supervisor keeps every report of the window: memory grows with it.
        _float_in(1.0, high=600.0),
        10.0,
        "seconds of samples the /top rates are averaged over",
        "SECONDS",
    ),
    Option(
        "tap_max_watchers", _int_in(0, 64), 4, "concurrent /tap streams (more are refused)", "N"
    ),
    Option(
        "log_level",
        _choice(LOG_LEVELS),
        "info",
        "debug, info, warning or error",
        "LEVEL",
        choices=LOG_LEVELS,
    ),
    Option(
        "log_format",
        _choice(LOG_FORMATS),
        "text",
        "text, or json (one JSON object per line: time, level, process, message, fields)",
        "FORMAT",
        choices=LOG_FORMATS,
    ),
    Option(
        "allowlist_mode",
        _bool,
        False,
        "drop lines that no allow rule matches",
        flag_kind="bool",
    ),
    Option(
        "watch_config",
        _bool,
        False,
        "reload the config file when it changes (as on SIGHUP)",
        flag_kind="bool",
    ),
    Option(
        "limit_memory",
        _int_in(1 << 20, 1 << 40),
        128 << 20,
        "shared memory for the tables of limit rules (pages are used only as tables fill)",
        "BYTES",
    ),
    Option(
        "aggregate",
        _bool,
        False,
        "pre-aggregate every line the rules pass: one line per series per flush_interval "
        '(rules with action = "aggregate" aggregate only what they match)',
        flag_kind="bool",
    ),
    Option(
        "flush_interval",
        _float_in(0.05, high=60.0),
        1.0,
        "seconds between pre-aggregation flushes",
        "SECONDS",
    ),
    Option(
        "aggregate_max_series",
        _int_in(1, 10_000_000),
        20_000,
        "live aggregated series per worker; at the cap the worker flushes early",
        "N",
    ),
    Option(
        "upstream_flavor",
        _choice(FLAVORS),
        "etsy",
        "the upstream server, for what pre-aggregation may send it: packed timer values "
        "(datadog, statsd_exporter) or one per line; gauge deltas or not (see README)",
        "FLAVOR",
        choices=FLAVORS,
    ),
    Option("rules", parse_rules, (), "ordered [[rules]] tables (see README)", flag_kind="toml"),
    Option("upstreams", parse_upstreams, (), "[[upstreams]] tables (see README)", flag_kind="toml"),
)
# Settings a running proxy can take on reload; the others need new sockets or
# processes and are reported as needing a restart.
HOT_SETTINGS = frozenset(
    {
        "blocklist",
        "rules",
        "allowlist_mode",
        "max_line_bytes",
        "max_read_delay",
        "log_level",
        "aggregate",
        "flush_interval",
        "aggregate_max_series",
        "upstream_flavor",
    }
)
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}

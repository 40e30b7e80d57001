"""Settings: one frozen, validated object built from layered sources.

Layers, lowest to highest: built-in defaults < TOML file (``--config``) <
environment < command-line flags. Every setting is described once in
:data:`OPTIONS`; the CLI, the environment reader, the TOML reader and the
settings table in the README all derive from that table, so they cannot drift
apart. Each value remembers where it came from, so an error names both the
setting and its source, and ``check-config`` can show them.

Environment: ``STATSD_FILTER_<NAME>`` for every setting, plus the variables the
original OCaml proxy read (``listen_port``, ``target_host``, ``target_port``,
``blocklist``, ``num_threads``), which rank just below the prefixed ones.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statsd_filter.rules.model import RuleSpec, parse_rules
from statsd_filter.upstream.spec import UpstreamSpec, parse_upstreams

__all__ = [
    "OPTIONS",
    "ConfigError",
    "Option",
    "Settings",
    "available_cpus",
    "load_settings",
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


class ConfigError(Exception):
    """A setting has a bad value; the message names the setting and its source."""

    def __init__(self, message: str, setting: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting
        self.source = source


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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


def _float_in(low: float, *, exclusive: bool = False) -> Callable[[object], float]:
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

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


_PORT = _int_in(0, 65535)
OPTIONS: tuple[Option, ...] = (
    Option(
        "listen_host", _host, "127.0.0.1", "address to listen on (0.0.0.0 or :: for all)", "HOST"
    ),
    Option("listen_port", _PORT, 8125, "UDP and TCP port to listen on", "PORT"),
    Option("protocols", _protocols, ("udp", "tcp"), "listeners to open: udp,tcp", "LIST", "list"),
    Option("target_host", _host, "localhost", "upstream StatsD host (name or address)", "HOST"),
    Option("target_port", _int_in(1, 65535), 8126, "upstream StatsD port", "PORT"),
    Option("target_protocol", _choice(PROTOCOLS), "udp", "upstream protocol: udp or tcp", "PROTO"),
    Option(
        "target",
        parse_upstreams,
        (),
        "several upstreams as host:port (replaces target_host/target_port)",
        "HOST:PORT",
        "list",
    ),
    Option(
        "upstream_mode",
        _choice(("shard", "mirror")),
        "shard",
        "with several upstreams: shard (consistent hash on the name) or mirror (all get all)",
        "MODE",
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
        "so_rcvbuf", _int_in(0, 1 << 30), 4 << 20, "UDP receive buffer (0: OS default)", "BYTES"
    ),
    Option("tcp_idle_timeout", _float_in(0), 300.0, "close idle TCP clients (0: never)", "SECONDS"),
    Option("max_connections", _int_in(1, 1 << 20), 10000, "TCP clients per worker", "N"),
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
    Option("log_level", _choice(LOG_LEVELS), "info", "debug, info, warning or error", "LEVEL"),
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
    Option("rules", parse_rules, (), "ordered [[rules]] tables (see README)", flag_kind="toml"),
    Option("upstreams", parse_upstreams, (), "[[upstreams]] tables (see README)", flag_kind="toml"),
)
# Settings a running proxy can take on reload; the others need new sockets or
# processes and are reported as needing a restart.
HOT_SETTINGS = frozenset({"blocklist", "rules", "allowlist_mode", "max_line_bytes", "log_level"})
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Build it with :func:`load_settings`."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8125
    protocols: tuple[str, ...] = ("udp", "tcp")
    target_host: str = "localhost"
    target_port: int = 8126
    target_protocol: str = "udp"
    target: tuple[UpstreamSpec, ...] = ()
    upstream_mode: str = "shard"
    health_interval: float = 1.0
    blocklist: tuple[str, ...] = ()
    workers: int = 1
    max_udp_size: int = 1432
    max_line_bytes: int = 8192
    so_rcvbuf: int = 4 << 20
    tcp_idle_timeout: float = 300.0
    max_connections: int = 10000
    upstream_buffer_bytes: int = 8 << 20
    shutdown_timeout: float = 5.0
    admin: bool = True
    admin_host: str = "127.0.0.1"
    admin_port: int = 8127
    log_level: str = "info"
    allowlist_mode: bool = False
    watch_config: bool = False
    rules: tuple[RuleSpec, ...] = ()
    upstreams: tuple[UpstreamSpec, ...] = ()
    # The TOML file the settings were read from, if any (reloads read it again).
    config_file: str | None = None
    # Where each value came from ("default", "config file X", ...); not a setting.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (lists for tuples), without sources."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("sources", "config_file", "rules", "upstreams"):
                continue
            value = getattr(self, f.name)
            if f.name == "target":
                value = [u.address for u in value]
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _read_toml(path: Path) -> dict[str, Any]:
    source = f"config file {path}"
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror or exc}", "config"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", "config") from exc
    for key in data:
        if key not in OPTIONS_BY_NAME:
            known = ", ".join(sorted(OPTIONS_BY_NAME))
            raise ConfigError(f"unknown setting {key!r} in {source} (known: {known})", key, source)
    return data


def load_settings(
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Layer defaults < TOML file < environment < CLI, validate, and freeze.

    ``cli`` maps setting names to raw values (``None`` means "not given").
    Raises :class:`ConfigError` naming the first bad setting and its source.
    """
    env = os.environ if env is None else env
    raw: dict[str, tuple[object, str]] = {}

    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = env[ENV_PREFIX + "CONFIG"]
    if config_file is not None:
        path = Path(config_file)
        for key, value in _read_toml(path).items():
            raw[key] = (value, f"config file {path}")
    for legacy, name in LEGACY_ENV.items():
        if legacy in env:
            raw[name] = (env[legacy], f"environment variable {legacy}")
    for option in OPTIONS:
        if option.flag_kind != "toml" and option.env in env:
            raw[option.name] = (env[option.env], f"environment variable {option.env}")
    for name, value in (cli or {}).items():
        if value is not None:
            raw[name] = (value, f"command-line flag {OPTIONS_BY_NAME[name].flag}")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        if option.name in raw:
            value, source = raw[option.name]
            try:
                values[option.name] = option.parse(value)
            except ValueError as exc:
                raise ConfigError(
                    f"invalid {option.name} from {source}: {exc}", option.name, source
                ) from None
            sources[option.name] = source
        else:
            default = option.default
            if option.name == "workers" and default is None:
                default = available_cpus()
            values[option.name] = default
            sources[option.name] = "default"

    if values["target_protocol"] not in PROTOCOLS:  # pragma: no cover - parser guarantees
        raise ConfigError("target_protocol must be udp or tcp")
    if (
        values["admin"]
        and values["admin_port"] == values["listen_port"]
        and "tcp" in values["protocols"]
        and values["admin_port"] != 0
    ):
        raise ConfigError(
            f"invalid admin_port from {sources['admin_port']}: {values['admin_port']} is also "
            f"the listen_port (from {sources['listen_port']})",
            "admin_port",
            sources["admin_port"],
        )
    if values["watch_config"] and config_file is None:
        raise ConfigError(
            f"invalid watch_config from {sources['watch_config']}: there is no config file "
            "to watch (give --config FILE)",
            "watch_config",
            sources["watch_config"],
        )
    for name in ("target", "upstreams"):
        # Upstreams without their own protocol take target_protocol.
        values[name] = tuple(
            u if u.protocol else dataclasses.replace(u, protocol=values["target_protocol"])
            for u in values[name]
        )
    return Settings(**values, sources=sources, config_file=config_file)


def effective_upstreams(settings: Settings) -> tuple[UpstreamSpec, ...]:
    """The upstream list: ``target`` if given, else ``[[upstreams]]``, else target_host:port."""
    if settings.target:
        return settings.target
    if settings.upstreams:
        return settings.upstreams
    return (UpstreamSpec(settings.target_host, settings.target_port, settings.target_protocol),)


def settings_table() -> str:
    """The README's settings table (Markdown), generated from :data:`OPTIONS`."""
    rows = [
        "| flag | environment | TOML key | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for option in OPTIONS:
        if option.flag_kind == "toml":
            continue
        default = option.default_text or option.default
        if isinstance(default, tuple):
            default = ",".join(default) or "(none)"
        elif isinstance(default, bool):
            default = str(default).lower()
        flag = f"`{option.flag}`"
        if option.flag_kind == "bool":
            flag += f" / `--no-{option.flag[2:]}`"
        rows.append(f"| {flag} | `{option.env}` | `{option.name}` | {default} | {option.help} |")
    return "\n".join(rows)

"""Settings: one frozen, validated object built from layered sources.

Layers, lowest to highest: built-in defaults < TOML file (``--config``) <
environment < command-line flags. Every setting is described once in
:data:`statsd_filter.options.OPTIONS`, from which the CLI, the environment
reader, the TOML reader and the README's settings table all derive. Each value
remembers where it came from, so an error names both the setting and its
source, and ``check-config`` can show them.

The resolved views every part needs (the rule list in evaluation order, the
upstreams in use) are properties of :class:`Settings`, computed once.

Environment: ``STATSD_FILTER_<NAME>`` for every setting, plus the variables the
original OCaml proxy read (``listen_port``, ``target_host``, ``target_port``,
``blocklist``, ``num_threads``), which rank just below the prefixed ones.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statsd_filter.limitpool import LimitSlot, limit_bytes
from statsd_filter.options import (
    ENV_PREFIX,
    LEGACY_ENV,
    OPTIONS,
    OPTIONS_BY_NAME,
    PROTOCOLS,
)
from statsd_filter.rules.model import RuleSpec, all_rules
from statsd_filter.upstream.spec import UpstreamSpec

__all__ = [
    "ConfigError",
    "Generation",
    "Settings",
    "available_cpus",
    "load_settings",
]


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
    max_read_delay: float = 0.02
    so_rcvbuf: int = 4 << 20
    tcp_idle_timeout: float = 300.0
    max_connections: int = 10000
    unix_socket: str | None = None
    unix_stream_socket: str | None = None
    unix_stream_framing: str = "length"
    unix_socket_mode: int = 0o722
    unix_socket_max_payload: int = 65536
    unix_upstream_max_payload: int = 8192
    unix_origin_detection: bool = False
    procfs_path: str = "/proc"
    upstream_buffer_bytes: int = 8 << 20
    shutdown_timeout: float = 5.0
    admin: bool = True
    admin_host: str = "127.0.0.1"
    admin_port: int = 8127
    top: bool = True
    top_sample_rate: int = 1000
    top_window: float = 10.0
    tap_max_watchers: int = 4
    log_level: str = "info"
    log_format: str = "text"
    allowlist_mode: bool = False
    watch_config: bool = False
    limit_memory: int = 128 << 20
    aggregate: bool = False
    flush_interval: float = 1.0
    aggregate_max_series: int = 20_000
    upstream_flavor: str = "etsy"
    rules: tuple[RuleSpec, ...] = ()
    upstreams: tuple[UpstreamSpec, ...] = ()
    # The TOML file the settings were read from, if any (reloads read it again).
    config_file: str | None = None
    # Where each value came from ("default", "config file X", ...); not a setting.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def all_rules(self) -> tuple[RuleSpec, ...]:
        """Every rule in evaluation order: the blocklist (one prefix-drop rule), then ``rules``."""
        return all_rules(self.blocklist, self.rules)

    @functools.cached_property
    def aggregating(self) -> bool:
        """Whether pre-aggregation is on: ``aggregate``, or a rule that aggregates."""
        return self.aggregate or any(r.action == "aggregate" for r in self.rules)

    @functools.cached_property
    def effective_upstreams(self) -> tuple[UpstreamSpec, ...]:
        """The upstreams in use: ``target`` if given, else ``[[upstreams]]``, else
        ``target_host:target_port``."""
        if self.target:
            return self.target
        if self.upstreams:
            return self.upstreams
        return (UpstreamSpec(self.target_host, self.target_port, self.target_protocol),)

    @property
    def upstream_mode_in_use(self) -> str:
        """``single`` with one upstream, else ``upstream_mode`` (shard or mirror)."""
        return self.upstream_mode if len(self.effective_upstreams) > 1 else "single"

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (lists for tuples), without sources."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("sources", "config_file", "rules", "upstreams"):
                continue
            value = getattr(self, f.name)
            if f.name == "target":
                value = [u.address for u in value]
            elif f.name == "unix_socket_mode":
                value = f"0{value:o}"  # as chmod writes it
            elif value is None and f.name in ("unix_socket", "unix_stream_socket"):
                value = ""  # what the setting takes for "none"
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class Generation:
    """A numbered config as workers run it: the settings and each rule's counter row.

    Generation 0 is the config at start; each accepted reload makes the next.
    Rows are the supervisor's stable mapping of rule names to rows of per-rule
    counters, so a rule keeps its counts across reloads that reorder rules;
    ``limits`` places each limit rule's table (see ``limitpool.py``).
    """

    number: int
    settings: Settings
    rows: Mapping[str, int]
    # Where each limit rule's table lives in the shared limit memory.
    limits: Mapping[str, LimitSlot] = field(default_factory=dict)


def _check_unix_paths(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """One path, one socket: two listeners, or a listener and an upstream, cannot share it."""
    dgram, stream = values["unix_socket"], values["unix_stream_socket"]
    if dgram is not None and dgram == stream:
        raise ConfigError(
            f"invalid unix_stream_socket from {sources['unix_stream_socket']}: {stream} is "
            f"also the unix_socket (from {sources['unix_socket']})",
            "unix_stream_socket",
            sources["unix_stream_socket"],
        )
    listening = {
        str(Path(path).absolute()): name
        for name, path in (("unix_socket", dgram), ("unix_stream_socket", stream))
        if path is not None
    }
    for name in ("target", "upstreams"):
        for spec in values[name]:
            if spec.is_unix and str(Path(spec.host)) in listening:
                raise ConfigError(
                    f"invalid {name} from {sources[name]}: {spec.address} is this proxy's own "
                    f"{listening[spec.host]}: it would forward to itself",
                    name,
                    sources[name],
                )


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


def _check_limit_memory(
    rules: tuple[RuleSpec, ...], limit_memory: int, sources: Mapping[str, str]
) -> None:
    """The limit rules' tables must fit in ``limit_memory`` together."""
    total = 0
    for spec in rules:
        if spec.limit_identity is None:
            continue
        total += limit_bytes(spec)
        if total > limit_memory:
            raise ConfigError(
                f"invalid rules from {sources['rules']}: rule {spec.name!r}: the limit rules "
                f"need {total / 2**20:.1f} MiB of shared memory up to this one, more than "
                f"limit_memory ({limit_memory / 2**20:.1f} MiB, from {sources['limit_memory']}); "
                "lower max_tracked or raise limit_memory",
                "rules",
                sources["rules"],
            )


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
    _check_unix_paths(values, sources)
    _check_limit_memory(values["rules"], values["limit_memory"], sources)
    for name in ("target", "upstreams"):
        # Upstreams without their own protocol take target_protocol.
        values[name] = tuple(
            u if u.protocol else dataclasses.replace(u, protocol=values["target_protocol"])
            for u in values[name]
        )
    return Settings(**values, sources=sources, config_file=config_file)

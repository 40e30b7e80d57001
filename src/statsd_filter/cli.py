"""Command-line parsing only: builds settings and hands them to a runner.

Flags are generated from :data:`statsd_filter.config.OPTIONS`, so every setting
has exactly one flag, one environment variable and one TOML key. Prefix
matching of long options is off (``--target`` must never mean ``--target-host``).

One module for every subcommand's parser (each ends its ``--help`` with an
example, and ``completion.py``/``manpage.py`` walk the same parser), slightly
over 400 lines; the commands themselves live elsewhere.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from statsd_filter.config import ConfigError, Settings, load_settings
from statsd_filter.limitpool import limit_bytes
from statsd_filter.options import OPTIONS
from statsd_filter.rules.aggregate import Aggregator
from statsd_filter.rules.engine import RuleEngine

__all__ = ["main"]

EXIT_USAGE = 2
DEFAULT_ADMIN = "http://127.0.0.1:8127"
# Kept here, not imported: `statsd-filter --help` must not import the console modules.
SORTS = ("lines", "bytes", "cardinality")
VERDICTS = ("forwarded", "blocked", "dropped")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config file (env STATSD_FILTER_CONFIG)"
    )
    for option in OPTIONS:
        if option.flag_kind == "toml":
            continue
        default = option.default_text or option.default
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        help_text = f"{option.help} (default {default}; env {option.env})"
        if option.flag_kind == "bool":
            parser.add_argument(
                option.flag, dest=option.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif option.flag_kind == "list":
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="append",
                metavar=option.metavar,
                help=help_text + "; comma-separated, repeatable",
            )
        else:
            parser.add_argument(
                option.flag, dest=option.name, metavar=option.metavar, help=help_text
            )


class _VersionAction(argparse.Action):
    """``--version``: the version, and which fast paths this installation has."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from statsd_filter.buildinfo import build_info  # noqa: PLC0415 - imports hyperscan

        info = build_info()
        print("\n".join([f"statsd-filter {info.version}", *info.describe()]))
        parser.exit()


def _example(text: str) -> str:
    return f"example:\n  {text}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="statsd-filter",
        description="A multi-core StatsD / DogStatsD filtering proxy.",
        epilog="Run 'statsd-filter COMMAND --help' for a command's options and an example.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="show the version and whether the C accelerator and Hyperscan are in use",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=_example(example),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )

    run = command(
        "run",
        "run the proxy",
        "statsd-filter run --blocklist debug.,test. --target-host statsd.internal",
    )
    _add_setting_flags(run)
    check = command(
        "check-config",
        "validate the settings and print the effective values",
        "statsd-filter check-config --config /etc/statsd-filter/statsd-filter.toml",
    )
    _add_setting_flags(check)
    explain = command(
        "explain",
        "show which rule decides a line and what would be forwarded",
        "statsd-filter explain --blocklist debug. 'debug.x:1|c' 'api.req:1|c'",
    )
    _add_setting_flags(explain)
    explain.add_argument("lines", nargs="+", metavar="LINE", help="StatsD line(s) to judge")
    completion = command(
        "completion",
        "print a shell completion script (bash or zsh)",
        "source <(statsd-filter completion bash)",
    )
    completion.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    command(
        "manpage",
        "print the manual page (roff)",
        "statsd-filter manpage | man -l -",
    )
    tap = command(
        "tap",
        "print every StatsD line received (a test sink), or with --from URL the live "
        "sampled lines of a running proxy",
        "statsd-filter tap --from http://127.0.0.1:8127 --match 'api.**' --verdict blocked",
    )
    tap.add_argument(
        "--host",
        default="localhost",
        help="address to listen on (default localhost: 127.0.0.1 and ::1)",
    )
    tap.add_argument("--port", type=_port, default=8126, help="UDP and TCP port (default 8126)")
    tap.add_argument("--protocols", default="udp,tcp", help="udp,tcp (default both)")
    tap.add_argument(
        "--from",
        dest="source",
        metavar="URL",
        help="a running proxy's admin address (http://127.0.0.1:8127): print its sampled "
        "lines with their verdicts instead of listening",
    )
    tap.add_argument("--match", metavar="GLOB", help="with --from: only names matching GLOB")
    tap.add_argument(
        "--verdict", choices=VERDICTS, help="with --from: only lines with this verdict"
    )
    tap.add_argument("--count", type=_positive, metavar="N", help="with --from: exit after N lines")
    tap.add_argument(
        "--json", action="store_true", help="with --from: print the stream's JSON objects"
    )
    top = command(
        "top",
        "show the heaviest metric names of a running proxy (through its admin port)",
        "statsd-filter top --admin http://127.0.0.1:8127 --sort bytes",
    )
    top.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="URL",
        help=f"the proxy's admin address (default {DEFAULT_ADMIN})",
    )
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument("--sort", choices=SORTS, default="lines", help="sort by (default lines)")
    top.add_argument("--prefixes", action="store_true", help="show name prefixes, not names")
    top.add_argument(
        "--limit", type=_positive, default=20, metavar="N", help="rows per table (default 20)"
    )
    top.add_argument(
        "--interval", type=_seconds, default=2.0, metavar="SECONDS", help="refresh (default 2)"
    )
    top.add_argument(
        "--suggest",
        type=_share,
        metavar="SHARE",
        help="print [[rules]] that would cut about SHARE (30%% or 0.3) of the forwarded volume",
    )
    top.add_argument(
        "--by", choices=("lines", "bytes"), default="lines", help="--suggest: volume in (lines)"
    )
    top.add_argument(
        "--action",
        choices=("drop", "sample"),
        default="drop",
        help="--suggest: rules that drop, or sample keeping one in 10 (default drop)",
    )
    for name, subparser in sub.choices.items():
        # Errors found after parsing are reported by the subcommand's own parser,
        # with its usage (not the top-level one).
        subparser.set_defaults(command=name, parser=subparser)
    return parser


def _positive(text: str) -> int:
    """A count of at least 1, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _seconds(text: str) -> float:
    """A refresh interval for argparse (0.1 s to an hour)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} must be between 0.1 and 3600 seconds")
    return value


def _share(text: str) -> float:
    """A share of the volume: ``30%`` or ``0.3``, above 0 and at most 1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share (30% or 0.3)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be above 0 and at most 100%")
    return value


def _port(text: str) -> int:
    """A TCP/UDP port for argparse (0 picks a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range (0-65535)")
    return port


def _cli_values(args: argparse.Namespace) -> dict[str, object]:
    values: dict[str, object] = {}
    for option in OPTIONS:
        if option.flag_kind == "toml":
            continue
        value = getattr(args, option.name, None)
        if option.flag_kind == "list" and value is not None:
            value = ",".join(value)
        values[option.name] = value
    return values


def format_settings(settings: Settings) -> str:
    """The effective settings as TOML lines, each with its source, then the rules."""
    lines = []
    for name, value in settings.as_dict().items():
        lines.append(f"{name} = {json.dumps(value)}  # {settings.sources.get(name, 'default')}")
    upstreams = settings.effective_upstreams
    lines.append(f"# upstreams ({settings.upstream_mode_in_use}):")
    lines.extend(
        f"#   {u.address} {u.protocol}"
        + (f" weight={u.weight}" if u.weight != 100 else "")
        + (f" admin_port={u.admin_port}" if u.admin_port else "")
        for u in upstreams
    )
    specs = settings.all_rules
    lines.append(f"# rules in evaluation order ({len(specs)}; the first match decides):")
    for i, spec in enumerate(specs, 1):
        memory = ""
        if spec.limit_identity is not None:
            memory = f" (table: {limit_bytes(spec) / 2**20:.1f} MiB of limit_memory)"
        lines.append(f"#   {i}. {spec.describe()}{memory}")
    if settings.allowlist_mode:
        lines.append("#   otherwise: drop (allowlist_mode)")
    else:
        lines.append("#   otherwise: forward unchanged")
    return "\n".join(lines)


def unresolvable_upstreams(settings: Settings) -> list[str]:
    """A warning for each upstream whose host name does not resolve right now, or
    whose Unix socket does not exist yet.

    Not an error: DNS may come up after the proxy (a container starting before
    its service's record exists), an agent may create its socket later; the
    proxy keeps retrying.
    """
    warnings = []
    for spec in settings.effective_upstreams:
        if spec.is_unix:
            if not Path(spec.host).is_socket():
                warnings.append(
                    f"upstream {spec.address} is not a socket now; "
                    "the proxy starts anyway and keeps trying"
                )
            continue
        try:
            socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            warnings.append(
                f"upstream {spec.address} does not resolve now ({exc}); "
                "the proxy starts anyway and keeps trying"
            )
    return warnings


def _aggregation(aggregator: Aggregator, line: bytes) -> str:
    """What pre-aggregation does with a line the rules pass."""
    text = line.decode("utf-8", "backslashreplace")
    key = aggregator.key_of(line)
    if key is None or not aggregator.add(line):
        return (
            f"forwarded: {text} (not aggregated: an event, service check, malformed "
            "or timestamped line)"
        )
    aggregator.flush()
    return f"aggregated: {text} (series key {key.describe()}; sent at the next flush)"


def explain_lines(settings: Settings, lines: Sequence[str]) -> str:
    """For each line: the deciding rule, why, and what would be forwarded."""
    engine = RuleEngine(settings.all_rules, allowlist_mode=settings.allowlist_mode)
    aggregator = Aggregator(settings.upstream_flavor)
    out = []
    for text in lines:
        raw = text.encode("utf-8", "surrogateescape")
        decision = engine.explain(raw)
        out.append(f"line:      {text}")
        out.append(f"decision:  {decision.reason}")
        rule = decision.rule
        if decision.output is None:
            out.append("forwarded: nothing (dropped)")
        elif settings.aggregate or (rule is not None and rule.action == "aggregate"):
            out.append(_aggregation(aggregator, decision.output))
        else:
            out.append(f"forwarded: {decision.output.decode('utf-8', 'backslashreplace')}")
        if len(raw) > settings.max_line_bytes:
            out.append(f"note:      longer than max_line_bytes={settings.max_line_bytes}: dropped")
        out.append("")
    return "\n".join(out).rstrip("\n")


def _run_watch_command(args: argparse.Namespace, subparser: argparse.ArgumentParser) -> int:
    """``top`` and ``tap``: commands that need no proxy settings."""
    if args.command == "top":
        from statsd_filter.console.top import run_suggest, run_top  # noqa: PLC0415

        if args.suggest is not None:
            return run_suggest(args.admin, args.suggest, args.by, args.action)
        return run_top(
            args.admin,
            once=args.once,
            sort=args.sort,
            limit=args.limit,
            interval=args.interval,
            prefixes=args.prefixes,
        )
    if args.source is not None:
        from statsd_filter.console.remote_tap import run_remote_tap  # noqa: PLC0415

        return run_remote_tap(args.source, args.match, args.verdict, args.count, args.json)
    from statsd_filter.tap import run_tap  # noqa: PLC0415

    if args.match is not None or args.verdict is not None or args.count or args.json:
        subparser.error("--match, --verdict, --count and --json need --from URL")
    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    if not protocols or any(p not in ("udp", "tcp") for p in protocols):
        subparser.error("--protocols takes udp, tcp or udp,tcp")
    return run_tap(args.host, args.port, protocols)


def _without_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The subcommands that take no proxy settings: completion, manpage, top, tap."""
    if args.command in ("top", "tap"):
        return _run_watch_command(args, args.parser)
    # Generated from the parser itself, so they list every flag there is.
    from statsd_filter.completion import bash_script, zsh_script  # noqa: PLC0415
    from statsd_filter.manpage import manpage  # noqa: PLC0415

    if args.command == "manpage":
        text = manpage(parser)
    else:
        text = bash_script(parser) if args.shell == "bash" else zsh_script(parser)
    print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``statsd-filter`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command in ("completion", "manpage", "top", "tap"):
        return _without_settings(parser, args)
    try:
        settings = load_settings(_cli_values(args), config_file=args.config)
    except ConfigError as exc:
        print(f"statsd-filter: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(format_settings(settings))
        for warning in unresolvable_upstreams(settings):
            print(f"# warning: {warning}", file=sys.stderr)
        print("# settings are valid", file=sys.stderr)
        return 0
    if args.command == "explain":
        print(explain_lines(settings, args.lines))
        return 0
    from statsd_filter.supervisor.app import run as run_proxy  # noqa: PLC0415

    cli_values = _cli_values(args)
    return run_proxy(settings, lambda: load_settings(cli_values, config_file=args.config))

"""The manual page, generated from the argument parser and the option table.

``statsd-filter manpage`` prints it in roff (``man -l -`` reads it from a
pipe; packagers save it as ``statsd-filter.1``). A generated page cannot
drift from the program: every flag, its environment variable, TOML key and
default come from :data:`statsd_filter.options.OPTIONS`, every subcommand from
the parser, and each subcommand's example is its ``--help`` epilog.
"""

from __future__ import annotations

import argparse

from statsd_filter import __version__
from statsd_filter.options import LEGACY_ENV, OPTIONS, Option

__all__ = ["manpage"]


def _esc(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def _default(option: Option) -> str:
    default = option.default_text or option.default
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return {a.dest: a.help or "" for a in action._choices_actions}  # noqa: SLF001
    return {}


def manpage(parser: argparse.ArgumentParser) -> str:
    """statsd-filter(1) in roff."""
    subs = _subparsers(parser)
    helps = _helps(parser)
    out = [
        f'.TH STATSD\\-FILTER 1 "" "statsd\\-filter {__version__}" "User Commands"',
        # Flags and paths must not be hyphenated or stretched across a line.
        ".nh",
        ".ad l",
        ".SH NAME",
        "statsd\\-filter \\- a multi\\-core StatsD / DogStatsD filtering proxy",
        ".SH SYNOPSIS",
        ".B statsd\\-filter",
        ".I COMMAND",
        ".RI [ OPTIONS ]",
        ".br",
        ".B statsd\\-filter \\-\\-version",
        ".SH DESCRIPTION",
        _esc(
            "Applications send StatsD lines over UDP or TCP; statsd-filter drops the lines "
            "its blocklist and rules name and forwards every other line, byte for byte, to "
            "one or several StatsD servers. A supervisor process binds the sockets and forks "
            "one worker per CPU; /healthz and Prometheus /metrics are served over HTTP."
        ),
        ".PP",
        _esc(
            "--version prints the version and whether the C accelerator "
            "(recvmmsg/sendmmsg) and Hyperscan are in use."
        ),
        ".SH COMMANDS",
    ]
    for name, sub in subs.items():
        out.extend([".TP", f".B {_esc(name)}", _esc(helps.get(name, ""))])
        if sub.epilog:
            example = sub.epilog.strip().split("\n")[-1].strip()
            out.extend([".RS", "Example:", ".nf", f"  {_esc(example)}", ".fi", ".RE"])
    out.append(".SH OPTIONS")
    out.append(
        _esc(
            "run, check-config and explain take these. Each setting also has an environment "
            "variable and a TOML key; lowest to highest: defaults < TOML file < environment "
            "< flags."
        )
    )
    out.extend([".TP", '.BI \\-\\-config " FILE"', _esc("the TOML config file.")])
    for option in OPTIONS:
        if option.flag_kind == "toml":
            continue
        if option.flag_kind == "bool":
            head = f'.BR {_esc(option.flag)} ", " {_esc("--no-" + option.flag[2:])}'
        else:
            head = f'.BI {_esc(option.flag)} " {_esc(option.metavar)}"'
        repeat = " Comma-separated; the flag may be repeated." if option.flag_kind == "list" else ""
        out.extend(
            [
                ".TP",
                head,
                _esc(f"{option.help}.{repeat} Default: {_default(option)}."),
                ".br",
                _esc(f"Environment: {option.env}. TOML key: {option.name}."),
            ]
        )
    tap = subs.get("tap")
    if tap is not None:
        out.append(".SS tap")
        for action in tap._actions:  # noqa: SLF001
            if action.option_strings and action.help and action.dest != "help":
                out.extend([".TP", f".B {_esc(', '.join(action.option_strings))}"])
                out.append(_esc(action.help))
    legacy = ", ".join(sorted(LEGACY_ENV))
    out.extend(
        [
            ".SH RULES",
            _esc(
                "An ordered list of [[rules]] tables in the TOML file (match keys prefix, "
                "name, glob, regex, tag, type, kind; actions drop, allow, strip_tags, "
                "add_tags, rename, sample). The first rule that matches decides. "
                "statsd-filter explain shows which rule decides a line."
            ),
            ".SH SIGNALS",
            ".TP",
            ".B SIGHUP",
            _esc(
                "reload the config file and environment; rules apply live, without "
                "restarting a worker. An invalid config changes nothing."
            ),
            ".TP",
            '.BR SIGTERM ", " SIGINT',
            _esc("drain: read what clients sent, deliver it, exit 0 within --shutdown-timeout."),
            ".SH ENVIRONMENT",
            ".TP",
            ".B STATSD_FILTER_CONFIG",
            _esc("the config file, when --config is not given."),
            ".TP",
            ".B STATSD_FILTER_<NAME>",
            _esc("every setting (see OPTIONS)."),
            ".TP",
            f".B {_esc(legacy)}",
            _esc("the original proxy's variables, ranking below the STATSD_FILTER_ ones."),
            ".TP",
            '.BR NOTIFY_SOCKET ", " WATCHDOG_USEC',
            _esc(
                "set by systemd for Type=notify: READY=1 once every worker runs, "
                "RELOADING=1/READY=1 around reloads, STOPPING=1, STATUS= lines and "
                "WATCHDOG=1 pings."
            ),
            ".SH EXIT STATUS",
            _esc(
                "0 after a clean stop; 1 when a socket cannot be opened or a worker had to "
                "be killed; 2 for an invalid setting (the message names it and its source)."
            ),
            ".SH EXAMPLES",
            ".nf",
            _esc("statsd-filter run --blocklist debug.,test. --target-host statsd.internal"),
            _esc("statsd-filter check-config --config /etc/statsd-filter/statsd-filter.toml"),
            _esc("statsd-filter explain --config rules.toml 'api.req:1|c|#env:dev'"),
            _esc("curl -s localhost:8127/metrics | grep lines_"),
            ".fi",
            ".SH SEE ALSO",
            _esc("The project's README.md (settings, rules, metrics, when things go wrong)."),
            "",
        ]
    )
    return "\n".join(out)

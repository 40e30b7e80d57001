"""Unit tests for statsd_filter/console: URLs, the top table, suggestions, tap lines, flags."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest

from statsd_filter.cli import main
from statsd_filter.console.admin_client import AdminError, admin_url, fetch_json
from statsd_filter.console.remote_tap import format_event
from statsd_filter.console.suggest import Suggestion, choose, suggest_toml
from statsd_filter.console.top import human, render
from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.model import parse_rules


def row(name: str, lines: float, fwd: float | None = None, **extra: Any) -> dict[str, Any]:
    fwd = lines if fwd is None else fwd
    return {
        "name": name,
        "lines_per_s": lines,
        "bytes_per_s": lines * 20,
        "forwarded_lines_per_s": fwd,
        "forwarded_bytes_per_s": fwd * 20,
        "blocked_lines_per_s": lines - fwd,
        "tag_sets": 3,
        "tag_sets_saturated": False,
        "rule": None,
        **extra,
    }


def document() -> dict[str, Any]:
    names = [
        row("api.users.latency", 500),
        row("api.users.count", 300),
        row("api.orders.count", 100),
        row("web.hits", 80),
        row("debug.noise", 400, fwd=0, rule="blocklist", tag_sets=9000, tag_sets_saturated=True),
        row("(event)", 5),
        row("odd\\xffname", 50),
    ]
    prefixes = [
        {"prefix": "api.", **{k: v for k, v in row("", 900).items() if k != "name"}, "names": 3},
        {"prefix": "api.users.", **{k: v for k, v in row("", 800).items() if k != "name"}},
        {"prefix": "web.", **{k: v for k, v in row("", 80).items() if k != "name"}},
        {"prefix": "debug.", **{k: v for k, v in row("", 400, fwd=0).items() if k != "name"}},
    ]
    return {
        "enabled": True,
        "status": "ok",
        "uptime_seconds": 75,
        "rates": {"received": 1435.0, "forwarded": 1035.0, "blocked": 400.0, "dropped": 0.0},
        "totals": {"received": 12000, "forwarded": 9000, "blocked": 3000, "dropped": 0},
        "upstreams": [{"address": "127.0.0.1:8126", "protocol": "udp", "state": "up"}],
        "workers": [{"index": 0, "state": "running"}, {"index": 1, "state": "running"}],
        "window_seconds": 10.0,
        "sampling": [{"worker": 0, "one_in_bytes": 1}],
        "names_seen": len(names),
        "names": names,
        "prefixes": prefixes,
        "rules": [{"name": "blocklist", "action": "drop", "matches": 3000, "matches_per_s": 400}],
        "rules_total": 3,
    }


def test_admin_url() -> None:
    """An admin address with or without scheme or path, plus a query without empty values."""
    assert admin_url("http://127.0.0.1:8127", "/top", {"sort": "lines", "x": None}) == (
        "http://127.0.0.1:8127/top?sort=lines"
    )
    assert admin_url("localhost:9/admin/", "/tap") == "http://localhost:9/admin/tap"
    with pytest.raises(AdminError, match="not an http"):
        admin_url("https://x:1", "/top")


def test_unreachable_admin_port_is_a_clear_error() -> None:
    """Nothing listening: an AdminError naming the URL, not a traceback."""
    with pytest.raises(AdminError, match=re.escape("cannot reach http://127.0.0.1:1/top")):
        fetch_json("http://127.0.0.1:1/top")


def test_human() -> None:
    """Rates and counts in a few characters."""
    assert [human(v) for v in (None, 0, 7.5, 980, 12_345, 4_500_000, 2e9)] == [
        "-",
        "0",
        "7.5",
        "980",
        "12.3k",
        "4.5M",
        "2.0G",
    ]


def test_render_shows_aggregated_lines_when_the_proxy_counts_them() -> None:
    doc = document()
    doc["rates"]["aggregated"] = 2500.0
    doc["totals"]["aggregated"] = 30000
    text = render(doc, "x")
    assert text[1] == (
        "lines/s   received 1.4k  forwarded 1.0k  blocked 400  aggregated 2.5k  dropped 0"
    )
    assert text[2] == (
        "total     received 12.0k  forwarded 9.0k  blocked 3.0k  aggregated 30.0k  dropped 0"
    )


def test_render_shows_header_names_in_order_and_rules() -> None:
    """The table: totals, upstreams, every name in the document's order, the rules."""
    text = render(document(), "http://127.0.0.1:8127", sort="bytes")
    assert text[0].startswith("statsd-filter http://127.0.0.1:8127  status ok  up 1m15s")
    assert "workers 2/2 running" in text[0]
    assert text[1] == "lines/s   received 1.4k  forwarded 1.0k  blocked 400  dropped 0"
    assert "127.0.0.1:8126 udp up" in text[3]
    header = next(i for i, line in enumerate(text) if line.startswith("NAME"))
    assert "BYTES/S*" in text[header]
    names = [line.split()[0] for line in text[header + 1 : header + 8]]
    assert names == [r["name"] for r in document()["names"]]
    noise = text[header + 5]
    assert noise.split()[-2:] == [">=9.0k", "blocklist"]
    assert any(line.startswith("blocklist") and "drop" in line for line in text)
    assert text[-1] == "... and 2 more rule(s)"
    prefixes = render(document(), "x", prefixes=True)
    assert any(line.startswith("api.users.") for line in prefixes)
    assert all(len(line) <= 40 for line in render(document(), "x", width=40))


def test_render_without_sampling() -> None:
    """A proxy running --no-top: totals and rules, and a note instead of names."""
    doc = document() | {"enabled": False, "names": [], "prefixes": []}
    assert any("sampling is off" in line for line in render(doc, "x"))


def test_choose_best_fit_without_overlap() -> None:
    """Take what covers the need with the least excess; never a name under a taken prefix."""
    pool = [
        Suggestion("api.", True, 900),
        Suggestion("api.users.", True, 800),
        Suggestion("api.users.latency", False, 500),
        Suggestion("web.hits", False, 80),
    ]
    assert [c.key for c in choose(pool, 450)] == ["api.users.latency"]
    assert [c.key for c in choose(pool, 850)] == ["api."]
    assert [c.key for c in choose(pool, 880)] == ["api."]
    assert [c.key for c in choose(pool, 950)] == ["api.", "web.hits"]
    assert [c.key for c in choose(pool, 5000)] == ["api.", "web.hits"]


@pytest.mark.parametrize(("share", "action"), [(0.3, "drop"), (0.5, "drop"), (0.4, "sample")])
def test_suggestions_are_valid_rules_that_cut_the_share(share: float, action: str) -> None:
    """The printed TOML parses with the project's rule parser and cuts at least the share."""
    doc = document()
    text = suggest_toml(doc, share, "lines", action)
    rules = parse_rules(tomllib.loads(text)["rules"])
    assert {rule.action for rule in rules} == {action}
    line_filter = compile_filter((), 1000, rules)
    volume = {r["name"]: r["forwarded_lines_per_s"] for r in doc["names"]}
    total = sum(volume.values())
    kept = 0.0
    for name, rate in volume.items():
        forwarded = line_filter.filter(f"{name}:1|c".encode())[2]
        kept += rate * forwarded
    if action == "sample":  # a sampled name keeps about a tenth: count what it matched
        matched = sum(
            rate
            for name, rate in volume.items()
            if any(r.match.prefix and name.startswith(r.match.prefix) for r in rules)
            or any(name in r.match.name for r in rules)
        )
        assert matched * 0.9 >= share * total * 0.999
    else:
        assert total - kept >= share * total * 0.999
    assert "odd" not in text  # a name that is not valid UTF-8 cannot be named in a rule
    assert "(event)" not in text


def test_suggest_with_nothing_forwarded() -> None:
    """No forwarded volume: a comment, no rule."""
    doc = document() | {"names": [row("debug.x", 10, fwd=0)], "prefixes": []}
    assert "rules" not in tomllib.loads(suggest_toml(doc, 0.5))


def test_format_event() -> None:
    """A tap line prints as verdict, line, rule and rewrite; other events print nothing."""
    assert format_event({"type": "heartbeat"}) is None
    event = {"type": "line", "verdict": "blocked", "rule": "no-dev", "line": "a:1|c|#env:dev"}
    assert format_event(event) == "blocked    a:1|c|#env:dev  [rule no-dev]"
    rewrite = {"type": "line", "verdict": "forwarded", "rule": None, "line": "a:1|c"}
    rewrite["forwarded_as"] = "a:1|c|#x:y"
    assert format_event(rewrite) == "forwarded  a:1|c  => a:1|c|#x:y"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tap", "--match", "a.*"], "--match, --verdict, --count and --json need --from URL"),
        (["top", "--suggest", "0"], "must be above 0 and at most 100%"),
        (["top", "--suggest", "150%"], "must be above 0 and at most 100%"),
        (["top", "--suggest", "lots"], "is not a share"),
        (["top", "--interval", "0"], "must be between 0.1 and 3600 seconds"),
        (["top", "--interval", "x"], "is not a number"),
        (["top", "--limit", "0"], "must be at least 1"),
        (["tap", "--from", "x", "--count", "many"], "is not a whole number"),
        (["tap", "--from", "x", "--verdict", "lost"], "invalid choice"),
    ],
)
def test_bad_flags_exit_2_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Wrong flags of top and tap exit with status 2 and say why, with the subcommand's usage."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert f"usage: statsd-filter {argv[0]}" in err


def test_unreachable_proxy_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """top --once, top --suggest and tap --from against nothing: exit 1, one clear line."""
    for argv in (
        ["top", "--once", "--admin", "http://127.0.0.1:1"],
        ["top", "--suggest", "30%", "--admin", "http://127.0.0.1:1"],
        ["tap", "--from", "http://127.0.0.1:1"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "cannot reach http://127.0.0.1:1/" in err

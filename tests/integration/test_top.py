"""Seeing what flows, through the real program: /top, top --once/--suggest, tap --from, /tap.

With ``--top-sample-rate`` far above the traffic, every line is a sample, and
/top's counts are exact (the tests assert equality); with a low rate, counts
must fall within the documented error (4 standard errors, ``relative_error``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import socket
import subprocess
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.model import parse_rules
from tests.integration.harness import BIN, LOCALHOST, Proxy, Sink, clean_env, wait_until

EVERY_LINE = ("--top-sample-rate", "1000000")
RULES_TOML = """
blocklist = ["debug."]

[[rules]]
name = "no-dev"
match = { tag = "env:dev" }
action = "drop"

[[rules]]
name = "strip-host"
match = { glob = "api.**", tag = "host" }
action = "strip_tags"
tags = ["host"]
"""


def send(proxy: Proxy, datagrams: list[bytes], pause_every: int = 50) -> None:
    """Send datagrams over UDP, pausing now and then so the kernel drops none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i, datagram in enumerate(datagrams):
            sock.sendto(datagram, (LOCALHOST, proxy.port))
            if i % pause_every == pause_every - 1:
                time.sleep(0.002)


def top(proxy: Proxy, **query: str) -> dict[str, Any]:
    path = "/top?" + "&".join(f"{k}={v}" for k, v in query.items())
    status, body = proxy.get(path)
    assert status == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def wait_top(proxy: Proxy, names: Mapping[str, float], **query: str) -> dict[str, Any]:
    """Poll /top until each name's estimated lines reach at least the given count."""
    doc: dict[str, Any] = {}

    def arrived() -> bool:
        nonlocal doc
        doc = top(proxy, limit="100", **query)
        seen = {row["name"]: row["lines"] for row in doc["names"]}
        return all(seen.get(name, 0) >= count for name, count in names.items())

    wait_until(arrived, timeout=15)
    return doc


def heavy_traffic() -> tuple[list[bytes], Counter[str]]:
    """Every datagram holds the same mix: 4 heavy.a (5 tag sets in all), 2 heavy.b, 1 debug.x,
    and one in five datagrams a light.c.d."""
    datagrams = []
    sent: Counter[str] = Counter()
    for i in range(150):
        lines = [b"heavy.a:1|c|#host:%d" % ((i + j) % 5) for j in range(4)]
        lines += [b"heavy.b:%d|ms" % i, b"heavy.b:2|ms", b"debug.x:1|c"]
        if i % 5 == 0:
            lines.append(b"light.c.d:1|g")
        datagrams.append(b"\n".join(lines))
        for line in lines:
            sent[line.split(b":")[0].decode()] += 1
    return datagrams, sent


def test_top_counts_heavy_names_exactly_when_every_line_is_sampled(sink: Sink) -> None:
    """Known traffic gives /top's order, counts, bytes, tag sets, verdicts and rules exactly."""
    datagrams, sent = heavy_traffic()
    with Proxy("--target-port", str(sink.port), "--blocklist", "debug.", *EVERY_LINE) as proxy:
        send(proxy, datagrams)
        proxy.wait_settled()
        doc = wait_top(proxy, sent)
        rows = {row["name"]: row for row in doc["names"]}
        assert [row["name"] for row in doc["names"]] == [
            "heavy.a",
            "heavy.b",
            "debug.x",
            "light.c.d",
        ]
        for name, count in sent.items():
            assert rows[name]["lines"] == count
            assert rows[name]["relative_error"] == 0.0
        heavy_a_bytes = sum(len(d.split(b"\n")[0]) + 1 for d in datagrams) * 4
        assert rows["heavy.a"]["bytes"] == heavy_a_bytes
        assert rows["heavy.a"]["tag_sets"] == 5
        assert rows["heavy.b"]["tag_sets"] == 1
        # Every datagram carries the same mix, so every worker sees a/b = 2: so do the rates.
        assert rows["heavy.a"]["lines_per_s"] / rows["heavy.b"]["lines_per_s"] == (
            __import__("pytest").approx(2.0, rel=1e-3)
        )
        assert (rows["debug.x"]["rule"], rows["debug.x"]["forwarded_lines_per_s"]) == (
            "blocklist",
            0.0,
        )
        assert rows["debug.x"]["blocked_lines_per_s"] == rows["debug.x"]["lines_per_s"]
        assert rows["heavy.a"]["rule"] is None
        prefixes = {row["prefix"]: row for row in doc["prefixes"]}
        assert prefixes["heavy."]["lines"] == sent["heavy.a"] + sent["heavy.b"]
        assert prefixes["light.c."]["segments"] == 2
        by_bytes = top(proxy, sort="bytes", limit="2")["names"]
        assert [row["name"] for row in by_bytes] == ["heavy.a", "heavy.b"]
        by_tags = top(proxy, sort="cardinality", limit="1")["names"]
        assert by_tags[0]["name"] == "heavy.a"
        assert doc["totals"]["received"] == sum(sent.values())
        assert doc["rules"][0]["name"] == "blocklist"
        assert doc["rules"][0]["matches"] == sent["debug.x"]
        assert [u["state"] for u in doc["upstreams"]] == ["up"]
        status, body = proxy.get("/top?sort=size")
        assert status == 400
        assert "sort must be one of lines, bytes, cardinality" in body


def test_sampled_counts_fall_within_the_documented_error(sink: Sink) -> None:
    """A few hundred points a second over ~1 MB: each heavy name's count is within
    4 documented standard errors, and the heaviest names come first."""
    lines = []
    for i in range(30000):
        if i % 2 == 0:
            lines.append(b"big.one:1|c|#k:%d" % (i % 3))
        elif i % 4 == 1:
            lines.append(b"big.two:%d|ms|@0.5" % i)
        else:
            lines.append(b"small.n%d:1|c" % (i % 60))
    datagrams = [b"\n".join(lines[i : i + 25]) for i in range(0, len(lines), 25)]
    truth = {"big.one": 15000, "big.two": 7500}
    args = ("--top-sample-rate", "300", "--top-window", "60")
    with Proxy("--target-port", str(sink.port), *args) as proxy:
        send(proxy, datagrams, pause_every=20)
        metrics = proxy.wait_settled()
        assert metrics["lines_received_total"] == len(lines)
        time.sleep(2.5)  # the workers' next reports
        doc = top(proxy, limit="5")
    names = [row["name"] for row in doc["names"]]
    assert names[:2] == ["big.one", "big.two"]
    for row in doc["names"][:2]:
        assert row["relative_error"] > 0  # really sampled
        assert row["sampled_lines"] < truth[row["name"]] / 3
        error = row["relative_error"] * truth[row["name"]]
        assert abs(row["lines"] - truth[row["name"]]) <= 4 * error, row


def test_top_once_and_suggest_through_the_cli(sink: Sink, tmp_path: Path) -> None:
    """`top --once` prints the table in order; `--suggest` prints rules the parser accepts
    that cut at least the share asked of the traffic sent."""
    datagrams, sent = heavy_traffic()
    with Proxy("--target-port", str(sink.port), "--blocklist", "debug.", *EVERY_LINE) as proxy:
        send(proxy, datagrams)
        proxy.wait_settled()
        wait_top(proxy, sent)
        admin = f"http://{LOCALHOST}:{proxy.admin_port}"
        once = subprocess.run(
            [str(BIN), "top", "--once", "--admin", admin],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=30,
        )
        suggested = subprocess.run(
            [str(BIN), "top", "--suggest", "50%", "--admin", admin],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=30,
        )
    assert once.returncode == 0, once.stderr
    text = once.stdout.splitlines()
    assert text[0].startswith(f"statsd-filter {admin}  status ok")
    header = next(i for i, line in enumerate(text) if line.startswith("NAME"))
    assert "LINES/S*" in text[header]
    assert [line.split()[0] for line in text[header + 1 : header + 5]] == [
        "heavy.a",
        "heavy.b",
        "debug.x",
        "light.c.d",
    ]
    assert text[header + 3].split()[-1] == "blocklist"
    assert any(line.split()[:2] == ["blocklist", "drop"] for line in text)
    assert suggested.returncode == 0, suggested.stderr
    rules = parse_rules(tomllib.loads(suggested.stdout)["rules"])
    config = tmp_path / "suggested.toml"
    config.write_text(suggested.stdout)
    check = subprocess.run(
        [str(BIN), "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    line_filter = compile_filter(("debug.",), 8192, rules)
    forwarded_before = sum(v for k, v in sent.items() if k != "debug.x")
    all_lines = b"\n".join(datagrams)
    forwarded_after = line_filter.filter(all_lines)[2]
    assert forwarded_before - forwarded_after >= 0.5 * forwarded_before


class TapProcess:
    """`statsd-filter tap --from ...` as a subprocess, its output read by threads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN), "tap", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        into.extend(stream)

    def wait_ready(self) -> None:
        assert wait_until(lambda: any("# tapping" in line for line in self.err), 15), self.err

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(15)
        finally:
            for thread in self._threads:
                thread.join(5)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
        return code


def test_tap_from_shows_exactly_the_matching_lines_with_their_verdicts(
    sink: Sink, tmp_path: Path
) -> None:
    """tap --from --match shows every matching line once, with the verdict, rule and
    rewrite the rules give it, and nothing else; --verdict and --count narrow it."""
    config = tmp_path / "rules.toml"
    config.write_text(RULES_TOML)
    lines = [
        b"api.req:1|c|#host:a,env:prod",
        b"api.v1.lat:5|ms",
        b"api.req:1|c|#env:dev",
        b"web.page:1|c",
        b"debug.api:1|c",
        b"api.req:2|c",
    ]
    expected = Counter(
        [
            ("api.req:1|c|#host:a,env:prod", "forwarded", "strip-host", "api.req:1|c|#env:prod"),
            ("api.v1.lat:5|ms", "forwarded", None, None),
            ("api.req:1|c|#env:dev", "blocked", "no-dev", None),
            ("api.req:2|c", "forwarded", None, None),
        ]
        * 20
    )
    with Proxy("--target-port", str(sink.port), "--config", str(config), *EVERY_LINE) as proxy:
        admin = f"http://{LOCALHOST}:{proxy.admin_port}"
        tap = TapProcess("--from", admin, "--match", "api.**", "--json")
        blocked = TapProcess("--from", admin, "--verdict", "blocked", "--count", "40")
        try:
            tap.wait_ready()
            blocked.wait_ready()
            send(proxy, [b"\n".join(lines)] * 20)
            proxy.wait_settled()
            wait_until(lambda: len(tap.out) >= sum(expected.values()), 15)
            time.sleep(0.5)  # anything extra would arrive now
            assert blocked.proc.wait(15) == 0  # --count 40: it stopped by itself
        finally:
            tap.stop()
            blocked.stop()
    events = [json.loads(line) for line in tap.out]
    assert [e["type"] for e in events if e["type"] != "line"] == ["ready"]  # nothing skipped
    events = [e for e in events if e["type"] == "line"]
    got = Counter((e["line"], e["verdict"], e["rule"], e.get("forwarded_as")) for e in events)
    assert got == expected
    shown = Counter(line.rstrip("\n") for line in blocked.out)
    assert shown == Counter(
        {
            "blocked    api.req:1|c|#env:dev  [rule no-dev]": 20,
            "blocked    debug.api:1|c  [rule blocklist]": 20,
        }
    )


def test_many_tap_watchers_cannot_slow_forwarding(sink: Sink) -> None:
    """With the most watchers allowed (one never reading), one more is refused, and a
    flood still has every line forwarded and counted; a freed slot can be taken again."""
    watchers: list[socket.socket] = []
    with Proxy("--target-port", str(sink.port), "--tap-max-watchers", "3", *EVERY_LINE) as proxy:
        try:
            for _ in range(3):
                client = socket.create_connection((LOCALHOST, proxy.admin_port), timeout=5)
                client.sendall(b"GET /tap HTTP/1.1\r\n\r\n")
                watchers.append(client)
            for client in watchers[:2]:
                data = b""
                while b'"ready"' not in data:
                    data += client.recv(65536)
            status, body = proxy.get("/tap")
            assert status == 503
            assert "too many /tap watchers (tap_max_watchers = 3)" in body
            lines = [b"flood.n%d:%d|c" % (i % 40, i) for i in range(40000)]
            datagrams = [b"\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
            send(proxy, datagrams, pause_every=25)
            metrics = proxy.wait_settled()
            assert metrics["lines_received_total"] == len(lines)
            assert metrics["lines_forwarded_total"] == len(lines)
            assert sorted(sink.wait_for_lines(len(lines), 20)) == sorted(lines)
            watchers.pop().close()
            reopened = socket.create_connection((LOCALHOST, proxy.admin_port), timeout=5)
            watchers.append(reopened)

            def slot_free() -> bool:
                reopened.sendall(b"GET /tap HTTP/1.1\r\n\r\n")
                return reopened.recv(100).startswith(b"HTTP/1.1 200")

            assert wait_until(slot_free, 10)
        finally:
            for client in watchers:
                client.close()


def test_idle_workers_stay_in_top_and_a_burst_is_averaged_over_the_window(
    sink: Sink,
) -> None:
    """Idle workers skip their empty reports (one every few seconds instead of one a
    second), yet /top lists them from the start and counts their quiet seconds: the
    time covered grows to the window, and a burst's rate is its lines over that time."""
    window = 4.0
    with Proxy("--target-port", str(sink.port), "--top-window", "4", *EVERY_LINE) as proxy:

        def covered() -> dict[int, float]:
            return {s["worker"]: s["seconds"] for s in top(proxy)["sampling"]}

        # Both workers listed at once, though neither has seen a line.
        assert wait_until(lambda: len(covered()) == 2, timeout=10)
        # Their quiet seconds count: each covers most of the window, not just the
        # fraction of a second their first report covered.
        assert wait_until(lambda: min(covered().values()) >= window - 1.5, timeout=15)
        doc = top(proxy)
        assert (doc["names"], [s["points_per_s"] for s in doc["sampling"]]) == ([], [0.0, 0.0])
        send(proxy, [b"burst.a:1|c"] * 100)
        proxy.wait_settled()
        wait_top(proxy, {"burst.a": 100})

        def averaged() -> bool:
            doc = top(proxy)
            rows = {row["name"]: row for row in doc["names"]}
            seconds = [s["seconds"] for s in doc["sampling"]]
            # Once the burst is a while back, its 100 lines are spread over (nearly)
            # the whole window, not over the second that carried them.
            return (
                "burst.a" in rows
                and min(seconds) >= window - 1.5
                and rows["burst.a"]["lines_per_s"] <= 100 / (window - 1.5)
            )

        assert wait_until(averaged, timeout=10)


def test_no_top_turns_sampling_off(sink: Sink) -> None:
    """--no-top: /top has totals but no names, /tap is refused, the page still loads."""
    with Proxy("--target-port", str(sink.port), "--no-top") as proxy:
        send(proxy, [b"a.b:1|c"] * 10)
        proxy.wait_settled()
        doc = top(proxy)
        assert (doc["enabled"], doc["names"], doc["totals"]["received"]) == (False, [], 10)
        assert proxy.get("/tap")[0] == 503
        status, page = proxy.get("/")
        assert status == 200
        assert "<title>statsd-filter</title>" in page


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        for folder in os.environ.get("PATH", "").split(os.pathsep):
            path = Path(folder) / name
            if path.exists():
                return str(path)
    raise AssertionError("chromium missing: scripts/test.sh installs it (apt-get install chromium)")


def chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``url`` with a fresh profile; fake time runs the page's timers."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            # Virtual time: the page's fetches and 2 s refreshes run, without waiting 7 s.
            "--virtual-time-budget=7000",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )


def test_status_page_renders_in_headless_chromium(sink: Sink, tmp_path: Path) -> None:
    """The status page, loaded by a real browser: top table rows, charts, rules, upstreams;
    a screenshot is saved."""
    datagrams, sent = heavy_traffic()
    with Proxy("--target-port", str(sink.port), "--blocklist", "debug.", *EVERY_LINE) as proxy:
        for _ in range(3):  # a few seconds of traffic: the charts get points
            send(proxy, datagrams)
            time.sleep(1.1)
        proxy.wait_settled()
        wait_top(proxy, sent)
        url = f"http://{LOCALHOST}:{proxy.admin_port}/"
        dom = chromium(url, tmp_path, "--dump-dom")
        shot = tmp_path / "status.png"
        picture = chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    table = html.split('id="top-names"', 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    names = [cell.split("</td>")[0] for cell in body.split('<td class="name">')[1:]]
    assert names == ["heavy.a", "heavy.b", "debug.x", "light.c.d"]
    assert "<td>blocklist</td>" in body
    chart = html.split('id="chart-received"', 1)[1].split("</svg>", 1)[0]
    points = chart.split("<polyline", 1)[1].split(' points="', 1)[1].split('"', 1)[0]
    assert len(points.split()) >= 2, chart
    assert 'class="badge ok">ok<' in html
    assert f"localhost:{sink.port}</td>" in html.split('id="upstreams"', 1)[1]
    assert 'class="state state-up">up<' in html
    assert picture.returncode == 0, picture.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000


def test_top_interactive_view_in_a_terminal(sink: Sink) -> None:
    """`statsd-filter top` in a terminal draws the table, switches sort on a key, quits on q."""
    datagrams, sent = heavy_traffic()
    with Proxy("--target-port", str(sink.port), "--blocklist", "debug.", *EVERY_LINE) as proxy:
        send(proxy, datagrams)
        proxy.wait_settled()
        wait_top(proxy, sent)
        admin = f"http://{LOCALHOST}:{proxy.admin_port}"
        pid, fd = pty.fork()
        if pid == 0:  # child: exec at once, touching nothing of the test process
            env = clean_env({"TERM": "xterm", "LINES": "40", "COLUMNS": "120"})
            argv = [str(BIN), "top", "--admin", admin, "--interval", "0.3"]
            os.execve(str(BIN), argv, env)  # noqa: S606 - our own program, fixed arguments
        screen = b""

        def read_until(marker: bytes) -> bool:
            nonlocal screen
            deadline = time.monotonic() + 15
            while marker not in screen and time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if ready:
                    with contextlib.suppress(OSError):
                        screen += os.read(fd, 65536)
            return marker in screen

        try:
            assert read_until(b"heavy.a"), screen[-2000:]
            assert read_until(b"LINES/S*")
            screen = b""
            os.write(fd, b"b")
            assert read_until(b"BYTES/S*"), screen[-2000:]
            os.write(fd, b"q")
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            os.close(fd)

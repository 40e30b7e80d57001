"""Rules through the real program: allowlists, rewrites, sampling, explain, live reload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.etsy import EtsyStatsd
from tests.integration.harness import BIN, LOCALHOST, Proxy, Sink, clean_env, wait_until

RULES = """
[[rules]]
name = "drop-debug"
match = { prefix = "debug." }
action = "drop"

[[rules]]
name = "strip-host"
match = { tag = "host" }
action = "strip_tags"
tags = ["host", "pod:*"]

[[rules]]
name = "sample-hot"
match = { name = "hot.counter", type = "c" }
action = "sample"
keep_one_in = 10

[[rules]]
name = "tmp-regex"
match = { regex = "^svc[0-9]+\\\\.tmp$" }
action = "drop"

[[rules]]
name = "rename-old"
match = { prefix = "old." }
action = "rename"
to = "new."

[[rules]]
name = "tag-events"
match = { kind = "event" }
action = "add_tags"
tags = ["via:proxy"]
"""


def _config(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_rewrites_reach_etsy_exactly(tmp_path: Path) -> None:
    """strip_tags, rename and drop rules change only their lines; Etsy statsd sees the result."""
    config = _config(tmp_path, RULES)
    with EtsyStatsd("tcp") as etsy:
        args = (
            "--config",
            str(config),
            "--target-port",
            str(etsy.port),
            "--target-protocol",
            "tcp",
        )
        with Proxy(*args) as proxy:
            for _ in range(40):
                proxy.udp(
                    b"api.hits:1|c|#env:prod,host:web-1,pod:abc\n"
                    b"debug.x:1|c\nsvc12.tmp:1|c\nsvc12.tmpx:1|c\nold.thing:2|c\nplain:1|c|#host"
                )
            counters = etsy.wait_for_counter("plain", 40)
            proxy.wait_settled()
            # Per-rule counters are published once a second.
            m = proxy.wait_metric('rule_matches_total{rule="tag-events"}', lambda v: v >= 0)
            m = proxy.wait_metric('rule_matches_total{rule="rename-old"}', lambda v: v == 40)
    assert counters["api.hits;env=prod"] == 40  # host and pod stripped, env kept
    assert counters["new.thing"] == 80
    assert counters["svc12.tmpx"] == 40  # the regex is anchored: only svc12.tmp dropped
    assert "svc12.tmp" not in counters
    assert not [k for k in counters if k.startswith(("debug.", "old."))]
    assert m['rule_matches_total{rule="drop-debug"}'] == 40
    assert m['rule_matches_total{rule="strip-host"}'] == 80
    assert m['rule_lines_saved_total{rule="tmp-regex"}'] == 40
    assert m['rule_bytes_saved_total{rule="strip-host"}'] == 40 * len(
        b",host:web-1,pod:abc"
    ) + 40 * len(b"|#host")
    assert m["lines_blocked_total"] == 80


def test_sampling_keeps_counter_totals_right(tmp_path: Path) -> None:
    """keep_one_in=10 forwards about a tenth of the lines with @0.1; Etsy's total stays right."""
    config = _config(tmp_path, RULES)
    n = 20_000
    with EtsyStatsd("tcp") as etsy:
        args = (
            "--config",
            str(config),
            "--target-port",
            str(etsy.port),
            "--target-protocol",
            "tcp",
        )
        with Proxy(*args) as proxy, proxy.tcp() as conn:
            for _ in range(n // 100):
                conn.sendall(b"hot.counter:1|c\n" * 100)
            conn.sendall(b"hot.done:1|c\n")
            etsy.wait_for_counter("hot.done", 1)
            proxy.wait_settled()
            m = proxy.wait_metric('rule_matches_total{rule="sample-hot"}', lambda v: v == n)
            counters = etsy.counters()
    kept = (
        m['rule_matches_total{rule="sample-hot"}'] - m['rule_lines_saved_total{rule="sample-hot"}']
    )
    assert m['rule_matches_total{rule="sample-hot"}'] == n
    # Binomial(20000, 0.1): sd of the kept count is 42; 5 sd either side.
    assert abs(kept - n / 10) < 5 * 42
    assert counters["hot.counter"] == kept * 10  # each kept line counts 1/0.1
    assert abs(counters["hot.counter"] - n) < 0.12 * n


def test_allowlist_mode(tmp_path: Path, etsy: EtsyStatsd) -> None:
    """With allowlist_mode only lines an allow rule matches are forwarded."""
    config = _config(
        tmp_path,
        "allowlist_mode = true\n"
        '[[rules]]\nname = "apps"\nmatch = { glob = "app.**" }\naction = "allow"\n'
        '[[rules]]\nname = "gauges"\nmatch = { type = "g" }\naction = "allow"\n',
    )
    with Proxy("--config", str(config), "--target-port", str(etsy.port)) as proxy:
        for i in range(30):
            proxy.udp(b"app.web.hits:1|c\nother.hits:1|c\nlevel:%d|g\nx:1|ms" % i)
        counters = etsy.wait_for_counter("app.web.hits", 30)
        # Datagrams read by different workers may reach the upstream in either
        # order, so which gauge value lands last is only certain for a final one.
        proxy.udp(b"level:99|g")
        gauge_arrived = wait_until(lambda: etsy.gauges().get("level") == 99)
        proxy.wait_settled()
        m = proxy.wait_metric('rule_matches_total{rule="allowlist_default"}', lambda v: v == 60)
    assert "other.hits" not in counters
    assert gauge_arrived
    assert "x" not in etsy.timers()
    assert m['rule_matches_total{rule="allowlist_default"}'] == 60
    assert m["lines_blocked_total"] == 60
    assert m["lines_forwarded_total"] == 61


def test_events_tagged_and_passed(tmp_path: Path, sink: Sink) -> None:
    """An add_tags rule on kind=event rewrites events only; other lines stay byte-identical."""
    config = _config(tmp_path, RULES)
    with Proxy("--config", str(config), "--target-port", str(sink.port)) as proxy:
        proxy.udp(b"_e{5,4}:title|text|#a:b\n_sc|db|0\nm:1|c|@0.5|#x:y")
        lines = sink.wait_for_lines(3)
    assert sorted(lines) == sorted(
        [b"_e{5,4}:title|text|#a:b,via:proxy", b"_sc|db|0", b"m:1|c|@0.5|#x:y"]
    )


def test_rule_names_with_any_character_are_escaped_in_metrics(tmp_path: Path, sink: Sink) -> None:
    """A rule name with quotes, a backslash and a newline is a valid label in /metrics."""
    name = 'say "hi" \\ to\nall'
    toml_name = r'"say \"hi\" \\ to\nall"'  # the same name as a TOML basic string
    config = _config(
        tmp_path,
        f'[[rules]]\nname = {toml_name}\nmatch = {{ prefix = "noisy." }}\naction = "drop"\n',
    )
    with Proxy("--config", str(config), "--target-port", str(sink.port)) as proxy:
        proxy.udp(b"noisy.a:1|c\nnoisy.b:1|c\nkept:1|c")
        sink.wait_for_lines(1)

        def matched() -> dict[str, float]:
            text = proxy.get("/metrics")[1]
            return {
                sample.labels["rule"]: sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "statsd_filter_rule_matches"
                for sample in family.samples
            }

        counts = wait_until(lambda: matched().get(name) == 2 and matched())
    assert counts == {name: 2}


def test_explain_and_check_config(tmp_path: Path) -> None:
    """explain names the deciding rule and the forwarded line; check-config lists rules in order."""
    config = _config(tmp_path, RULES)
    out = subprocess.run(
        [
            str(BIN),
            "explain",
            "--config",
            str(config),
            "--blocklist",
            "noisy.",
            "api.req:1|c|#env:dev,host:a",
            "noisy.x:1|c",
            "other:1|g",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=True,
    ).stdout
    assert "decision:  rule 'strip-host' (#3) matched: tag='host'; action strip_tags" in out
    assert "forwarded: api.req:1|c|#env:dev" in out
    assert "decision:  rule 'blocklist' (#1) matched: prefix='noisy.'; action drop" in out
    assert "forwarded: nothing (dropped)" in out
    assert "decision:  no rule matched; forwarded unchanged\nforwarded: other:1|g" in out
    listing = subprocess.run(
        [str(BIN), "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=True,
    ).stdout
    assert "#   1. drop-debug: match prefix='debug.' -> drop" in listing
    assert "#   3. sample-hot: match name='api.requests'" not in listing
    assert (
        "#   3. sample-hot: match name='hot.counter', type='c' -> sample keep_one_in=10" in listing
    )
    assert "#   otherwise: forward unchanged" in listing


def test_invalid_rules_are_rejected_with_name_and_reason(tmp_path: Path) -> None:
    """Bad regex, unknown key or action, impossible glob: exit 2 naming the rule and the reason."""
    cases = {
        'match = { regex = "(a" }\naction = "drop"': "rule 'r': bad regex '(a'",
        'match = { regex = "(a)\\\\1" }\naction = "drop"': "rule 'r': bad regex",
        'match = { prefix = "a" }\naction = "explode"': "rule 'r': unknown action 'explode'",
        'match = { prefix = "a", colour = "red" }\naction = "drop"': (
            "rule 'r': unknown match key 'colour'"
        ),
        'match = { glob = "api:*" }\naction = "drop"': "rule 'r': glob 'api:*' can never match",
        'match = { prefix = "a" }\naction = "sample"': "rule 'r': sample needs keep_one_in",
        'match = { type = "x" }\naction = "drop"': "rule 'r': type 'x' is not one of",
    }
    for body, needle in cases.items():
        config = _config(tmp_path, f'[[rules]]\nname = "r"\n{body}\n')
        result = subprocess.run(
            [str(BIN), "check-config", "--config", str(config)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=30,
        )
        assert result.returncode == 2, body
        assert needle in result.stderr, (body, result.stderr)
        assert f"invalid rules from config file {config}" in result.stderr


def _generation_applied(proxy: Proxy, generation: int) -> bool:
    health = proxy.healthz()
    return health["config"]["generation"] == generation and all(
        w["config_generation"] == generation for w in health["workers"]
    )


def test_sighup_reload_valid_invalid_and_restart_required(tmp_path: Path, sink: Sink) -> None:
    """HUP applies new rules without restarting workers; a bad file changes nothing, is counted."""
    config = _config(tmp_path, 'blocklist = ["a."]\n')
    with Proxy("--config", str(config), "--target-port", str(sink.port)) as proxy:
        pids = proxy.worker_pids()
        proxy.udp(b"a.x:1|c\nb.x:1|c")
        assert sink.wait_for_lines(1) == [b"b.x:1|c"]

        config.write_text('blocklist = ["b."]\nmax_udp_size = 900\n')
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _generation_applied(proxy, 1))
        health = proxy.healthz()
        assert health["config"]["restart_required"] == ["max_udp_size"]
        proxy.udp(b"a.y:1|c\nb.y:1|c")
        assert wait_until(lambda: b"a.y:1|c" in sink.lines())

        bad_rule = '[[rules]]\nname = "bad"\nmatch = { regex = "(" }\naction = "drop"\n'
        config.write_text('blocklist = ["c."]\n' + bad_rule)
        proxy.proc.send_signal(signal.SIGHUP)
        m = proxy.wait_metric("config_reload_failures_total", lambda v: v == 1)
        health = proxy.healthz()
        assert health["config"]["last_reload"]["ok"] is False
        assert "rule 'bad': bad regex" in health["config"]["last_reload"]["error"]
        assert health["config"]["generation"] == 1
        proxy.udp(b"b.z:1|c\nc.z:1|c")  # still generation 1: b. blocked, c. passes
        assert wait_until(lambda: b"c.z:1|c" in sink.lines())
        m = proxy.wait_settled()
        assert proxy.worker_pids() == pids  # nobody was restarted
    assert b"b.y:1|c" not in sink.lines()
    assert b"b.z:1|c" not in sink.lines()
    assert m["config_reloads_total"] == 1
    assert "config reload (SIGHUP) rejected, keeping the running config" in proxy.output()


def test_watch_config_and_restarted_worker_keeps_new_rules(tmp_path: Path, sink: Sink) -> None:
    """--watch-config picks up a changed file; a worker restarted afterwards has the new rules."""
    config = _config(tmp_path, 'blocklist = ["a."]\n')
    with Proxy("--config", str(config), "--watch-config", "--target-port", str(sink.port)) as proxy:
        time.sleep(0.1)
        config.write_text('blocklist = ["b."]\n# changed\n')
        assert wait_until(lambda: _generation_applied(proxy, 1), timeout=10)
        victim = proxy.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: victim not in proxy.worker_pids() and len(proxy.worker_pids()) == 2
        )
        assert wait_until(lambda: _generation_applied(proxy, 1))
        for i in range(100):
            proxy.udp(b"a.%d:1|c\nb.%d:1|c" % (i, i))
        lines = sink.wait_for_lines(100)
        proxy.wait_settled()
    assert sorted(lines) == sorted(b"a.%d:1|c" % i for i in range(100))


def _steady_sender(port: int, stop: threading.Event, sent: list[int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(1_000_000):
            if stop.is_set():
                return
            sock.sendto(
                b"keep.%d:1|c\nx.%d:1|c\ny.%d:1|c\nz.%d:1|c" % (i, i, i, i), (LOCALHOST, port)
            )
            sent[0] = i + 1
            if i % 50 == 49:
                time.sleep(0.002)  # ~20k datagrams/s at most: steady, not a flood


def test_reload_twenty_times_under_load_loses_nothing(tmp_path: Path, tcp_sink: Sink) -> None:
    """20 reloads (valid and invalid) while traffic flows: every line is forwarded or blocked."""
    sink = tcp_sink  # lossless upstream, so every count below is exact
    variants = [
        'blocklist = ["z.", "x."]\n',
        'blocklist = ["z."]\n[[rules]]\nname = "y"\nmatch = { prefix = "y." }\naction = "drop"\n',
        (
            'blocklist = ["z."]\n[[rules]]\nname = "broken"\nmatch = { regex = "[" }\n'
            'action = "drop"\n'
        ),
        'blocklist = ["z.", "x.", "y."]\n',
    ]
    config = _config(tmp_path, variants[0])
    args = ("--config", str(config), "--target-port", str(sink.port), "--target-protocol", "tcp")
    with Proxy(*args) as proxy:
        stop = threading.Event()
        sent = [0]
        sender = threading.Thread(target=_steady_sender, args=(proxy.port, stop, sent))
        sender.start()
        try:
            generation = 0
            for i in range(20):
                variant = variants[i % len(variants)]
                config.write_text(variant)
                proxy.proc.send_signal(signal.SIGHUP)
                if "broken" in variant:
                    failures = (i + 2) // 4

                    def rejected(f: int = failures) -> bool:
                        return bool(proxy.healthz()["config"]["reload_failures"] == f)

                    assert wait_until(rejected)
                else:
                    generation += 1

                    def applied(g: int = generation) -> bool:
                        return _generation_applied(proxy, g)

                    assert wait_until(applied)
                time.sleep(0.05)
        finally:
            stop.set()
            sender.join(10)
        m = proxy.wait_settled(timeout=20)
        lines = sink.settle()
    total = sent[0]
    assert m["udp_kernel_drops_total"] == 0
    assert m["lines_received_total"] == 4 * total
    assert m["lines_forwarded_total"] == len(lines)
    assert m["lines_received_total"] == m["lines_forwarded_total"] + m["lines_blocked_total"]
    keep = [line for line in lines if line.startswith(b"keep.")]
    assert len(keep) == total  # never blocked by any variant: all arrived, once each
    assert len(set(keep)) == total
    assert not [line for line in lines if line.startswith(b"z.")]  # blocked by every variant
    assert m["config_reload_failures_total"] == 5


def test_reload_turns_debug_line_logging_on(tmp_path: Path, sink: Sink) -> None:
    """log_level is applied live: after a reload to debug, workers log each line."""
    config = _config(tmp_path, 'log_level = "info"\n')
    with Proxy("--config", str(config), "--target-port", str(sink.port)) as proxy:
        proxy.udp(b"quiet.line:1|c")
        sink.wait_for_lines(1)
        config.write_text('log_level = "debug"\n')
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _generation_applied(proxy, 1))
        proxy.udp(b"loud.line:1|c")
        assert wait_until(lambda: "forwarded 'loud.line:1|c'" in proxy.output())
    assert "quiet.line" not in proxy.output()

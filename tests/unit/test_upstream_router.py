"""Unit tests for statsd_filter.upstream.router.Router: single, mirror and shard routing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.upstream import router as router_module
from statsd_filter.upstream.batcher import Batcher
from statsd_filter.upstream.hashring import HashRing
from statsd_filter.upstream.router import Router

if TYPE_CHECKING:
    import pytest

PROPERTY = settings(max_examples=200, deadline=None)
NODES = ["10.0.0.1:8125", "10.0.0.2:8125", "10.0.0.3:8125"]


class RecordingBatcher(Batcher):
    """A real Batcher that also records every add() call it gets."""

    def __init__(self) -> None:
        super().__init__(1 << 20, self._sent)
        self.adds: list[tuple[bytes, int]] = []
        self.flushed: list[bytes] = []

    def _sent(self, payloads: list[bytes], lines: list[int]) -> None:
        assert len(payloads) == len(lines)
        self.flushed += payloads

    def add(self, chunk: bytes, lines: int) -> None:
        self.adds.append((chunk, lines))
        super().add(chunk, lines)

    @property
    def lines(self) -> list[bytes]:
        """Every line added, in order, taken from the chunks as routed."""
        out: list[bytes] = []
        for chunk, count in self.adds:
            assert chunk.startswith(b"\n")
            parts = chunk[1:].split(b"\n")
            assert len(parts) == count, (chunk, count)
            out += parts
        return out


def chunk_of(lines: list[bytes]) -> bytes:
    """A chunk in the filter's shape: LF + lines joined by LF."""
    return b"\n" + b"\n".join(lines)


def make(
    count: int, mode: str = "shard", weights: list[int] | None = None
) -> tuple[Router, list[RecordingBatcher]]:
    batchers = [RecordingBatcher() for _ in range(count)]
    return Router(NODES[:count], batchers, mode, weights), batchers


def names(count: int) -> list[bytes]:
    return [b"metric.%d" % i for i in range(count)]


def placement(router: Router, batchers: list[RecordingBatcher], keys: list[bytes]) -> list[str]:
    """Route one line per key and return the node each landed on."""
    for batcher in batchers:
        batcher.adds.clear()
    router.add(chunk_of([key + b":1|c" for key in keys]), len(keys))
    where: dict[bytes, str] = {}
    for node, batcher in zip(router.nodes, batchers, strict=True):
        for line in batcher.lines:
            key = line.partition(b":")[0]
            assert key not in where, f"{key!r} went to two upstreams"
            where[key] = node
    assert sorted(where) == sorted(keys)
    return [where[key] for key in keys]


def test_one_batcher_is_single_mode_and_gets_chunks_unchanged() -> None:
    """With one upstream the mode is 'single' and each chunk reaches its batcher as given."""
    router, (only,) = make(1, mode="shard")
    assert router.mode == "single"
    chunks = [chunk_of([b"a:1|c", b"b:2|g"]), chunk_of([b"no-colon-line"]), b"\n"]
    for chunk in chunks:
        router.add(chunk, chunk.count(b"\n"))
    assert only.adds == [(chunk, chunk.count(b"\n")) for chunk in chunks]
    assert all(got is sent for (got, _), sent in zip(only.adds, chunks, strict=True))


def test_mirror_gives_every_batcher_every_chunk() -> None:
    """In mirror mode every batcher receives every chunk, in order, with its line count."""
    router, batchers = make(3, mode="mirror")
    assert router.mode == "mirror"
    chunks = [chunk_of([b"x.%d:1|c" % i, b"y:2|ms"]) for i in range(5)]
    for chunk in chunks:
        router.add(chunk, 2)
    for batcher in batchers:
        assert batcher.adds == [(chunk, 2) for chunk in chunks]


def test_shard_matches_the_hash_ring() -> None:
    """In shard mode each line lands on exactly one batcher: HashRing(nodes).get(its name)."""
    router, batchers = make(3)
    keys = names(300)
    ring = HashRing(NODES)
    assert placement(router, batchers, keys) == [ring.get(key) for key in keys]
    # A sanity check that the test means something: all three upstreams got names.
    assert all(batcher.adds for batcher in batchers)


def test_shard_is_stable_across_chunks() -> None:
    """A name lands on the same upstream every time, whatever chunk it comes in."""
    router, batchers = make(3)
    keys = names(100)
    first = placement(router, batchers, keys)
    again = placement(router, batchers, list(reversed(keys)))
    assert list(reversed(again)) == first


def test_shard_hashes_the_text_before_the_first_colon() -> None:
    """Tags, values and types after the first ':' do not change where a line goes."""
    router, batchers = make(3)
    ring = HashRing(NODES)
    lines = [
        b"api.latency:12|ms|#host:a",
        b"api.latency:99|ms|@0.5|#host:zzz,env:prod",
        b"no.colon.at.all|c",
    ]
    router.add(chunk_of(lines), len(lines))
    for line, key in zip(
        lines, [b"api.latency", b"api.latency", b"no.colon.at.all|c"], strict=True
    ):
        target = NODES.index(ring.get(key))
        assert line in batchers[target].lines
        assert all(line not in b.lines for i, b in enumerate(batchers) if i != target)


def test_shard_keeps_line_order_and_counts_per_batcher() -> None:
    """Lines keep their relative order on each upstream, and each add() carries its line count."""
    router, batchers = make(3)
    lines = [b"m.%d:%d|c" % (i % 17, i) for i in range(200)]
    router.add(chunk_of(lines), len(lines))
    ring = HashRing(NODES)
    for node, batcher in zip(NODES, batchers, strict=True):
        expected = [line for line in lines if ring.get(line.partition(b":")[0]) == node]
        assert batcher.lines == expected
        assert len(batcher.adds) == 1  # one chunk per upstream per routed chunk


def test_shard_honours_weights() -> None:
    """Configured weights place names as a HashRing with the same weights does."""
    weights = [100, 400]
    router, batchers = make(2, weights=weights)
    keys = names(300)
    ring = HashRing(NODES[:2], weights=dict(zip(NODES[:2], weights, strict=True)))
    got = placement(router, batchers, keys)
    assert got == [ring.get(key) for key in keys]
    assert got != [HashRing(NODES[:2]).get(key) for key in keys]  # the weights mattered


def test_unhealthy_node_moves_only_its_names() -> None:
    """set_healthy(False) moves that node's names to the others; everyone else's stay put."""
    router, batchers = make(3)
    keys = names(300)
    before = placement(router, batchers, keys)
    down = NODES[1]
    assert router.set_healthy(down, False) is True
    assert router.healthy == {NODES[0], NODES[2]}
    after = placement(router, batchers, keys)
    survivors = HashRing([NODES[0], NODES[2]])
    assert down in before
    for key, old, new in zip(keys, before, after, strict=True):
        assert new != down
        if old == down:
            assert new == survivors.get(key)
        else:
            assert new == old, key


def test_healthy_again_moves_names_back() -> None:
    """set_healthy(True) after a failure restores the original placement, weight included."""
    weights = [100, 300, 100]
    router, batchers = make(3, weights=weights)
    keys = names(300)
    before = placement(router, batchers, keys)
    router.set_healthy(NODES[1], False)
    assert placement(router, batchers, keys) != before
    assert router.set_healthy(NODES[1], True) is True
    assert router.healthy == set(NODES)
    assert placement(router, batchers, keys) == before


def test_set_healthy_reports_only_changes() -> None:
    """set_healthy returns False (and changes nothing) when the node is already in that state."""
    router, batchers = make(3)
    keys = names(50)
    before = placement(router, batchers, keys)
    assert router.set_healthy(NODES[0], True) is False
    assert router.set_healthy(NODES[2], False) is True
    assert router.set_healthy(NODES[2], False) is False
    assert router.healthy == {NODES[0], NODES[1]}
    assert router.set_healthy(NODES[2], True) is True
    assert placement(router, batchers, keys) == before


def test_all_unhealthy_uses_the_full_ring() -> None:
    """With every upstream unhealthy nothing is dropped: names go where the full ring says."""
    router, batchers = make(3)
    keys = names(200)
    before = placement(router, batchers, keys)
    for node in NODES:
        router.set_healthy(node, False)
    assert router.healthy == set()
    assert placement(router, batchers, keys) == before
    router.set_healthy(NODES[2], True)
    assert placement(router, batchers, keys) == [NODES[2]] * len(keys)


def test_reroute_places_refused_lines_on_the_healthy_ring() -> None:
    """reroute() of a datagram a down node refused shards its lines over the remaining nodes."""
    router, batchers = make(3)
    down = NODES[0]
    router.set_healthy(down, False)
    keys = names(60)
    payload = b"\n".join(key + b":1|c" for key in keys)
    assert router.reroute(payload, down) is True
    survivors = HashRing(NODES[1:])
    assert batchers[0].adds == []
    for node, batcher in zip(NODES[1:], batchers[1:], strict=True):
        assert batcher.lines == [k + b":1|c" for k in keys if survivors.get(k) == node]


def test_reroute_refuses_when_it_cannot_help() -> None:
    """reroute() is False and routes nothing: node still healthy, none healthy, or not sharding."""
    router, batchers = make(3)
    assert router.reroute(b"a:1|c", NODES[0]) is False  # still in the ring: no other place
    for node in NODES:
        router.set_healthy(node, False)
    assert router.reroute(b"a:1|c", NODES[0]) is False  # nobody healthy to take it
    assert all(batcher.adds == [] for batcher in batchers)
    mirror, mirrored = make(3, mode="mirror")
    mirror.set_healthy(NODES[0], False)
    assert mirror.reroute(b"a:1|c", NODES[0]) is False  # the others already have a copy
    assert all(batcher.adds == [] for batcher in mirrored)


def test_route_cache_is_cleared_not_grown(monkeypatch: pytest.MonkeyPatch) -> None:
    """At ROUTE_CACHE_SIZE entries the route cache is emptied, and routing stays correct."""
    monkeypatch.setattr(router_module, "ROUTE_CACHE_SIZE", 4)
    router, batchers = make(3)
    ring = HashRing(NODES)
    sizes = []
    for key in names(10):
        router.add(chunk_of([key + b":1|c"]), 1)
        sizes.append(len(router._route))
    assert sizes == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    keys = names(40)
    assert placement(router, batchers, keys) == [ring.get(key) for key in keys]
    assert len(router._route) <= 4


def test_flush_flushes_every_batcher() -> None:
    """Router.flush() hands each batcher's pending lines to its sender."""
    router, batchers = make(3, mode="mirror")
    router.add(chunk_of([b"a:1|c", b"b:1|c"]), 2)
    assert all(batcher.flushed == [] for batcher in batchers)
    router.flush()
    assert all(batcher.flushed == [b"a:1|c\nb:1|c"] for batcher in batchers)


_line = st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"_"))


@PROPERTY
@given(
    st.lists(st.lists(_line, min_size=1, max_size=10), min_size=1, max_size=8),
    st.sets(st.sampled_from(NODES)),
)
def test_shard_routes_every_line_exactly_once(chunks: list[list[bytes]], down: set[str]) -> None:
    """Any lines, any unhealthy set: each line reaches exactly one batcher, the ring's choice."""
    router, batchers = make(3)
    for node in down:
        router.set_healthy(node, False)
    healthy = [node for node in NODES if node not in down]
    ring = HashRing(healthy or NODES)
    for lines in chunks:
        router.add(chunk_of(lines), len(lines))
    expected: dict[str, list[bytes]] = {node: [] for node in NODES}
    for line in (line for lines in chunks for line in lines):
        expected[ring.get(line.partition(b":")[0])].append(line)
    for node, batcher in zip(NODES, batchers, strict=True):
        assert batcher.lines == expected[node]

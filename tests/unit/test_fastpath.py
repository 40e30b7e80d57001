"""The C fast path (recv, filter, pack in one call) against its Python reference.

The reference is what the worker does without the fast path: LineFilter over
the datagrams joined by newlines, then the Batcher. Both must forward the same
lines, in the same datagrams, and count the same.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter import fastio
from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.filter import RULE_FIELDS
from statsd_filter.rules.model import parse_rules
from statsd_filter.upstream.batcher import Batcher, SendBatch
from statsd_filter.upstream.hashring import HashRing, metric_key
from statsd_filter.upstream.router import Router

pytestmark = pytest.mark.skipif(not fastio.FAST_PATH, reason="the C accelerator is not built")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    yield receiver, sender
    receiver.close()
    sender.close()


def _reference(
    datagrams: list[bytes], blocklist: tuple[str, ...], max_line: int, max_size: int
) -> tuple[list[bytes], list[int], int, int, int, list[int]]:
    line_filter = compile_filter(blocklist, max_line)
    sent: list[tuple[list[bytes], list[int]]] = []
    batcher = Batcher(max_size, lambda payloads, lines: sent.append((payloads, lines)))
    kept, received, forwarded, blocked, oversize = line_filter.filter(b"\n".join(datagrams))
    if forwarded:
        batcher.add(kept, forwarded)
    batcher.flush()
    payloads = [p for batch, _ in sent for p in batch]
    lines = [n for _, counts in sent for n in counts]
    return payloads, lines, received, blocked, oversize, line_filter.counters.values


def _fast(
    pair: tuple[socket.socket, socket.socket],
    datagrams: list[bytes],
    blocklist: tuple[str, ...],
    max_line: int,
    max_size: int,
) -> tuple[list[bytes], list[int], int, int, int, list[int]]:
    receiver, sender = pair
    line_filter = compile_filter(blocklist, max_line)
    for datagram in datagrams:
        sender.send(datagram)
    time.sleep(0.001)  # loopback delivery is immediate; this only bounds scheduling
    read = fastio.recv_filter_pack(
        receiver, len(datagrams) + 1, line_filter.prefix_trie(), max_line, max_size
    )
    payloads, lines, count, size, received, blocked, oversize, hits, error, sampled = read
    assert sampled is None  # no sampling asked
    assert (count, size, error) == (len(datagrams), sum(map(len, datagrams)), 0)
    counters = [0] * len(line_filter.counters.values)
    rows = [row for _, row in line_filter.leading_prefixes]
    for position, hit_lines, hit_bytes in hits:
        base = rows[position] * RULE_FIELDS
        counters[base] += hit_lines
        counters[base + 1] += hit_lines
        counters[base + 2] += hit_bytes
    return payloads, lines, received, blocked, oversize, counters


_LINE = st.one_of(
    st.sampled_from(
        [b"app.hits:1|c", b"debug.x:1|g", b"db.q:12|ms|#env:prod", b"x" * 40 + b":1|c", b""]
    ),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
)
_DATAGRAM = st.lists(st.tuples(_LINE, st.sampled_from([b"", b"\r"])), min_size=1, max_size=8).map(
    lambda lines: b"\n".join(line + end for line, end in lines)
)


@settings(max_examples=150, deadline=None)
@given(
    datagrams=st.lists(_DATAGRAM, min_size=1, max_size=40),
    blocklist=st.lists(
        st.sampled_from(["debug.", "db", "x", "app.hits", "d", "\x00", "é"]), max_size=4
    ),
    max_line=st.sampled_from([16, 32, 8192]),
    max_size=st.sampled_from([20, 64, 1432]),
)
def test_fast_path_forwards_and_counts_as_the_python_path(
    pair: tuple[socket.socket, socket.socket],
    datagrams: list[bytes],
    blocklist: list[str],
    max_line: int,
    max_size: int,
) -> None:
    """Same datagrams out, same received/blocked/oversize, same per-rule counts."""
    prefixes = tuple(blocklist)
    assert _fast(pair, datagrams, prefixes, max_line, max_size) == _reference(
        datagrams, prefixes, max_line, max_size
    )


_RULES = parse_rules(
    [
        {"name": "strip", "match": {"tag": "env"}, "action": "strip_tags", "tags": ["env"]},
        {"name": "drop-db", "match": {"prefix": "db."}, "action": "drop"},
        {"name": "rename", "match": {"prefix": "app."}, "action": "rename", "to": "svc."},
    ]
)


@settings(max_examples=100, deadline=None)
@given(
    datagrams=st.lists(_DATAGRAM, min_size=1, max_size=40),
    blocklist=st.lists(st.sampled_from(["debug.", "x", "d", "é"]), max_size=3),
    max_line=st.sampled_from([16, 8192]),
)
def test_chunk_mode_then_the_other_rules_equal_the_python_filter(
    pair: tuple[socket.socket, socket.socket],
    datagrams: list[bytes],
    blocklist: list[str],
    max_line: int,
) -> None:
    """max_size 0: C's chunk, then LineFilter.apply_rules, is what LineFilter.filter gives."""
    receiver, sender = pair
    prefixes = tuple(blocklist)
    reference = compile_filter(prefixes, max_line, _RULES)
    expected = reference.filter(b"\n".join(datagrams))
    fast = compile_filter(prefixes, max_line, _RULES)
    for datagram in datagrams:
        sender.send(datagram)
    time.sleep(0.001)
    read = fastio.recv_filter_pack(receiver, len(datagrams) + 1, fast.prefix_trie(), max_line, 0)
    (chunk,), (count,), _, _, received, blocked, oversize, hits, error, _ = read
    assert error == 0
    assert count == chunk.count(b"\n")
    kept, more = fast.apply_rules(chunk)
    rows = [row for _, row in fast.leading_prefixes]
    for position, hit_lines, hit_bytes in hits:
        fast.counters.add(rows[position], hit_lines, hit_bytes, hit_lines)
    assert (kept, received, received - oversize - blocked - more, blocked + more, oversize) == (
        expected
    )
    assert fast.counters.values == reference.counters.values


def test_several_leading_rules_credit_the_earliest_listing_rule() -> None:
    """With overlapping prefixes in two drop rules, the first rule gets the line."""
    rules = parse_rules(
        [
            {"name": "long", "match": {"prefix": "a.b."}, "action": "drop"},
            {"name": "short", "match": {"prefix": "a."}, "action": "drop"},
        ]
    )
    line_filter = compile_filter((), 8192, rules)
    assert line_filter.leading_only
    trie = line_filter.prefix_trie()
    assert trie is not None
    rows = dict(line_filter.leading_prefixes)
    assert rows[b"a.b."] == 0
    assert rows[b"a."] == 1
    assert trie.match(b"a.b.c:1|c") == 0  # both match: the earlier rule owns it
    assert trie.match(b"a.x:1|c") == 1
    assert trie.match(b"b.x:1|c") == -1


@given(
    prefixes=st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=30),
    line=st.binary(max_size=12),
)
def test_trie_finds_the_earliest_listed_prefix(prefixes: list[bytes], line: bytes) -> None:
    """Trie.match is the position of the first listed prefix the line starts with."""
    expected = next((i for i, p in enumerate(prefixes) if line.startswith(p)), -1)
    assert fastio.Trie(prefixes).match(line) == expected


def test_a_receive_error_is_reported_not_raised() -> None:
    """A socket error comes back as an errno with what was read so far."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as not_udp:
        read = fastio.recv_filter_pack(not_udp, 8, None, 100, 100)
    assert read[:8] == ([], [], 0, 0, 0, 0, 0, [])
    assert read[8] != 0


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.binary(max_size=90).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    nodes=st.integers(min_value=1, max_value=9),
)
def test_ring_routes_every_ascii_name_as_the_hash_ring(names: list[bytes], nodes: int) -> None:
    """The C ring places an ASCII name exactly as HashRing (proxy.js); others go to Python."""
    ids = [f"10.0.0.{i}:8125" for i in range(nodes)]
    ring = HashRing(ids)
    values, owners = ring.continuum()
    c_ring = fastio.Ring(values, [ids.index(node) for node in owners], nodes)
    for name in names:
        line = name + b":1|c"
        key = metric_key(line)
        expected = ids.index(ring.get(key)) if key.isascii() else -1
        assert c_ring.route(line) == expected, line


@settings(max_examples=80, deadline=None)
@given(datagrams=st.lists(_DATAGRAM, min_size=1, max_size=40), max_size=st.sampled_from([40, 1432]))
def test_routed_fast_path_sends_what_the_python_router_sends(
    pair: tuple[socket.socket, socket.socket], datagrams: list[bytes], max_size: int
) -> None:
    """Sharded in C: every upstream gets the datagrams the Python router and batchers make."""
    receiver, sender = pair
    nodes = ["10.0.0.1:8125", "10.0.0.2:8125", "10.0.0.3:8125"]

    def router() -> tuple[Router, list[list[tuple[list[bytes], list[int]]]]]:
        sent: list[list[tuple[list[bytes], list[int]]]] = [[] for _ in nodes]

        def into(record: list[tuple[list[bytes], list[int]]]) -> SendBatch:
            return lambda payloads, lines: record.append((payloads, lines))

        batchers = [Batcher(max_size, into(sent[i])) for i in range(3)]
        return Router(nodes, batchers, "shard"), sent

    reference, expected = router()
    line_filter = compile_filter(("debug.",), 8192)
    kept, _, forwarded, _, _ = line_filter.filter(b"\n".join(datagrams))
    if forwarded:
        reference.add(kept, forwarded)
    reference.flush()

    fast, got = router()
    assert fast.c_ring is not None
    for datagram in datagrams:
        sender.send(datagram)
    time.sleep(0.001)
    read = fastio.recv_filter_pack(
        receiver,
        len(datagrams) + 1,
        compile_filter(("debug.",), 8192).prefix_trie(),
        8192,
        max_size,
        fast.c_ring,
    )
    fast.send_routed(read[0], read[1])  # type: ignore[arg-type]

    def flat(sent: list[tuple[list[bytes], list[int]]]) -> list[bytes]:
        # Python routes non-ASCII names after C has sent the rest: same lines, maybe
        # in other datagrams, so compare lines per upstream, in order of each kind.
        return [line for payloads, _ in sent for p in payloads for line in p.split(b"\n")]

    for upstream in range(3):
        assert sorted(flat(got[upstream])) == sorted(flat(expected[upstream]))
        ascii_lines = [x for x in flat(expected[upstream]) if metric_key(x).isascii()]
        assert [x for x in flat(got[upstream]) if metric_key(x).isascii()] == ascii_lines


def _sampled(
    pair: tuple[socket.socket, socket.socket], datagrams: list[bytes], sample: fastio.SampleArgs
) -> fastio.Sampled:
    receiver, sender = pair
    for datagram in datagrams:
        sender.send(datagram)
    time.sleep(0.001)
    read = fastio.recv_filter_pack(receiver, len(datagrams) + 1, None, 50, 1432, None, sample)
    assert read[2] == len(datagrams)
    assert read[9] is not None
    return read[9]


@settings(max_examples=100, deadline=None)
@given(
    datagrams=st.lists(
        st.lists(
            st.sampled_from([b"a:1|c", b"bb:2|g\r", b"", b"c" * 60, b"d:1|c|#x:y"]), max_size=6
        )
        .map(b"\n".join)
        .filter(bool),
        min_size=1,
        max_size=8,
    )
)
def test_sampling_every_byte_sees_each_line_once_as_python_does(
    pair: tuple[socket.socket, socket.socket], datagrams: list[bytes]
) -> None:
    """Step 1 in C: every non-empty line once, standing for the bytes it spans in the
    joined read, exactly as the Python sampler's chunk sees it; the countdown carries over."""
    lines, next_at, step, _, points = _sampled(pair, datagrams, (0, 1, 7, 10**9, 1))
    joined = b"\n".join(datagrams)
    expected = []
    offset = 0
    for raw in joined.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line:
            expected.append((line, len(raw) + 1, len(raw) + 1))
        offset += len(raw) + 1
    assert lines == expected
    assert (next_at, step, points) == (0, 1, len(joined) + 1)


def test_sparse_sampling_in_c_estimates_like_python(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Points 1 per ~300 bytes over many reads: the bytes they stand for add up to the
    bytes read within a few percent, and the countdown continues across reads."""
    datagram = b"\n".join([b"short:1|c", b"long.name:1|c|#" + b"t" * 90] * 5)
    state = (0, 300, 12345, 10**9, 300)
    total_weight = 0
    total_bytes = 0
    for _ in range(40):
        lines, next_at, step, rng, _ = _sampled(pair, [datagram] * 30, state)
        assert step == 300
        assert 0 <= next_at < 2 * 300
        total_weight += sum(weight for _, weight, _ in lines)
        total_bytes += (len(datagram) + 1) * 30
        state = (next_at, step, rng, 10**9, step)
    assert abs(total_weight - total_bytes) < 0.05 * total_bytes


def test_too_many_points_in_one_read_widen_the_step(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A read that would hold far more points than allowed widens its own step as it goes."""
    lines, _, step, _, points = _sampled(pair, [b"x:1|c\n" * 200] * 20, (0, 1, 3, 50, 1))
    assert step > 16
    assert len(lines) < 400  # of 4,000 lines
    assert points < 500


CHUNK_LINE = st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b)


@settings(max_examples=300)
@given(st.lists(CHUNK_LINE, max_size=60), st.integers(1, 120))
def test_pack_chunk_packs_as_the_batcher_does(lines: list[bytes], max_size: int) -> None:
    """pack_chunk gives the payloads and line counts Batcher.add + flush give, for any
    lines and size (a line longer than the size alone in its payload)."""
    chunk = b"".join(b"\n" + line for line in lines)
    sent: list[tuple[list[bytes], list[int]]] = []
    batcher = Batcher(max_size, lambda payloads, counts: sent.append((payloads, counts)))
    if lines:
        batcher.add(chunk, len(lines))
    batcher.flush()
    payloads = [p for batch, _ in sent for p in batch]
    counts = [n for _, batch_counts in sent for n in batch_counts]
    assert fastio.pack_chunk(chunk, max_size) == (payloads, counts)


def test_widening_within_a_read_keeps_the_estimate_unbiased(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Reads that each exhaust their allowance and widen the step several times: the bytes
    the points stand for still add up to the bytes read. A point is weighted by the mean
    of the gap that led to it: a widening comes before the next gap is drawn, and the
    gap running when a read starts keeps its own mean."""
    datagram = b"\n".join([b"a.b:1|c|#k:v"] * 20)
    total_weight = total_bytes = 0
    rng, next_at, running = 99, 0, 8
    for _ in range(400):
        # Each read starts from step 8 again (as a sampler's new period does), while
        # the gap already running keeps the mean it was drawn with.
        lines, next_at, step, rng, points = _sampled(
            pair, [datagram] * 4, (next_at, 8, rng, 2, running)
        )
        if points:
            running = step
        total_weight += sum(weight for _, weight, _ in lines)
        total_bytes += (len(datagram) + 1) * 4
    assert abs(total_weight - total_bytes) < 0.05 * total_bytes

"""Unit tests for worker/sampler.py: sample points, estimates, the brake and the tap buffer."""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING

from statsd_filter.cardinality import estimate, tag_set_bit
from statsd_filter.fastio import PackedRead, Sampled
from statsd_filter.protocol.messages import TapFilter
from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.filter import LineFilter
from statsd_filter.rules.model import parse_rules
from statsd_filter.stats import SLOT_WIDTH, Stat
from statsd_filter.worker import sampler as sampler_module
from statsd_filter.worker.pipeline import Pipeline
from statsd_filter.worker.sampler import TAP_BATCH, Sampler, line_name

if TYPE_CHECKING:
    import pytest

ROWS = {"blocklist": 0, "tag-env": 1}
RULES = parse_rules(
    [{"name": "tag-env", "match": {"prefix": "web."}, "action": "add_tags", "tags": ["env:x"]}]
)


def counters() -> memoryview:
    return memoryview(bytearray(8 * SLOT_WIDTH)).cast("Q")


def line_filter() -> LineFilter:
    return compile_filter(("debug.",), 100, RULES, row_of=ROWS.__getitem__)


def sampler(target: int = 10**6, seed: int = 1, c: memoryview | None = None) -> Sampler:
    names = {row: name for name, row in ROWS.items()}
    return Sampler(0, target, counters() if c is None else c, names, random.Random(seed))


def feed(s: Sampler, f: LineFilter, chunk: bytes) -> None:
    """What Pipeline.feed does with a sampler (the countdown, then take)."""
    left = s.next_at - len(chunk) - 1
    if left < 0:
        s.take(chunk, s.next_at, f)
    else:
        s.next_at = left


def test_line_name_groups_by_metric_name_or_kind() -> None:
    """A line is grouped under the text before its first ':', or under its kind."""
    assert line_name(b"api.x:1|c|#a:b") == b"api.x"
    assert line_name(b"_e{1,1}:a|b") == b"(event)"
    assert line_name(b"_sc|check|0") == b"(service_check)"
    assert line_name(b"garbage") == b"(malformed)"
    assert line_name(b"n" * 500 + b":1|c") == b"n" * 200


def test_step_one_sees_every_line_exactly_once() -> None:
    """With every byte a sample point, each line counts once: exact lines, bytes, verdicts."""
    s, f = sampler(), line_filter()
    chunks = [
        b"api.a:1|c|#host:1\napi.a:1|c|#host:2\ndebug.x:1|c",
        b"web.p:1|c\r\n\napi.a:2|c|#host:1,env:p",
        b"x" * 120 + b":1|c",
    ]
    for chunk in chunks:
        feed(s, f, chunk)
    report = s.report()
    names = report.names
    lines, bytes_in, fwd, bytes_fwd, blocked, _dropped, sampled, bits, rules, _ = names[b"api.a"]
    assert (lines, sampled, fwd, blocked) == (3.0, 3, 3.0, 0.0)
    assert bytes_in == len(b"api.a:1|c|#host:1\n") * 2 + len(b"api.a:2|c|#host:1,env:p\n")
    assert bytes_fwd == bytes_in
    assert estimate(bits) == (3, False)
    assert rules == {"": 3.0}
    assert names[b"debug.x"][4] == 1.0
    assert names[b"debug.x"][8] == {"blocklist": 1.0}
    # Rewritten by a rule: forwarded bytes are the output's; the \r and blank line are not lines.
    web = names[b"web.p"]
    assert (web[0], web[1], web[3], web[8]) == (1.0, 11.0, 17.0, {"tag-env": 1.0})
    assert names[b"x" * 120][5] == 1.0  # dropped: longer than max_line_bytes
    assert sum(entry[6] for entry in names.values()) == 6
    assert report.step == 1
    assert s.report().names == {}  # a report starts a new period


def test_sparse_points_estimate_lines_and_bytes_without_length_bias() -> None:
    """Sample points one per ~500 bytes: lines of short and long names are estimated
    within 4 standard errors, though long lines are hit ten times as often."""
    s, f = sampler(), line_filter()
    s.step = 500
    short = b"s.x:1|c"  # 8 bytes with its newline
    long = b"l.y:1|c|#" + b"t" * 71  # 81 bytes with its newline
    datagram = b"\n".join([short, long, short, short, long, short])
    for _ in range(4000):
        feed(s, f, datagram)
    names = s.report().names
    for name, truth, length in ((b"s.x", 16000, 8), (b"l.y", 8000, 81)):
        lines, bytes_in, *_rest = names[name]
        sampled = names[name][6]
        error = truth / math.sqrt(sampled)
        assert abs(lines - truth) <= 4 * error, (name, lines, truth)
        assert abs(bytes_in - truth * length) <= 4 * error * length
    assert names[b"l.y"][6] > 3 * names[b"s.x"][6]  # 5x expected: 10x the bytes, half the lines


def test_countdown_skips_chunks_without_a_point() -> None:
    """Between two sample points, a chunk costs one subtraction and nothing is judged."""
    s, f = sampler(), line_filter()
    s.step = 10**9
    s.next_at = 1000
    feed(s, f, b"a:1|c")
    assert s.next_at == 1000 - 6
    assert s.report().hits == 0


def test_brake_bounds_the_points_of_a_sudden_flood() -> None:
    """A flood meeting step 1 raises the step mid-chunk: points stay near the target."""
    c = counters()
    s, f = sampler(target=100, c=c), line_filter()
    chunk = b"\n".join(b"api.n%d:1|c|#k:v" % (i % 50) for i in range(20000))
    c[Stat.BYTES_IN] = len(chunk)
    feed(s, f, chunk)
    report = s.report()
    judged = sum(entry[6] for entry in report.names.values())
    assert s.step > 1
    assert judged < 1000  # without the brake: 20,000 lines
    assert report.hits < 2000


def test_next_step_follows_the_bytes_read() -> None:
    """After a period, points are spaced by the bytes read over the target."""
    c = counters()
    s = sampler(target=10, c=c)
    c[Stat.BYTES_IN] = 10**8
    s.report()
    assert s.step >= 10**8 // 10 // 2  # the period lasted at most a couple of seconds here


def test_tap_takes_only_matching_lines_up_to_a_batch() -> None:
    """The tap buffer holds matching sampled lines only, at most TAP_BATCH, counting the rest."""
    s, f = sampler(), line_filter()
    feed(s, f, b"api.a:1|c")
    assert s.tap_batch() is None  # nobody watching
    s.set_tap(3, (TapFilter("api.*", None), TapFilter(None, "blocked")))
    assert s.tapping
    feed(s, f, b"api.a:1|c\napi.b.c:1|c\ndebug.x:1|c\nweb.p:1|c\nother:1|c")
    batch = s.tap_batch()
    assert batch is not None
    assert batch.version == 3
    assert batch.lines == (
        (b"api.a:1|c", "forwarded", "", b""),
        (b"debug.x:1|c", "blocked", "blocklist", b""),
    )
    assert s.tap_batch() is None  # the buffer was handed over
    s.set_tap(4, (TapFilter("web.*", "forwarded"),))
    feed(s, f, b"\n".join([b"web.p:1|c"] * (TAP_BATCH + 7)))
    batch = s.tap_batch()
    assert batch is not None
    assert len(batch.lines) == TAP_BATCH
    assert batch.skipped == 7
    assert batch.lines[0] == (b"web.p:1|c", "forwarded", "tag-env", b"web.p:1|c|#env:x")
    s.set_tap(5, ())
    assert not s.tapping
    feed(s, f, b"web.p:1|c")
    assert s.tap_batch() is None


class _Router:
    packed_size = None  # no C fast path for the Python-path test

    def __init__(self) -> None:
        self.added: list[tuple[bytes, int]] = []
        self.packed: list[tuple[list[bytes], list[int]]] = []

    def add(self, kept: bytes, count: int) -> None:
        self.added.append((kept, count))

    def send_packed(self, payloads: list[bytes], lines: list[int]) -> None:
        self.packed.append((payloads, lines))

    def flush(self) -> None:
        pass


def test_pipeline_feeds_the_sampler_and_still_forwards() -> None:
    """Pipeline.feed with a sampler: forwarding is unchanged and every line is sampled once."""
    c = counters()
    s, f = sampler(c=c), line_filter()
    router = _Router()
    pipeline = Pipeline(
        f,
        router,  # type: ignore[arg-type]
        c,
        memoryview(bytearray(8 * 30)).cast("Q"),
        logging.getLogger("test"),
        100,
        s,
    )
    pipeline.feed(b"api.a:1|c\ndebug.x:1|c")
    pipeline.feed(b"api.a:2|c")
    assert router.added == [(b"\napi.a:1|c", 1), (b"\napi.a:2|c", 1)]
    assert c[Stat.LINES_RECEIVED] == 3
    names = s.report().names
    assert (names[b"api.a"][0], names[b"debug.x"][0]) == (2.0, 1.0)


def test_fast_path_reads_are_sampled_through_the_same_judge() -> None:
    """On the C fast path, the lines C found under points are judged and counted, its
    countdown and step carried on, and the brake still applies."""
    c = counters()
    s, f = sampler(target=10, c=c), line_filter()
    router = _Router()
    pipeline = Pipeline(
        f,
        router,  # type: ignore[arg-type]
        c,
        memoryview(bytearray(8 * 30)).cast("Q"),
        logging.getLogger("test"),
        100,
        s,
    )
    next_at, step, rng, allowed, running = pipeline.sample_args()  # type: ignore[misc]
    assert (next_at, step, allowed, running) == (0, 1, 16, 1)
    sampled: Sampled = ([(b"debug.x:1|c", 600, 12), (b"api.a:1|c", 500, 10)], 7, 50, rng + 1, 30)
    # Chunk mode (no packing for this router): the kept lines as one chunk.
    read: PackedRead = ([b"\napi.a:1|c"], [1], 1, 10, 1, 0, 0, [], 0, sampled)
    pipeline.feed_packed(read)
    assert router.added == [(b"\napi.a:1|c", 1)]
    assert (s.next_at, s._c_rng) == (7, rng + 1)
    assert s.step >= 100  # 30 points against a limit of 16: the brake doubled it at least
    names = s.report().names
    assert (names[b"debug.x"][0], names[b"debug.x"][4]) == (50.0, 50.0)
    assert (names[b"api.a"][0], names[b"api.a"][1]) == (50.0, 500.0)
    plain = Pipeline(
        f,
        router,  # type: ignore[arg-type]
        c,
        memoryview(bytearray(8 * 30)).cast("Q"),
        logging.getLogger("test"),
        100,
    )
    assert plain.sample_args() is None


def test_tag_bits_are_remembered_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated tag section is hashed once; the memo starts over at TAG_MEMO entries, and
    the bitmaps are the same as hashing every line."""
    calls: list[bytes] = []

    def counted(tags: bytes) -> int:
        calls.append(tags)
        return tag_set_bit(tags)

    monkeypatch.setattr(sampler_module, "tag_set_bit", counted)
    s, f = sampler(), line_filter()
    n = sampler_module.TAG_MEMO + 10
    lines = [b"api.a:1|c|#id:%d,env:x" % i for i in range(n)] * 2
    feed(s, f, b"\n".join(lines))
    report = s.report()
    expected = 0
    for i in range(n):
        expected |= tag_set_bit(b"id:%d,env:x" % i)
    assert report.names[b"api.a"][7] == expected
    # The first pass hashed each tag set once; the second found the memo full and
    # started over, so it hashed again, but never more than once per section and pass.
    assert len(calls) <= 2 * n
    assert len(s._tag_bits) <= sampler_module.TAG_MEMO
    calls.clear()
    feed(s, f, b"api.a:1|c|#env:x\n" * 50)
    assert calls == [b"env:x"]

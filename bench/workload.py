"""The benchmark's traffic: realistic StatsD/DogStatsD lines that verify themselves.

Every line has the shape ``<head>seq:<n>[,t:<ns>],ck:<crc>`` where

* ``head`` is one of :data:`TEMPLATES` fixed prefixes such as
  ``api.users.latency:12.5|ms|@0.5|#env:prod,host:web-12,`` (dotted name, value,
  one of the types c/g/ms/h/s/d, sometimes a sample rate, DogStatsD tags);
* ``seq`` is the line's unique sequence number; the head of line ``n`` is
  ``heads[n * STRIDE % TEMPLATES]``, so a receiver can rebuild it from ``n``;
* ``t`` (only on timestamped lines) is the sender's ``time.monotonic_ns()``, which
  on Linux is CLOCK_MONOTONIC and therefore comparable across processes;
* ``ck`` is the CRC-32 of everything before ``,ck:``.

A receiver therefore knows a line is intact (the CRC matches *and* the head is the
one the generator put in front of that sequence number), whether it is a duplicate,
and whether it should have been blocked, without any shared state beyond the
parameters that built the templates. Heads of blocked lines start with ``debug.``;
the blocklists are checked against the heads independently of the proxy's matcher.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "BLOCKED_PREFIX",
    "DEFAULT_BLOCKLIST",
    "MEASURES",
    "SERVICES",
    "SUBSYSTEMS",
    "TEMPLATES",
    "LineCheck",
    "Traffic",
    "big_blocklist",
    "build_datagrams",
    "head_counts",
    "stamp_datagram",
]

# Distinct heads. Large enough that names and tags look varied, small enough that
# rebuilding them in every process costs nothing.
TEMPLATES = 1000
# Prime and coprime with TEMPLATES: consecutive lines get scattered heads, so a
# datagram of 4 lines mixes blocked and passing lines the way real traffic does.
STRIDE = 7919
BLOCKED_PREFIX = "debug."
DEFAULT_BLOCKLIST: tuple[str, ...] = (BLOCKED_PREFIX,)

SERVICES = ("app", "api", "web", "db", "cache", "queue", "auth", "billing", "search", "kafka")
SUBSYSTEMS = ("users", "orders", "pool", "http", "redis", "jobs", "consumer", "session", "index")
MEASURES = ("requests", "latency", "errors", "hits", "misses", "size", "lag", "active", "bytes")
SUFFIXES = ("", "", ".p95", ".count", ".total", ".max")
# Metric types with the weights of a typical DogStatsD client mix.
TYPES = (("c", 35), ("ms", 20), ("g", 15), ("h", 10), ("d", 10), ("s", 10))
ENVS = ("prod", "prod", "prod", "staging")
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1")

CK = b",ck:"
SEQ = b"seq:"
TS = b",t:"


def _value(rng: random.Random, kind: str) -> str:
    if kind == "c":
        return str(rng.choice((1, 1, 1, 2, 5, 10)))
    if kind == "s":
        return f"user{rng.randrange(100_000)}"
    if kind == "g":
        return f"{rng.uniform(0, 1000):.1f}"
    return f"{rng.expovariate(1 / 50):.2f}"


def _head(index: int, blocked: bool) -> bytes:
    rng = random.Random(index)
    name = f"{rng.choice(SERVICES)}.{rng.choice(SUBSYSTEMS)}.{rng.choice(MEASURES)}"
    name += rng.choice(SUFFIXES)
    if blocked:
        name = BLOCKED_PREFIX + name
    kinds, weights = zip(*TYPES, strict=True)
    kind = rng.choices(kinds, weights)[0]
    rate = (
        f"|@{rng.choice(('0.5', '0.1', '0.25'))}"
        if kind in ("c", "ms", "h") and rng.random() < 0.3
        else ""
    )
    tags = f"env:{rng.choice(ENVS)},host:web-{rng.randrange(1, 64)}"
    if rng.random() < 0.4:
        tags += f",region:{rng.choice(REGIONS)}"
    return f"{name}:{_value(rng, kind)}|{kind}{rate}|#{tags},".encode()


def _prefix_matcher(prefixes: Iterable[str]) -> dict[int, frozenset[bytes]]:
    # One set per distinct prefix length: an independent re-implementation of
    # "line starts with one of the prefixes", so the proxy's matcher is not trusted.
    by_len: dict[int, set[bytes]] = {}
    for prefix in prefixes:
        raw = prefix.encode()
        by_len.setdefault(len(raw), set()).add(raw)
    return {n: frozenset(s) for n, s in by_len.items()}


def starts_with_any(line: bytes, matcher: dict[int, frozenset[bytes]]) -> bool:
    """Whether ``line`` starts with one of the prefixes ``matcher`` was built from."""
    return any(line[:n] in group for n, group in matcher.items())


@dataclass(frozen=True)
class Traffic:
    """The line templates and which of them the blocklist drops."""

    heads: tuple[bytes, ...]
    blocked: tuple[bool, ...]  # per head: would the blocklist drop lines with this head

    @classmethod
    def build(cls, blocked_share: float, blocklist: Iterable[str]) -> Traffic:
        """Templates, ``blocked_share`` of them under ``debug.``; flags from ``blocklist``."""
        n_blocked = round(TEMPLATES * blocked_share)
        heads = tuple(_head(i, i < n_blocked) for i in range(TEMPLATES))
        matcher = _prefix_matcher(blocklist)
        blocked = tuple(starts_with_any(h, matcher) for h in heads)
        return cls(heads, blocked)

    def head_of(self, seq: int) -> bytes:
        return self.heads[seq * STRIDE % TEMPLATES]

    def line(self, seq: int) -> bytes:
        body = self.head_of(seq) + SEQ + str(seq).encode()
        return body + b",ck:%08x" % zlib.crc32(body)

    def passing_between(self, lo: int, hi: int) -> int:
        """How many of the lines ``lo <= seq < hi`` the blocklist lets through."""
        passing_per_cycle = self.blocked.count(False)
        full, rest = divmod(max(0, hi - lo), TEMPLATES)
        count = full * passing_per_cycle
        start = lo + full * TEMPLATES
        count += sum(
            1 for seq in range(start, start + rest) if not self.blocked[seq * STRIDE % TEMPLATES]
        )
        return count


def head_counts(seen: bytes | bytearray) -> list[int]:
    """Lines seen per head (template index), from a :attr:`LineCheck.seen` map.

    Line ``seq`` has head ``seq * STRIDE % TEMPLATES``, so the lines of one head are
    every TEMPLATES-th byte of the map from one offset: counted by slices, in C.
    """
    counts = [0] * TEMPLATES
    for offset in range(TEMPLATES):
        counts[offset * STRIDE % TEMPLATES] = seen[offset::TEMPLATES].count(1)
    return counts


def build_datagrams(traffic: Traffic, total_lines: int, lines_per_datagram: int) -> list[bytes]:
    """Datagram ``d`` holds lines ``d*L .. d*L+L-1`` joined by newlines (no trailing one)."""
    line = traffic.line
    return [
        b"\n".join(line(seq) for seq in range(start, min(start + lines_per_datagram, total_lines)))
        for start in range(0, total_lines, lines_per_datagram)
    ]


def stamp_datagram(datagram: bytes, now_ns: int) -> bytes:
    """Rewrite the first line of ``datagram`` with a send timestamp (and a fresh CRC)."""
    end = datagram.find(b"\n")
    first = datagram if end < 0 else datagram[:end]
    body = first[: first.rfind(CK)] + TS + str(now_ns).encode()
    stamped = body + b",ck:%08x" % zlib.crc32(body)
    return stamped if end < 0 else stamped + datagram[end:]


class LineCheck:
    """Counts what a receiver got: intact, corrupt, duplicated, wrongly forwarded lines."""

    __slots__ = (
        "blocked_seen",
        "corrupt",
        "corrupt_examples",
        "duplicates",
        "latencies_ns",
        "lines",
        "passing",
        "seen",
        "traffic",
    )

    def __init__(self, traffic: Traffic, total_lines: int) -> None:
        self.traffic = traffic
        self.seen = bytearray(total_lines)
        self.lines = 0  # non-empty lines received
        self.passing = 0  # intact, first-seen lines the blocklist lets through
        self.blocked_seen = 0  # intact lines the blocklist should have dropped
        self.corrupt = 0
        self.duplicates = 0
        self.corrupt_examples: list[str] = []
        self.latencies_ns: list[int] = []

    def check_chunk(self, chunk: bytes, received_ns: int) -> None:
        """Check every line of one datagram (or of complete TCP lines read together)."""
        heads = self.traffic.heads
        blocked = self.traffic.blocked
        seen = self.seen
        total = len(seen)
        crc32 = zlib.crc32
        for line in chunk.split(b"\n"):
            if not line:
                continue
            self.lines += 1
            body, sep, ck = line.rpartition(CK)
            head, sep2, rest = body.rpartition(SEQ)
            seq_text, sep3, ts_text = rest.partition(TS)
            try:
                seq = int(seq_text)
                intact = (
                    bool(sep and sep2)
                    and len(ck) == 8
                    and crc32(body) == int(ck, 16)
                    and 0 <= seq < total
                    and heads[seq * STRIDE % TEMPLATES] == head
                )
            except ValueError:
                intact = False
            if not intact:
                self.bad(line)
                continue
            if seen[seq]:
                self.duplicates += 1
                continue
            seen[seq] = 1
            if blocked[seq * STRIDE % TEMPLATES]:
                self.blocked_seen += 1
            else:
                self.passing += 1
            if sep3:
                self.latencies_ns.append(received_ns - int(ts_text))

    def bad(self, line: bytes) -> None:
        """Count a corrupt or truncated line, keeping a few for the report."""
        self.corrupt += 1
        if len(self.corrupt_examples) < 5:
            self.corrupt_examples.append(line[:200].decode("utf-8", "replace"))


def big_blocklist(count: int, seed: int = 12345) -> tuple[str, ...]:
    """``debug.`` plus ``count - 1`` realistic prefixes that match none of the passing heads.

    Many share their first one or two segments with real metric names
    (``api.users.tmp_xyz``), so the matcher has to look deep into passing lines.
    """
    rng = random.Random(seed)
    passing = Traffic.build(0.0, ())
    # Every prefix of every passing head: a candidate in this set would block real traffic.
    taken = {h[:i].decode() for h in passing.heads for i in range(1, len(h) + 1)}
    out = dict.fromkeys(DEFAULT_BLOCKLIST)
    letters = "abcdefghijklmnopqrstuvwxyz_"
    while len(out) < count:
        word = "".join(rng.choice(letters) for _ in range(rng.randrange(3, 10)))
        shape = rng.randrange(3)
        if shape == 0:
            candidate = f"{rng.choice(SERVICES)}.{word}."
        elif shape == 1:
            candidate = f"{rng.choice(SERVICES)}.{rng.choice(SUBSYSTEMS)}.{word}"
        else:
            candidate = f"{word}."
        if candidate not in taken:
            out[candidate] = None
    return tuple(out)

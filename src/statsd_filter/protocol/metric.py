"""A lazy view of one StatsD / DogStatsD line, and byte-exact rewrites of it.

Nothing is parsed until a rule asks: :class:`Line` finds the name, type, sample
rate and tags on first access and caches them. Lines no rule rewrites are never
rebuilt, so they leave the proxy byte-identical.

Shapes (StatsD, and DogStatsD's extensions: several values, tags, events, service checks)::

    <name>:<value>[:<value>...]|<type>[|@<rate>][|#<tag>,<tag>...][|<other>...]
    _e{<title_len>,<text_len>}:<title>|<text>[|<section>...]
    _sc|<name>|<status>[|<section>...]

For events and service checks the *name* is not a metric name: name, glob and
regex conditions never match them; they are selected by ``kind``, ``prefix``
and ``tag``. A line that is none of the shapes is ``malformed``.
"""

from __future__ import annotations

__all__ = ["METRIC_TYPES", "Line", "format_rate"]

METRIC_TYPES = frozenset({b"c", b"g", b"ms", b"h", b"s", b"d"})
_NUMBER_CHARS = frozenset(b"0123456789+-.eE")

KIND_METRIC = "metric"
KIND_EVENT = "event"
KIND_SERVICE_CHECK = "service_check"
KIND_MALFORMED = "malformed"


def format_rate(rate: float) -> bytes:
    """A sample rate as StatsD clients write it (``0.1``, not ``0.10000000000000001``)."""
    text = repr(rate)
    if "e" in text:  # 1e-05 is valid for Etsy statsd but not for every server
        text = f"{rate:.12f}".rstrip("0")
    return text.encode()


class Line:
    """Lazily parsed view over the raw bytes of one line."""

    __slots__ = ("_fields", "_kind", "_name", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._fields: list[bytes] | None = None
        self._kind: str | None = None
        self._name: bytes | None = None

    @property
    def fields(self) -> list[bytes]:
        """The ``|``-separated sections."""
        if self._fields is None:
            self._fields = self.raw.split(b"|")
        return self._fields

    @property
    def kind(self) -> str:
        """``metric``, ``event``, ``service_check`` or ``malformed``."""
        if self._kind is None:
            self._kind = self._classify()
        return self._kind

    def _classify(self) -> str:  # noqa: PLR0911 - one return per shape
        raw = self.raw
        if raw.startswith(b"_e{"):
            return KIND_EVENT if b"}:" in raw and b"|" in raw else KIND_MALFORMED
        if raw.startswith(b"_sc|"):
            return KIND_SERVICE_CHECK if len(self.fields) >= 3 else KIND_MALFORMED
        fields = self.fields
        if len(fields) < 2 or fields[1] not in METRIC_TYPES:
            return KIND_MALFORMED
        head = fields[0]
        colon = head.find(b":")
        if colon <= 0 or colon == len(head) - 1:
            return KIND_MALFORMED
        if fields[1] != b"s":
            for value in head[colon + 1 :].split(b":"):
                if not value or not _NUMBER_CHARS.issuperset(value):
                    return KIND_MALFORMED
        for extra in fields[2:]:
            if extra.startswith(b"@") and not _is_rate(extra[1:]):
                return KIND_MALFORMED
        return KIND_METRIC

    @property
    def name(self) -> bytes | None:
        """The metric name (text before the first ``:``), or None if not a metric."""
        if self._name is None and self.kind == KIND_METRIC:
            self._name = self.raw[: self.raw.find(b":")]
        return self._name

    @property
    def type(self) -> bytes | None:
        """The metric type (``c``, ``g``, ``ms``, ``h``, ``s``, ``d``) or None."""
        return self.fields[1] if self.kind == KIND_METRIC else None

    @property
    def rate(self) -> float:
        """The sample rate (1.0 when absent)."""
        for extra in self.fields[2:]:
            if extra.startswith(b"@"):
                try:
                    return float(extra[1:])
                except ValueError:
                    return 1.0
        return 1.0

    @property
    def tags(self) -> list[bytes]:
        """DogStatsD tags (``key:value`` or bare ``key``), in order."""
        for extra in self.fields[1:]:
            if extra.startswith(b"#"):
                return [t for t in extra[1:].split(b",") if t]
        return []

    # ------------------------------------------------------------ rewrites
    def _tags_index(self) -> int:
        for i, extra in enumerate(self.fields[1:], 1):
            if extra.startswith(b"#"):
                return i
        return -1

    def _rebuild(self, fields: list[bytes]) -> bytes:
        return b"|".join(fields)

    def without_tags(
        self,
        drop: frozenset[bytes],
        drop_keys: frozenset[bytes],
        drop_valued: frozenset[bytes] = frozenset(),
    ) -> bytes:
        """The line without the tags equal to one of ``drop``, keyed by one of
        ``drop_keys`` (with or without a value), or keyed by one of
        ``drop_valued`` and carrying a value."""
        index = self._tags_index()
        if index < 0:
            return self.raw
        fields = list(self.fields)

        def keep(tag: bytes) -> bool:
            key, sep, _ = tag.partition(b":")
            return not (tag in drop or key in drop_keys or (sep and key in drop_valued))

        kept = [t for t in fields[index][1:].split(b",") if t and keep(t)]
        if kept:
            fields[index] = b"#" + b",".join(kept)
        else:
            del fields[index]
        return self._rebuild(fields)

    def with_tags(self, extra_tags: list[bytes]) -> bytes:
        """The line with ``extra_tags`` appended (a tags section is added if missing)."""
        if not extra_tags:
            return self.raw
        index = self._tags_index()
        fields = list(self.fields)
        if index < 0:
            fields.append(b"#" + b",".join(extra_tags))
        else:
            current = fields[index]
            sep = b"," if len(current) > 1 else b""
            fields[index] = current + sep + b",".join(extra_tags)
        return self._rebuild(fields)

    def renamed(self, old_prefix: bytes, new_prefix: bytes) -> bytes:
        """The line with the name prefix ``old_prefix`` replaced by ``new_prefix``."""
        if not self.raw.startswith(old_prefix):
            return self.raw
        return new_prefix + self.raw[len(old_prefix) :]

    def with_rate(self, rate: float) -> bytes:
        """The line with its sample rate set to ``rate`` (added after the type if absent)."""
        fields = list(self.fields)
        for i, extra in enumerate(fields[2:], 2):
            if extra.startswith(b"@"):
                fields[i] = b"@" + format_rate(rate)
                break
        else:
            fields.insert(2, b"@" + format_rate(rate))
        return self._rebuild(fields)


def _is_rate(text: bytes) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return 0.0 < value <= 1.0

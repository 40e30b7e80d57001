"""Consistent hashing of metric names to upstream nodes, placed as Etsy StatsD's proxy.js does.

Compatibility promise
---------------------
For the same ordered list of ``host:port`` node ids, :class:`HashRing` sends every metric
line to the node that Etsy StatsD 0.9.0's cluster proxy (``proxy.js``) would pick. That
proxy uses npm ``hashring`` 3.2.0 (with ``connection-parse`` 0.0.7 and
``simple-lru-cache`` 0.0.2). Users can put statsd-filter in place of proxy.js and no series
moves to another node. The same holds after nodes leave and rejoin the ring, because
:meth:`HashRing.remove` and :meth:`HashRing.add` work the way proxy.js's health checks drive
the JS ring. ``tests/unit/test_hashring.py`` checks this against the real JS code, through
``tests/node/hashring_oracle.js``.

How proxy.js builds the ring (statsd 0.9.0 ``proxy.js``)
--------------------------------------------------------
* L90-92: ``node_ring[element.host + ':' + element.port] = 100`` for each configured node.
  The ring gets a plain object, so node ids are ``host:port`` strings, each with weight 100.
  Ids keep the order of ``config.nodes``, and a repeated id keeps its first position.
* L94-99: ``new hashring(node_ring, 'md5', {'max cache size': config.cacheSize || 10000,
  'replicas': 0})``. proxy.js never sets ``'vnode count'``.
* L119-125 and L131-135 give the key for a line. The packet is decoded as UTF-8
  (``msg.toString()``, so invalid bytes become U+FFFD). It is split on ``"\\n"`` only when it
  contains one. The key is ``line.split(':')[0]``: everything before the first ``:``, or the
  whole line (``|type``, ``|@rate``, ``|#tags`` and any ``\\r``) when there is no ``:``.
  DogStatsD tags come after the first ``:``, so they never change the key. Empty lines are
  dropped. See :func:`metric_key`.
* L143: the destination is ``ring.get(key)``, and L149-152 send to ``split(':')`` of it.
  proxy.js can therefore only reach ids that are exactly ``host:port``.
* L229-252 handle health. On a node's first failed check, ``ring.remove(node_id)`` runs
  (L248-251). When a failed node passes again, ``ring.add({node_id: 100})`` runs (L230-236).

How hashring 3.2.0 places keys (``hashring/index.js``)
------------------------------------------------------
* L48: vnodes default to 40, because proxy.js passes no ``'vnode count'``. L70-78:
  ``replicas`` 0 is raised to 1, so each vnode hash gives one point. The proxy.js comment
  "replicas set to 0" does not describe what happens.
* L122-129: the points a node gets are
  ``Math.floor(weight / total * vnodes * servers.length)``, calculated in IEEE doubles. With
  equal weights this is 40 points per node, except at the node counts where rounding gives
  39: 7, 14, 28, 49, 56, 98, 103, 112 and others (73 counts from 1 to 1000).
* L137-148: point ``i`` of a node is the first 4 bytes of ``md5(node + '-' + i)``
  (UTF-8), read as a little-endian uint32 (``hashValueHash(x[3], x[2], x[1], x[0])``, L12-14).
* L154-159: the points are sorted by value with a stable sort. Ties keep node order, then
  ``i`` order.
* L173-219: ``get`` hashes the key the same way (L258-262, little-endian uint32 of md5[0:4]).
  It then binary-searches for the first point whose value is at least the key's hash, and
  wraps to point 0 past the end. That search is ``bisect_left`` plus wrap-around. It returns
  ``undefined`` when the ring is empty.
* L403-448: ``add`` and ``remove`` rebuild the whole ring from the current server list.
  Survivors keep their order and an added server goes last. Node ids and weights are kept
  as they are (``connection-parse`` re-parses the object form, whose keys are strings).
  Because points depend only on ``(node, i)``, removing a node moves only that node's keys,
  and adding it back restores the earlier placement. The exception is a remove or add that
  lands on a node count with 39 points per node, such as 8 -> 7. There every node's count
  changes between 40 and 39, so some keys of the other nodes move as well. This class copies
  that behaviour.

Known divergence (deliberate)
-----------------------------
``simple-lru-cache`` 0.0.2 stores entries in a plain ``{}``. Keys that name an
``Object.prototype`` member (``constructor``, ``__proto__``, ``hasOwnProperty``, ...) can
therefore return stale or wrong nodes in proxy.js, for example a node that has been removed.
This class places such keys by the ring, which is what proxy.js does for every other key.

Speed
-----
One lookup is an md5 of the key plus a ``bisect`` over the sorted point values. Results are
memoised in a dict that is cleared when it reaches ``cache_size`` entries, and whenever the
ring changes. A cached lookup is a single dict hit.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_VNODE_COUNT",
    "PROXY_JS_WEIGHT",
    "EmptyRingError",
    "HashRing",
    "metric_key",
]

#: Weight proxy.js gives every node (proxy.js L91 and L233).
PROXY_JS_WEIGHT: Final = 100
#: hashring's default ``'vnode count'``, which proxy.js does not override (index.js L48).
DEFAULT_VNODE_COUNT: Final = 40
#: proxy.js's default ``cacheSize`` (proxy.js L96). Here it only bounds memory.
DEFAULT_CACHE_SIZE: Final = 10_000


class EmptyRingError(LookupError):
    """The ring has no nodes. proxy.js logs "No backend statsd nodes available!" and drops."""


def metric_key(line: bytes) -> bytes:
    """The bytes proxy.js hashes for one line: everything before the first ``:``.

    A line with no ``:`` is its own key, whole. The line must not contain ``\\n``, because
    proxy.js splits packets there first. proxy.js skips empty lines, so callers should too.
    """
    return line.partition(b":")[0]


def _utf8(text: str) -> bytes:
    """UTF-8 of a JS-style string: a lone surrogate becomes U+FFFD, as Node's Buffer does."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").encode()


def _js_utf8(raw: bytes) -> bytes:
    """The bytes md5 sees in proxy.js: the key decoded with U+FFFD replacement, re-encoded."""
    if raw.isascii():
        return raw
    return raw.decode("utf-8", "replace").encode()


def _point(data: bytes) -> int:
    """hashring's ``hashValue``: md5[0:4] read as a little-endian uint32 (index.js L258-262)."""
    return int.from_bytes(hashlib.md5(data, usedforsecurity=False).digest()[:4], "little")


class HashRing:
    """A consistent-hash ring of ``host:port`` node ids that places keys as proxy.js does."""

    __slots__ = ("_cache", "_cache_size", "_owners", "_values", "_vnode_count", "_weights")

    def __init__(
        self,
        nodes: Iterable[str],
        *,
        vnode_count: int = DEFAULT_VNODE_COUNT,
        weights: Mapping[str, int] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """Build the ring from ``nodes`` in order. A repeated id keeps its first position.

        ``weights`` defaults to proxy.js's 100 for every node. ``vnode_count`` is hashring's
        ``'vnode count'``. proxy.js always uses the default of 40, so change it only when
        compatibility does not matter.
        """
        if vnode_count < 1:
            raise ValueError(f"vnode_count must be at least 1, got {vnode_count}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be 0 (no cache) or more, got {cache_size}")
        given = dict(weights or {})
        self._weights: dict[str, int] = {}
        for node in nodes:
            if node not in self._weights:
                self._weights[node] = _check_weight(node, given.get(node, PROXY_JS_WEIGHT))
        unknown = sorted(set(given) - set(self._weights))
        if unknown:
            raise ValueError(f"weights given for nodes not in the ring: {', '.join(unknown)}")
        self._vnode_count = vnode_count
        self._cache_size = cache_size
        self._cache: dict[bytes, str] = {}
        self._values: list[int] = []
        self._owners: list[str] = []
        self._rebuild()

    def __repr__(self) -> str:
        return f"HashRing({list(self._weights)!r}, vnode_count={self._vnode_count})"

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids in ring order: constructor order, with re-added nodes last."""
        return tuple(self._weights)

    @property
    def vnode_count(self) -> int:
        """hashring's ``'vnode count'``: 40 in proxy.js."""
        return self._vnode_count

    def points(self, node: str) -> list[int]:
        """The sorted ring points that ``node`` owns. There are 40 per node in most rings."""
        return [v for v, owner in zip(self._values, self._owners, strict=False) if owner == node]

    def continuum(self) -> tuple[list[int], list[str]]:
        """The sorted point values and their owners (one more owner than points: the
        first again, for the wrap-around), as :meth:`get` searches them."""
        return list(self._values), list(self._owners)

    def get(self, key: bytes | str) -> str:
        """The node id for a metric key (see :func:`metric_key`), as ``ring.get(key)`` in proxy.js.

        ``bytes`` keys are raw line bytes, treated as UTF-8 the way proxy.js decodes a packet.
        Raises :class:`EmptyRingError` when the ring has no nodes.
        """
        raw = key if isinstance(key, bytes) else _utf8(key)
        node = self._cache.get(raw)
        if node is not None:
            return node
        values = self._values
        if not values:
            raise EmptyRingError("the hash ring has no nodes")
        # _owners has one extra entry, a copy of the first owner, so an index past the last
        # point wraps to point 0 with no branch (index.js L204 and L217).
        node = self._owners[bisect_left(values, _point(_js_utf8(raw)))]
        cache = self._cache
        if len(cache) >= self._cache_size:
            if not self._cache_size:
                return node
            cache.clear()
        cache[raw] = node
        return node

    def remove(self, node: str) -> bool:
        """Take ``node`` out, as proxy.js does on a failed health check. True if it was in."""
        if node not in self._weights:
            return False
        del self._weights[node]
        self._rebuild()
        return True

    def add(self, node: str, weight: int = PROXY_JS_WEIGHT) -> bool:
        """Put ``node`` back, last in order, as proxy.js does on recovery. True if it was new.

        hashring ignores an add for a node it already has, and so does this method: the
        weight stays as it was.
        """
        if node in self._weights:
            return False
        self._weights[node] = _check_weight(node, weight)
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        """Recompute the sorted points (hashring ``continuum``, index.js L112-163)."""
        self._cache.clear()
        weights = self._weights
        count = len(weights)
        total = sum(weights.values())
        points: list[tuple[int, str]] = []
        for node, weight in weights.items():
            # Same expression and evaluation order as index.js L127-129, all in doubles, so
            # the rounding matches as well (for example, 39 points per node when there are 7).
            length = math.floor(weight / total * self._vnode_count * count)
            prefix = _utf8(node) + b"-"
            points.extend((_point(prefix + str(i).encode()), node) for i in range(length))
        points.sort(key=lambda point: point[0])  # stable, like V8's Array#sort (L154-159)
        self._values = [value for value, _ in points]
        self._owners = [owner for _, owner in points]
        if points:
            self._owners.append(points[0][1])


def _check_weight(node: str, weight: int) -> int:
    if weight < 1:
        raise ValueError(f"weight for node {node!r} must be at least 1, got {weight}")
    return weight

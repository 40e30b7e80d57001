"""What travels on the supervisor <-> worker control channel, one kind per class.

``frames.py`` only cuts the byte stream into frames; each frame carries one
pickled message of a kind defined here (or, supervisor to worker, a
:class:`~statsd_filter.config.Generation`, the one kind defined elsewhere).
Pickle is safe here because both ends are the same program: the supervisor
forks the workers and nothing else can reach a socketpair.

Supervisor to worker:

* a ``Generation``: new rules; answered by :class:`ReloadAck`;
* :class:`TapWanted`: who is watching ``/tap`` now (an empty tuple: nobody);
  answered by :class:`TapAck`, so a watcher knows when every worker taps.

Worker to supervisor:

* :class:`ReloadAck`: a generation applied (or why not);
* :class:`TopReport`: while sampling is on, what the sampled lines of the
  last period stand for (see ``worker/sampler.py``), once a second while the
  sample points see lines; a worker whose points see nothing says so once
  every few seconds, in one report, not once a second (``quiet``);
* :class:`TapLines`: sampled lines some watcher wants, only while someone
  watches, a bounded number per batch.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

__all__ = [
    "NameStats",
    "ReloadAck",
    "TapAck",
    "TapFilter",
    "TapLine",
    "TapLines",
    "TapWanted",
    "TopReport",
    "decode_message",
    "encode_message",
]

# What one metric name's sampled lines stand for in one period, a plain tuple
# (cheap to build and to pickle): lines in, bytes in, lines forwarded, bytes
# forwarded, lines blocked, lines dropped (estimates, already scaled), sampled
# hits, the linear-counter bitmap of its tag sets, lines per deciding rule
# ("" for no rule), and the sum of the squares of what each sampled line stood
# for (the estimate's variance: its points may have stood for very different
# numbers of lines as the spacing changed).
NameStats = tuple[float, float, float, float, float, float, int, int, dict[str, float], float]


@dataclass(frozen=True)
class ReloadAck:
    """A worker applied config generation ``generation`` (or could not: ``error``)."""

    generation: int
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class TopReport:
    """One worker's sampled view of one period."""

    worker: int
    period: float  # seconds this report covers
    step: int  # mean bytes between two sample points during the period (1: every byte)
    hits: int  # sample points that fell on a line
    names: dict[bytes, NameStats]
    # Seconds just before ``period`` in which the worker's sample points saw nothing
    # (the empty reports it did not send): time the window covers, with no lines.
    quiet: float = 0.0


@dataclass(frozen=True)
class TapFilter:
    """What one /tap watcher wants: a glob on the metric name and/or a verdict."""

    match: str | None = None
    verdict: str | None = None


@dataclass(frozen=True)
class TapWanted:
    """The filters of every current watcher (empty: stop sending lines)."""

    version: int
    filters: tuple[TapFilter, ...]


@dataclass(frozen=True)
class TapAck:
    """A worker now taps with the filters of ``TapWanted.version``."""

    worker: int
    version: int


# One sampled line: (line, verdict, deciding rule or "", the line as forwarded
# when a rule rewrote it, else b"").
TapLine = tuple[bytes, str, str, bytes]


@dataclass(frozen=True)
class TapLines:
    """Sampled lines for the watchers, and how many the worker had to skip."""

    worker: int
    version: int
    lines: tuple[TapLine, ...]
    skipped: int = 0


def encode_message(message: object) -> bytes:
    """The payload of one control frame."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode_message(payload: bytes) -> object:
    """The message one control frame carries (from our own process tree)."""
    return pickle.loads(payload)  # noqa: S301 - both ends are this program

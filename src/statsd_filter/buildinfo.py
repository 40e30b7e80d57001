"""What this installation runs with: the C accelerator, Hyperscan, the Python.

Neither fast path is required. An install without a C compiler runs the
pure-Python socket loop (one system call per datagram instead of one per 64);
without the ``hyperscan`` package a blocklist of thousands of prefixes costs
several times one prefix. Both still work, so neither would ever be noticed:
:func:`build_info` is what ``--version``, the start-up log line, ``/healthz``
(``build``) and ``statsd_filter_build_info`` report.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata

from statsd_filter import __version__, fastio
from statsd_filter.rules import multiprefix

__all__ = ["BuildInfo", "build_info"]


@dataclass(frozen=True)
class BuildInfo:
    """The version and the optional fast paths of this installation."""

    version: str
    accelerated: bool
    hyperscan: str | None  # the hyperscan package's version, None when it is not importable
    python: str

    @property
    def accelerator(self) -> str:
        """``c`` (the compiled ``_fastio``) or ``python`` (the fallback)."""
        return "c" if self.accelerated else "python"

    def describe(self) -> list[str]:
        """Lines for ``--version`` and the log: what runs, and how to get what is missing."""
        if self.accelerated:
            accel = "accelerator: c (recvmmsg/sendmmsg, up to 64 datagrams per system call)"
        else:
            accel = (
                "accelerator: python (slow path: the C extension was not built; install a C "
                "compiler and the Python headers, e.g. gcc python3-dev, then reinstall)"
            )
        if self.hyperscan is not None:
            hs = f"hyperscan: yes ({self.hyperscan}; for blocklists of 64 prefixes or more)"
        else:
            hs = "hyperscan: no (large blocklists use the slower regex trie; pip install hyperscan)"
        return [accel, hs, f"python: {self.python}"]

    def as_dict(self) -> dict[str, object]:
        """The /healthz ``build`` object."""
        return {
            "version": self.version,
            "accelerator": self.accelerator,
            "hyperscan": self.hyperscan is not None,
            "hyperscan_version": self.hyperscan,
            "python": self.python,
        }


def _hyperscan_version() -> str | None:
    if not multiprefix.AVAILABLE:
        return None
    try:
        return metadata.version("hyperscan")
    except metadata.PackageNotFoundError:  # importable without metadata (a vendored copy)
        return "unknown version"


def build_info() -> BuildInfo:
    """This process's installation, as imported."""
    return BuildInfo(
        version=__version__,
        accelerated=fastio.ACCELERATED,
        hyperscan=_hyperscan_version(),
        python=f"{platform.python_version()} ({platform.python_implementation()})",
    )

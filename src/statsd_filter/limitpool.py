"""Shared memory for the limit rules' tables, and the locks that guard them.

The supervisor creates one memory file (``memfd``) of ``limit_memory`` bytes
before it forks any worker and maps it; every worker inherits the mapping and
the descriptor. Pages are only used once a table touches them, so the size is
an upper bound, not an allocation. The supervisor carves a region per limit
rule (:class:`LimitRegions`) and tells workers where it is in the config
generation they run (``Generation.limits``), so rules added by a reload get
tables the running workers can reach.

A region changes hands only safely: a rule dropped (or changed) by a reload
keeps its region until every live worker has confirmed a generation without
it (workers switch one at a time); only then is it released, its pages given
back to the system (``MADV_REMOVE``) and its space reused.

Locks are POSIX record locks (``lockf``) on one byte per region of that same
file: cheap when uncontended (one system call each way), held for the few
microseconds :func:`~statsd_filter.rules.limittable.admit` takes, and released
by the kernel if the holder dies, so a killed worker can never wedge the
others.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from statsd_filter.rules.limits import LimitTable
from statsd_filter.rules.limittable import init_table, table_bytes
from statsd_filter.rules.model import RuleSpec

__all__ = ["LimitPool", "LimitRegions", "LimitSlot", "RegionLock", "limit_bytes"]

PAGE = mmap.PAGESIZE


def _round_up(size: int) -> int:
    return -(-size // PAGE) * PAGE


def limit_bytes(spec: RuleSpec) -> int:
    """Shared memory one limit rule takes (page-aligned)."""
    return _round_up(table_bytes(spec.max_tracked))


@dataclass(frozen=True)
class LimitSlot:
    """Where one limit rule's table lives in the pool, and what its state belongs to."""

    offset: int
    size: int
    identity: tuple[object, ...]


class RegionLock:
    """An exclusive lock between processes on one byte of the pool's file.

    The C scan takes the same lock by ``fd`` and ``byte`` (``fcntl`` record
    locks, as ``lockf`` uses).
    """

    __slots__ = ("byte", "fd")

    def __init__(self, fd: int, byte: int) -> None:
        self.fd = fd
        self.byte = byte

    def acquire(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.byte)

    def try_acquire(self) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.byte)
        except OSError:
            return False
        return True

    def release(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.byte)


class LimitPool:
    """One shared memory file, mapped before fork, carved into regions."""

    def __init__(self, size: int) -> None:
        self.size = _round_up(max(size, PAGE))
        self._spare = None
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("statsd-filter-limits", os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self._spare = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the pool
            self.fd = self._spare.fileno()
        try:
            os.ftruncate(self.fd, self.size)
            self._mem = mmap.mmap(self.fd, self.size)
        except OSError:
            self.close()
            raise
        self._view = memoryview(self._mem)
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, size), by offset

    def fileno(self) -> int:
        """The shared memory file (workers must keep it open: their locks are on it)."""
        return self.fd

    # ------------------------------------------------------------ regions
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    def allocate(self, size: int) -> int | None:
        """Offset of a zeroed region of ``size`` bytes (page-aligned), or None if none fits."""
        size = _round_up(size)
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free - size)
                return offset
        return None

    def release(self, offset: int, size: int) -> None:
        """Give a region back: its pages to the system (reading zeros after), its space to us."""
        size = _round_up(size)
        try:
            self._mem.madvise(mmap.MADV_REMOVE, offset, size)
        except (AttributeError, OSError):  # pragma: no cover - no hole punching here
            self._view[offset : offset + size] = bytes(size)
        self._free.append((offset, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged

    def view(self, slot: LimitSlot) -> memoryview:
        return self._view[slot.offset : slot.offset + slot.size]

    def lock(self, slot: LimitSlot) -> RegionLock:
        return RegionLock(self.fd, slot.offset // PAGE)

    def table(self, slot: LimitSlot) -> LimitTable:
        """The table in ``slot``, locked through the pool's file."""
        return LimitTable(self.view(slot), self.lock(slot))

    def close(self) -> None:
        with contextlib.suppress(AttributeError, BufferError, ValueError):
            self._view.release()
            self._mem.close()
        if self._spare is not None:
            self._spare.close()
        else:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = -1


class LimitRegions:
    """Which region each limit rule of a generation uses; frees them once safe."""

    def __init__(self, pool: LimitPool) -> None:
        self.pool = pool
        # Regions a generation stopped using: (that generation, slot).
        self._retired: list[tuple[int, LimitSlot]] = []

    def assign(
        self, specs: Iterable[RuleSpec], current: Mapping[str, LimitSlot], number: int
    ) -> dict[str, LimitSlot]:
        """Regions for generation ``number``: a rule whose name and limit parameters
        are unchanged keeps its region (and so its state); others get fresh ones.

        Raises ValueError naming the rule when the pool has no room; then
        nothing changes.
        """
        out: dict[str, LimitSlot] = {}
        fresh: list[LimitSlot] = []
        for spec in specs:
            identity = spec.limit_identity
            if identity is None:
                continue
            old = current.get(spec.name)
            if old is not None and old.identity == identity:
                out[spec.name] = old
                continue
            size = limit_bytes(spec)
            offset = self.pool.allocate(size)
            if offset is None:
                for slot in fresh:
                    self.pool.release(slot.offset, slot.size)
                raise ValueError(
                    f"rule {spec.name!r}: its limit table needs {size / 2**20:.1f} MiB of "
                    f"shared memory and only {self.pool.free_bytes() / 2**20:.1f} MiB of "
                    f"limit_memory ({self.pool.size / 2**20:.1f} MiB) is free (tables a reload "
                    "replaced are freed once every worker has switched); lower max_tracked or "
                    "raise limit_memory (needs a restart)"
                )
            slot = LimitSlot(offset, size, identity)
            init_table(self.pool.view(slot), spec.max_tracked)
            fresh.append(slot)
            out[spec.name] = slot
        kept = set(out.values())
        self._retired.extend((number, slot) for slot in current.values() if slot not in kept)
        return out

    def release_unused(self, oldest_applied: int) -> int:
        """Free the regions no worker can still use: those retired by a generation
        every live worker has applied (``oldest_applied``). Returns how many."""
        keep: list[tuple[int, LimitSlot]] = []
        freed = 0
        for number, slot in self._retired:
            if number <= oldest_applied:
                self.pool.release(slot.offset, slot.size)
                freed += 1
            else:
                keep.append((number, slot))
        self._retired = keep
        return freed

    @property
    def retired(self) -> int:
        return len(self._retired)

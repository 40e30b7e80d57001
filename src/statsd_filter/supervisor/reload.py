"""Config reloads in the supervisor: validate, number, and roll out to the workers.

:class:`Reloader` turns a trigger (SIGHUP, or a change of the file under
``--watch-config``) into the next :class:`~statsd_filter.config.Generation`:
it loads the settings again, compiles the rules once to prove they work, and
keeps only the settings a running worker can take (``HOT_SETTINGS``); changes
to the others are reported as needing a restart. An invalid config changes
nothing; the reason is logged and kept for /healthz. Limit rules get their
tables in the shared limit memory here (``limitpool.LimitRegions``): a rule
whose name and limit parameters are unchanged keeps its table and so its state.

:class:`Rollout` hands a generation to one worker at a time and records what
each worker confirmed. A worker compiling a large rule set is busy for a
moment; the others keep draining the shared UDP socket meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from statsd_filter.config import ConfigError, Generation, Settings
from statsd_filter.limitpool import LimitRegions, LimitSlot
from statsd_filter.options import HOT_SETTINGS
from statsd_filter.protocol.messages import ReloadAck, encode_message
from statsd_filter.rules import RuleRows, compile_filter, counter_row_names

__all__ = ["ReloadStatus", "Reloader", "Rollout", "watch_file"]

# Rule names with their own counter rows (across all reloads); later ones share
# the last row (logged). 65,536 rows of 6 counters are 3 MiB of shared memory
# per worker, of which only the rows in use are ever touched.
RULE_CAPACITY = 65536
# How often --watch-config looks at the config file.
WATCH_INTERVAL = 1.0
# How long a rollout waits for one worker to confirm before moving on.
ROLLOUT_WORKER_TIMEOUT = 30.0

Loader = Callable[[], Settings]


@dataclass
class ReloadStatus:
    """What /healthz and /metrics report about reloads."""

    successes: int = 0
    failures: int = 0
    last: dict[str, Any] | None = None
    restart_required: list[str] = field(default_factory=list)


class Reloader:
    """Builds the next config generation from a fresh load, or refuses it."""

    def __init__(
        self,
        settings: Settings,
        loader: Loader | None,
        log: logging.Logger,
        regions: LimitRegions | None = None,
    ) -> None:
        self._loader = loader
        self._log = log
        self.regions = regions
        self.rows = RuleRows(RULE_CAPACITY)
        self._register(settings)
        if len(self.rows.rows) >= RULE_CAPACITY:
            log.warning("more than %d rules: the last ones share one counter row", RULE_CAPACITY)
        limits = self._place_limits(settings, {}, 0)
        self.current = Generation(0, settings, dict(self.rows.rows), limits)
        self.status = ReloadStatus()

    def _place_limits(
        self, settings: Settings, current: Mapping[str, LimitSlot], number: int
    ) -> dict[str, LimitSlot]:
        if self.regions is None:
            return {}
        return self.regions.assign(settings.all_rules, current, number)

    def _register(self, settings: Settings) -> None:
        for name in counter_row_names(settings.all_rules, settings.allowlist_mode):
            self.rows.row(name)

    def reload(self, why: str = "SIGHUP") -> Generation | None:
        """Load and validate the config again; the new generation, or None if refused."""
        if self._loader is None:
            self._log.info("%s: nothing to reload", why)
            return None
        current = self.current.settings
        try:
            new = self._loader()
            names = counter_row_names(new.all_rules, new.allowlist_mode)
            # Compile once here, so a worker never meets rules that cannot compile.
            compile_filter(
                new.blocklist,
                new.max_line_bytes,
                new.rules,
                allowlist_mode=new.allowlist_mode,
                row_of=dict.fromkeys(names, 0).__getitem__,
            )
        except (ConfigError, ValueError) as exc:
            self._reject(why, exc)
            return None
        changed_cold = [
            f.name
            for f in dataclasses.fields(Settings)
            if f.name not in HOT_SETTINGS
            and f.name not in ("sources", "config_file")
            and getattr(new, f.name) != getattr(current, f.name)
        ]
        hot = {name: getattr(new, name) for name in HOT_SETTINGS}
        sources = dict(current.sources)
        sources.update({name: new.sources.get(name, "default") for name in HOT_SETTINGS})
        merged = dataclasses.replace(current, **hot, sources=sources)
        number = self.current.number + 1
        try:
            limits = self._place_limits(merged, self.current.limits, number)
        except ValueError as exc:
            self._reject(why, exc)
            return None
        self._register(merged)
        self.current = Generation(number, merged, dict(self.rows.rows), limits)
        self.status.successes += 1
        self.status.restart_required = changed_cold
        self.status.last = {
            "ok": True,
            "at": time.time(),
            "trigger": why,
            "generation": self.current.number,
        }
        logging.getLogger().setLevel(merged.log_level.upper())
        self._log.info(
            "config reloaded (%s): generation %d, %d rule(s)",
            why,
            self.current.number,
            len(merged.all_rules),
        )
        if changed_cold:
            self._log.warning(
                "settings that need a restart to take effect: %s", ", ".join(changed_cold)
            )
        return self.current

    def _reject(self, why: str, exc: Exception) -> None:
        self.status.failures += 1
        self.status.last = {"ok": False, "at": time.time(), "trigger": why, "error": str(exc)}
        self._log.error("config reload (%s) rejected, keeping the running config: %s", why, exc)


class Workers(Protocol):
    """What a rollout needs from the supervisor."""

    def indices(self) -> Sequence[int]: ...

    def is_alive(self, index: int) -> bool: ...

    def send(self, index: int, payload: bytes) -> bool: ...


class Rollout:
    """Hands generations to workers one at a time; ``applied`` holds each worker's."""

    def __init__(
        self,
        workers: Workers,
        log: logging.Logger,
        on_done: Callable[[int], None] | None = None,
    ) -> None:
        self._workers = workers
        self._log = log
        # Told the generation number once every live worker was offered it (and
        # confirmed it, or timed out); a superseded rollout never reports.
        self._on_done = on_done
        self.applied: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self, generation: Generation) -> None:
        """Begin handing ``generation`` out (a newer one supersedes a rollout in progress)."""
        if self._task is not None:
            self._task.cancel()
        payload = encode_message(generation)
        self._task = asyncio.get_running_loop().create_task(
            self._roll_out(generation.number, payload)
        )

    async def _roll_out(self, number: int, payload: bytes) -> None:
        workers = self._workers
        for index in list(workers.indices()):
            if not workers.send(index, payload):
                continue  # dead: it is forked again with the current config
            deadline = time.monotonic() + ROLLOUT_WORKER_TIMEOUT
            while self.applied.get(index, -1) < number and workers.is_alive(index):
                if time.monotonic() > deadline:
                    self._log.error("worker %d did not confirm generation %d", index, number)
                    break
                await asyncio.sleep(0.01)
        if self._on_done is not None:
            self._on_done(number)

    def on_ack(self, index: int, ack: ReloadAck) -> None:
        """A worker's acknowledgement of a config generation."""
        if ack.ok:
            self.applied[index] = ack.generation
        else:
            self._log.error(
                "worker %d could not apply generation %s: %s", index, ack.generation, ack.error
            )

    def oldest_applied(self, current: int) -> int:
        """The oldest generation a live worker may still run (``current`` if none lives:
        a worker forked from now on gets the current generation)."""
        workers = self._workers
        numbers = [self.applied.get(i, -1) for i in workers.indices() if workers.is_alive(i)]
        return min(numbers, default=current)

    def on_worker_started(self, index: int, number: int) -> None:
        """A (re)started worker is forked with generation ``number``."""
        self.applied[index] = number


async def watch_file(path: str, on_change: Callable[[], None]) -> None:
    """Call ``on_change`` whenever the file's size or modification time changes."""

    def stamp() -> tuple[int, int] | None:
        try:
            st = Path(path).stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    last = stamp()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        now = stamp()
        if now != last:
            last = now
            on_change()

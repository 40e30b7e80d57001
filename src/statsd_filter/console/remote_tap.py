"""``statsd-filter tap --from URL``: print the live sampled lines of a running proxy.

Reads the proxy's ``/tap`` NDJSON stream (``supervisor/taphub.py``) and prints
one line per sampled line: its verdict, the line, and the deciding rule (and
what it was rewritten to) when there is one. ``--json`` prints the stream's
objects as they come. The lines are a *sample* (``--top-sample-rate`` points
per second per worker; below that rate, every line).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from statsd_filter.console.admin_client import AdminError, admin_url, stream_ndjson

__all__ = ["format_event", "run_remote_tap"]


def format_event(event: dict[str, Any]) -> str | None:
    """One stream object as a printed line (None for those not printed on stdout)."""
    if event.get("type") != "line":
        return None
    text = f"{event['verdict']:<9}  {event['line']}"
    if event.get("rule"):
        text += f"  [rule {event['rule']}]"
    if "forwarded_as" in event:
        text += f"  => {event['forwarded_as']}"
    return text


def _print(
    events: Iterable[dict[str, Any]],
    count: int | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
    source: str,
) -> int:
    import json  # noqa: PLC0415 - only for --json

    shown = 0
    for event in events:
        kind = event.get("type")
        if kind == "ready":
            print(
                f"# tapping {event.get('workers')} of {event.get('of')} worker(s) at {source}",
                file=err,
                flush=True,
            )
        elif kind == "skipped":
            print(f"# {event.get('lines')} sampled line(s) skipped (rate limit)", file=err)
        elif kind == "error":
            print(f"statsd-filter tap: {event.get('error')}", file=err)
            return 1
        if as_json:
            if kind != "heartbeat":
                out.write(json.dumps(event) + "\n")
                out.flush()
        else:
            text = format_event(event)
            if text is not None:
                out.write(text + "\n")
                out.flush()
        if kind == "line":
            shown += 1
            if count is not None and shown >= count:
                return 0
    print("# the proxy ended the stream", file=err)
    return 0


def run_remote_tap(
    source: str,
    match: str | None,
    verdict: str | None,
    count: int | None = None,
    as_json: bool = False,
) -> int:
    """Print a running proxy's sampled lines until interrupted (or ``count`` lines)."""
    try:
        url = admin_url(source, "/tap", {"match": match, "verdict": verdict})
        return _print(stream_ndjson(url), count, as_json, sys.stdout, sys.stderr, source)
    except AdminError as exc:
        print(f"statsd-filter tap: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0

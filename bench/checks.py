"""Checking every line the sinks got: blocked, corrupt, duplicated, shard and mirror problems.

The sinks count what they received line by line (``sink.py``); this module
merges several sinks' counts, compares their maps of sequence numbers (sharded
sinks must hold disjoint lines and metric names, mirrored ones the same lines),
and turns every sign that a line went where it should not into an entry of
``Outcome.problems`` (and ``/metrics`` disagreeing with itself into
``Outcome.metric_problems``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from scenarios import Outcome, Scenario
from workload import Traffic, head_counts

RULE_MATCHES = "statsd_filter_rule_matches_total"


RULE_SAVED = "statsd_filter_rule_lines_saved_total"


# Sink figures that add up over several sinks.
SUMMED = (
    "lines",
    "passing",
    "blocked_seen",
    "corrupt",
    "duplicates",
    "kernel_drops",
    "reads",
    "bytes",
    "empty_datagrams",
    "connections",
)


def merge_sinks(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One sink's report as is (less latency), or several summed."""
    if len(results) == 1:
        return {k: v for k, v in results[0].items() if k != "latency_us"}
    merged: dict[str, Any] = {"sinks": len(results), "protocol": results[0].get("protocol")}
    for key in SUMMED:
        if any(key in r for r in results):
            merged[key] = sum(int(r.get(key) or 0) for r in results)
    merged["first_ns"] = min((int(r["first_ns"]) for r in results if r.get("first_ns")), default=0)
    merged["last_ns"] = max(int(r.get("last_ns") or 0) for r in results)
    merged["corrupt_examples"] = [e for r in results for e in r.get("corrupt_examples", [])][:5]
    merged["timed_out"] = any(r.get("timed_out") for r in results)
    errors = [str(r["error"]) for r in results if r.get("error")]
    if errors:
        merged["error"] = "; ".join(errors)
    return merged


def cross_sink_checks(mirror: bool, seen: list[bytes], traffic: Traffic) -> dict[str, Any]:
    """Compare the sinks' maps of the lines they got: mirrored equal, sharded disjoint.

    Each map holds one byte, 0 or 1, per sequence number, so as integers their
    ``|``, ``^`` and ``bit_count`` are set union, difference and size, in C.
    """
    if not seen or any(not m for m in seen):
        return {"cross_sink": "unavailable: a sink did not report its lines"}
    maps = [int.from_bytes(m, "little") for m in seen]
    if mirror:
        return {"lines_differing_from_sink_1": [(maps[0] ^ m).bit_count() for m in maps[1:]]}
    union = 0
    for m in maps:
        union |= m
    names = [
        {traffic.heads[h].partition(b":")[0] for h, n in enumerate(head_counts(m)) if n}
        for m in seen
    ]
    owners = Counter(name for group in names for name in group)
    return {
        "lines_on_several_sinks": sum(m.bit_count() for m in maps) - union.bit_count(),
        "names_per_sink": [len(group) for group in names],
        "names_on_several_sinks": sum(1 for n in owners.values() if n > 1),
    }


def integrity(sc: Scenario, out: Outcome, first_rule: str) -> None:
    """List in ``out.problems`` every sign that a line went where it should not."""
    problems: list[str] = []
    rows = out.sinks or [out.sink]
    for index, row in enumerate(rows):
        where = f"sink {index + 1}: " if out.sinks else ""
        for key, what in (
            ("blocked_seen", "lines that should have been blocked arrived"),
            ("corrupt", "corrupt lines"),
            ("duplicates", "duplicated lines"),
        ):
            if key == "blocked_seen" and not sc.via_proxy:
                continue  # nothing blocks anything in a direct run
            if row.get(key):
                problems.append(f"{where}{row[key]} {what}")
        if row.get("timed_out"):
            problems.append(f"{where}receiving timed out")
        if row.get("error"):
            problems.append(f"{where}{row['error']}")
    checks = out.checks
    if checks.get("lines_on_several_sinks"):
        problems.append(f"{checks['lines_on_several_sinks']} lines reached several shards")
    if checks.get("names_on_several_sinks"):
        problems.append(f"{checks['names_on_several_sinks']} metric names on several shards")
    for index, n in enumerate(checks.get("lines_differing_from_sink_1", [])):
        if n:
            problems.append(f"mirror sinks 1 and {index + 2} differ by {n} lines")
    metrics = out.proxy_metrics
    forwarded = metrics.get("statsd_filter_lines_forwarded_total")
    if forwarded is not None and out.sink:
        got = [int(row.get("passing", 0)) for row in rows]
        if sc.upstream_mode == "mirror":
            checks["lost_after_proxy"] = [int(forwarded) - n for n in got]
            problems.extend(
                f"sink {i + 1} got {n} of the {int(forwarded)} lines the proxy forwarded"
                for i, n in enumerate(got)
                if n != forwarded
            )
        else:
            checks["lost_after_proxy"] = int(forwarded) - sum(got)
    matches = {
        k.split('"')[1]: int(v) for k, v in metrics.items() if k.startswith(RULE_MATCHES) and v
    }
    if matches:
        checks["rule_matches"] = dict(list(matches.items())[:20])
        others = [name for name in matches if name != first_rule]
        if others:
            problems.append(
                f"{len(others)} rules other than {first_rule} matched lines: {others[:5]}"
            )
    out.problems = problems
    # Every rule that matches in these scenarios drops its lines, so the per-rule
    # counters must add up to the line counter (workers publish them every second;
    # settled_metrics waited for that).
    blocked = metrics.get("statsd_filter_lines_blocked_total")
    if blocked is not None:
        saved = sum(v for k, v in metrics.items() if k.startswith(RULE_SAVED))
        matched = sum(matches.values())
        out.metric_problems = [
            f"{name} sums to {int(value)} but lines_blocked_total is {int(blocked)}"
            for name, value in ((RULE_MATCHES, matched), (RULE_SAVED, saved))
            if value != blocked
        ]

"""The admin endpoint's routes: what each path answers, from the parts that know.

``/healthz`` (JSON, from :class:`~statsd_filter.supervisor.observe.Observer`),
``/metrics`` (Prometheus text from the collector in ``metrics.py``),
``/limits`` (the limit rules' state), ``/top`` (merged sampled reports; ``?sort=``
and ``?limit=`` checked here), ``/tap`` (a bounded NDJSON stream of sampled
lines; 503 when sampling is off or the watchers are at their cap) and ``/``
(the status page, ``status.html``, served as is with no external assets).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from statsd_filter.supervisor.admin import Request, Response, Route
from statsd_filter.supervisor.observe import Observer
from statsd_filter.supervisor.taphub import TapHub, parse_filter
from statsd_filter.supervisor.top import SORT_KEYS, TopView

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["MAX_TOP_LIMIT", "METRICS_CONTENT_TYPE", "admin_routes"]

# What generate_latest() writes: the classic Prometheus text format.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_STORE = (("Cache-Control", "no-store"),)
# Rows /top returns per table at most (?limit=).
MAX_TOP_LIMIT = 1000


def admin_routes(
    observer: Observer,
    registry: CollectorRegistry,
    limits: Callable[[], dict[str, Any]],
    top: TopView,
    taps: TapHub | None,
) -> dict[str, Route]:
    """Every admin path and its handler; ``taps`` is None when sampling is off."""
    page = resources.files("statsd_filter.supervisor").joinpath("status.html").read_bytes()

    def top_route(request: Request) -> Response:
        sort = request.query.get("sort", "lines")
        if sort not in SORT_KEYS:
            return Response.json(400, {"error": f"sort must be one of {', '.join(SORT_KEYS)}"})
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_TOP_LIMIT:
            return Response.json(400, {"error": f"limit must be 1 to {MAX_TOP_LIMIT}"})
        return Response(
            200,
            "application/json",
            Response.json(200, top.document(sort, limit)).body,
            headers=NO_STORE,
        )

    def tap_route(request: Request) -> Response:
        if taps is None:
            return Response.text(503, "sampling is off (--no-top): nothing to tap\n")
        try:
            wanted = parse_filter(request.query.get("match"), request.query.get("verdict"))
        except ValueError as exc:
            return Response.text(400, f"{exc}\n")
        if taps.full:
            limit = taps.max_watchers
            return Response.text(503, f"too many /tap watchers (tap_max_watchers = {limit})\n")
        return Response(
            200,
            "application/x-ndjson",
            b"",
            stream=lambda: taps.stream(wanted),
            headers=NO_STORE,
        )

    return {
        "/": lambda _r: Response(200, "text/html; charset=utf-8", page, headers=NO_STORE),
        "/healthz": lambda _r: Response.json(*observer.healthz()),
        "/limits": lambda _r: Response.json(200, limits()),
        "/metrics": lambda _r: Response(200, METRICS_CONTENT_TYPE, generate_latest(registry)),
        "/top": top_route,
        "/tap": tap_route,
    }

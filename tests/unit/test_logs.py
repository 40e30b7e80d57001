"""Unit tests for statsd_filter.logs: the text and JSON log formats."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from statsd_filter.logs import JsonFormatter, setup_logging


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("statsd_filter", logging.WARNING, __file__, 1, message, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_record_has_the_five_keys() -> None:
    """time (UTC, ms, Z), level, process, message (args applied) and fields (pid, logger)."""
    rec = record("sent %d line(s)", 3, process_label="worker 2", created=0.25)
    rec.created = 1700000000.25
    doc = json.loads(JsonFormatter().format(rec))
    assert doc == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "warning",
        "process": "worker 2",
        "message": "sent 3 line(s)",
        "fields": {"pid": rec.process, "logger": "statsd_filter"},
    }


def test_json_fields_exception_and_escaping() -> None:
    """Extra fields are merged, an exception's traceback is a field, and the line is
    ASCII-only JSON even for non-UTF-8 client bytes turned into surrogates."""
    error = ValueError("boom")
    exc_info = (ValueError, error, None)
    rec = record(
        "line %s",
        b"\xff".decode("utf-8", "surrogateescape"),
        fields={"received": 5, "upstreams": [{"address": "a:1"}], "odd": object},
    )
    rec.exc_info = exc_info
    text = JsonFormatter().format(rec)
    assert text.isascii()
    assert "\n" not in text
    doc = json.loads(text)
    assert doc["fields"]["received"] == 5
    assert doc["fields"]["upstreams"] == [{"address": "a:1"}]
    assert doc["fields"]["odd"] == str(object)
    assert "ValueError: boom" in doc["fields"]["exception"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_setup_logging_picks_the_format(log_format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """setup_logging writes the chosen format to stderr, labelled with the process."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        log = setup_logging("info", "supervisor", log_format)
        log.info("hello %s", "there")
        log.debug("not shown")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    if log_format == "json":
        doc = json.loads(lines[0])
        assert (doc["process"], doc["message"], doc["level"]) == (
            "supervisor",
            "hello there",
            "info",
        )
    else:
        assert lines[0].endswith(" INFO supervisor: hello there")

"""Logging set-up shared by the supervisor and the workers.

Every record names its process (``supervisor`` or ``worker 3``), so the
interleaved output of N workers on one stderr stays readable.

Two formats (``--log-format``):

* ``text``: ``2026-11-24 10:00:00,123 INFO supervisor: message``, for people;
* ``json``: one JSON object per line, for log pipelines (journald, Loki, a
  container runtime's collector): ``time`` (UTC, ISO 8601, milliseconds),
  ``level``, ``process``, ``message`` and ``fields``. ``fields`` always holds
  the ``pid`` and the ``logger``, plus what a call passes as
  ``extra={"fields": {...}}`` (the start-up line passes the listeners,
  upstreams and build; the last line passes the final counts), and the
  ``exception`` text when there is one. Non-ASCII text is escaped, so a line
  is valid JSON whatever bytes a client sent.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["LOG_FORMATS", "JsonFormatter", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(process_label)s: %(message)s"
LOG_FORMATS = ("text", "json")


class _LabelFilter(logging.Filter):
    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_label = self.label
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, process, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {"pid": record.process, "logger": record.name}
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            fields.update(extra)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        created = datetime.fromtimestamp(record.created, UTC)
        document = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "process": getattr(record, "process_label", ""),
            "message": record.getMessage(),
            "fields": fields,
        }
        # default=str: a field value that JSON cannot hold is logged as its text.
        return json.dumps(document, default=str)


def setup_logging(level: str, label: str, log_format: str = "text") -> logging.Logger:
    """(Re)configure the root logger for this process and return the project logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT))
    handler.addFilter(_LabelFilter(label))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger("statsd_filter")

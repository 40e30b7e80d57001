"""Logging set-up shared by the supervisor and the workers.

Every record names its process (``supervisor`` or ``worker 3``), so the
interleaved output of N workers on one stderr stays readable.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(process_label)s: %(message)s"


class _LabelFilter(logging.Filter):
    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_label = self.label
        return True


def setup_logging(level: str, label: str) -> logging.Logger:
    """(Re)configure the root logger for this process and return the project logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_LabelFilter(label))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger("statsd_filter")

"""Talking to a running proxy's admin port: one JSON document, or an NDJSON stream.

Plain ``urllib`` (no dependency): the admin endpoint is HTTP/1.1 with one
request per connection. Only ``http://`` URLs are accepted; the admin port
serves nothing else.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

__all__ = ["AdminError", "admin_url", "fetch_json", "stream_ndjson"]

# Connecting and each read; a /tap stream sends a heartbeat every 5 s, so a
# silent minute means the proxy is gone.
TIMEOUT = 5.0
STREAM_TIMEOUT = 60.0


class AdminError(Exception):
    """The admin port could not be reached or answered an error; the message says which."""


def admin_url(base: str, path: str, query: dict[str, str | None] | None = None) -> str:
    """``base`` (``http://host:port``, a path allowed) joined with ``path`` and ``query``."""
    parsed = urllib.parse.urlsplit(base if "://" in base else f"http://{base}")
    if parsed.scheme != "http" or not parsed.netloc:
        raise AdminError(f"{base!r} is not an http://host:port address")
    prefix = parsed.path.rstrip("/")
    encoded = urllib.parse.urlencode({k: v for k, v in (query or {}).items() if v is not None})
    return urllib.parse.urlunsplit(("http", parsed.netloc, prefix + path, encoded, ""))


def _open(url: str, timeout: float) -> Any:
    try:
        return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - http:// checked above
    except urllib.error.HTTPError as exc:
        with exc:
            detail = exc.read().decode("utf-8", "replace").strip()
        raise AdminError(f"{url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach {url}: {reason}") from None


def fetch_json(url: str) -> dict[str, Any]:
    """GET ``url`` and parse its JSON body."""
    with _open(url, TIMEOUT) as resp:
        try:
            data: dict[str, Any] = json.loads(resp.read())
        except (ValueError, OSError) as exc:
            raise AdminError(f"{url}: not a JSON answer: {exc}") from None
    return data


def stream_ndjson(url: str) -> Iterator[dict[str, Any]]:
    """GET ``url`` and yield each JSON object of its NDJSON body until it ends."""
    with _open(url, STREAM_TIMEOUT) as resp:
        while True:
            try:
                line = resp.readline()
            except OSError as exc:
                raise AdminError(f"{url}: the stream broke off: {exc}") from None
            if not line:
                return
            if line.strip():
                yield json.loads(line)

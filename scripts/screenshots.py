"""Regenerate the README's screenshots (docs/*.png) with the real program.

Starts ``statsd-filter run`` on free loopback ports with an example config,
sends it a few seconds of made-up traffic, then takes:

* ``docs/status-page.png``: the admin port's status page in headless Chromium;
* ``docs/top.png``: the output of ``statsd-filter top --once``, shown in a
  terminal-like page (a real terminal cannot be screenshotted headless).

    .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import html
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "statsd-filter"
HOST = "127.0.0.1"
CONFIG = """
blocklist = ["debug."]

[[rules]]
name = "no-dev"
match = { tag = "env:dev" }
action = "drop"

[[rules]]
name = "strip-pod"
match = { glob = "api.**", tag = "pod" }
action = "strip_tags"
tags = ["pod"]

[[rules]]
name = "sample-cache"
match = { prefix = "cache." }
action = "sample"
keep_one_in = 10
"""
# (name, weight, tags): a mix with a few heavy hitters and one tag explosion.
TRAFFIC = [
    ("api.http.requests", 30, "env:prod,route:/users"),
    ("api.http.latency", 20, "env:prod,pod:web-{pod}"),
    ("cache.redis.hits", 18, "env:prod"),
    ("debug.trace.spans", 12, "env:prod"),
    ("queue.jobs.done", 8, "env:prod,queue:mail"),
    ("api.http.requests", 4, "env:dev"),
    ("billing.invoices.created", 2, "env:prod,customer:{customer}"),
    ("search.index.size", 1, "env:prod"),
]


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def sender(port: int, stop: threading.Event) -> None:
    rng = random.Random(1)
    names = [entry for entry in TRAFFIC for _ in range(entry[1])]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while not stop.is_set():
            lines = []
            for _ in range(20):
                name, _, tags = rng.choice(names)
                tags = tags.format(pod=rng.randrange(40), customer=rng.randrange(5000))
                lines.append(f"{name}:{rng.randrange(1, 50)}|c|#{tags}".encode())
            sock.sendto(b"\n".join(lines), (HOST, port))
            time.sleep(0.004 * rng.random())


def chromium(args: list[str], url: str, profile: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is needed (apt-get install chromium)")
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *args,
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> int:
    listen = free_port(socket.SOCK_DGRAM)
    admin = free_port(socket.SOCK_STREAM)
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a sink nobody reads
    upstream.bind((HOST, 0))
    with tempfile.TemporaryDirectory() as tmp, upstream:
        config = Path(tmp) / "statsd-filter.toml"
        config.write_text(CONFIG)
        proxy = subprocess.Popen(
            [
                str(BIN),
                "run",
                "--config",
                str(config),
                "--listen-port",
                str(listen),
                "--admin-port",
                str(admin),
                "--target-host",
                HOST,
                "--target-port",
                str(upstream.getsockname()[1]),
                "--workers",
                "2",
                "--log-level",
                "warning",
            ]
        )
        stop = threading.Event()
        thread = threading.Thread(target=sender, args=(listen, stop), daemon=True)
        try:
            time.sleep(1.5)
            thread.start()
            time.sleep(25)  # a few points on the charts
            url = f"http://{HOST}:{admin}"
            chromium(
                ["--window-size=1200,1000", f"--screenshot={ROOT / 'docs' / 'status-page.png'}"],
                url + "/",
                Path(tmp) / "p1",
            )
            once = subprocess.run(
                [str(BIN), "top", "--once", "--limit", "10", "--admin", url],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout
        finally:
            stop.set()
            proxy.terminate()
            proxy.wait(15)
        page = Path(tmp) / "top.html"
        page.write_text(
            "<html><body style='margin:0;background:#1d2430'>"
            "<pre style='margin:0;padding:14px;color:#e6e9ee;"
            'font:13px/1.35 "Liberation Mono",monospace\'>'
            f"$ statsd-filter top --once --limit 10\n{html.escape(once)}</pre></body></html>"
        )
        chromium(
            ["--window-size=1000,560", f"--screenshot={ROOT / 'docs' / 'top.png'}"],
            page.as_uri(),
            Path(tmp) / "p2",
        )
    print("wrote docs/status-page.png and docs/top.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

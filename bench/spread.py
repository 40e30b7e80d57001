"""How two receivers share one busy client socket: SO_REUSEPORT vs one inherited socket.

Not a test: prints the share of datagrams each of two receiver processes got
when a single source socket sends ``--datagrams`` datagrams to them, for both
ways of sharing a UDP port. This is the measurement behind the README's
"Workers and how they share the port". Loopback only; bounded in count and time.

    .venv/bin/python bench/spread.py [--datagrams 200000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import time

DEADLINE = 20.0  # seconds any phase may take


def _receiver(
    sock: socket.socket | None, port: int, counts: mp.Array, slot: int, stop: mp.Event
) -> None:  # type: ignore[type-arg]
    if sock is None:  # SO_REUSEPORT: each receiver binds its own socket
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.settimeout(0.05)
    got = 0
    deadline = time.monotonic() + DEADLINE
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            sock.recv(65536)
        except TimeoutError:
            continue
        got += 1
        if got % 256 == 0:
            counts[slot] = got
    counts[slot] = got


def _run(mode: str, datagrams: int) -> tuple[int, int]:
    ctx = mp.get_context("fork")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if mode == "reuseport":
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    counts = ctx.Array("q", 2)
    stop = ctx.Event()
    shared = probe if mode == "shared" else None
    workers = [
        ctx.Process(target=_receiver, args=(shared, port, counts, i, stop)) for i in range(2)
    ]
    for worker in workers:
        worker.start()
    if mode == "reuseport":
        probe.close()  # only the two receivers' sockets stay in the group
    time.sleep(0.3)  # both receivers are bound and waiting
    payload = b"spread.test:1|c\n" * 4
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:  # ONE source socket
        deadline = time.monotonic() + DEADLINE
        for i in range(datagrams):
            sender.sendto(payload, ("127.0.0.1", port))
            if i % 64 == 63:
                time.sleep(0.0002)  # below the receivers' capacity: no kernel drops
            if time.monotonic() > deadline:
                break
    time.sleep(0.5)
    stop.set()
    for worker in workers:
        worker.join(DEADLINE)
    if mode == "shared":
        probe.close()
    return counts[0], counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datagrams", type=int, default=200_000)
    args = parser.parse_args()
    print(f"one source socket, {args.datagrams} datagrams, 2 receiver processes")
    for mode in ("reuseport", "shared"):
        a, b = _run(mode, args.datagrams)
        total = a + b or 1
        share_a, share_b = 100 * a / total, 100 * b / total
        print(f"{mode:9s}: receiver A {a:7d} ({share_a:5.1f}%)  B {b:7d} ({share_b:5.1f}%)")


if __name__ == "__main__":
    main()

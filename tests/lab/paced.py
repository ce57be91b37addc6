"""A paced TCP stream for the reload lab tests: `serve HOST PORT BYTES RATE` sends BYTES of
seeded pseudo-random data at RATE bytes/s to the first client; `fetch HOST PORT` reads to
EOF and prints JSON {bytes, sha256, max_gap_s, seconds}: the longest wait between two reads
is what a stall of the tunnel looks like from the application."""

from __future__ import annotations

import hashlib
import json
import random
import socket
import sys
import time

CHUNK = 16384
SEED = 13


def data(n: int) -> bytes:
    """The BYTES the server sends (the test computes the same digest)."""
    return random.Random(SEED).randbytes(n)


def serve(host: str, port: int, n: int, rate: float) -> None:
    payload = data(n)
    with socket.create_server((host, port)) as srv:
        conn, _ = srv.accept()
        with conn:
            start = time.monotonic()
            for off in range(0, n, CHUNK):
                ahead = off / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
                conn.sendall(payload[off:off + CHUNK])


def fetch(host: str, port: int) -> None:
    h = hashlib.sha256()
    got = 0
    gap = 0.0
    with socket.create_connection((host, port), timeout=30) as s:
        start = last = time.monotonic()
        while True:
            b = s.recv(1 << 16)
            now = time.monotonic()
            if got:
                gap = max(gap, now - last)
            last = now
            if not b:
                break
            got += len(b)
            h.update(b)
    print(json.dumps({"bytes": got, "sha256": h.hexdigest(), "max_gap_s": round(gap, 3),
                      "seconds": round(last - start, 3)}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    else:
        fetch(sys.argv[2], int(sys.argv[3]))

"""Benchmark: the cost of a TcpDemux batch with many idle connections beside one busy one.

Run: .venv/bin/python tests/sim/bench_demux.py [--idle 250] [--batches 3000]

Two demuxes (client, server) in memory; `--idle` connections are opened and left idle,
then one connection moves data: per batch the client sends what it may, the server takes
the segments, runs its timers and answers. Printed: µs per batch with 0 idle connections
and with `--idle` of them, and the ratio (1.0 means idle connections cost nothing per
batch; a per-connection walk made it grow linearly). Prints only, never asserts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tcp_demux

from tcp_demux import TcpDemux  # noqa: E402

from stack.tcp_config import TcpConfig  # noqa: E402
from stack.wire.tcp import emit_tcp, parse_tcp  # noqa: E402

SRV = bytes([198, 18, 1, 1])
CLI = bytes([198, 18, 2, 2])
CFG = TcpConfig(isn_key=b"bench-demux", rto_min=0.2)


def _pump(a: TcpDemux, b: TcpDemux, now: float) -> int:
    n = 0
    for src, dst, seg in a.segments_to_send(now):
        s = parse_tcp(emit_tcp(seg, src, dst), src, dst)
        assert s is not None
        b.receive(src, dst, s, now)
        n += 1
    return n


def run(idle: int, batches: int) -> float:
    server, client = TcpDemux(CFG), TcpDemux(CFG)
    server.listen(80)
    for i in range(idle):
        client.connect((CLI, 20000 + i), (SRV, 80), 0.0)
    busy = client.connect((CLI, 19999), (SRV, 80), 0.0)
    while _pump(client, server, 0.0) + _pump(server, client, 0.0):
        pass
    peer = server.connections[(SRV, 80, CLI, 19999)]
    chunk = bytes(16384)
    now = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        now += 0.0005
        busy.send(chunk)
        _pump(client, server, now)
        server.handle_timer(now)
        _pump(server, client, now)
        client.handle_timer(now)
        server.get_timer()
        client.get_timer()
        peer.read()
    return (time.perf_counter() - t0) / batches * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=250)
    ap.add_argument("--batches", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = loaded = float("inf")
    for _ in range(args.rounds):  # interleaved, best of each
        base = min(base, run(0, args.batches))
        loaded = min(loaded, run(args.idle, args.batches))
    print(f"batch, 1 busy connection:                {base:7.1f} µs")
    print(f"batch, 1 busy + {args.idle} idle connections: {loaded:7.1f} µs "
          f"= {loaded / base:.2f} x")


if __name__ == "__main__":
    main()

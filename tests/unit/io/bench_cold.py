"""Benchmark (not a test): what one `Bridge.from_tun` of a ping costs as the first thing a
thread does after an idle wait, against the same call just after (bridge/io/warm.py).

    .venv/bin/python tests/unit/io/bench_cold.py [GAP_MS ...]     (default 0.5 1 2 5 10)

A child process wakes this one with a datagram every GAP ms; per wake-up the core call runs
twice and both are timed. Prints medians and the cold / warm ratio for each gap.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bridge.config import load_config  # noqa: E402
from bridge.pipeline import Bridge, Output  # noqa: E402
from stack.wire.checksum import checksum  # noqa: E402

ROUNDS = 300


def ping() -> bytes:
    """An IPv4 ICMP echo from site A (198.18.1.10) to site B (198.18.2.10), 84 bytes."""
    h = bytearray(bytes.fromhex("450000540000400040010000c612010ac612020a"))
    h[10:12] = checksum(bytes(h)).to_bytes(2, "big")
    return bytes(h) + b"\x08\x00" + bytes(62)


def measure(bridge: Bridge, pkt: bytes, gap: float) -> tuple[float, float]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(ROUNDS):
            time.sleep(gap)  # the idle wait being measured
            b.sendto(b"x", a.getsockname())
        os._exit(0)
    poller = select.poll()
    poller.register(a, select.POLLIN)
    cold, warm = [], []
    for _ in range(ROUNDS):
        poller.poll()
        a.recv(16)
        t0 = time.perf_counter_ns()
        bridge.from_tun([pkt], 1.0, Output())
        t1 = time.perf_counter_ns()
        bridge.from_tun([pkt], 1.0, Output())
        t2 = time.perf_counter_ns()
        cold.append(t1 - t0)
        warm.append(t2 - t1)
    os.waitpid(pid, 0)
    a.close()
    return sorted(cold)[ROUNDS // 2] / 1000, sorted(warm)[ROUNDS // 2] / 1000


def main(argv: list[str]) -> int:
    gaps = [float(g) for g in argv] or [0.5, 1, 2, 5, 10]
    bridge = Bridge(load_config(str(ROOT / "topologies/two-sites/gw-a.toml")), 0.0,
                    underlay_mtu=1500)
    pkt = ping()
    out = Output()
    bridge.from_tun([pkt], 1.0, out)
    assert out.udp, "the ping must be encapsulated"
    print("gap ms  cold us  warm us  cold/warm")
    for g in gaps:
        c, w = measure(bridge, pkt, g / 1000)
        print(f"{g:6.1f}  {c:7.1f}  {w:7.1f}  {c / w:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

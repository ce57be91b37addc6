"""Benchmark (not a test): what `grebe capture` costs the packet path, off and armed.

    .venv/bin/python tests/unit/io/bench_capture.py [PACKETS] [ROUNDS]   (default 2000 7)

Two Engines over the in-memory fakes (bridge/io/fake.py); A's TUN gets PACKETS 1400-byte
UDP packets in batches of 64, which cross to B's TUN. Three runs per round, interleaved:
the anchor (no tap), the tap armed for another peer (every batch checked, nothing written)
and the tap armed for this peer (every datagram rebuilt and written, outer and inner, to a
file). Prints the median µs per packet of each and the ratios to the anchor.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bridge import pcapng  # noqa: E402
from bridge.config import loads_config  # noqa: E402
from bridge.io.capture import _spec, arm  # noqa: E402
from bridge.io.fake import MemoryNet, MemoryTun, drive  # noqa: E402
from bridge.io.loop import Engine  # noqa: E402
from bridge.pipeline import Bridge  # noqa: E402
from stack.wire.checksum import checksum  # noqa: E402

CFG = """
[tun]
name = "gb-{n}"
mtu = 1500
[listen]
address = "{me}"
[[peers]]
name = "site-{n}"
endpoint = "{peer}:4754"
prefixes = ["{prefix}"]
key = 7
[[peers]]
name = "other"
endpoint = "198.18.0.9:4754"
prefixes = ["198.18.9.0/24"]
key = 8
"""


def packet(i: int) -> bytes:
    body = bytes(8 + 1372)
    ip = bytearray(b"\x45\x00" + (20 + len(body)).to_bytes(2, "big") + i.to_bytes(2, "big")
                   + b"\x00\x00\x40\x11\x00\x00" + bytes([198, 18, 1, 5, 198, 18, 2, 5]))
    ip[10:12] = checksum(ip).to_bytes(2, "big")
    return bytes(ip) + b"\x30\x39\x30\x3a" + len(body).to_bytes(2, "big") + b"\x00\x00" \
        + body[8:]


def run(n: int, mode: str, path: str) -> float:
    net = MemoryNet()
    ca = loads_config(CFG.format(n="b", me="198.18.0.1", peer="198.18.0.2",
                                 prefix="198.18.2.0/24"))
    cb = loads_config(CFG.format(n="a", me="198.18.0.2", peer="198.18.0.1",
                                 prefix="198.18.1.0/24"))
    ea = Engine(Bridge(ca, 1.0), MemoryTun("a"), net.endpoint("198.18.0.1"), time.monotonic)
    eb = Engine(Bridge(cb, 1.0), MemoryTun("b"), net.endpoint("198.18.0.2"), time.monotonic)
    if mode != "off":
        Path(path).write_bytes(pcapng.header())
        peer = "site-b" if mode == "this peer" else "other"
        arm(ea, _spec({"peer": peer, "path": path, "count": 10**6, "duration": 600}, ca))
    pkts = [packet(i) for i in range(n)]
    t0 = time.perf_counter()
    for i in range(0, n, 64):
        ea.tun.inject(*pkts[i:i + 64])  # type: ignore[attr-defined]
        drive([ea, eb])
        eb.tun.take()  # type: ignore[attr-defined]
    dt = time.perf_counter() - t0
    arm(ea, {"stop": True})
    return dt / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    modes = ("off", "other peer", "this peer")
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.pcapng")
        run(n // 4, "off", path)  # warm-up
        for _ in range(rounds):
            for m in modes:
                times[m].append(run(n, m, path))
    anchor = statistics.median(times["off"])
    for m in modes:
        med = statistics.median(times[m])
        print(f"{m:12} {med:7.2f} µs/packet  x{med / anchor:.2f} of no tap")


if __name__ == "__main__":
    main()

"""Paired micro-benchmark of the core: plain vs authenticated vs encrypted, ratios of one run.

    .venv/bin/python tests/sim/bench_secure_core.py [--rounds 15] [--batches 20] [--batch 64]
        [--size 1400] [--profile authenticated|encrypted]

The same inner packets (IPv4/UDP, `--size` bytes) through `Bridge.from_tun` (send: route,
encapsulate, and for the secure modes seal) and into the peer's `from_udp` / `from_secure`
(receive: for the secure modes verify/open, then decapsulate), all three peers with the
same GRE options (key + drop-late sequence numbers, bench_pipeline.py's "gre key+seq").
The variants take turns, round after round (`--rounds`), so a neighbour's load hits all of
them alike; each prints the median CPU µs per packet (process time) and its ratio to plain
measured in the same run. Issue 12's goal for the authenticated mode: within 20 % of
plain. `--profile MODE` prints the cProfile of that mode's send and receive instead.
The process keeps its heap as `grebe up` does (bridge/io/warm.py `keep_heap`;
GREBE_KEEP_HEAP=0 to see the cost of the page faults without it). No assertions on time:
a tool, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "bridge"))
from bench_pipeline import SITE, _packet, _secure_pair  # noqa: E402

from bridge.config import loads_config  # noqa: E402
from bridge.gro import GroBatch  # noqa: E402
from bridge.gso import SuperPacket, UdpRun  # noqa: E402
from bridge.io import offload as ol  # noqa: E402
from bridge.io.warm import keep_heap  # noqa: E402
from bridge.pipeline import Bridge, Output  # noqa: E402
from stack.wire import vnet  # noqa: E402
from stack.wire.checksum import pseudo_sum_v4  # noqa: E402

EXTRA = 'key = 1\nsequence = "drop-late"'
A_ADDR = ("198.18.0.1", 4754)
A_SECURE = ("198.18.0.1", 24754)


class Variant:
    def __init__(self, name: str, mode: str, tmp: str) -> None:
        self.name, self.mode = name, mode
        if mode == "plain":
            self.a = Bridge(loads_config(SITE.format(side="a", n=1, m=2,
                                                     prefix="198.18.20.0/24", extra=EXTRA)), 0.0)
            self.b = Bridge(loads_config(SITE.format(side="b", n=2, m=1,
                                                     prefix="198.18.10.0/24", extra=EXTRA)), 0.0)
        else:
            sub = Path(tmp) / mode
            sub.mkdir()
            self.a, self.b = _secure_pair(mode, EXTRA, str(sub))
        self.send_us: list[float] = []
        self.recv_us: list[float] = []

    def sent(self, out: Output) -> list[tuple[bytes | bytearray, tuple[str, int]]]:
        if self.mode == "plain":
            return [(d, A_ADDR) for items in out.udp.values() for d in items]
        return [(d, A_SECURE) for items in out.secure.values() for d in items]

    def bulk_round(self, frames: list[bytes], batches: int, now: float) -> None:
        """TSO super-packets out (`send_super`, `seal_batch`), the UdpRuns back in as GRO
        batches (`receive_run`, for secure peers after `_open_run`): a bulk TCP stream."""
        out = Output()
        made = []
        rows = 0
        t0 = time.process_time()
        for _ in range(batches):
            out.clear()
            self.a.from_tun([SuperPacket(f, vnet.VNET_HDR_LEN, vnet.parse_vnet(f)[3],
                                         ol.split_frame) for f in frames], now, out)
            items = out.udp if self.mode == "plain" else out.secure
            got = []
            for lst in items.values():
                for it in lst:
                    assert type(it) is UdpRun
                    rows += -(-len(it) // it.seg)
                    got.append((GroBatch(bytearray(it), it.seg),
                                A_ADDR if self.mode == "plain" else A_SECURE))
            made.append(got)
        self.send_us.append((time.process_time() - t0) / rows * 1e6)
        recv = self.b.from_udp if self.mode == "plain" else self.b.from_secure
        ob = Output()
        t0 = time.process_time()
        delivered = 0
        for dgrams in made:
            ob.clear()
            recv(dgrams, now, ob)
            delivered += len(ob.tun)
        self.recv_us.append((time.process_time() - t0) / rows * 1e6)
        if delivered != len(made) * len(frames):  # one TunFrame per run
            raise RuntimeError(f"{self.name}: {delivered} TUN writes for "
                               f"{len(made) * len(frames)} runs")

    def one_round(self, pkts: list[bytes], batches: int, now: float) -> None:
        out = Output()
        made = []
        t0 = time.process_time()
        for _ in range(batches):
            out.clear()
            self.a.from_tun(pkts, now, out)
            made.append(self.sent(out))
        n = batches * len(pkts)
        self.send_us.append((time.process_time() - t0) / n * 1e6)
        recv = self.b.from_udp if self.mode == "plain" else self.b.from_secure
        ob = Output()
        t0 = time.process_time()
        for dgrams in made:
            ob.clear()
            recv(dgrams, now, ob)
        self.recv_us.append((time.process_time() - t0) / n * 1e6)
        if len(ob.tun) != len(pkts):
            raise RuntimeError(f"{self.name}: {len(ob.tun)} of {len(pkts)} delivered")


def _tso_frames(count: int, rows: int, mss: int) -> list[bytes]:
    """`count` TSO frames (vnet header + 64 KB TCP packet) of one flow, 198.18.10.5 ->
    198.18.20.7, as a TUN with offloads hands them in (pseudo-header sum, NEEDS_CSUM)."""
    from scapy.layers.inet import IP, TCP

    out = []
    seq = 1
    for _ in range(count):
        data = bytes(range(256)) * (rows * mss // 256 + 1)
        pkt = bytearray(bytes(IP(src="198.18.10.5", dst="198.18.20.7", flags="DF", id=1)
                              / TCP(sport=40000, dport=80, seq=seq, ack=1, flags="A",
                                    window=500) / data[:rows * mss]))
        pkt[36:38] = pseudo_sum_v4(pkt[12:16], pkt[16:20], 6, 0).to_bytes(2, "big")
        out.append(vnet.build_vnet(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 40, mss, 20, 16)
                   + bytes(pkt))
        seq += rows * mss
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--profile", choices=("plain", "authenticated", "encrypted"))
    ap.add_argument("--bulk", action="store_true",
                    help="TSO super-packets of one TCP flow out, GRO batches in")
    a = ap.parse_args(argv)
    keep_heap()
    pkts = [_packet(i, a.size) for i in range(a.batch)]
    frames = _tso_frames(4, 44, a.size - 40)
    if a.bulk:
        Variant.one_round = (lambda self, _p, n, now:  # type: ignore[method-assign]
                             Variant.bulk_round(self, frames, max(1, n // 4), now))
    with tempfile.TemporaryDirectory() as tmp:
        vs = [Variant("plain (gre key+seq)", "plain", tmp),
              Variant("authenticated", "authenticated", tmp),
              Variant("encrypted", "encrypted", tmp)]
    if a.profile:
        v = next(v for v in vs if v.mode == a.profile)
        prof = cProfile.Profile()
        run: Callable[[], None] = lambda: v.one_round(pkts, a.batches * 5, 1.0)  # noqa: E731
        prof.runcall(run)
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        return 0
    for r in range(a.rounds + 1):
        for v in (vs if r % 2 else vs[::-1]):
            v.one_round(pkts, a.batches, 1.0 + r * 0.001)
    for v in vs:  # round 0 warmed the caches up
        del v.send_us[0], v.recv_us[0]
    base_s = statistics.median(vs[0].send_us)
    base_r = statistics.median(vs[0].recv_us)
    what = (f"bulk TCP: TSO frames of 44 x {a.size - 40} bytes out, GRO batches in"
            if a.bulk else f"{a.size}-byte inner IPv4/UDP, batches of {a.batch}")
    print(f"{what}, {a.rounds} paired rounds; median CPU µs per packet (process time)")
    print(f"{'variant':22} {'send µs':>8} {'x plain':>8} {'recv µs':>8} {'x plain':>8} "
          f"{'both x plain':>13}")
    for v in vs:
        s, rr = statistics.median(v.send_us), statistics.median(v.recv_us)
        print(f"{v.name:22} {s:8.2f} {s / base_s:8.2f} {rr:8.2f} {rr / base_r:8.2f} "
              f"{(s + rr) / (base_s + base_r):13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

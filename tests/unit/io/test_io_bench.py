"""Benchmarks of the Python data path (printed ratios, no timed asserts; run with -s to see).

The whole user-space path of one TCP super-packet through two Bridges: TSO split (numpy vs
pure Python), from_tun, from_udp, coalesce. Prints microseconds per 1,400-byte segment and
the throughput one core could carry at that cost.
"""

from __future__ import annotations

import time

from scapy.layers.inet import IP, TCP

from bridge.config import loads_config
from bridge.io import offload as ol
from bridge.pipeline import Bridge, Output
from stack.wire import vnet
from stack.wire.checksum import pseudo_sum_v4

CFG = """
[tun]
name = "b{n}"
mtu = 1500
[listen]
address = "{me}"
[[peers]]
name = "p"
endpoint = "{peer}:4754"
prefixes = ["{pfx}"]
key = 42
sequence = "off"
"""


def _frame(mss: int = 1400, size: int = 63000) -> bytes:
    payload = bytes(range(256)) * (size // 256)
    pkt = bytearray(bytes(IP(src="198.18.1.10", dst="198.18.2.10", flags="DF") /
                          TCP(sport=4000, dport=80, flags="A") / payload))
    pkt[36:38] = pseudo_sum_v4(pkt[12:16], pkt[16:20], 6, 0).to_bytes(2, "big")
    return vnet.build_vnet(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, mss, 20, 16) + bytes(pkt)


def _per_segment(fn, n_segments: int, rounds: int = 30) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / n_segments * 1e6


def test_bench_python_path() -> None:
    frame = _frame()
    segs: list[bytes] = []
    assert ol.split_frame(frame, segs)
    n = len(segs)
    a = Bridge(loads_config(CFG.format(n="a", me="198.18.0.1", peer="198.18.0.2",
                                       pfx="198.18.2.0/24")), 0.0)
    b = Bridge(loads_config(CFG.format(n="b", me="198.18.0.2", peer="198.18.0.1",
                                       pfx="198.18.1.0/24")), 0.0)
    out_a, out_b = Output(), Output()
    a.from_tun(segs, 1.0, out_a)
    dgrams = [(d, ("198.18.0.1", 4754)) for d in out_a.udp[("198.18.0.2", 4754)]]
    b.from_udp(dgrams, 1.0, out_b)
    assert len(out_b.tun) == n  # the measured path really forwards

    def split(use_numpy: bool) -> None:
        out: list[bytes] = []
        ol.split_frame(frame, out, use_numpy)

    def tun() -> None:
        out_a.clear()
        a.from_tun(segs, 1.0, out_a)

    def udp() -> None:
        out_b.clear()
        b.from_udp(dgrams, 1.0, out_b)

    inner = list(out_b.tun)

    def coalesce() -> None:
        ol.coalesce(inner, [])

    costs = {
        "split numpy": _per_segment(lambda: split(True), n),
        "split python": _per_segment(lambda: split(False), n),
        "from_tun": _per_segment(tun, n),
        "from_udp": _per_segment(udp, n),
        "coalesce": _per_segment(coalesce, n),
    }
    send_side = costs["split numpy"] + costs["from_tun"]
    recv_side = costs["from_udp"] + costs["coalesce"]
    for k, v in costs.items():
        print(f"{k:14} {v:6.2f} us/segment")
    print(f"split numpy/python speed-up: {costs['split python'] / costs['split numpy']:.1f}x")
    for side, us in (("sender gw", send_side), ("receiver gw", recv_side)):
        print(f"{side}: {us:.2f} us/segment of Python -> at most "
              f"{1400 * 8 / us / 1000:.2f} Gb/s per core, before kernel work")

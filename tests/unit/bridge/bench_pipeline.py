"""Micro-benchmark of the sans-I/O data plane: packets/s to encapsulate and decapsulate.

    .venv/bin/python tests/unit/bridge/bench_pipeline.py [--packets N] [--batch B] [--size BYTES]

Prints packets/s (and the inner Gb/s that would be) for `Bridge.from_tun` (encapsulate)
and `Bridge.from_udp` (decapsulate) on 1400-byte IPv4/UDP packets, for several
encapsulation settings and the secure modes (issue 12: `from_tun` with sealing, and
`from_secure`, verify + decapsulate, on freshly sealed datagrams each run), and the ratio
to a floor that only copies each packet into a bytearray and appends it to a list (the
least any data plane must do). No assertions on
time: numbers vary with the machine and its load (2 shared cores here); compare ratios
from one run. This is a tool, not part of the packet path.
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time
from collections.abc import Callable

from bridge.config import loads_config
from bridge.pipeline import Bridge, Output
from bridge.secure.keys import write_private_key
from stack.wire.checksum import checksum

SITE = """
[tun]
name = "bench{side}"
addresses = ["198.18.100.{n}/30"]
[listen]
address = "198.18.0.{n}"
[[peers]]
name = "peer"
endpoint = "198.18.0.{m}:4754"
prefixes = ["{prefix}"]
keepalive = 0
{extra}
"""

VARIANTS = [
    ("gre", ""),
    ("gre key", "key = 1"),
    ("gre key+seq(drop-late)", 'key = 1\nsequence = "drop-late"'),
    ("gre key+seq(reorder)+csum", 'key = 1\nsequence = "reorder"\nchecksum = true'),
    ("ipip (fou)", 'encapsulation = "ipip"'),
]
SECURE_VARIANTS = [  # the same GRE options as "gre key+seq(drop-late)", sealed
    ("authenticated key+seq", "authenticated", 'key = 1\nsequence = "drop-late"'),
    ("encrypted key+seq", "encrypted", 'key = 1\nsequence = "drop-late"'),
]


def _packet(i: int, size: int) -> bytes:
    """An IPv4/UDP packet 198.18.10.x -> 198.18.20.y of `size` bytes, valid checksums."""
    src = bytes([198, 18, 10, 1 + i % 200])
    dst = bytes([198, 18, 20, 1 + (i * 7) % 200])
    udp = struct.pack("!HHHH", 1000 + i % 50, 5201, size - 20, 0) + b"\xa5" * (size - 28)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, i & 0xFFFF, 0x4000, 64, 17, 0,
                                src, dst))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr) + udp


def _rate(fn: Callable[[], None], packets: int) -> float:
    fn()  # warm up caches (route cache, templates)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = max(best, packets / dt)
    return best


def run(total: int, batch: int, size: int) -> list[tuple[str, float, float]]:
    """Return [(variant, encap pkt/s, decap pkt/s)] plus the copy floor as the first row."""
    pkts = [_packet(i, size) for i in range(batch)]
    rounds = max(1, total // batch)
    sink: list[bytearray] = []

    def floor() -> None:
        for _ in range(rounds):
            sink.clear()
            for p in pkts:
                sink.append(bytearray(p))

    results = [("copy floor", _rate(floor, rounds * batch), 0.0)]
    for name, extra in VARIANTS:
        enc_rate, dec_rate = _measure(name, extra, pkts, rounds)
        results.append((name, enc_rate, dec_rate))
    for name, mode, extra in SECURE_VARIANTS:
        enc_rate, dec_rate = _measure_secure(name, mode, extra, pkts, rounds)
        results.append((name, enc_rate, dec_rate))
    return results


def _secure_pair(mode: str, extra: str, tmp: str) -> tuple[Bridge, Bridge]:
    """Two Bridges with a `mode` peer each, their handshake done."""
    pubs = {s: write_private_key(os.path.join(tmp, s)) for s in "ab"}
    br = {}
    for s, n, m, prefix in (("a", 1, 2, "198.18.20.0/24"), ("b", 2, 1, "198.18.10.0/24")):
        keys = (f'security = "{mode}"\nprivate_key_file = "{os.path.join(tmp, s)}"\n'
                f'public_key = "{pubs["b" if s == "a" else "a"]}"')
        text = SITE.format(side=s, n=n, m=m, prefix=prefix, extra=extra + "\n" + keys)
        br[s] = Bridge(loads_config(text.replace(":4754", "")), 0.0, wall_offset=1.8e9)
    moving = {"a": Output(), "b": Output()}
    for s in "ab":
        br[s].handle_timer(0.0, moving[s])
    for _ in range(10):
        nxt = {"a": Output(), "b": Output()}
        for s, o in moving.items():
            to = "b" if s == "a" else "a"
            dgs = [(d, (f"198.18.0.{1 if s == 'a' else 2}", 24754))
                   for items in o.secure.values() for d in items]
            if dgs:
                br[to].from_secure(dgs, 0.0, nxt[to])
        moving = nxt
    return br["a"], br["b"]


def _measure_secure(name: str, mode: str, extra: str, pkts: list[bytes], rounds: int
                    ) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _secure_pair(mode, extra, tmp)
    out = Output()
    n = rounds * len(pkts)

    def encap() -> None:
        for _ in range(rounds):
            out.clear()
            a.from_tun(pkts, 1.0, out)

    enc_rate = _rate(encap, n)
    dec_rate = 0.0
    out_b = Output()
    for run in range(4):  # fresh datagrams each run: the replay window refuses old ones
        batches = []
        for _ in range(rounds):
            out.clear()
            a.from_tun(pkts, 1.0, out)
            batches.append([(d, ("198.18.0.1", 24754))
                            for d in out.secure[("198.18.0.2", 24754)]])
        t0 = time.perf_counter()
        for dgrams in batches:
            out_b.clear()
            b.from_secure(dgrams, 1.0, out_b)
        if run:  # the first one warms up
            dec_rate = max(dec_rate, n / (time.perf_counter() - t0))
    secure = b.secure
    if b.counters.total_drops or secure is None or sum(secure.ep.drops.values()):
        raise RuntimeError(f"{name}: drops while decapsulating")
    return enc_rate, dec_rate


def _measure(name: str, extra: str, pkts: list[bytes], rounds: int) -> tuple[float, float]:
    a = Bridge(loads_config(SITE.format(side="a", n=1, m=2, prefix="198.18.20.0/24",
                                        extra=extra)), 0.0)
    b = Bridge(loads_config(SITE.format(side="b", n=2, m=1, prefix="198.18.10.0/24",
                                        extra=extra)), 0.0)
    out = Output()
    n = rounds * len(pkts)

    def encap() -> None:
        for _ in range(rounds):
            out.clear()
            a.from_tun(pkts, 1.0, out)

    enc_rate = _rate(encap, n)
    # One set of datagrams, replayed each run; the receiver's sequence state is reset
    # before each replay so that sequenced variants accept them again.
    batches: list[list[tuple[bytes | bytearray, tuple[str, int]]]] = []
    for _ in range(rounds):
        out.clear()
        a.from_tun(pkts, 1.0, out)
        batches.append([(d, ("198.18.0.1", 4754)) for d in out.udp[("198.18.0.2", 4754)]])
    out_b = Output()

    def decap() -> None:
        b.peers[0].seq.reset()
        for dgrams in batches:
            out_b.clear()
            b.from_udp(dgrams, 1.0, out_b)

    dec_rate = _rate(decap, n)
    if b.counters.total_drops:
        raise RuntimeError(f"{name}: {b.counters.total_drops} drops while decapsulating")
    return enc_rate, dec_rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=20_000, help="packets per measurement")
    ap.add_argument("--batch", type=int, default=64, help="packets per from_tun/from_udp call")
    ap.add_argument("--size", type=int, default=1400, help="inner packet size in bytes")
    args = ap.parse_args(argv)
    rows = run(args.packets, args.batch, args.size)
    floor = rows[0][1]
    print(f"inner IPv4/UDP packets of {args.size} bytes, batches of {args.batch}, best of 3")
    print(f"{'variant':<28} {'encap pkt/s':>12} {'Gb/s':>6} {'decap pkt/s':>12} {'Gb/s':>6}"
          f" {'floor/encap':>11} {'floor/decap':>11}")
    print(f"{'copy floor':<28} {floor:>12,.0f} {floor * args.size * 8 / 1e9:>6.2f}")
    for name, enc, dec in rows[1:]:
        print(f"{name:<28} {enc:>12,.0f} {enc * args.size * 8 / 1e9:>6.2f} {dec:>12,.0f}"
              f" {dec * args.size * 8 / 1e9:>6.2f} {floor / enc:>11.1f} {floor / dec:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

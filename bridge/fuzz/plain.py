"""The plain mode's part of the fuzz command (bridge/fuzz/modes.py): GRE-in-UDP and
IPIP-in-UDP datagrams, random and mutated, into a Bridge's receive path.

Rules (what counts as a finding in plain mode; RFC 2890 §3: the key is no authentication,
so a hostile datagram with the peer's address, key and an allowed inner source IS
delivered, and that is not a finding):
- An exception escaping `Bridge.from_udp` (nothing a peer sends raises).
- A policy violation: a packet reaching the TUN from an input whose source host is not the
  peer's, whose GRE key is not the peer's (key_in), or whose inner source is outside the
  peer's prefixes (AllowedIPs), or one reaching the TUN that is not exactly the inner packet
  the input carried; a drop that no counter records (every input ends delivered, counted
  as a keepalive or counted under one drop reason).
Legitimate datagrams are interleaved; how many of them a far-ahead forged sequence number
cost (issue 12: plain mode cannot stop it) is reported, not a finding.

`mutate` makes the hostile inputs of every mode (bridge/fuzz/modes.py uses it too):
random bytes, or a recorded datagram with bit flips, byte overwrites, truncation,
extension, a secure transport counter far ahead or anywhere, a splice of two, another
type byte, or verbatim (a replay).

Theory of operation: site A's Bridge encapsulates a few inner packets (the corpus) for
site B's Bridge, which receives one input per call; B's out.tun after each call is compared
with the input. Two configurations, each for half of the inputs: GRE with key 42 and
sequence "drop-late", and IPIP; the mutations are the secure fuzzer's.
"""

from __future__ import annotations

import ipaddress
import random
import time
import traceback
from typing import Any

from bridge.config import Config, loads_config
from bridge.pipeline import Bridge, Output
from bridge.secure.wire import TRANSPORT

__all__ = ["fuzz_plain", "mutate", "PEER_A"]

PEER_A = ("198.18.0.1", 4754)
LEGIT_EVERY = 50
SITE = """
[tun]
name = "gbfz{side}"
addresses = ["198.18.100.{n}/30"]
[listen]
address = "198.18.0.{n}"
port = 4754
[[peers]]
name = "peer"
endpoint = "198.18.0.{m}:4754"
prefixes = ["198.18.{pm}0.0/24", "2001:db8:{pm}0::/48"]
keepalive = 0
{extra}
"""
CONFIGS = ('encapsulation = "gre"\nkey = 42\nsequence = "drop-late"', 'encapsulation = "ipip"')
A_PREFIXES = (ipaddress.ip_network("198.18.10.0/24"), ipaddress.ip_network("2001:db8:10::/48"))


def mutate(rnd: random.Random, corpus: list[tuple[int, bytes]]) -> tuple[int, bytes]:
    kind = rnd.randrange(9)
    if kind == 0 or not corpus:
        return rnd.randrange(2), rnd.randbytes(rnd.randrange(0, 200 if rnd.random() < .8
                                                             else 1600))
    to, base = corpus[rnd.randrange(len(corpus))]
    d = bytearray(base)
    if kind == 1 and d:  # bit flips
        for _ in range(rnd.randrange(1, 4)):
            i = rnd.randrange(len(d) * 8)
            d[i // 8] ^= 1 << (i % 8)
    elif kind == 2 and d:  # byte overwrites
        for _ in range(rnd.randrange(1, 4)):
            d[rnd.randrange(len(d))] = rnd.randrange(256)
    elif kind == 3:  # truncation
        del d[rnd.randrange(len(d) + 1):]
    elif kind == 4:  # extension
        d += rnd.randbytes(rnd.randrange(1, 64))
    elif kind == 5 and len(d) >= TRANSPORT.size:  # counter far ahead or anywhere
        t, idx, ctr = TRANSPORT.unpack_from(d)
        TRANSPORT.pack_into(d, 0, t, idx, rnd.choice((ctr + 1, ctr + 10**6, 0,
                                                      rnd.getrandbits(64))))
    elif kind == 6:  # splice two entries
        _, other = corpus[rnd.randrange(len(corpus))]
        cut = rnd.randrange(len(d) + 1)
        d = d[:cut] + bytearray(other[cut:])
    elif kind == 7 and d:  # change the type byte
        d[0] = rnd.randrange(7)
    # kind 8 (or a no-op above): verbatim replay
    return to, bytes(d)


def _config(side: str, extra: str) -> Config:
    a = side == "a"
    return loads_config(SITE.format(side=side, n=1 if a else 2, m=2 if a else 1,
                                    pm=2 if a else 1, extra=extra))


def _inner(rnd: random.Random) -> bytes:
    """A small IPv4 or IPv6 UDP packet from site A to site B (checksums are not checked)."""
    body = rnd.randbytes(rnd.randrange(0, 64))
    if rnd.random() < 0.5:
        n = 28 + len(body)
        return (bytes([0x45, 0, n >> 8, n & 255, 0, 1, 0x40, 0, 64, 17, 0, 0,
                       198, 18, 10, rnd.randrange(1, 255), 198, 18, 20, 7])
                + bytes([0, 7, 0, 9, (8 + len(body)) >> 8, (8 + len(body)) & 255, 0, 0]) + body)
    n = 8 + len(body)
    return (bytes([0x60, 0, 0, 0, n >> 8, n & 255, 17, 64])
            + ipaddress.ip_address("2001:db8:10::5").packed
            + ipaddress.ip_address("2001:db8:20::7").packed
            + bytes([0, 7, 0, 9, n >> 8, n & 255, 0, 0]) + body)


def _allowed(pkt: bytes) -> bool:
    try:
        if pkt[0] >> 4 == 4:
            src = ipaddress.ip_address(pkt[12:16])
        else:
            src = ipaddress.ip_address(pkt[8:24])
    except (ValueError, IndexError):
        return False
    return any(src in n for n in A_PREFIXES)


def _carried(data: bytes, pkt: bytes, gre: bool) -> tuple[bool, bool]:
    """(the input carries `pkt` as its inner packet, the input has GRE key 42)."""
    if not gre:
        return data[:len(pkt)] == pkt, True
    if len(data) < 4:
        return False, False
    flags = data[0]
    off = 4 + (4 if flags & 0x80 else 0)
    key = None
    if flags & 0x20:
        key = int.from_bytes(data[off:off + 4], "big")
        off += 4
    if flags & 0x10:
        off += 4
    return data[off:off + len(pkt)] == pkt, key == 42


def fuzz_plain(inputs: int, seed: int = 0) -> dict[str, Any]:
    """Run the plain-mode fuzzer; returns a report shaped like `fuzz.fuzz`'s."""
    rnd = random.Random(seed)
    exceptions = 0
    violations: list[str] = []
    first_trace = ""
    legit_sent = legit_lost = delivered = 0
    start = time.perf_counter()
    per = max(1, inputs // len(CONFIGS))
    drops: dict[str, int] = {}
    for c, extra in enumerate(CONFIGS):
        gre = "gre" in extra
        a, b = Bridge(_config("a", extra), 0.0), Bridge(_config("b", extra), 0.0)
        now = 0.0
        corpus: list[tuple[int, bytes]] = []
        out = Output()
        for i in range(per if c < len(CONFIGS) - 1 else inputs - per * c):
            now += 0.001
            if i % LEGIT_EVERY == 0:
                oa = Output()
                a.from_tun([_inner(rnd)], now, oa)
                for d in oa.udp.get(("198.18.0.2", 4754), []):
                    legit_sent += 1
                    corpus.append((1, bytes(d)))
                    out.clear()
                    b.from_udp([(d, PEER_A)], now, out)
                    legit_lost += 0 if out.tun else 1
                del corpus[:-256]
            _, data = mutate(rnd, corpus)
            addr = PEER_A if rnd.random() < 0.8 else (
                f"198.19.{rnd.randrange(256)}.{rnd.randrange(256)}", rnd.randrange(1, 65536))
            c0 = b.counters
            before = c0.total_drops + sum(c0.rx_packets) + c0.events[3]
            out.clear()
            try:
                b.from_udp([(data, addr)], now, out)
            except Exception:
                exceptions += 1
                if not first_trace:
                    first_trace = traceback.format_exc()
                continue
            after = c0.total_drops + sum(c0.rx_packets) + c0.events[3]
            if after - before != 1:
                violations.append(f"input {i}: counted {after - before} times, not once")
            for pkt in out.tun:
                pkt = bytes(pkt)
                delivered += 1
                carried, key_ok = _carried(data, pkt, gre)
                if addr[0] != PEER_A[0]:
                    violations.append(f"input {i}: delivered from non-peer {addr[0]}")
                elif not key_ok:
                    violations.append(f"input {i}: delivered with a wrong GRE key")
                elif not _allowed(pkt):
                    violations.append(f"input {i}: delivered a spoofed inner source")
                elif not _carried_ttl_ok(data, pkt, carried):
                    violations.append(f"input {i}: delivered bytes the input did not carry")
        for k, v in b.counters.snapshot()["drops"].items():
            if v:
                drops[k] = drops.get(k, 0) + v
    secs = time.perf_counter() - start
    return {"mode": "plain", "inputs": inputs, "seconds": round(secs, 3),
            "inputs_per_s": round(inputs / secs) if secs else 0, "exceptions": exceptions,
            "violations": len(violations), "violation_examples": violations[:5],
            "legit_sent": legit_sent, "legit_lost": legit_lost, "drops": drops,
            "events": {"delivered_hostile_or_mutated": delivered},
            "first_exception": first_trace}


def _carried_ttl_ok(data: bytes, pkt: bytes, carried: bool) -> bool:
    """The delivered packet is the input's inner packet (the decapsulator changes
    nothing but a clamped MSS, which these UDP packets never have)."""
    return carried or pkt in data

"""Admission of new terminated flows: half-open caps per source prefix and in total, SYN cookies.

Rules of this module (pure, sans-I/O: keys, segments and `now` in; verdicts and segments out)
- A splice is *half-open* from the client's SYN until the client leg is ESTABLISHED (the
  client completed its three-way handshake, RFC 9293 §3.5). Half-open splices are counted in
  total and per source prefix (`prefix4` bits of an IPv4 source, default /24; `prefix6` of an
  IPv6 one, default /64: one subscriber's allocation, RFC 6177 §2): a spoofing source
  exhausts its own prefix's share first, not everyone's.
- A SYN is admitted with state while the total is below `max_half_open` and its prefix below
  `max_half_open_per_prefix` (and the endpoint below `max_splices`). Past a half-open cap it is
  answered with a SYN cookie (RFC 4987 §3.6) when `syn_cookies` is on, else refused with the
  RST of a closed port (RFC 9293 §3.10.7.1); past `max_splices` it is refused. Each outcome is
  counted by reason.
- The cookie is the ISS of a stateless SYN-ACK: 5 bits of a 64 s counter, 3 bits of an MSS
  table index, 24 bits of a keyed BLAKE2s (RFC 4987 §3.6 asks for a secret function of the
  4-tuple and counter; the key is a per-Terminator random secret) over the counter, the
  4-tuple, the client's ISN and the MSS index. The returning ACK (SEG.ACK - 1 = cookie,
  SEG.SEQ - 1 = the client's ISN) is accepted for two counter periods (64-128 s), like Linux.
  No clock is read here: `now` comes in.
- What a cookie loses (RFC 4987 §3.6): only the MSS is carried; window scaling, SACK and
  timestamps are not offered in the cookie SYN-ACK, so that leg runs without them (64 KB
  window). Cookies only appear past a half-open cap, i.e. under a flood.

Theory of operation
`admit(key, now)` says NEW, COOKIE or REFUSE for a SYN; the Terminator reports a stateful
splice with `opened(key)` and its end of half-open life with `settled(key)` (client leg
ESTABLISHED, or the splice forgotten); both are O(1). `cookie_syn_ack(syn, our_mss, now)`
builds the stateless answer; `check_cookie(ack, now)` returns the MSS of a valid cookie ACK,
or None (counted), so the Terminator can build the client leg directly in ESTABLISHED.
"""

from __future__ import annotations

import hashlib
import struct
from enum import Enum
from typing import Any

from bridge.flows import FlowKey, SpliceLimits
from stack.seq import MASK
from stack.wire.tcp import ACK, SYN, TcpSegment

__all__ = ["Admission", "Admit", "SpliceLimits", "COOKIE_MSS", "prometheus"]

# MSS values a cookie can carry (3 bits); the largest one not above what both ends allow is used
COOKIE_MSS = (536, 1200, 1220, 1360, 1400, 1440, 1452, 1460)
COOKIE_PERIOD = 64.0  # seconds per counter tick (RFC 4987 §3.6 "t")
_HDR = struct.Struct("!IIHHB")  # counter, client ISN, ports, MSS index


class Admit(Enum):
    NEW = "new"        # a stateful splice
    COOKIE = "cookie"  # a stateless SYN-ACK carrying a cookie
    REFUSE = "refuse"  # the RST of a closed port


class Admission:
    """Half-open accounting and SYN cookies of one Terminator."""

    __slots__ = ("limits", "secret", "_half", "_per_prefix", "counters", "_mask4", "_mask6",
                 "_cookie_until")

    def __init__(self, limits: SpliceLimits, secret: bytes) -> None:
        if not 1 <= len(secret) <= 32:
            raise ValueError("the cookie secret must be 1..32 bytes")
        self.limits = limits
        self.secret = secret
        self._half: dict[FlowKey, bytes] = {}     # half-open splice -> its source prefix
        self._per_prefix: dict[bytes, int] = {}
        self._mask4 = _mask(4, limits.prefix4)
        self._mask6 = _mask(16, limits.prefix6)
        self._cookie_until = float("-inf")       # cookies sent recently: ACKs are checked
        self.counters: dict[str, int] = dict.fromkeys(
            ("half_open_peak", "cookies_sent", "cookies_accepted", "cookies_bad",
             "refused_max_splices", "refused_half_open", "capped_half_open_total",
             "capped_half_open_prefix"), 0)

    @property
    def half_open(self) -> int:
        return len(self._half)

    def prefix_of(self, key: FlowKey) -> bytes:
        src = key[1]
        mask = self._mask4 if len(src) == 4 else self._mask6
        return bytes(a & b for a, b in zip(src, mask, strict=True))

    def admit(self, key: FlowKey, live: int, now: float) -> Admit:
        """The fate of a new SYN on `key` when `live` splices hold a slot."""
        lim = self.limits
        c = self.counters
        if live >= lim.max_splices:
            c["refused_max_splices"] += 1
            return Admit.REFUSE
        if len(self._half) >= lim.max_half_open:
            c["capped_half_open_total"] += 1
        elif self._per_prefix.get(self.prefix_of(key), 0) >= lim.max_half_open_per_prefix:
            c["capped_half_open_prefix"] += 1
        else:
            return Admit.NEW
        if lim.syn_cookies:
            return Admit.COOKIE
        c["refused_half_open"] += 1
        return Admit.REFUSE

    def opened(self, key: FlowKey) -> None:
        """A stateful splice on `key` is half-open."""
        if key in self._half:
            return
        p = self.prefix_of(key)
        self._half[key] = p
        self._per_prefix[p] = self._per_prefix.get(p, 0) + 1
        if len(self._half) > self.counters["half_open_peak"]:
            self.counters["half_open_peak"] = len(self._half)

    def is_half_open(self, key: FlowKey) -> bool:
        return key in self._half

    def settled(self, key: FlowKey) -> None:
        """`key` is no longer half-open (established, or gone)."""
        p = self._half.pop(key, None)
        if p is None:
            return
        left = self._per_prefix[p] - 1
        if left:
            self._per_prefix[p] = left
        else:
            del self._per_prefix[p]

    # ------------------------------------------------------------------ SYN cookies

    def _mac(self, t: int, key: FlowKey, isn: int, idx: int) -> int:
        h = hashlib.blake2s(digest_size=3, key=self.secret, person=b"syncook")
        h.update(key[1])
        h.update(key[2])
        h.update(_HDR.pack(t & MASK, isn, key[3], key[4], idx))
        return int.from_bytes(h.digest(), "big")

    def cookie_syn_ack(self, key: FlowKey, syn: TcpSegment, our_mss: int, window: int,
                       now: float) -> TcpSegment:
        """The stateless SYN-ACK answering `syn` (only MSS offered, RFC 4987 §3.6)."""
        peer = syn.mss if syn.mss else (536 if key[0] == 4 else 1220)
        limit = min(peer, our_mss)
        idx = 0
        for i, m in enumerate(COOKIE_MSS):
            if m <= limit:
                idx = i
        t = int(now // COOKIE_PERIOD)
        cookie = ((t & 0x1F) << 27) | (idx << 24) | self._mac(t, key, syn.seq, idx)
        self.counters["cookies_sent"] += 1
        self._cookie_until = now + 2 * COOKIE_PERIOD
        return TcpSegment(syn.dst_port, syn.src_port, cookie, (syn.seq + 1) & MASK, SYN | ACK,
                          min(window, 0xFFFF), b"", 0, COOKIE_MSS[idx])

    def cookies_recent(self, now: float) -> bool:
        """Cookies went out in the last two periods: bare ACKs of unknown flows are checked."""
        return now < self._cookie_until

    def check_cookie(self, key: FlowKey, ack: TcpSegment, now: float) -> int | None:
        """The MSS a valid cookie ACK on `key` carries, or None (counted as bad)."""
        cookie = (ack.ack - 1) & MASK
        isn = (ack.seq - 1) & MASK
        idx = (cookie >> 24) & 7
        t_now = int(now // COOKIE_PERIOD)
        for t in (t_now, t_now - 1):
            if (t & 0x1F) == cookie >> 27 and self._mac(t, key, isn, idx) == cookie & 0xFFFFFF:
                self.counters["cookies_accepted"] += 1
                return COOKIE_MSS[idx]
        self.counters["cookies_bad"] += 1
        return None


def _mask(nbytes: int, bits: int) -> bytes:
    v = ((1 << bits) - 1) << (nbytes * 8 - bits) if bits else 0
    return v.to_bytes(nbytes, "big")


def prometheus(status: dict[str, Any], prefix: str = "grebe_inspect") -> str:
    """Prometheus text (format 0.0.4) of a Terminator's `status()`: the live, half-open and
    TIME-WAIT gauges, and its counters, drops, admission outcomes and ended flows by reason."""
    lines = []
    for gauge, text in (("live", "Terminated flows held (splices)."),
                        ("memory", "Payload bytes all splices hold (the memory budget's measure)."),
                        ("half_open", "Splices whose client has not completed its handshake."),
                        ("time_wait", "Ended splices whose legs linger in TIME-WAIT.")):
        lines += [f"# HELP {prefix}_{gauge} {text}", f"# TYPE {prefix}_{gauge} gauge",
                  f"{prefix}_{gauge} {status.get(gauge, 0)}"]
    for name, label, src, text in (
            ("events", "event", {**status["counters"], **status["admission"]},
             "Userspace termination events (segments, splices, SYN cookies, caps)."),
            ("drops", "reason", status["drops"], "Segments or flows refused, by reason."),
            ("ended", "reason", status["ended"], "Splices forgotten, by close reason.")):
        lines += [f"# HELP {prefix}_{name}_total {text}", f"# TYPE {prefix}_{name}_total counter"]
        lines += [f'{prefix}_{name}_total{{{label}="{k}"}} {v}' for k, v in sorted(src.items())]
    return "\n".join(lines) + "\n"

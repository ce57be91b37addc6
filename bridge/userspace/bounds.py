"""Bounds of the userspace backend: half-open caps and SYN cookies, the memory budget, timers.

Rules of this module (pure, sans-I/O: keys, segments, byte counts and `now` in; verdicts,
segments and due keys out; nothing here reads a clock)
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
- What a cookie loses (RFC 4987 §3.6): only the MSS is carried; window scaling, SACK and
  timestamps are not offered in the cookie SYN-ACK, so that leg runs without them (64 KB
  window). Cookies only appear past a half-open cap, i.e. under a flood.
- Memory budget (`memory_budget`, bytes payload held by all splices: both legs' send and
  receive buffers, out-of-order bytes, the queues between the legs): back-pressure, never a
  failure. Over it, a splice reopens no receive window (Splice.allow = 0), so its peers see
  the window close as its buffers fill (RFC 9293 §3.8.6.1, never shrinking the right edge);
  below it the held-back splices share the headroom, and 1/8 below it they are all let go.
  What a peer was granted before still arrives: the total can pass the budget by the
  windows already advertised (each up to 3/4 of its rule's max_buffer, splice.py).
- Timers (`Deadlines`): one deadline per key; `set`, `earliest` and `pop_due` cost O(log n)
  per changed or due entry, never O(n) per call (the Terminator asks after every batch).
  Lazy deletion: a replaced deadline stays in the heap until it reaches the top, where it no
  longer equals the key's current one and is dropped; the heap is rebuilt from the current
  deadlines when stale entries outnumber live ones, so memory stays proportional to the keys.

Theory of operation
`Admission.admit(key, live, now)` says NEW, COOKIE or REFUSE for a SYN; the Terminator reports
a stateful splice with `opened(key)` and its end of half-open life with `settled(key)` (client
leg ESTABLISHED, or the splice forgotten); both O(1). `cookie_syn_ack` builds the stateless
answer; `check_cookie` returns the MSS of a valid cookie ACK, or None (counted), so the
Terminator can build the client leg directly in ESTABLISHED. `MemoryBudget.account(key, held,
sp)` is called at each emit of a splice with what it holds now and returns the keys to let go.
`prometheus(status)` renders the Terminator's status for the metrics endpoint.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Hashable
from enum import Enum
from typing import Any

from bridge.flows import FlowKey, SpliceLimits
from stack.seq import MASK
from stack.wire.tcp import ACK, SYN, TcpSegment

__all__ = ["Admission", "Admit", "COOKIE_MSS", "Deadlines", "MemoryBudget", "format_status",
           "prometheus"]

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


class Deadlines:
    """key -> deadline, with the earliest found in O(log n)."""

    __slots__ = ("_at", "_heap", "_tie")

    def __init__(self) -> None:
        self._at: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Any]] = []
        self._tie = 0

    def __len__(self) -> int:
        return len(self._at)

    def get(self, key: Hashable) -> float | None:
        return self._at.get(key)

    def set(self, key: Hashable, t: float | None) -> None:
        """Replace `key`'s deadline (None: remove it)."""
        at = self._at
        if t is None:
            at.pop(key, None)
            return
        if at.get(key) == t:
            return
        at[key] = t
        self._tie += 1
        heap = self._heap
        heapq.heappush(heap, (t, self._tie, key))
        if len(heap) > 2 * len(at) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(t, i, k) for i, (k, t) in enumerate(self._at.items())]
        self._tie = len(self._heap)
        heapq.heapify(self._heap)

    def earliest(self) -> float | None:
        heap, at = self._heap, self._at
        while heap:
            t, _i, key = heap[0]
            if at.get(key) == t:
                return t
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[Any]:
        """The keys whose deadline is at or before `now`, earliest first (now forgotten)."""
        heap, at = self._heap, self._at
        out: list[Any] = []
        while heap and heap[0][0] <= now:
            t, _i, key = heapq.heappop(heap)
            if at.get(key) == t:
                del at[key]
                out.append(key)
        return out


class MemoryBudget:
    """What all splices hold, and which of them the budget holds back (module docstring)."""

    __slots__ = ("budget", "total", "_held", "pressed", "events")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.total = 0
        self._held: dict[FlowKey, int] = {}
        self.pressed: set[FlowKey] = set()
        self.events = 0  # splices held back (counted once per episode)

    def account(self, key: FlowKey, held: int, sp: Any) -> list[FlowKey]:
        """`sp` (with an `allow` attribute) on `key` holds `held` bytes now: set its
        allowance; return the keys to let go (their `allow` to reset, to be stepped)."""
        self.total += held - self._held.get(key, 0)
        self._held[key] = held
        over = self.total - self.budget
        pressed = self.pressed
        if over > 0:
            if key not in pressed:
                pressed.add(key)
                self.events += 1
            sp.allow = 0
        elif pressed:
            if -over > self.budget >> 3:
                gone = list(pressed)
                pressed.clear()
                return gone
            if key in pressed:
                sp.allow = -over // len(pressed)
        return []

    def forget(self, key: FlowKey) -> None:
        self.total -= self._held.pop(key, 0)
        self.pressed.discard(key)


def _mask(nbytes: int, bits: int) -> bytes:
    v = ((1 << bits) - 1) << (nbytes * 8 - bits) if bits else 0
    return v.to_bytes(nbytes, "big")


def format_status(status: dict[str, Any]) -> str:
    """The text `grebe status` shows for a Terminator's `status()`: gauges, then the non-zero
    counters (traffic, loss recovery, ECN), admission counters, drops and ended flows."""
    def nz(d: dict[str, int]) -> str:
        items = [f"{k}={v}" for k, v in sorted(d.items()) if v]
        return ", ".join(items) if items else "none"

    return (f"inspect (userspace): live={status.get('live', 0)} "
            f"half_open={status.get('half_open', 0)} time_wait={status.get('time_wait', 0)} "
            f"memory={status.get('memory', 0)}\n"
            f"inspect counters: {nz(status.get('counters', {}))}\n"
            f"inspect admission: {nz(status.get('admission', {}))}\n"
            f"inspect drops: {nz(status.get('drops', {}))}\n"
            f"inspect ended: {nz(status.get('ended', {}))}")


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

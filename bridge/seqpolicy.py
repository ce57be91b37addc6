"""GRE sequence-number policies on receive: off, drop-late (Linux), reorder (RFC 2890 §2.2).

Rules:
- Serial-number arithmetic modulo 2**32 (RFC 1982 §3.2): `a` is after `b` when
  0 < (a - b) mod 2**32 < 2**31.
- off: sequence numbers are ignored (a packet with S is accepted like one without).
- drop-late (Linux `iseq`, net/ipv4/ip_tunnel.c ip_tunnel_rcv): a packet without S is
  dropped; the first packet is accepted whatever its number; after that a packet behind
  the expected number ((s32)(seq - expected) < 0) is dropped, gaps are accepted, and
  expected = seq + 1.
- reorder (RFC 2890 §2.2): last = 2**32 - 1 at start. seq == last + 1 is delivered at once
  (then any held successors in order). seq not after last (duplicate or late) SHOULD be
  silently discarded (counted "sequence"). seq beyond last + 1 is held, sorted; held
  packets never exceed MAX_PACKETS_HELD nor wait longer than OUTOFORDER_TIMER: when either
  limit trips the whole buffer is delivered in order, ignoring gaps, and last = the last
  delivered. A duplicate of a held packet is discarded. Packets without S are dropped
  (the receiver asked for sequencing, like Linux iseq).
- Window (grebe's, not in RFC 2890 nor Linux): a packet at most JUMP_MAX - 1 ahead of the
  expected number is in the window and follows the rules above (a gap is a loss). A packet
  further ahead, or late, is "out of the window": it never moves the window by itself.
  A receiver that has taken no packet yet (or has just resynchronised) takes the first
  whatever its number under both policies (for reorder: when out of the window; within it
  RFC 2890 §2.2 holds it), so a receiver restarted while its peer kept counting never waits.
- Resynchronisation (grebe's): out-of-window packets that follow one another (each within
  JUMP_MAX of the previous one) with no packet taken in the window meanwhile form a run;
  the run becomes the new numbering (held packets delivered first, `resyncs` counts it, the
  packet that completes the run is taken as a new start, the earlier ones were dropped):
  - a run ahead of the window, or one that resumes the numbering left at the previous
    resynchronisation, after CONFIRM packets (a loss longer than JUMP_MAX; a false jump
    undone), so it costs CONFIRM - 1 packets;
  - any other run (late numbers: a peer that restarted counts from 0 again) once it has
    lasted RESYNC_TIME seconds (two packets RESYNC_TIME apart suffice), so a restarted
    peer is heard again RESYNC_TIME after its first packet, whatever its traffic rate.
  Linux `iseq` has no such rule: a peer restarted within `dead_after` stays black-holed
  until its numbers pass the old ones, which may be never.
- Plain GRE has no authentication (RFC 2890 §3): anyone who can send from the peer's
  address with its key can inject packets, replay recorded ones, and read the numbers on
  the wire, and nothing here can prevent that; the authenticated and encrypted modes are
  the answer (docs/). What this policy does guarantee against such a sender: a forged or
  replayed packet out of the window is dropped and moves nothing, and while the real peer
  sends at least one packet per RESYNC_TIME (per CONFIRM forged packets for a forged run
  ahead) no run completes, so a trickle of forged far-ahead or late packets (the
  "injected sequence" and replay attacks of issue 12) costs no legitimate packet. Still
  possible: a forged packet inside the window (costs at most JUMP_MAX - 1 legitimate
  packets under drop-late, which drops what a jump skipped; under reorder what the
  OUTOFORDER_TIMER flush skips), and a sender that out-talks the peer (CONFIRM forged
  packets in a row ahead, or a forged late run lasting RESYNC_TIME while the peer is
  silent) moves the numbering until the peer's own packets move it back the same way.

Theory of operation: one `SeqReceiver` per peer (one key per peer, so the RFC's
per-key sequence space is per peer). `receive(seq, packet, now, deliver)` appends what may
be delivered now to `deliver` (the pipeline passes `out.tun`) and returns -1, or a drop
reason. The reorder buffer is a dict seq -> packet plus the time its oldest entry arrived;
`deadline()` is that time + OUTOFORDER_TIMER; `expire(now, deliver)` flushes when due.
Sorting happens only on a flush (at most MAX_PACKETS_HELD entries).

Runs (the GRO fast path, bridge/fastpath.py): `run_may_start(seq)` says whether a run of
packets numbered seq, seq + 1, ... would each be delivered at once by `receive` (off; drop-late
when seq is in the window; reorder when seq == last + 1 and nothing is held, or a first
packet out of the window, so that the run neither releases nor holds anything and no timer
or MAX_PACKETS_HELD limit is touched);
`run_received(last)` then leaves exactly the state those `receive` calls would have left.
`FilteredReceiver` (with [[scrub]] rules, bridge/scrub.py) runs the policy first and
filters what it delivers, so a filtered packet still takes its place in the sequence.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.config import SeqPolicy
from bridge.counters import R_SEQUENCE

__all__ = ["CONFIRM", "JUMP_MAX", "RESYNC_TIME", "FilteredReceiver", "SeqReceiver", "seq_after",
           "seq_diff"]

_MOD = 1 << 32
_MASK = _MOD - 1
_HALF = 1 << 31
JUMP_MAX = 16  # packets ahead of the expected number still in the window
CONFIRM = 3  # packets of a run ahead (or resuming the old numbering) that resynchronise
RESYNC_TIME = 1.0  # seconds a late run lasts before it resynchronises


def seq_diff(a: int, b: int) -> int:
    """Signed serial difference a - b in [-2**31, 2**31) (RFC 1982 §3.2)."""
    d = (a - b) & 0xFFFFFFFF
    return d - _MOD if d >= _HALF else d


def seq_after(a: int, b: int) -> bool:
    """True if `a` comes after `b` in serial-number order."""
    return 0 < ((a - b) & 0xFFFFFFFF) < _HALF


class SeqReceiver:
    """Receive-side sequence policy of one peer."""

    __slots__ = ("policy", "max_held", "timer", "last", "started", "held", "held_since",
                 "flushes", "resyncs", "run_n", "run_last", "run_since", "run_fast", "prev")

    def __init__(self, policy: SeqPolicy, max_held: int = 5, timer_s: float = 0.1) -> None:
        if max_held < 1 or timer_s <= 0:
            raise ValueError("max_held must be >= 1 and timer_s > 0")
        self.policy = policy
        self.max_held = max_held
        self.timer = timer_s
        self.last = 0xFFFFFFFF  # RFC 2890 §2.2: initialised to 2**32 - 1
        self.started = False  # Linux accepts the first packet whatever its seq
        self.held: dict[int, bytes | bytearray] = {}
        self.held_since = 0.0
        self.flushes = 0
        self.resyncs = 0
        # the run of out-of-window packets (resynchronisation, module docstring): its
        # length, highest number, start time, whether CONFIRM packets complete it
        self.run_n = 0
        self.run_last = 0
        self.run_since = 0.0
        self.run_fast = False
        self.prev = -1  # `last` before the latest resynchronisation (-1: none yet)

    def receive(
        self, seq: int, packet: bytes | bytearray, now: float,
        deliver: list[bytes | bytearray],
    ) -> int:
        """Apply the policy to one packet (seq = -1: no S bit). Returns -1 or R_SEQUENCE."""
        policy = self.policy
        if policy is SeqPolicy.OFF:
            deliver.append(packet)
            return -1
        if seq < 0:
            return R_SEQUENCE
        if policy is SeqPolicy.DROP_LATE:
            if self.started:
                d = (seq - self.last - 1) & _MASK  # late: >= 2**31; far ahead: >= JUMP_MAX
                if d >= JUMP_MAX and not self._out_of_window(seq, d, now, deliver):
                    return R_SEQUENCE
            self.started = True
            self.last = seq
            self.run_n = 0
            deliver.append(packet)
            return -1
        return self._reorder(seq, packet, now, deliver)

    def run_may_start(self, seq: int) -> bool:
        """May a run of consecutive sequence numbers from `seq` skip `receive`? (module doc)"""
        policy = self.policy
        if policy is SeqPolicy.OFF:
            return True
        if seq < 0:
            return False  # no S bit: receive() drops it
        if policy is SeqPolicy.DROP_LATE:  # Linux iseq: not behind, and within the window
            return not self.started or (seq - self.last - 1) & _MASK < JUMP_MAX
        # RFC 2890 §2.2: exactly the next one, and no held packet a run could release
        d = (seq - self.last) & _MASK
        if not self.started:  # nothing held; out of the window: a first packet starts anew
            return d == 1 or d == 0 or d > JUMP_MAX
        return d == 1 and not self.held

    def run_received(self, last: int) -> None:
        """A run that `run_may_start` allowed, numbered consecutively up to `last`, was
        delivered: the state `receive` would have left after taking them one by one."""
        if self.policy is SeqPolicy.OFF:
            return
        self.started = True
        self.last = last
        self.run_n = 0  # a packet taken in the window ends a run of out-of-window ones

    def _out_of_window(self, seq: int, d: int, now: float,
                       deliver: list[bytes | bytearray]) -> bool:
        """Count one packet out of the window (`d`: its distance from the expected number,
        mod 2**32) into the current run, or start a new run with it. True when it completes
        the run (module docstring): held packets are delivered and the state reset, so
        that this packet starts afresh."""
        n = self.run_n
        diff = (seq - self.run_last) & _MASK
        if n and (diff <= JUMP_MAX or diff >= _MOD - JUMP_MAX):  # follows the run
            n += 1
            if 0 < diff <= JUMP_MAX:
                self.run_last = seq
        else:
            n = 1
            self.run_last = seq
            self.run_since = now
            prev = self.prev
            self.run_fast = d < _HALF or (prev >= 0 and 0 < (seq - prev) & _MASK <= JUMP_MAX)
        self.run_n = n
        if n < 2 or (n < CONFIRM if self.run_fast else now - self.run_since < RESYNC_TIME):
            return False
        self.flush(deliver)
        prev = self.last
        self.reset()
        self.prev = prev
        self.resyncs += 1
        return True

    def _reorder(
        self, seq: int, packet: bytes | bytearray, now: float,
        deliver: list[bytes | bytearray],
    ) -> int:
        d = (seq - self.last) & _MASK
        if d == 0 or d > JUMP_MAX:  # RFC 2890 §2.2: not after last -> silently discard
            if self.started and not self._out_of_window(seq, (d - 1) & _MASK, now, deliver):
                return R_SEQUENCE  # (or far ahead: out of the window)
            self.last = (seq - 1) & _MASK  # a new start (or the first packet)
            d = 1
        self.started = True
        self.run_n = 0
        held = self.held
        if d == 1:
            deliver.append(packet)
            self.last = seq
            nxt = (seq + 1) & _MASK
            while nxt in held:  # the gap closed: release held successors in order
                deliver.append(held.pop(nxt))
                self.last = nxt
                nxt = (nxt + 1) & _MASK
            # Packets still held keep held_since: the oldest remaining one arrived no earlier,
            # so the deadline can only be early, never late (RFC 2890 §2.2 bounds the wait).
            return -1
        if seq in held:
            return R_SEQUENCE  # duplicate of a held packet
        if not held:
            self.held_since = now
        held[seq] = packet
        if len(held) > self.max_held:  # RFC 2890 §2.2: MAX_PACKETS_HELD tripped
            self.flush(deliver)
        return -1

    def reset(self) -> None:
        """Forget all state, as at tunnel establishment (held packets are discarded)."""
        self.last = 0xFFFFFFFF
        self.started = False
        self.run_n = 0
        self.held.clear()

    def flush(self, deliver: list[bytes | bytearray]) -> int:
        """Deliver every held packet in serial order, ignoring gaps. Returns how many."""
        held = self.held
        if not held:
            return 0
        base = self.last
        order = sorted(held, key=lambda s: (s - base) & 0xFFFFFFFF)
        for s in order:
            deliver.append(held[s])
        self.last = order[-1]
        held.clear()
        self.flushes += 1
        return len(order)

    def deadline(self) -> float | None:
        """When the oldest held packet reaches OUTOFORDER_TIMER, or None if none is held."""
        return self.held_since + self.timer if self.held else None

    def expire(self, now: float, deliver: list[bytes | bytearray]) -> int:
        """Flush if the OUTOFORDER_TIMER of the oldest held packet ran out. Returns count."""
        if self.held and now >= self.held_since + self.timer:
            return self.flush(deliver)
        return 0


class FilteredReceiver(SeqReceiver):
    """A sequence receiver whose deliveries pass `keep(packet, now)` first (the inbound
    [[scrub]] rules, bridge/scrub.py): the policy runs unchanged on every packet, so a
    packet the filter drops has still taken its place in the sequence (nothing after it
    looks late or far ahead); what the policy delivers, this packet or packets it
    releases, is then filtered into the caller's list, in order."""

    __slots__ = ("keep", "tmp")

    def __init__(self, base: SeqReceiver,
                 keep: Callable[[bytes | bytearray, float], bool]) -> None:
        super().__init__(base.policy, base.max_held, base.timer)
        carry(base, self)  # a reload that adds rules keeps the peer's sequence state
        self.keep = keep
        self.tmp: list[bytes | bytearray] = []

    def _pass(self, now: float, deliver: list[bytes | bytearray]) -> None:
        keep = self.keep
        for pkt in self.tmp:
            if keep(pkt, now):
                deliver.append(pkt)
        self.tmp.clear()

    def receive(self, seq: int, packet: bytes | bytearray, now: float,
                deliver: list[bytes | bytearray]) -> int:
        reason = super().receive(seq, packet, now, self.tmp)
        self._pass(now, deliver)
        return reason

    def expire(self, now: float, deliver: list[bytes | bytearray]) -> int:
        n = super().expire(now, self.tmp)
        self._pass(now, deliver)
        return n


def carry(src: SeqReceiver, dst: SeqReceiver) -> None:
    """Copy `src`'s sequence state into `dst` (same policy), so that wrapping a running
    receiver in a filter, or unwrapping it, loses no sequence number (RFC 2890 §2.2)."""
    for name in SeqReceiver.__slots__:
        setattr(dst, name, getattr(src, name))


def filtered(rx: SeqReceiver, keep: Callable[[bytes | bytearray, float], bool] | None
             ) -> SeqReceiver:
    """`rx` with its deliveries passing `keep` (None: no filter), its state carried over."""
    if keep is None:
        if type(rx) is SeqReceiver:
            return rx
        plain = SeqReceiver(rx.policy, rx.max_held, rx.timer)
        carry(rx, plain)
        return plain
    return FilteredReceiver(rx, keep)

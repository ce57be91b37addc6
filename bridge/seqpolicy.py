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
- Resynchronisation (grebe's, not in RFC 2890 nor Linux): after RESYNC_AFTER consecutive
  packets that are all "late", the sender has restarted its numbering (a restarted peer
  starts at 0 again); the packet is accepted as a new start (held packets are delivered
  first) and `resyncs` counts it. Without this a peer restarted within `dead_after` stays
  black-holed until its numbers pass the old ones, which may be never (Linux `iseq` has
  exactly that failure). Stray late duplicates or reordered packets never come 32 in a row
  without an accepted one between them; a replayed burst shorter than RESYNC_AFTER is still
  dropped whole (GRE has no authentication, so this is tidiness, not security).

Theory of operation: one `SeqReceiver` per peer (one key per peer, so the RFC's
per-key sequence space is per peer). `receive(seq, packet, now, deliver)` appends what may
be delivered now to `deliver` (the pipeline passes `out.tun`) and returns -1, or a drop
reason. The reorder buffer is a dict seq -> packet plus the time its oldest entry arrived;
`deadline()` is that time + OUTOFORDER_TIMER; `expire(now, deliver)` flushes when due.
Sorting happens only on a flush (at most MAX_PACKETS_HELD entries).

Runs (the GRO fast path, bridge/fastpath.py): `run_may_start(seq)` says whether a run of
packets numbered seq, seq + 1, ... would each be delivered at once by `receive` (off; drop-late
when seq is not late; reorder when seq == last + 1 and nothing is held, so that the run neither
releases nor holds anything and no timer or MAX_PACKETS_HELD limit is touched);
`run_received(last)` then leaves exactly the state those `receive` calls would have left.
"""

from __future__ import annotations

from bridge.config import SeqPolicy
from bridge.counters import R_SEQUENCE

__all__ = ["SeqReceiver", "seq_after", "seq_diff"]

_MOD = 1 << 32
_HALF = 1 << 31
RESYNC_AFTER = 32


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
                 "flushes", "late_run", "resyncs")

    def __init__(self, policy: SeqPolicy, max_held: int = 5, timer_s: float = 0.1) -> None:
        if max_held < 1 or timer_s <= 0:
            raise ValueError("max_held must be >= 1 and timer_s > 0")
        self.policy = policy
        self.max_held = max_held
        self.timer = timer_s
        self.last = 0xFFFFFFFF  # RFC 2890 §2.2: initialised to 2**32 - 1
        self.started = False  # drop-late: Linux accepts the first packet whatever its seq
        self.held: dict[int, bytes | bytearray] = {}
        self.held_since = 0.0
        self.flushes = 0
        self.late_run = 0  # consecutive late packets (resynchronisation, module docstring)
        self.resyncs = 0

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
            if self.started and seq_diff(seq, (self.last + 1) & 0xFFFFFFFF) < 0:
                if not self._resync(deliver):
                    return R_SEQUENCE
            self.started = True
            self.last = seq
            self.late_run = 0
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
        if policy is SeqPolicy.DROP_LATE:  # Linux iseq: not behind the expected number
            return not self.started or seq_diff(seq, (self.last + 1) & 0xFFFFFFFF) >= 0
        # RFC 2890 §2.2: exactly the next one, and no held packet a run could release
        return not self.held and seq == (self.last + 1) & 0xFFFFFFFF

    def run_received(self, last: int) -> None:
        """A run that `run_may_start` allowed, numbered consecutively up to `last`, was
        delivered: the state `receive` would have left after taking them one by one."""
        policy = self.policy
        if policy is SeqPolicy.OFF:
            return
        if policy is SeqPolicy.DROP_LATE:
            self.started = True
        self.last = last
        self.late_run = 0  # an accepted packet ends a run of late ones (resynchronisation)

    def _resync(self, deliver: list[bytes | bytearray]) -> bool:
        """Count one late packet; True when it is the RESYNC_AFTER-th in a row: the state
        is then reset (held packets delivered first) so that this packet starts afresh."""
        self.late_run += 1
        if self.late_run < RESYNC_AFTER:
            return False
        self.flush(deliver)
        self.reset()
        self.resyncs += 1
        return True

    def _reorder(
        self, seq: int, packet: bytes | bytearray, now: float,
        deliver: list[bytes | bytearray],
    ) -> int:
        d = (seq - self.last) & 0xFFFFFFFF
        if d == 0 or d >= _HALF:  # RFC 2890 §2.2: not after last -> silently discard
            if not self._resync(deliver):
                return R_SEQUENCE
            self.last = (seq - 1) & 0xFFFFFFFF
            d = 1
        self.late_run = 0
        held = self.held
        if d == 1:
            deliver.append(packet)
            self.last = seq
            nxt = (seq + 1) & 0xFFFFFFFF
            while nxt in held:  # the gap closed: release held successors in order
                deliver.append(held.pop(nxt))
                self.last = nxt
                nxt = (nxt + 1) & 0xFFFFFFFF
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
        self.late_run = 0
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

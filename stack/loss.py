"""Loss detection: the SACK scoreboard (RFC 6675) and the retransmission timeout (RFC 6298).

Rules:
- RFC 6298 §2.1: until a first RTT sample, RTO = 1 s (`initial`). §2.2: first sample R:
  SRTT = R, RTTVAR = R/2, RTO = SRTT + max(G, K*RTTVAR), K = 4. §2.3: later samples:
  RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|, then SRTT = 7/8 SRTT + 1/8 R (RTTVAR first).
- RFC 6298 §2.4: RTO below 1 s SHOULD be rounded up to 1 s (`minimum`, configurable);
  §2.5: a maximum of at least 60 s MAY be imposed (`maximum`).
- Linux instead keeps RTTVAR at or above TCP_RTO_MIN (200 ms): RTO = SRTT + max(4*RTTVAR,
  rto_min), a margin on top of the RTT rather than a floor on the sum (`var_min`, 0: off).
  A peer's delayed ACK (up to 200 ms: Linux, Windows) a LAN RTT away then never races the
  timer, where a floor on the sum fires at exactly 200 ms and turns every lone small write
  into a spurious timeout (cwnd 1 SMSS, ssthresh halved).
- RFC 6298 §3 / RFC 9293 MUST-18 (Karn): no RTT sample from a retransmitted segment; the
  Sender enforces it by timing one segment at a time and forgetting the timing on a
  retransmission, unless timestamps disambiguate (RFC 7323 §4, RTTM).
- RFC 6298 §5.5 / RFC 9293 MUST-19: on expiry the RTO doubles (`backoff`), up to the
  maximum. Only a new RTT sample ends the backoff (`sample`; the note after RFC 6298 §5:
  the RTO "collapses" back once a measurement is taken, which Karn's rule allows only for
  a segment not retransmitted); an ACK of new data alone keeps the doubled RTO.
- RFC 6298 §5.7: if the SYN timed out and RTO < 3 s, RTO is reset to 3 s when data transfer
  begins (`syn_timed_out`).
- RFC 2018 §5 / §8: the SACK blocks of an ACK are recorded as SACKed ranges above SND.UNA
  (at most 4 per ACK, at most 32 ranges kept); they are forgotten as the cumulative ACK
  passes them, and all at once when the receiver reneges (§8: a cumulative ACK that stops
  at a SACKed octet; Linux tcp_check_sack_reneging). SACKed data stays in the send buffer
  until cumulatively acknowledged.
- After a retransmission timeout the SACKed ranges are kept and the resending skips them
  (`skip`). RFC 2018 §8 says a sender SHOULD expunge them then; RFC 6675 §5.1 leaves that
  rule as it is, notes that SACK information may be kept across a timeout where robust
  reneging tests exist, and has the sender use the SACK information of the ACKs after the
  RTO; Linux keeps its scoreboard unless it sees reneging, and so do we (with its test).
- RFC 6675 §4 IsLost(SeqNum): an octet not yet SACKed is lost when more than
  (DupThresh - 1) * SMSS bytes above it are SACKed (the byte form of "DupThresh
  discontiguous SACKed sequences"), DupThresh = 3.
- RFC 6675 §4 SetPipe(): pipe counts every unSACKed octet in [SND.UNA, HighData) that is
  not lost (still in the network) plus every unSACKed octet retransmitted (below HighRxt),
  so a retransmitted octet that is not yet lost counts twice, as the RFC says.
- RFC 6675 §4 NextSeg(): rule 1, the first unSACKed octet at or above HighRxt that is
  lost; rule 2, new data; rule 3, the first unSACKed octet at or above HighRxt below the
  highest SACKed octet; rule 4, the rescue retransmission (`rescue`): once per recovery,
  when rules 1-3 give nothing, the segment ending at the highest unSACKed octet, so that a
  loss at the tail with no new data to send does not wait for the RTO; it moves
  RescueRxt to the recovery point and never HighRxt.
- RFC 6675 §5 step 4: entering recovery sets HighRxt = SND.UNA (and RescueRxt undefined);
  every retransmission moves HighRxt past what it resent (`high_rxt`).
- RFC 6675 §2 (DupAck) and §5: with SACK, an ACK that SACKs new data is a duplicate
  acknowledgment whatever its window and even if it also acknowledges new data
  cumulatively (`update` returns the bytes newly SACKed), and IsLost(HighACK + 1)
  (`is_lost`) starts recovery before DupThresh duplicates (§5 step 2).

Theory of operation: a connection's Sender (stack/send.py) owns one RtoEstimator and one
Scoreboard. The estimator holds numbers only; the Sender keeps the deadline. The Sender
tells the scoreboard what the peer reported (`update`, `acked`, `forget`) and asks it what
to resend (`next_seg`, `pipe_now`). The scoreboard is a sorted list of disjoint SACKed
[start, end) ranges in absolute positions (stack/seq.py). Because "bytes SACKed above an
octet" only shrinks as the octet moves up, IsLost splits the space at one position, the
lost edge: unSACKed octets below it are lost, those above are in flight. The functions
below the class are pure and walk at most the 32 ranges kept. Whether a duplicate ACK
starts recovery is congestion control's call (stack/congestion.py); a time-based loss
detector (RACK-TLP, RFC 8985) would live here beside IsLost and the RTO, and answer
`next_seg` the same way: `Rack` below does, by setting the scoreboard's lost edge.

RACK (RFC 8985, `Rack`): time-based loss detection. Rules:
- §6.1-6.2: RACK.xmit_ts is the send time of the most recently sent segment the peer
  delivered (ACKed or SACKed); a segment sent RACK.reo_wnd or more before it, and still
  not delivered, is lost. Original transmissions are sent in sequence order, so the lost
  ones form a prefix: the scoreboard's lost edge is the end of the last one (`edge`);
  unSACKed octets below it are lost (RFC 6675's pipe and NextSeg then work unchanged).
- §6.2 step 2: reordering is seen when a segment never retransmitted is delivered below
  RACK.fack (the highest position delivered), or a D-SACK arrives (RFC 2883).
- §6.2 step 4: RACK.reo_wnd = 0 while no reordering was seen and either recovery is on
  or DupThresh segments are SACKed (RACK then acts like RFC 6675's IsLost); otherwise
  min(reo_wnd_mult * min_RTT / 4, SRTT). Each D-SACK (at most once per round trip)
  raises reo_wnd_mult, up to 16, so a path that reorders by more than a quarter RTT stops
  causing spurious fast retransmits. Each such round sets RACK.reo_wnd_persist = 16; each
  recovery that ends decrements it, and at 0 reo_wnd_mult is back to 1 (§6.2 step 4,
  `recovery_over`; Linux TCP_RACK_RECOVERY_THRESH): a path that stopped reordering gets
  its quick loss detection back after 16 recoveries without a D-SACK.
- With RACK on, three duplicate ACKs alone do not start recovery (RFC 8985 §3.4): only a
  lost segment does (stack/congestion.py `rack`).
- §6.3: the reordering timer (`deadline`, `timeout`) marks segments lost when no more
  ACKs come: send time + RACK.rtt + reo_wnd.
- Retransmissions are logged with their send time (`retransmitted`): a delivered one moves
  RACK.xmit_ts unless it came back faster than min_RTT (then the original arrived,
  §6.2 step 1); one sent reo_wnd before RACK.xmit_ts and still undelivered is lost again
  (`relost`) and resent without waiting for the RTO.
"""

from __future__ import annotations

from bisect import bisect_right

from stack.seq import MASK

__all__ = ["DUPTHRESH", "Rack", "RtoEstimator", "Scoreboard", "sacked_between", "lost_edge",
           "pipe", "next_hole"]

DUPTHRESH = 3
MAX_RANGES = 32

Ranges = list[tuple[int, int]]


class Scoreboard:
    """SACKed ranges above SND.UNA and HighRxt, in absolute positions."""

    __slots__ = ("sacked", "high_rxt", "rescue_rxt", "rack")

    def __init__(self) -> None:
        self.rack: int | None = None  # RACK's lost edge; None: RFC 6675 IsLost decides
        self.sacked: Ranges = []
        self.high_rxt = 0  # RFC 6675 HighRxt: one past the last octet retransmitted
        self.rescue_rxt: int | None = None  # RFC 6675 RescueRxt (None: undefined)

    def update(self, blocks: tuple[tuple[int, int], ...], una: int, top: int, iss: int) -> int:
        """Record the SACK blocks of one ACK (RFC 2018 §5): 32-bit edges, unwrapped against
        SND.UNA; blocks not inside (SND.UNA, SND.MAX] are ignored. Returns how many bytes
        are newly SACKed (> 0: the ACK is an RFC 6675 §2 duplicate acknowledgment)."""
        base = (iss + una) & MASK
        before = sacked_between(self.sacked, una, top)
        merged = list(self.sacked)
        for left, right in blocks[:4]:
            s = una + ((left - base) & MASK)
            e = una + ((right - base) & MASK)
            if una < s < e <= top:
                merged.append((s, e))
        merged.sort()
        out: Ranges = []
        for s, e in merged:
            if out and s <= out[-1][1]:
                if e > out[-1][1]:
                    out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        self.sacked = out[:MAX_RANGES]
        return sacked_between(self.sacked, una, top) - before

    def is_lost(self, una: int, smss: int) -> bool:
        """RFC 6675 §4 IsLost(HighACK + 1): the first unacknowledged octet is lost."""
        return self.edge(una, smss) > una

    def edge(self, una: int, smss: int) -> int:
        """Below this position unSACKed octets are lost (RACK's edge, else IsLost's)."""
        r = self.rack
        if r is not None:
            return r if r > una else una
        return lost_edge(una, self.sacked, smss)

    def rescue(self, una: int, high: int, smss: int) -> int | None:
        """RFC 6675 §4 NextSeg rule (4): once per recovery (HighACK > RescueRxt or RescueRxt
        undefined), the start of the segment of up to SMSS that ends at the highest
        unSACKed octet below HighData; None when it is not allowed or nothing is unSACKed."""
        r = self.rescue_rxt
        if r is not None and una <= r:
            return None
        top = high
        for s, e in reversed(self.sacked):
            if e >= top and s < top:
                top = s  # SACKed up to HighData: the highest unSACKed octet is below
        if top <= una:
            return None
        start = max(top - smss, una)
        for _s, e in self.sacked:
            if start < e <= top:
                start = e  # stay within the unSACKed run that ends at `top`
        return start

    def acked(self, ack_abs: int) -> None:
        """The cumulative ACK moved to `ack_abs`: drop what it covers. If it stops at or
        inside a SACKed range, the receiver discarded what it SACKed (reneging, RFC 2018
        §8): forget all SACK information (Linux tcp_check_sack_reneging)."""
        sacked = self.sacked
        if sacked and sacked[0][0] <= ack_abs:
            kept = [(max(s, ack_abs), e) for s, e in sacked if e > ack_abs]
            self.sacked = [] if kept and kept[0][0] == ack_abs else kept

    def forget(self, una: int) -> None:
        """No SACK information any more (RFC 2018 §8), HighRxt back to SND.UNA."""
        self.sacked = []
        self.high_rxt = una

    def skip(self, pos: int) -> tuple[int, int | None]:
        """Resending from `pos` after an RTO: where the next unSACKed octet is (past the
        SACKed range holding `pos`, if any) and where the next SACKed range starts."""
        for s, e in self.sacked:
            if e <= pos:
                continue
            if s <= pos:
                pos = e
                continue
            return pos, s
        return pos, None

    def first_sacked_after(self, pos: int) -> int | None:
        """Start of the first SACKed range above `pos` (a retransmission stops there)."""
        for s, _e in self.sacked:
            if s > pos:
                return s
        return None

    def pipe_now(self, una: int, high: int, smss: int) -> int:
        """RFC 6675 SetPipe() for the current scoreboard."""
        return pipe(una, high, self.high_rxt, self.sacked, self.edge(una, smss))

    def next_seg(self, una: int, smss: int, rule: int) -> int | None:
        """RFC 6675 NextSeg() rule 1 (`rule` 1: a lost hole) or rule 3 (`rule` 3: any hole
        below the highest SACKed octet), at or above HighRxt; None when there is none."""
        sacked = self.sacked
        start = una if una > self.high_rxt else self.high_rxt
        if rule == 1:
            return next_hole(start, self.edge(una, smss), sacked)
        top = sacked[-1][1] if sacked else una
        return next_hole(start, top, sacked)


class Rack:
    """RFC 8985 RACK state: the send times of original transmissions and what was delivered."""

    __slots__ = ("ends", "times", "head", "fack", "xmit_ts", "reordering", "min_rtt",
                 "mult", "dsack_at", "rtt", "reo", "last_dsack", "rxt", "persist")

    def __init__(self) -> None:
        self.ends: list[int] = []  # end position of each original transmission, in order
        self.times: list[float] = []  # ... and when it was sent
        self.head = 0  # first entry not yet cumulatively acknowledged
        self.fack = 0  # RACK.fack: the highest position delivered
        self.xmit_ts = float("-inf")  # RACK.xmit_ts
        self.reordering = False  # RACK.reordering_seen
        self.min_rtt = float("inf")
        self.mult = 1  # RACK.reo_wnd_mult
        self.dsack_at = float("-inf")  # when reo_wnd_mult last grew
        self.persist = 0  # RACK.reo_wnd_persist: recoveries left before mult goes back to 1
        self.rtt = 0.0  # RACK.rtt: the RTT of the segment that set RACK.xmit_ts
        self.reo = 0.0  # the reo_wnd of the last `edge`
        self.last_dsack = float("-inf")  # when the last D-SACK arrived
        self.rxt: list[tuple[int, int, float]] = []  # retransmissions not yet delivered

    def sent(self, end: int, now: float) -> None:
        """New data up to `end` was sent for the first time at `now`."""
        self.ends.append(end)
        self.times.append(now)

    def delivered(self, una: int, top: int, high_rxt: int, rtt: float | None,
                  now: float) -> None:
        """The peer holds everything below `una` and up to `top` (the highest SACKed end,
        or `una`); `rtt` is this ACK's RTT sample. Updates RACK.fack, RACK.xmit_ts and
        reordering_seen (§6.2 steps 1-2: data delivered below RACK.fack that was not
        retransmitted, here what lies at or above HighRxt)."""
        if rtt is not None and 0 < rtt < self.min_rtt:
            self.min_rtt = rtt
        ends = self.ends
        if top > self.fack:
            self.fack = top
            i = bisect_right(ends, top - 1, self.head)
            if i < len(ends) and self.times[i] > self.xmit_ts:
                self.xmit_ts = self.times[i]
                self.rtt = now - self.xmit_ts
        elif una > high_rxt and una < self.fack:
            self.reordering = True  # a hole we did not resend filled by itself

    def acked(self, una: int) -> None:
        """The cumulative ACK reached `una`: forget the send times below it."""
        ends = self.ends
        if self.rxt and self.rxt[0][1] <= una:
            self.rxt = [r for r in self.rxt if r[1] > una]
        h = self.head
        if h < len(ends) and ends[h] <= una:  # the ends ascend: one search, not a walk
            h = bisect_right(ends, una, h)
        if h > 64 and 2 * h > len(ends):
            del ends[:h], self.times[:h]
            h = 0
        self.head = h

    def retransmitted(self, start: int, end: int, now: float) -> None:
        """[start, end) was sent again at `now` (its send time counts from now on)."""
        rxt = self.rxt
        for i, (s, _e, _t) in enumerate(rxt):
            if s == start:
                rxt[i] = (start, end, now)
                return
        if len(rxt) < 256:
            rxt.append((start, end, now))

    def rxt_delivered(self, una: int, sacked: Ranges, now: float) -> None:
        """RFC 8985 §6.2 step 1 for retransmissions: one now ACKed or SACKed, and not
        delivered faster than min_RTT (which would mean the original arrived), moves
        RACK.xmit_ts to its retransmission time."""
        keep: list[tuple[int, int, float]] = []
        for s, e, t in self.rxt:
            if e <= una or any(a <= s and e <= b for a, b in sacked):
                if now - t >= self.min_rtt - 0.001:  # (ms timestamp granularity)
                    if t > self.xmit_ts:
                        self.xmit_ts = t
                        self.rtt = now - t
            else:
                keep.append((s, e, t))
        self.rxt = keep

    def relost(self) -> int | None:
        """RFC 8985 §6.2 step 5 for retransmissions: the start of the lowest retransmission
        sent reo_wnd or more before RACK.xmit_ts and not delivered (lost again: it must be
        resent, so HighRxt goes back to it); None when there is none."""
        thr = self.xmit_ts - self.reo
        low: int | None = None
        keep: list[tuple[int, int, float]] = []
        for s, e, t in self.rxt:
            if t <= thr:
                if low is None or s < low:
                    low = s
            else:
                keep.append((s, e, t))
        self.rxt = keep
        return low

    def dsack(self, now: float, srtt: float | None) -> None:
        """A D-SACK arrived (RFC 2883): reordering seen; reo_wnd_mult grows (once per RTT)."""
        self.reordering = True
        self.last_dsack = now
        if now - self.dsack_at >= (srtt or 0.0):
            self.dsack_at = now
            self.persist = 16
            if self.mult < 16:
                self.mult += 1

    def recovery_over(self) -> None:
        """A loss recovery ended (§6.2 step 4): one fewer before reo_wnd_mult resets."""
        self.persist -= 1
        if self.persist <= 0:
            self.persist = 0
            self.mult = 1

    def edge(self, una: int, srtt: float | None, recovery: bool, sacked_segs: int) -> int:
        """RFC 8985 §6.2 step 5 as a position: original segments sent at least reo_wnd
        before RACK.xmit_ts are lost; returns the end of the last of them (>= `una`)."""
        if not self.reordering and (recovery or sacked_segs >= DUPTHRESH):
            reo = 0.0
        else:
            base = self.min_rtt if self.min_rtt < float("inf") else (srtt or 0.0)
            reo = self.mult * base / 4
            if srtt is not None and reo > srtt:
                reo = srtt
        self.reo = reo
        i = bisect_right(self.times, self.xmit_ts - reo, self.head) - 1
        if i < self.head:
            return una
        e = self.ends[i]
        if e > self.fack:
            e = self.fack
        return e if e > una else una


    def deadline(self, edge: int, now: float) -> float | None:
        """RFC 8985 §6.3 reordering timer: when the first segment at or above `edge` sent
        before RACK.xmit_ts becomes lost (its send time + RACK.rtt + reo_wnd); None: none."""
        i = bisect_right(self.ends, edge, self.head)
        if i >= len(self.ends) or self.ends[i] > self.fack or self.times[i] > self.xmit_ts:
            return None
        t = self.times[i] + self.rtt + self.reo
        return t if t > now + 0.0005 else now + 0.0005  # never again at once (rounding)

    def timeout(self, now: float) -> None:
        """The reordering timer fired: time passed counts as if a segment sent RACK.rtt
        ago had been delivered (§6.3: lost when xmit + RACK.rtt + reo_wnd <= now)."""
        t = now - self.rtt
        if t > self.xmit_ts:
            self.xmit_ts = t


def sacked_between(sacked: Ranges, a: int, b: int) -> int:
    """Bytes of [a, b) covered by the SACKed ranges."""
    n = 0
    for s, e in sacked:
        lo = s if s > a else a
        hi = e if e < b else b
        if hi > lo:
            n += hi - lo
    return n


def lost_edge(una: int, sacked: Ranges, smss: int) -> int:
    """The position below which unSACKed octets are lost (RFC 6675 §4 IsLost)."""
    need = (DUPTHRESH - 1) * smss
    acc = 0
    for s, e in reversed(sacked):
        if acc + (e - s) > need:
            return e - (need - acc)
        acc += e - s
    return una


def pipe(una: int, high: int, high_rxt: int, sacked: Ranges, edge: int) -> int:
    """RFC 6675 §4 SetPipe() in bytes: the data the sender believes is in the network."""
    lo = edge if edge > una else una
    p = (high - lo) - sacked_between(sacked, lo, high) if high > lo else 0
    rx = high_rxt if high_rxt < high else high
    if rx > una:
        p += (rx - una) - sacked_between(sacked, una, rx)
    return p


def next_hole(start: int, limit: int, sacked: Ranges) -> int | None:
    """The first unSACKed position >= `start` and < `limit`, or None."""
    pos = start
    for s, e in sacked:
        if e <= pos:
            continue
        if pos < s:
            break
        pos = e
    return pos if pos < limit else None


_ALPHA = 0.125
_BETA = 0.25
_K = 4.0


class RtoEstimator:
    """RFC 6298 estimator. `rto` is the current timeout in seconds, backoff included."""

    __slots__ = ("srtt", "rttvar", "base_rto", "backoffs", "minimum", "maximum", "granularity",
                 "var_min")

    def __init__(
        self,
        initial: float = 1.0,
        minimum: float = 1.0,
        maximum: float = 60.0,
        granularity: float = 0.001,
        var_min: float = 0.0,
    ) -> None:
        self.var_min = var_min  # Linux's rto_min: a floor on K*RTTVAR, added to SRTT
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.base_rto = initial
        self.backoffs = 0
        self.minimum = minimum
        self.maximum = maximum
        self.granularity = granularity

    @property
    def rto(self) -> float:
        """The timeout to arm now (base RTO doubled once per unanswered expiry, capped)."""
        return min(self.base_rto * (1 << self.backoffs), self.maximum)

    def sample(self, r: float) -> None:
        """Feed one RTT measurement in seconds (RFC 6298 §2.2-2.3); negative ones are ignored."""
        if r < 0:
            return
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - r)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * r
        rto = self.srtt + max(self.granularity, _K * self.rttvar, self.var_min)
        self.base_rto = min(max(rto, self.minimum), self.maximum)
        self.backoffs = 0

    def backoff(self) -> None:
        """The timer expired: double the RTO (RFC 6298 §5.5), up to the maximum."""
        if self.base_rto * (1 << self.backoffs) < self.maximum:
            self.backoffs += 1

    def syn_timed_out(self) -> None:
        """RFC 6298 §5.7: the SYN was retransmitted and no sample exists: use 3 s."""
        if self.srtt is None:
            self.base_rto = max(self.base_rto, 3.0)
            self.backoffs = 0

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
`next_seg` the same way.
"""

from __future__ import annotations

from stack.seq import MASK

__all__ = ["DUPTHRESH", "RtoEstimator", "Scoreboard", "sacked_between", "lost_edge", "pipe",
           "next_hole"]

DUPTHRESH = 3
MAX_RANGES = 32

Ranges = list[tuple[int, int]]


class Scoreboard:
    """SACKed ranges above SND.UNA and HighRxt, in absolute positions."""

    __slots__ = ("sacked", "high_rxt", "rescue_rxt")

    def __init__(self) -> None:
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
        return lost_edge(una, self.sacked, smss) > una

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
        sacked = self.sacked
        return pipe(una, high, self.high_rxt, sacked, lost_edge(una, sacked, smss))

    def next_seg(self, una: int, smss: int, rule: int) -> int | None:
        """RFC 6675 NextSeg() rule 1 (`rule` 1: a lost hole) or rule 3 (`rule` 3: any hole
        below the highest SACKed octet), at or above HighRxt; None when there is none."""
        sacked = self.sacked
        start = una if una > self.high_rxt else self.high_rxt
        if rule == 1:
            return next_hole(start, lost_edge(una, sacked, smss), sacked)
        top = sacked[-1][1] if sacked else una
        return next_hole(start, top, sacked)


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

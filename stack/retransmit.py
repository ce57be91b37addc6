"""Retransmission half of the Sender: timeouts, fast retransmit, SACK recovery, probes, PMTU.

Rules:
- RFC 6298 §5.4-5.6: on expiry of the retransmission timer the earliest unacknowledged
  segment is sent again, the RTO doubles; RFC 5681 §3.1: cwnd = 1 SMSS. SACK information
  is kept (RFC 6675 §5.1, stack/loss.py) and the resending skips SACKed data.
- R2 (`max_retries`, `syn_retries`, MUST-20..23): `expire` reports when to give up.
  MUST-37: while the window is zero the probing goes on without counting toward R2.
- Without timestamps, F-RTO (RFC 5682 §2): after the timeout's retransmission is
  acknowledged (not all of the flight), new data goes out instead of the rest of the
  flight; an ACK of new data next means the timeout was spurious (RFC 4015 response), a
  duplicate ACK means a real loss and the flight is resent in slow start.
- Spurious timeouts (RFC 3522 Eifel detection with timestamps, RFC 4015 response): when
  the first ACK of new data after one expiry echoes a TSval older than the
  retransmission's, the original transmission arrived: ssthresh and cwnd are restored
  and sending resumes at SND.MAX (`after_timeout`; counted in `spurious_rtos`).
- Spurious fast recoveries are undone (`RecoveryUndo`; Linux tcp_try_undo_recovery and
  tcp_try_undo_dsack). Entering recovery keeps cwnd and ssthresh as they were, the range
  [SND.UNA, SND.MAX) it covers, and counts its retransmissions. Two proofs that none was
  needed, as for a timeout: RFC 3522 §3.2 Eifel detection, which the RFC defines for fast
  retransmits as well as timeouts: the ACK that ends the recovery echoes a TSval older
  than the first retransmission's, so an original segment (delayed, not lost) completed
  the window (`recovery_ended`); or RFC 3708 §3 / RFC 2883 §4: every retransmission came
  back as a D-SACK, each a duplicate (`dsack_undo`, also after the recovery ended). The
  response is RFC 4015 §3's to a spurious timeout, less the resend: ssthresh and cwnd
  back to at least what they were before the recovery; the recovery ends; a CWR owed for
  it is withdrawn (Linux tcp_ecn_withdraw_cwr) and the ECN window mark goes back. On a
  reordering path (issue 11's profile: 3 % of packets up to 4 ms late over a 4 ms RTT)
  RACK's window starts at min_RTT/4 and a late segment costs a reduction until D-SACKs
  widen it; with the undo it costs a retransmission only. A timeout ends the record
  (its own Eifel undo decides then).
- RFC 6675 §5: on entering recovery retransmit SND.UNA's segment, then while
  cwnd - pipe >= SMSS send what NextSeg() names: lost holes, new data, other holes, then
  once the rescue retransmission (`sack_recovery`).
- A retransmission (`retransmit_at`) is at most one wire segment: SMSS less the SACK
  option bytes it carries (RFC 9293 §3.7.1, RFC 6691), stopping at the next SACKed range;
  it is not timed (Karn, MUST-18) and moves HighRxt.
- Persist timer (RFC 9293 §3.8.6.1, MUST-35/36): nothing can be sent and nothing is in
  flight with a zero (or too small) window: probe after max(RTO, 200 ms), backing off.
- RFC 1191 §6.3 / RFC 8201 §5.2 (`path_mtu`): a smaller MSS resends what is in flight.
- RFC 3168 §6.1.2 (`ecn_echo`): an acceptable ACK with ECE on an ECN connection reduces
  cwnd as a loss does (stack/congestion.py `on_ecn`: no retransmission, no recovery), at
  most once per window of data: not again until SND.UNA passed `ecn_high`, SND.MAX at
  the reduction; during loss recovery, which already reduced, only CWR is owed. Either
  way the next new data segment carries CWR (`cwr_pending`), so the peer stops echoing.
- RFC 3168 §6.1.2 (`loss_reduced`): a loss reduction (entering fast recovery, by
  duplicate ACKs, IsLost or RACK; an RTO expiry; a loss a TLP repaired) is also the
  window's one reduction on an ECN connection: `ecn_high` = SND.MAX, so that an ECE for
  data sent before it (the same congestion) does not cut cwnd again once recovery ended,
  and CWR is owed, as it is after a reduction for ECE ("the TCP sender [...] reduces its
  congestion window [...] sets the CWR bit" whatever the indication; Linux tcp_enter_cwr
  and tcp_init_cwnd_reduction queue CWR for a loss as well).

Theory of operation: `Retransmitter` is the base class of stack/send.py's `Sender`: the
methods here run when something went wrong (a timer fired, the peer reported a hole, the
path shrank), those in send.py on the common path (sending new data, taking ACKs). It
holds no state of its own; the Sender's slots are declared there and only annotated here
for the type checker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stack.buffers import SendBuffer
from stack.congestion import CongestionControl, initial_window
from stack.loss import Rack, RtoEstimator, Scoreboard
from stack.seq import HALF, MASK, ts_clock
from stack.wire.tcp import ACK, FIN, PSH, TcpSegment

__all__ = ["Retransmitter", "AckFields", "RecoveryUndo"]

# The fields every segment after the SYN carries (RFC 9293 §3.1, RFC 7323 §3.2, RFC 2018
# §4): ACK number, window field, TSopt, SACK blocks; computed once per segments_to_send().
AckFields = tuple[int, int, tuple[int, int] | None, tuple[tuple[int, int], ...]]


class RecoveryUndo:
    """What undoing one fast recovery needs (Linux prior_cwnd, prior_ssthresh, undo_marker,
    high_seq, undo_retrans, retrans_stamp), kept from its start until the next one or an
    RTO."""

    __slots__ = ("cwnd", "ssthresh", "ecn_high", "start", "end", "retrans", "stamp")

    def __init__(self, cwnd: int, ssthresh: int, ecn_high: int, start: int, end: int) -> None:
        self.cwnd = cwnd  # before the reduction
        self.ssthresh = ssthresh
        self.ecn_high = ecn_high
        self.start = start  # SND.UNA at entry
        self.end = end  # SND.MAX at entry (the recovery point)
        self.retrans = -1  # retransmissions in [start, end) not D-SACKed; -1: none yet
        self.stamp: int | None = None  # our TSval when the first of them went out


class Retransmitter:
    """The Sender's loss recovery (see the module docstring); state lives in the Sender."""

    if not TYPE_CHECKING:
        __slots__ = ()

    iss: int
    una: int
    nxt: int
    max: int
    wnd: int
    wl2: int
    mss: int
    fin: int | None
    buf: SendBuffer
    ts_on: bool
    ts_off: int
    rto_at: float | None
    persist_at: float | None
    persist_backoff: int
    retx_pending: bool
    probe_pending: bool
    last_send_at: float | None
    rtt_abs: int | None
    retries: int
    rto_tsval: int | None
    undo: int | None
    spurious_rtos: int
    max_retries: int
    syn_retries: int
    retransmissions: int
    cc: CongestionControl
    board: Scoreboard
    rto: RtoEstimator
    rack: Rack
    rack_on: bool
    sack_on: bool
    early_at: float | None
    reo_at: float | None
    pto_at: float | None
    tlp_end: int | None
    tlp_retx: bool
    tlp_pending: bool
    tlp_probes: int
    tlp_at: float
    frto: int | None
    ecn: bool
    ecn_high: int
    cwr_pending: bool
    ecn_cuts: int
    rec_undo: RecoveryUndo | None
    spurious_recoveries: int

    if TYPE_CHECKING:  # the Sender's own methods (stack/send.py)
        def segment(self, pos: int, flags: int, payload: bytes | memoryview, af: AckFields
                    ) -> TcpSegment: ...
        def advance(self, new_nxt: int, now: float) -> None: ...
        def room(self, af: AckFields) -> int: ...
        def send_data(self, now: float, out: list[TcpSegment], af: AckFields,
                      budget: int = -1) -> None: ...

    def arm_persist(self, now: float) -> None:
        """Nothing can be sent and nothing is in flight: the persist timer will probe."""
        if self.nxt == self.una and self.rto_at is None and self.persist_at is None:
            delay = max(self.rto.rto, 0.2) * (1 << min(self.persist_backoff, 8))
            self.persist_at = now + min(delay, self.rto.maximum)

    def retransmit_at(self, pos: int, now: float, out: list[TcpSegment], af: AckFields
                      ) -> bool:
        """Resend one segment from `pos` (fast retransmit, RFC 5681 §3.2; NewReno partial
        ACK, RFC 6582; an RFC 6675 hole): up to SMSS, stopping at the next SACKed range,
        not timed (Karn). Moves HighRxt. Returns False if there was nothing to send."""
        if pos >= self.max:
            return False
        buf = self.buf
        off = pos - 1
        n = max(min(buf.end - off, self.room(af)), 0)
        stop = self.board.first_sacked_after(pos)
        if stop is not None:
            n = min(n, stop - pos)
        fin = self.fin is not None and pos + n == self.fin
        if n <= 0 and not fin:
            return False
        payload = buf.peek(off, n) if n > 0 else b""
        out.append(self.segment(pos, ACK | FIN if fin else ACK, payload, af))
        self.board.high_rxt = pos + n + fin
        if self.sack_on and self.rack_on:
            self.rack.retransmitted(pos, pos + n + fin, now)
        u = self.rec_undo
        if u is not None and u.start <= pos < u.end:
            u.retrans = u.retrans + 1 if u.retrans > 0 else 1
            if u.stamp is None and self.ts_on:
                u.stamp = ts_clock(now, self.ts_off)
        self.retransmissions += 1
        self.rtt_abs = None
        self.last_send_at = now
        if self.rto_at is None:
            self.rto_at = now + self.rto.rto
        return True

    def sack_recovery(self, now: float, out: list[TcpSegment], af: AckFields) -> None:
        """RFC 6675 §5: on entry retransmit SND.UNA's segment (step 4.3), then while
        cwnd - pipe >= SMSS send what NextSeg() names (step 4.4 / rule C)."""
        smss = self.mss
        board = self.board
        if self.retx_pending:
            self.retx_pending = False
            self.retransmit_at(self.una, now, out, af)
        for _ in range(1024):
            una = self.una
            if self.cc.cwnd - board.pipe_now(una, self.max, smss) < smss:
                return
            pos = board.next_seg(una, smss, 1)  # rule 1: a lost segment
            if pos is None:
                n0 = len(out)
                self.send_data(now, out, af, budget=smss)  # rule 2: new data
                if len(out) > n0:
                    continue
                pos = board.next_seg(una, smss, 3)  # rule 3: any hole
                if pos is None:
                    pos = board.rescue(una, self.max, smss)  # rule 4: rescue retransmission
                    if pos is None:
                        return
                    high_rxt = board.high_rxt
                    self.retransmit_at(pos, now, out, af)
                    board.high_rxt = high_rxt  # "HighRxt MUST NOT be updated"
                    board.rescue_rxt = self.cc.recover  # RescueRxt = RecoveryPoint
                    return
            if not self.retransmit_at(pos, now, out, af):
                return

    # ------------------------------------------------------------------ RACK-TLP timers

    def arm_early(self, now: float) -> None:
        """RFC 8985 §7.2: (re)start the probe timeout after new data was sent or
        acknowledged, while not in recovery, data is in flight and no probe is out:
        PTO = 2 SRTT, plus WCDelAckT (200 ms) when one segment is in flight, never later
        than the RTO. The early timer is the sooner of it and the reordering timer."""
        pto = None
        srtt = self.rto.srtt
        flight = self.max - self.una
        if (flight > 0 and srtt is not None and self.tlp_end is None
                and not self.cc.in_recovery and not self.retries):
            p = 2 * srtt + (0.2 if flight <= self.mss else 0.0)
            if p < 0.01:
                p = 0.01
            pto = now + p
            if self.rto_at is not None and pto >= self.rto_at:
                pto = None
        self.pto_at = pto
        r = self.reo_at
        self.early_at = pto if r is None or (pto is not None and pto < r) else r

    def early_timer(self, now: float) -> None:
        """The reordering timer (RFC 8985 §6.3: mark what became lost, start recovery)
        or the probe timeout (§7.3: send a tail loss probe at the next output) fired."""
        self.early_at = None
        board = self.board
        if self.reo_at is not None and now >= self.reo_at:
            self.reo_at = None
            rack = self.rack
            rack.timeout(now)
            if board.sacked:
                n = 0
                for a, b in board.sacked:
                    n += b - a
                edge = rack.edge(self.una, self.rto.srtt, self.cc.in_recovery, n // self.mss)
                board.rack = edge
                self.reo_at = rack.deadline(edge, now)
                if edge > self.una and not self.cc.in_recovery:
                    self.dupack(None, True)
        if self.pto_at is not None and now >= self.pto_at:
            self.pto_at = None
            if self.max > self.una and not self.cc.in_recovery and self.tlp_end is None:
                self.tlp_pending = True
                self.probe_pending = True  # output() sends probes; send_probe sees TLP
        r, p = self.reo_at, self.pto_at
        self.early_at = p if r is None or (p is not None and p < r) else r

    def tail_probe(self, now: float, out: list[TcpSegment], af: AckFields) -> None:
        """RFC 8985 §7.3: new data if the peer's window allows one segment (not cwnd),
        else the highest segment again; then TLPRxtOut and the RTO (§7.3 step 3)."""
        self.tlp_pending = False
        self.tlp_end = self.max
        n0 = len(out)
        if self.buf.end >= self.max and self.nxt == self.max:
            self.send_data(now, out, af, budget=self.room(af))
        self.tlp_retx = len(out) == n0
        if self.tlp_retx:
            room = self.room(af)
            top = self.max - (1 if self.fin is not None and self.max > self.fin else 0)
            pos = max(top - room, self.una)
            for _s, e in self.board.sacked:
                if pos < e <= top:
                    pos = e
            if not self.retransmit_at(pos, now, out, af):
                self.tlp_end = None
                return
        self.tlp_probes += 1
        self.tlp_at = now
        self.rto_at = now + self.rto.rto

    def tlp_done(self) -> None:
        """RFC 8985 §7.4: the probe's episode ended. A retransmitted probe that repaired a
        loss (no D-SACK said it was a duplicate) gets the congestion response of a loss."""
        self.tlp_end = None
        if self.tlp_retx and self.rack.last_dsack < self.tlp_at:
            cc = self.cc
            cc.ssthresh = cc.reduce(cc.cwnd)
            if cc.cwnd > cc.ssthresh:
                cc.cwnd = cc.ssthresh
            self.loss_reduced()
        self.tlp_retx = False

    def send_probe(self, now: float, out: list[TcpSegment], af: AckFields) -> None:
        """Zero-window probe (RFC 9293 §3.8.6.1, MUST-36) or SWS override: send one byte
        (or what the window allows) even though the window says no; or the tail loss
        probe (RFC 8985 §7.3) when that is what the timer asked for."""
        self.probe_pending = False
        if self.tlp_pending:
            self.tail_probe(now, out, af)
            return
        buf = self.buf
        if self.una < self.nxt:
            pos = self.una  # resend the first unacknowledged byte
            if pos - 1 < buf.end:
                out.append(self.segment(pos, ACK, buf.peek(pos - 1, 1), af))
                self.retransmissions += 1
            elif self.fin is not None:
                out.append(self.segment(pos, ACK | FIN, b"", af))
            if self.rto_at is None:
                self.rto_at = now + self.rto.rto
            return
        off = self.nxt - 1
        avail = buf.end - off
        if avail <= 0:
            return
        n = max(1, min(avail, self.wl2 + self.wnd - self.nxt, self.room(af)))
        flags = ACK | PSH if n == avail else ACK
        out.append(self.segment(self.nxt, flags, buf.peek(off, n), af))
        self.advance(self.nxt + n, now)

    def after_timeout(self, ack_abs: int, acked: int, ts: tuple[int, int] | None) -> None:
        """The first ACK of new data after a retransmission timeout (the RTO backoff ends
        only with a valid sample, RFC 6298 §5). RFC 3522 Eifel detection: when it echoes
        a TSval older than the retransmission's, it was caused by the original
        transmission and the timeout was spurious (checked after one expiry only). RFC
        4015 §3 response: ssthresh back to pipe_prev, cwnd = FlightSize + min(acked, IW),
        and SND.NXT = SND.MAX: go on with new data instead of resending the flight."""
        self.retries = 0
        undo = self.undo
        self.undo = None
        if undo is not None and not self.ts_on:
            # RFC 5682 F-RTO step 2b: without timestamps, send new data now; the next ACK
            # tells a spurious timeout (it acknowledges that) from a real one (`frto_ack`).
            if ack_abs < self.max and self.buf.end >= self.max:
                self.frto = undo
                self.nxt = self.max
                cc = self.cc  # room for up to two new segments (step 2b)
                cc.cwnd = max(cc.cwnd, self.max - ack_abs + 2 * self.mss)
            return
        rto_ts = self.rto_tsval
        if undo is None or ts is None or not ts[1] or rto_ts is None:
            return
        if (ts[1] - rto_ts) & MASK < HALF:
            return  # echoes the retransmission (or later): a real loss
        cc = self.cc
        cc.ssthresh = undo
        cc.cwnd = max(cc.cwnd, self.max - ack_abs + min(acked, initial_window(self.mss)))
        self.nxt = self.max
        self.spurious_rtos += 1

    def frto_ack(self, acked: int, ack_abs: int) -> None:
        """RFC 5682 §2 step 3, the ACK after F-RTO sent new data: one acknowledging new
        data (3b) shows the timeout spurious: the RFC 4015 response as with Eifel; a
        duplicate ACK (3a) means a real loss: resend from SND.UNA in slow start."""
        undo = self.frto
        self.frto = None
        if undo is None:
            return
        if acked:
            cc = self.cc
            cc.ssthresh = undo
            cc.cwnd = max(cc.cwnd, self.max - ack_abs + min(acked, initial_window(self.mss)))
            self.spurious_rtos += 1
        else:
            self.nxt = self.una
            self.rtt_abs = None
            self.cc.cwnd = min(self.cc.cwnd, 3 * self.mss)  # step 3a: cwnd <= 3 SMSS

    def dupack(self, ts: tuple[int, int] | None, lost: bool = False) -> None:
        """A duplicate ACK (RFC 5681 §2, or RFC 6675 §2 with SACK; `lost`: IsLost(HighACK+1)
        holds, RFC 6675 §5 step 2); congestion control decides on fast retransmit, with the
        RFC 6582 §4.2 timestamp proof that the loss is not an old one."""
        rto_ts = self.rto_tsval
        new_loss = rto_ts is not None and ts is not None and (ts[1] - rto_ts) & MASK < HALF
        cc = self.cc
        cwnd, ssthresh = cc.cwnd, cc.ssthresh
        if cc.on_dupack(self.una, self.max, self.nxt - self.una, new_loss, lost):
            self.rec_undo = RecoveryUndo(cwnd, ssthresh, self.ecn_high, self.una, self.max)
            self.retx_pending = True
            self.board.high_rxt = self.una  # HighRxt (RFC 6675 §5 step 4)
            self.board.rescue_rxt = None  # RescueRxt undefined
            self.loss_reduced()

    def recovery_ended(self, ts: tuple[int, int] | None) -> None:
        """The ACK that ended a fast recovery (RFC 6675 §5 / RFC 6582: it covers the
        recovery point): RACK's reo_wnd_persist counts it (RFC 8985 §6.2 step 4); RFC
        3522 Eifel detection with its timestamp echo, or every retransmission already
        D-SACKed (Linux tcp_try_undo_recovery)."""
        if self.sack_on and self.rack_on:
            self.rack.recovery_over()
        u = self.rec_undo
        if u is None:
            return
        if u.retrans == 0 or (u.stamp is not None and ts is not None and ts[1]
                              and 0 < (u.stamp - ts[1]) & MASK < HALF):
            self.undo_recovery(u)

    def dsack_undo(self, block: tuple[int, int], ack_abs: int) -> None:
        """A D-SACK below the cumulative ACK (RFC 2883 §4): if it reports a retransmission
        of the last recovery, that one was needless (RFC 3708 §3); when all of them were,
        the recovery was spurious (Linux tcp_check_dsack, tcp_try_undo_dsack)."""
        u = self.rec_undo
        if u is None or u.retrans <= 0:
            return
        wire_ack = (self.iss + ack_abs) & MASK
        if (wire_ack - block[1]) & MASK >= HALF:
            return  # a right edge above the ACK: not this kind of D-SACK (no 2**32 alias)
        left = ack_abs - ((wire_ack - block[0]) & MASK)
        right = ack_abs - ((wire_ack - block[1]) & MASK)
        if not u.start < right <= u.end or right <= left:
            return
        u.retrans -= min(u.retrans, -(-(right - left) // self.mss))  # segments duplicated
        if u.retrans == 0:
            self.undo_recovery(u)

    def undo_recovery(self, u: RecoveryUndo) -> None:
        """The RFC 4015 §3 response to a spurious recovery: cwnd and ssthresh back to at
        least their values before it, the recovery (if still on) over, its CWR withdrawn."""
        self.rec_undo = None
        cc = self.cc
        if cc.cwnd < u.cwnd:
            cc.cwnd = u.cwnd
        if cc.ssthresh < u.ssthresh:
            cc.ssthresh = u.ssthresh
        if cc.in_recovery:
            cc.in_recovery = False
            cc.recover = self.una  # a later loss may start a recovery of its own
        if self.ecn:
            self.cwr_pending = False
            self.ecn_high = u.ecn_high
        self.spurious_recoveries += 1

    def expire(self, now: float, handshake: bool) -> bool:
        """The retransmission timer fired (RFC 6298 §5.4-5.6). Returns True when R2 is
        exceeded and the connection must give up (MUST-20..23)."""
        if handshake:
            self.retries += 1
            if self.retries > self.syn_retries:  # MUST-22/23
                return True
            self.rto.backoff()
            self.nxt = 0  # send the SYN (or SYN-ACK) again
            self.rtt_abs = None  # Karn
            self.retransmissions += 1
            return False
        if self.max <= self.una:
            return False
        if self.wnd == 0:
            # MUST-37: the window may stay zero indefinitely; probe, never give up.
            self.rto.backoff()
            self.probe_pending = True
            return False
        self.retries += 1
        if self.retries > self.max_retries:  # MUST-20: R2
            return True
        # RFC 4015 §3 step 1: pipe_prev = max(FlightSize, ssthresh), kept to undo a
        # spurious timeout (detectable with timestamps, after the first expiry only).
        first = self.retries == 1
        # Without timestamps F-RTO (RFC 5682) decides instead, at the next ACKs.
        self.undo = max(self.max - self.una, self.cc.ssthresh) if first else None
        self.frto = None
        self.rec_undo = None  # the timeout's own undo (Eifel, F-RTO) decides from here
        self.cc.on_timeout(self.max, self.max - self.una, first)
        self.loss_reduced()
        if self.ts_on:
            self.rto_tsval = ts_clock(now, self.ts_off)
        self.rto.backoff()  # RFC 6298 §5.5
        # SACK information is kept (stack/loss.py: RFC 6675 §5.1, reneging test); resending
        # from SND.UNA skips what it covers (send_data).
        self.board.high_rxt = self.una
        self.tlp_end = None  # RFC 8985 §7: the RTO supersedes a probe
        self.pto_at = self.early_at = self.reo_at = None
        self.nxt = self.una  # RFC 6298 §5.4: go back to the earliest unACKed
        self.rtt_abs = None  # Karn (MUST-18)
        return False

    def path_mtu(self, mtu: int, v4: bool, syn_sent: bool) -> None:
        """A path MTU of `mtu` (RFC 1191 §6.3, RFC 8201 §5.2): lower the send MSS, never below
        the MUST-15 defaults less options, and send again what is in flight. A larger value
        is ignored (the peer's MSS option bounds the MSS)."""
        opts = 12 if self.ts_on else 0
        new = max(mtu - (40 if v4 else 60) - opts, (536 if v4 else 1220) - opts)
        if new >= self.mss:
            return
        self.mss = new
        self.cc.on_path_mtu(new)
        if self.nxt > self.una and not syn_sent:
            self.nxt = self.una  # retransmit with the smaller size
            self.rtt_abs = None

    def loss_reduced(self) -> None:
        """A loss reduced cwnd (RFC 3168 §6.1.2): on an ECN connection it counts as this
        window's reduction (no ECE cut until SND.UNA passes SND.MAX now) and the next new
        data segment carries CWR."""
        if self.ecn:
            self.ecn_high = self.max
            self.cwr_pending = True

    def ecn_echo(self) -> None:
        """An acceptable ACK carried ECE (RFC 3168 §6.1.2): reduce cwnd as for a loss, once
        per window of data (not until SND.UNA passed `ecn_high`, the SND.MAX of the last
        reduction), and set CWR on the next new data segment. Loss recovery already
        reduced for this window: only the CWR then, so that the peer stops echoing."""
        if not self.ecn:
            return
        # ECE is congestion: a reduction it confirms is never undone (Linux: FLAG_ECE clears
        # prior_ssthresh, tcp_enter_cwr its undo_marker), whatever D-SACKs or TSecr say later.
        self.rec_undo = None
        self.undo = None
        if self.una <= self.ecn_high:
            return
        self.ecn_high = self.max
        self.cwr_pending = True
        cc = self.cc
        if cc.in_recovery:
            return
        cc.on_ecn(self.max - self.una)
        self.ecn_cuts += 1

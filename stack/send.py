"""Sender: the send side of one connection (SND.*, data segments, retransmission, RTO).

Rules:
- RFC 9293 §3.3.1: SND.UNA, SND.NXT, SND.WND, SND.WL1, SND.WL2, ISS as absolute positions
  (stack/seq.py): our SYN is 0, our first data byte 1, our FIN 1 + stream length (`fin`);
  `max` is the highest position sent (HighData). SND.WND follows the SND.WL1/WL2 rule
  (§3.10.7.4 fifth step) and is never assumed to shrink safely (MUST-34).
- Flow and congestion control: nothing beyond SND.WL2 + SND.WND (RFC 9293 §3.8.6) or
  SND.UNA + cwnd (RFC 5681 §3.1; + 2 SMSS of RFC 3042 limited transmit) is sent, except a
  fast retransmission (RFC 5681 §3.2) and a one-byte zero-window probe (MUST-36).
- Sender SWS avoidance (§3.8.6.2.1, MUST-38): send a segment if it is full (>= SMSS), or
  if it is all the data queued and Nagle allows, or if it is at least half the largest
  window the peer ever offered; otherwise wait (for an ACK or the persist timer).
- Nagle (§3.7.4, SHLD-7, MUST-17 can be disabled): a short segment waits while data is
  unacknowledged.
- With SACK, loss recovery follows RFC 6675 §5: retransmit SND.UNA's segment on entry, then
  send while cwnd - pipe >= SMSS: lost holes first, then new data, then other holes, then
  once the rescue retransmission (NextSeg rules 1-4, stack/loss.py). A duplicate ACK is
  the RFC 6675 §2 one when the ACK carries SACK blocks (new data SACKed, any window), and
  IsLost(SND.UNA) starts recovery without DupThresh duplicates (§5 step 2); without SACK
  blocks it is RFC 5681 §2's (unchanged window) and recovery is NewReno (RFC 6582).
- Urgent data (RFC 9293 §3.8.5, MUST-31): every data segment before SND.UP (`up`) carries
  URG and SEG.UP = SND.UP - SEG.SEQ (the first non-urgent octet), capped at 0xFFFF.
- RFC 6298: the retransmission timer (`rto_at`) is started when a segment is sent and it
  is not running (§5.1), stopped when everything is acknowledged (§5.2), restarted on new
  data acknowledged (§5.3); on expiry (`expire`) the earliest unacknowledged segment is
  sent again (§5.4), the RTO doubles (§5.5); RFC 5681 §3.1: cwnd = 1 SMSS. SACK
  information is kept (RFC 6675 §5.1, stack/loss.py) and the resending skips SACKed
  data. Karn (MUST-18): a retransmitted segment is not timed; with timestamps every ACK
  echoing a TSval is a sample (RFC 7323 §4, RTTM).
- In stack/retransmit.py, with their rules: the undo of spurious timeouts and fast
  recoveries (RFC 3522, RFC 3708, RFC 4015), R2 (MUST-20..23, MUST-37), the persist timer
  (§3.8.6.1, MUST-35/36), PMTU (RFC 1191 §6.3, RFC 8201 §5.2), RACK-TLP's timers.
- RFC 5681 §4.1: after idling more than one RTO, restart from at most the initial window.
- Send-buffer growth (`send_buffer_max`, Linux tcp_sndbuf_expand): on each ACK of new
  data the buffer may grow to twice min(cwnd, the largest window offered).
- `tx_max_segment` lets one output segment carry several SMSS (a TSO/GSO super-segment
  for a TUN); its size is a whole number of SMSS, so the kernel cuts wire-sized pieces.
- ECN (RFC 3168), if negotiated (`ecn`, stack/handshake.py; `ecn_ask`: TcpConfig.ecn): our
  SYN asks with ECE and CWR (a resent one no longer, §6.1.1.1), our SYN-ACK accepts with ECE
  alone, neither ECT (§6.1.1). New data carries ECT(0) (`TcpSegment.ecn`); resent data
  (§6.1.5), window probes (§6.1.6), pure ACKs and keep-alives (§6.1.4) never do. Every
  segment has ECE while the Receiver owes an echo (§6.1.3); the first new data segment
  after a reduction for ECE has CWR (§6.1.2; the response to ECE: retransmit.py `ecn_echo`).

Theory of operation: a Sender is owned by one TcpConnection (stack/connection.py), with
parts of its own passed in at construction: a CongestionControl (stack/congestion.py), a
Scoreboard and an RtoEstimator (stack/loss.py), and the Receiver whose numbers every
segment acknowledges. `output` computes those ACK fields once per call (`AckFields`) and
appends TcpSegments whose payloads are zero-copy slices of the SendBuffer. Input calls
`on_ack` (header prediction calls `new_ack` directly) and timers call `expire`. The Sender
never changes the connection's state: `on_ack` and `expire` report, the connection acts.
The recovery half (timer expiry, fast and SACK retransmission, persist probes, PMTU) is
the base class `Retransmitter` in stack/retransmit.py; this module keeps the common path.
"""

from __future__ import annotations

from enum import Enum

from stack.buffers import SendBuffer
from stack.congestion import CongestionControl
from stack.loss import Rack, RtoEstimator, Scoreboard
from stack.receive import Receiver
from stack.retransmit import AckFields, RecoveryUndo, Retransmitter
from stack.seq import HALF, MASK, ts_clock
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, CWR, ECE, ECT0, FIN, PSH, RST, SYN, URG, TcpSegment

__all__ = ["Sender", "AckFields", "AckResult"]

_ACK_PSH = ACK | PSH
_CLOSED = State.CLOSED
_LISTEN = State.LISTEN
_SYN_SENT = State.SYN_SENT
_SYN_RECEIVED = State.SYN_RECEIVED
_SENDING = frozenset(
    {State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1, State.CLOSING, State.LAST_ACK}
)


class AckResult(Enum):
    """What the ACK field of an acceptable segment was (Sender.on_ack)."""

    OK = "processed"
    OLD = "an old duplicate: ignored, the text still counts"
    UNSENT = "beyond SND.MAX: drop, send an ACK (RFC 9293 §3.10.7.4)"
    TOO_OLD = "older than the largest window: drop, challenge ACK (RFC 5961 §5.2)"


def sack_room(blocks: tuple[tuple[int, int], ...]) -> int:
    """Option bytes of `blocks` as build_options lays them out: NOP, NOP, kind, length,
    8 bytes per block (RFC 2018 §3)."""
    return 4 + 8 * len(blocks)


class Sender(Retransmitter):
    """SND.* variables, the send buffer, what may be sent now, and retransmission."""

    __slots__ = (
        "lport", "rport", "iss", "una", "nxt", "max", "wnd", "wl1", "wl2", "max_wnd", "wscale",
        "buf", "fin", "up", "mss", "nagle", "tx_max", "ts_on", "ts_off", "sack_on", "rto_at",
        "persist_at", "persist_backoff", "retx_pending", "probe_pending", "last_send_at", "rtt_abs",
        "rtt_at", "retries", "rto_tsval", "undo", "spurious_rtos", "max_retries", "syn_retries",
        "retransmissions", "bytes_out", "ka_pending", "syn_opts", "rcv", "cc", "board", "rto",
        "rack", "rack_on", "early_at", "reo_at", "pto_at", "tlp_end", "tlp_retx", "tlp_pending",
        "tlp_probes", "tlp_at", "sndbuf_max", "frto", "ecn", "ecn_ask", "cwr_pending", "ecn_high",
        "ecn_cuts", "rec_undo", "spurious_recoveries",
    )

    def __init__(
        self,
        cfg: TcpConfig,
        ports: tuple[int, int],
        mss: int,
        ts_off: int,
        rcv: Receiver,
        cc: CongestionControl,
        board: Scoreboard,
        rto: RtoEstimator,
    ) -> None:
        self.lport, self.rport = ports
        self.iss = 0
        self.una = 0  # SND.UNA
        self.nxt = 0  # SND.NXT
        self.max = 0  # the highest position sent (HighData)
        self.wnd = 0  # SND.WND
        self.wl1 = 0  # SND.WL1
        self.wl2 = 0  # SND.WL2
        self.max_wnd = 0  # the largest window the peer offered (MUST-38)
        self.wscale = 0  # Snd.Wind.Shift (RFC 7323 §2.2)
        self.buf = SendBuffer(cfg.send_buffer)
        self.fin: int | None = None  # the position of our FIN once close() was called
        self.up = 0  # SND.UP: position of our first non-urgent octet; 0: none
        self.mss = mss  # effective send MSS (MUST-16)
        self.nagle = cfg.nagle
        self.tx_max = cfg.tx_max_segment
        self.ts_on = False
        self.ts_off = ts_off
        self.sack_on = False
        self.rto_at: float | None = None  # RFC 6298 retransmission timer
        self.persist_at: float | None = None  # zero-window probe timer (MUST-35)
        self.persist_backoff = 0
        self.retx_pending = False  # retransmit SND.UNA's segment at the next output
        self.probe_pending = False  # send a window probe at the next output
        self.last_send_at: float | None = None
        self.rtt_abs: int | None = None  # the position whose ACK ends the timed segment
        self.rtt_at = 0.0
        self.retries = 0  # consecutive expiries (R2)
        self.rto_tsval: int | None = None  # our TSval when the last RTO fired
        self.undo: int | None = None  # RFC 4015 pipe_prev, while an RTO may be undone
        self.spurious_rtos = 0  # timeouts found spurious and undone (RFC 3522, RFC 4015)
        self.rec_undo: RecoveryUndo | None = None  # to undo the last fast recovery
        self.spurious_recoveries = 0  # fast recoveries found spurious and undone
        self.max_retries = cfg.max_retries
        self.syn_retries = cfg.syn_retries
        self.retransmissions = 0
        self.bytes_out = 0
        self.ka_pending = False  # send a keep-alive probe at the next output (§3.8.4)
        # Our SYN's window and options as configured: (window, WSopt, SACK-perm, TSopt).
        self.syn_opts = (min(cfg.recv_buffer, 0xFFFF),
                         cfg.rcv_wscale if cfg.window_scaling else None, cfg.sack,
                         cfg.timestamps)
        self.early_at: float | None = None  # min(reo_at, pto_at), for stack/timers.py
        self.reo_at: float | None = None  # RFC 8985 §6.3 reordering timer
        self.pto_at: float | None = None  # RFC 8985 §7.2 probe timeout (TLP)
        self.tlp_end: int | None = None  # TLPRxtOut: SND.MAX when the probe went out
        self.tlp_retx = False  # ... and the probe was a retransmission
        self.tlp_pending = False  # send the loss probe at the next output
        self.tlp_probes = 0  # tail loss probes sent
        self.tlp_at = 0.0  # when the last one was sent
        self.frto: int | None = None  # F-RTO (RFC 5682) waits for its second ACK: pipe_prev
        self.ecn = False  # ECN negotiated (RFC 3168 §6.1.1, stack/handshake.py)
        self.ecn_ask = cfg.ecn  # ask for it in our SYN / accept a peer's request
        self.cwr_pending = False  # set CWR on the next new data segment (§6.1.2)
        self.ecn_high = 0  # SND.MAX at the last ECE reduction: once per window (§6.1.2)
        self.ecn_cuts = 0  # cwnd reductions for an ECN-Echo
        self.rack = Rack()  # RFC 8985, used while SACK is on (`rack_on`)
        self.rack_on = cfg.rack
        cc.rack = cfg.rack
        self.rcv = rcv  # whose numbers every segment acknowledges
        rcv.rtt_est = rto  # receive-buffer autotuning measures per SRTT
        self.sndbuf_max = max(cfg.send_buffer_max, cfg.send_buffer)
        self.cc = cc
        self.board = board
        self.rto = rto

    # ------------------------------------------------------------------ output

    def output(self, now: float, st: State, out: list[TcpSegment]) -> list[TcpSegment]:
        """Append to `out` (the RSTs input queued) what state `st` sends now, in order: the
        SYN or SYN-ACK, then retransmissions, probes and new data, then a keep-alive or a
        pure ACK if one is owed and no other segment carried it (MUST-58 aggregate).
        Every segment after the SYN carries ACK, RCV.NXT, the window, TSopt when
        negotiated (RFC 7323 §3.2: in every non-RST segment, TSecr = TS.Recent) and SACK
        blocks while data is held out of order (RFC 2018 §4)."""
        if st is _CLOSED or st is _LISTEN:
            return out
        rcv = self.rcv
        nxt = self.nxt
        if nxt == 0 and (st is _SYN_SENT or st is _SYN_RECEIVED):
            out.append(self.syn_segment(st is _SYN_RECEIVED, now))
            if st is _SYN_SENT:
                return out
            rcv.ack_sent()
            nxt = self.nxt
        if st is _SYN_SENT:
            return out
        n0 = len(out)
        if st in _SENDING and (
            self.buf.end >= nxt  # unsent data (data byte k is at position k + 1)
            or self.retx_pending
            or self.probe_pending
            or self.cc.in_recovery
            or (self.fin is not None and nxt <= self.fin)
        ):
            af = (
                (rcv.irs + rcv.nxt) & MASK,
                rcv.window_field(),
                (ts_clock(now, self.ts_off), rcv.ts_recent or 0) if rcv.ts_on else None,
                rcv.sack_blocks() if rcv.sack_on and (rcv.ooo or rcv.dsack) else (),
            )
            if self.sack_on and self.cc.in_recovery:
                self.sack_recovery(now, out, af)
            else:
                if self.retx_pending:
                    self.retx_pending = False
                    self.retransmit_at(self.una, now, out, af)
                if self.probe_pending:
                    self.send_probe(now, out, af)
                self.send_data(now, out, af)
                if self.sack_on and self.rack_on and self.pto_at is None and len(out) > n0:
                    self.arm_early(now)
        if self.ka_pending:
            # RFC 9293 §3.8.4: SEG.SEQ = SND.NXT - 1 makes the peer answer with an ACK.
            self.ka_pending = False
            ka = self.pure_ack(now)
            out.append(ka._replace(seq=(ka.seq - 1) & MASK))
            rcv.ack_sent()
        elif len(out) > n0:
            rcv.ack_sent()
        elif rcv.ack_now:
            out.append(self.pure_ack(now))
            rcv.ack_now = False  # rcv.ack_sent() inlined
            rcv.delack_at = None
            rcv.unacked = 0
            rcv.last_ack_sent = rcv.nxt
        return out

    def pure_ack(self, now: float) -> TcpSegment:
        """<SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK> with the window, TSopt and SACK blocks."""
        rcv = self.rcv
        return TcpSegment(
            self.lport, self.rport, (self.iss + self.nxt) & MASK,
            (rcv.irs + rcv.nxt) & MASK, ACK | ECE if rcv.ece else ACK, rcv.window_field(), b"", 0,
            None, None, False,
            ((int(now * 1000) + self.ts_off) & MASK, rcv.ts_recent or 0)
            if rcv.ts_on else None,  # ts_clock inlined
            rcv.sack_blocks() if rcv.sack_on and (rcv.ooo.nbytes or rcv.dsack) else (),
        )

    def syn_segment(self, synack: bool, now: float) -> TcpSegment:
        """Our SYN (SYN-SENT) or SYN-ACK (SYN-RECEIVED), sent or sent again (RFC 9293 §3.5):
        MSS (MUST-14), WSopt and TSopt (RFC 7323 §2.2/§3.2), SACK-permitted (RFC 2018 §2)
        as configured or as negotiated; the window of a SYN is never scaled; a resent SYN
        is not timed (Karn)."""
        rcv = self.rcv
        if self.max:
            self.retransmissions += 1
            self.rtt_abs = None  # Karn
            self.ecn_ask = self.ecn_ask and synack  # RFC 3168 §6.1.1.1: SYN again without ECN
        else:
            self.rtt_abs = 1
            self.rtt_at = now
        self.nxt = 1
        if self.max < 1:
            self.max = 1
        if self.rto_at is None:
            self.rto_at = now + self.rto.rto
        win, wscale, sack, ts = self.syn_opts
        rcv.adv = max(rcv.adv, 1 + win)
        if synack:  # RFC 3168 §6.1.1: an ECN-setup SYN-ACK has ECE and not CWR
            return TcpSegment(
                self.lport, self.rport, self.iss, (rcv.irs + 1) & MASK,
                SYN | ACK | ECE if self.ecn else SYN | ACK, win, b"",
                0, rcv.mss, rcv.wscale if rcv.ws_on else None, rcv.sack_on,
                (ts_clock(now, self.ts_off), rcv.ts_recent or 0) if rcv.ts_on else None,
            )
        return TcpSegment(  # RFC 3168 §6.1.1: an ECN-setup SYN has ECE and CWR
            self.lport, self.rport, self.iss, 0, SYN | ECE | CWR if self.ecn_ask else SYN, win,
            b"", 0, rcv.mss, wscale, sack,
            (ts_clock(now, self.ts_off), 0) if ts else None,
        )

    # ------------------------------------------------------------------ building

    def segment(self, pos: int, flags: int, payload: bytes | memoryview, af: AckFields
                ) -> TcpSegment:
        """A segment starting at `pos`, with URG while urgent data is ahead (MUST-31)."""
        urg = self.up - pos
        if urg > 0:  # RFC 9293 MUST-31: points at the first non-urgent octet
            flags |= URG
            if urg > 0xFFFF:
                urg = 0xFFFF  # further than 16 bits reach: "urgent data follows"
        else:
            urg = 0
        if self.rcv.ece:
            flags |= ECE  # RFC 3168 §6.1.3: every segment until the peer's CWR
        ack, win, ts, sack = af
        return TcpSegment(
            self.lport, self.rport, (self.iss + pos) & MASK, ack, flags, win,
            payload, urg, None, None, False, ts, sack,
        )

    def room(self, af: AckFields) -> int:
        """Payload bytes of one wire segment carrying `af`'s options (RFC 9293 §3.7.1,
        RFC 6691): SMSS already leaves room for the TSopt; SACK blocks take theirs."""
        return self.mss - sack_room(af[3]) if af[3] else self.mss

    def max_segment(self) -> int:
        """The most payload one output segment carries (a multiple of SMSS)."""
        mss = self.mss
        tx = self.tx_max
        return mss if tx <= mss else tx - tx % mss

    # ------------------------------------------------------------------ sending

    def send_data(self, now: float, out: list[TcpSegment], af: AckFields, budget: int = -1
                  ) -> None:
        """New data (and FIN) within the windows; `budget` >= 0 replaces the cwnd limit
        by that many bytes from SND.NXT (one segment for the RFC 6675 loop)."""
        buf = self.buf
        mss = self.mss
        maxseg = self.max_segment()
        if af[3]:  # SACK blocks ride along: smaller wire segments, no super-segments
            mss = maxseg = mss - sack_room(af[3])
        fin_abs = self.fin
        cc = self.cc
        last = self.last_send_at
        if last is not None and self.una == self.max and now - last > self.rto.rto:
            cc.on_idle()  # RFC 5681 §4.1
        # Loop invariants in locals: the windows do not move while we send.
        wnd_edge = self.wl2 + self.wnd
        cwnd_edge = self.una + cc.cwnd + cc.limited_transmit
        lport, rport = self.lport, self.rport
        iss = self.iss
        ack, win, ts, sack = af
        up = self.up
        board = self.board
        rack = self.rack if self.sack_on and self.rack_on else None
        # RFC 3168: ECT(0) on new data (§6.1.1, §6.1.5), ECE while owed (§6.1.3), CWR (§6.1.2)
        ect = ECT0 if self.ecn else 0
        ece = ECE if self.rcv.ece else 0
        # Going back after an RTO with SACK information kept: skip what was SACKed.
        sacked_top = self.max if board.sacked and self.nxt < self.max else 0
        while True:
            nxt = self.nxt
            off = nxt - 1
            avail = buf.end - off
            hole = False
            if nxt < sacked_top:
                nxt2, stop = board.skip(nxt)
                if nxt2 != nxt:
                    self.nxt = nxt2
                    continue
                if stop is not None and stop - nxt < avail:
                    avail = stop - nxt  # up to the next SACKed range (stop > nxt)
                    hole = True
            if avail <= 0:
                if fin_abs is not None and nxt == fin_abs:
                    out.append(self.segment(nxt, ACK | FIN, b"", af))
                    self.advance(nxt + 1, now)
                return
            if budget >= 0:
                usable = min(wnd_edge - nxt, budget)
                budget = 0
            else:
                usable = (wnd_edge if wnd_edge < cwnd_edge else cwnd_edge) - nxt
            n = avail if avail < usable else usable
            if n > maxseg:
                n = maxseg
            if n <= 0:
                if wnd_edge <= nxt:
                    self.arm_persist(now)
                return
            if n < mss:
                if n < avail:  # window- or cwnd-limited with more queued (MUST-38)
                    if n < self.max_wnd // 2 or wnd_edge - nxt > usable:
                        self.arm_persist(now)
                        return
                elif self.nagle and nxt > self.una and fin_abs is None and not hole:
                    return  # Nagle: wait for the outstanding data to be acknowledged
            payload = buf.peek(off, n)
            flags = _ACK_PSH | ece if n == avail else ACK | ece
            if fin_abs is not None and off + n == buf.end:
                flags |= FIN
                n1 = n + 1
            else:
                n1 = n
            e = ect if nxt >= self.max else 0  # RFC 3168 §6.1.5: no ECT on a resend
            if e and self.cwr_pending:
                self.cwr_pending = False
                flags |= CWR  # RFC 3168 §6.1.2: the first new data after the reduction
            if up > nxt:
                out.append(self.segment(nxt, flags, payload, af)._replace(ecn=e))
            else:  # segment() inlined for the common case (no urgent data)
                out.append(TcpSegment(lport, rport, (iss + nxt) & MASK, ack, flags, win,
                                      payload, 0, None, None, False, ts, sack, e))
            new_nxt = nxt + n1
            if nxt < self.max or (self.rtt_abs is None and not self.ts_on):
                self.advance(new_nxt, now)
            else:  # advance() for new data, already timed or timed by TSopt
                self.max = self.nxt = new_nxt
                if rack is not None:
                    rack.sent(new_nxt, now)
                self.last_send_at = now
                if self.rto_at is None:
                    self.rto_at = now + self.rto.rto  # RFC 6298 §5.1

    def advance(self, new_nxt: int, now: float) -> None:
        """SND.NXT moves to `new_nxt` after a transmission; time it and arm the timer."""
        if self.nxt < self.max:
            self.retransmissions += 1
            if self.rtt_abs is not None and self.rtt_abs > self.nxt:
                self.rtt_abs = None  # Karn: the timed segment is being resent
        elif self.rtt_abs is None and not self.ts_on:
            self.rtt_abs = new_nxt
            self.rtt_at = now
        if new_nxt > self.max:
            self.max = new_nxt
            if self.sack_on and self.rack_on:
                self.rack.sent(new_nxt, now)
        self.nxt = new_nxt
        self.last_send_at = now
        if self.rto_at is None:
            self.rto_at = now + self.rto.rto  # RFC 6298 §5.1

    # ------------------------------------------------------------------ acknowledgments

    def on_ack(self, seg: TcpSegment, seg_abs: int, now: float) -> AckResult:
        """RFC 9293 §3.10.7.4 fifth step for an acceptable segment: the ACK field, the SACK
        blocks (RFC 2018), a duplicate ACK (RFC 5681 §2), the window."""
        una = self.una
        d = (seg.ack - self.iss - una) & MASK
        outstanding = self.max - una
        wnd = seg.window << self.wscale
        if d > outstanding:
            if d < HALF:
                return AckResult.UNSENT  # acknowledges something not yet sent (RFC 5961 §5.2)
            if 0x100000000 - d > self.max_wnd:
                return AckResult.TOO_OLD
            return AckResult.OLD  # an old duplicate ACK: ignore it, keep the text
        ack_abs = una + d
        if self.frto is not None and not d and outstanding and not seg.payload:
            self.frto_ack(0, ack_abs)  # F-RTO step 3a: a duplicate ACK
        board = self.board
        newly = board.update(seg.sack, una, self.max, self.iss) if self.sack_on and seg.sack else 0
        if self.sack_on and self.rack_on:
            self.rack_ack(seg, ack_abs, now)
        if self.rec_undo is not None and self.sack_on and seg.sack:
            self.dsack_undo(seg.sack[0], ack_abs)  # RFC 3708: a resend was needless?
        if d:
            self.new_ack(ack_abs, d, seg.ts, now)
            if newly and not self.cc.in_recovery and board.is_lost(ack_abs, self.mss):
                self.dupack(seg.ts, True)  # RFC 6675 §5: a DupAck "regardless of ... cumulative"
        elif outstanding and not seg.payload and not seg.flags & (SYN | FIN):
            if newly:  # RFC 6675 §2 DupAck: SACKs new data; no window condition
                self.dupack(seg.ts, board.is_lost(una, self.mss))
            elif wnd and wnd == self.wnd and not seg.sack:
                # RFC 5681 §2 (no SACK information; a zero-window probe's ACK does not count)
                self.dupack(seg.ts)
        if self.wl1 < seg_abs or (self.wl1 == seg_abs and self.wl2 <= ack_abs):
            self.update_window(wnd, seg_abs, ack_abs)
        return AckResult.OK

    def rack_ack(self, seg: TcpSegment, ack_abs: int, now: float) -> None:
        """RFC 8985 on one ACK: D-SACK (RFC 2883 §4: a first block at or below the
        cumulative ACK), what was delivered, and the scoreboard's lost edge."""
        rack = self.rack
        board = self.board
        sack = seg.sack
        srtt = self.rto.srtt
        if sack and ((sack[0][1] - self.iss - ack_abs - 1) & MASK) >= HALF - 1:
            rack.dsack(now, srtt)  # right edge - ack in (-HALF, 0]
        ts = seg.ts
        rtt = (((int(now * 1000) + self.ts_off) - ts[1]) & MASK) / 1000.0 \
            if self.ts_on and ts is not None and ts[1] else None
        sacked = board.sacked
        top = sacked[-1][1] if sacked and sacked[-1][1] > ack_abs else ack_abs
        rack.delivered(ack_abs, top, board.high_rxt, rtt, now)
        if rack.rxt:
            rack.rxt_delivered(ack_abs, sacked, now)
        if sacked:
            n = 0
            for a, b in sacked:
                n += b - a
            edge = rack.edge(ack_abs, srtt, self.cc.in_recovery, n // self.mss)
            board.rack = edge
            self.reo_at = rack.deadline(edge, now)
            if rack.rxt:
                low = rack.relost()
                if low is not None and low < board.high_rxt:
                    board.high_rxt = low  # lost again: NextSeg may name it once more
        else:
            board.rack = None
            self.reo_at = None
        r, p = self.reo_at, self.pto_at
        self.early_at = p if r is None or (p is not None and p < r) else r

    def new_ack(self, ack_abs: int, acked: int, ts: tuple[int, int] | None, now: float,
                wnd: int = -1, wl1: int = 0) -> None:
        """New data acknowledged (RFC 9293 §3.10.7.4; RFC 6298 §5.2-5.3; RFC 5681); with
        `wnd` >= 0 also the window update for SND.WL1 = `wl1` (header prediction)."""
        if self.frto is not None:
            self.frto_ack(acked, ack_abs)  # F-RTO step 3b (RFC 5682 §2)
        buf = self.buf
        buf.release(min(ack_abs - 1, buf.end))
        self.una = ack_abs
        if self.nxt < ack_abs:
            self.nxt = ack_abs
        if self.ts_on and ts is not None and ts[1]:  # RTTM (ts_clock inlined)
            self.rto.sample((((int(now * 1000) + self.ts_off) - ts[1]) & MASK) / 1000.0)
        elif self.rtt_abs is not None and ack_abs >= self.rtt_abs:
            self.rto.sample(now - self.rtt_at)
            self.rtt_abs = None
        if self.retries:  # the first ACK of new data after a timeout
            self.after_timeout(ack_abs, acked, ts)
        self.bytes_out = buf.base
        if buf.capacity < self.sndbuf_max:
            # Send-buffer growth (Linux tcp_sndbuf_expand): room for twice what the
            # windows let us have in flight, so the buffer never limits the window.
            want = 2 * (self.cc.cwnd if self.cc.cwnd < self.max_wnd else self.max_wnd)
            if want > buf.capacity:
                buf.capacity = want if want < self.sndbuf_max else self.sndbuf_max
        board = self.board
        if board.sacked:
            board.acked(ack_abs)
        if self.sack_on:
            self.rack.acked(ack_abs)
        rec = self.cc.in_recovery
        if self.cc.on_ack(acked, ack_abs, self.nxt - ack_abs, now, self.rto.srtt):
            if not (self.sack_on and board.sacked):
                self.retx_pending = True  # RFC 6582 partial ACK (or SACK without blocks)
        elif rec and not self.cc.in_recovery:
            self.recovery_ended(ts)  # spurious? (RFC 3522 §3.2); RACK's persist
        if ack_abs >= self.max:
            self.rto_at = None  # RFC 6298 §5.2
        else:
            self.rto_at = now + self.rto.rto  # RFC 6298 §5.3
        if self.sack_on and self.rack_on:
            if self.tlp_end is not None and ack_abs >= self.tlp_end:
                self.tlp_done()
            self.arm_early(now)
        if wnd >= 0:  # update_window() inlined
            self.wnd = wnd
            self.wl1 = wl1
            self.wl2 = ack_abs
            if wnd > self.max_wnd:
                self.max_wnd = wnd
            if wnd:
                self.persist_at = None
                self.persist_backoff = 0

    def update_window(self, wnd: int, seg_abs: int, ack_abs: int) -> None:
        """SND.WND update (RFC 9293 §3.10.7.4: SND.WL1/SND.WL2 rule); MUST-34 shrink-safe."""
        self.wnd = wnd
        self.wl1 = seg_abs
        self.wl2 = ack_abs
        if wnd > self.max_wnd:
            self.max_wnd = wnd
        if wnd:
            self.persist_at = None
            self.persist_backoff = 0

    def sample_syn(self, ts: tuple[int, int] | None, now: float) -> None:
        """Our SYN is acknowledged: its RTT sample, and RFC 6298 §5.7 after SYN timeouts."""
        if self.ts_on and ts is not None and ts[1]:
            self.rto.sample(((ts_clock(now, self.ts_off) - ts[1]) & MASK) / 1000.0)
        elif self.rtt_abs is not None:
            self.rto.sample(now - self.rtt_at)
        self.rtt_abs = None
        if self.retries:
            self.rto.syn_timed_out()  # RFC 6298 §5.7
        self.retries = 0

    # ------------------------------------------------------------------ timers

    @property
    def fin_acked(self) -> bool:
        """Our FIN was sent and acknowledged."""
        return self.fin is not None and self.una > self.fin

    def rst(self) -> TcpSegment:
        """<SEQ=SND.NXT><CTL=RST> (RFC 9293 §3.10.5 ABORT)."""
        return TcpSegment(self.lport, self.rport, (self.iss + self.nxt) & MASK, 0, RST, 0)

    def idle(self) -> bool:
        """Nothing in flight and nothing queued (keep-alive may probe, RFC 9293 §3.8.4)."""
        return self.max == self.una and self.buf.end < self.nxt

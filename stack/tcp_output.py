"""OutputMixin: turning a connection's state into the segments it sends now.

Rules:
- RFC 9293 §3.10.7 replies are queued by input and come out first (RSTs), then the SYN or
  SYN-ACK (§3.5; options MSS MUST-14, WSopt/TSopt RFC 7323 §2.2/§3.2, SACK-permitted
  RFC 2018 §2; the window of a SYN is never scaled), then retransmissions, probes and new
  data, then a pure ACK if one is owed and no other segment carried it (MUST-58 aggregate).
- Every segment after the SYN carries ACK, the current RCV.NXT and window (RFC 9293 §3.1),
  TSopt when negotiated (RFC 7323 §3.2: "MUST be sent in every non-<RST> segment"; TSecr =
  TS.Recent) and SACK blocks while data is held out of order (RFC 2018 §4, 3 blocks next
  to a TSopt, 4 without), led by a D-SACK block once after a duplicate (RFC 2883 §4).
- Receiver SWS avoidance (RFC 9293 §3.8.6.2.2, MUST-39): the right edge only moves by at
  least min(RCV.BUFF/2, MSS); it never moves left (window shrinking is avoided).
- Sender SWS avoidance (§3.8.6.2.1, MUST-38): send a segment if it is full (>= SMSS), or
  if it is all the data queued and Nagle allows, or if it is at least half the largest
  window the peer ever offered; otherwise wait (for an ACK or the override/persist timer).
- Nagle (§3.7.4, SHLD-7, MUST-17 can be disabled): a short segment waits while data is
  unacknowledged.
- Flow and congestion control: nothing beyond SND.WL2 + SND.WND (RFC 9293 §3.8.6) or
  SND.UNA + cwnd (RFC 5681 §3.1; + 2 SMSS of RFC 3042 limited transmit) is sent, except a
  fast retransmission (RFC 5681 §3.2) and a one-byte zero-window probe (MUST-36).
- With SACK, loss recovery follows RFC 6675 §5: retransmit SND.UNA's segment on entry, then
  send while cwnd - pipe >= SMSS: lost holes first, then new data, then other holes
  (NextSeg rules 1-3, stack/tcp_sack.py). Without SACK it is NewReno (RFC 6582).
- Urgent data (RFC 9293 §3.8.5, MUST-31): every data segment before SND.UP carries URG
  and SEG.UP = SND.UP - SEG.SEQ (the first non-urgent octet), capped at 0xFFFF.
- RFC 6298 §5.1: the retransmission timer is started when a segment is sent and it is not
  running. Karn (MUST-18): a retransmitted segment is not timed.
- RFC 5681 §4.1: after idling more than one RTO, restart from at most the initial window.
- `tx_max_segment` lets one output segment carry several SMSS (a TSO/GSO super-segment
  for a TUN); its size is a whole number of SMSS, so the kernel cuts wire-sized pieces.

Theory of operation: `segments_to_send(now)` computes the ACK fields (ack number, window,
TSopt, SACK blocks) once per call and builds TcpSegments with payload slices taken from
the SendBuffer without copying; sending anything with ACK clears the owed ACK and the
delayed-ACK deadline.
"""

from __future__ import annotations

from stack.seq import MASK
from stack.state import State
from stack.tcp_core import ConnectionCore
from stack.tcp_sack import lost_edge, next_hole, pipe
from stack.wire.tcp import ACK, FIN, PSH, SYN, URG, TcpSegment

__all__ = ["OutputMixin"]

_ACK_PSH = ACK | PSH
# The fields every segment after the SYN carries (RFC 9293 §3.1, RFC 7323 §3.2, RFC 2018
# §4): ACK number, window field, TSopt, SACK blocks; computed once per segments_to_send().
AckFields = tuple[int, int, tuple[int, int] | None, tuple[tuple[int, int], ...]]
_CLOSED = State.CLOSED
_LISTEN = State.LISTEN
_SYN_SENT = State.SYN_SENT
_SYN_RECEIVED = State.SYN_RECEIVED
_ESTABLISHED = State.ESTABLISHED
_SENDING = frozenset(
    {State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1, State.CLOSING, State.LAST_ACK}
)


class OutputMixin(ConnectionCore):
    """segments_to_send() and the rules of what may be sent."""

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Return the segments to transmit now, in order (possibly empty). Never raises."""
        out = self._rst_out
        st = self._state
        nxt = self._snd_nxt
        if (
            st is _ESTABLISHED
            and not out
            and not self._ack_now
            and self._sendbuf.end < nxt
            and not (self._retx_pending or self._probe_pending or self._ka_pending)
            and self._fin_abs is None
            and not self._cc.in_recovery
        ):
            return []  # the common "nothing due" case, without the general checks below
        if out:
            self._rst_out = []
        else:
            out = []
        if st is _CLOSED or st is _LISTEN:
            return out
        if nxt == 0 and (st is _SYN_SENT or st is _SYN_RECEIVED):
            out.append(self._syn_segment(now))
            if st is _SYN_SENT:
                return out
            self._ack_sent()
            nxt = self._snd_nxt
        if st is _SYN_SENT:
            return out
        n0 = len(out)
        if st in _SENDING and (
            self._sendbuf.end >= nxt  # unsent data (data byte k is at position k + 1)
            or self._retx_pending
            or self._probe_pending
            or self._cc.in_recovery
            or (self._fin_abs is not None and nxt <= self._fin_abs)
        ):
            af = (
                (self._irs + self._rcv_nxt) & MASK,
                self._window_field(),
                (self._ts_clock(now), self._ts_recent or 0) if self._ts_on else None,
                self._sack_blocks() if self._sack_on and (self._ooo or self._dsack) else (),
            )
            if self._sack_on and self._cc.in_recovery:
                self._sack_recovery(now, out, af)
            else:
                if self._retx_pending:
                    self._retx_pending = False
                    self._retransmit_at(self._snd_una, now, out, af)
                if self._probe_pending:
                    self._send_probe(now, out, af)
                self._send_data(now, out, af)
        if self._ka_pending:
            # RFC 9293 §3.8.4: SEG.SEQ = SND.NXT - 1 makes the peer answer with an ACK.
            self._ka_pending = False
            ka = self._pure_ack(now)
            out.append(ka._replace(seq=(ka.seq - 1) & MASK))
            self._ack_sent()
        elif len(out) > n0:
            self._ack_sent()
        elif self._ack_now:
            out.append(self._pure_ack(now))
            self._ack_now = False  # _ack_sent inlined
            self._delack_at = None
            self._unacked_bytes = 0
            self._last_ack_sent = self._rcv_nxt
        return out

    # ------------------------------------------------------------------ building

    def _syn_segment(self, now: float) -> TcpSegment:
        cfg = self.config
        synack = self._state is State.SYN_RECEIVED
        if self._snd_max:
            self.retransmissions += 1
            self._rtt_abs = None  # Karn
        else:
            self._rtt_abs = 1
            self._rtt_at = now
        self._snd_nxt = 1
        if self._snd_max < 1:
            self._snd_max = 1
        if self._rto_at is None:
            self._rto_at = now + self._rto.rto
        win = min(cfg.recv_buffer, 0xFFFF)
        self._rcv_adv = max(self._rcv_adv, 1 + win)
        if synack:
            return TcpSegment(
                self.local[1], self.remote[1], self._iss, (self._irs + 1) & MASK, SYN | ACK,
                win, b"", 0, self._my_mss,
                self._rcv_wscale if self._ws_on else None,
                self._sack_on,
                (self._ts_clock(now), self._ts_recent or 0) if self._ts_on else None,
            )
        return TcpSegment(
            self.local[1], self.remote[1], self._iss, 0, SYN, win, b"", 0, self._my_mss,
            cfg.rcv_wscale if cfg.window_scaling else None,
            cfg.sack,
            (self._ts_clock(now), 0) if cfg.timestamps else None,
        )

    def _pure_ack(self, now: float) -> TcpSegment:
        return TcpSegment(
            self.local[1], self.remote[1], (self._iss + self._snd_nxt) & MASK,
            (self._irs + self._rcv_nxt) & MASK, ACK, self._window_field(), b"", 0,
            None, None, False,
            ((int(now * 1000) + self._ts_off) & MASK, self._ts_recent or 0)
            if self._ts_on else None,  # _ts_clock inlined
            self._sack_blocks() if self._sack_on and (self._ooo.nbytes or self._dsack) else (),
        )

    def _ack_sent(self) -> None:
        self._ack_now = False
        self._delack_at = None
        self._unacked_bytes = 0
        self._last_ack_sent = self._rcv_nxt

    def _window_field(self) -> int:
        """The 16-bit window to advertise; moves RCV.ADV (RFC 9293 §3.8.6.2.2, RFC 7323 §2.3)."""
        rcv_nxt = self._rcv_nxt
        space = self._rcv_buf - self._rx_len - self._rx_held
        if space < self._sws_min:
            space = 0  # MUST-39: no small window increments
        edge = rcv_nxt + space
        if edge < self._rcv_adv:
            edge = self._rcv_adv  # never shrink the window
        s = self._rcv_wscale
        field = (edge - rcv_nxt + (1 << s) - 1) >> s
        if field > 0xFFFF:
            field = 0xFFFF
        self._rcv_adv = rcv_nxt + (field << s)
        return field

    def _sack_blocks(self) -> tuple[tuple[int, int], ...]:
        """SACK blocks, most recent first (RFC 2018 §4), behind a D-SACK block naming a
        duplicate just received (RFC 2883 §4: first, reported once)."""
        irs = self._irs
        limit = 3 if self._ts_on else 4
        blocks = []
        if self._dsack is not None:
            blocks.append(self._dsack)
            self._dsack = None
            limit -= 1
        blocks.extend(self._ooo.blocks(limit))
        return tuple(((irs + s) & MASK, (irs + e) & MASK) for s, e in blocks)

    def _segment(
        self,
        pos: int,
        flags: int,
        payload: bytes | memoryview,
        af: AckFields,
    ) -> TcpSegment:
        urg = self._snd_up - pos
        if urg > 0:  # RFC 9293 MUST-31: points at the first non-urgent octet
            flags |= URG
            if urg > 0xFFFF:
                urg = 0xFFFF  # further than 16 bits reach: "urgent data follows"
        else:
            urg = 0
        ack, win, ts, sack = af
        return TcpSegment(
            self.local[1], self.remote[1], (self._iss + pos) & MASK, ack, flags, win,
            payload, urg, None, None, False, ts, sack,
        )

    # ------------------------------------------------------------------ sending

    def _max_segment(self) -> int:
        mss = self._send_mss
        tx = self.config.tx_max_segment
        return mss if tx <= mss else tx - tx % mss

    def _send_data(
        self,
        now: float,
        out: list[TcpSegment],
        af: AckFields,
        budget: int = -1,
    ) -> None:
        """New data (and FIN) within the windows; `budget` >= 0 replaces the cwnd limit
        by that many bytes from SND.NXT (one segment for the RFC 6675 loop)."""
        buf = self._sendbuf
        mss = self._send_mss
        maxseg = self._max_segment()
        fin_abs = self._fin_abs
        cc = self._cc
        last = self._last_send_at
        if last is not None and self._snd_una == self._snd_max and now - last > self._rto.rto:
            cc.on_idle()  # RFC 5681 §4.1
        # Loop invariants in locals: the windows do not move while we send.
        wnd_edge = self._snd_wl2 + self._snd_wnd
        cwnd_edge = self._snd_una + cc.cwnd + cc.limited_transmit
        lport, rport = self.local[1], self.remote[1]
        iss = self._iss
        ack, win, ts, sack = af
        up = self._snd_up
        while True:
            nxt = self._snd_nxt
            off = nxt - 1
            avail = buf.end - off
            if avail <= 0:
                if fin_abs is not None and nxt == fin_abs:
                    out.append(self._segment(nxt, ACK | FIN, b"", af))
                    self._advance(nxt + 1, now)
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
                    self._arm_persist(now)
                return
            if n < mss:
                if n < avail:  # window- or cwnd-limited with more queued (MUST-38)
                    if n < self._max_snd_wnd // 2 or wnd_edge - nxt > usable:
                        self._arm_persist(now)
                        return
                elif self.config.nagle and nxt > self._snd_una and fin_abs is None:
                    return  # Nagle: wait for the outstanding data to be acknowledged
            payload = buf.peek(off, n)
            flags = _ACK_PSH if n == avail else ACK
            if fin_abs is not None and off + n == buf.end:
                flags |= FIN
                n1 = n + 1
            else:
                n1 = n
            if up > nxt:
                out.append(self._segment(nxt, flags, payload, af))
            else:  # _segment inlined for the common case (no urgent data)
                out.append(TcpSegment(lport, rport, (iss + nxt) & MASK, ack, flags, win,
                                      payload, 0, None, None, False, ts, sack))
            new_nxt = nxt + n1
            if nxt < self._snd_max or (self._rtt_abs is None and not self._ts_on):
                self._advance(new_nxt, now)
            else:  # _advance for new data, already timed or timed by TSopt
                self._snd_max = self._snd_nxt = new_nxt
                self._last_send_at = now
                if self._rto_at is None:
                    self._rto_at = now + self._rto.rto  # RFC 6298 §5.1

    def _advance(self, new_nxt: int, now: float) -> None:
        """SND.NXT moves to `new_nxt` after a transmission; time it and arm the timer."""
        if self._snd_nxt < self._snd_max:
            self.retransmissions += 1
            if self._rtt_abs is not None and self._rtt_abs > self._snd_nxt:
                self._rtt_abs = None  # Karn: the timed segment is being resent
        elif self._rtt_abs is None and not self._ts_on:
            self._rtt_abs = new_nxt
            self._rtt_at = now
        if new_nxt > self._snd_max:
            self._snd_max = new_nxt
        self._snd_nxt = new_nxt
        self._last_send_at = now
        if self._rto_at is None:
            self._rto_at = now + self._rto.rto  # RFC 6298 §5.1

    def _arm_persist(self, now: float) -> None:
        """Nothing can be sent and nothing is in flight: the persist timer will probe."""
        if self._snd_nxt == self._snd_una and self._rto_at is None and self._persist_at is None:
            delay = max(self._rto.rto, 0.2) * (1 << min(self._persist_backoff, 8))
            self._persist_at = now + min(delay, self._rto.maximum)

    def _retransmit_at(
        self,
        pos: int,
        now: float,
        out: list[TcpSegment],
        af: AckFields,
    ) -> bool:
        """Resend one segment from `pos` (fast retransmit, RFC 5681 §3.2; NewReno partial
        ACK, RFC 6582; an RFC 6675 hole): up to SMSS, stopping at the next SACKed range,
        not timed (Karn). Moves HighRxt. Returns False if there was nothing to send."""
        if pos >= self._snd_max:
            return False
        buf = self._sendbuf
        off = pos - 1
        n = max(min(buf.end - off, self._send_mss), 0)
        for s, _e in self._sacked:
            if s > pos:
                n = min(n, s - pos)
                break
        fin = self._fin_abs is not None and pos + n == self._fin_abs
        if n <= 0 and not fin:
            return False
        payload = buf.peek(off, n) if n > 0 else b""
        out.append(self._segment(pos, ACK | FIN if fin else ACK, payload, af))
        self._recovery_pt = pos + n + fin
        self.retransmissions += 1
        self._rtt_abs = None
        self._last_send_at = now
        if self._rto_at is None:
            self._rto_at = now + self._rto.rto
        return True

    def _sack_recovery(
        self,
        now: float,
        out: list[TcpSegment],
        af: AckFields,
    ) -> None:
        """RFC 6675 §5: on entry retransmit SND.UNA's segment (step 4.3), then while
        cwnd - pipe >= SMSS send what NextSeg() names (step 4.4 / rule C)."""
        smss = self._send_mss
        if self._retx_pending:
            self._retx_pending = False
            self._retransmit_at(self._snd_una, now, out, af)
        for _ in range(1024):
            una, sacked = self._snd_una, self._sacked
            edge = lost_edge(una, sacked, smss)
            in_flight = pipe(una, self._snd_max, self._recovery_pt, sacked, edge)
            if self._cc.cwnd - in_flight < smss:
                return
            start = max(una, self._recovery_pt)
            pos = next_hole(start, edge, sacked)  # rule 1: a lost segment
            if pos is None:
                n0 = len(out)
                self._send_data(now, out, af, budget=smss)  # rule 2
                if len(out) > n0:
                    continue
                top = sacked[-1][1] if sacked else una
                pos = next_hole(start, top, sacked)  # rule 3
                if pos is None:
                    return
            if not self._retransmit_at(pos, now, out, af):
                return

    def _send_probe(
        self,
        now: float,
        out: list[TcpSegment],
        af: AckFields,
    ) -> None:
        """Zero-window probe (RFC 9293 §3.8.6.1, MUST-36) or SWS override: send one byte
        (or what the window allows) even though the window says no."""
        self._probe_pending = False
        buf = self._sendbuf
        if self._snd_una < self._snd_nxt:
            pos = self._snd_una  # resend the first unacknowledged byte
            if pos - 1 < buf.end:
                out.append(self._segment(pos, ACK, buf.peek(pos - 1, 1), af))
                self.retransmissions += 1
            elif self._fin_abs is not None:
                out.append(self._segment(pos, ACK | FIN, b"", af))
            if self._rto_at is None:
                self._rto_at = now + self._rto.rto
            return
        off = self._snd_nxt - 1
        avail = buf.end - off
        if avail <= 0:
            return
        n = max(1, min(avail, self._snd_wl2 + self._snd_wnd - self._snd_nxt, self._send_mss))
        flags = ACK | PSH if n == avail else ACK
        out.append(self._segment(self._snd_nxt, flags, buf.peek(off, n), af))
        self._advance(self._snd_nxt + n, now)

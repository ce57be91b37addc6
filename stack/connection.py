"""TcpConnection: a sans-I/O TCP endpoint (RFC 9293) driven by segments and `now`.

Rules (each handler cites the clause it implements):
- Segments and the caller's clock go in (`receive_segment(seg, now)`, `handle_timer(now)`);
  segments, events and one deadline come out (`segments_to_send(now)`, `next_event()`,
  `get_timer()`). No sockets, threads, globals or clock inside (aioquic's shape).
- A misbehaving peer never raises: its segment is dropped and counted in `drops`, or
  answered with an ACK or a RST, or ends the connection with an event. Misuse of this API
  raises LocalProtocolError.
- Input follows RFC 9293 §3.10.7 ("SEGMENT ARRIVES") state by state (CLOSED here, LISTEN
  and SYN-SENT in stack/tcp_open.py, the synchronized states here), with RFC 5961 (RST
  and SYN challenge ACKs, ACK range check), RFC 7323 (PAWS, TS.Recent) and RFC 2018 (SACK)
  woven in; output is built by stack/tcp_output.py (SWS avoidance, Nagle, window
  advertisement, retransmission, RFC 6675 recovery) and timers live in stack/tcp_core.py.
- Urgent data (RFC 9293 §3.8.5, MUST-30..33): the sixth step keeps RCV.UP (a stream
  offset, only moving forward) and queues UrgentData(end) whenever it advances (MUST-32);
  the urgent bytes are delivered inline, in order; `urgent_remaining` counts those not yet
  read (MUST-33); `send(data, urgent=True)` moves SND.UP (MUST-31, RFC 6093 semantics).
  Not done: no out-of-band byte (SO_OOBINLINE is the only mode), and urgent data does
  not bypass Nagle or the windows.
- The payload a connection keeps is copied on receipt: callers may reuse their buffers.

Theory of operation: positions are absolute ints (stack/seq.py): our SYN is 0, our first
data byte 1, our FIN 1 + stream length; likewise for the peer from IRS. A 32-bit number
from a segment is unwrapped once against RCV.NXT or SND.UNA, so that the acceptability
tests, windows and buffers need no modular arithmetic. `receive_segment` first tries the
header-prediction fast path (RFC 9293 §3.10 note, Van Jacobson): ESTABLISHED, only ACK
(and PSH) set, the expected sequence number, nothing out of order, an ACK within range;
then either in-order data (appended to the receive queue, ACK delayed) or a pure ACK of
new data. Everything else takes the per-state slow path. Output is pulled: receiving only
updates state and sets flags (ACK now, retransmit, RST to send); `segments_to_send`
turns state into segments, so ACKs for a whole batch of input are aggregated (MUST-58/59).
"""

from __future__ import annotations

from stack.events import (
    LocalProtocolError,
    PeerFinished,
    UrgentData,
)
from stack.seq import HALF, MASK
from stack.state import CAN_RECEIVE, CAN_SEND, Ev, State
from stack.tcp_core import DATA_MARK, Endpoint
from stack.tcp_open import OpenMixin
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, URG, TcpSegment

__all__ = ["TcpConnection", "Endpoint"]

_ACK_PSH = ACK | PSH
_ESTABLISHED = State.ESTABLISHED
_ABORT_SENDS_RST = frozenset(
    {State.SYN_RECEIVED, State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2,
     State.CLOSE_WAIT}
)


class TcpConnection(OpenMixin):
    """One TCP connection between `local` and `remote` (packed address, port)."""

    # ------------------------------------------------------------------ API: opening

    @property
    def state(self) -> State:
        """The RFC 9293 state."""
        return self._state

    @property
    def passive(self) -> bool:
        """True if this connection was opened by listen() (a SYN created it)."""
        return self._passive

    @property
    def rcv_nxt_seq(self) -> int:
        """RCV.NXT as a 32-bit sequence number."""
        return (self._irs + self._rcv_nxt) & MASK

    @property
    def receive_window(self) -> int:
        """Bytes of window we last advertised beyond RCV.NXT (RCV.WND)."""
        return max(self._rcv_adv - self._rcv_nxt, 0)

    @property
    def send_mss(self) -> int:
        """Payload bytes per wire segment (RFC 9293 MUST-16); the adapter's GSO size."""
        return self._send_mss

    # ------------------------------------------------------------------ API: data

    def send(self, data: bytes | bytearray | memoryview, *, urgent: bool = False) -> int:
        """Queue bytes to send; return how many fit in the send buffer (0 when full).

        With `urgent`, the accepted bytes are urgent data (RFC 9293 §3.8.5): segments
        before their end carry URG and an urgent pointer to the first non-urgent octet
        (MUST-31), up to 0xFFFF ahead. Raises LocalProtocolError after close() or when the
        connection cannot send.
        """
        st = self._state
        if self._close_requested or not (
            st in CAN_SEND or st is State.SYN_SENT or st is State.SYN_RECEIVED
        ):
            raise LocalProtocolError(f"send() in state {st}")
        if self._watch is not None:
            self._watch(self)
        n = self._sendbuf.append(data)
        if urgent and n:
            self._snd_up = 1 + self._sendbuf.end  # SND.UP (MUST-31)
        return n

    @property
    def send_buffer_free(self) -> int:
        """Bytes send() would accept now."""
        return self._sendbuf.free

    def close(self) -> None:
        """CLOSE (RFC 9293 §3.10.4): send FIN after the queued data (half-close).

        Raises LocalProtocolError if close() was already called or the connection is closed.
        """
        st = self._state
        if self._close_requested or st is State.CLOSED:
            raise LocalProtocolError(f"close() in state {st}")
        self._close_requested = True
        if self._watch is not None:
            self._watch(self)
        if st is State.LISTEN or st is State.SYN_SENT:
            self._enter_closed(Ev.CLOSE)
            return
        self._fin_abs = 1 + self._sendbuf.end
        if st is State.ESTABLISHED or st is State.CLOSE_WAIT:
            self._move(Ev.CLOSE)  # FIN-WAIT-1 or LAST-ACK
        # SYN-RECEIVED: the FIN goes out once ESTABLISHED (RFC 9293 §3.10.4).

    def abort(self) -> None:
        """ABORT (RFC 9293 §3.10.5): send RST <SEQ=SND.NXT> in SYN-RECEIVED, ESTABLISHED,
        FIN-WAIT-1/2 and CLOSE-WAIT; in the other states just delete the TCB. Then CLOSED."""
        st = self._state
        if st is State.CLOSED:
            return
        if self._watch is not None:
            self._watch(self)
        if st in _ABORT_SENDS_RST:
            self._queue_rst(self._seq_of(self._snd_nxt), None)
        self._enter_closed(Ev.ABORT)

    # ------------------------------------------------------------------ input

    def receive_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one segment addressed to this connection (RFC 9293 §3.10.7). Never raises.

        What the connection keeps of the payload is copied, so the caller may reuse the
        buffer behind `seg.payload` as soon as this returns.
        """
        self._last_rx = now
        self._ka_sent = 0
        # Header prediction (RFC 9293 §3.10 note; Van Jacobson). One unpack of the tuple
        # and locals instead of repeated attribute lookups: this is the per-segment cost.
        (_sp, _dp, seq, ack, flags, window, payload, _urg, _mss, _ws, _sp2, ts, sack) = seg
        rcv_nxt = self._rcv_nxt
        if (
            self._state is _ESTABLISHED
            and (flags == ACK or flags == _ACK_PSH)
            and seq == (self._irs + rcv_nxt) & MASK
            and not sack  # SACK information goes to the scoreboard (slow path)
            and not self._ooo.nbytes
        ):
            if self._ts_on:
                if ts is None:
                    self._slow_path(seg, now)
                    return
                recent = self._ts_recent
                if recent is not None and (ts[0] - recent) & MASK >= HALF:
                    self._slow_path(seg, now)
                    return
            una = self._snd_una
            d = (ack - self._iss - una) & MASK
            n = len(payload)
            if n:
                if (
                    d == 0
                    and window << self._snd_wscale == self._snd_wnd
                    and n <= self._rcv_adv - rcv_nxt
                ):
                    self.fast_path += 1
                    if ts is not None and rcv_nxt <= self._last_ack_sent:
                        self._ts_recent = ts[0]  # RFC 7323 §4.3
                        self._ts_recent_at = now
                    # In-order text (§3.10.7.4 seventh step), _accept_in_order inlined.
                    self._rcv_nxt = rcv_nxt + n
                    self.bytes_in += n
                    self._rx.append(payload if type(payload) is bytes else bytes(payload))
                    self._rx_len += n
                    ev = self._events
                    if not ev or ev[-1] is not DATA_MARK:
                        ev.append(DATA_MARK)
                    u = self._unacked_bytes + n
                    self._unacked_bytes = u
                    big = self._rcv_big
                    if n > big:  # estimate the peer's full segment size (Linux rcv_mss)
                        big = self._rcv_big = min(n, self._rcv_mss())
                    if u >= 2 * big:  # SHLD-19: ACK every second full segment
                        self._ack_now = True
                    elif self._delack_at is None:
                        self._delack_at = now + self.config.delayed_ack  # MUST-40: < 0.5 s
                    return
            elif 0 < d <= self._snd_max - una:
                self.fast_path += 1
                if ts is not None and rcv_nxt <= self._last_ack_sent:
                    self._ts_recent = ts[0]  # RFC 7323 §4.3
                    self._ts_recent_at = now
                ack_abs = una + d
                self._new_ack(ack_abs, d, ts, now)
                # SND.WND update (WL1 <= RCV.NXT, WL2 < ack), _update_window inlined.
                wnd = window << self._snd_wscale
                self._snd_wnd = wnd
                self._snd_wl1 = rcv_nxt
                self._snd_wl2 = ack_abs
                if wnd > self._max_snd_wnd:
                    self._max_snd_wnd = wnd
                if wnd:
                    self._persist_at = None
                    self._persist_backoff = 0
                return
        self._slow_path(seg, now)

    def _slow_path(self, seg: TcpSegment, now: float) -> None:
        st = self._state
        if st is State.CLOSED:
            self._drop("closed")
            if not seg.flags & RST:
                self._reset_for(seg)  # RFC 9293 §3.10.7.1
        elif st is State.LISTEN:
            self._on_listen(seg, now)
        elif st is State.SYN_SENT:
            self._on_syn_sent(seg, now)
        else:
            self._on_synchronized(seg, now)

    def _on_synchronized(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.4, SYN-RECEIVED and every synchronized state."""
        f = seg.flags
        st = self._state
        if st is State.SYN_RECEIVED and f & SYN and not f & RST and seg.seq == self._irs:
            if not f & ACK:
                self._snd_nxt = 0  # the peer lost our SYN-ACK: send it again
                return
            if seg.ack == (self._iss + 1) & MASK and not self._passive:
                # MUST-10, RFC 9293 Figure 8 line 6: the crossing SYN-ACK of a simultaneous
                # open (its SYN is old news; Linux tcp_validate_incoming lets it pass too).
                self._snd_una = 1
                self._rto_at = None
                self._rtt_sample_syn(seg, now)
                self._snd_wnd = seg.window
                self._snd_wl1, self._snd_wl2 = 0, 1
                self._establish(Ev.RCV_ACK_OF_SYN)
                return
        # RFC 7323 §3.2 / §5.3: timestamps, then PAWS, before the sequence test.
        ts = seg.ts
        if self._ts_on and not f & RST:
            if ts is None:
                self._drop("missing_timestamp")  # SHOULD silently drop
                return
            if self._ts_recent is not None and (ts[0] - self._ts_recent) & MASK >= HALF:
                if now - self._ts_recent_at <= 24 * 86400:
                    self._drop("paws")
                    self._ack_now = True  # R1: send an ACK, drop the segment
                    return
        rcv_nxt = self._rcv_nxt
        seg_abs = self._unwrap_rcv(seg.seq)
        payload = seg.payload
        seg_len = len(payload) + (1 if f & SYN else 0) + (1 if f & FIN else 0)
        wnd = max(self._rcv_adv - rcv_nxt, 0)
        # First: the acceptability test, four cases (RFC 9293 §3.10.7.4 table).
        if seg_len == 0:
            ok = seg_abs == rcv_nxt if wnd == 0 else rcv_nxt <= seg_abs < rcv_nxt + wnd
        elif wnd == 0:
            ok = False
        else:
            end = seg_abs + seg_len - 1
            ok = rcv_nxt <= seg_abs < rcv_nxt + wnd or rcv_nxt <= end < rcv_nxt + wnd
        zero_wnd_ack = not ok and wnd == 0 and seg_abs == rcv_nxt and bool(f & ACK)
        if not ok and not zero_wnd_ack:
            if f & RST:
                self._drop("rst_out_of_window")
                return
            self._drop("unacceptable")
            self._ack_now = True  # "<SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK>"
            if payload and seg_abs + len(payload) <= rcv_nxt and self._sack_on:
                self._dsack = (seg_abs, seg_abs + len(payload))  # RFC 2883 §4: duplicate
            if st is State.TIME_WAIT and f & FIN and seg_abs + seg_len == rcv_nxt:
                # RFC 9293 §3.10.7.4 TIME-WAIT: the peer's FIN again: ACK, restart 2 MSL.
                self._timewait_at = now + 2 * self.config.msl
            return
        # Second: RST (RFC 9293 §3.10.7.4 with RFC 5961 §3.2).
        if f & RST:
            if seg_abs != rcv_nxt:
                self._drop("rst_challenged")
                self._challenge_ack(now)
                return
            self._on_reset()
            return
        # Fourth: SYN in a synchronized state gets a challenge ACK (RFC 5961 §4.2).
        if f & SYN:
            self._drop("syn_challenged")
            self._challenge_ack(now)
            return
        # Fifth: the ACK field.
        if not f & ACK:
            self._drop("no_ack")
            return
        if ts is not None and ts[0] != self._ts_recent and seg_abs <= self._last_ack_sent:
            if self._ts_recent is None or (ts[0] - self._ts_recent) & MASK < HALF:
                self._ts_recent = ts[0]  # RFC 7323 §4.3 (TS.Recent update rule)
                self._ts_recent_at = now
        if st is State.SYN_RECEIVED:
            d = (seg.ack - self._iss) & MASK
            if d == 0 or d > self._snd_max:
                self._drop("bad_ack_in_syn_received")
                self._queue_rst(seg.ack, None)
                return
            self._snd_una = 1
            self._rto_at = None
            self._rtt_sample_syn(seg, now)
            self._snd_wnd = seg.window << self._snd_wscale
            self._snd_wl1, self._snd_wl2 = seg_abs, 1
            self._max_snd_wnd = self._snd_wnd
            self._establish(Ev.RCV_ACK_OF_SYN)
            st = self._state
        if not self._process_ack(seg, seg_abs, now):
            return
        st = self._state
        if st is State.CLOSED:
            return
        # Sixth: the URG bit (RFC 9293 §3.10.7.4; §3.8.5 MUST-30..32). RCV.UP only moves
        # forward; each advance is an event; the bytes stay inline (any length, MUST-30).
        if f & URG and seg.urg and st in CAN_RECEIVE and not zero_wnd_ack:  # 0: none
            end = seg_abs + seg.urg - 1  # the first non-urgent octet, as a stream offset
            if end > self._rcv_up:
                self._rcv_up = end
                self._events.append(UrgentData(end))
        # Seventh: segment text (RFC 9293 §3.10.7.4).
        if payload and not zero_wnd_ack:
            if st in CAN_RECEIVE:
                self._receive_text(seg_abs, payload, now)
            else:
                self._drop("data_after_fin")
        elif zero_wnd_ack and payload:
            self._drop("zero_window")
            self._ack_now = True
        # Eighth: FIN.
        if f & FIN and not zero_wnd_ack:
            fin_pos = seg_abs + len(payload)
            if fin_pos < self._rcv_adv or fin_pos == self._rcv_nxt:
                if fin_pos == self._rcv_nxt:
                    self._on_fin(now)
                elif st in CAN_RECEIVE:
                    self._ooo_fin = fin_pos  # FIN after a gap: take it when the gap fills
                    self._ack_now = True

    def _process_ack(self, seg: TcpSegment, seg_abs: int, now: float) -> bool:
        """RFC 9293 §3.10.7.4 fifth step. Returns False when the segment is finished."""
        d = (seg.ack - self._iss - self._snd_una) & MASK
        outstanding = self._snd_max - self._snd_una
        wnd = seg.window << self._snd_wscale
        if d > outstanding:
            if d < HALF:
                # Acknowledges something not yet sent (RFC 9293; RFC 5961 §5.2).
                self._drop("ack_of_unsent")
                self._ack_now = True
                return False
            behind = 0x100000000 - d
            if behind > self._max_snd_wnd:
                self._drop("ack_too_old")  # RFC 5961 §5.2: challenge ACK, drop
                self._challenge_ack(now)
                return False
            return True  # an old duplicate ACK: ignore it, keep the text
        ack_abs = self._snd_una + d
        if self._sack_on and seg.sack:
            self._update_scoreboard(seg.sack)
        if d:
            self._new_ack(ack_abs, d, seg.ts, now)
        elif (
            outstanding
            and wnd  # a zero-window probe's ACK is not a loss signal
            and not seg.payload
            and not seg.flags & (SYN | FIN)
            and wnd == self._snd_wnd
        ):
            # RFC 5681 §2 duplicate ACK.
            flight = self._snd_nxt - self._snd_una
            rto_ts = self._rto_tsval
            new_loss = (
                rto_ts is not None and seg.ts is not None and (seg.ts[1] - rto_ts) & MASK < HALF
            )
            if self._cc.on_dupack(self._snd_una, self._snd_max, flight, new_loss):
                self._retx_pending = True
                self._recovery_pt = self._snd_una  # HighRxt (RFC 6675 §5 step 4)
        if self._snd_wl1 < seg_abs or (self._snd_wl1 == seg_abs and self._snd_wl2 <= ack_abs):
            self._update_window(wnd, seg_abs, ack_abs)
        st = self._state
        if self._fin_abs is not None and self._snd_una > self._fin_abs:
            if st is State.FIN_WAIT_1:
                self._move(Ev.RCV_ACK_OF_FIN)
            elif st is State.CLOSING:
                self._enter_time_wait(Ev.RCV_ACK_OF_FIN, now)
            elif st is State.LAST_ACK:
                self._enter_closed(Ev.RCV_ACK_OF_FIN)
                return False
        return True

    def _new_ack(self, ack_abs: int, acked: int, ts: tuple[int, int] | None, now: float) -> None:
        """New data acknowledged (RFC 9293 §3.10.7.4; RFC 6298 §5.2-5.3; RFC 5681)."""
        buf = self._sendbuf
        buf.release(min(ack_abs - 1, buf.end))
        self._snd_una = ack_abs
        if self._snd_nxt < ack_abs:
            self._snd_nxt = ack_abs
        if self._ts_on and ts is not None and ts[1]:  # RTTM (_ts_clock inlined)
            self._rto.sample((((int(now * 1000) + self._ts_off) - ts[1]) & MASK) / 1000.0)
        elif self._rtt_abs is not None and ack_abs >= self._rtt_abs:
            self._rto.sample(now - self._rtt_at)
            self._rtt_abs = None
        self._retries = 0  # (the RTO backoff ends only with a valid sample: RFC 6298 §5.7)
        self.bytes_out = buf.base
        if self._sacked and self._sacked[0][0] < ack_abs:
            self._sacked = [(max(s, ack_abs), e) for s, e in self._sacked if e > ack_abs]
        if self._cc.on_ack(acked, ack_abs, self._snd_nxt - ack_abs):
            if not (self._sack_on and self._sacked):
                self._retx_pending = True  # RFC 6582 partial ACK (or SACK without blocks)
        if ack_abs >= self._snd_max:
            self._rto_at = None  # RFC 6298 §5.2
        else:
            self._rto_at = now + self._rto.rto  # RFC 6298 §5.3

    def _update_window(self, wnd: int, seg_abs: int, ack_abs: int) -> None:
        """SND.WND update (RFC 9293 §3.10.7.4: SND.WL1/SND.WL2 rule); MUST-34 shrink-safe."""
        self._snd_wnd = wnd
        self._snd_wl1 = seg_abs
        self._snd_wl2 = ack_abs
        if wnd > self._max_snd_wnd:
            self._max_snd_wnd = wnd
        if wnd:
            self._persist_at = None
            self._persist_backoff = 0

    def _accept_in_order(self, payload: bytes | memoryview, n: int, now: float) -> None:
        """In-order text (RFC 9293 §3.10.7.4 seventh step) and the ACK policy (§3.8.6.3)."""
        self._rcv_nxt += n
        self.bytes_in += n
        # Keep a copy: the caller may reuse its receive buffer once we return.
        self._rx.append(payload if type(payload) is bytes else bytes(payload))
        self._rx_len += n
        if not self._events or self._events[-1] is not DATA_MARK:
            self._events.append(DATA_MARK)
        self._unacked_bytes += n
        if n > self._rcv_big:  # estimate the peer's full segment size (Linux rcv_mss)
            self._rcv_big = min(n, self._rcv_mss())
        if self._unacked_bytes >= 2 * self._rcv_big:  # SHLD-19: every second full segment
            self._ack_now = True
        elif self._delack_at is None:
            self._delack_at = now + self.config.delayed_ack  # MUST-40: < 0.5 s

    def _receive_text(self, seg_abs: int, payload: bytes | memoryview, now: float) -> None:
        rcv_nxt = self._rcv_nxt
        if seg_abs < rcv_nxt:  # trim what we already have
            if self._sack_on:
                self._dsack = (seg_abs, rcv_nxt)  # RFC 2883 §4: report the duplicate part
            payload = memoryview(payload)[rcv_nxt - seg_abs :]
            seg_abs = rcv_nxt
        room = self._rcv_adv - seg_abs
        if len(payload) > room:  # trim to the window
            payload = memoryview(payload)[: max(room, 0)]
        if not payload:
            self._ack_now = True
            return
        if seg_abs == rcv_nxt:
            had_gap = bool(self._ooo)
            self._accept_in_order(payload, len(payload), now)
            if had_gap:
                nxt, pieces = self._ooo.pop_ready(self._rcv_nxt)
                for piece in pieces:
                    self._accept_in_order(piece, len(piece), now)
                self._rcv_nxt = nxt
                self._ack_now = True  # RFC 5681 §4.2: ACK at once when a gap fills
                if self._ooo_fin is not None and self._ooo_fin == self._rcv_nxt:
                    self._ooo_fin = None
                    self._on_fin(now)
            return
        # Out of order: queue it (SHLD-31) and send a duplicate ACK at once (RFC 5681 §4.2).
        if self._ooo.insert(seg_abs, payload) < 0:
            self._drop("reassembly_full")
        self._ack_now = True

    def _on_fin(self, now: float) -> None:
        """RFC 9293 §3.10.7.4 eighth step: the peer's FIN at RCV.NXT."""
        self._rcv_nxt += 1
        self._ack_now = True
        if self._peer_fin:
            return
        self._peer_fin = True
        self._events.append(PeerFinished())
        st = self._state
        if st is State.ESTABLISHED or st is State.SYN_RECEIVED:
            self._move(Ev.RCV_FIN)  # CLOSE-WAIT
        elif st is State.FIN_WAIT_1:
            if self._fin_abs is not None and self._snd_una > self._fin_abs:
                self._move(Ev.RCV_ACK_OF_FIN)  # our FIN is acknowledged too: FIN-WAIT-2 ...
                self._enter_time_wait(Ev.RCV_FIN, now)  # ... and on to TIME-WAIT
            else:
                self._move(Ev.RCV_FIN)  # CLOSING
        elif st is State.FIN_WAIT_2:
            self._enter_time_wait(Ev.RCV_FIN, now)

    def _unwrap_rcv(self, seq: int) -> int:
        d = (seq - self._irs - self._rcv_nxt) & MASK
        return self._rcv_nxt + (d - 0x100000000 if d >= HALF else d)

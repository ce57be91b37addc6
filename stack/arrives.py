"""SegmentArrives: the per-state input of a TcpConnection (RFC 9293 §3.10.7) and the state
transitions it makes; stack/connection.py's TcpConnection is built on it.

Rules (each handler cites the clause it implements):
- The state changes only in `_move`, along an edge of the table in stack/state.py; a change
  the table lacks raises TransitionError (a bug of ours, never the peer's).
- Input follows RFC 9293 §3.10.7 ("SEGMENT ARRIVES") state by state: CLOSED here (a RST
  reply, §3.10.7.1), LISTEN and SYN-SENT in stack/handshake.py, SYN-RECEIVED and the
  synchronized states here (§3.10.7.4, first to eighth step), with RFC 5961 (RST and SYN
  challenge ACKs, ACK range check), RFC 7323 (PAWS, TS.Recent) and RFC 2018 (SACK) woven in.
- ECN (RFC 3168 §6.1), on a connection that negotiated it: an acceptable segment's CWR
  and CE mark go to the Receiver (§6.1.3; a CE outside the window is ignored, §6.1.5,
  but a zero-window probe's at RCV.NXT counts, §6.1.6), and an acceptable ACK's ECE to the
  Sender (§6.1.2). Header prediction leaves every segment with ECE or CWR set or marked
  CE to this path.
- A misbehaving peer never raises: its segment is dropped and counted in `drops` by reason,
  or answered with an ACK (challenge, unacceptable segment) or a RST, or ends the
  connection with an event (ConnectionReset, ResetToListen, Closed).

Theory of operation: this is the slow path. TcpConnection.receive_segment first tries header
prediction (the common ESTABLISHED case, inline on the components' fields) and hands every
other segment to `_slow_path`. The components do the work (the Receiver: acceptability,
PAWS, URG, text and FIN; the Sender: the ACK field; the Handshake: LISTEN, SYN-SENT and
the ACK of our SYN) and report what happened; the methods here make the transition
(`_establish`, `_enter_time_wait`, `_enter_closed`) and queue the events. The class holds no
state of its own: TcpConnection.__init__ sets every attribute declared below.
"""

from __future__ import annotations

from collections import deque

from stack.events import Closed, Connected, ConnectionReset, ResetToListen
from stack.handshake import Handshake, reset_reply
from stack.receive import Acceptable, Receiver
from stack.send import AckResult, Sender
from stack.state import CAN_RECEIVE, Ev, State, next_state
from stack.timers import Timers
from stack.wire.tcp import ACK, CE, CWR, ECE, FIN, RST, SYN, URG, TcpSegment

__all__ = ["SegmentArrives"]


class SegmentArrives:
    """RFC 9293 §3.10.7 input beyond header prediction, and the transitions (base class)."""

    _state: State
    _rcv: Receiver
    _snd: Sender
    _hs: Handshake
    _timers: Timers
    _events: deque[object]
    _rst_out: list[TcpSegment]
    _close_requested: bool
    drops: dict[str, int]

    def _move(self, ev: Ev) -> None:
        """The one place the state changes: along the edge `ev` of the table (stack/state.py)."""
        self._state = next_state(self._state, ev)

    def _establish(self, ev: Ev) -> None:
        # A SYN(-ACK) resend still pending (SND.NXT = 0 after the peer's SYN again or our
        # RTO) is obsolete once the SYN is acknowledged: SND.NXT never trails SND.UNA.
        snd = self._snd
        if snd.nxt < snd.una:
            snd.nxt = snd.una
        self._move(ev)  # ESTABLISHED
        self._events.append(Connected())
        if self._close_requested:
            snd.fin = 1 + snd.buf.end
            self._move(Ev.CLOSE)  # FIN-WAIT-1 (RFC 9293 §3.10.4: the deferred CLOSE)

    def _enter_time_wait(self, ev: Ev, now: float) -> None:
        self._move(ev)
        self._timers.time_wait(now)  # MUST-13
        self._snd.rto_at = self._snd.persist_at = None

    def _enter_closed(self, ev: Ev) -> None:
        self._move(ev)
        snd, rcv = self._snd, self._rcv
        snd.rto_at = snd.persist_at = self._timers.timewait_at = rcv.delack_at = None
        rcv.ack_now = snd.retx_pending = snd.probe_pending = snd.ka_pending = False
        rcv.ooo.clear()
        rcv.ooo_fin = None
        rcv.gap = False
        self._events.append(Closed())

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _slow_path(self, seg: TcpSegment, now: float) -> None:
        st = self._state
        if st is State.CLOSED:
            self._drop("closed")
            rst = reset_reply(seg)  # RFC 9293 §3.10.7.1
            if rst is not None:
                self._rst_out.append(rst)
            return
        if st is not State.LISTEN and st is not State.SYN_SENT:
            self._on_synchronized(seg, now)
            return
        hs = self._hs
        res = hs.on_listen(seg, now) if st is State.LISTEN else hs.on_syn_sent(seg, now)
        if res is None:
            return
        if isinstance(res, TcpSegment):
            self._rst_out.append(res)
        elif res is Ev.RCV_SYN_ACK:
            self._establish(res)
            self._rcv.ack_now = True
        elif res is Ev.RCV_RST:
            self._events.append(ConnectionReset("refused"))
            self._enter_closed(res)
        else:
            self._move(res)  # a SYN: SYN-RECEIVED

    def _on_synchronized(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.4, SYN-RECEIVED and every synchronized state."""
        f = seg.flags
        st = self._state
        rcv = self._rcv
        if st is State.SYN_RECEIVED and f & SYN and not f & RST and seg.seq == rcv.irs:
            if not f & ACK:
                self._snd.nxt = 0  # the peer lost our SYN-ACK: send it again
                return
            if self._hs.crossing_syn_ack(seg, now):
                self._establish(Ev.RCV_ACK_OF_SYN)
                return
        # RFC 7323 §3.2 / §5.3: timestamps, then PAWS, before the sequence test.
        ts = seg.ts
        payload = seg.payload
        seg_len = len(payload) + (1 if f & SYN else 0) + (1 if f & FIN else 0)
        if rcv.ts_on and not f & RST and rcv.paws_rejects(ts, now, seg_len):
            return
        seg_abs = rcv.unwrap(seg.seq)
        # First: the acceptability test (RFC 9293 §3.10.7.4).
        verdict = rcv.acceptable(seg_abs, seg_len, bool(f & ACK))
        if verdict is Acceptable.NO:
            if f & RST:
                self._drop("rst_out_of_window")
                return
            rcv.unacceptable(seg_abs, len(payload), seg_len, now)
            if st is State.TIME_WAIT and f & FIN and seg_abs + seg_len == rcv.nxt:
                # RFC 9293 §3.10.7.4 TIME-WAIT: the peer's FIN again: ACK, restart 2 MSL.
                self._timers.time_wait(now)
            return
        text = verdict is Acceptable.YES  # else an ACK at RCV.NXT in a zero window
        # Second: RST (RFC 9293 §3.10.7.4 with RFC 5961 §3.2).
        if f & RST:
            if seg_abs != rcv.nxt:
                self._drop("rst_challenged")
                rcv.challenge(now)
                return
            self._on_reset()
            return
        # Fourth: SYN in a synchronized state gets a challenge ACK (RFC 5961 §4.2).
        if f & SYN:
            self._drop("syn_challenged")
            rcv.challenge(now)
            return
        # Fifth: the ACK field.
        if not f & ACK:
            self._drop("no_ack")
            return
        if ts is not None:
            rcv.take_ts(ts[0], seg_abs, now)  # RFC 7323 §4.3
        if st is State.SYN_RECEIVED:
            rst = self._hs.syn_acked(seg, seg_abs, now)
            if rst is not None:
                self._rst_out.append(rst)
                return
            self._establish(Ev.RCV_ACK_OF_SYN)
        if not self._on_ack(seg, seg_abs, now):
            return
        # RFC 3168 §6.1.3, §6.1.5, §6.1.6: in the window (or a zero-window probe), and past
        # the ACK checks: a segment dropped there changes no echo state
        if self._snd.ecn and (f & CWR or seg.ecn == CE):
            rcv.ecn_input(f, seg.ecn, bool(payload))
        st = self._state
        if st is State.CLOSED:
            return
        # Sixth to eighth: URG, the text, FIN (RFC 9293 §3.10.7.4), by the Receiver.
        urg = seg.urg if f & URG else 0
        if rcv.urg_text_fin(seg_abs, urg, payload, bool(f & FIN), text, st in CAN_RECEIVE, now):
            self._on_fin(now)

    def _on_ack(self, seg: TcpSegment, seg_abs: int, now: float) -> bool:
        """Fifth step: the Sender takes the ACK; an ACK of our FIN moves the state.
        Returns False when the segment is finished."""
        res = self._snd.on_ack(seg, seg_abs, now)
        if res is not AckResult.OK:
            if res is AckResult.UNSENT:
                self._drop("ack_of_unsent")  # RFC 9293: drop, send an ACK (rate limited)
                self._rcv.invalid_ack(len(seg.payload) or seg.flags & (SYN | FIN), now)
                return False
            if res is AckResult.TOO_OLD:
                self._drop("ack_too_old")  # RFC 5961 §5.2: challenge ACK, drop
                self._rcv.challenge(now)
                return False
            return True  # an old duplicate ACK: ignored, the text still counts
        if seg.flags & ECE:
            self._snd.ecn_echo()  # RFC 3168 §6.1.2 (a no-op unless ECN was negotiated)
        if self._snd.fin_acked:
            st = self._state
            if st is State.FIN_WAIT_1:
                self._move(Ev.RCV_ACK_OF_FIN)
            elif st is State.CLOSING:
                self._enter_time_wait(Ev.RCV_ACK_OF_FIN, now)
            elif st is State.LAST_ACK:
                self._enter_closed(Ev.RCV_ACK_OF_FIN)
                return False
        return True

    def _on_fin(self, now: float) -> None:
        """RFC 9293 §3.10.7.4 eighth step: the peer's FIN took effect (the Receiver said)."""
        st = self._state
        if st is State.ESTABLISHED or st is State.SYN_RECEIVED:
            self._move(Ev.RCV_FIN)  # CLOSE-WAIT
        elif st is State.FIN_WAIT_1:
            if self._snd.fin_acked:
                self._move(Ev.RCV_ACK_OF_FIN)  # our FIN is acknowledged too: FIN-WAIT-2 ...
                self._enter_time_wait(Ev.RCV_FIN, now)  # ... and on to TIME-WAIT
            else:
                self._move(Ev.RCV_FIN)  # CLOSING
        elif st is State.FIN_WAIT_2:
            self._enter_time_wait(Ev.RCV_FIN, now)

    def _on_reset(self) -> None:
        """Second step, an acceptable RST: MUST-11 back to LISTEN, else reported (MUST-12)."""
        st = self._state
        if st is State.SYN_RECEIVED and self._hs.passive:
            self._move(Ev.RCV_RST_PASSIVE)
            self._hs.back_to_listen()
            self._events.append(ResetToListen())
            return
        if st is not State.TIME_WAIT:
            self._events.append(
                ConnectionReset("refused" if st is State.SYN_RECEIVED else "reset")
            )
        self._enter_closed(Ev.RCV_RST)

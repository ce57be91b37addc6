"""TcpConnection: a sans-I/O TCP endpoint (RFC 9293) driven by segments and `now`.

Rules (each handler cites the clause it implements):
- Segments and the caller's clock go in (`receive_segment(seg, now)`, `handle_timer(now)`);
  segments, events and one deadline come out (`segments_to_send(now)`, `next_event()`,
  `get_timer()`). No sockets, threads, globals or clock inside (aioquic's shape).
- A misbehaving peer never raises: its segment is dropped and counted in `drops`, or
  answered with an ACK or a RST, or ends the connection with an event. Misuse of this API
  raises LocalProtocolError; a state change the table lacks raises TransitionError (a bug).
- The state changes only in `_move`, along an edge of the table in stack/state.py.
- Input follows RFC 9293 §3.10.7 ("SEGMENT ARRIVES"): header prediction here, every other
  segment state by state in stack/arrives.py (SegmentArrives, this class's base: CLOSED,
  SYN-RECEIVED and the synchronized states, with RFC 5961, RFC 7323 and RFC 2018) and
  stack/handshake.py (LISTEN, SYN-SENT). ICMP errors: RFC 9293 §3.9.1.4 (MUST-54..56,
  `icmp_effect` in stack/events.py) and RFC 5927 §4.1 (an error quoting a sequence number
  outside [SND.UNA, SND.NXT] is dropped). Urgent data: RFC 9293 §3.8.5 (MUST-30..33,
  inline only: no out-of-band byte; urgent data does not bypass Nagle or the windows).
  ECN: RFC 3168 §6.1 (negotiated in stack/handshake.py; the sender's marks, CWR and its
  response to ECE in stack/send.py; the receiver's ECE in stack/receive.py). The IP ECN
  field comes in and goes out as `TcpSegment.ecn`; the adapter reads and writes the IP
  header.

Theory of operation: one class holds the state and routes; the work is done by components it
builds and hands to each other explicitly: the Sender (stack/send.py: SND.*, output,
retransmission; with its CongestionControl, Scoreboard and RtoEstimator), the Receiver
(stack/receive.py: RCV.*, reassembly, ACK policy, window), the Handshake
(stack/handshake.py: ISS, options, LISTEN and SYN-SENT input), the Timers (stack/timers.py)
and the events queue. Components report what happened (an event of the table, "the FIN took
effect", "give up"); the connection makes the transition. Positions are absolute ints
(stack/seq.py). `receive_segment` first tries header prediction (RFC 9293 §3.10 note, Van
Jacobson): ESTABLISHED, only ACK (and PSH; so no ECE or CWR), the expected sequence number,
nothing out of order, no CE mark (RFC 3168), an ACK in range; then in-order data or a pure
ACK of new data is handled inline on the components' fields (the per-segment cost: locals,
no extra calls). Everything else takes the per-state slow path (stack/arrives.py). Output is
pulled: input only updates state and sets flags; `segments_to_send` turns them into
segments, so the ACKs for a whole batch of input are aggregated (MUST-58/59).
"""

from __future__ import annotations

from collections import deque

from stack.arrives import SegmentArrives
from stack.cubic import make_cc
from stack.events import (
    ConnectionReset,
    DataReceived,
    Event,
    IcmpEffect,
    IcmpKind,
    LocalProtocolError,
    SoftError,
    icmp_effect,
)
from stack.handshake import Endpoint, Handshake, reset_reply
from stack.loss import RtoEstimator, Scoreboard
from stack.receive import DATA_MARK, Receiver, keep
from stack.send import Sender
from stack.seq import HALF, MASK, ts_offset
from stack.state import CAN_RECEIVE, CAN_SEND, Ev, State
from stack.tcp_config import TcpConfig
from stack.timers import Timers
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment

__all__ = ["TcpConnection", "Endpoint", "reset_reply"]

_ACK_PSH = ACK | PSH
_ESTABLISHED = State.ESTABLISHED
_ABORT_SENDS_RST = frozenset(
    {State.SYN_RECEIVED, State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2,
     State.CLOSE_WAIT}
)


class TcpConnection(SegmentArrives):
    """One TCP connection between `local` and `remote` (packed address, port)."""

    def __init__(
        self,
        local: Endpoint,
        remote: Endpoint,
        config: TcpConfig | None = None,
        *,
        iss: int | None = None,
    ) -> None:
        cfg = config if config is not None else TcpConfig()
        self.config = cfg
        self.local = local
        self.remote = remote
        self._state = State.CLOSED
        self.drops: dict[str, int] = {}
        self.fast_path = 0  # segments handled by header prediction
        self._events: deque[object] = deque()
        my_mss = cfg.mss_for(len(local[0]))  # MMS_R and MMS_S (MUST-67)
        mss = min(536 if len(local[0]) == 4 else 1220, my_mss)  # MUST-15 until the SYN
        self._rcv = Receiver(cfg, my_mss, self._events, self.drops)
        self._snd = Sender(
            cfg, (local[1], remote[1]), mss, ts_offset(cfg.isn_key, local, remote), self._rcv,
            make_cc(cfg.congestion, mss, cfg.initial_cwnd or None), Scoreboard(),
            RtoEstimator(cfg.rto_initial, cfg.rto_min, cfg.rto_max, var_min=cfg.rto_var_min),
        )
        self._hs = Handshake(cfg, local, remote, iss, self._snd, self._rcv, self.drops)
        self._rst_out: list[TcpSegment] = []
        self._timers = Timers(cfg)
        self._close_requested = False
        self._soft_error: tuple[str, int, float] | None = None  # the last ICMP soft error

    # ------------------------------------------------------------------ API: state

    @property
    def state(self) -> State:
        """The RFC 9293 state."""
        return self._state

    @property
    def passive(self) -> bool:
        """True if this connection was opened by listen() (a SYN created it)."""
        return self._hs.passive

    @property
    def rcv_nxt_seq(self) -> int:
        """RCV.NXT as a 32-bit sequence number."""
        return (self._rcv.irs + self._rcv.nxt) & MASK

    @property
    def receive_window(self) -> int:
        """Bytes of window we last advertised beyond RCV.NXT (RCV.WND)."""
        return max(self._rcv.adv - self._rcv.nxt, 0)

    @property
    def send_mss(self) -> int:
        """Payload bytes per wire segment (RFC 9293 MUST-16); the adapter's GSO size."""
        return self._snd.mss

    @property
    def send_buffer_free(self) -> int:
        """Bytes send() would accept now."""
        return self._snd.buf.free

    @property
    def buffered(self) -> int:
        """Payload bytes this connection holds in memory: its send buffer (unsent and
        unacknowledged) and its receive side (in order, not yet taken, and out of order)."""
        rcv = self._rcv
        return len(self._snd.buf) + rcv.rx_len + rcv.ooo.nbytes

    @property
    def bytes_in(self) -> int:
        """Bytes of the peer's stream received in order."""
        return self._rcv.bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes of our stream the peer acknowledged."""
        return self._snd.bytes_out

    @property
    def retransmissions(self) -> int:
        """Segments sent again (RTO, fast retransmit, recovery, probes of sent data)."""
        return self._snd.retransmissions

    @property
    def ecn(self) -> bool:
        """ECN was negotiated on this connection (RFC 3168 §6.1.1)."""
        return self._snd.ecn

    @property
    def ce_marks(self) -> int:
        """CE-marked segments received while ECN is on (RFC 3168 §6.1.3)."""
        return self._rcv.ce_marks

    @property
    def ecn_cuts(self) -> int:
        """cwnd reductions made for an ECN-Echo (RFC 3168 §6.1.2)."""
        return self._snd.ecn_cuts

    @property
    def ts_recent(self) -> int | None:
        """TS.Recent: the peer's last timestamp value we took (RFC 7323 §4.3), or None."""
        return self._rcv.ts_recent

    @property
    def urgent_up(self) -> int:
        """RCV.UP as a stream offset: the peer's urgent data ends with its `urgent_up`-th
        byte (0: it never sent any; RFC 9293 §3.8.5, RFC 6093 §2: SEG.UP points at the
        first non-urgent octet)."""
        return self._rcv.up

    @property
    def urgent_remaining(self) -> int:
        """Bytes of the peer's urgent data not yet read by the application (MUST-33)."""
        return self._rcv.urgent_remaining

    # ------------------------------------------------------------------ API: open and close

    def connect(self, now: float) -> None:
        """Active OPEN (RFC 9293 §3.10.1): send a SYN. Raises LocalProtocolError unless CLOSED."""
        if self._state is not State.CLOSED or self._snd.max:
            raise LocalProtocolError(f"connect() in state {self._state}")
        self._hs.choose_iss(now)
        self._move(Ev.ACTIVE_OPEN)
        self._snd.una = self._snd.nxt = 0

    def listen(self) -> None:
        """Passive OPEN (RFC 9293 §3.10.1): wait for a SYN. Raises unless CLOSED."""
        if self._state is not State.CLOSED or self._snd.max:
            raise LocalProtocolError(f"listen() in state {self._state}")
        self._move(Ev.PASSIVE_OPEN)
        self._hs.passive = True

    def close(self) -> None:
        """CLOSE (RFC 9293 §3.10.4): send FIN after the queued data (half-close).

        Raises LocalProtocolError if close() was already called or the connection is closed.
        """
        st = self._state
        if self._close_requested or st is State.CLOSED:
            raise LocalProtocolError(f"close() in state {st}")
        self._close_requested = True
        if st is State.LISTEN or st is State.SYN_SENT:
            self._enter_closed(Ev.CLOSE)
            return
        self._snd.fin = 1 + self._snd.buf.end
        if st is State.ESTABLISHED or st is State.CLOSE_WAIT:
            self._move(Ev.CLOSE)  # FIN-WAIT-1 or LAST-ACK
        # SYN-RECEIVED: the FIN goes out once ESTABLISHED (RFC 9293 §3.10.4).

    def abort(self) -> None:
        """ABORT (RFC 9293 §3.10.5): send RST <SEQ=SND.NXT> in SYN-RECEIVED, ESTABLISHED,
        FIN-WAIT-1/2 and CLOSE-WAIT; in the other states just delete the TCB. Then CLOSED."""
        st = self._state
        if st is State.CLOSED:
            return
        if st in _ABORT_SENDS_RST:
            self._rst_out.append(self._snd.rst())  # <SEQ=SND.NXT><CTL=RST>
        self._enter_closed(Ev.ABORT)

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
        buf = self._snd.buf
        n = buf.append(data)
        if urgent and n:
            self._snd.up = 1 + buf.end  # SND.UP (MUST-31)
        return n

    def keepalive_now(self) -> bool:
        """Send one keep-alive probe <SEQ=SND.NXT-1><CTL=ACK> at the next output (RFC 9293
        §3.8.4), when ESTABLISHED or CLOSE-WAIT with nothing in flight or queued. True if
        one will go. It does not count against `keepalive_probes` (the application's own
        probe, e.g. a middlebox passing on its other peer's)."""
        st = self._state
        if (st is State.ESTABLISHED or st is State.CLOSE_WAIT) and self._snd.idle():
            self._snd.ka_pending = True
            return True
        return False

    def is_keepalive(self, seg: TcpSegment) -> bool:
        """`seg` is a keep-alive probe for this connection (RFC 9293 §3.8.4): no SYN, FIN or
        RST, at most one byte, at RCV.NXT - 1 (checked before it is received)."""
        return (len(seg.payload) <= 1 and not seg.flags & (SYN | FIN | RST)
                and seg.seq == (self._rcv.irs + self._rcv.nxt - 1) & MASK
                and self._state in CAN_RECEIVE)

    def read(self, max_bytes: int = -1) -> bytes:
        """Take up to `max_bytes` (all if negative) of in-order received bytes."""
        if not self._rcv.rx:
            return b""
        data = self._rcv.read(max_bytes)
        self._maybe_window_update()
        return data

    def consumed(self, n: int) -> None:
        """The application processed `n` delivered bytes: reopen that much window."""
        self._rcv.consumed(n)
        self._maybe_window_update()

    def next_event(self) -> Event | None:
        """Return the next event, or None when there is none for now."""
        events = self._events
        while events:
            ev = events.popleft()
            if ev is DATA_MARK:
                data = self._rcv.take()
                if not data:
                    continue
                self._maybe_window_update()
                return DataReceived(data)
            assert isinstance(ev, Event)
            return ev
        return None

    def _maybe_window_update(self) -> None:
        """After the application freed space, announce a window that grew by a useful
        amount (RFC 9293 §3.8.6.2.2: by min(RCV.BUFF/2, 2 MSS), so no silly updates)."""
        if self._rcv.window_grew() and self._state in CAN_RECEIVE:
            self._rcv.ack_now = True

    # ------------------------------------------------------------------ output

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Return the segments to transmit now, in order (possibly empty). Never raises.

        The RSTs input queued come first; the Sender builds the rest (Sender.output)."""
        out = self._rst_out
        snd = self._snd
        if (
            self._state is _ESTABLISHED
            and not out
            and not self._rcv.ack_now
            and snd.buf.end < snd.nxt
            and not (snd.retx_pending or snd.probe_pending or snd.ka_pending)
            and snd.fin is None
            and not snd.cc.in_recovery
        ):
            return []  # the common "nothing due" case, without the general checks
        if out:
            self._rst_out = []
        else:
            out = []
        return snd.output(now, self._state, out)

    # ------------------------------------------------------------------ input

    def receive_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one segment addressed to this connection (RFC 9293 §3.10.7). Never raises.

        What the connection keeps of the payload is copied (a view into an immutable
        `bytes` frame is kept as it is: stack/receive.py `keep`), so the caller may reuse
        the buffer behind `seg.payload` as soon as this returns.
        """
        # Header prediction (RFC 9293 §3.10 note; Van Jacobson). One unpack of the tuple
        # and locals instead of repeated attribute lookups: this is the per-segment cost.
        (_sp, _dp, seq, ack, flags, window, payload, _urg, _mss, _ws, _sp2, ts, sack, ecn) = seg
        rcv = self._rcv
        rcv.last_rx = now
        rcv_nxt = rcv.nxt
        if (
            self._state is _ESTABLISHED
            and (flags == ACK or flags == _ACK_PSH)
            and seq == (rcv.irs + rcv_nxt) & MASK
            and not sack  # SACK information goes to the scoreboard (slow path)
            and not rcv.gap  # nothing (bytes or a FIN) held beyond RCV.NXT
            and ecn != 3  # a CE mark is the slow path's (RFC 3168 §6.1.3, stack/arrives.py)
        ):
            if rcv.ts_on:
                if ts is None:
                    self._slow_path(seg, now)
                    return
                recent = rcv.ts_recent
                if recent is not None and (ts[0] - recent) & MASK >= HALF:
                    self._slow_path(seg, now)
                    return
            snd = self._snd
            una = snd.una
            d = (ack - snd.iss - una) & MASK
            n = len(payload)
            if n:
                if d == 0 and window << snd.wscale == snd.wnd and n <= rcv.adv - rcv_nxt:
                    self.fast_path += 1
                    if ts is not None and rcv_nxt <= rcv.last_ack_sent:
                        rcv.ts_recent = ts[0]  # RFC 7323 §4.3
                        rcv.ts_recent_at = now
                    # In-order text (§3.10.7.4 seventh step), Receiver.accept inlined.
                    rcv.nxt = rcv_nxt + n
                    rcv.bytes_in += n
                    rcv.rx.append(payload if type(payload) is bytes else keep(payload))
                    rcv.rx_len += n
                    ev = self._events
                    if not ev or ev[-1] is not DATA_MARK:
                        ev.append(DATA_MARK)
                    u = rcv.unacked + n
                    rcv.unacked = u
                    big = rcv.big
                    if n > big:  # estimate the peer's full segment size (Linux rcv_mss)
                        big = rcv.big = min(n, rcv.full_mss())
                    if u >= 2 * big:  # SHLD-19: ACK every second full segment
                        rcv.ack_now = True
                    elif rcv.delack_at is None:
                        rcv.delack_at = now + rcv.delay  # MUST-40: < 0.5 s
                    return
            elif 0 < d <= snd.max - una:
                self.fast_path += 1
                if ts is not None and rcv_nxt <= rcv.last_ack_sent:
                    rcv.ts_recent = ts[0]  # RFC 7323 §4.3
                    rcv.ts_recent_at = now
                # New data acknowledged, and the window (WL1 <= RCV.NXT, WL2 < SEG.ACK).
                snd.new_ack(una + d, d, ts, now, window << snd.wscale, rcv_nxt)
                return
        elif (rcv.gap and payload and not sack and (flags == ACK or flags == _ACK_PSH)
              and self._state is _ESTABLISHED and ecn != 3):
            snd = self._snd  # the run above a hole: no new ACK, same window (Receiver)
            if (ack == (snd.iss + snd.una) & MASK and window << snd.wscale == snd.wnd
                    and rcv.ooo_tail(seq, payload, ts)):
                self.fast_path += 1
                return
        self._slow_path(seg, now)


    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The earliest deadline (seconds, the caller's clock) or None when idle."""
        return self._timers.earliest(self._state, self._snd, self._rcv)

    def handle_timer(self, now: float) -> None:
        """Act on every deadline at or before `now`; call segments_to_send(now) after."""
        ev = self._timers.fire(now, self._state, self._snd, self._rcv)
        if ev is not None:
            if ev is Ev.GIVE_UP:
                self._events.append(ConnectionReset("timeout"))  # R2 or keep-alive
            self._enter_closed(ev)

    # ------------------------------------------------------------------ ICMP

    def path_mtu(self, mtu: int) -> None:
        """An ICMP Fragmentation Needed / Packet Too Big reported `mtu` for this path
        (RFC 1191 §6.3, RFC 8201 §5.2; RFC 9293 MUST-54/56: act on it, never abort).

        Lowers the send MSS (never below the RFC 9293 MUST-15 defaults 536 / 1220 less
        options) and resends what is in flight with the new size. Larger values are
        ignored (an attacker cannot raise the MSS above what the peer offered)."""
        self._snd.path_mtu(mtu, len(self.local[0]) == 4, self._state is State.SYN_SENT)

    def icmp_error(self, kind: IcmpKind | str, code: int, mtu: int | None = None,
                   now: float = 0.0, *, seq: int | None = None) -> None:
        """An ICMP error for this connection (RFC 9293 §3.9.1.4, MUST-54; what each kind and
        code means: stack/events.py `icmp_effect`). Never raises for what the ICMP says; an
        unknown `kind` is our caller's error (ValueError). RFC 5927 §4.1: an error quoting
        a sequence number `seq` outside [SND.UNA, SND.NXT] is dropped."""
        k = IcmpKind(kind)
        st = self._state
        if st is State.CLOSED or st is State.LISTEN:
            self._drop("icmp_no_connection")
            return
        effect = icmp_effect(k, code, len(self.local[0]) == 4)
        if effect is IcmpEffect.IGNORE:
            self._drop("icmp_source_quench")  # MUST-55: silently discarded
            return
        snd = self._snd
        if seq is not None and (seq - snd.iss - snd.una) & MASK > max(snd.max - snd.una, 1):
            self._drop("icmp_out_of_window")  # RFC 5927 §4.1
            return
        if effect is IcmpEffect.PATH_MTU:
            if mtu:
                self.path_mtu(mtu)
        elif effect is IcmpEffect.HARD:
            self._drop("icmp_hard_error")  # SHLD-26: abort
            self._events.append(ConnectionReset("unreachable"))
            self._enter_closed(Ev.GIVE_UP)
        else:
            self._soft_error = (k.value, code, now)
            ev = SoftError(k, code)
            events = self._events
            if not events or events[-1] != ev:  # a burst of the same error is one event
                events.append(ev)  # MUST-56 / SHLD-25

    # ------------------------------------------------------------------ introspection

    def info(self) -> dict[str, object]:
        """A JSON-able snapshot: state, RTT, windows, counters and negotiated options."""
        snd, rcv = self._snd, self._rcv
        rto, cc = snd.rto, snd.cc
        return {
            "state": str(self._state), "srtt": rto.srtt, "rto": rto.rto, "cwnd": cc.cwnd,
            "ssthresh": cc.ssthresh, "in_recovery": cc.in_recovery,
            "retransmissions": snd.retransmissions, "fast_path": self.fast_path,
            "spurious_rtos": snd.spurious_rtos, "spurious_recoveries": snd.spurious_recoveries,
            "bytes_in": rcv.bytes_in, "bytes_out": snd.bytes_out, "mss": snd.mss,
            "rcv_mss": rcv.mss, "wscale": (snd.wscale, rcv.wscale) if rcv.ws_on else None,
            "sack": snd.sack_on, "ts": snd.ts_on, "snd_wnd": snd.wnd,
            "rcv_wnd": max(rcv.adv - rcv.nxt, 0),
            "unsent": max(snd.buf.end - max(snd.nxt - 1, 0), 0),
            "in_flight": snd.nxt - snd.una, "out_of_order": rcv.ooo.nbytes,
            "rcv_buff": rcv.cap, "snd_buff": snd.buf.capacity, "tlp": snd.tlp_probes,
            "drops": dict(self.drops), "soft_error": self._soft_error,
            "ecn": snd.ecn, "ce_marks": rcv.ce_marks, "ecn_cuts": snd.ecn_cuts,
        }

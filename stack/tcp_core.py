"""ConnectionCore: the state of one TCP connection, its timers, and shared helpers.

Rules:
- RFC 9293 §3.3.1: the send and receive sequence variables (SND.UNA, SND.NXT, SND.WND,
  SND.WL1, SND.WL2, ISS, RCV.NXT, RCV.WND, IRS), kept as absolute positions
  (stack/seq.py): our SYN is 0, our first data byte 1; the peer's likewise from IRS.
- Timers (RFC 9293 §3.8): retransmission (RFC 6298 §5), delayed ACK (§3.8.6.3, MUST-40),
  persist / zero-window probe (§3.8.6.1, MUST-35/36/37: probing goes on while the window
  stays zero, without counting toward R2), TIME-WAIT 2*MSL (MUST-13), keep-alive
  (§3.8.4, off by default). `get_timer()` is the earliest deadline; `handle_timer(now)`
  acts on every expired one.
- RFC 1191 §6.3 / RFC 8201 §5.2 (`path_mtu`): a smaller path MTU lowers the send MSS and
  what is in flight is sent again; an ICMP error never aborts (RFC 9293 MUST-56).
- RFC 9293 §3.9.1.4 (`icmp_error`): MUST-54, act on ICMP errors for this connection.
  Destination Unreachable codes 0, 1, 5, Time Exceeded and Parameter Problem are soft
  errors: never abort (MUST-56), report a SoftError event (SHLD-25). Unreachable codes 2
  and 3 (protocol, port) abort with ConnectionReset("unreachable") (SHLD-26); so does
  ICMPv6 code 4 (port unreachable, RFC 4443 §3.1), the other ICMPv6 codes are soft.
  IPv4 code 4 is Fragmentation Needed: with an MTU it is path MTU discovery (RFC 1191),
  never an abort (aborting would let PMTUD kill the connection). Source Quench is
  ignored (MUST-55, RFC 6633). RFC 5927 §4.1: when the caller passes the quoted segment's
  sequence number, an error for a number outside [SND.UNA, SND.NXT] is dropped.
- RFC 6298 §5.4-5.6 on expiry: retransmit the earliest unacknowledged segment (go back to
  SND.UNA), double the RTO, restart the timer; RFC 5681 §3.1: cwnd = 1 SMSS; RFC 2018 §8:
  forget SACK information. R2 (`max_retries`, `syn_retries`) ends the connection with
  ConnectionReset("timeout") (MUST-20..23).
- RFC 9293 §3.10.7.1: a segment for a CLOSED connection gets <SEQ=SEG.ACK><CTL=RST> if it
  has ACK, else <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>; an RST is never answered.

Theory of operation: the connection is four classes in a line, one concern per module:
ConnectionCore (state, timers, helpers) <- OutputMixin (stack/tcp_output.py: turning state
into segments) <- OpenMixin (stack/tcp_open.py: connect/listen, LISTEN and SYN-SENT
input) <- TcpConnection (stack/connection.py: API and input). Input only sets
flags and deadlines; output and timers read them. The application side of the receive
queue is here too: in-order bytes wait in `_rx` as a list of chunks, and a marker in the
event queue says where they are delivered, so that DataReceived keeps its place between
Connected and PeerFinished while read() can take the same bytes directly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from stack.buffers import ReassemblyBuffer, SendBuffer
from stack.congestion import NewReno
from stack.events import (
    Closed,
    ConnectionReset,
    DataReceived,
    Event,
    IcmpKind,
    LocalProtocolError,
    SoftError,
)
from stack.rto import RtoEstimator
from stack.seq import MASK, ts_offset
from stack.state import Ev, State, next_state
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, RST, TcpSegment

__all__ = ["ConnectionCore", "Endpoint", "reset_reply", "DATA_MARK"]

Endpoint = tuple[bytes, int]  # (packed IPv4/IPv6 address, port)
DATA_MARK = object()  # in the event queue: "deliver the receive queue here"
_OPEN_RECEIVE = frozenset({State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2})


def reset_reply(seg: TcpSegment) -> TcpSegment | None:
    """The RST answering `seg` when no connection takes it (RFC 9293 §3.10.7.1).

    Returns None for an RST ("never answer an RST with an RST").
    """
    f = seg.flags
    if f & RST:
        return None
    if f & ACK:
        return TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
    return TcpSegment(
        seg.dst_port, seg.src_port, 0, (seg.seq + seg.seg_len) & MASK, RST | ACK, 0
    )


class ConnectionCore:
    """State, timers and helpers shared by input and output. Use TcpConnection."""

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
        self._iss_given = iss
        self._iss = iss if iss is not None else 0
        self._irs = 0
        self._passive = False
        # Send side (absolute positions; RFC 9293 §3.3.1 names).
        self._snd_una = 0
        self._snd_nxt = 0
        self._snd_max = 0
        self._snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._max_snd_wnd = 0
        self._snd_wscale = 0
        self._sendbuf = SendBuffer(cfg.send_buffer)
        self._fin_abs: int | None = None
        default_mss = 536 if len(local[0]) == 4 else 1220  # MUST-15
        self._peer_mss = default_mss
        self._my_mss = cfg.mss_for(len(local[0]))  # MMS_R and MMS_S (MUST-67)
        # Receive-window constants (RFC 9293 §3.8.6.2.2): the smallest window opening we
        # announce (MUST-39) and the growth that is worth a window update.
        self._rcv_buf = cfg.recv_buffer
        self._sws_min = min(cfg.recv_buffer // 2, self._my_mss)
        self._wu_min = min(cfg.recv_buffer // 2, 2 * self._my_mss)
        self._send_mss = min(default_mss, self._my_mss)
        # Receive side.
        self._rcv_nxt = 0
        self._rcv_adv = 0
        self._rcv_wscale = 0
        self._rx: list[bytes | memoryview] = []
        self._rx_len = 0
        self._rx_held = 0
        self._ooo = ReassemblyBuffer(cfg.reassembly_cap or cfg.recv_buffer, cfg.reassembly_ranges)
        self._ooo_fin: int | None = None
        self._rcv_up = 0  # stream offset where the peer's urgent data ends (RCV.UP)
        self._snd_up = 0  # position of our first non-urgent octet (SND.UP); 0: none
        self._peer_fin = False
        # Negotiated options (RFC 7323, RFC 2018).
        self._ts_on = False
        self._sack_on = False
        self._ws_on = False
        self._ts_recent: int | None = None
        self._ts_recent_at = 0.0
        self._ts_off = ts_offset(cfg.isn_key, local, remote)
        self._last_ack_sent = 0
        self._sacked: list[tuple[int, int]] = []
        self._dsack: tuple[int, int] | None = None  # a duplicate to report (RFC 2883)
        self._recovery_pt = 0
        self._rto_tsval: int | None = None  # our TSval when the last RTO fired
        # ACK generation (RFC 9293 §3.8.6.3, RFC 5681 §4.2).
        self._ack_now = False
        self._delack_at: float | None = None
        self._unacked_bytes = 0
        self._rcv_big = 536  # largest in-order segment seen, at most one MSS
        # Timers and recovery.
        self._rto_at: float | None = None
        self._persist_at: float | None = None
        self._persist_backoff = 0
        self._timewait_at: float | None = None
        self._last_rx = 0.0  # time of the last segment from the peer (keep-alive idle)
        self._ka_sent = 0
        self._ka_pending = False
        self._ka_at = 0.0  # when the next keep-alive probe is due (after the first)
        self._rto = RtoEstimator(cfg.rto_initial, cfg.rto_min, cfg.rto_max)
        self._cc = NewReno(self._send_mss, cfg.initial_cwnd or None)
        self._rtt_abs: int | None = None
        self._rtt_at = 0.0
        self._retries = 0
        self._retx_pending = False
        self._probe_pending = False
        self._rst_out: list[TcpSegment] = []
        self._last_send_at: float | None = None
        self._chal_start = 0.0
        self._chal_count = 0
        self._close_requested = False
        self._soft_error: tuple[str, int, float] | None = None  # the last ICMP soft error
        # Called with this connection when an API call may have made output or moved a
        # deadline (a TcpDemux's dirty set); None when nobody watches.
        self._watch: Callable[[Any], None] | None = None
        # Events and counters.
        self._events: deque[object] = deque()
        self.drops: dict[str, int] = {}
        self.retransmissions = 0
        self.fast_path = 0  # segments handled by header prediction
        self.bytes_in = 0
        self.bytes_out = 0


    # ------------------------------------------------------------------ application side

    def read(self, max_bytes: int = -1) -> bytes:
        """Take up to `max_bytes` (all if negative) of in-order received bytes."""
        if not self._rx:
            return b""
        data = b"".join(self._rx)
        if 0 <= max_bytes < len(data):
            rest = data[max_bytes:]
            data = data[:max_bytes]
            self._rx = [rest]
        else:
            self._rx = []
        self._rx_len -= len(data)
        if not self.config.auto_consume:
            self._rx_held += len(data)
        self._maybe_window_update()
        return data

    def consumed(self, n: int) -> None:
        """The application processed `n` delivered bytes: reopen that much window."""
        if n < 0 or n > self._rx_held:
            raise LocalProtocolError(f"consumed({n}) but {self._rx_held} bytes are held")
        self._rx_held -= n
        self._maybe_window_update()

    @property
    def urgent_remaining(self) -> int:
        """Bytes of the peer's urgent data not yet read by the application (MUST-33)."""
        return max(self._rcv_up - (self.bytes_in - self._rx_len), 0)

    def next_event(self) -> Event | None:
        """Return the next event, or None when there is none for now."""
        events = self._events
        while events:
            ev = events.popleft()
            if ev is DATA_MARK:
                rx = self._rx
                if not rx:
                    continue
                data = rx[0] if len(rx) == 1 and type(rx[0]) is bytes else b"".join(rx)
                self._rx = []
                self._rx_len = 0
                if not self.config.auto_consume:
                    self._rx_held += len(data)
                self._maybe_window_update()
                return DataReceived(data)
            assert isinstance(ev, Event)
            return ev
        return None

    def path_mtu(self, mtu: int) -> None:
        """An ICMP Fragmentation Needed / Packet Too Big reported `mtu` for this path
        (RFC 1191 §6.3, RFC 8201 §5.2; RFC 9293 MUST-54/56: act on it, never abort).

        Lowers the send MSS (never below the RFC 9293 MUST-15 defaults 536 / 1220 less
        options) and resends what is in flight with the new size. Larger values are
        ignored (an attacker cannot raise the MSS above what the peer offered)."""
        hdr = 40 if len(self.local[0]) == 4 else 60
        floor = (536 if hdr == 40 else 1220) - (12 if self._ts_on else 0)
        new = max(mtu - hdr - (12 if self._ts_on else 0), floor)
        if new >= self._send_mss:
            return
        if self._watch is not None:
            self._watch(self)
        self._send_mss = new
        self._cc.smss = new
        self._cc.cwnd = max(min(self._cc.cwnd, self._cc.ssthresh), 2 * new)
        if self._snd_nxt > self._snd_una and self._state is not State.SYN_SENT:
            self._snd_nxt = self._snd_una  # RFC 1191 §6.3: retransmit with the smaller size
            self._rtt_abs = None

    def icmp_error(
        self,
        kind: IcmpKind | str,
        code: int,
        mtu: int | None = None,
        now: float = 0.0,
        *,
        seq: int | None = None,
    ) -> None:
        """An ICMP error for this connection (RFC 9293 §3.9.1.4, MUST-54). Never raises for
        what the ICMP says; an unknown `kind` is our caller's error (ValueError)."""
        k = IcmpKind(kind)
        if self._watch is not None:
            self._watch(self)
        st = self._state
        if st is State.CLOSED or st is State.LISTEN:
            self._drop("icmp_no_connection")
            return
        if k is IcmpKind.SOURCE_QUENCH:
            self._drop("icmp_source_quench")  # MUST-55: silently discarded
            return
        if seq is not None:
            d = (seq - self._iss - self._snd_una) & MASK
            if d > max(self._snd_max - self._snd_una, 1):  # RFC 5927 §4.1
                self._drop("icmp_out_of_window")
                return
        v4 = len(self.local[0]) == 4
        if k is IcmpKind.PACKET_TOO_BIG or (k is IcmpKind.UNREACHABLE and v4 and code == 4):
            if mtu:
                self.path_mtu(mtu)
            return
        if k is IcmpKind.UNREACHABLE and (code in (2, 3) if v4 else code == 4):
            self._drop("icmp_hard_error")  # SHLD-26: abort
            self._events.append(ConnectionReset("unreachable"))
            self._enter_closed(Ev.GIVE_UP)
            return
        self._soft_error = (k.value, code, now)
        ev = SoftError(k, code)
        events = self._events
        if not events or events[-1] != ev:  # a burst of the same error is one event
            events.append(ev)  # MUST-56 / SHLD-25

    # ------------------------------------------------------------------ small helpers

    def _seq_of(self, pos: int) -> int:
        return (self._iss + pos) & MASK

    def _ts_clock(self, now: float) -> int:
        """TSval clock: 1 ms ticks from `now`, offset per connection (RFC 7323 §5.4)."""
        return (int(now * 1000) + self._ts_off) & MASK

    def _rcv_mss(self) -> int:
        """Full-sized segment from the peer: our MSS less the options it sends."""
        return self._my_mss - (12 if self._ts_on else 0)

    def _queue_rst(self, seq: int, ack: int | None) -> None:
        flags = RST if ack is None else RST | ACK
        self._rst_out.append(
            TcpSegment(self.local[1], self.remote[1], seq & MASK, (ack or 0) & MASK, flags, 0)
        )

    def _reset_for(self, seg: TcpSegment) -> None:
        rst = reset_reply(seg)
        if rst is not None:
            self._rst_out.append(rst)

    def _maybe_window_update(self) -> None:
        """After the application freed space, announce a window that grew by a useful
        amount (RFC 9293 §3.8.6.2.2: by min(RCV.BUFF/2, 2 MSS), so no silly updates)."""
        grow = self._rcv_nxt + self._rcv_buf - self._rx_len - self._rx_held - self._rcv_adv
        if grow >= self._wu_min and self._state in _OPEN_RECEIVE:
            self._ack_now = True
            if self._watch is not None:
                self._watch(self)

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The earliest deadline (seconds, the caller's clock) or None when idle."""
        best: float | None = None
        for t in (self._rto_at, self._delack_at, self._persist_at, self._timewait_at):
            if t is not None and (best is None or t < best):
                best = t
        if self.config.keepalive:
            t = self._keepalive_at()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def _keepalive_at(self) -> float | None:
        """When the next keep-alive is due (RFC 9293 §3.8.4): only on an idle connection."""
        st = self._state
        if (st is not State.ESTABLISHED and st is not State.CLOSE_WAIT) or (
            self._snd_max != self._snd_una or self._sendbuf.end >= self._snd_nxt
        ):
            return None
        if self._ka_sent:
            return self._ka_at  # an interval after the last probe, even if it went out late
        return self._last_rx + self.config.keepalive_idle

    def handle_timer(self, now: float) -> None:
        """Act on every deadline at or before `now`; call segments_to_send(now) after."""
        if self._timewait_at is not None and now >= self._timewait_at:
            self._timewait_at = None
            self._enter_closed(Ev.TIMEOUT_2MSL)  # MUST-13: 2*MSL elapsed
            return
        if self._delack_at is not None and now >= self._delack_at:
            self._delack_at = None
            self._ack_now = True
        if self._persist_at is not None and now >= self._persist_at:
            self._persist_at = None
            self._persist_backoff += 1
            self._probe_pending = True  # MUST-35/36: zero-window probe
        if self._rto_at is not None and now >= self._rto_at:
            self._rto_at = None
            self._on_rto(now)
        if self.config.keepalive:
            t = self._keepalive_at()
            if t is not None and now >= t:
                if self._ka_sent >= self.config.keepalive_probes:  # MUST-29: not one loss
                    self._events.append(ConnectionReset("timeout"))
                    self._enter_closed(Ev.GIVE_UP)
                    return
                self._ka_sent += 1
                self._ka_at = now + self.config.keepalive_interval
                self._ka_pending = True

    def _on_rto(self, now: float) -> None:
        st = self._state
        if st is State.SYN_SENT or st is State.SYN_RECEIVED:
            self._retries += 1
            if self._retries > self.config.syn_retries:  # MUST-22/23
                self._events.append(ConnectionReset("timeout"))
                self._enter_closed(Ev.GIVE_UP)
                return
            self._rto.backoff()
            self._snd_nxt = 0  # send the SYN (or SYN-ACK) again
            self._rtt_abs = None  # Karn
            self.retransmissions += 1
            return
        if self._snd_max <= self._snd_una:
            return
        if self._snd_wnd == 0:
            # MUST-37: the window may stay zero indefinitely; probe, never give up.
            self._rto.backoff()
            self._probe_pending = True
            return
        self._retries += 1
        if self._retries > self.config.max_retries:  # MUST-20: R2
            self._events.append(ConnectionReset("timeout"))
            self._enter_closed(Ev.GIVE_UP)
            return
        self._cc.on_timeout(self._snd_max, self._snd_max - self._snd_una, self._retries == 1)
        if self._ts_on:
            self._rto_tsval = self._ts_clock(now)
        self._rto.backoff()  # RFC 6298 §5.5
        self._sacked = []  # RFC 2018 §8: forget SACK information after an RTO
        self._recovery_pt = self._snd_una
        self._snd_nxt = self._snd_una  # RFC 6298 §5.4: go back to the earliest unACKed
        self._rtt_abs = None  # Karn (MUST-18)

    # ------------------------------------------------------------------ introspection

    def info(self) -> dict[str, object]:
        """A JSON-able snapshot: state, RTT, windows, counters and negotiated options."""
        rto = self._rto
        return {
            "state": str(self._state),
            "srtt": rto.srtt,
            "rto": rto.rto,
            "cwnd": self._cc.cwnd,
            "ssthresh": self._cc.ssthresh,
            "in_recovery": self._cc.in_recovery,
            "retransmissions": self.retransmissions,
            "fast_path": self.fast_path,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "mss": self._send_mss,
            "rcv_mss": self._my_mss,
            "wscale": (self._snd_wscale, self._rcv_wscale) if self._ws_on else None,
            "sack": self._sack_on,
            "ts": self._ts_on,
            "snd_wnd": self._snd_wnd,
            "rcv_wnd": max(self._rcv_adv - self._rcv_nxt, 0),
            "unsent": max(self._sendbuf.end - max(self._snd_nxt - 1, 0), 0),
            "in_flight": self._snd_nxt - self._snd_una,
            "out_of_order": self._ooo.nbytes,
            "drops": dict(self.drops),
            "soft_error": self._soft_error,
        }

    def _update_scoreboard(self, blocks: tuple[tuple[int, int], ...]) -> None:
        """Record SACKed ranges (RFC 2018 §5; kept until cumulatively ACKed, §8)."""
        una, top = self._snd_una, self._snd_max
        base = (self._iss + una) & MASK
        merged = list(self._sacked)
        for left, right in blocks[:4]:
            s = una + ((left - base) & MASK)
            e = una + ((right - base) & MASK)
            if una < s < e <= top:
                merged.append((s, e))
        merged.sort()
        out: list[tuple[int, int]] = []
        for s, e in merged:
            if out and s <= out[-1][1]:
                if e > out[-1][1]:
                    out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        self._sacked = out[:32]

    def _move(self, ev: Ev) -> None:
        """The one place the state changes: along the edge `ev` of the table (stack/state.py)."""
        self._state = next_state(self._state, ev)

    def _enter_time_wait(self, ev: Ev, now: float) -> None:
        self._move(ev)
        assert self._state is State.TIME_WAIT
        self._timewait_at = now + 2 * self.config.msl  # MUST-13
        self._rto_at = self._persist_at = None

    def _enter_closed(self, ev: Ev) -> None:
        self._move(ev)
        assert self._state is State.CLOSED
        self._rto_at = self._persist_at = self._timewait_at = self._delack_at = None
        self._ack_now = self._retx_pending = self._probe_pending = self._ka_pending = False
        self._ooo.clear()
        self._events.append(Closed())

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 §3.2/§4.2/§5.2 challenge ACK, rate limited (§7)."""
        if now - self._chal_start >= 1.0:
            self._chal_start = now
            self._chal_count = 0
        if self._chal_count < self.config.challenge_ack_limit:
            self._chal_count += 1
            self._ack_now = True
        else:
            self._drop("challenge_ack_limited")

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


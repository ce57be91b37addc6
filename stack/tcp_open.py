"""OpenMixin: opening and resetting a connection (RFC 9293 §3.5, §3.10.1, §3.10.7.2-3).

Rules:
- Active OPEN sends a SYN from CLOSED; passive OPEN waits in LISTEN (RFC 9293 §3.10.1);
  either raises LocalProtocolError in another state (our own misuse).
- The ISS is clock-driven and keyed per 4-tuple (RFC 6528, MUST-8/9) unless the caller
  gave one.
- LISTEN (§3.10.7.2): an RST is ignored; an ACK gets <SEQ=SEG.ACK><CTL=RST>; a SYN records
  IRS, negotiates options (MSS MUST-14/16, RFC 7323 window scale and timestamps, RFC 2018
  SACK-permitted) and moves to SYN-RECEIVED; anything else is dropped.
- SYN-SENT (§3.10.7.3): an unacceptable ACK gets a RST (unless it is one); an RST counts
  only when it acknowledges our SYN (RFC 5961 §3) and reports "refused"; a SYN-ACK
  establishes; a bare SYN is a simultaneous open (MUST-10) to SYN-RECEIVED.
- RST in SYN-RECEIVED of a passive open returns to LISTEN (MUST-11); otherwise it is
  reported (MUST-12) and the connection is CLOSED.
- Establishing never leaves SND.NXT behind SND.UNA: a SYN(-ACK) resend pending when the
  ACK arrives (the peer's SYN again, or our RTO, in the same batch) is obsolete.

Theory of operation: one link in the class line ConnectionCore <- OutputMixin <-
OpenMixin <- TcpConnection. These handlers run only until the connection is synchronized;
stack/connection.py routes to them from its slow path and owns everything after.
"""

from __future__ import annotations

from stack.events import Connected, ConnectionReset, LocalProtocolError
from stack.seq import MASK, isn_rfc6528
from stack.state import Ev, State
from stack.tcp_output import OutputMixin
from stack.wire.tcp import ACK, RST, SYN, TcpSegment

__all__ = ["OpenMixin"]


class OpenMixin(OutputMixin):
    """Opening (connect/listen) and the LISTEN and SYN-SENT input. Use TcpConnection."""

    def connect(self, now: float) -> None:
        """Active OPEN (RFC 9293 §3.10.1): send a SYN. Raises LocalProtocolError unless CLOSED."""
        if self._state is not State.CLOSED or self._snd_max:
            raise LocalProtocolError(f"connect() in state {self._state}")
        self._choose_iss(now)
        self._move(Ev.ACTIVE_OPEN)
        self._snd_una = self._snd_nxt = 0

    def listen(self) -> None:
        """Passive OPEN (RFC 9293 §3.10.1): wait for a SYN. Raises unless CLOSED."""
        if self._state is not State.CLOSED or self._snd_max:
            raise LocalProtocolError(f"listen() in state {self._state}")
        self._move(Ev.PASSIVE_OPEN)
        self._passive = True

    def _choose_iss(self, now: float) -> None:
        if self._iss_given is None:
            self._iss = isn_rfc6528(self.config.isn_key, self.local, self.remote, now)

    def _on_listen(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.2."""
        f = seg.flags
        if f & RST:
            self._drop("rst_in_listen")  # "An incoming RST should be ignored."
            return
        if f & ACK:
            self._drop("ack_in_listen")
            self._queue_rst(seg.ack, None)  # <SEQ=SEG.ACK><CTL=RST>
            return
        if not f & SYN:
            self._drop("no_syn_in_listen")
            return
        self._choose_iss(now)
        self._take_syn(seg, now)
        self._snd_wnd = seg.window  # never scaled in a SYN (RFC 7323 §2.2)
        self._snd_wl1, self._snd_wl2 = 0, 0
        self._max_snd_wnd = self._snd_wnd
        self._move(Ev.RCV_SYN)
        self._snd_una = self._snd_nxt = 0  # the SYN-ACK is produced by the output

    def _take_syn(self, seg: TcpSegment, now: float) -> None:
        """Record IRS and negotiate options from the peer's SYN (RFC 9293 §3.10.7.2/3)."""
        cfg = self.config
        self._irs = seg.seq
        self._rcv_nxt = 1
        self._last_ack_sent = 1
        if seg.mss is not None and seg.mss > 0:  # MUST-14: the peer's MSS bounds ours
            self._peer_mss = seg.mss
        self._ts_on = cfg.timestamps and seg.ts is not None
        if self._ts_on and seg.ts is not None:
            self._ts_recent = seg.ts[0]
            self._ts_recent_at = now
        self._sack_on = cfg.sack and seg.sack_perm
        self._ws_on = cfg.window_scaling and seg.wscale is not None
        if self._ws_on and seg.wscale is not None:
            self._snd_wscale = min(seg.wscale, 14)  # RFC 7323 §2.3
            self._rcv_wscale = cfg.rcv_wscale
        else:
            self._snd_wscale = self._rcv_wscale = 0
        # MUST-16: effective send MSS less the TCP options we always send.
        self._send_mss = max(min(self._peer_mss, self._my_mss) - (12 if self._ts_on else 0), 64)
        self._cc.set_smss(self._send_mss)
        self._cc.sack = self._sack_on
        if cfg.initial_cwnd:
            self._cc.cwnd = cfg.initial_cwnd

    def _on_syn_sent(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.3."""
        f = seg.flags
        acceptable = False
        if f & ACK:
            d = (seg.ack - self._iss) & MASK
            if d == 0 or d > self._snd_max:  # SEG.ACK =< ISS or > SND.NXT
                if not f & RST:
                    self._queue_rst(seg.ack, None)
                self._drop("bad_ack_in_syn_sent")
                return
            acceptable = True
        if f & RST:
            if acceptable:  # RFC 5961 §3: only an RST that acknowledges our SYN
                self._events.append(ConnectionReset("refused"))
                self._enter_closed(Ev.RCV_RST)
            else:
                self._drop("rst_in_syn_sent")
            return
        if not f & SYN:
            self._drop("no_syn_in_syn_sent")
            return
        self._take_syn(seg, now)
        if acceptable:
            self._snd_una = 1
            self._sacked = []
            self._rto_at = None
            self._rtt_sample_syn(seg, now)
            self._snd_wnd = seg.window  # a SYN's window is never scaled (RFC 7323 §2.2)
            self._snd_wl1, self._snd_wl2 = 0, 1
            self._max_snd_wnd = self._snd_wnd
            self._establish(Ev.RCV_SYN_ACK)
            self._ack_now = True
        else:
            # MUST-10: simultaneous open; answer <SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK>.
            self._move(Ev.RCV_SYN)
            self._snd_wnd = seg.window
            self._max_snd_wnd = seg.window
            self._snd_nxt = 0
            self._rto_at = None

    def _rtt_sample_syn(self, seg: TcpSegment, now: float) -> None:
        if self._ts_on and seg.ts is not None and seg.ts[1]:
            self._rto.sample(((self._ts_clock(now) - seg.ts[1]) & MASK) / 1000.0)
        elif self._rtt_abs is not None:
            self._rto.sample(now - self._rtt_at)
        self._rtt_abs = None
        if self._retries:
            self._rto.syn_timed_out()  # RFC 6298 §5.7
        self._retries = 0

    def _establish(self, ev: Ev) -> None:
        # A SYN(-ACK) resend still pending (SND.NXT = 0 after the peer's SYN again or our
        # RTO) is obsolete once the SYN is acknowledged: SND.NXT never trails SND.UNA.
        if self._snd_nxt < self._snd_una:
            self._snd_nxt = self._snd_una
        self._move(ev)  # ESTABLISHED
        self._events.append(Connected())
        if self._close_requested:
            self._fin_abs = 1 + self._sendbuf.end
            self._move(Ev.CLOSE)  # FIN-WAIT-1 (RFC 9293 §3.10.4: the deferred CLOSE)

    def _on_reset(self) -> None:
        st = self._state
        if st is State.SYN_RECEIVED and self._passive:
            # MUST-11: return to LISTEN.
            self._reset_to_listen()
            return
        if st is not State.TIME_WAIT:
            self._events.append(
                ConnectionReset("refused" if st is State.SYN_RECEIVED else "reset")
            )
        self._enter_closed(Ev.RCV_RST)

    def _reset_to_listen(self) -> None:
        self._move(Ev.RCV_RST_PASSIVE)  # MUST-11
        self._snd_una = self._snd_nxt = self._snd_max = 0
        self._rto_at = None
        self._retries = 0
        self._ts_recent = None

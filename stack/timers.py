"""Timers: the deadlines of one connection (RFC 9293 §3.8), merged and acted on.

Rules:
- RFC 9293 §3.8 timers of one connection: retransmission (RFC 6298 §5, the Sender's
  `rto_at`), persist / zero-window probe (§3.8.6.1, MUST-35/36, the Sender's
  `persist_at`), delayed ACK (§3.8.6.3, MUST-40, the Receiver's `delack_at`), and here
  TIME-WAIT 2*MSL (MUST-13) and keep-alive (§3.8.4, off by default: only on an idle
  ESTABLISHED or CLOSE-WAIT connection, a first probe after `keepalive_idle` without a
  segment from the peer, then one every `keepalive_interval`; MUST-29: only
  `keepalive_probes` unanswered probes, not one lost, end the connection).
- Zero-window probes (RFC 9293 §3.8.6.1 MUST-36: keep probing as long as the peer answers,
  however long its window stays closed) give up after `max_retries` probes in a row that
  drew no segment at all from the peer (R2, §3.8.3 MUST-20; Linux tcp_probe_timer with
  tcp_retries2): a peer that vanished behind a zero window would otherwise hold the
  connection, and its buffers, forever. Any segment from the peer restarts the count.

Theory of operation: `Timers` belongs to one TcpConnection (stack/connection.py) and owns
the deadlines that are not the Sender's or the Receiver's; `earliest` merges all of them
into the one deadline the caller sleeps on, and `fire` acts on every expired one: it flags what the
next output must carry (an ACK, a probe, a retransmission, a keep-alive) and returns the
event of the transition table (stack/state.py) when the connection ends (TIMEOUT_2MSL, or
GIVE_UP at R2 or after the last keep-alive), which the connection then takes. The
Receiver's `last_rx` (the time of the peer's last segment) restarts the keep-alive count:
the probes sent are counted against the `last_rx` they started from.
"""

from __future__ import annotations

from stack.receive import Receiver
from stack.send import Sender
from stack.state import Ev, State
from stack.tcp_config import TcpConfig

__all__ = ["Timers"]


class Timers:
    """TIME-WAIT and keep-alive deadlines; the earliest of all a connection's deadlines."""

    __slots__ = ("timewait_at", "msl", "keepalive", "ka_idle", "ka_interval", "ka_probes",
                 "ka_sent", "ka_from", "ka_at", "zw_max", "zw_sent", "zw_from")

    def __init__(self, cfg: TcpConfig) -> None:
        self.timewait_at: float | None = None
        self.msl = cfg.msl
        self.keepalive = cfg.keepalive
        self.ka_idle = cfg.keepalive_idle
        self.ka_interval = cfg.keepalive_interval
        self.ka_probes = cfg.keepalive_probes
        self.ka_sent = 0  # probes sent since the peer's segment at `ka_from`
        self.ka_from = 0.0
        self.ka_at = 0.0  # when the next probe is due (after the first)
        self.zw_max = cfg.max_retries  # unanswered zero-window probes before giving up
        self.zw_sent = 0  # zero-window probes sent since the peer's segment at `zw_from`
        self.zw_from = 0.0

    def time_wait(self, now: float) -> None:
        """Enter or restart TIME-WAIT: 2*MSL from now (MUST-13)."""
        self.timewait_at = now + 2 * self.msl

    def _keepalive_at(self, st: State, snd: Sender, rcv: Receiver) -> float | None:
        """When the next keep-alive is due (RFC 9293 §3.8.4): only on an idle connection."""
        if (st is not State.ESTABLISHED and st is not State.CLOSE_WAIT) or not snd.idle():
            return None
        if self.ka_sent and self.ka_from == rcv.last_rx:
            return self.ka_at  # an interval after the last probe, even if it went out late
        return rcv.last_rx + self.ka_idle

    def earliest(self, st: State, snd: Sender, rcv: Receiver) -> float | None:
        """The earliest deadline (seconds, the caller's clock) or None when idle."""
        # Called after every segment a connection takes or sends: unrolled, no tuple built,
        # and the keep-alive's idle test (Sender.idle) inline, so a busy connection makes
        # no further call (the result is the same minimum).
        best = snd.rto_at
        t = rcv.delack_at
        if t is not None and (best is None or t < best):
            best = t
        t = snd.persist_at
        if t is not None and (best is None or t < best):
            best = t
        t = self.timewait_at
        if t is not None and (best is None or t < best):
            best = t
        t = snd.early_at
        if t is not None and (best is None or t < best):
            best = t
        if self.keepalive and snd.max == snd.una and snd.buf.end < snd.nxt:
            t = self._keepalive_at(st, snd, rcv)
            if t is not None and (best is None or t < best):
                best = t
        return best

    def _unanswered_probes(self, rcv: Receiver) -> bool:
        """Count one more zero-window probe; True when `zw_max` went unanswered in a row."""
        if self.zw_from != rcv.last_rx:  # the peer spoke since the last probes
            self.zw_sent = 0
            self.zw_from = rcv.last_rx
        if self.zw_sent >= self.zw_max:
            return True
        self.zw_sent += 1
        return False

    def fire(self, now: float, st: State, snd: Sender, rcv: Receiver) -> Ev | None:
        """Act on every deadline at or before `now`. Returns Ev.TIMEOUT_2MSL or Ev.GIVE_UP
        when the connection ends (the caller reports GIVE_UP as a timeout), else None."""
        if self.timewait_at is not None and now >= self.timewait_at:
            self.timewait_at = None
            return Ev.TIMEOUT_2MSL  # MUST-13: 2*MSL elapsed
        if rcv.delack_at is not None and now >= rcv.delack_at:
            rcv.delack_at = None
            rcv.ack_now = True
        if snd.persist_at is not None and now >= snd.persist_at:
            snd.persist_at = None
            if self._unanswered_probes(rcv):
                return Ev.GIVE_UP  # R2: not one answer to max_retries probes (Linux)
            snd.persist_backoff += 1
            snd.probe_pending = True  # MUST-35/36: zero-window probe
        if snd.early_at is not None and now >= snd.early_at:
            snd.early_timer(now)  # RACK-TLP (RFC 8985): reordering timer, loss probe
        if snd.rto_at is not None and now >= snd.rto_at:
            snd.rto_at = None
            hs = st is State.SYN_SENT or st is State.SYN_RECEIVED
            # a probe byte in flight against a zero window: the same bound as the persist
            # timer's probes (the Sender probes, never giving up on its own, MUST-37)
            if not hs and snd.wnd == 0 and snd.max > snd.una and self._unanswered_probes(rcv):
                return Ev.GIVE_UP
            if snd.expire(now, hs):
                return Ev.GIVE_UP  # R2 (MUST-20..23)
        if self.keepalive:
            t = self._keepalive_at(st, snd, rcv)
            if t is not None and now >= t:
                if self.ka_from != rcv.last_rx:  # the peer spoke since the last probes
                    self.ka_sent = 0
                    self.ka_from = rcv.last_rx
                if self.ka_sent >= self.ka_probes:  # MUST-29: not one loss
                    return Ev.GIVE_UP
                self.ka_sent += 1
                self.ka_at = now + self.ka_interval
                snd.ka_pending = True
        return None

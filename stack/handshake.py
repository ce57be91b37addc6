"""Handshake: opening a connection (RFC 9293 §3.5, §3.10.1, §3.10.7.1-3) and its SYNs.

Rules:
- The ISS is clock-driven and keyed per 4-tuple (RFC 6528, MUST-8/9) unless the caller
  gave one.
- RFC 9293 §3.10.7.1: a segment for a CLOSED connection gets <SEQ=SEG.ACK><CTL=RST> if it
  has ACK, else <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>; an RST is never answered
  (`reset_reply`).
- LISTEN (§3.10.7.2): an RST is ignored; an ACK gets <SEQ=SEG.ACK><CTL=RST>; a SYN records
  IRS, negotiates options (MSS MUST-14/16, RFC 7323 window scale and timestamps, RFC 2018
  SACK-permitted) and leads to SYN-RECEIVED; anything else is dropped.
- SYN-SENT (§3.10.7.3): an unacceptable ACK gets a RST (unless it is one); an RST counts
  only when it acknowledges our SYN (RFC 5961 §3) and reports "refused"; a SYN-ACK
  establishes; a bare SYN is a simultaneous open (MUST-10) to SYN-RECEIVED.
- ECN (RFC 3168 §6.1.1): with TcpConfig.ecn, a SYN carrying both ECE and CWR (an
  ECN-setup SYN) makes a passive open ECN-capable (its SYN-ACK carries ECE alone); an
  active open asked with ECE and CWR, and is ECN-capable only if the SYN-ACK has ECE and
  not CWR (an ECN-setup SYN-ACK; a SYN-ACK with both is a reflecting middlebox's and is
  not one); once our SYN was resent without ECN (§6.1.1.1, stack/send.py) an ECE in the
  SYN-ACK no longer counts. A simultaneous open (MUST-10) is not ECN-capable. Otherwise
  neither end sets ECT, as in a non-ECN connection (stack/send.py).
- Establishing (the ACK of our SYN, in SYN-SENT or SYN-RECEIVED) takes an RTT sample
  unless the SYN was resent (Karn, MUST-18), and RFC 6298 §5.7 after SYN timeouts.
- RST in SYN-RECEIVED of a passive open returns to LISTEN (MUST-11): the TCB forgets what
  the SYN set up (`back_to_listen`).

Theory of operation: a Handshake is owned by one TcpConnection (stack/connection.py) and is
given the connection's Sender and Receiver, whose sequence variables and options it sets
up from the peer's SYN. Its input handlers only judge a segment and report the outcome:
an event of the transition table (stack/state.py) for the connection to take, a RST to
send, or None (dropped and counted). They never change the connection's state.
"""

from __future__ import annotations

from stack.receive import Receiver
from stack.send import Sender
from stack.seq import MASK, isn_rfc6528
from stack.state import Ev
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, CWR, ECE, RST, SYN, TcpSegment

__all__ = ["Handshake", "reset_reply", "Endpoint"]

Endpoint = tuple[bytes, int]  # (packed IPv4/IPv6 address, port)


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


class Handshake:
    """ISS, option negotiation, LISTEN and SYN-SENT input (the SYNs: Sender.syn_segment)."""

    __slots__ = ("cfg", "local", "remote", "iss_given", "passive", "peer_mss", "snd", "rcv",
                 "drops")

    def __init__(
        self,
        cfg: TcpConfig,
        local: Endpoint,
        remote: Endpoint,
        iss: int | None,
        snd: Sender,
        rcv: Receiver,
        drops: dict[str, int],
    ) -> None:
        self.cfg = cfg
        self.local = local
        self.remote = remote
        self.iss_given = iss
        self.passive = False  # opened by listen(): a SYN created it
        self.peer_mss = 536 if len(local[0]) == 4 else 1220  # MUST-15 default
        self.snd = snd
        self.rcv = rcv
        self.drops = drops
        snd.iss = iss if iss is not None else 0

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _rst(self, seq: int) -> TcpSegment:
        return TcpSegment(self.local[1], self.remote[1], seq & MASK, 0, RST, 0)

    def choose_iss(self, now: float) -> None:
        """RFC 6528 ISS for this 4-tuple, unless the caller fixed one."""
        if self.iss_given is None:
            self.snd.iss = isn_rfc6528(self.cfg.isn_key, self.local, self.remote, now)

    # ------------------------------------------------------------------ input

    def on_listen(self, seg: TcpSegment, now: float) -> Ev | TcpSegment | None:
        """RFC 9293 §3.10.7.2: Ev.RCV_SYN, a RST to send, or None (dropped)."""
        f = seg.flags
        if f & RST:
            self._drop("rst_in_listen")  # "An incoming RST should be ignored."
            return None
        if f & ACK:
            self._drop("ack_in_listen")
            return self._rst(seg.ack)  # <SEQ=SEG.ACK><CTL=RST>
        if not f & SYN:
            self._drop("no_syn_in_listen")
            return None
        self.choose_iss(now)
        self.negotiate(seg, now)
        snd = self.snd
        snd.wnd = seg.window  # never scaled in a SYN (RFC 7323 §2.2)
        snd.wl1, snd.wl2 = 0, 0
        snd.max_wnd = snd.wnd
        snd.una = snd.nxt = 0  # the SYN-ACK is produced by the output
        return Ev.RCV_SYN

    def on_syn_sent(self, seg: TcpSegment, now: float) -> Ev | TcpSegment | None:
        """RFC 9293 §3.10.7.3: Ev.RCV_SYN_ACK, Ev.RCV_SYN (simultaneous open), Ev.RCV_RST
        (refused), a RST to send, or None (dropped)."""
        f = seg.flags
        snd = self.snd
        acceptable = False
        if f & ACK:
            d = (seg.ack - snd.iss) & MASK
            if d == 0 or d > snd.max:  # SEG.ACK =< ISS or > SND.NXT
                self._drop("bad_ack_in_syn_sent")
                return None if f & RST else self._rst(seg.ack)
            acceptable = True
        if f & RST:
            if acceptable:  # RFC 5961 §3: only an RST that acknowledges our SYN
                return Ev.RCV_RST
            self._drop("rst_in_syn_sent")
            return None
        if not f & SYN:
            self._drop("no_syn_in_syn_sent")
            return None
        self.negotiate(seg, now)
        if acceptable:
            snd.una = 1
            snd.board.sacked = []
            snd.rto_at = None
            snd.sample_syn(seg.ts, now)
            snd.wnd = seg.window  # a SYN's window is never scaled (RFC 7323 §2.2)
            snd.wl1, snd.wl2 = 0, 1
            snd.max_wnd = snd.wnd
            return Ev.RCV_SYN_ACK
        # MUST-10: simultaneous open; answer <SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK>.
        snd.ecn = False  # RFC 3168 §6.1.1 defines no ECN setup for it
        snd.wnd = seg.window
        snd.max_wnd = seg.window
        snd.nxt = 0
        snd.rto_at = None
        return Ev.RCV_SYN

    def negotiate(self, seg: TcpSegment, now: float) -> None:
        """Record IRS and negotiate options from the peer's SYN (RFC 9293 §3.10.7.2/3)."""
        cfg = self.cfg
        snd, rcv = self.snd, self.rcv
        rcv.irs = seg.seq
        rcv.nxt = 1
        rcv.last_ack_sent = 1
        if seg.mss is not None and seg.mss > 0:  # MUST-14: the peer's MSS bounds ours
            self.peer_mss = seg.mss
        ts_on = cfg.timestamps and seg.ts is not None
        snd.ts_on = rcv.ts_on = ts_on
        if ts_on and seg.ts is not None:
            rcv.ts_recent = seg.ts[0]
            rcv.ts_recent_at = now
        snd.sack_on = rcv.sack_on = cfg.sack and seg.sack_perm
        # RFC 3168 §6.1.1: a SYN asks with ECE|CWR, the SYN-ACK answers with ECE alone.
        e = seg.flags & (ECE | CWR | ACK)
        snd.ecn = snd.ecn_ask and (e == ECE | CWR or e == ECE | ACK)
        rcv.ws_on = cfg.window_scaling and seg.wscale is not None
        if rcv.ws_on and seg.wscale is not None:
            snd.wscale = min(seg.wscale, 14)  # RFC 7323 §2.3
            rcv.wscale = cfg.rcv_wscale
        else:
            snd.wscale = rcv.wscale = 0
        # MUST-16: effective send MSS less the TCP options we always send.
        snd.mss = max(min(self.peer_mss, rcv.mss) - (12 if ts_on else 0), 64)
        cc = snd.cc
        cc.set_smss(snd.mss)
        cc.sack = snd.sack_on
        if cfg.initial_cwnd:
            cc.cwnd = cfg.initial_cwnd

    def syn_acked(self, seg: TcpSegment, seg_abs: int, now: float) -> TcpSegment | None:
        """SYN-RECEIVED, fifth step (RFC 9293 §3.10.7.4): an ACK of our SYN sets SND.UNA and
        the window; an unacceptable one gets <SEQ=SEG.ACK><CTL=RST> (returned)."""
        snd = self.snd
        d = (seg.ack - snd.iss) & MASK
        if d == 0 or d > snd.max:
            self._drop("bad_ack_in_syn_received")
            return self._rst(seg.ack)
        snd.una = 1
        snd.rto_at = None
        snd.sample_syn(seg.ts, now)
        snd.wnd = seg.window << snd.wscale
        snd.wl1, snd.wl2 = seg_abs, 1
        snd.max_wnd = snd.wnd
        return None

    def crossing_syn_ack(self, seg: TcpSegment, now: float) -> bool:
        """MUST-10, RFC 9293 Figure 8 line 6: in SYN-RECEIVED of an active open, the peer's
        SYN-ACK crossing ours acknowledges our SYN (its SYN is old news; Linux
        tcp_validate_incoming lets it pass too). Returns True when it did."""
        snd = self.snd
        if self.passive or seg.ack != (snd.iss + 1) & MASK:
            return False
        snd.una = 1
        snd.rto_at = None
        snd.sample_syn(seg.ts, now)
        snd.wnd = seg.window
        snd.wl1, snd.wl2 = 0, 1
        return True

    def back_to_listen(self) -> None:
        """MUST-11: a RST in SYN-RECEIVED of a passive open; forget the SYN."""
        snd = self.snd
        snd.una = snd.nxt = snd.max = 0
        snd.rto_at = None
        snd.retries = 0
        snd.ecn = self.rcv.ece = False
        self.rcv.ts_recent = None

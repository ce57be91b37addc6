"""Congestion control: RFC 5681 slow start and congestion avoidance, RFC 6582 NewReno.

Rules:
- RFC 5681 §3.1 (IW, as updated by RFC 3390): the initial window is
  min(4*SMSS, max(2*SMSS, 4380)) bytes; ssthresh starts arbitrarily high.
- RFC 5681 §3.1 eq. 2: in slow start (cwnd < ssthresh) each ACK of new data adds
  min(N, SMSS) (N = bytes newly acknowledged; appropriate byte counting, RFC 3465, limit
  L = 2*SMSS for stretch ACKs).
- RFC 5681 §3.1 eq. 3: in congestion avoidance cwnd grows by about SMSS per RTT: bytes are
  counted and cwnd += SMSS once a full cwnd has been acknowledged (RFC 3465 §2.1).
- RFC 5681 §3.1 eq. 4 / §3.2 step 2: on a loss, ssthresh = max(FlightSize/2, 2*SMSS).
- RFC 5681 §3.1: after an RTO, cwnd = LW = 1 SMSS.
- RFC 5681 §3.2 + RFC 6582 §3.2: the third duplicate ACK starts fast retransmit and fast
  recovery: recover = highest sequence sent, cwnd = ssthresh + 3*SMSS; each further
  duplicate ACK inflates cwnd by SMSS; a partial ACK (below recover) retransmits the first
  unacknowledged segment and deflates cwnd by the amount acknowledged, adding back SMSS;
  a full ACK (covering recover) ends recovery with cwnd = min(ssthresh,
  max(FlightSize, SMSS) + SMSS).
- RFC 6582 §3.2 step 2 and §4: after an RTO, duplicate ACKs that do not cover `recover`
  (the highest sequence sent at the RTO) do not start a new fast retransmit, unless the
  timestamp heuristic (§4.2) shows them caused by a segment sent after the RTO.
- RFC 3042 (limited transmit): on the first two duplicate ACKs one new segment each may
  be sent beyond cwnd (`limited_transmit` gives the allowance in bytes).
- RFC 6675 §5 (when SACK is in use, `sack`): recovery starts on the DupThresh-th
  duplicate ACK or at once when the sender reports IsLost(HighACK + 1) (§5 step 2, `lost`);
  entering it sets cwnd = ssthresh with no inflation, and partial ACKs change nothing
  here: the sender's pipe estimate (stack/loss.py) decides what may be sent.
- RFC 5681 §4.1: after an idle period longer than the RTO, cwnd = min(cwnd, IW).
- RFC 3168 §6.1.2 (`on_ecn`): an ECN-Echo halves the window as a loss would (ssthresh
  from `reduce`, at least 2 SMSS, cwnd = ssthresh) but with
  no fast retransmit and no recovery: nothing was lost. The sender (stack/send.py) calls
  it at most once per window of data.

- RFC 8985 §3.4 (`rack`, with SACK): recovery starts only when the sender reports a lost
  segment (RACK's time-based edge, stack/loss.py), never on the DupThresh-th duplicate
  ACK alone, so reordering within RACK's window causes no fast retransmit.
- RFC 1191 §6.3 / RFC 8201 §5.2: a smaller path MTU lowers SMSS; cwnd is cut to at most
  ssthresh (no burst of the old size) but kept at 2 SMSS or more (`on_path_mtu`).

Theory of operation: `CongestionControl` is the small interface the sender (stack/send.py)
uses; `NewReno` is its one implementation, keeping cwnd and ssthresh in bytes and the
recovery point in absolute positions (stack/seq.py). The sender tells it what happened
(`on_ack`, `on_dupack`, `on_timeout`, `on_idle`, `on_path_mtu`) and asks what it may send
(`cwnd`, `limited_transmit`, `in_recovery`): `on_dupack` and `on_ack` return True when a
segment must be retransmitted at SND.UNA now. Another algorithm overrides `avoid` (the
growth in congestion avoidance) and `reduce` (ssthresh after a loss): CUBIC (RFC 9438,
stack/cubic.py, the default) does; `make_cc` there picks one by TcpConfig.congestion.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["CongestionControl", "NewReno", "initial_window"]


class CongestionControl(Protocol):
    """What the sender asks of a congestion controller (byte counts, absolute positions)."""

    smss: int
    cwnd: int
    ssthresh: int
    in_recovery: bool
    recover: int  # RecoveryPoint (RFC 6675 §5) / `recover` (RFC 6582): HighData at entry
    sack: bool  # RFC 6675 recovery: the sender's pipe estimate decides, no inflation
    rack: bool  # RFC 8985: with SACK, duplicate ACKs alone never start recovery

    @property
    def limited_transmit(self) -> int: ...
    def set_smss(self, smss: int) -> None: ...
    def on_ack(self, acked: int, snd_una: int, flight: int, now: float = 0.0,
               srtt: float | None = None) -> bool: ...
    def on_dupack(self, snd_una: int, snd_max: int, flight: int, new_loss: bool = False,
                  lost: bool = False) -> bool: ...
    def on_timeout(self, snd_max: int, flight: int, first: bool) -> None: ...
    def on_idle(self) -> None: ...
    def on_path_mtu(self, smss: int) -> None: ...
    def on_ecn(self, flight: int) -> None: ...
    def reduce(self, flight: int) -> int: ...

DUPTHRESH = 3


def initial_window(smss: int) -> int:
    """RFC 5681 §3.1 (RFC 3390) initial window in bytes."""
    return min(4 * smss, max(2 * smss, 4380))


class NewReno:
    """Per-connection RFC 5681 + RFC 6582 state in bytes."""

    __slots__ = (
        "smss", "cwnd", "ssthresh", "recover", "in_recovery", "dupacks", "_ca_acc", "sack",
        "rack",
    )

    def __init__(self, smss: int, initial_cwnd: int | None = None) -> None:
        self.smss = smss
        self.cwnd = initial_cwnd if initial_cwnd is not None else initial_window(smss)
        self.ssthresh = 1 << 30
        self.recover = 0
        self.in_recovery = False
        self.dupacks = 0
        self._ca_acc = 0
        self.sack = False  # RFC 6675 recovery: no inflation, the sender's pipe decides
        self.rack = False  # with SACK: only a lost segment starts recovery (RFC 8985 §3.4)

    def set_smss(self, smss: int) -> None:
        """The handshake fixed SMSS: recompute the initial window (RFC 5681 §3.1)."""
        self.smss = smss
        self.cwnd = initial_window(smss)

    def on_ack(self, acked: int, snd_una: int, flight: int, now: float = 0.0,
               srtt: float | None = None) -> bool:
        """New data acknowledged up to `snd_una` (absolute); `flight` is what remains out;
        `now` and `srtt` (None: no sample yet) are for time-based growth (CUBIC).

        Returns True for a partial ACK in recovery: NewReno retransmits at SND.UNA; with
        SACK the sender does so only if it holds no SACK information (a peer or middlebox
        that negotiated SACK but sends no blocks), else its pipe loop decides.
        """
        self.dupacks = 0
        smss = self.smss
        if self.in_recovery:
            if snd_una >= self.recover:
                # RFC 6582 §3.2 step 3, full acknowledgment.
                self.in_recovery = False
                self.cwnd = min(self.ssthresh, max(flight, smss) + smss)
                return False
            if self.sack:
                return True  # RFC 6675 §5: no deflation; the sender's pipe loop decides
            # RFC 6582 §3.2 step 3, partial acknowledgment.
            self.cwnd = max(self.cwnd - acked, smss) + smss
            return True
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, 2 * smss)  # RFC 5681 eq. 2 with RFC 3465 L = 2*SMSS
        else:
            self.avoid(acked, now, srtt)
        return False

    def avoid(self, acked: int, now: float, srtt: float | None) -> None:
        """Congestion avoidance growth for `acked` new bytes (RFC 5681 eq. 3)."""
        self._ca_acc += acked
        if self._ca_acc >= self.cwnd:  # RFC 5681 eq. 3 by byte counting
            self._ca_acc -= self.cwnd
            self.cwnd += self.smss

    def reduce(self, flight: int) -> int:
        """The ssthresh after a congestion event with `flight` bytes out (RFC 5681 eq. 4)."""
        return max(flight // 2, 2 * self.smss)

    def on_dupack(
        self, snd_una: int, snd_max: int, flight: int, new_loss: bool = False,
        lost: bool = False,
    ) -> bool:
        """A duplicate ACK (RFC 5681 §2 definition). Returns True to fast-retransmit now.

        `new_loss` is the caller's proof (RFC 6582 §4.2 timestamp heuristic: the ACK echoes
        a segment sent after the last RTO) that the loss is not an old one. `lost` (with
        SACK): IsLost(HighACK + 1) holds, which starts recovery before DupThresh duplicates
        (RFC 6675 §5 step 2).
        """
        self.dupacks += 1
        if self.in_recovery:
            if not self.sack:
                self.cwnd += self.smss  # RFC 5681 §3.2 step 4 (inflation)
            return False
        if self.rack and self.sack:
            start = lost  # RACK: time decides, not the count of duplicates
        else:
            start = self.dupacks == DUPTHRESH or (lost and self.sack and self.dupacks < DUPTHRESH)
        if start:
            if snd_una < self.recover and not new_loss:
                return False  # RFC 6582 §3.2 step 2: ACK does not cover `recover`
            self.ssthresh = self.reduce(flight)
            self.recover = snd_max
            self.in_recovery = True
            # RFC 6675 §5 step 4.2: cwnd = ssthresh; RFC 5681 §3.2 step 3: + 3 SMSS.
            self.cwnd = self.ssthresh + (0 if self.sack else DUPTHRESH * self.smss)
            return True
        return False

    @property
    def limited_transmit(self) -> int:
        """Bytes beyond cwnd allowed by RFC 3042 (one SMSS per duplicate ACK, at most two)."""
        if self.in_recovery or not self.dupacks:
            return 0
        return min(self.dupacks, 2) * self.smss

    def on_timeout(self, snd_max: int, flight: int, first: bool) -> None:
        """The retransmission timer expired (RFC 5681 §3.1 eq. 4, LW = 1 SMSS).

        `first` is False for a repeated expiry of the same segment: ssthresh is then kept
        (RFC 5681 §3.1, "ssthresh is held constant" on a retransmission's loss).
        """
        if first:
            self.ssthresh = self.reduce(flight)
        self.cwnd = self.smss
        self.in_recovery = False
        self.recover = snd_max
        self.dupacks = 0
        self._ca_acc = 0

    def on_ecn(self, flight: int) -> None:
        """An ECN-Echo (RFC 3168 §6.1.2): reduce as for a loss (ssthresh = `reduce`, cwnd =
        ssthresh), without entering recovery; congestion avoidance restarts from there."""
        self.ssthresh = self.reduce(flight)
        self.cwnd = self.ssthresh
        self._ca_acc = 0

    def on_idle(self) -> None:
        """Idle for more than an RTO: restart from at most the initial window (RFC 5681 §4.1)."""
        self.cwnd = min(self.cwnd, initial_window(self.smss))

    def on_path_mtu(self, smss: int) -> None:
        """A smaller path MTU: new SMSS, cwnd cut to ssthresh, at least 2 SMSS (RFC 1191 §6.3)."""
        self.smss = smss
        self.cwnd = max(min(self.cwnd, self.ssthresh), 2 * smss)

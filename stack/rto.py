"""Retransmission timeout estimation (RFC 6298) and Karn's rule.

Rules:
- RFC 6298 §2.1: until a first RTT sample, RTO = 1 s (`initial`).
- RFC 6298 §2.2: first sample R: SRTT = R, RTTVAR = R/2, RTO = SRTT + max(G, K*RTTVAR),
  K = 4.
- RFC 6298 §2.3: later samples: RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|, then
  SRTT = 7/8 SRTT + 1/8 R (RTTVAR first).
- RFC 6298 §2.4: RTO below 1 s SHOULD be rounded up to 1 s (`minimum`, configurable:
  Linux uses 200 ms); §2.5: a maximum of at least 60 s MAY be imposed (`maximum`).
- RFC 6298 §3 / RFC 9293 MUST-18 (Karn): no RTT sample from a retransmitted segment; the
  caller enforces it by timing one segment at a time and forgetting the timing on a
  retransmission, unless timestamps disambiguate (RFC 7323 §4, RTTM).
- RFC 6298 §5.5 / RFC 9293 MUST-19: on expiry the RTO doubles (`backoff`), up to the
  maximum. Only a new RTT sample ends the backoff (`sample`; the note after RFC 6298 §5:
  the RTO "collapses" back once a measurement is taken, which Karn's rule allows only for
  a segment not retransmitted); an ACK of new data alone keeps the doubled RTO.
- RFC 6298 §5.7: if the SYN timed out and RTO < 3 s, RTO is reset to 3 s when data transfer
  begins (`syn_timed_out`).

Theory of operation: a small mutable estimator owned by one connection; it holds numbers
only, the connection keeps the deadline.
"""

from __future__ import annotations

__all__ = ["RtoEstimator"]

_ALPHA = 0.125
_BETA = 0.25
_K = 4.0


class RtoEstimator:
    """RFC 6298 estimator. `rto` is the current timeout in seconds, backoff included."""

    __slots__ = ("srtt", "rttvar", "base_rto", "backoffs", "minimum", "maximum", "granularity")

    def __init__(
        self,
        initial: float = 1.0,
        minimum: float = 1.0,
        maximum: float = 60.0,
        granularity: float = 0.001,
    ) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.base_rto = initial
        self.backoffs = 0
        self.minimum = minimum
        self.maximum = maximum
        self.granularity = granularity

    @property
    def rto(self) -> float:
        """The timeout to arm now (base RTO doubled once per unanswered expiry, capped)."""
        return min(self.base_rto * (1 << self.backoffs), self.maximum)

    def sample(self, r: float) -> None:
        """Feed one RTT measurement in seconds (RFC 6298 §2.2-2.3); negative ones are ignored."""
        if r < 0:
            return
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - r)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * r
        rto = self.srtt + max(self.granularity, _K * self.rttvar)
        self.base_rto = min(max(rto, self.minimum), self.maximum)
        self.backoffs = 0

    def backoff(self) -> None:
        """The timer expired: double the RTO (RFC 6298 §5.5), up to the maximum."""
        if self.base_rto * (1 << self.backoffs) < self.maximum:
            self.backoffs += 1

    def syn_timed_out(self) -> None:
        """RFC 6298 §5.7: the SYN was retransmitted and no sample exists: use 3 s."""
        if self.srtt is None:
            self.base_rto = max(self.base_rto, 3.0)
            self.backoffs = 0

"""CUBIC congestion control (RFC 9438), the default, and the choice between it and NewReno.

Rules:
- RFC 9438 §4.1-4.2: in congestion avoidance the window follows
  W_cubic(t) = C * (t - K)^3 + W_max (segments, t in seconds since the congestion
  avoidance epoch began), C = 0.4, K = cbrt((W_max - cwnd_epoch) / C); W_max is the window
  just before the last reduction.
- RFC 9438 §4.3: Reno-friendly region: W_est starts at cwnd_epoch and grows by
  alpha_cubic * acked / cwnd segments per ACK, alpha_cubic = 3 (1 - beta) / (1 + beta);
  while W_cubic(t) < W_est, cwnd = W_est. Once W_est reached cwnd_prior, the window at
  the last reduction (`w_prior`), alpha_cubic is 1 (the SHOULD of §4.3: Reno's own
  AIMD(1, 0.5) increase from there on). On a lossy short path, where the cubic curve
  (K of seconds) stays below W_est between losses, this is the growth that decides.
- RFC 9438 §4.4-4.5: otherwise the target is W_cubic(t + RTT), clamped to
  [cwnd, 1.5 cwnd], and cwnd grows by (target - cwnd) / cwnd segments per segment ACKed.
- RFC 9438 §4.6: on a congestion event (fast retransmit, RTO) ssthresh = cwnd * beta,
  beta = 0.7, at least 2 SMSS (as Linux's bictcp_recalc_ssthresh); W_max = cwnd.
- RFC 9438 §4.7 fast convergence: when a loss comes before the window regained the
  previous W_max, W_max = cwnd * (1 + beta) / 2 (release bandwidth to newer flows).
- RFC 9438 §4.8 / §5.8: the epoch restarts after every reduction and after idling.
- Slow start, fast retransmit, recovery (RFC 5681, RFC 6582, RFC 6675) and the RTO
  response are NewReno's (stack/congestion.py); RFC 9438 §4.9-4.10 keep them.
- Without an RTT sample yet (`srtt` None) the RTT term is 0.

Theory of operation: `Cubic` subclasses `NewReno` and replaces the two places where the
algorithms differ: `avoid` (growth in congestion avoidance, fed the time and SRTT by the
Sender on every ACK of new data) and `reduce` (ssthresh after a loss). Windows are in
bytes as in NewReno; the cubic arithmetic runs in segments (floats) and the fraction of a
byte left over by each ACK is carried (`_frac`), so that slow growth is not lost to
rounding. `make_cc` picks the algorithm by name (TcpConfig.congestion).
"""

from __future__ import annotations

from stack.congestion import CongestionControl, NewReno

__all__ = ["Cubic", "make_cc", "ALGORITHMS"]

C = 0.4
BETA = 0.7
ALPHA = 3 * (1 - BETA) / (1 + BETA)
ALGORITHMS = ("cubic", "newreno")


class Cubic(NewReno):
    """RFC 9438 CUBIC on top of NewReno's loss recovery."""

    __slots__ = ("w_max", "w_last_max", "k", "epoch", "w_est", "_frac", "w_prior")

    def __init__(self, smss: int, initial_cwnd: int | None = None) -> None:
        super().__init__(smss, initial_cwnd)
        self.w_max = 0.0  # segments, the window before the last reduction
        self.w_last_max = 0.0  # for fast convergence (RFC 9438 §4.7)
        self.k = 0.0
        self.epoch: float | None = None  # when this congestion avoidance epoch began
        self.w_est = 0.0  # Reno-friendly estimate, segments
        self._frac = 0.0  # bytes of growth not yet added to cwnd
        self.w_prior = 0.0  # cwnd_prior (RFC 9438 §4.3), segments

    def reduce(self, flight: int) -> int:
        """ssthresh = cwnd * beta (RFC 9438 §4.6) with fast convergence (§4.7)."""
        smss = self.smss
        cw = self.cwnd / smss
        self.w_prior = cw
        if cw < self.w_last_max:
            self.w_last_max = cw
            self.w_max = cw * (1 + BETA) / 2
        else:
            self.w_last_max = cw
            self.w_max = cw
        self.epoch = None
        return max(int(self.cwnd * BETA), 2 * smss)

    def avoid(self, acked: int, now: float, srtt: float | None) -> None:
        """RFC 9438 §4.2-4.5 growth for `acked` new bytes at time `now`."""
        smss = self.smss
        cw = self.cwnd / smss
        if self.epoch is None:
            self.epoch = now
            self._frac = 0.0
            if cw < self.w_max:
                self.k = ((self.w_max - cw) / C) ** (1 / 3)
            else:
                self.k = 0.0
                self.w_max = cw
            self.w_est = cw
        t = now - self.epoch
        segs = acked / smss
        self.w_est += (ALPHA if self.w_est < self.w_prior else 1.0) * segs / cw
        w_max, k = self.w_max, self.k
        if C * (t - k) ** 3 + w_max < self.w_est:
            grow = self.w_est - cw  # Reno-friendly region (§4.3)
        else:
            target = C * (t + (srtt or 0.0) - k) ** 3 + w_max
            if target < cw:
                target = cw
            elif target > 1.5 * cw:
                target = 1.5 * cw
            grow = (target - cw) / cw * segs
        inc = grow * smss + self._frac
        if inc > 0:
            whole = int(inc)
            self.cwnd += whole
            self._frac = inc - whole

    def on_idle(self) -> None:
        """Idle for more than an RTO: restart from the initial window and a new epoch."""
        super().on_idle()
        self.epoch = None


def make_cc(name: str, smss: int, initial_cwnd: int | None = None) -> CongestionControl:
    """The congestion controller called `name` ("cubic" or "newreno"); ValueError else."""
    if name == "cubic":
        return Cubic(smss, initial_cwnd)
    if name == "newreno":
        return NewReno(smss, initial_cwnd)
    raise ValueError(f"unknown congestion control {name!r} (one of {', '.join(ALGORITHMS)})")

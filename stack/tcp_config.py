"""TcpConfig: the frozen settings of one TcpConnection (or of every one a listener makes).

Rules (the defaults and the RFC clause each one honours):
- `mtu` and `mss` (RFC 9293 §3.7.1, MUST-14/MUST-67): the MSS we advertise in our SYN and
  the cap on the MSS we send with (MMS_S) is `mss` if set, else MTU - 40 for IPv4 and
  MTU - 60 for IPv6 (the fixed headers). The peer's MSS option, or 536 (IPv4) / 1220
  (IPv6) without one (MUST-15), bounds what we send.
- `recv_buffer_max` / `send_buffer_max` (0: fixed buffers): autotuning limits, as
  Linux's tcp_rmem[2] / tcp_wmem[2]: the receive buffer grows with the data delivered per
  RTT, the send buffer to twice the usable window (stack/receive.py, stack/send.py).
- `tx_max_segment`: the largest payload in one *output* segment. 0 means one send MSS.
  An adapter that writes to a TUN with GSO may ask for 64 KB super-segments; congestion
  and flow control stay in bytes and SMSS, so the wire sees MSS-sized segments.
- `delayed_ack` < 0.5 s (RFC 9293 §3.8.6.3 MUST-40); an ACK is sent at least for every
  second full-sized segment (SHLD-19).
- `msl`: TIME-WAIT lasts 2*MSL (RFC 9293 §3.6.1 MUST-13; MSL = 2 minutes by default).
- `rto_initial`/`rto_min`/`rto_max`: RFC 6298 §2 (1 s, 1 s, 60 s). `rto_var_min`: Linux's
  rto_min, a floor on the variance term added to SRTT (RTO = SRTT + max(4*RTTVAR,
  rto_var_min)); 0 keeps RFC 6298 exactly.
- `syn_retries`/`max_retries`: R2 for SYN and data (RFC 9293 §3.8.3 MUST-20..23: with
  RFC 6298 backoff capped at 60 s, 8 SYN retries last 243 s >= 3 minutes (MUST-23) and
  15 data retries far more than 100 s (SHLD-11)).
- `nagle` (RFC 9293 §3.7.4 SHLD-7, MUST-17 may be disabled): False is TCP_NODELAY, a
  short segment goes out even while data is unacknowledged (the receiver-side SWS rules
  and the windows still apply).
- `window_scaling`, `timestamps` (RFC 7323), `sack` (RFC 2018): offered in our SYN and
  used only when the peer offers them too.
- `ecn` (RFC 3168 §6.1.1, off by default): an
  active open asks for ECN (SYN with ECE and CWR), a passive one accepts a peer's request
  (SYN-ACK with ECE); ECN is used only if both did. Off: neither asked nor accepted.
- `challenge_ack_limit` per second (RFC 5961 §7 rate limit); `invalid_ack_interval`: at
  most one ACK per interval answers an empty unacceptable segment or an ACK of unsent
  data (RFC 5961 §7; Linux tcp_invalid_ratelimit, 500 ms).
- Keep-alives (RFC 9293 §3.8.4, MAY-5): off unless `keepalive` (MUST-24/26); sent only
  after `keepalive_idle` seconds without any segment from the peer (MUST-25), default two
  hours (MUST-28), configurable (MUST-27); `keepalive_probes` unanswered probes, one per
  `keepalive_interval`, end the connection, so one lost ACK is no failure (MUST-29).
- `rack`: RACK-TLP (RFC 8985) loss detection while SACK is on; False keeps RFC 6675's
  DupThresh / IsLost alone.
- `congestion`: "cubic" (RFC 9438, the default, as Linux) or "newreno" (RFC 5681 +
  RFC 6582), stack/cubic.py.
- `isn_key`: the RFC 6528 secret; a fresh random one per config unless given.
- `auto_consume`: when True, delivering data (DataReceived or read()) reopens the window;
  when False the application calls `consumed(n)` (back-pressure).

Theory of operation: a frozen slotted dataclass checked once in `__post_init__`; values that
break an RFC MUST raise ValueError there, so a running connection never meets them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

__all__ = ["TcpConfig"]


def _random_key() -> bytes:
    return secrets.token_bytes(16)


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Settings for TcpConnection; see the module docstring for each field's rule."""

    mtu: int = 1500
    mss: int = 0  # 0: from mtu and the address family
    tx_max_segment: int = 0
    recv_buffer: int = 1 << 20
    send_buffer: int = 1 << 20
    recv_buffer_max: int = 0  # > recv_buffer: autotune RCV.BUFF up to it
    send_buffer_max: int = 0  # > send_buffer: grow the send buffer with cwnd up to it
    reassembly_cap: int = 0  # 0: recv_buffer
    reassembly_ranges: int = 64
    window_scaling: bool = True
    timestamps: bool = True
    sack: bool = True
    ecn: bool = False
    nagle: bool = True
    delayed_ack: float = 0.04
    msl: float = 120.0
    rto_initial: float = 1.0
    rto_min: float = 1.0
    rto_var_min: float = 0.0
    rto_max: float = 60.0
    syn_retries: int = 8
    max_retries: int = 15
    initial_cwnd: int = 0  # 0: RFC 5681 IW
    congestion: str = "cubic"
    rack: bool = True
    challenge_ack_limit: int = 10
    invalid_ack_interval: float = 0.5
    keepalive: bool = False
    keepalive_idle: float = 7200.0
    keepalive_interval: float = 75.0
    keepalive_probes: int = 9
    auto_consume: bool = True
    isn_key: bytes = field(default_factory=_random_key, repr=False)

    def __post_init__(self) -> None:
        if self.congestion not in ("cubic", "newreno"):
            raise ValueError(f"congestion {self.congestion!r}: cubic or newreno")
        if self.mss and not 88 <= self.mss <= 65495:
            raise ValueError(f"mss {self.mss} outside 88..65495")
        if not 1280 <= self.mtu <= 65535 and not self.mss:
            raise ValueError(f"mtu {self.mtu} outside 1280..65535")
        if self.tx_max_segment < 0 or self.tx_max_segment > 65535 * 4:
            raise ValueError(f"tx_max_segment {self.tx_max_segment} outside 0..262140")
        if not 0 < self.delayed_ack < 0.5:
            raise ValueError("delayed_ack must be in (0, 0.5) s (RFC 9293 MUST-40)")
        if self.recv_buffer < self.mss_for(16) or self.send_buffer < 1:
            raise ValueError("recv_buffer must hold one MSS and send_buffer one byte")
        if max(self.recv_buffer, self.recv_buffer_max, self.send_buffer_max) > (1 << 30):
            raise ValueError("recv_buffer above 2**30 (RFC 7323 §2.3 window limit)")
        if not 0 <= self.rto_var_min <= self.rto_max:
            raise ValueError("need 0 <= rto_var_min <= rto_max")
        if not 0 < self.rto_min <= self.rto_initial <= self.rto_max:
            raise ValueError("need 0 < rto_min <= rto_initial <= rto_max")
        if self.invalid_ack_interval < 0:
            raise ValueError("invalid_ack_interval must not be negative")
        if self.msl <= 0 or self.syn_retries < 1 or self.max_retries < 1:
            raise ValueError("msl, syn_retries and max_retries must be positive")
        if self.keepalive_idle <= 0 or self.keepalive_interval <= 0 or self.keepalive_probes < 1:
            raise ValueError("keep-alive idle, interval and probes must be positive")
        if not 1 <= len(self.isn_key) <= 32:
            raise ValueError("isn_key must be 1..32 bytes")

    def mss_for(self, addr_len: int) -> int:
        """The MSS to advertise for 4-byte (IPv4) or 16-byte (IPv6) addresses."""
        if self.mss:
            return self.mss
        return self.mtu - (40 if addr_len == 4 else 60)

    @property
    def rcv_wscale(self) -> int:
        """Our window shift: the smallest that lets the largest receive buffer (autotuning
        included) fit 16 bits (max 14)."""
        s = 0
        buf = max(self.recv_buffer, self.recv_buffer_max)
        while (buf >> s) > 0xFFFF and s < 14:
            s += 1
        return s

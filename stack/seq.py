"""Sequence-number arithmetic modulo 2**32 and initial sequence numbers.

Rules:
- RFC 9293 §3.4: sequence numbers live in a space of 2**32 and every comparison is made
  modulo 2**32: `a < b` means that `b` is ahead of `a` by less than 2**31 ("serial number
  arithmetic", RFC 1982 §3.2). `seq_lt`, `seq_le`, `seq_gt`, `seq_ge`, `seq_add`, `seq_sub`.
- RFC 9293 §3.4.1 (MUST-8) and RFC 6528 §3: the initial sequence number is
  ISN = M + F(localip, localport, remoteip, remoteport, secretkey), where M is a clock that
  ticks every 4 µs and F is a keyed pseudo-random function. F here is BLAKE2s keyed with
  the secret (RFC 6528 §3 suggests MD5; any PRF that outsiders cannot compute satisfies
  MUST-9). The clock comes from the caller's `now`; the key is the caller's secret (no
  global, no clock inside).

Theory of operation: the connection does not compare raw sequence numbers on its hot path.
It keeps *absolute* positions (Python ints counted from the ISN: the SYN is 0, the first data
byte 1, ...) and converts a segment's 32-bit number into that space once, with `unwrap`,
relative to a nearby reference position. Absolute positions never wrap, so windows, flight
sizes and buffer offsets become plain integer arithmetic. `unwrap` is exactly the modulo
comparison above: a number at most 2**31 - 1 ahead of the reference is ahead, otherwise
behind.
"""

from __future__ import annotations

import hashlib
import struct

__all__ = [
    "MASK",
    "HALF",
    "seq_add",
    "seq_sub",
    "seq_lt",
    "seq_le",
    "seq_gt",
    "seq_ge",
    "seq_in",
    "unwrap",
    "isn_rfc6528",
    "ts_offset",
    "ts_clock",
]

MASK = 0xFFFFFFFF
HALF = 0x80000000

_PORTS = struct.Struct("!HH")


def seq_add(a: int, n: int) -> int:
    """Return a + n modulo 2**32 (RFC 9293 §3.4)."""
    return (a + n) & MASK


def seq_sub(a: int, b: int) -> int:
    """Return the signed distance a - b in (-2**31, 2**31] (RFC 1982 §3.2)."""
    d = (a - b) & MASK
    return d - 0x100000000 if d > HALF else d


def seq_lt(a: int, b: int) -> bool:
    """a < b modulo 2**32 (RFC 9293 §3.4)."""
    return 0 < ((b - a) & MASK) < HALF


def seq_le(a: int, b: int) -> bool:
    """a <= b modulo 2**32."""
    return ((b - a) & MASK) < HALF


def seq_gt(a: int, b: int) -> bool:
    """a > b modulo 2**32."""
    return 0 < ((a - b) & MASK) < HALF


def seq_ge(a: int, b: int) -> bool:
    """a >= b modulo 2**32."""
    return ((a - b) & MASK) < HALF


def seq_in(x: int, lo: int, hi: int) -> bool:
    """lo <= x < hi modulo 2**32 (the window test of RFC 9293 §3.10.7.4)."""
    return ((x - lo) & MASK) < ((hi - lo) & MASK)


def unwrap(seq: int, base_seq: int, base_abs: int) -> int:
    """Map the 32-bit `seq` to an absolute position, given that `base_seq` is at `base_abs`.

    The result is the absolute position nearest to `base_abs` whose low 32 bits are `seq`
    (RFC 1982 §3.2 ordering): ahead if `seq` is less than 2**31 ahead of `base_seq`.
    """
    d = (seq - base_seq) & MASK
    if d >= HALF:
        d -= 0x100000000
    return base_abs + d


def _prf(key: bytes, local: tuple[bytes, int], remote: tuple[bytes, int], tag: bytes) -> int:
    h = hashlib.blake2s(digest_size=4, key=key[:32], person=tag)
    h.update(local[0])
    h.update(remote[0])
    h.update(_PORTS.pack(local[1], remote[1]))
    return int.from_bytes(h.digest(), "big")


def isn_rfc6528(
    key: bytes, local: tuple[bytes, int], remote: tuple[bytes, int], now: float
) -> int:
    """Return the ISN for a connection (RFC 6528 §3, RFC 9293 §3.4.1 MUST-8/MUST-9).

    `key` is the secret (1..32 bytes), `local`/`remote` are (packed address, port) and `now`
    the caller's clock in seconds: M advances by one every 4 µs.
    """
    m = int(now * 250_000)
    return (m + _prf(key, local, remote, b"isn")) & MASK


def ts_offset(key: bytes, local: tuple[bytes, int], remote: tuple[bytes, int]) -> int:
    """A per-connection random offset for TSval (RFC 7323 §5.4: do not leak the clock)."""
    return _prf(key, local, remote, b"tsval")


def ts_clock(now: float, offset: int) -> int:
    """TSval clock: 1 ms ticks from `now`, offset per connection (RFC 7323 §5.4)."""
    return (int(now * 1000) + offset) & MASK

"""TCP MSS clamping of SYN and SYN-ACK segments, in place, both directions.

Rules:
- RFC 9293 §3.7.1 / RFC 6691: the MSS option (kind 2, length 4) appears only in SYN
  segments (SYN and SYN-ACK) and states the largest segment the sender can receive. A
  tunnel that narrows the path lowers it to tunnel MTU - 40 (IPv4: 20 IP + 20 TCP) or
  - 60 (IPv6: 40 + 20), RFC 4459 §3.2 "TCP MSS clamping". Values already smaller are kept.
- A SYN without an MSS option is left alone: RFC 9293 §3.7.1 makes the peer assume
  536 (IPv4) / 1220 (IPv6), which fits any tunnel MTU of at least 576 / 1280.
- The TCP checksum is fixed incrementally for the one changed word (RFC 1624 eqn. 3), so the
  payload is not re-summed.
- Only unfragmented (or first-fragment) IPv4, and IPv6 whose Next Header is TCP directly
  (extension headers are not walked), with a complete TCP header, are clamped. Malformed
  options stop the scan without change: never raise on peer input.

Theory of operation: `clamp(buf, ip_hlen, mss_max)` takes a mutable packet and the offset of
the TCP header, checks the SYN flag, walks the options (EOL, NOP, kind/length records) and
rewrites the MSS value with `pack_into`. It returns True when it changed the packet, so
the pipeline can count "mss_clamped".
"""

from __future__ import annotations

import struct

from stack.wire.checksum import incremental_update16
from stack.wire.ip import OFFSET_MASK, PROTO_TCP, V4_FLAGS, V4_PROTO, V6_NXT

__all__ = ["clamp", "clamp_packet", "mss_for_mtu", "TCP_SYN"]

TCP_SYN = 0x02
_TCP_FLAGS = 13
_TCP_CSUM = 16
_OPT_EOL = 0
_OPT_NOP = 1
_OPT_MSS = 2
_U16 = struct.Struct("!H")


def mss_for_mtu(mtu: int, v6: bool) -> int:
    """The MSS that makes a full segment fit `mtu`: mtu - 40 (IPv4) or - 60 (IPv6)."""
    return mtu - (60 if v6 else 40)


def clamp(buf: bytearray, tcp: int, mss_max: int) -> bool:
    """Lower the MSS option of the SYN whose TCP header starts at `buf[tcp]`.

    Returns True if the packet was changed. The caller made sure the packet is TCP.
    """
    n = len(buf)
    if n < tcp + 20 or not buf[tcp + _TCP_FLAGS] & TCP_SYN:
        return False
    doff = (buf[tcp + 12] >> 4) * 4
    end = tcp + doff
    if doff <= 20 or end > n:
        return False
    i = tcp + 20
    while i < end:
        kind = buf[i]
        if kind == _OPT_EOL:
            return False
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            return False
        length = buf[i + 1]
        if length < 2 or i + length > end:
            return False  # RFC 9293 MUST-7: cope with illegal lengths (stop, don't fail)
        if kind == _OPT_MSS and length == 4:
            old = (buf[i + 2] << 8) | buf[i + 3]
            if old <= mss_max:
                return False
            _U16.pack_into(buf, i + 2, mss_max)
            csum = (buf[tcp + _TCP_CSUM] << 8) | buf[tcp + _TCP_CSUM + 1]
            _U16.pack_into(buf, tcp + _TCP_CSUM, incremental_update16(csum, old, mss_max))
            return True
        i += length
    return False


def clamp_packet(buf: bytearray, start: int, mtu: int) -> bool:
    """Clamp the IP packet that begins at `buf[start]` (IPv4 or IPv6) for a path of `mtu`.

    The caller validated the IP header lengths. Returns True if the packet was changed.
    """
    version = buf[start] >> 4
    if version == 4:
        if buf[start + V4_PROTO] != PROTO_TCP:
            return False
        if ((buf[start + V4_FLAGS] << 8) | buf[start + V4_FLAGS + 1]) & OFFSET_MASK:
            return False  # not the first fragment: no TCP header here
        return clamp(buf, start + (buf[start] & 0x0F) * 4, mss_for_mtu(mtu, False))
    if version == 6 and buf[start + V6_NXT] == PROTO_TCP:
        return clamp(buf, start + 40, mss_for_mtu(mtu, True))
    return False

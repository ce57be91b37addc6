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
- Only unfragmented (or first-fragment) IPv4 and IPv6 with a complete TCP header are
  clamped. Malformed options stop the scan without change: never raise on peer input.
- IPv6 (RFC 8200 §4): the TCP header is found behind the extension header chain by
  stack/wire/prelude.py `v6_tcp_offset` (the one walker, with its rules: bounded by
  `MAX_EXT_HEADERS` and the payload length; a header running past the end is malformed and
  the packet is left alone). The inspection rule for chains that cannot be walked
  (`uninspectable`) is written there too, beside the walker.
- A SYN behind AH is found but never rewritten: AH's ICV covers the TCP header (RFC 4302
  §3.3.3.1), so a clamped SYN would fail authentication and be dropped at the receiver.

Theory of operation: `clamp(buf, ip_hlen, mss_max)` takes a mutable packet and the offset of
the TCP header, checks the SYN flag, walks the options (EOL, NOP, kind/length records) and
rewrites the MSS value with `pack_into`. It returns True when it changed the packet, so
the pipeline can count "mss_clamped". `clamp_packet` finds the TCP header: IPv4's IHL, or
IPv6's fixed header plus the extension chain (stack/wire/prelude.py `v6_tcp_offset`, so the
common case of TCP directly after the IPv6 header costs one comparison). `V6_EXT_HEADERS`
lets a caller's cheap SYN pre-check (`prelude.syn_candidate`) send such packets here.
"""

from __future__ import annotations

import struct

from stack.wire.checksum import incremental_update16
from stack.wire.ip import OFFSET_MASK, PROTO_TCP, V4_FLAGS, V4_PROTO, V6_NXT
from stack.wire.prelude import TCP_FLAGS, TCP_SYN, V6_EXT_HEADERS, v6_tcp_offset

__all__ = ["clamp", "clamp_packet", "mss_for_mtu"]

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
    if n < tcp + 20 or not buf[tcp + TCP_FLAGS] & TCP_SYN:
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
    if version == 6:
        nxt = buf[start + V6_NXT]
        if nxt == PROTO_TCP:
            return clamp(buf, start + 40, mss_for_mtu(mtu, True))
        if nxt not in V6_EXT_HEADERS:
            return False  # UDP, ICMPv6, ...: one set lookup on the send path
        tcp, ah = v6_tcp_offset(buf, start)
        if tcp < 0 or ah:
            return False  # nothing to clamp, or AH-protected (RFC 4302 §3.3.3.1)
        return clamp(buf, tcp, mss_for_mtu(mtu, True))
    return False

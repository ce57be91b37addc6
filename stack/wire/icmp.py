"""ICMP (RFC 792) and ICMPv6 (RFC 4443) error messages a router-like tunnel endpoint sends.

Rules:
- Which errors: Destination Unreachable (v4 type 3; v6 type 1), Fragmentation Needed (v4
  type 3 code 4 with the next-hop MTU, RFC 1191 §4), Packet Too Big (v6 type 2 with the MTU,
  RFC 4443 §3.2), Time Exceeded in transit (v4 type 11 code 0; v6 type 3 code 0).
- Size: the error quotes as much of the offending packet as fits in 576 bytes for IPv4
  (RFC 1812 §4.3.2.3) and in the IPv6 minimum MTU of 1280 bytes (RFC 4443 §2.4 (c)).
- Never answer with an error (RFC 1122 §3.2.2, RFC 4443 §2.4 (e)): an ICMP error message, a
  non-first IPv4 fragment, a packet to multicast/broadcast (IPv6: except Packet Too Big), or
  from a source that is not one host (unspecified, multicast, loopback, 0.0.0.0/8).
  `error_allowed_v4` / `error_allowed_v6` encode that and return False, never raise.
- Checksums: ICMPv4 over the ICMP message; ICMPv6 with the RFC 8200 §8.1 pseudo-header;
  both through stack/wire/checksum.py.

Theory of operation: the pipeline calls `icmp4_error` / `icmp6_error` with the offending
packet and the address we speak from, and gets a complete IP packet to write to the TUN.
This is the slow path (rate-limited by the caller), so plain building is fine here.
`parse_icmp_error` reads one back (tests, diagnostics).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire.checksum import checksum, pseudo_sum_v6
from stack.wire.ip import (
    OFFSET_MASK,
    PROTO_ICMP,
    PROTO_ICMPV6,
    V4_DST,
    V4_FLAGS,
    V4_PROTO,
    V4_SRC,
    V6_DST,
    V6_NXT,
    V6_SRC,
    Ipv4Header,
    Ipv6Header,
    build_ipv4,
    build_ipv6,
    packet_length,
)

__all__ = [
    "IcmpError",
    "icmp4_error",
    "icmp6_error",
    "error_allowed_v4",
    "error_allowed_v6",
    "parse_icmp_error",
    "ICMP4_UNREACH",
    "ICMP4_TIME_EXCEEDED",
    "UNREACH_NET",
    "UNREACH_HOST",
    "UNREACH_FRAG_NEEDED",
    "ICMP6_UNREACH",
    "ICMP6_PACKET_TOO_BIG",
    "ICMP6_TIME_EXCEEDED",
    "UNREACH6_NO_ROUTE",
    "UNREACH6_ADDRESS",
]

ICMP4_UNREACH = 3
ICMP4_TIME_EXCEEDED = 11
UNREACH_NET = 0
UNREACH_HOST = 1
UNREACH_FRAG_NEEDED = 4  # RFC 1191 §4
ICMP4_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})

ICMP6_UNREACH = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
UNREACH6_NO_ROUTE = 0
UNREACH6_ADDRESS = 3

V4_ERROR_MAX = 576  # RFC 1812 §4.3.2.3
V6_ERROR_MAX = 1280  # RFC 4443 §2.4 (c)
_ICMP_HEAD = struct.Struct("!BBHI")  # type code checksum rest-of-header


@dataclass(frozen=True, slots=True)
class IcmpError:
    version: int
    type: int
    code: int
    info: int  # v4 frag needed: next-hop MTU; v6 PTB: MTU; otherwise the unused word
    src: bytes
    dst: bytes
    quoted: bytes


def _bad_source_v4(addr: bytes | bytearray | memoryview) -> bool:
    a = addr[0]
    return a == 0 or a == 127 or a >= 224


def error_allowed_v4(packet: bytes | bytearray | memoryview) -> bool:
    """True if RFC 1122 §3.2.2 allows an ICMP error about this IPv4 packet."""
    if packet_length(packet) == 0 or packet[0] >> 4 != 4:
        return False
    if ((packet[V4_FLAGS] << 8) | packet[V4_FLAGS + 1]) & OFFSET_MASK:
        return False  # not the first fragment
    src = packet[V4_SRC : V4_SRC + 4]
    dst = packet[V4_DST : V4_DST + 4]
    if _bad_source_v4(src) or dst[0] >= 224 or bytes(dst) == b"\xff\xff\xff\xff":
        return False
    if packet[V4_PROTO] == PROTO_ICMP:
        ihl = (packet[0] & 0x0F) * 4
        if len(packet) <= ihl or packet[ihl] in ICMP4_ERROR_TYPES:
            return False  # an ICMP error (or too short to tell): never answer it
    return True


def error_allowed_v6(packet: bytes | bytearray | memoryview, too_big: bool = False) -> bool:
    """True if RFC 4443 §2.4 (e) allows an ICMPv6 error about this IPv6 packet."""
    if packet_length(packet) == 0 or packet[0] >> 4 != 6:
        return False
    src = bytes(packet[V6_SRC : V6_SRC + 16])
    if src == bytes(16) or src[0] == 0xFF or src == bytes(15) + b"\x01":
        return False
    if packet[V6_DST] == 0xFF and not too_big:
        return False
    if packet[V6_NXT] == PROTO_ICMPV6 and (len(packet) <= 40 or packet[40] < 128):
        return False  # ICMPv6 error messages are types 0-127
    return True


def icmp4_error(
    packet: bytes | bytearray | memoryview, icmp_type: int, code: int, src: bytes, info: int = 0
) -> bytes:
    """Return an IPv4 packet carrying an ICMP error about `packet`, from `src` (4 bytes).

    `info` is the 32-bit rest-of-header (for Fragmentation Needed: the MTU, in the low 16
    bits, RFC 1191 §4). The caller checked `error_allowed_v4(packet)`.
    """
    tot = packet_length(packet) or len(packet)
    quoted = bytes(packet[: min(tot, V4_ERROR_MAX - 28)])
    msg = bytearray(_ICMP_HEAD.pack(icmp_type, code, 0, info & 0xFFFFFFFF))
    msg += quoted
    struct.pack_into("!H", msg, 2, checksum(msg))
    dst = bytes(packet[V4_SRC : V4_SRC + 4])
    return build_ipv4(Ipv4Header(src=src, dst=dst, proto=PROTO_ICMP, ttl=64), msg)


def icmp6_error(
    packet: bytes | bytearray | memoryview, icmp_type: int, code: int, src: bytes, info: int = 0
) -> bytes:
    """Return an IPv6 packet carrying an ICMPv6 error about `packet`, from `src` (16 bytes).

    `info` is the 32-bit word after the checksum (Packet Too Big: the MTU, RFC 4443 §3.2).
    """
    tot = packet_length(packet) or len(packet)
    quoted = bytes(packet[: min(tot, V6_ERROR_MAX - 48)])
    dst = bytes(packet[V6_SRC : V6_SRC + 16])
    msg = bytearray(_ICMP_HEAD.pack(icmp_type, code, 0, info & 0xFFFFFFFF))
    msg += quoted
    struct.pack_into("!H", msg, 2, checksum(msg, pseudo_sum_v6(src, dst, PROTO_ICMPV6, len(msg))))
    return build_ipv6(Ipv6Header(src=src, dst=dst, next_header=PROTO_ICMPV6, hop_limit=64), msg)


def parse_icmp_error(packet: bytes | bytearray | memoryview) -> IcmpError | None:
    """Read an ICMP/ICMPv6 error back; None if not one or if its checksum is wrong."""
    tot = packet_length(packet)
    if not tot:
        return None
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        if packet[V4_PROTO] != PROTO_ICMP or tot < ihl + 8:
            return None
        msg = memoryview(packet)[ihl:tot]
        if checksum(msg) != 0 or msg[0] not in ICMP4_ERROR_TYPES:
            return None
        t, c, _, info = _ICMP_HEAD.unpack_from(msg)
        return IcmpError(4, t, c, info, bytes(packet[V4_SRC : V4_SRC + 4]),
                         bytes(packet[V4_DST : V4_DST + 4]), bytes(msg[8:]))
    if packet[V6_NXT] != PROTO_ICMPV6 or tot < 48:
        return None
    msg = memoryview(packet)[40:tot]
    src = bytes(packet[V6_SRC : V6_SRC + 16])
    dst = bytes(packet[V6_DST : V6_DST + 16])
    if checksum(msg, pseudo_sum_v6(src, dst, PROTO_ICMPV6, len(msg))) != 0 or msg[0] >= 128:
        return None
    t, c, _, info = _ICMP_HEAD.unpack_from(msg)
    return IcmpError(6, t, c, info, src, dst, bytes(msg[8:]))


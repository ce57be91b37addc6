"""UDP header (RFC 768): values, parse/build with the pseudo-header checksum.

Rules:
- RFC 768: 8-byte header (source port, destination port, length, checksum); length covers
  header + data and must fit the buffer. The checksum covers the pseudo-header (RFC 768 for
  IPv4, RFC 8200 §8.1 for IPv6), the header and the data; a computed 0 is sent as 0xFFFF.
- RFC 768 / RFC 1122 §4.1.3.4: over IPv4 a zero checksum means "none"; RFC 8200 §8.1: over
  IPv6 a zero checksum is invalid (except the RFC 6935/6936 zero-checksum mode), so
  `verify_udp` rejects it for IPv6 unless `allow_zero_v6=True`.
- Malformed input never raises: `parse_udp` returns None.

Theory of operation: in grebe the kernel's UDP socket builds and checks the outer UDP
header, so the data plane never calls this module per packet. It exists for the tests (an
independent check that what we hand the socket is what RFC 8086 expects on the wire) and
for tools that build full underlay packets (lab, pcap). One `struct.Struct`, a frozen value
type, and checksum math only through stack/wire/checksum.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire.checksum import partial, pseudo_sum_v4, pseudo_sum_v6, udp_fixup, verify
from stack.wire.ip import PROTO_UDP

__all__ = ["UDP_HEADER", "UdpHeader", "parse_udp", "build_udp", "verify_udp"]

UDP_HEADER = struct.Struct("!HHHH")


@dataclass(frozen=True, slots=True)
class UdpHeader:
    src_port: int
    dst_port: int
    length: int = 0  # 0 in build_udp = compute
    checksum: int = 0


def parse_udp(buf: bytes | bytearray | memoryview) -> tuple[UdpHeader, bytes] | None:
    """Return (header, data) or None when shorter than 8 bytes or the length is wrong."""
    if len(buf) < 8:
        return None
    sport, dport, length, csum = UDP_HEADER.unpack_from(buf)
    if length < 8 or length > len(buf):
        return None
    return UdpHeader(sport, dport, length, csum), bytes(buf[8:length])


def _pseudo(src: bytes, dst: bytes, length: int) -> int:
    if len(src) == 4:
        return pseudo_sum_v4(src, dst, PROTO_UDP, length)
    return pseudo_sum_v6(src, dst, PROTO_UDP, length)


def build_udp(
    src_port: int,
    dst_port: int,
    data: bytes | bytearray | memoryview,
    src: bytes | None = None,
    dst: bytes | None = None,
) -> bytes:
    """Return a UDP header + data. With src/dst addresses (4 or 16 bytes each) the checksum
    is computed (RFC 768); without them it is 0 ("none", IPv4 only).

    Raises ValueError for ports out of range or a datagram over 65535 bytes.
    """
    length = 8 + len(data)
    if length > 0xFFFF or not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF):
        raise ValueError("UDP port or length out of range")
    head = bytearray(UDP_HEADER.pack(src_port, dst_port, length, 0))
    if src is not None and dst is not None:
        s = partial(data, partial(head, _pseudo(src, dst, length)))
        struct.pack_into("!H", head, 6, udp_fixup((~s) & 0xFFFF))
    return bytes(head) + bytes(data)


def verify_udp(
    buf: bytes | bytearray | memoryview, src: bytes, dst: bytes, allow_zero_v6: bool = False
) -> bool:
    """True if the UDP checksum of `buf` (header + data) is valid for src -> dst.

    IPv4: a zero checksum means "not computed" and is accepted (RFC 768). IPv6: zero is
    rejected unless `allow_zero_v6` (RFC 8200 §8.1, RFC 6935/6936).
    """
    parsed = parse_udp(buf)
    if parsed is None:
        return False
    hdr, _ = parsed
    if hdr.checksum == 0:
        return len(src) == 4 or allow_zero_v6
    return verify(memoryview(buf)[: hdr.length], _pseudo(src, dst, hdr.length))

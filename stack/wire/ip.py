"""IPv4 (RFC 791) and IPv6 (RFC 8200) headers: values, parse/build, hot-path accessors.

Rules:
- RFC 791 §3.1: version 4, IHL >= 5 words, total length >= IHL*4 and <= the buffer; the
  header checksum covers the header only (computed with stack/wire/checksum.py).
- RFC 8200 §3: version 6, fixed 40-byte header, payload length <= the buffer.
- A buffer longer than the IP length (link padding) is accepted; the extra bytes are not
  part of the packet. Anything shorter or inconsistent is malformed: `parse_*` return
  None, they never raise for bad bytes (a misbehaving peer never raises).
- RFC 1624: a changed 16-bit word updates the checksum incrementally (`decrement_ttl_v4`).
- RFC 791 §3.2 fragmentation (`fragment_v4`): fragment data sizes are multiples of 8 except
  the last; MF set on all but the last; options without the copy flag go only in the first.

Theory of operation: two layers. The value layer (`Ipv4Header`, `Ipv6Header`, frozen and
slotted) is for tests, ICMP building and control paths. The hot path does not build
values: it reads fields with the module-level `struct.Struct`s and the offset constants
below (`V4_TTL`, `V6_HLIM`, ...) from memoryviews, and `header_len_ok` / `total_length`
answer the only questions the data plane asks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire.checksum import checksum, incremental_update16

__all__ = [
    "Ipv4Header",
    "Ipv6Header",
    "parse_ipv4",
    "parse_ipv6",
    "build_ipv4",
    "build_ipv6",
    "packet_length",
    "decrement_ttl_v4",
    "fragment_v4",
    "IPV4_HEADER",
    "IPV6_HEADER",
    "PROTO_ICMP",
    "PROTO_IPIP",
    "PROTO_TCP",
    "PROTO_UDP",
    "PROTO_IPV6",
    "PROTO_GRE",
    "PROTO_ICMPV6",
    "V4_TOTLEN",
    "V4_FLAGS",
    "V4_TTL",
    "V4_PROTO",
    "V4_CSUM",
    "V4_SRC",
    "V4_DST",
    "V6_PLEN",
    "V6_NXT",
    "V6_HLIM",
    "V6_SRC",
    "V6_DST",
    "DF",
    "MF",
    "OFFSET_MASK",
]

PROTO_ICMP = 1
PROTO_IPIP = 4
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_IPV6 = 41
PROTO_GRE = 47
PROTO_ICMPV6 = 58

# RFC 791 §3.1 field offsets
V4_TOTLEN = 2
V4_ID = 4
V4_FLAGS = 6  # 3 flag bits + 13-bit fragment offset
V4_TTL = 8
V4_PROTO = 9
V4_CSUM = 10
V4_SRC = 12
V4_DST = 16
DF = 0x4000
MF = 0x2000
OFFSET_MASK = 0x1FFF

# RFC 8200 §3 field offsets
V6_PLEN = 4
V6_NXT = 6
V6_HLIM = 7
V6_SRC = 8
V6_DST = 24

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")  # ver/ihl tos totlen id flags+off ttl proto csum
IPV6_HEADER = struct.Struct("!IHBB16s16s")  # ver/tc/flow plen nxt hlim src dst
_U16 = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Ipv4Header:
    src: bytes
    dst: bytes
    proto: int
    ttl: int = 64
    tos: int = 0
    ident: int = 0
    df: bool = False
    mf: bool = False
    frag_offset: int = 0  # in 8-byte units
    options: bytes = b""
    total_length: int = 0  # 0 in build_ipv4 = compute
    checksum: int = 0  # 0 in build_ipv4 = compute

    @property
    def header_length(self) -> int:
        return 20 + len(self.options)


@dataclass(frozen=True, slots=True)
class Ipv6Header:
    src: bytes
    dst: bytes
    next_header: int
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0
    payload_length: int = -1  # -1 in build_ipv6 = compute


def packet_length(buf: bytes | bytearray | memoryview, off: int = 0) -> int:
    """Return the IP length of the packet at `buf[off:]`, or 0 if malformed.

    Checks the version nibble, IHL and that the stated length fits in the buffer (RFC 791
    §3.1, RFC 8200 §3). The hot path uses this as its one validity test; `off` saves the
    caller a slice when the packet follows an encapsulation header.
    """
    n = len(buf) - off
    if n < 20:
        return 0
    vihl = buf[off]
    version = vihl >> 4
    if version == 4:
        ihl = (vihl & 0x0F) * 4
        tot = (buf[off + 2] << 8) | buf[off + 3]
        if ihl < 20 or tot < ihl or tot > n:
            return 0
        return tot
    if version == 6:
        if n < 40:
            return 0
        tot = 40 + ((buf[off + 4] << 8) | buf[off + 5])
        return tot if tot <= n else 0
    return 0


def parse_ipv4(buf: bytes | bytearray | memoryview) -> tuple[Ipv4Header, bytes] | None:
    """Return (header, payload) or None if malformed (wrong version, lengths)."""
    if len(buf) < 20 or buf[0] >> 4 != 4:
        return None
    tot = packet_length(buf)
    if not tot:
        return None
    vihl, tos, tot, ident, fo, ttl, proto, csum, src, dst = IPV4_HEADER.unpack_from(buf)
    ihl = (vihl & 0x0F) * 4
    hdr = Ipv4Header(
        src=src, dst=dst, proto=proto, ttl=ttl, tos=tos, ident=ident, df=bool(fo & DF),
        mf=bool(fo & MF), frag_offset=fo & OFFSET_MASK, options=bytes(buf[20:ihl]),
        total_length=tot, checksum=csum,
    )
    return hdr, bytes(buf[ihl:tot])


def build_ipv4(hdr: Ipv4Header, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Return header + payload; total_length and checksum are computed when left 0.

    Raises ValueError for values that do not fit (misuse of our own API).
    """
    if len(hdr.options) % 4 or len(hdr.options) > 40:
        raise ValueError("IPv4 options must be padded to 4 bytes and at most 40")
    if len(hdr.src) != 4 or len(hdr.dst) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    ihl = 20 + len(hdr.options)
    tot = hdr.total_length or ihl + len(payload)
    fo = (DF if hdr.df else 0) | (MF if hdr.mf else 0) | (hdr.frag_offset & OFFSET_MASK)
    head = bytearray(
        IPV4_HEADER.pack(0x40 | ihl // 4, hdr.tos, tot, hdr.ident, fo, hdr.ttl, hdr.proto, 0,
                         hdr.src, hdr.dst)
    )
    head += hdr.options
    csum = hdr.checksum or checksum(head)
    _U16.pack_into(head, V4_CSUM, csum)
    return bytes(head) + bytes(payload)


def parse_ipv6(buf: bytes | bytearray | memoryview) -> tuple[Ipv6Header, bytes] | None:
    """Return (header, payload) or None if malformed. Extension headers stay in payload."""
    if len(buf) < 40 or buf[0] >> 4 != 6:
        return None
    tot = packet_length(buf)
    if not tot:
        return None
    vtf, plen, nxt, hlim, src, dst = IPV6_HEADER.unpack_from(buf)
    hdr = Ipv6Header(
        src=src, dst=dst, next_header=nxt, hop_limit=hlim, traffic_class=(vtf >> 20) & 0xFF,
        flow_label=vtf & 0xFFFFF, payload_length=plen,
    )
    return hdr, bytes(buf[40:tot])


def build_ipv6(hdr: Ipv6Header, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Return header + payload; payload_length is computed when -1."""
    if len(hdr.src) != 16 or len(hdr.dst) != 16:
        raise ValueError("IPv6 addresses are 16 bytes")
    plen = len(payload) if hdr.payload_length < 0 else hdr.payload_length
    vtf = (6 << 28) | ((hdr.traffic_class & 0xFF) << 20) | (hdr.flow_label & 0xFFFFF)
    return IPV6_HEADER.pack(vtf, plen, hdr.next_header, hdr.hop_limit, hdr.src,
                            hdr.dst) + bytes(payload)


def decrement_ttl_v4(buf: bytearray, start: int = 0) -> None:
    """Decrement the TTL of the IPv4 header at `buf[start]` in place and patch its checksum
    incrementally (RFC 1624 eqn. 3). The caller has checked TTL > 0.

    The TTL shares its 16-bit word with the protocol field.
    """
    t = start + V4_TTL
    old = (buf[t] << 8) | buf[t + 1]
    buf[t] -= 1
    c = start + V4_CSUM
    _U16.pack_into(buf, c, incremental_update16((buf[c] << 8) | buf[c + 1], old, old - 0x100))


def _copied_options(options: bytes) -> bytes:
    """Options that go into non-first fragments: those with the copied flag (RFC 791 §3.1)."""
    kept = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break  # malformed length: stop copying
        length = options[i + 1]
        if kind & 0x80:
            kept += options[i : i + length]
        i += length
    kept += b"\x00" * (-len(kept) % 4)
    return bytes(kept)


def fragment_v4(packet: bytes | bytearray | memoryview, mtu: int) -> list[bytes]:
    """Split an IPv4 packet (DF clear) into fragments of at most `mtu` bytes (RFC 791 §3.2).

    Works on already-fragmented packets too (offsets and MF are carried over). Raises
    ValueError if `mtu` cannot carry 8 data bytes or the packet is malformed (callers
    validate first: this is our own API).
    """
    tot = packet_length(packet)
    if not tot or packet[0] >> 4 != 4:
        raise ValueError("not a well-formed IPv4 packet")
    ihl = (packet[0] & 0x0F) * 4
    header = bytes(packet[:ihl])
    later_header = header[:20] + _copied_options(header[20:])
    fo = (packet[V4_FLAGS] << 8) | packet[V4_FLAGS + 1]
    base_off = fo & OFFSET_MASK
    last_mf = fo & MF
    data = memoryview(packet)[ihl:tot]
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        h = header if pos == 0 else later_header
        room = (mtu - len(h)) & ~7
        if room <= 0:
            raise ValueError(f"MTU {mtu} too small to fragment")
        chunk = data[pos : pos + room]
        more = MF if pos + len(chunk) < len(data) else last_mf
        frag = bytearray(h)
        frag[0] = 0x40 | len(h) // 4
        _U16.pack_into(frag, V4_TOTLEN, len(h) + len(chunk))
        _U16.pack_into(frag, V4_FLAGS, (fo & DF) | more | (base_off + pos // 8))
        _U16.pack_into(frag, V4_CSUM, 0)
        _U16.pack_into(frag, V4_CSUM, checksum(frag))
        frag += chunk
        out.append(bytes(frag))
        pos += len(chunk)
    return out

"""pcapng blocks for `grebe capture`, and the outer IP/UDP headers of a captured datagram.

Rules (draft-ietf-opsawg-pcapng, the pcapng format Wireshark and tshark read):
- A file is one Section Header Block (SHB, §4.1), then one Interface Description Block
  (IDB, §4.2) per interface, then Enhanced Packet Blocks (EPB, §4.3). Every block is
  `type, total length, body, total length`, the body padded to 32 bits; the byte order is
  the writer's, announced by the SHB's byte-order magic 0x1A2B3C4D (we write little-endian).
- Interface 0 ("outer") carries the tunnel datagrams as whole IP packets, interface 1
  ("inner") the packets they carry; both are LINKTYPE_RAW (101: the version nibble says
  IPv4 or IPv6). The IDBs carry if_name (2) and if_tsresol (9) = 6 (microseconds).
- Each EPB carries epb_flags (option 2, §4.3.1): bits 0-1 the direction, 01 inbound
  (received from the peer), 10 outbound (sent to it).
- The endpoint sees a datagram's UDP payload, not the headers the kernel puts around it:
  `outer_packet` rebuilds them (IPv4 RFC 791 with its header checksum, IPv6 RFC 8200, UDP
  RFC 768 with its checksum, which IPv6 requires) from the socket addresses, TTL 64.
- `inner_packet` takes the inner packet out of a GRE (RFC 2784 §2, RFC 2890 §2: C, K and S
  add 4 bytes each) or IPIP-in-UDP payload (RFC 2003, the Linux FOU layout: the packet
  itself); keepalives and other non-IP payloads give None.

Theory of operation: pure functions from bytes and numbers to bytes; `bridge/io/capture.py`
writes them (the client the header, the endpoint's taps the EPBs, each block in one
write(2) on an O_APPEND file, so blocks from the two processes of an endpoint never mix).
"""

from __future__ import annotations

import ipaddress
import struct

from stack.wire.checksum import checksum, pseudo_sum_v4, pseudo_sum_v6

__all__ = ["LINKTYPE_RAW", "IF_OUTER", "IF_INNER", "INBOUND", "OUTBOUND", "header",
           "epb", "outer_packet", "inner_packet", "read_blocks"]

LINKTYPE_RAW = 101
IF_OUTER, IF_INNER = 0, 1
INBOUND, OUTBOUND = 1, 2  # epb_flags direction bits
SHB, IDB, EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BOM = 0x1A2B3C4D
_HEAD = struct.Struct("<II")
_EPB = struct.Struct("<IIIIII")  # type, length, interface, ts high, ts low, captured len
_OPT = struct.Struct("<HH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_GRE_IP = {0x0800, 0x86DD}  # RFC 2784 §2.4 protocol types carried as inner packets


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return _OPT.pack(code, len(value)) + _pad(value)


def _block(kind: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return _HEAD.pack(kind, n) + body + struct.pack("<I", n)


def header(names: tuple[str, ...] = ("outer", "inner"), comment: str = "") -> bytes:
    """The SHB and one IDB (LINKTYPE_RAW, microseconds) per interface name."""
    opts = (_option(1, comment.encode()) if comment else b"") + _option(0, b"")
    out = _block(SHB, struct.pack("<IHHq", _BOM, 1, 0, -1) + opts)
    for name in names:
        opts = _option(2, name.encode()) + _option(9, bytes([6])) + _option(0, b"")
        out += _block(IDB, struct.pack("<HHI", LINKTYPE_RAW, 0, 0) + opts)
    return out


def epb(interface: int, micros: int, packet: bytes | bytearray | memoryview,
        direction: int) -> bytes:
    """One Enhanced Packet Block: `packet` on `interface` at `micros` since the epoch."""
    data = bytes(packet)
    body = (struct.pack("<IIIII", interface, micros >> 32, micros & 0xFFFFFFFF, len(data),
                        len(data)) + _pad(data) + _option(2, struct.pack("<I", direction))
            + _option(0, b""))
    return _block(EPB, body)


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address, a dual-stack socket's v4-mapped form ("::ffff:198.18.0.2") as IPv4."""
    a = ipaddress.ip_address(host.split("%")[0])
    if a.version == 6 and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def outer_packet(src: tuple[str, int], dst: tuple[str, int],
                 payload: bytes | bytearray | memoryview) -> bytes:
    """The IP + UDP packet the kernel sent or received for this UDP payload."""
    s, d = _unmapped(src[0]), _unmapped(dst[0])
    if s.version != d.version:  # cannot happen on one socket; keep both as IPv6
        s, d = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (s, d))
    body = bytes(payload)
    ulen = 8 + len(body)
    if s.version == 4:
        psum = pseudo_sum_v4(s.packed, d.packed, 17, ulen)
    else:
        psum = pseudo_sum_v6(s.packed, d.packed, 17, ulen)
    udp = _UDP.pack(src[1], dst[1], ulen, 0) + body
    csum = checksum(udp, psum) or 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    if s.version == 4:
        ip = _IPV4.pack(0x45, 0, 20 + ulen, 0, 0, 64, 17, 0, s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return ip + udp
    return _IPV6.pack(6 << 28, ulen, 17, 64, s.packed, d.packed) + udp


def inner_packet(payload: bytes | bytearray | memoryview, gre: bool) -> bytes | None:
    """The inner IP packet of a GRE-in-UDP or IPIP-in-UDP payload, or None (a keepalive,
    a non-IP protocol, a truncated header)."""
    view = memoryview(payload)
    if not gre:
        return bytes(view) if len(view) >= 20 and view[0] >> 4 in (4, 6) else None
    if len(view) < 4:
        return None
    flags = view[0]
    off = 4 + 4 * (bool(flags & 0x80) + bool(flags & 0x20) + bool(flags & 0x10))
    proto = view[2] << 8 | view[3]
    if proto not in _GRE_IP or len(view) < off + 20:
        return None
    return bytes(view[off:])


def read_blocks(data: bytes) -> list[tuple[int, bytes]]:
    """(block type, body) of each whole block of a little-endian pcapng byte string; a
    truncated last block (still being written) is left out."""
    out = []
    at = 0
    while at + 12 <= len(data):
        kind, n = _HEAD.unpack_from(data, at)
        if n < 12 or at + n > len(data):
            break
        out.append((kind, data[at + 8:at + n - 4]))
        at += n
    return out

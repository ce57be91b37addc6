"""The TCP header: TcpSegment, parse_tcp() and emit_tcp().

Rules:
- RFC 9293 §3.1: a 20-byte fixed header (ports, sequence, acknowledgment, data offset,
  flags, window, checksum, urgent pointer) followed by options up to the data offset.
  A data offset below 5 or beyond the buffer is malformed: dropped, counted, never raised.
- RFC 9293 §3.1 and MUST-2/MUST-3: the checksum covers the pseudo-header (RFC 9293 §3.1
  for IPv4, RFC 8200 §8.1 for IPv6), the header and the payload; the sender computes it
  and the receiver verifies it (a bad one is dropped as "bad_checksum"). The address
  length (4 or 16 bytes) chooses the pseudo-header. Only stack/wire/checksum.py sums.
- Options follow stack/wire/options.py (MUST-4..7): garbage in options never raises.
- The payload is a memoryview into the caller's buffer (no copy); a segment may carry more
  than one MSS of payload (TSO/GRO super-segments from a TUN).
- ECN (RFC 3168 §5, §6.1): the IP header's ECN field travels with the segment as `ecn`
  (0 Not-ECT, 1 ECT(1), 2 ECT(0), 3 CE): the adapter that parsed the IP header passes it
  to `parse_tcp` (the codepoint as received), and the stack sets it on what it sends (the
  codepoint for the adapter to write: ECT(0) on an ECN-capable connection's new data).
  The TCP flags ECE and CWR are ordinary flag bits here; their meaning is stack/send.py's.

Theory of operation: one `struct.Struct` for the fixed header, unpacked once from a
memoryview. The options of nearly every data segment are NOP, NOP, TSopt (12 bytes,
RFC 7323 Appendix A layout); that case is read with one more unpack, the rest goes through
`parse_options`. `emit_tcp_parts` returns the header (checksum filled in) and the payload
separately, so that an adapter can write them with writev, or prepend an IP header,
without copying the payload; `emit_tcp` joins them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from stack.wire.checksum import checksum, partial, pseudo_sum_v4, pseudo_sum_v6
from stack.wire.options import build_options, parse_options

__all__ = [
    "FIN",
    "SYN",
    "RST",
    "PSH",
    "ACK",
    "URG",
    "ECE",
    "CWR",
    "PROTO_TCP",
    "NOT_ECT",
    "ECT0",
    "ECT1",
    "CE",
    "TcpSegment",
    "parse_tcp",
    "emit_tcp",
    "emit_tcp_parts",
    "flags_str",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80
PROTO_TCP = 6
# RFC 3168 §5: the ECN field of the IP header (IPv4 TOS / IPv6 traffic class, low 2 bits)
NOT_ECT = 0
ECT1 = 1
ECT0 = 2
CE = 3

# RFC 9293 §3.1 Figure 1: ports, seq, ack, data offset<<4, flags, window, checksum, urgent.
HEADER = struct.Struct("!HHIIBBHHH")
HEADER_LEN = 20
OFF_CHECKSUM = 16
_TS_FAST = struct.Struct("!4sII")
_NOP_NOP_TS = b"\x01\x01\x08\x0a"

_EMPTY = memoryview(b"")


class TcpSegment(NamedTuple):
    """One TCP segment, parsed. `window` is the raw 16-bit field (unscaled).

    `ts` is (TSval, TSecr) when a TSopt is present; `sack` holds SACK blocks (left, right)
    as 32-bit sequence numbers; `mss`, `wscale` and `sack_perm` come from SYN options.
    `ecn` is the IP ECN codepoint (RFC 3168 §5): as received, or the one to send.
    A NamedTuple: immutable, no __dict__, and built at tuple speed (a frozen dataclass
    costs six times as much per segment on the hot path); `seg._replace(...)` makes a
    variant.
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes | memoryview = b""
    urg: int = 0
    mss: int | None = None
    wscale: int | None = None
    sack_perm: bool = False
    ts: tuple[int, int] | None = None
    sack: tuple[tuple[int, int], ...] = ()
    ecn: int = 0

    @property
    def seg_len(self) -> int:
        """SEG.LEN: payload octets plus one for SYN and one for FIN (RFC 9293 §3.4)."""
        return len(self.payload) + (self.flags & SYN) // SYN + (self.flags & FIN)

    def __repr__(self) -> str:
        opts = []
        if self.mss is not None:
            opts.append(f"mss={self.mss}")
        if self.wscale is not None:
            opts.append(f"ws={self.wscale}")
        if self.sack_perm:
            opts.append("sackok")
        if self.ts is not None:
            opts.append(f"ts={self.ts[0]}/{self.ts[1]}")
        if self.sack:
            opts.append(f"sack={list(self.sack)}")
        if self.ecn:
            opts.append(("", "ect1", "ect0", "ce")[self.ecn & 3])
        return (
            f"<TCP {self.src_port}>{self.dst_port} [{flags_str(self.flags)}] seq={self.seq} "
            f"ack={self.ack} win={self.window} len={len(self.payload)}"
            + (" " + " ".join(opts) if opts else "")
            + ">"
        )


def flags_str(flags: int) -> str:
    """Flags as tcpdump-like letters: S, F, R, P, ., U, E, W."""
    out = "".join(
        ch for bit, ch in ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (URG, "U"),
                           (ECE, "E"), (CWR, "W")) if flags & bit
    )
    return out + "." if flags & ACK else out


def _pseudo(src: bytes, dst: bytes, length: int) -> int:
    if len(src) == 4:
        return pseudo_sum_v4(src, dst, PROTO_TCP, length)
    return pseudo_sum_v6(src, dst, PROTO_TCP, length)


def _count(drops: dict[str, int] | None, reason: str) -> None:
    if drops is not None:
        drops[reason] = drops.get(reason, 0) + 1


def parse_tcp(
    buf: bytes | bytearray | memoryview,
    src: bytes,
    dst: bytes,
    *,
    drops: dict[str, int] | None = None,
    verify_checksum: bool = True,
    ecn: int = 0,
) -> TcpSegment | None:
    """Parse a TCP segment (header + payload) carried between packed addresses src -> dst.

    Returns None for a malformed segment or a bad checksum (RFC 9293 MUST-3) and adds one
    to `drops[reason]` ("truncated", "bad_offset", "bad_checksum"). Never raises for any
    input bytes. `verify_checksum=False` is for a TUN that already vouched for it
    (virtio-net VIRTIO_NET_HDR_F_DATA_VALID). `ecn` is the IP header's ECN field (RFC 3168
    §5), kept in the segment for the connection (`TcpSegment.ecn`).
    """
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    n = len(mv)
    if n < HEADER_LEN:
        _count(drops, "truncated")
        return None
    sport, dport, seq, ack, off, flags, window, _csum, urg = HEADER.unpack_from(mv, 0)
    hlen = (off >> 4) * 4
    if hlen < HEADER_LEN or hlen > n:
        _count(drops, "bad_offset")
        return None
    if verify_checksum and partial(mv, _pseudo(src, dst, n)) != 0xFFFF:
        _count(drops, "bad_checksum")
        return None
    if hlen == HEADER_LEN:
        return TcpSegment(sport, dport, seq, ack, flags, window, mv[hlen:], urg,
                          None, None, False, None, (), ecn)
    if hlen == 32:
        head, tsval, tsecr = _TS_FAST.unpack_from(mv, HEADER_LEN)
        if head == _NOP_NOP_TS:
            return TcpSegment(sport, dport, seq, ack, flags, window, mv[hlen:], urg,
                              None, None, False, (tsval, tsecr), (), ecn)
    mss, wscale, sack_perm, ts, sack = parse_options(mv, HEADER_LEN, hlen)
    return TcpSegment(
        sport, dport, seq, ack, flags, window, mv[hlen:], urg, mss, wscale, sack_perm, ts, sack,
        ecn,
    )


def emit_tcp_parts(
    seg: TcpSegment, src: bytes, dst: bytes, *, partial_csum: bool = False
) -> tuple[bytes, bytes | memoryview]:
    """Return (header with options and checksum, payload) for `seg` from src to dst.

    `partial_csum=True` leaves the checksum to a device (Linux CHECKSUM_PARTIAL, virtio
    VIRTIO_NET_HDR_F_NEEDS_CSUM): the field holds the folded pseudo-header sum and no payload
    byte is summed here. Raises ValueError if the options exceed 40 bytes (our own misuse).
    """
    ts = seg.ts
    if seg.mss is None and seg.wscale is None and not seg.sack_perm and not seg.sack:
        if ts is None:
            opts = b""
        else:
            opts = _TS_FAST.pack(_NOP_NOP_TS, ts[0], ts[1])
    else:
        opts = build_options(seg.mss, seg.wscale, seg.sack_perm, ts, seg.sack)
    hlen = HEADER_LEN + len(opts)
    payload = seg.payload
    header = HEADER.pack(
        seg.src_port, seg.dst_port, seg.seq, seg.ack, (hlen // 4) << 4, seg.flags,
        seg.window, 0, seg.urg,
    ) + opts
    initial = _pseudo(src, dst, hlen + len(payload))
    if partial_csum:
        ps = initial.to_bytes(2, "big")
        return header[:OFF_CHECKSUM] + ps + header[OFF_CHECKSUM + 2 :], payload
    if payload:
        initial = partial(payload, initial)
    c = checksum(header, initial)
    header = header[:OFF_CHECKSUM] + c.to_bytes(2, "big") + header[OFF_CHECKSUM + 2 :]
    return header, payload


def emit_tcp(seg: TcpSegment, src: bytes, dst: bytes) -> bytes:
    """Return the segment as bytes (header, options, payload) with its checksum (MUST-2)."""
    header, payload = emit_tcp_parts(seg, src, dst)
    if not payload:
        return header
    return b"".join((header, payload))

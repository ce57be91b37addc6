"""Encapsulations: GRE (RFC 2784/2890) and IPIP (RFC 2003), both carried over UDP.

Wire layouts (the outer IP and UDP headers are the kernel socket's; we build the payload):
- GRE-in-UDP, RFC 8086: UDP | GRE header | inner IPv4 or IPv6 packet.
- IPIP-in-UDP, Linux FOU layout (`ip fou add port P ipproto 4`): UDP | inner packet; the
  inner version nibble tells IPv4 from IPv6 (FOU has no header of its own).

GRE rules:
- RFC 2784 §2.3.1 / RFC 2890 §2: header = flags+version (16 bits) and Protocol Type (16),
  then, in this fixed order, Checksum+Reserved1 if C, Key if K, Sequence Number if S.
  Length = 4 + 4 * (C + K + S).
- RFC 2784 §2.3.1: Version MUST be 0 -> otherwise drop ("bad_version").
- RFC 2784 §2.5: a receiver MUST discard a packet with any of Reserved0 bits 1-5 set unless
  it implements RFC 1701. RFC 2890 §2 gives bits 2 (K) and 3 (S) their meaning, so we
  discard bit 1 (R, routing), bit 4 (s, strict source route) and bit 5 (the high recursion
  control bit): "bad_flags". Bits 6-12 (the low recursion bits and RFC 1701 flags) MUST be
  ignored on receipt, and are (RFC 2784 §2.5 says so; dropping them would violate it).
- RFC 2784 §2.4: Protocol Type is an EtherType: 0x0800 IPv4, 0x86DD IPv6. Other types are
  dropped ("bad_proto"), except our keepalive (type 0, no payload, below).
- RFC 2784 §2.5.1: the checksum covers GRE header and payload with the field zeroed;
  Reserved1 MUST be sent as zero. Like Linux (`icsum`/`ocsum`), the C bit must match the
  peer's `checksum` setting in both directions, else "checksum".
- RFC 2890 §2.1: the Key identifies the flow; K presence and value must equal the peer's
  key_in, else "wrong_key". RFC 2890 §3: a key is not authentication.
- RFC 2890 §2.2: the first packet carries sequence number 0; the counter is free-running
  modulo 2**32 (per key; one key per peer here).

Keepalive (our choice, documented): a GRE header with Protocol Type 0 and no payload (with
the peer's key and checksum bit, without a sequence number, RFC 2890 §2.2 allows packets with
and without S to be interleaved); for IPIP, a zero-length UDP payload. Both prove liveness
and are never delivered. (Linux-style GRE keepalives, an inner IPv4 GRE packet addressed
back to the sender, need raw IP and are not used: UDP carries us.)

RFC 8086 §3.2.1 source port: `flow_source_port` hashes the inner flow (addresses, protocol,
ports when the packet is a first fragment of TCP/UDP/SCTP/DCCP) with CRC-32 into
49152-65535; constant per flow. RFC 8086 §3.2.2 UDP checksum: over IPv4 the encapsulator
MAY send a zero checksum, a receiver MUST accept it and MUST check a non-zero one; over IPv6
the checksum MUST be computed in the general (non-TMCE) environment (RFC 8086 §3.2.2, RFC
8200 §8.1; RFC 6935/6936 zero checksums only in a controlled environment). What we do: the
kernel UDP socket computes and verifies the outer checksum in both families (Linux sets a
full UDP checksum by default, also over IPv4), which satisfies both rules; the core never
sees or builds it. stack/wire/udp.py checks those rules in tests.

Theory of operation: per peer one `GreEncoder` holds prebuilt header templates (one per
inner family); `wrap()` concatenates template and packet into one new bytearray (the only
allocation per packet) and patches the sequence number with `pack_into`; the pipeline then
edits the inner header in place (TTL, MSS) and calls `seal()` to fill the GRE checksum.
`decode_gre` is the receive side: it returns a tuple of ints (no objects per packet).
`GreHeader` / `build_gre` / `parse_gre` are the value layer for tests and tools.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from bridge.counters import (
    R_BAD_FLAGS,
    R_BAD_PROTO,
    R_BAD_VERSION,
    R_CHECKSUM,
    R_MALFORMED,
    R_WRONG_KEY,
)
from stack.wire.checksum import checksum, partial, verify
from stack.wire.prelude import V4_ADDRS_AT, V6_ADDRS_AT

__all__ = [
    "GRE_C",
    "GRE_R",
    "GRE_K",
    "GRE_S",
    "GRE_SSR",
    "GRE_RECUR5",
    "GRE_DISCARD",
    "GRE_VERSION",
    "ETH_IPV4",
    "ETH_IPV6",
    "PROTO_KEEPALIVE",
    "GreHeader",
    "GreEncoder",
    "gre_header_length",
    "build_gre",
    "parse_gre",
    "decode_gre",
    "overhead",
    "flow_source_port",
    "KEEPALIVE",
]

GRE_C = 0x8000  # bit 0: checksum present (RFC 2784)
GRE_R = 0x4000  # bit 1: routing present (RFC 1701) -> discard
GRE_K = 0x2000  # bit 2: key present (RFC 2890 §2)
GRE_S = 0x1000  # bit 3: sequence number present (RFC 2890 §2)
GRE_SSR = 0x0800  # bit 4: strict source route (RFC 1701) -> discard
GRE_RECUR5 = 0x0400  # bit 5: high bit of RFC 1701 recursion control -> discard
GRE_DISCARD = GRE_R | GRE_SSR | GRE_RECUR5  # RFC 2784 §2.5: bits 1-5 minus K and S
GRE_VERSION = 0x0007
ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
PROTO_KEEPALIVE = 0x0000  # our GRE keepalive: protocol type 0, no payload

KEEPALIVE = -2  # decode_gre status: a keepalive, not data
_HEAD = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class GreHeader:
    protocol: int
    key: int | None = None
    seq: int | None = None
    checksum_present: bool = False
    checksum: int = 0  # as parsed; build_gre computes it
    flags_extra: int = 0  # ignored bits 6-12 as parsed; build_gre sends 0 (RFC 2784 §2.5)
    version: int = 0

    @property
    def length(self) -> int:
        return gre_header_length(self.checksum_present, self.key is not None, self.seq is not None)


def gre_header_length(csum: bool, key: bool, seq: bool) -> int:
    """4 + 4 bytes for each optional field present (RFC 2890 §2)."""
    return 4 + 4 * (int(csum) + int(key) + int(seq))


def overhead(encap_gre: bool, outer_v6: bool, key: bool, seq: bool, csum: bool) -> int:
    """Bytes added to an inner packet: outer IP + UDP (8) + GRE header (or 0 for IPIP).

    FIELD.md §3.6: GRE-in-UDP over IPv4 32 / +key 36 / +key+seq 40; IPIP-in-UDP 28 (v4),
    48 (v6).
    """
    outer = (40 if outer_v6 else 20) + 8
    return outer + (gre_header_length(csum, key, seq) if encap_gre else 0)


def build_gre(hdr: GreHeader, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Return GRE header + payload; the checksum (if C) is computed (RFC 2784 §2.5.1).

    Raises ValueError for a key or sequence number that does not fit in 32 bits.
    """
    flags = (GRE_C if hdr.checksum_present else 0) | (hdr.version & GRE_VERSION)
    out = bytearray()
    if hdr.key is not None:
        flags |= GRE_K
    if hdr.seq is not None:
        flags |= GRE_S
    out += _HEAD.pack(flags, hdr.protocol)
    if hdr.checksum_present:
        out += b"\x00\x00\x00\x00"
    for v in (hdr.key, hdr.seq):
        if v is not None:
            if not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"GRE key/sequence {v} does not fit 32 bits")
            out += _U32.pack(v)
    out += payload
    if hdr.checksum_present:
        _U16.pack_into(out, 4, checksum(out))
    return bytes(out)


def parse_gre(buf: bytes | bytearray | memoryview) -> tuple[GreHeader, bytes] | int:
    """Return (header, payload), or a drop reason (R_* int) if the header is unacceptable.

    Checks version, discard bits and lengths; does not verify the checksum value nor the
    protocol type (that is policy: see `decode_gre`). Never raises.
    """
    n = len(buf)
    if n < 4:
        return R_MALFORMED
    flags, proto = _HEAD.unpack_from(buf)
    if flags & GRE_VERSION:
        return R_BAD_VERSION
    if flags & GRE_DISCARD:
        return R_BAD_FLAGS
    off = 4
    csum = 0
    key = seq = None
    if off + 4 * ((flags & GRE_C) // GRE_C + (flags & GRE_K) // GRE_K +
                  (flags & GRE_S) // GRE_S) > n:
        return R_MALFORMED
    if flags & GRE_C:
        csum = _U16.unpack_from(buf, off)[0]
        off += 4
    if flags & GRE_K:
        key = _U32.unpack_from(buf, off)[0]
        off += 4
    if flags & GRE_S:
        seq = _U32.unpack_from(buf, off)[0]
        off += 4
    hdr = GreHeader(protocol=proto, key=key, seq=seq, checksum_present=bool(flags & GRE_C),
                    checksum=csum, flags_extra=flags & 0x03F8)
    return hdr, bytes(buf[off:])


def decode_gre(
    buf: bytes | bytearray | memoryview, key_in: int | None, csum_in: bool
) -> tuple[int, int, int]:
    """Receive-side checks for one peer. Returns (status, offset, seq):

    status -1 = data (inner packet at `offset`), KEEPALIVE, or a drop reason R_*;
    seq = the sequence number, or -1 without S. Never raises; allocates only the tuple.
    """
    n = len(buf)
    if n < 4:
        return R_MALFORMED, 0, -1
    flags, proto = _HEAD.unpack_from(buf)
    if flags & GRE_VERSION:  # RFC 2784 §2.3.1
        return R_BAD_VERSION, 0, -1
    if flags & GRE_DISCARD:  # RFC 2784 §2.5
        return R_BAD_FLAGS, 0, -1
    off = 4
    if flags & GRE_C:
        if not csum_in or n < 8:
            return (R_CHECKSUM if n >= 8 else R_MALFORMED), 0, -1
        if not verify(buf):  # RFC 2784 §2.5.1: header + payload
            return R_CHECKSUM, 0, -1
        off = 8
    elif csum_in:
        return R_CHECKSUM, 0, -1  # Linux icsum: a packet without C is dropped too
    if flags & GRE_K:
        if n < off + 4:
            return R_MALFORMED, 0, -1
        if key_in is None or _U32.unpack_from(buf, off)[0] != key_in:
            return R_WRONG_KEY, 0, -1
        off += 4
    elif key_in is not None:
        return R_WRONG_KEY, 0, -1  # RFC 2890 §2.1: the key demultiplexes; none = not ours
    seq = -1
    if flags & GRE_S:
        if n < off + 4:
            return R_MALFORMED, 0, -1
        seq = _U32.unpack_from(buf, off)[0]
        off += 4
    if proto == ETH_IPV4 or proto == ETH_IPV6:
        if n <= off or (buf[off] >> 4) != (4 if proto == ETH_IPV4 else 6):
            return R_MALFORMED, 0, -1
        return -1, off, seq
    if proto == PROTO_KEEPALIVE and n == off:
        return KEEPALIVE, off, seq
    return R_BAD_PROTO, 0, -1


class GreEncoder:
    """Per-peer GRE sender: prebuilt templates, free-running sequence number (RFC 2890 §2.2)."""

    __slots__ = ("hlen", "csum", "seq_on", "seq", "_tmpl4", "_tmpl6", "_seq_off", "_keepalive")

    def __init__(self, key: int | None, seq: bool, csum: bool) -> None:
        self.hlen = gre_header_length(csum, key is not None, seq)
        self.csum = csum
        self.seq_on = seq
        self.seq = 0  # RFC 2890 §2.2: the first packet is sent with sequence number 0
        self._seq_off = self.hlen - 4
        templates = []
        for proto in (ETH_IPV4, ETH_IPV6):
            hdr = GreHeader(proto, key=key, seq=0 if seq else None, checksum_present=csum)
            templates.append(build_gre(hdr)[: self.hlen])
        self._tmpl4 = bytes(templates[0])
        self._tmpl6 = bytes(templates[1])
        ka = GreHeader(PROTO_KEEPALIVE, key=key, checksum_present=csum)
        self._keepalive = build_gre(ka)

    def wrap(self, packet: bytes | bytearray | memoryview, v6: bool) -> bytearray:
        """Return a new bytearray: GRE header (seq patched) + packet. Call seal() last."""
        dgram = bytearray(self._tmpl6 if v6 else self._tmpl4)
        dgram += packet
        if self.seq_on:
            _U32.pack_into(dgram, self._seq_off, self.seq)
            self.seq = (self.seq + 1) & 0xFFFFFFFF
        return dgram

    def prefix(self, v6: bool) -> tuple[bytes, int]:
        """(header template, offset of its sequence number or -1) for a batch builder
        (bridge/gso.py) that patches consecutive sequence numbers itself; it must then call
        `advance(count)`. With checksums on, the builder fills the checksum field itself
        (bridge/gso.py `encap_segments(..., csum_at=4)`: it does not call `seal`)."""
        return (self._tmpl6 if v6 else self._tmpl4), (self._seq_off if self.seq_on else -1)

    def advance(self, count: int) -> None:
        """`count` datagrams were built from `prefix()` with sequence numbers from `seq`."""
        if self.seq_on:
            self.seq = (self.seq + count) & 0xFFFFFFFF

    def seal(self, dgram: bytearray) -> None:
        """Fill the GRE checksum (RFC 2784 §2.5.1) after the inner packet was edited."""
        if self.csum:
            dgram[4] = dgram[5] = 0
            _U16.pack_into(dgram, 4, (~partial(dgram)) & 0xFFFF)

    def keepalive(self) -> bytes:
        """The keepalive payload: protocol type 0, no payload, no sequence number."""
        return self._keepalive


_L4_PORTS = frozenset({6, 17, 33, 132})  # TCP, UDP, DCCP, SCTP: ports in the first 4 bytes


def flow_source_port(packet: bytes | bytearray | memoryview) -> int:
    """RFC 8086 §3.2.1: a UDP source port in 49152-65535, constant per inner flow.

    Hashes (src, dst, protocol[, ports]) with CRC-32 (stable across processes, unlike
    hash()). Never raises: a packet too short to read gives a fixed port 49152.
    """
    n = len(packet)
    if n < 20:
        return 49152
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        proto = packet[9]
        key = bytes(packet[V4_ADDRS_AT])
        frag = ((packet[6] & 0x1F) << 8) | packet[7]
        if proto in _L4_PORTS and not frag and n >= ihl + 4:
            key += bytes(packet[ihl : ihl + 4])
    elif n >= 40:
        proto = packet[6]
        # addresses + flow label
        key = bytes(packet[V6_ADDRS_AT]) + bytes((packet[1] & 0x0F, packet[2], packet[3]))
        if proto in _L4_PORTS and n >= 44:
            key += bytes(packet[40:44])
    else:
        return 49152
    return 49152 | (zlib.crc32(key, proto) & 0x3FFF)

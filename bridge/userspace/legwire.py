"""IP framing of the splice legs' segments (terminator.py): what the legs send, what
they take in runs. Pure: segments and bytes in, bytes and segments out.

Rules:
- Client-leg and server-leg packets get an IPv4 header (RFC 791 §3.1: no options, DF set,
  TTL 64, identification counting up per packet, header checksum over the constant words
  cached per address pair, RFC 1071 §2) or an IPv6 header (RFC 8200 §3, hop limit 64, flow
  label 0). `packet()` carries a complete TCP checksum (RFC 9293 §3.1, MUST-2).
- ECN (RFC 3168 §5): the IP ECN field is the segment's `ecn` (stack/wire/tcp.py: ECT(0)
  on the new data of a leg that negotiated ECN, else Not-ECT): the IPv4 TOS byte's low
  two bits (the header checksum adds it to the cached sum), the IPv6 traffic class's.
  Coming in, the field goes to the leg with the segment (`ecn_of`); `merge_run` gives a
  merged run CE if any of its packets was CE-marked (RFC 3168 §5: a mark is never lost;
  what Linux GRO does by not merging across a TOS change, for the same effect).
- `frame()` is for a TUN opened with IFF_VNET_HDR and TUN_F_CSUM|TSO4|TSO6: a `TunFrame`
  (virtio 1.x §5.1.6 header + packet) with VIRTIO_NET_HDR_F_NEEDS_CSUM (csum_start at the
  TCP header, csum_offset 16, the field holding the pseudo-header sum; the kernel completes
  it), and, when the payload exceeds the MSS, gso_type TCPV4/TCPV6 (ECN bit with CWR) and
  gso_size = the MSS: the kernel cuts it like TSO, numbering the IPv4 identification one per
  segment (RFC 6864 §4.1), so the counter advances by the segment count.
- The legs' packets are keyed by stack/wire/prelude.py `tcp_key` (the keyed-TCP view) and
  framed for a vnet TUN with stack/wire/vnet.py's header.
- `run_part()` says whether a packet may join a run (ACK-only flags but PSH, a payload, a
  header of 20 bytes or 20 + TSopt) and gives what must be equal within a run: every TCP
  header byte but seq, the PSH bit and the checksum (what Linux GRO compares).
- ICMP errors about a leg's segment (`quoted_leg`): only ICMP (RFC 792) or ICMPv6 (RFC 4443)
  errors addressed to a client of a live splice are looked at; the quote must hold the IP
  header and at least 8 bytes of TCP (RFC 792), of the error's own IP version, sent from the
  address the error is addressed to (our server leg's segment); else the packet is not ours
  and goes on to the client. (IP version, type) -> IcmpKind (RFC 792 type 3/4/11/12, RFC
  4443 type 1-4), with the Packet Too Big / Fragmentation Needed MTU.
- `merge_run()` turns a run of contiguous data segments of one flow (the caller checked:
  same addresses, ports and TCP header but for seq, PSH and checksum; ACK-only flags;
  every payload but the last even-sized) into one segment, as Linux GRO does before TCP
  sees them. Every segment's checksum is still checked (RFC 9293 MUST-3), by one sum over
  the run: the pseudo-headers are linear in the length (RFC 1071 §2), so n of them are
  n * base + the lengths; headers and payloads are summed joined (16-bit words stay
  aligned). None when the sum is off (the caller then checks packet by packet and drops
  the bad one) or the options are other than the timestamps (RFC 7323 Appendix A layout).
- `completed_partial()`: a segment whose checksum field holds only the pseudo-header sum
  (a checksum left to "hardware", Linux CHECKSUM_PARTIAL) gets its complete checksum
  (RFC 9293 §3.1) in a copy. Why: an eBPF fast path on the same host (ours, a peer's,
  bridge/ebpf/grebe_tc.c) encapsulates a local sender's packets with the checksum and TSO
  segmentation left to the egress device; over a veth nothing does either, and the UDP
  datagram reaches grebe's socket as sent, inner checksum unfilled, a TSO super-packet
  unsegmented (one datagram up to 64 KB). The Linux receiver would have trusted the skb's
  CHECKSUM_PARTIAL state; a UDP socket loses it. Only a segment that failed its check is
  looked at, so the normal path pays nothing; a damaged segment matches the pattern with
  odds of 1 in 65,535 (the field is compared with the pseudo-header sum).

Theory of operation: one `LegFramer` per Terminator holds the identification counter and the
per-address header sums; `packet`/`frame` prepend the IP header (its ECN field the segment's
`ecn`) to `emit_tcp_parts`'s output with one join. `merge_run` joins payloads once (the leg
copies what it keeps). `quoted_leg` parses an ICMP error once (stack/wire/icmp.py) and
returns the quoted segment's flow key, kind, code, MTU and quoted sequence number for the
server leg (RFC 5927 §4.1 there).
"""

from __future__ import annotations

import struct
from collections.abc import Container

from bridge.flows import FlowKey
from bridge.tunframe import TunFrame, TunFrameParts
from stack.events import IcmpKind
from stack.wire.checksum import checksum, partial, pseudo_sum_v4, pseudo_sum_v6
from stack.wire.icmp import parse_icmp_error
from stack.wire.ip import (
    DF,
    IPV4_HEADER,
    IPV6_HEADER,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    V4_PROTO,
    V6_NXT,
)
from stack.wire.prelude import V4_DST_AT, V4_SRC_AT, V6_DST_AT, V6_SRC_AT
from stack.wire.tcp import ACK, PSH, TcpSegment, emit_tcp_parts
from stack.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET,
    complete_checksum,
)

__all__ = ["LegFramer", "merge_run", "run_part", "completed_partial", "ecn_of",
           "TSO_MAX_SEGMENT"]

_LEN_ID = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_NOT_PSH = 0xFF & ~PSH
_V6_FIRST = 0x60000000
_TCP_HDR = struct.Struct("!HHIIBBHHH")  # RFC 9293 §3.1 fixed header
_TS = struct.Struct("!II")
_NOP_NOP_TS = b"\x01\x01\x08\x0a"
_CWR = 0x80
# the largest client-leg output segment with a TUN that takes GSO writes: an IPv4 total
# length fits 16 bits with a 20-byte IP header and 60 bytes of TCP header
TSO_MAX_SEGMENT = 65535 - 20 - 60


def ecn_of(pkt: bytes | bytearray | memoryview) -> int:
    """The ECN field (RFC 3168 §5) of an IPv4 or IPv6 packet: TOS or traffic class & 3."""
    b = pkt[1]
    return (b >> 4 if pkt[0] >> 4 == 6 else b) & 3


class LegFramer:
    """IP headers for the legs' segments (IPv4 identification counter, header sum cache)."""

    __slots__ = ("ident", "_v4sum")

    def __init__(self) -> None:
        self.ident = 0
        self._v4sum: dict[tuple[bytes, bytes], int] = {}

    def ip4(self, src: bytes, dst: bytes, tl: int, ident: int, ecn: int = 0) -> bytes:
        """IPv4 header (RFC 791 §3.1, no options, DF, TTL 64, the TOS byte's ECN field
        `ecn`, RFC 3168 §5) for a TCP payload of `tl`."""
        base = self._v4sum.get((src, dst))
        if base is None:  # the sum of the header words that never change (RFC 1071 §2)
            if len(self._v4sum) > 4096:
                self._v4sum.clear()
            base = self._v4sum[(src, dst)] = partial(
                IPV4_HEADER.pack(0x45, 0, 0, 0, DF, 64, PROTO_TCP, 0, src, dst))
        csum = checksum(_LEN_ID.pack(20 + tl, ident), base + ecn)
        return IPV4_HEADER.pack(0x45, ecn, 20 + tl, ident, DF, 64, PROTO_TCP, csum, src, dst)

    def packet(self, src: bytes, dst: bytes, seg: TcpSegment) -> bytes:
        """IP header (stack/wire/ip.py layout) + TCP header + payload."""
        hdr, payload = emit_tcp_parts(seg, src, dst)
        tl = len(hdr) + len(payload)
        ecn = seg.ecn
        if len(src) == 4:
            ident = self.ident = (self.ident + 1) & 0xFFFF
            return b"".join((self.ip4(src, dst, tl, ident, ecn), hdr, payload))
        return b"".join((IPV6_HEADER.pack(_V6_FIRST | ecn << 20, tl, PROTO_TCP, 64, src, dst),
                         hdr, payload))

    def frame(self, src: bytes, dst: bytes, seg: TcpSegment, mss: int,
              parts: bool = False) -> TunFrame | TunFrameParts:
        """A segment as a vnet TUN write: NEEDS_CSUM, and GSO when it carries more than one
        `mss` of payload (rules in the module docstring). `parts`: a GSO frame becomes a
        TunFrameParts, the payload beside the headers (bridge/tunframe.py), not copied into a
        joined frame; a frame of one segment or less stays joined (cheaper, one write)."""
        hdr, payload = emit_tcp_parts(seg, src, dst, partial_csum=True)
        hl = len(hdr)
        pl = len(payload)
        tl = hl + pl
        ecn = seg.ecn  # GSO copies the IP header, ECN field included, to every segment
        if len(src) == 4:
            ihl = 20
            ident = (self.ident + 1) & 0xFFFF
            ip = self.ip4(src, dst, tl, ident, ecn)
            gso = GSO_TCPV4
        else:
            ihl = 40
            ident = 0
            ip = IPV6_HEADER.pack(_V6_FIRST | ecn << 20, tl, PROTO_TCP, 64, src, dst)
            gso = GSO_TCPV6
        if pl > mss:
            nseg = -(-pl // mss)
            if seg.flags & _CWR:
                gso |= GSO_ECN
            vh = VNET.pack(F_NEEDS_CSUM, gso, ihl + hl, mss, ihl, 16)
        else:
            nseg = 1
            vh = VNET.pack(F_NEEDS_CSUM, 0, 0, 0, ihl, 16)
        if ihl == 20:
            self.ident = (ident + nseg - 1) & 0xFFFF
        if parts and pl > mss:  # a GSO frame: its payload is not copied (a small one is)
            return TunFrameParts(b"".join((vh, ip, hdr)), payload)
        return TunFrame(b"".join((vh, ip, hdr, payload)))


def merge_run(run: list[bytes | bytearray], off: int, src: bytes, dst: bytes) -> TcpSegment | None:
    """One segment for a checked run of segments from `src` to `dst` (TCP header at `off`
    in each packet), or None: a checksum is off, or options other than NOP NOP TSopt."""
    first = run[0]
    hl = (first[off + 12] >> 4) << 2
    if hl == 32 and first[off + 20:off + 24] != _NOP_NOP_TS:
        return None
    pay = b"".join([memoryview(p)[off + hl:] for p in run])
    hdrs = b"".join([memoryview(p)[off:off + hl] for p in run])
    if off == 20:
        base = pseudo_sum_v4(src, dst, PROTO_TCP, 0)
    else:
        base = pseudo_sum_v6(src, dst, PROTO_TCP, 0)
    total = partial(pay, partial(hdrs, (len(run) * base + len(pay) + len(hdrs)) % 0xFFFF))
    if total % 0xFFFF:
        return None
    flags = ACK
    ce = 0
    for p in run:
        flags |= p[off + 13] & PSH
        ce |= p[1] & (p[1] >> 1)  # bit 0 (IPv4 TOS) or 4 (IPv6 class): an ECN field of CE
    sport, dport, seq, ack, _o, _f, window, _c, urg = _TCP_HDR.unpack_from(first, off)
    ts = _TS.unpack_from(first, off + 24) if hl == 32 else None
    ecn = 3 if ce & (0x10 if off == 40 else 0x01) else ecn_of(first)  # CE if any was
    return TcpSegment(sport, dport, seq, ack, flags, window, pay, urg, None, None, False, ts,
                      (), ecn)


def run_part(pkt: bytes | bytearray | memoryview, n: int, off: int, flags: int
             ) -> tuple[int, int, bytes] | None:
    """(seq, payload length, header template) of a packet that may join a run, else None."""
    hl = (pkt[off + 12] >> 4) << 2
    pl = n - off - hl
    if flags & _NOT_PSH != ACK or pl <= 0 or hl not in (20, 32):
        return None
    seq = _U32.unpack_from(pkt, off + 4)[0]
    tmpl = bytes(pkt[off + 8:off + 13]) + bytes(pkt[off + 14:off + 16]) + \
        bytes(pkt[off + 18:off + hl])
    return seq, pl, tmpl


_QUOTE = struct.Struct("!HHI")  # the quoted TCP header's ports and sequence number
_ICMP_KINDS = {  # (IP version, ICMP type) -> what it says (RFC 792, RFC 4443 §2.1)
    (4, 3): IcmpKind.UNREACHABLE, (4, 4): IcmpKind.SOURCE_QUENCH, (4, 11): IcmpKind.TIME_EXCEEDED,
    (4, 12): IcmpKind.PARAMETER_PROBLEM, (6, 1): IcmpKind.UNREACHABLE,
    (6, 2): IcmpKind.PACKET_TOO_BIG, (6, 3): IcmpKind.TIME_EXCEEDED,
    (6, 4): IcmpKind.PARAMETER_PROBLEM}


def quoted_leg(pkt: bytes | bytearray, n: int, clients: Container[bytes]
               ) -> tuple[FlowKey, IcmpKind, int, int | None, int] | None:
    """(splice key, kind, code, MTU or None, quoted seq) of an ICMP error about one of our
    server legs' segments, or None when the packet is anything else."""
    if n < 28:
        return None  # not even an IPv4 header and 8 bytes: nothing to look at
    v6 = pkt[0] >> 4 == 6
    if v6:
        if n < 48 or pkt[V6_NXT] != PROTO_ICMPV6:
            return None  # not ICMPv6 (RFC 4443): the common case
    elif pkt[V4_PROTO] != PROTO_ICMP:
        return None  # not ICMP (RFC 792)
    if bytes(pkt[V6_DST_AT] if v6 else pkt[V4_DST_AT]) not in clients:
        return None
    err = parse_icmp_error(memoryview(pkt)[:n])
    if err is None:
        return None
    q = err.quoted
    off = 40 if v6 else (q[0] & 0x0F) * 4 if q else 0
    if len(q) < off + 8 or q[0] >> 4 != err.version or \
            q[V6_NXT if v6 else V4_PROTO] != PROTO_TCP:
        return None  # RFC 792: the quote holds the IP header and 8 bytes of TCP
    src, dst = (q[V6_SRC_AT], q[V6_DST_AT]) if v6 else (q[V4_SRC_AT], q[V4_DST_AT])
    sport, dport, seq = _QUOTE.unpack_from(q, off)
    kind = _ICMP_KINDS.get((err.version, err.type))
    if kind is None or bytes(src) != err.dst:
        return None
    mtu = err.info & 0xFFFF if not v6 else err.info
    return (err.version, bytes(src), bytes(dst), sport, dport), kind, err.code, mtu or None, seq


def completed_partial(seg: memoryview, src: bytes, dst: bytes) -> bytearray | None:
    """A copy of TCP segment `seg` (src -> dst, packed addresses) with its checksum
    completed, if the field holds exactly the pseudo-header sum (module docstring), else
    None. The caller parses the copy again, which checks it."""
    n = len(seg)
    if n < 20:
        return None
    ps = (pseudo_sum_v4 if len(src) == 4 else pseudo_sum_v6)(src, dst, PROTO_TCP, n)
    field = seg[16] << 8 | seg[17]
    if field != (ps or 0xFFFF) and field != ps:
        return None
    out = bytearray(seg)
    complete_checksum(out, 0, 16)  # the field's own sum: ps (0xFFFF is the same sum as 0)
    return out

"""The L3/L4 prelude: where a packet's addresses, TCP header, ports and flags are, checked once.

Every module that looks into an inner IP packet (the Bridge's pipeline and fast paths, MSS
clamping, the TUN coalescer, the userspace terminator) asks these functions, so that "is this
a TCP packet, and where is its header" has one answer per question, not one per module.

Rules:
- Addresses (RFC 791 §3.1, RFC 8200 §3): IPv4 source at 12, destination at 16, 4 bytes;
  IPv6 source at 8, destination at 24, 16 bytes (the offsets of stack/wire/ip.py). The
  `*_END` constants close the slices and the `*_AT` slice objects read them from a packet
  at offset 0 with one subscript (the hot path's cost of a literal slice).
- IPv4 fragments (RFC 791 §3.2): only a first fragment (offset 0) carries the TCP header;
  a packet with MF or an offset is "plain" for no one (`plain_tcp`), and a first fragment
  is keyed (`tcp_key`) and clamped (`syn_candidate`) like any segment.
- IPv6 (RFC 8200 §4): the extension header chain before TCP is walked once
  (`v6_tcp_offset`): Hop-by-Hop Options (0; only directly after the IPv6 header, §4.3),
  Routing (43, §4.4) and Destination Options (60, §4.6) are (Hdr Ext Len + 1) * 8 bytes;
  Fragment (44, §4.5) is 8 bytes, and only a first fragment (offset 0) carries the TCP
  header (§4.5 requires the whole chain up to the upper-layer header in it); AH (51, RFC
  4302 §2.2) is (Payload Len + 2) * 4 bytes. No Next Header (59), ESP (50) and anything else
  end the walk: no TCP header to see. The walk is bounded by `MAX_EXT_HEADERS` and by the
  IPv6 payload length (and the buffer); a header running past the end is malformed.
- A chain that cannot be walked to its end is told apart from one that ends in something
  other than TCP (`v6_tcp_offset` returns `V6_UNWALKABLE`, not `V6_NO_TCP`): more than
  `MAX_EXT_HEADERS` headers, a header or TCP header running past the payload, Hop-by-Hop
  anywhere but first (§4.3), or an extension header of IANA's registry that we do not walk
  (Mobility 135, HIP 139, Shim6 140, experimental 253/254: RFC 8200 §4, RFC 7045 §4: a
  middlebox must not assume what they hide). Behind such a chain a TCP SYN may reach a host
  that walks further than we do.
- The inspection rule, for both termination backends (issue 9): a packet whose header chain
  cannot be walked to its end and whose addresses an `[[inspect]]` rule covers is never
  forwarded. Our terminator cannot key it, so it cannot be inspected: the Bridge drops it
  and counts "uninspectable" (`uninspectable` below is the one test; bridge/pipeline.py
  applies it in both directions, before the terminator, and so also to packets that the
  kernel backend's nftables TPROXY rule did not catch and the kernel routed to the TUN).
- Three views of "a TCP packet", each for one kind of caller, all built on the rules above:
  `plain_tcp` (the offload paths: TSO/GRO merge and cut only what Linux would: IPv4 not a
  fragment, IPv6 with TCP right after the fixed header, the whole TCP header present);
  `tcp_key` (inspection: every TCP header we can find is keyed, so framing cannot evade a
  rule); `syn_candidate` (the MSS clamp's cheap pre-check: a first-fragment TCP SYN, or an
  IPv6 chain that bridge/mss.py `clamp_packet` walks). A caller adds its own conditions on
  top (the coalescer's IHL 20 and ACK-only), never its own parsing.
- Never raises: every read is checked against the packet's end first (a misbehaving peer
  never raises); answers are None, False or a negative offset.

Theory of operation: plain functions over bytes-like buffers, no objects per packet. The
common packet (TCP or UDP right after the IP header) costs a few byte reads and one set
lookup; only a packet whose IPv6 next header starts a chain (`V6_CHAIN_HEADS`) is walked,
a loop over at most eight headers reading two bytes each.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from stack.wire.ip import OFFSET_MASK, PROTO_TCP, V4_DST, V4_SRC, V6_DST, V6_NXT, V6_PLEN, V6_SRC

__all__ = ["v6_tcp_offset", "uninspectable", "plain_tcp", "tcp_key", "syn_candidate",
           "FlowKey4", "Covers", "V6_EXT_HEADERS", "V6_CHAIN_HEADS", "V6_NO_TCP", "V6_UNWALKABLE",
           "MAX_EXT_HEADERS", "V4_SRC_END", "V4_DST_END", "V6_SRC_END", "V6_DST_END",
           "V4_SRC_AT", "V4_DST_AT", "V6_SRC_AT", "V6_DST_AT", "V4_ADDRS_AT", "V6_ADDRS_AT",
           "TCP_SYN", "TCP_FLAGS"]

V4_SRC_END = V4_SRC + 4
V4_DST_END = V4_DST + 4
V6_SRC_END = V6_SRC + 16
V6_DST_END = V6_DST + 16
V4_SRC_AT = slice(V4_SRC, V4_SRC_END)
V4_DST_AT = slice(V4_DST, V4_DST_END)
V6_SRC_AT = slice(V6_SRC, V6_SRC_END)
V6_DST_AT = slice(V6_DST, V6_DST_END)
V4_ADDRS_AT = slice(V4_SRC, V4_DST_END)  # source then destination, as a flow hash reads them
V6_ADDRS_AT = slice(V6_SRC, V6_DST_END)

TCP_FLAGS = 13  # offset of the flags byte in the TCP header (RFC 9293 §3.1)
TCP_SYN = 0x02
_PORTS_FLAGS = struct.Struct("!HH8xxB")
_PORTS = struct.Struct(">HH")

# RFC 8200 §4 extension headers (and AH, RFC 4302) that may stand between IPv6 and TCP
_HOP_BY_HOP = 0
_ROUTING = 43
_FRAGMENT = 44
_AH = 51
_DEST_OPTS = 60
V6_EXT_HEADERS = frozenset((_HOP_BY_HOP, _ROUTING, _FRAGMENT, _AH, _DEST_OPTS))
# IANA "IPv6 Extension Header Types" we do not walk: Mobility (RFC 6275), HIP (RFC 7401),
# Shim6 (RFC 5533), experimentation (RFC 3692, RFC 4727)
_UNWALKED = frozenset((135, 139, 140, 253, 254))
V6_CHAIN_HEADS = V6_EXT_HEADERS | _UNWALKED
MAX_EXT_HEADERS = 8  # §4.1 allows each once (Destination Options twice): 6 in a sane chain
V6_NO_TCP = -1  # the chain ends in another upper layer, ESP, No Next Header, a later fragment
V6_UNWALKABLE = -2  # the chain cannot be walked to its end (module rules)
_FRAG_OFFSET_MASK = 0xFFF8  # RFC 8200 §4.5: 13-bit fragment offset, then 2 reserved, M

FlowKey4 = tuple[int, bytes, bytes, int, int]  # (IP version, source, destination, ports)
Covers = Callable[[int, bytes, bytes], bool]
Buf = bytes | bytearray | memoryview


def v6_tcp_offset(buf: Buf, start: int) -> tuple[int, bool]:
    """(offset of the TCP header, behind AH) of the IPv6 packet at `buf[start]`; offset
    `V6_NO_TCP` (-1) when the chain ends in something else (another upper layer, ESP, No
    Next Header, a non-first fragment), `V6_UNWALKABLE` (-2) when it cannot be walked to its
    end (over-long, truncated, malformed, an extension header we do not walk: RFC 8200 §4;
    rules in the module docstring). Every negative offset means "no TCP header to use".

    Never raises: every read is checked against the packet's end first.
    """
    n = len(buf)
    if n < start + 40:
        return V6_UNWALKABLE, False
    end = start + 40 + ((buf[start + V6_PLEN] << 8) | buf[start + V6_PLEN + 1])
    if end > n:
        return V6_UNWALKABLE, False  # truncated (or a jumbogram, RFC 2675: not for us)
    nxt = buf[start + V6_NXT]
    i = start + 40
    ah = False
    for hops in range(MAX_EXT_HEADERS + 1):
        if nxt == PROTO_TCP:
            return (i, ah) if i + 20 <= end else (V6_UNWALKABLE, False)
        if nxt not in V6_CHAIN_HEADS:
            return V6_NO_TCP, False  # ESP (50), No Next Header (59), another upper layer
        if hops == MAX_EXT_HEADERS or i + 8 > end or nxt in _UNWALKED:
            return V6_UNWALKABLE, False  # every extension header is at least 8 bytes
        if nxt == _ROUTING or nxt == _DEST_OPTS:
            size = (buf[i + 1] + 1) * 8  # RFC 8200 §4.4, §4.6
        elif nxt == _HOP_BY_HOP:
            if hops:
                return V6_UNWALKABLE, False  # §4.3: only immediately after the IPv6 header
            size = (buf[i + 1] + 1) * 8
        elif nxt == _FRAGMENT:
            if ((buf[i + 2] << 8) | buf[i + 3]) & _FRAG_OFFSET_MASK:
                return V6_NO_TCP, False  # §4.5: not the first fragment, no TCP header here
            size = 8
        else:  # AH
            size = (buf[i + 1] + 2) * 4  # RFC 4302 §2.2: 32-bit words, minus 2
            ah = True
        nxt = buf[i]
        i += size
    return V6_UNWALKABLE, False  # not reached: the loop returns at hops == MAX_EXT_HEADERS


def uninspectable(buf: Buf, start: int, covers: Covers) -> bool:
    """True when the IP packet at `buf[start]` must be dropped rather than forwarded: an
    IPv6 packet whose header chain cannot be walked to its end (`V6_UNWALKABLE`) and whose
    (version, source, destination) `covers` says an `[[inspect]]` rule covers, ports
    unknown (the inspection rule in the module docstring). IPv4 has no chain: False.

    The caller has checked the IP header lengths. Never raises.
    """
    if buf[start] >> 4 != 6 or buf[start + V6_NXT] not in V6_CHAIN_HEADS:
        return False  # IPv4, or TCP/UDP/ICMPv6 directly after the fixed header
    if v6_tcp_offset(buf, start)[0] != V6_UNWALKABLE:
        return False
    return covers(6, bytes(buf[start + V6_SRC:start + V6_SRC_END]),
                  bytes(buf[start + V6_DST:start + V6_DST_END]))


def plain_tcp(pkt: Buf) -> tuple[bool, int, int] | None:
    """(is IPv4, IP header length, TCP header length) of a plain TCP packet at `pkt[0]`:
    IPv4 that is not a fragment (neither MF nor an offset; DF and the reserved bit are the
    caller's business), IPv6 whose next header is TCP (no extension headers), a TCP header
    of at least 20 bytes within the buffer. None for anything else, also for a packet longer
    than its length field can say (RFC 791 §3.1, RFC 8200 §3: a TSO frame past 64 KB). The IP
    lengths are otherwise the caller's to check (a TSO frame's are the kernel's; the
    coalescer wants them exact)."""
    n = len(pkt)
    if n < 40:
        return None
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or pkt[9] != PROTO_TCP or pkt[6] & 0x3F or pkt[7] or n > 0xFFFF:
            return None  # not TCP, or a fragment (MF or offset set), or too long
        v4 = True
    elif version == 6:
        if n < 60 or pkt[V6_NXT] != PROTO_TCP or n - 40 > 0xFFFF:
            return None  # extension headers (not plain), or too long
        ihl = 40
        v4 = False
    else:
        return None
    if n < ihl + 20:
        return None
    doff = (pkt[ihl + 12] >> 4) * 4
    if doff < 20 or n < ihl + doff:
        return None
    return v4, ihl, doff


def tcp_key(pkt: Buf, n: int) -> tuple[FlowKey4, int, int] | None:
    """((version, src, dst, sport, dport), TCP offset, flags) of a TCP packet of `n` bytes
    at `pkt[0]`, or None.

    Inspection must not be evaded by framing: a TCP header behind IPv6 extension headers
    (RFC 8200 §4, walked by `v6_tcp_offset`) and the first fragment of a TCP datagram (IPv4
    offset 0 with MF; an IPv6 Fragment header at offset 0) are keyed like any segment, so a
    selected flow's packet goes to its splice or the rule's verdict and never past it; a
    first fragment then fails the TCP checksum there and is dropped (counted). Non-first
    fragments carry no TCP header: without their first fragment the receiver cannot
    reassemble them."""
    if n < 28:  # IPv4 header + the 8 bytes of TCP a first fragment carries at least
        return None
    b0 = pkt[0]
    if b0 >> 4 == 4:
        if pkt[9] != PROTO_TCP or (pkt[6] & 0x1F) or pkt[7]:  # not TCP, or not a first part
            return None
        off = (b0 & 0x0F) << 2
        src, dst, version = bytes(pkt[V4_SRC_AT]), bytes(pkt[V4_DST_AT]), 4
    elif b0 >> 4 == 6:
        if n < 60:
            return None
        if pkt[V6_NXT] == PROTO_TCP:
            off = 40
        else:
            off = v6_tcp_offset(pkt, 0)[0]
            if off < 0:
                return None
        src, dst, version = bytes(pkt[V6_SRC_AT]), bytes(pkt[V6_DST_AT]), 6
    else:
        return None
    if n < off + 20:
        if version == 4 and pkt[6] & 0x20 and n >= off + 8:
            # a first fragment too short for the flags (RFC 1858 §3 "tiny fragment"): RFC 791
            # gives it at least 8 bytes, so the ports are here; judged as a connection attempt
            sport, dport = _PORTS.unpack_from(pkt, off)
            return (version, src, dst, sport, dport), off, TCP_SYN
        return None
    sport, dport, flags = _PORTS_FLAGS.unpack_from(pkt, off)
    return (version, src, dst, sport, dport), off, flags


def syn_candidate(buf: Buf, off: int, tot: int) -> bool:
    """Cheap test for the IP packet of `tot` bytes at `buf[off]` (lengths checked by the
    caller): could it be a TCP SYN whose MSS option needs clamping (RFC 9293 §3.7.1)? True
    for an unfragmented or first-fragment IPv4 TCP packet with SYN set and room for
    options, an IPv6 one with TCP right after the fixed header likewise, and any IPv6
    packet whose next header is an extension header (bridge/mss.py `clamp_packet` walks the
    chain and decides). False answers are exact; True ones are checked again there."""
    if buf[off] >> 4 == 4:
        if buf[off + 9] != PROTO_TCP or ((buf[off + 6] << 8) | buf[off + 7]) & OFFSET_MASK:
            return False
        t = (buf[off] & 0x0F) * 4
    else:
        if buf[off + V6_NXT] != PROTO_TCP:
            return buf[off + V6_NXT] in V6_EXT_HEADERS
        t = 40
    return tot > t + 20 and bool(buf[off + t + TCP_FLAGS] & TCP_SYN)

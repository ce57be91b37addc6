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
- IPv6 (RFC 8200 §4): the extension header chain before TCP is walked (`v6_tcp_offset`):
  Hop-by-Hop Options (0; only directly after the IPv6 header, §4.3), Routing (43, §4.4) and
  Destination Options (60, §4.6) are (Hdr Ext Len + 1) * 8 bytes; Fragment (44, §4.5) is 8
  bytes, and only a first fragment (offset 0) carries the TCP header (§4.5 requires the
  whole chain up to the upper-layer header in it); AH (51, RFC 4302 §2.2) is (Payload Len
  + 2) * 4 bytes. No Next Header (59), ESP (50) and anything else end the walk: no TCP
  header to see. The walk is bounded by `MAX_EXT_HEADERS` and by the IPv6 payload length
  (and the buffer); a header running past the end is malformed: the packet is left alone.
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
- A SYN behind AH is found but never rewritten: AH's ICV covers the TCP header (RFC 4302
  §3.3.3.1), so a clamped SYN would fail authentication and be dropped at the receiver.

Theory of operation: `clamp(buf, ip_hlen, mss_max)` takes a mutable packet and the offset of
the TCP header, checks the SYN flag, walks the options (EOL, NOP, kind/length records) and
rewrites the MSS value with `pack_into`. It returns True when it changed the packet, so
the pipeline can count "mss_clamped". `clamp_packet` finds the TCP header: IPv4's IHL, or
IPv6's fixed header plus the extension chain (`v6_tcp_offset`, a loop over at most eight
headers reading two bytes each, so the common case of TCP directly after the IPv6 header
costs one comparison). `V6_EXT_HEADERS` lets a caller's cheap SYN pre-check send such
packets here; `V6_CHAIN_HEADS` is every next-header value that starts a chain `uninspectable`
must look at (the common TCP/UDP/ICMPv6 packet costs one set lookup).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from stack.wire.checksum import incremental_update16
from stack.wire.ip import OFFSET_MASK, PROTO_TCP, V4_FLAGS, V4_PROTO, V6_NXT, V6_PLEN

__all__ = ["clamp", "clamp_packet", "mss_for_mtu", "v6_tcp_offset", "uninspectable", "TCP_SYN",
           "V6_EXT_HEADERS", "V6_CHAIN_HEADS", "V6_NO_TCP", "V6_UNWALKABLE", "MAX_EXT_HEADERS"]

TCP_SYN = 0x02
_TCP_FLAGS = 13
_TCP_CSUM = 16
_OPT_EOL = 0
_OPT_NOP = 1
_OPT_MSS = 2
_U16 = struct.Struct("!H")

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


def v6_tcp_offset(buf: bytes | bytearray | memoryview, start: int) -> tuple[int, bool]:
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


Covers = Callable[[int, bytes, bytes], bool]


def uninspectable(buf: bytes | bytearray | memoryview, start: int, covers: Covers) -> bool:
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
    return covers(6, bytes(buf[start + 8:start + 24]), bytes(buf[start + 24:start + 40]))


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

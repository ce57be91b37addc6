"""ICMP errors about a server leg's segments: which splice, and what the error says.

Rules of this module (pure: an inner packet in, a verdict out; nothing raises)
- Only ICMP (RFC 792) or ICMPv6 (RFC 4443) errors addressed to a client of a live splice are
  looked at (`clients`: the client addresses with live splices, the Terminator's filter).
- The quote must hold the IP header and at least 8 bytes of TCP (RFC 792), of the error's own
  IP version, TCP, sent from the address the error is addressed to (our server leg's
  segment); else it is not ours (None) and the packet goes on to the client.
- Kinds: (IP version, type) -> IcmpKind (RFC 792 type 3/4/11/12, RFC 4443 type 1-4); the
  Packet Too Big / Fragmentation Needed MTU is returned with it.

Theory of operation
`quoted_leg` parses the error once (stack/wire/icmp.py) and returns the quoted segment's flow
key (client, server, ports: the splice's key), the kind, code, MTU and the quoted sequence
number, for the Terminator to hand to that splice's server leg (RFC 5927 §4.1 check there).
"""

from __future__ import annotations

import struct
from collections.abc import Container

from bridge.flows import FlowKey
from stack.events import IcmpKind
from stack.wire.icmp import parse_icmp_error
from stack.wire.ip import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, V4_PROTO, V6_NXT
from stack.wire.prelude import V4_DST_AT, V4_SRC_AT, V6_DST_AT, V6_SRC_AT

__all__ = ["quoted_leg"]

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

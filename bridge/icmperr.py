"""ICMP errors the data plane writes to the TUN about packets it could not forward.

Rules:
- RFC 1812 §4.3.2.8 / RFC 4443 §2.4(f): errors are rate limited; all share one token
  bucket (`pmtu.icmp_rate` per second, `pmtu.icmp_burst` deep) refilled from `now`,
  counted "icmp_rate_limited" when empty, "icmp_sent" when written.
- Never about an ICMP error, a non-first fragment, a broadcast or multicast
  (RFC 1812 §4.3.2.7, RFC 4443 §2.4(e)): stack/wire/icmp.py `error_allowed_v4/_v6`.
- Sent from the first TUN address of the packet's family; none of that family: nothing.

Theory of operation: the Bridge (bridge/pipeline.py) owns one `IcmpErrors` and calls
`send` for Time Exceeded, Packet Too Big / Fragmentation Needed, and `unreachable` for no
route or a withdrawn peer (RFC 792, RFC 4443 §3.1: host / no route). Pure: `now` comes in.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Interface, IPv6Interface

from bridge import counters as C
from bridge.output import Output
from stack.wire import icmp

__all__ = ["IcmpErrors"]

Buf = bytes | bytearray | memoryview


class IcmpErrors:
    """The rate-limited ICMP errors of one Bridge."""

    __slots__ = ("events", "rate", "burst", "tokens", "tokens_at", "src4", "src6")

    def __init__(self, events: list[int], rate: float, burst: int,
                 addresses: Sequence[IPv4Interface | IPv6Interface], now: float) -> None:
        self.events = events  # the Bridge's Counters.events
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst
        self.tokens_at = now
        self.src4 = self.src6 = b""
        for a in addresses:
            if a.version == 4 and not self.src4:
                self.src4 = a.ip.packed
            elif a.version == 6 and not self.src6:
                self.src6 = a.ip.packed

    def unreachable(self, pkt: Buf, v6: bool, now: float, out: Output) -> None:
        if v6:
            self.send(pkt, True, icmp.ICMP6_UNREACH, icmp.UNREACH6_NO_ROUTE, 0, now, out)
        else:
            self.send(pkt, False, icmp.ICMP4_UNREACH, icmp.UNREACH_HOST, 0, now, out)

    def send(self, pkt: Buf, v6: bool, typ: int, code: int, info: int, now: float,
             out: Output) -> None:
        """Write an ICMP error about `pkt` to the TUN, if allowed and within the rate."""
        ev = self.events
        src = self.src6 if v6 else self.src4
        if not src:
            return  # no address of that family on the TUN to speak from
        if v6:
            if not icmp.error_allowed_v6(pkt, typ == icmp.ICMP6_PACKET_TOO_BIG):
                return
        elif not icmp.error_allowed_v4(pkt):
            return
        tokens = min(self.burst, self.tokens + (now - self.tokens_at) * self.rate)
        self.tokens_at = now
        if tokens < 1.0:
            self.tokens = tokens
            ev[C.E_ICMP_RATE_LIMITED] += 1
            return
        self.tokens = tokens - 1.0
        build = icmp.icmp6_error if v6 else icmp.icmp4_error
        out.tun.append(build(pkt, typ, code, src, info))
        ev[C.E_ICMP_SENT] += 1

"""Output: what one call of the data plane produced, and the one way a datagram enters it.

Rules:
- `Output.udp[addr]` holds the datagrams for peer endpoint `addr` in order; an item may be a
  `bridge.gso.UdpRun` standing for several equal-size datagrams. `Output.udp_sport[addr]`
  holds, only for peers with source_port = "flow-hash", the RFC 8086 §3.2.1 source port of
  each item (same index). `Output.tun` holds inner packets, ICMP errors and `TunFrame`s for
  the TUN, in order. `Output.secure[addr]` holds sealed datagrams for secure peers
  (bridge/securelink.py), sent from the secure port; items may be `UdpRun`s too.
- Every datagram for a peer enters through `emit`, which also counts it (the peer's tx
  packets and bytes) and marks the peer as sent to (`last_tx`, the keepalive clock): the
  per-packet path, keepalives and the TSO fast path all use it, so the counters cannot
  disagree with what was sent.

Theory of operation: `Output` is reused across batches (`clear()`), so the dicts and lists
are allocated once per peer, not per batch; `emit` is a plain function (no objects per
packet).
"""

from __future__ import annotations

from bridge.counters import Counters
from bridge.peers import Addr, PeerState

__all__ = ["Output", "Addr", "emit"]


class Output:
    """What one call produced. Reuse it: `clear()` between batches."""

    __slots__ = ("udp", "udp_sport", "tun", "secure")

    def __init__(self) -> None:
        self.udp: dict[Addr, list[bytes | bytearray]] = {}
        self.udp_sport: dict[Addr, list[int]] = {}
        self.tun: list[bytes | bytearray] = []
        self.secure: dict[Addr, list[bytes | bytearray]] = {}

    def clear(self) -> None:
        self.udp.clear()
        self.udp_sport.clear()
        self.tun.clear()
        self.secure.clear()

    def __bool__(self) -> bool:
        return bool(self.udp or self.tun or self.secure)


def emit(out: Output, counters: Counters, peer: PeerState, item: bytes | bytearray,
         packets: int, now: float, sport: int = -1, size: int = -1) -> None:
    """Append `item` (`packets` datagrams, `len(item)` bytes, or `size` >= 0: a UdpRun
    with room for sealing) for `peer` to `out` and count it; `sport` >= 0 is its flow-hash
    source port (only peers with flow_sport keep one)."""
    addr = peer.addr
    lst = out.udp.get(addr)
    if lst is None:
        lst = out.udp[addr] = []
    lst.append(item)
    counters.tx_packets[peer.index] += packets
    counters.tx_bytes[peer.index] += len(item) if size < 0 else size
    peer.last_tx = now
    if sport >= 0:
        sports = out.udp_sport.get(addr)
        if sports is None:
            sports = out.udp_sport[addr] = []
        sports.append(sport)

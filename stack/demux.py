"""TcpDemux: many TcpConnections behind one address set, keyed by the 4-tuple.

Rules:
- RFC 9293 §3.10.7.1: a segment that belongs to no connection and is not a SYN we accept
  is answered with a RST (<SEQ=SEG.ACK><CTL=RST> if it has ACK, else
  <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>), except that an RST is never answered
  (smoltcp iface/tcp.rs: "never reply to a TCP RST packet with another TCP RST packet").
- RFC 9293 §3.10.7.2: a SYN to a listening port (or, with `accept_any`, to any port: a
  transparent inspector) creates a connection in LISTEN that takes the SYN.
- RFC 9293 §3.9.1.3 MUST-57: a SYN to a broadcast or multicast address is silently
  discarded; MUST-63: so is a SYN from such an address (or from an unspecified one).
- RFC 9293 §3.6.1 MAY-2 (RFC 6191 without timestamps): a new SYN for a 4-tuple in
  TIME-WAIT whose sequence number is beyond the old RCV.NXT ends the old connection and
  opens a new one.
- `max_connections` bounds memory: a SYN beyond it is dropped and counted ("table_full").
- Misbehaving peers never raise; each drop is counted in `drops` by reason.

Theory of operation: a dict from (local address, local port, remote address, remote port)
to TcpConnection. `receive` routes one parsed segment; `segments_to_send(now)` collects
(src, dst, segment) triples from every connection plus the demux's own RSTs and forgets
connections that reached CLOSED (the application keeps its reference for the last
events). Timers: `get_timer()` is the minimum over connections; `handle_timer(now)` runs
the expired ones.
"""

from __future__ import annotations

from collections import deque

from stack.connection import TcpConnection
from stack.events import LocalProtocolError
from stack.seq import seq_gt
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.tcp_core import reset_reply
from stack.wire.tcp import ACK, RST, SYN, TcpSegment, parse_tcp

__all__ = ["TcpDemux", "FlowKey", "is_unicast"]

FlowKey = tuple[bytes, int, bytes, int]  # local addr, local port, remote addr, remote port
Outgoing = tuple[bytes, bytes, TcpSegment]  # src addr, dst addr, segment


def is_unicast(addr: bytes) -> bool:
    """False for unspecified, broadcast and multicast addresses (MUST-57/MUST-63)."""
    if len(addr) == 4:
        return addr[0] < 224 and addr != b"\x00\x00\x00\x00"
    return addr[0] != 0xFF and any(addr)


class TcpDemux:
    """4-tuple -> TcpConnection; accepts SYNs for listening ports; RSTs the rest."""

    def __init__(
        self,
        config: TcpConfig | None = None,
        *,
        accept_any: bool = False,
        max_connections: int = 10_000,
    ) -> None:
        self.config = config if config is not None else TcpConfig()
        self.accept_any = accept_any
        self.max_connections = max_connections
        self.listening: set[int] = set()
        self.connections: dict[FlowKey, TcpConnection] = {}
        self.drops: dict[str, int] = {}
        self._accepted: deque[TcpConnection] = deque()
        self._out: list[Outgoing] = []

    def listen(self, port: int) -> None:
        """Accept SYNs to `port` on any local address."""
        self.listening.add(port)

    def connect(
        self, local: tuple[bytes, int], remote: tuple[bytes, int], now: float,
        *, iss: int | None = None, config: TcpConfig | None = None,
    ) -> TcpConnection:
        """Active open of a new connection. Raises LocalProtocolError if the 4-tuple is used."""
        key = (local[0], local[1], remote[0], remote[1])
        old = self.connections.get(key)
        if old is not None and old.state is not State.CLOSED:
            raise LocalProtocolError(f"4-tuple {key!r} is in use")
        conn = TcpConnection(local, remote, config or self.config, iss=iss)
        conn.connect(now)
        self.connections[key] = conn
        return conn

    def accept(self) -> TcpConnection | None:
        """The next connection created by an incoming SYN, or None."""
        return self._accepted.popleft() if self._accepted else None

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def receive_packet(
        self, src: bytes, dst: bytes, tcp: bytes | memoryview, now: float
    ) -> TcpConnection | None:
        """Parse a TCP segment (bad ones are counted in `drops`) and route it."""
        seg = parse_tcp(tcp, src, dst, drops=self.drops)
        if seg is None:
            return None
        return self.receive(src, dst, seg, now)

    def receive(
        self, src: bytes, dst: bytes, seg: TcpSegment, now: float
    ) -> TcpConnection | None:
        """Route one segment from src to dst; return the connection that took it, if any."""
        key = (dst, seg.dst_port, src, seg.src_port)
        conn = self.connections.get(key)
        f = seg.flags
        is_syn = f & (SYN | ACK | RST) == SYN
        if conn is not None:
            if (
                conn.state is State.TIME_WAIT
                and is_syn
                and seq_gt(seg.seq, conn.rcv_nxt_seq)
            ):
                del self.connections[key]  # MAY-2: a new incarnation
                conn.abort()
            elif conn.state is not State.CLOSED:
                conn.receive_segment(seg, now)
                return conn
        if is_syn and (self.accept_any or seg.dst_port in self.listening):
            if not is_unicast(dst) or not is_unicast(src):
                self._drop("syn_bad_address")  # MUST-57 / MUST-63
                return None
            if len(self.connections) >= self.max_connections:
                self._drop("table_full")
                return None
            conn = TcpConnection((dst, seg.dst_port), (src, seg.src_port), self.config)
            conn.listen()
            conn.receive_segment(seg, now)
            self.connections[key] = conn
            self._accepted.append(conn)
            return conn
        self._drop("no_connection")
        rst = reset_reply(seg)
        if rst is not None:
            self._out.append((dst, src, rst))
        return None

    def segments_to_send(self, now: float) -> list[Outgoing]:
        """Every segment due now from every connection, as (src, dst, segment)."""
        out = self._out
        self._out = []
        dead: list[FlowKey] = []
        for key, conn in self.connections.items():
            segs = conn.segments_to_send(now)
            if segs:
                la, ra = key[0], key[2]
                out.extend((la, ra, s) for s in segs)
            st = conn.state
            if st is State.CLOSED or (st is State.LISTEN and conn.passive):
                dead.append(key)
        for key in dead:
            del self.connections[key]
        return out

    def get_timer(self) -> float | None:
        """The earliest deadline of any connection, or None."""
        best: float | None = None
        for conn in self.connections.values():
            t = conn.get_timer()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def handle_timer(self, now: float) -> None:
        """Run every connection whose deadline is at or before `now`."""
        for conn in list(self.connections.values()):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)

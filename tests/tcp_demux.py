"""TcpDemux: many TcpConnections behind one address set, keyed by the 4-tuple (test support).

The product never needs it (the userspace terminator keys its own splices); the stack's
tests and the simulations use it as a host's TCP layer: many connections, listeners,
RSTs for strangers. It drives TcpConnection through its public API only.

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
(src, dst, segment) triples from the connections touched since the last call plus the
demux's own RSTs, and forgets connections that reached CLOSED (the application keeps its
reference for the last events). Only touched connections can have output: a connection is
touched when the demux routes a segment to it, runs its timer, or opens it, and when the
application calls one of its API methods that may produce output (send, close, abort,
read/consumed/next_event reopening the window, icmp_error, path_mtu: the demux's
connections are WatchedConnections, which add themselves to the dirty set on those
calls). Deadlines sit in a heap of
(deadline, n, connection) with the current deadline of each connection in a dict; a heap
entry that no longer matches is stale and skipped when it reaches the top. A touched
connection's deadline is re-read before the heap is consulted. So one batch costs
O(touched · log n), not O(connections): 200 idle connections cost nothing per batch.
Drive a demux's connections through the demux (`handle_timer`), not one by one.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Any

from stack.connection import Endpoint, TcpConnection, reset_reply
from stack.events import Event, IcmpKind, LocalProtocolError
from stack.seq import seq_gt
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, RST, SYN, TcpSegment, parse_tcp

__all__ = ["TcpDemux", "WatchedConnection", "FlowKey", "is_unicast"]

FlowKey = tuple[bytes, int, bytes, int]  # local addr, local port, remote addr, remote port
Outgoing = tuple[bytes, bytes, TcpSegment]  # src addr, dst addr, segment


def is_unicast(addr: bytes) -> bool:
    """False for unspecified, broadcast and multicast addresses (MUST-57/MUST-63)."""
    if len(addr) == 4:
        return addr[0] < 224 and addr != b"\x00\x00\x00\x00"
    return addr[0] != 0xFF and any(addr)


class WatchedConnection(TcpConnection):
    """A TcpConnection that tells its demux (`watch`) when an application call may have
    made output or moved its deadline. Over-approximates: any such call counts."""

    def __init__(self, local: Endpoint, remote: Endpoint, config: TcpConfig | None = None,
                 *, iss: int | None = None) -> None:
        super().__init__(local, remote, config, iss=iss)
        self.watch: Callable[[Any], object] | None = None

    def _touch(self) -> None:
        if self.watch is not None:
            self.watch(self)

    def send(self, data: bytes | bytearray | memoryview, *, urgent: bool = False) -> int:
        self._touch()
        return super().send(data, urgent=urgent)

    def close(self) -> None:
        self._touch()
        super().close()

    def abort(self) -> None:
        self._touch()
        super().abort()

    def read(self, max_bytes: int = -1) -> bytes:
        self._touch()
        return super().read(max_bytes)

    def consumed(self, n: int) -> None:
        self._touch()
        super().consumed(n)

    def next_event(self) -> Event | None:
        self._touch()
        return super().next_event()

    def path_mtu(self, mtu: int) -> None:
        self._touch()
        super().path_mtu(mtu)

    def icmp_error(self, kind: IcmpKind | str, code: int, mtu: int | None = None,
                   now: float = 0.0, *, seq: int | None = None) -> None:
        self._touch()
        super().icmp_error(kind, code, mtu, now, seq=seq)


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
        self.connections: dict[FlowKey, WatchedConnection] = {}
        self.drops: dict[str, int] = {}
        self._accepted: deque[WatchedConnection] = deque()
        self._out: list[Outgoing] = []
        # May have output or a new deadline; a dict, so output order is the order of touch
        # (deterministic, unlike a set of objects hashed by address).
        self._touched: dict[WatchedConnection, None] = {}
        self._retime: list[WatchedConnection] = []  # output taken; deadline to re-read
        self._deadline: dict[WatchedConnection, float] = {}  # current deadline per connection
        self._heap: list[tuple[float, int, WatchedConnection]] = []
        self._tick = 0  # heap tie-breaker (connections do not compare)

    def listen(self, port: int) -> None:
        """Accept SYNs to `port` on any local address."""
        self.listening.add(port)

    def connect(
        self, local: tuple[bytes, int], remote: tuple[bytes, int], now: float,
        *, iss: int | None = None, config: TcpConfig | None = None,
    ) -> WatchedConnection:
        """Active open of a new connection. Raises LocalProtocolError if the 4-tuple is used."""
        key = (local[0], local[1], remote[0], remote[1])
        old = self.connections.get(key)
        if old is not None and old.state is not State.CLOSED:
            raise LocalProtocolError(f"4-tuple {key!r} is in use")
        conn = WatchedConnection(local, remote, config or self.config, iss=iss)
        conn.connect(now)
        self._adopt(key, conn)
        return conn

    def _adopt(self, key: FlowKey, conn: WatchedConnection) -> None:
        self.connections[key] = conn
        conn.watch = self._touched.setdefault
        self._touched[conn] = None

    def accept(self) -> WatchedConnection | None:
        """The next connection created by an incoming SYN, or None."""
        return self._accepted.popleft() if self._accepted else None

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def receive_packet(
        self, src: bytes, dst: bytes, tcp: bytes | memoryview, now: float
    ) -> WatchedConnection | None:
        """Parse a TCP segment (bad ones are counted in `drops`) and route it."""
        seg = parse_tcp(tcp, src, dst, drops=self.drops)
        if seg is None:
            return None
        return self.receive(src, dst, seg, now)

    def receive(
        self, src: bytes, dst: bytes, seg: TcpSegment, now: float
    ) -> WatchedConnection | None:
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
                self._touched[conn] = None
                return conn
        if is_syn and (self.accept_any or seg.dst_port in self.listening):
            if not is_unicast(dst) or not is_unicast(src):
                self._drop("syn_bad_address")  # MUST-57 / MUST-63
                return None
            if len(self.connections) >= self.max_connections:
                self._drop("table_full")
                return None
            conn = WatchedConnection((dst, seg.dst_port), (src, seg.src_port), self.config)
            conn.listen()
            conn.receive_segment(seg, now)
            self._adopt(key, conn)
            self._accepted.append(conn)
            return conn
        self._drop("no_connection")
        rst = reset_reply(seg)
        if rst is not None:
            self._out.append((dst, src, rst))
        return None

    def segments_to_send(self, now: float) -> list[Outgoing]:
        """Every segment due now from every touched connection, as (src, dst, segment)."""
        out = self._out
        self._out = []
        touched = self._touched
        if not touched:
            return out
        conns = list(touched)
        touched.clear()
        retime = self._retime
        table = self.connections
        for conn in conns:
            segs = conn.segments_to_send(now)
            la, ra = conn.local[0], conn.remote[0]
            if segs:
                out.extend([(la, ra, s) for s in segs])
            st = conn.state
            if st is State.CLOSED or (st is State.LISTEN and conn.passive):
                key = (la, conn.local[1], ra, conn.remote[1])
                if table.get(key) is conn:
                    del table[key]
                conn.watch = None
                self._deadline.pop(conn, None)
            else:
                retime.append(conn)
        return out

    def _refresh(self) -> None:
        """Re-read the deadline of every connection touched since the last look."""
        dl = self._deadline
        heap = self._heap
        for group in (self._retime, self._touched):
            for conn in group:
                if conn.watch is None:
                    continue  # forgotten (closed)
                t = conn.get_timer()
                if t is None:
                    dl.pop(conn, None)
                elif dl.get(conn) != t:
                    dl[conn] = t
                    self._tick += 1
                    heapq.heappush(heap, (t, self._tick, conn))
        self._retime.clear()
        if len(heap) > 64 and len(heap) > 4 * len(dl):
            # Mostly stale entries: rebuild from the current deadlines.
            self._heap = heap = [(t, i, c) for i, (c, t) in enumerate(dl.items())]
            heapq.heapify(heap)

    def _top(self) -> tuple[float, WatchedConnection] | None:
        heap = self._heap
        dl = self._deadline
        while heap:
            t, _n, conn = heap[0]
            if dl.get(conn) == t:
                return t, conn
            heapq.heappop(heap)  # stale
        return None

    def get_timer(self) -> float | None:
        """The earliest deadline of any connection, or None."""
        self._refresh()
        top = self._top()
        return None if top is None else top[0]

    def handle_timer(self, now: float) -> None:
        """Run every connection whose deadline is at or before `now`."""
        self._refresh()
        while (top := self._top()) is not None and top[0] <= now:
            t, conn = top
            heapq.heappop(self._heap)
            del self._deadline[conn]
            conn.handle_timer(now)
            self._touched[conn] = None

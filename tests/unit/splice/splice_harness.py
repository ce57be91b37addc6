"""A client TcpConnection <-> Terminator (Splices) <-> server TcpConnection, in memory.

Every hop carries real IP packets: the endpoints' segments are wrapped with the Terminator's own
packet builder and parsed back with parse_tcp, so checksums and options cross every link. Time
is explicit and virtual: `run()` jumps from event to event. Links have a one-way delay and,
for the simulation, seeded loss and reordering (an extra random delay), and an ECN mark
(`Link.mark`: an ECT packet becomes CE, RFC 3168 §5); the endpoints get each packet's IP
ECN field with its segment, as the Terminator's legs do.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections.abc import Callable
from typing import Any

from bridge.flows import InspectRule
from bridge.gso import SuperPacket
from bridge.inspect.manager import InspectorChain, InspectorManager
from bridge.io.offload import split_frame
from bridge.tunframe import TunFrame, TunFrameParts, joined
from bridge.userspace.legwire import ecn_of
from bridge.userspace.terminator import Terminator
from stack.connection import TcpConnection, reset_reply
from stack.events import Closed, ConnectionReset, DataReceived, Event, PeerFinished
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.checksum import checksum
from stack.wire.tcp import parse_tcp

C_ADDR = ipaddress.ip_address("198.18.1.10").packed
S_ADDR = ipaddress.ip_address("198.18.2.10").packed
C_PORT, S_PORT = 40000, 80
TUN_MTU = 1440
SERVER_CFG = TcpConfig(msl=1.0)  # a listening server with a short TIME-WAIT


class App:
    """One endpoint's application: sends `data`, optionally closes after it, records events."""

    def __init__(self, conn: TcpConnection, data: bytes = b"", close_after: bool = False,
                 reading: bool = True) -> None:
        self.conn = conn
        self.to_send = memoryview(data)
        self.close_after = close_after
        self.reading = reading
        self.rx = bytearray()
        self.events: list[Event] = []
        self.closed_called = False
        self.peak_held = 0

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    def has(self, kind: type) -> bool:
        return any(isinstance(e, kind) for e in self.events)

    def pump(self) -> None:
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, DataReceived):
                self.rx += ev.data
                if not conn.config.auto_consume and self.reading:
                    conn.consumed(len(ev.data))
        st = conn.state
        if self.to_send and st in (State.ESTABLISHED, State.CLOSE_WAIT) and not self.closed_called:
            k = conn.send(self.to_send)
            self.to_send = self.to_send[k:]
        if (self.close_after and not self.to_send and not self.closed_called
                and st in (State.ESTABLISHED, State.CLOSE_WAIT)):
            self.closed_called = True
            conn.close()


class Link:
    """One direction: serialisation at `rate` bytes/s, delay, seeded loss and reordering."""

    def __init__(self, delay: float, rng: random.Random, loss: float = 0.0,
                 reorder: float = 0.0, reorder_delay: float = 0.003,
                 rate: float = 12.5e6) -> None:
        self.delay, self.rng, self.loss, self.rate = delay, rng, loss, rate
        self.free_at = 0.0
        self.reorder, self.reorder_delay = reorder, reorder_delay
        self.q: list[tuple[float, int, bytes]] = []
        self.n = 0
        self.sent = 0
        self.dropped = 0
        self.mark = 0.0  # probability that an ECT packet is marked CE (RFC 3168 §5)
        self.marked = 0

    def put(self, pkt: bytes, now: float) -> None:
        self.sent += 1
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        if self.mark and ecn_of(pkt) in (1, 2) and self.rng.random() < self.mark:
            pkt = with_ce(pkt)
            self.marked += 1
        self.free_at = max(self.free_at, now) + len(pkt) / self.rate
        t = self.free_at + self.delay
        if self.reorder and self.rng.random() < self.reorder:
            t += self.rng.random() * self.reorder_delay
        self.n += 1
        heapq.heappush(self.q, (t, self.n, pkt))

    def due(self, now: float) -> list[bytes]:
        out = []
        while self.q and self.q[0][0] <= now:
            out.append(heapq.heappop(self.q)[2])
        return out

    def head(self) -> float | None:
        return self.q[0][0] if self.q else None


def with_ce(pkt: bytes) -> bytes:
    """`pkt` with its IP ECN field set to CE (RFC 3168 §5; the IPv4 header checksum redone)."""
    b = bytearray(pkt)
    if b[0] >> 4 == 6:
        b[1] |= 0x30
        return bytes(b)
    b[1] |= 3
    ihl = (b[0] & 0x0F) * 4
    b[10] = b[11] = 0
    c = checksum(b[:ihl])
    b[10], b[11] = c >> 8, c & 0xFF
    return bytes(b)


class _Out:
    def __init__(self) -> None:
        self.tun: list[bytes] = []
        self.peer: list[bytes] = []


def _tcp_of(pkt: bytes) -> tuple[bytes, bytes, memoryview]:
    mv = memoryview(pkt)
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0x0F) * 4
        return bytes(pkt[12:16]), bytes(pkt[16:20]), mv[ihl:]
    return bytes(pkt[8:24]), bytes(pkt[24:40]), mv[40:]


class Harness:
    """client App <-> Terminator <-> server App (or a closed port when `server_cfg` is None)."""

    def __init__(self, rule: InspectRule | None, inspectors: list[Any] | None = None, *,
                 client_cfg: TcpConfig | None = None, server_cfg: TcpConfig | None = SERVER_CFG,
                 client_data: bytes = b"", server_data: bytes = b"",
                 client_close: bool = False, server_close: bool = False,
                 server_reading: bool = True, delay: float = 0.001, loss: float = 0.0,
                 reorder: float = 0.0, seed: int = 1, terminator_kw: dict[str, Any] | None = None,
                 tun_offload: bool = False, frame_parts: bool = False) -> None:
        self.now = 0.0
        rng = random.Random(seed)
        rules = (rule,) if rule is not None else ()
        mgr = InspectorManager(())
        if rule is not None:
            mgr.chains[rule.name] = InspectorChain(rule, list(inspectors or []))
        self.term = Terminator(rules, self._to_peer, lambda dst: TUN_MTU, lambda: TUN_MTU,
                               manager=mgr, **(terminator_kw or {}))
        if tun_offload:
            self.term.use_tun_offload(parts=frame_parts)
        self.tun_frames = 0       # TunFrames the Terminator wrote (tun_offload)
        self.parts_frames = 0     # ... as TunFrameParts (frame_parts: the writev form)
        self.gso_frames = 0       # ... of which GSO super-segments
        self.out = _Out()
        self.c2t = Link(delay, rng, loss, reorder)
        self.t2c = Link(delay, rng, loss, reorder)
        self.t2s = Link(delay, rng, loss, reorder)
        self.s2t = Link(delay, rng, loss, reorder)
        self.forwarded: list[bytes] = []   # packets the Terminator did not take
        ccfg = client_cfg or TcpConfig(mss=TUN_MTU - 40, msl=1.0)
        self.client = App(TcpConnection((C_ADDR, C_PORT), (S_ADDR, S_PORT), ccfg),
                          client_data, client_close)
        self.server: App | None = None
        if server_cfg is not None:
            sconn = TcpConnection((S_ADDR, S_PORT), (C_ADDR, C_PORT), server_cfg)
            sconn.listen()
            self.server = App(sconn, server_data, server_close, server_reading)
        self.client.conn.connect(self.now)
        self.client_syns: list[Any] = []
        self.server_syns: list[Any] = []
        self.hooks: list[Callable[[Harness], None]] = []

    def _to_peer(self, pkt: bytes, now: float, out: Any) -> bool:
        out.peer.append(pkt)
        return True

    def _endpoint_out(self) -> None:
        t = self.term
        for seg in self.client.conn.segments_to_send(self.now):
            self.c2t.put(t.packet(C_ADDR, S_ADDR, seg), self.now)
        if self.server is not None:
            for seg in self.server.conn.segments_to_send(self.now):
                self.s2t.put(t.packet(S_ADDR, C_ADDR, seg), self.now)

    def _term_out(self) -> None:
        out = self.out
        for p in out.tun:
            if type(p) is TunFrameParts:  # the TUN adapter's writev: one frame of both parts
                self.parts_frames += 1
                p = joined(p)
            if type(p) is TunFrame:
                # what the kernel does with a vnet TUN write: segment (GSO) and complete the
                # checksum (NEEDS_CSUM); bridge/io/offload.py's splitter does exactly that
                self.tun_frames += 1
                self.gso_frames += p[1] != 0
                segs: list[bytes] = []
                assert split_frame(p, segs), "a TunFrame the kernel would refuse"
                for q in segs:
                    self.t2c.put(q, self.now)
            else:
                self.t2c.put(p, self.now)
        for p in out.peer:
            self.t2s.put(p, self.now)
        out.tun.clear()
        out.peer.clear()

    def step(self) -> None:
        now = self.now
        term = self.term
        for pkt in self.c2t.due(now):
            if type(pkt) is SuperPacket:  # a TSO frame from the TUN, as the Bridge hands it
                if term.from_tun_super(pkt, now):
                    continue
                segs: list[bytes] = []
                assert pkt.split(segs)
                for q in segs:
                    if not term.from_tun(q, len(q), now):
                        self.forwarded.append(q)
                continue
            if not term.from_tun(pkt, len(pkt), now):
                self.forwarded.append(pkt)
        term.flush(now, self.out)
        term.from_peer(list(self.s2t.due(now)), now, self.out)
        # what from_peer passed on to out.tun would go to the TUN: in this harness every
        # server packet belongs to the splice, anything else is recorded as forwarded
        t = term.get_timer()
        if t is not None and t <= now:
            term.handle_timer(now, self.out)
        self._term_out()
        for pkt in self.t2c.due(now):
            src, dst, tcp = _tcp_of(pkt)
            seg = parse_tcp(tcp, src, dst, ecn=ecn_of(pkt))
            assert seg is not None, "bad packet toward the client"
            if seg.flags & 0x02:
                self.client_syns.append(seg)
            self.client.conn.receive_segment(seg, now)
        for pkt in self.t2s.due(now):
            src, dst, tcp = _tcp_of(pkt)
            seg = parse_tcp(tcp, src, dst, ecn=ecn_of(pkt))
            assert seg is not None, "bad packet toward the server"
            if seg.flags & 0x02:
                self.server_syns.append(seg)
            if self.server is None:
                rst = reset_reply(seg)   # a closed port (RFC 9293 §3.10.7.1)
                if rst is not None:
                    self.s2t.put(term.packet(S_ADDR, C_ADDR, rst), now)
            else:
                self.server.conn.receive_segment(seg, now)
        for app in (self.client, self.server):
            if app is None:
                continue
            t = app.conn.get_timer()
            if t is not None and t <= now:
                app.conn.handle_timer(now)
            app.pump()
        for hook in self.hooks:
            hook(self)
        self._endpoint_out()

    def next_time(self) -> float | None:
        ts = [self.c2t.head(), self.t2c.head(), self.t2s.head(), self.s2t.head(),
              self.term.get_timer(), self.client.conn.get_timer()]
        if self.server is not None:
            ts.append(self.server.conn.get_timer())
        ts2 = [t for t in ts if t is not None]
        return min(ts2) if ts2 else None

    def run(self, until: Callable[[Harness], bool], max_time: float = 60.0,
            max_steps: int = 2_000_000) -> bool:
        """Step until `until(self)` or nothing is left to do; True when `until` held."""
        for _ in range(max_steps):
            self.step()
            if until(self):
                return True
            t = self.next_time()
            if t is None:
                return until(self)
            self.now = max(self.now, t)
            if self.now > max_time:
                return False
        return False


def finished(app: App) -> bool:
    return app.has(Closed) or app.has(ConnectionReset)


__all__ = ["Harness", "App", "finished", "C_ADDR", "S_ADDR", "C_PORT", "S_PORT",
           "DataReceived", "PeerFinished", "ConnectionReset", "Closed"]

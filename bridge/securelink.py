"""SecureLink: the Bridge's seam to the secure modes (bridge/secure, docs/SECURE.md).

Rules:
- Only peers with `security = "authenticated"` or `"encrypted"` pass here; a Bridge
  without such peers has no SecureLink (`Bridge.secure is None`), and its plain path pays
  one `is None` check per batch, never one per packet.
- Send: every datagram for a secure peer enters `Output.udp` through `bridge.output.emit`
  like a plain peer's (so the tx counters and the keepalive clock are the same code), under
  the peer's configured endpoint; `seal_output`, run once at the end of every Bridge call
  (from_tun, from_udp, from_secure, handle_timer), takes those lists out of `Output.udp`,
  seals them (`seal` per datagram, `seal_batch` per TSO `UdpRun`; an authenticated peer's
  runs are built with room for header and tag, `UdpRun.head`, and `seal_rows` writes
  those in place: no second buffer, no payload copy) and puts the results in
  `Output.secure[current endpoint]`, which the I/O layer sends from the secure socket.
  The endpoint is the SecureEndpoint's, which follows a peer that roamed (learned only from
  a datagram that verified). Flow-hash source ports are not kept: every secure datagram
  leaves from the secure port (docs/SECURE.md §2).
- Staged first: datagrams the SecureEndpoint staged during a handshake, and handshake
  messages, come out of `datagrams_to_send` before anything sealed later in the same call,
  so a sequence policy never sees them late (the bridge/secure docstring's contract).
- Receive (`receive`, for datagrams from the secure socket only): `receive_datagram`
  verifies and opens each one; what verified goes through the Bridge's ordinary
  `from_udp` under a per-peer key (bridge/peers.py `secure_key`) that `by_host` maps to
  that peer alone, so the GRE/IPIP checks, AllowedIPs, TTL, loop guard and sequence policy are
  the plain path's, unchanged. A UDP GRO batch is verified datagram by datagram too; when
  every one verified for the same peer (no event, no keepalive, equal sizes), the inner
  datagrams are glued again into one `GroBatch` (`_open_run`), so the Bridge's receive
  fast path makes one TunFrame of a TCP run exactly as for a plain peer. A secure peer is
  never found by its host address: a plain datagram from its address to the plain port is
  "unknown_peer". Only a verified datagram
  marks a peer heard; a secure-layer keepalive (empty payload) does so directly.
- Events are applied at once, before the payload of the datagram that produced them (what
  verified before them is delivered first): PeerRestarted resets the peer's sequence
  receiver (issue 12: no 32-packet wait after a restart); SessionStarted marks it heard;
  Roamed is shown by `status` (the send address is the SecureEndpoint's already).

Theory of operation: one SecureEndpoint for all secure peers of the Bridge (one UDP
port); peer indices are the Bridge's. `earliest` / `handle_timer` are merged into the
Bridge's. `status` adds a "secure" section and each secure peer's mode and current
endpoint; `prometheus` adds grebe_secure_drops_total / grebe_secure_events_total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from bridge.gro import GroBatch
from bridge.gso import UdpRun
from bridge.output import Addr, Output
from bridge.peers import PeerState, secure_key
from bridge.secure import (
    OVERHEAD,
    PeerRestarted,
    PeerSpec,
    Roamed,
    SecureEndpoint,
    SessionStarted,
    mirror,
)
from bridge.secure.wire import MSG_AUTHENTICATED, MSG_ENCRYPTED, TRANSPORT

__all__ = ["SecureLink"]

Buf = bytes | bytearray | memoryview
WHOLE, PARENT, CHILD = "whole", "parent", "child"
Deliver = Callable[[list[tuple[Buf | GroBatch, Addr]], float, Output], None]


def _alloc(seg: int) -> Callable[[int], bytearray]:
    return lambda n: UdpRun(n, seg)


class SecureLink:
    """The secure peers of one Bridge: sealing, opening, events, timers, counters."""

    __slots__ = ("ep", "peers", "addrs", "keys", "modes", "deliver", "heard", "roamed",
                 "role", "sink", "seen", "resets", "data_seen", "_recv")

    def __init__(self, peers: list[PeerState], specs: list[PeerSpec], now: float,
                 deliver: Deliver, heard: Callable[[PeerState, float], None],
                 wall_offset: float = 0.0) -> None:
        self.ep = SecureEndpoint(specs, now, wall_offset=wall_offset)
        self.peers = peers
        self.addrs = [(s.index, peers[s.index].addr) for s in specs]
        self.keys = {s.index: secure_key(s.index) for s in specs}
        self.modes = {peers[s.index].name: (s.index, s.security.mode.value) for s in specs}
        self.deliver = deliver  # Bridge.from_udp
        self.heard = heard  # Bridge.heard
        self.roamed = 0
        # split_directions (bridge/io/split.py, bridge/secure/mirror.py): WHOLE, or the
        # PARENT (handshakes, sending) or the CHILD (receiving) of a split endpoint; `sink`
        # sends a message to the other process
        self.role = WHOLE
        self.sink: Callable[[Any], None] | None = None
        self.seen: dict[int, Any] = {}  # parent: keysets the child has (mirror.export)
        self.resets: set[int] = set()  # parent: peers whose restart the child must apply
        self.data_seen: dict[int, float] = {}  # parent: the child's data times applied
        self._recv = self.ep.receive_datagram

    # ---------------------------------------------------------------- split

    def split(self, role: str, sink: Callable[[Any], None]) -> None:
        """Become the PARENT or the CHILD of a split endpoint (bridge/io/split.py)."""
        self.role = role
        self.sink = sink
        if role == CHILD:
            self._recv = self._child_recv

    def resync(self) -> None:
        """Peers were renumbered (a reload): the parent ships every keyset again."""
        self.seen.clear()

    def _ship(self) -> None:
        """Parent: hand the child every keyset that changed (before this call's Output is
        sent: bridge/secure/mirror.py)."""
        got = mirror.export(self.ep, self.seen, self.resets)
        if got and self.sink is not None:
            self.sink(("K", got))

    def _child_recv(self, data: Buf, addr: Addr, now: float) -> tuple[int, Buf] | None:
        """Child: transport datagrams are opened here; handshakes go to the parent."""
        if len(data) >= 4 and data[0] != MSG_ENCRYPTED and data[0] != MSG_AUTHENTICATED \
                and self.sink is not None:
            self.sink(("H", bytes(data), addr))
            return None
        return self.ep.receive_datagram(data, addr, now)

    def apply_keys(self, peers: list[mirror.PeerKeys]) -> None:
        """Child: keysets from the parent; a restarted peer's sequence receiver is reset."""
        for i in mirror.apply(self.ep, peers):
            self.peers[i].seq.reset()

    def from_child(self, msg: Any, now: float, out: Output) -> None:
        """Parent: a message of the child (`_child_recv`, `_events`)."""
        kind = msg[0]
        if kind == "H":
            self.receive([(msg[1], tuple(msg[2]))], now, out)
            return
        if kind == "C":
            mirror.confirm(self.ep, msg[1], msg[2], now)
        elif kind == "R":
            mirror.roam_to(self.ep, msg[1], tuple(msg[2]))
            self.roamed += 1
        self.seal_output(out, now)

    def rx_times(self) -> list[tuple[int, float, float]]:
        """Child: what the parent's timers need (mirror.rx_times)."""
        return mirror.rx_times(self.ep)

    def note_child(self, i: int, last: float, data: float) -> None:
        """Parent: the child's `rx_times` for peer i (mirror.note_child)."""
        mirror.note_child(self.ep, self.data_seen, i, last, data)

    # ---------------------------------------------------------------- send

    def seal_output(self, out: Output, now: float) -> None:
        """Seal what this call put in out.udp for secure peers into out.secure."""
        udp = out.udp
        ep = self.ep
        if self.role != WHOLE:
            if self.role == CHILD:  # the child never sends (mirror.py)
                ep.out.clear()
                return
            self._ship()
        self._drain(out, now)
        for i, addr in self.addrs:
            items = udp.pop(addr, None)
            if items is None:
                continue
            out.udp_sport.pop(addr, None)
            sealed: list[bytes | bytearray] = []
            for item in items:
                if type(item) is UdpRun:
                    seg = item.seg
                    if item.head:  # built with room: sealed in place (gso.py, authenticated)
                        if ep.seal_rows(i, item, seg, now):
                            item.head = 0
                            sealed.append(item)
                        continue
                    r = ep.seal_batch(i, item, seg, now, alloc=_alloc(seg + OVERHEAD))
                    if r is not None:
                        sealed.append(r[0])
                else:
                    d = ep.seal(i, item, now)
                    if d is not None:
                        sealed.append(d)
            dest = ep.endpoint(i)
            if sealed and dest is not None:
                lst = out.secure.get(dest)
                if lst is None:
                    out.secure[dest] = sealed
                else:
                    lst.extend(sealed)
        self._drain(out, now)

    def _drain(self, out: Output, now: float) -> None:
        """Handshake messages, cookie replies, keepalives and released staged datagrams."""
        for d, addr in self.ep.datagrams_to_send(now):
            lst = out.secure.get(addr)
            if lst is None:
                out.secure[addr] = [d]
            else:
                lst.append(d)

    # ---------------------------------------------------------------- receive

    def receive(self, datagrams: Iterable[tuple[Buf | GroBatch, Addr]], now: float,
                out: Output) -> None:
        """Datagrams from the secure socket: verify, apply events, deliver what verified."""
        ep = self.ep
        keys = self.keys
        recv = self._recv
        batch: list[tuple[Buf | GroBatch, Addr]] = []
        for payload, addr in datagrams:
            if type(payload) is GroBatch:  # cut: each datagram is verified on its own
                buf, seg = payload.buf, payload.seg
                step = seg if seg > 0 else max(len(buf), 1)
                mv = memoryview(buf)
                if seg > OVERHEAD and len(buf) > seg:
                    k = self._open_fast(mv, seg, addr, now, batch) * seg
                    if k < len(buf):  # the rest, or all of it, datagram by datagram (cut
                        # only now: a slice costs 0.1 us, and the fast path takes them all)
                        batch = self._open_run([mv[o:o + seg] for o in range(k, len(buf), seg)],
                                               seg, addr, now, out, batch)
                    continue
                parts: list[Buf] = [mv[o:o + step] for o in range(0, len(buf), step)]
            else:
                parts = [payload]
            for d in parts:
                res = recv(d, addr, now)
                if ep.events_q:
                    if batch:  # what verified before the event goes first
                        self.deliver(batch, now, out)
                        batch = []
                    self._events(now)
                if res is None:
                    continue
                i, inner = res
                if len(inner):
                    batch.append((inner, keys[i]))
                else:
                    self.heard(self.peers[i], now)  # a keepalive of the secure layer
        if batch:
            self.deliver(batch, now, out)
        self.seal_output(out, now)

    def _open_fast(self, mv: memoryview, seg: int, addr: Addr, now: float,
                   batch: list[tuple[Buf | GroBatch, Addr]]) -> int:
        """A GRO batch of one keypair of one peer (current or retired; not a `next` one
        still to be confirmed), from the peer's current endpoint, opened
        in one loop (`Keypair.open_run`: the per-datagram checks without the per-datagram
        calls) into one GroBatch of the inner datagrams appended to `batch`. Returns how many
        datagrams it took from the front (0: none; the caller takes the rest one by one, so
        drops, events, roaming and keepalives are the per-datagram path's)."""
        ep = self.ep
        if mv[1] or mv[2] or mv[3]:
            return 0
        entry = ep.indices.get(TRANSPORT.unpack_from(mv)[1])
        if entry is None:
            return 0
        p, kp = entry
        # a `next` keypair is confirmed by its first datagram: the per-datagram path's event
        if kp is None or kp is p.next or kp.msg_type != mv[0] or now >= kp.expires \
                or addr != p.endpoint:
            return 0
        count = -(-len(mv) // seg)
        inner = bytearray(len(mv) - OVERHEAD * count)
        k = kp.open_run(mv, seg, memoryview(inner), ep.reject_msgs)
        if k == 0:
            return 0
        p.verified(now, ep.limits)
        if k < count:
            del inner[k * (seg - OVERHEAD):]
        batch.append((GroBatch(inner, seg - OVERHEAD) if k > 1 else inner, self.keys[p.index]))
        return k

    def _open_run(self, parts: list[Buf], seg: int, addr: Addr, now: float, out: Output,
                  batch: list[tuple[Buf | GroBatch, Addr]],
                  ) -> list[tuple[Buf | GroBatch, Addr]]:
        """The datagrams of one GRO batch: each verified on its own; when all of them
        verified for one peer, carried data, caused no event and all but the last have the
        full size, their inner payloads are glued again into one `GroBatch` of seg -
        OVERHEAD, so the Bridge's receive fast path (bridge/fastpath.py `receive_run`) can
        make one TunFrame of them as it does for a plain peer. Otherwise each goes on alone,
        in order. Returns the pending batch."""
        ep = self.ep
        keys = self.keys
        opened: list[tuple[int, Buf]] = []
        whole = True
        last = len(parts) - 1
        inner_seg = seg - OVERHEAD
        for n, d in enumerate(parts):
            res = self._recv(d, addr, now)
            if ep.events_q:
                whole = False
                for i, inner in opened:  # what verified before the event goes first
                    batch.append((inner, keys[i]))
                opened = []
                if batch:
                    self.deliver(batch, now, out)
                    batch = []
                self._events(now)
            if res is None:
                whole = False
                continue
            i, inner = res
            if not len(inner):
                self.heard(self.peers[i], now)  # a keepalive of the secure layer
                whole = False
                continue
            if (opened and opened[0][0] != i) or (n < last and len(inner) != inner_seg):
                whole = False
            opened.append((i, inner))
        if whole and len(opened) > 1:
            glued = bytearray(inner_seg * (len(opened) - 1) + len(opened[-1][1]))
            at = 0
            for _, inner in opened:
                glued[at:at + len(inner)] = inner
                at += len(inner)
            batch.append((GroBatch(glued, inner_seg), keys[opened[0][0]]))
        else:
            for i, inner in opened:
                batch.append((inner, keys[i]))
        return batch

    def _events(self, now: float) -> None:
        ep = self.ep
        while (ev := ep.next_event()) is not None:
            if isinstance(ev, PeerRestarted):
                self.peers[ev.peer].seq.reset()
                if self.role == PARENT:  # the child's receiver too (mirror.py)
                    self.resets.add(ev.peer)
            elif isinstance(ev, SessionStarted):
                self.heard(self.peers[ev.peer], now)
                if self.role == CHILD and self.sink is not None:  # confirmed here
                    cur = ep.peers[ev.peer].current
                    if cur is not None:
                        self.sink(("C", ev.peer, cur.local))
            elif isinstance(ev, Roamed):
                self.roamed += 1
                if self.role == CHILD and self.sink is not None:
                    self.sink(("R", ev.peer, ev.addr))

    # ---------------------------------------------------------------- timers, status

    def earliest(self, best: float | None) -> float | None:
        """The earlier of `best` (the Bridge's own deadline) and the secure layer's."""
        if self.role == CHILD:
            return best
        t = self.ep.get_timer()
        return t if t is not None and (best is None or t < best) else best

    def handle_timer(self, now: float, out: Output) -> None:
        if self.role == CHILD:
            return  # timers are the parent's
        t = self.ep.get_timer()
        if t is not None and t <= now:
            self.ep.handle_timer(now)
        self.seal_output(out, now)

    def status(self, st: dict[str, Any], now: float) -> None:
        """Add the secure counters and each secure peer's mode and endpoint to `st`."""
        snap = self.ep.snapshot(now)
        st["secure"] = snap
        sessions: Any = snap["peers"]
        for p in st["peers"]:
            hit = self.modes.get(p["name"])
            if hit is None:
                p["security"] = "plain"
                continue
            i, p["security"] = hit
            dest = self.ep.endpoint(i)
            if dest is not None:
                p["endpoint"] = f"[{dest[0]}]:{dest[1]}" if ":" in dest[0] \
                    else f"{dest[0]}:{dest[1]}"
            p["session"] = sessions.get(p["name"])

    def prometheus(self, child: dict[str, Any] | None = None) -> str:
        """The secure counters; with `child`, a receiving process's added (its `counts`)."""
        return self.ep.prometheus(more=child)

    def counts(self) -> dict[str, dict[str, int]]:
        """The drop and event counters (a receiving process's, for the parent to add)."""
        return {"drops": dict(self.ep.drops), "events": dict(self.ep.events)}

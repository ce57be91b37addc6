"""Bridge: the sans-I/O data plane of one endpoint (batches in, batches out).

Contract (docs/DESIGN.md):
    bridge = Bridge(config, now, underlay_mtu=None)   # pure: no sockets, no clock
    out = Output()                        # reused per batch; out.clear()
    bridge.from_tun(packets, now, out)    # inner IP packets read from the TUN
    bridge.from_udp(datagrams, now, out)  # [(payload, (host, port)), ...]
    bridge.handle_timer(now, out); bridge.get_timer() -> float | None
    bridge.rx_only; bridge.note_heard(i, t)  (one process per direction, bridge/io/split.py)
    Output, Addr and `emit` (append and count a datagram) are bridge/output.py's:
    out.udp: dict[(host, port), list[bytes | bytearray]]  datagrams per peer, in order;
        an item may be a `bridge.gso.UdpRun` (bytes: equal-size datagrams back to back,
        `.seg` bytes each, the last maybe shorter) from a TSO super-packet (bridge/fastpath.py)
    out.udp_sport: dict[(host, port), list[int]]  only for peers with source_port =
        "flow-hash": the RFC 8086 §3.2.1 source port of each item in out.udp[dest]
        (same index). An I/O layer that cannot choose source ports may ignore it.
    out.tun: list[bytes | bytearray]      inner packets and ICMP errors for the TUN
    bridge.counters; bridge.status(now) -> dict; bridge.metrics_text(now) -> str
    bridge.tun_mtu -> int                 the MTU to set on the TUN device
    bridge.from_secure(datagrams, now, out); out.secure: the secure port's datagrams in and
    out (issue 12); secure peers are bridge/securelink.py's `self.secure` (None without
    them: one check per call), which seals at the end of every call and opens.

Outbound flow (TUN -> peer), per packet, in this order:
 1. IP length checks (`packet_length`); malformed -> drop "malformed".
 2. Loop guard, RFC 2003 §4: destination is a tunnel endpoint -> drop "loop".
 3. Longest-prefix match on the destination -> peer; none -> "no_route" + ICMP unreachable,
    or "link_local" (no ICMP) for a link-scope destination (`peers.link_scope`).
 4. Peer down with down_action "withdraw" -> "peer_down" + ICMP unreachable.
 5. RFC 2003 §3.1 / RFC 1812 §5.3.1: TTL (hop limit) <= 1 -> "ttl" + ICMP Time Exceeded;
    otherwise decrement it (IPv4 checksum fixed incrementally, RFC 1624).
 6. MTU (RFC 2003 §5.1, RFC 4459): larger than the peer's tunnel MTU -> IPv6: ICMPv6 Packet
    Too Big (RFC 4443 §3.2, MTU at least 1280: smaller tunnels let the underlay fragment);
    IPv4 with DF: ICMP Fragmentation Needed with the tunnel MTU (RFC 1191 §4); IPv4
    without DF: fragmented before encapsulation (RFC 4459 §3, "inner fragmentation", the
    end host reassembles; `pmtu.fragment = false` drops "too_big" instead).
 7. MSS clamp of SYN / SYN-ACK (bridge/mss.py), then encapsulate (bridge/encap.py) and
    append to out.udp[peer endpoint]. Per-peer tx counters.
Inbound flow (peer -> TUN):
 1. Source address -> peer (no roaming; port ignored, RFC 8086 §3.2.1) else "unknown_peer".
 2. GRE checks (version, flags, checksum, key, protocol) or IPIP version nibble;
    keepalives end here (liveness only).
 3. Inner IP length checks; inner source must route back to that peer ("spoofed_source",
    WireGuard AllowedIPs); inner TTL 0 -> "ttl" (RFC 2003 §3.1: MUST discard; the
    decapsulator does not decrement); inner destination a tunnel endpoint -> "loop", one no
    site host has (multicast, broadcast, loopback, ...) -> "bad_destination", one routed
    back to the same peer -> "hairpin" (bridge/peers.py).
 4. MSS clamp, then the peer's sequence policy (bridge/seqpolicy.py) delivers to out.tun;
    with userspace-terminated flows, what it delivers (a batch's, or its reorder buffer's
    on the timer) and the GRO fast path's TunFrames are first handed, in order, to
    `Terminator.from_peer` in one call: the server legs take theirs, the rest goes to
    out.tun in the same order (nothing rewrites out.tun afterwards).
Every drop increments exactly one reason; nothing a peer sends can raise. The checks of
steps 3-6 (out) and 3 (in) are bridge/peers.py's `forward` and `accept`, shared with the
fast paths (bridge/fastpath.py `FastPath`, which gets the peer table, the counters and the
liveness callback `heard`, never the Bridge).

Liveness: each peer gets a keepalive (bridge/encap.py) when nothing was sent to it for
`keepalive` seconds; a peer not heard from for `dead_after` seconds is down (up again on
the next keepalive that passes the GRE/IPIP checks, or inner packet that passes every check
of inbound steps 1-4: spoofed inner sources, dropped sequence numbers never count). Plain
keepalives carry nothing to authenticate (RFC 2890 §3), so anyone who can send from the
peer's address (with its key, which travels in clear) keeps a dead peer up and defeats
down_action "withdraw"; the secure modes (bridge/secure/) are the answer. A peer starts
up: the dead_after clock starts at construction, so a peer never heard from goes down after
dead_after.
ICMP errors to the TUN share one token bucket (pmtu.icmp_rate,
pmtu.icmp_burst) refilled from `now`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from bridge import counters as C
from bridge.config import Config, SeqPolicy
from bridge.counters import Counters
from bridge.encap import KEEPALIVE, decode_gre, flow_source_port
from bridge.fastpath import FastPath
from bridge.flows import FlowSelector
from bridge.gro import GroBatch
from bridge.gso import SuperPacket
from bridge.icmperr import IcmpErrors
from bridge.mss import clamp_packet
from bridge.output import Addr, Output, emit
from bridge.peers import (
    LOOP,
    NO_ROUTE,
    PEER_DOWN,
    TOO_BIG,
    TTL_EXPIRED,
    PeerState,
    PeerTable,
    link_scope,
    new_state,
)
from bridge.scrub import Scrubber
from bridge.secure import PeerSpec
from bridge.securelink import SecureLink
from bridge.seqpolicy import filtered
from stack.wire import icmp
from stack.wire.ip import (
    DF,
    V4_DST,
    V4_SRC,
    V4_TTL,
    V6_DST,
    V6_HLIM,
    V6_NXT,
    V6_SRC,
    decrement_ttl_v4,
    fragment_v4,
    packet_length,
)
from stack.wire.prelude import (
    V4_DST_AT,
    V4_DST_END,
    V4_SRC_END,
    V6_CHAIN_HEADS,
    V6_DST_AT,
    V6_DST_END,
    V6_SRC_END,
    syn_candidate,
    uninspectable,
)

if TYPE_CHECKING:
    from bridge.userspace.terminator import Terminator

__all__ = ["Bridge", "Output", "PeerState", "Addr"]

Buf = bytes | bytearray | memoryview
IPV6_MIN_MTU = 1280  # RFC 8200 §5


class Bridge:
    """The data plane of one endpoint. Pure: no sockets, no clock (`now` is passed in)."""

    def __init__(self, config: Config, now: float, underlay_mtu: int | None = None,
                 wall_offset: float = 0.0) -> None:
        self.config = config
        underlay = underlay_mtu or config.pmtu.underlay_mtu
        self.underlay_mtu = underlay
        self.counters = Counters([p.name for p in config.peers])
        self.peers: list[PeerState] = []
        for i, p in enumerate(config.peers):  # bridge/reconfig.py builds them on reload too
            self.peers.append(new_state(i, p, now, underlay, config.tun.mtu))
        self.table = PeerTable(config.peers, local=[config.listen.address], states=self.peers,
                               tun=config.tun.addresses)
        # the fast paths get what they need, not the Bridge (bridge/fastpath.py)
        self.fast = FastPath(self.table, self.counters, self.heard)
        # issue 12; `wall_offset` (UNIX time - now) dates handshakes across restarts
        specs = [PeerSpec(i, p.name, p.security, p.endpoint)
                 for i, p in enumerate(config.peers) if p.secure]
        self.secure: SecureLink | None = SecureLink(
            self.peers, specs, now, self.from_udp, self.heard, wall_offset) if specs else None
        mtus = [p.mtu for p in self.peers]
        self.tun_mtu: int = config.tun.mtu or (min(mtus) if mtus else underlay - 28)
        self.mss_clamp = config.mss_clamp
        self.fragment = config.pmtu.fragment
        self.icmp = IcmpErrors(self.counters.events, config.pmtu.icmp_rate,
                               config.pmtu.icmp_burst, config.tun.addresses, now)
        self._icmp = self.icmp.send  # ICMP errors to the TUN, rate limited (bridge/icmperr.py)
        self._unreachable = self.icmp.unreachable
        self.scrub: Scrubber | None = None
        self._seq_off: list[bool] = []
        self.bind_scrub(config, now)
        self.started = now
        # Set by the receiving process of a split endpoint (bridge/io/split.py): its timer
        # only flushes the reorder buffers; keepalives and liveness are the other process's.
        self.rx_only = False
        # flows an [[inspect]] rule terminates in userspace (bridge/userspace/terminator.py);
        # None without such a rule, and then nothing below looks at TCP (nor imports it).
        self.terminator: Terminator | None = None
        self._covers: Callable[[int, bytes, bytes], bool] | None = None
        self.bind_covers(config)
        if config.inspect:
            from bridge.userspace.terminator import Terminator

            self.terminator = Terminator.for_bridge(self, now)

    def set_path_mtu(self, underlay_mtu: int, addr: Addr | None = None) -> int:
        """The underlay path MTU toward peer endpoint `addr` (None: every peer) is now
        `underlay_mtu`, as the I/O layer learned it (EMSGSIZE / IP_MTU, RFC 1191, RFC 8201).

        RFC 2003 §5.1 soft state: the peer's tunnel MTU becomes underlay - overhead (never
        above a configured tun.mtu), so later too-big packets get ICMP with the new value and
        SYNs are clamped to it. Returns the new `tun_mtu` (minimum over peers), which the
        I/O layer may set on the TUN. Raises ValueError for an MTU below 576 (our misuse).
        """
        if underlay_mtu < 576:
            raise ValueError(f"underlay MTU {underlay_mtu} below the IPv4 minimum 576")
        for p in self.peers:
            if addr is None or p.addr == addr or p.addr[0] == addr[0]:
                mtu = underlay_mtu - p.overhead
                p.mtu = min(mtu, self.config.tun.mtu) if self.config.tun.mtu else mtu
        if self.peers:
            self.tun_mtu = min(p.mtu for p in self.peers)
        if self.terminator is not None:
            self.terminator.path_mtu_changed()  # the live legs too, not only new ones
        return self.tun_mtu

    def send_inner(self, pkt: bytes, now: float, out: Output) -> bool:
        """Encapsulate one inner packet this endpoint originated (the server leg of a
        userspace-terminated flow) toward the peer its destination routes to; False (and
        counted) when there is no usable route. The caller sizes it to the tunnel MTU; a
        packet larger (a bug, or sent before a path MTU drop reached the leg) is dropped and
        counted as too_big, as the local EMSGSIZE would be, and the leg retransmits it."""
        v6 = pkt[0] >> 4 == 6
        idx = self.table.forward(pkt[V6_DST_AT] if v6 else pkt[V4_DST_AT], 255, 0)
        if idx < 0:
            self.counters.drops[C.R_LOOP if idx == LOOP else C.R_PEER_DOWN
                                if idx == PEER_DOWN else C.R_NO_ROUTE] += 1
            return False
        peer = self.peers[idx]
        if len(pkt) > (max(peer.mtu, IPV6_MIN_MTU) if v6 else peer.mtu):
            self.counters.drops[C.R_TOO_BIG] += 1
            return True
        self._send(peer, pkt, v6, now, out)
        return True

    def flows(self, now: float) -> list[dict[str, Any]]:
        """The userspace-terminated flows, for `grebe flows` (empty without such rules)."""
        return self.terminator.flows(now) if self.terminator is not None else []

    # ---------------------------------------------------------------- TUN -> peers

    def from_tun(self, packets: Iterable[Buf | SuperPacket], now: float, out: Output) -> None:
        """Encapsulate inner packets toward their peers (out.udp); ICMP errors to out.tun.

        `packets` may hold `SuperPacket`s (TCP TSO frames, bridge/fastpath.py). Never raises
        for bad packets: each drop is counted by reason.
        """
        drops = self.counters.drops
        forward = self.table.forward
        peers = self.peers
        term = self.terminator
        covers = self._covers
        send_super = self.fast.send_super
        if self.scrub is not None:  # [[scrub]] rules, before anything else (bridge/scrub.py)
            packets = self.scrub.outbound(packets, now, self.table.route)
        for pkt in packets:
            if type(pkt) is SuperPacket:
                if term is not None:
                    if term.from_tun_super(pkt, now):
                        continue  # a terminated flow's client leg takes it whole
                elif send_super(pkt, now, out):  # bridge/fastpath.py
                    continue
                segs: list[bytes] = []
                if pkt.split(segs):
                    self.from_tun(segs, now, out)  # the per-packet path, segment by segment
                else:
                    drops[C.R_MALFORMED] += 1
                continue
            n = packet_length(pkt)
            if not n:
                drops[C.R_MALFORMED] += 1
                continue
            v6 = pkt[0] >> 4 == 6
            if covers is not None and v6 and pkt[V6_NXT] in V6_CHAIN_HEADS \
                    and uninspectable(pkt, 0, covers):
                drops[C.R_UNINSPECTABLE] += 1  # never forwarded past a rule (prelude.py)
                continue
            if term is not None and term.from_tun(pkt, n, now):
                continue  # a flow terminated in userspace (bridge/userspace/terminator.py)
            # route, peer state, TTL, MTU: bridge/peers.py `forward`, in one call
            idx = forward(pkt[V6_DST_AT], pkt[V6_HLIM], n) if v6 else \
                forward(pkt[V4_DST_AT], pkt[V4_TTL], n)
            if idx < 0:
                self._not_forwarded(idx, pkt, n, v6, now, out)
                continue
            self._send(peers[idx], pkt if n == len(pkt) else memoryview(pkt)[:n], v6, now, out)
        if term is not None:
            term.flush(now, out)
        if self.secure is not None:
            self.secure.seal_output(out, now)

    def _not_forwarded(self, why: int, pkt: Buf, n: int, v6: bool, now: float,
                       out: Output) -> None:
        """Count (and answer with ICMP) a packet `forward` refused for reason `why`."""
        drops = self.counters.drops
        dst = pkt[V6_DST_AT] if v6 else pkt[V4_DST_AT]
        if why == LOOP:
            drops[C.R_LOOP] += 1  # RFC 2003 §4: never tunnel to a tunnel endpoint
        elif why == NO_ROUTE:
            if link_scope(dst):  # the host's own RS/MLD on the TUN: not a routing failure
                drops[C.R_LINK_LOCAL] += 1
            else:
                drops[C.R_NO_ROUTE] += 1
                self._unreachable(pkt, v6, now, out)
        elif why == PEER_DOWN:
            drops[C.R_PEER_DOWN] += 1
            self._unreachable(pkt, v6, now, out)
        elif why == TTL_EXPIRED:  # RFC 2003 §3.1, RFC 1812 §5.3.1
            drops[C.R_TTL] += 1
            if v6:
                self._icmp(pkt, True, icmp.ICMP6_TIME_EXCEEDED, 0, 0, now, out)
            else:
                self._icmp(pkt, False, icmp.ICMP4_TIME_EXCEEDED, 0, 0, now, out)
        elif why == TOO_BIG:
            self._too_big(self.peers[self.table.route(dst)], pkt, n, v6, now, out)

    def _send(self, peer: PeerState, pkt: Buf, v6: bool, now: float, out: Output) -> None:
        enc = peer.encoder
        if peer.gre:
            dgram = enc.wrap(pkt, v6)
            off = enc.hlen
        else:
            dgram = bytearray(pkt)
            off = 0
        if v6:
            dgram[off + V6_HLIM] -= 1  # hop limit: not covered by any checksum
        else:
            decrement_ttl_v4(dgram, off)
        if self.mss_clamp and clamp_packet(dgram, off, peer.mtu):
            self.counters.events[C.E_MSS_CLAMPED] += 1
        if peer.gre and enc.csum:  # seal() is a no-op without GRE checksums: no call
            enc.seal(dgram)
        emit(out, self.counters, peer, dgram, 1, now,
             flow_source_port(pkt) if peer.flow_sport else -1)

    def _too_big(self, peer: PeerState, pkt: Buf, n: int, v6: bool, now: float,
                 out: Output) -> None:
        drops = self.counters.drops
        if v6:
            limit = max(peer.mtu, IPV6_MIN_MTU)
            if n <= limit:  # RFC 8200 §5: the tunnel carries 1280; the underlay fragments
                self._send(peer, memoryview(pkt)[:n], True, now, out)
                return
            drops[C.R_TOO_BIG] += 1
            self._icmp(pkt, True, icmp.ICMP6_PACKET_TOO_BIG, 0, limit, now, out)
            return
        flags = (pkt[6] << 8) | pkt[7]
        if flags & DF:
            drops[C.R_TOO_BIG] += 1  # RFC 1191 §4: report the tunnel MTU
            self._icmp(pkt, False, icmp.ICMP4_UNREACH, icmp.UNREACH_FRAG_NEEDED,
                       peer.mtu & 0xFFFF, now, out)
            return
        if not self.fragment or peer.mtu < 68:
            drops[C.R_TOO_BIG] += 1
            return
        self.counters.events[C.E_FRAGMENTED] += 1  # RFC 4459 §3: fragment the inner packet
        for frag in fragment_v4(memoryview(pkt)[:n], peer.mtu):
            self._send(peer, frag, False, now, out)

    # ---------------------------------------------------------------- peers -> TUN

    def from_udp(self, datagrams: Iterable[tuple[Buf | GroBatch, Addr]], now: float,
                 out: Output) -> None:
        """Decapsulate datagrams; inner packets go to out.tun. Never raises for bad input.

        Inner packets are copied out of the datagram, so the I/O layer may reuse its
        receive buffers as soon as this returns. With a terminator, the packets the
        sequence policy delivers (and the GRO path's TunFrames) are handed to it in one
        call (`Terminator.from_peer`), which keeps its server legs' and puts the others in
        out.tun in order.
        """
        c = self.counters
        drops = c.drops
        table = self.table
        peers = self.peers
        term = self.terminator
        tun: list[bytes | bytearray] = out.tun if term is None else []
        heard = self.heard
        seq_off = self._seq_off
        leg = term.leg_run if term is not None and term.splices else None
        for payload, addr in self.fast.expand(datagrams, now, tun, self.scrub is None, leg):
            cands = table.by_host(addr[0]) if isinstance(addr, tuple) and addr else ()
            if not cands:
                drops[C.R_UNKNOWN_PEER] += 1
                continue
            peer = peers[cands[0]] if len(cands) == 1 else self._pick(cands, payload)
            n = len(payload)
            if peer.gre:
                status, off, seq = decode_gre(payload, peer.key_in, peer.csum_in)
                if status != -1:
                    if status == KEEPALIVE:
                        heard(peer, now)
                        c.events[C.E_KEEPALIVE_RX] += 1
                    else:
                        drops[status] += 1
                    continue
            else:
                if n == 0:  # IPIP keepalive: an empty datagram
                    heard(peer, now)
                    c.events[C.E_KEEPALIVE_RX] += 1
                    continue
                off = 0
                seq = -1
            tot = packet_length(payload, off)
            if not tot:
                drops[C.R_MALFORMED] += 1
                continue
            # AllowedIPs, TTL 0, loop guard: bridge/peers.py `accept`, in one call
            if payload[off] >> 4 == 4:
                reason = table.accept(peer.index, payload[off + V4_SRC:off + V4_SRC_END],
                                      payload[off + V4_DST:off + V4_DST_END],
                                      payload[off + V4_TTL])
            else:
                reason = table.accept(peer.index, payload[off + V6_SRC:off + V6_SRC_END],
                                      payload[off + V6_DST:off + V6_DST_END],
                                      payload[off + V6_HLIM])
            if reason >= 0:
                drops[reason] += 1
                continue
            if self._covers is not None and uninspectable(payload, off, self._covers):
                drops[C.R_UNINSPECTABLE] += 1  # never forwarded past a rule (prelude.py)
                continue
            pkt: bytes | bytearray
            if self.mss_clamp and syn_candidate(payload, off, tot):
                pkt = bytearray(payload[off : off + tot])
                if clamp_packet(pkt, 0, peer.mtu):
                    c.events[C.E_MSS_CLAMPED] += 1
            else:
                pkt = bytes(payload[off : off + tot])  # a copy: the I/O layer reuses buffers
            if seq_off[peer.index]:
                tun.append(pkt)
            else:
                flushes = peer.seq.flushes
                held = len(peer.seq.held)
                resyncs = peer.seq.resyncs
                reason = peer.seq.receive(seq, pkt, now, tun)
                if reason >= 0:
                    drops[reason] += 1
                    continue
                if len(peer.seq.held) > held:
                    c.events[C.E_REORDER_HELD] += 1
                c.events[C.E_REORDER_FLUSHED] += peer.seq.flushes - flushes
                c.events[C.E_SEQ_RESYNC] += peer.seq.resyncs - resyncs
            heard(peer, now)  # only a datagram that passed every check (issue 12)
            c.rx_packets[peer.index] += 1
            c.rx_bytes[peer.index] += n
        if term is not None:  # server legs of terminated flows take theirs, in one call
            term.from_peer(tun, now, out)
        if self.secure is not None:
            self.secure.seal_output(out, now)

    def from_secure(self, datagrams: Iterable[tuple[Buf | GroBatch, Addr]], now: float,
                    out: Output) -> None:
        """Datagrams from the secure port: opened by bridge/securelink.py, then `from_udp`'s
        path; without secure peers each is "unknown_peer"."""
        if self.secure is not None:
            self.secure.receive(datagrams, now, out)
        else:
            self.counters.drops[C.R_UNKNOWN_PEER] += sum(1 for _ in datagrams)

    def _pick(self, cands: tuple[int, ...], payload: Buf) -> PeerState:
        """Several peers share the source host: the GRE key tells them apart (RFC 2890 §2.1)."""
        key: int | None = None
        if len(payload) >= 4 and payload[0] & 0x20:
            koff = 8 if payload[0] & 0x80 else 4
            if len(payload) >= koff + 4:
                key = int.from_bytes(payload[koff : koff + 4], "big")
        for i in cands:
            if self.peers[i].gre and self.peers[i].key_in == key:
                return self.peers[i]
        return self.peers[cands[0]]

    def note_heard(self, index: int, when: float) -> None:
        """Peer `index` was heard at `when` by another process (bridge/io/split.py: the
        receiving direction's); a later time than ours counts as hearing it then."""
        peer = self.peers[index]
        if when > peer.last_rx:
            self.heard(peer, when)

    def heard(self, peer: PeerState, now: float) -> None:
        """Liveness: `peer` was heard at `now` (a keepalive passed its GRE/IPIP checks, or an
        inner packet passed every check: module docstring)."""
        peer.last_rx = now
        peer.heard = True
        if not peer.up:
            peer.up = True
            self.counters.events[C.E_PEER_UP] += 1

    # ---------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        """The next deadline (keepalive, liveness, reorder flush), or None."""
        best: float | None = None
        if self.rx_only:  # the receiving process of a split endpoint: reorder flushes only
            for p in self.peers:
                t = p.seq.deadline()
                if t is not None and (best is None or t < best):
                    best = t
            return best
        for p in self.peers:
            for t in (
                p.last_tx + p.keepalive if p.keepalive > 0 else None,
                p.last_rx + p.dead_after if p.up and p.dead_after > 0 else None,
                p.seq.deadline(),
            ):
                if t is not None and (best is None or t < best):
                    best = t
        if self.terminator is not None:
            t = self.terminator.get_timer()
            if t is not None and (best is None or t < best):
                best = t
        if self.secure is not None:
            best = self.secure.earliest(best)
        return best

    def handle_timer(self, now: float, out: Output) -> None:
        """Run everything due at `now`: reorder flushes to out.tun, keepalives to out.udp,
        peers going down. Safe to call early or often."""
        ev = self.counters.events
        term = self.terminator
        tun: list[bytes | bytearray] = out.tun if term is None else []
        for p in self.peers:
            if p.reorder:
                released = p.seq.expire(now, tun)
                if released:
                    ev[C.E_REORDER_FLUSHED] += 1
            if self.rx_only:
                continue  # keepalives and liveness are the sending process's
            if p.keepalive > 0 and now >= p.last_tx + p.keepalive:
                emit(out, self.counters, p, p.keepalive_payload, 1, now)
                ev[C.E_KEEPALIVE_TX] += 1
            if p.up and p.dead_after > 0 and now >= p.last_rx + p.dead_after:
                p.up = False
                ev[C.E_PEER_DOWN] += 1
        if term is not None:  # reorder flushes reach the terminator like from_udp's packets
            term.from_peer(tun, now, out)
            term.handle_timer(now, out)
        if self.secure is not None:  # handshake retries, rekeys; seals the keepalives
            self.secure.handle_timer(now, out)

    # ---------------------------------------------------------------- status

    def status(self, now: float) -> dict[str, Any]:
        """JSON-able status for `grebe status`: TUN, peers, counters."""
        snap = self.counters.snapshot()
        peers = []
        for p, cfg in zip(self.peers, self.config.peers, strict=True):
            peers.append({
                "name": p.name,
                "endpoint": f"[{p.addr[0]}]:{p.addr[1]}" if ":" in p.addr[0]
                else f"{p.addr[0]}:{p.addr[1]}",
                **({"hostname": cfg.hostname} if cfg.hostname else {}),  # as configured
                "encapsulation": cfg.encapsulation.value,
                "prefixes": [str(n) for n in cfg.prefixes],
                "up": p.up and p.heard,   # never heard: not up, whatever the liveness timer
                # "waiting": not heard yet, dead_after not yet passed (traffic still sent)
                "state": "down" if not p.up else "up" if p.heard else "waiting",
                "last_seen_s": round(now - p.last_rx, 3) if p.heard else None,
                "mtu": p.mtu,
                "sequence": {"policy": cfg.sequence.value, "held": len(p.seq.held),
                             "flushes": p.seq.flushes, "resyncs": p.seq.resyncs,
                             "next_tx": p.encoder.seq},
                **snap["peers"][p.name],
            })
        st = {
            "tun": {"name": self.config.tun.name, "mtu": self.tun_mtu},
            "tun_mtu": self.tun_mtu,
            "underlay_mtu": self.underlay_mtu,
            "mss_clamp": self.mss_clamp,
            "uptime_s": round(now - self.started, 3),
            "peers": peers,
            "drops": snap["drops"],
            "events": snap["events"],
            **({"inspect": self.terminator.status()} if self.terminator is not None else {}),
        }
        if self.secure is not None:
            self.secure.status(st, now)
        if self.scrub is not None:
            st["scrub"] = self.scrub.status()
        return st

    def bind_scrub(self, config: Config, now: float) -> None:
        """(Re)build what follows from the peer list and the [[scrub]] rules: the Scrubber
        (issue 12, bridge/scrub.py; None without rules: one branch per batch), each peer's
        inbound filter and the per-peer flag "no sequence policy and no inbound rules, so a
        packet goes to the TUN at once". At start and after a reload (bridge/reconfig.py);
        the peers' sequence state is carried over (bridge/seqpolicy.py `filtered`)."""
        scrub = self.scrub = Scrubber(config.scrub, [p.name for p in config.peers], now,
                                      self.counters.drops) if config.scrub else None
        for ps in self.peers:
            ps.seq = filtered(ps.seq, partial(scrub.passes_in, ps.index) if scrub else None)
        self._seq_off = [ps.seq.policy is SeqPolicy.OFF and scrub is None for ps in self.peers]

    def bind_covers(self, config: Config) -> None:
        """(Re)build, from `config`'s [[inspect]] rules, the test "an [[inspect]] rule covers
        this address" (issue 9), for packets whose IPv6 header chain cannot be walked
        (stack/wire/prelude.py `uninspectable`); None without rules. At start and after a
        reload that changed the rules (bridge/reconfig.py)."""
        self._covers = FlowSelector(config.inspect_rules()).covers if config.inspect else None

    def metrics_text(self) -> str:
        """Prometheus text exposition of the counters plus per-peer up gauges."""
        text = self.counters.prometheus(peer_up=[p.up and p.heard for p in self.peers])
        if self.terminator is not None:  # the userspace backend's (bridge/userspace/bounds.py)
            from bridge.userspace.bounds import prometheus
            text += prometheus(self.terminator.status())
        if self.scrub is not None:
            text += self.scrub.prometheus()
        return text + self.secure.prometheus() if self.secure is not None else text

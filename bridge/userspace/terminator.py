"""Terminator: the userspace termination backend of one endpoint (its Splices, keyed by 4-tuple).

Rules of this module (pure, sans-I/O: inner IP packets and `now` in, packets and deadlines out)
- Which flows: the first SYN of a TCP flow from the local site (read from the TUN) is classified
  once by a `FlowTable` over `selector_for(rules, Backend.USERSPACE)` (bridge/flows.py): only
  INSPECT with backend "userspace" creates a Splice; DROP rules answer the SYN with an RST,
  as a closed port would (counted); every
  other packet, and every non-SYN packet of an unknown flow, is not ours (`from_tun` returns
  False) and stays on the Bridge's fast path untouched. Flows that start on the far site (their
  SYN arrives from the tunnel) are never terminated here.
- The client leg's segments are written to `out.tun` inside an IPv4 (RFC 791 §3.1, DF set, TTL
  64) or IPv6 (RFC 8200 §3, hop limit 64) header from the server's address to the client's; the
  server leg's go to `send_to_peer` (the Bridge's own encapsulation, `Bridge.send_inner`) from
  the client's address to the server's.
- With `use_tun_offload()` (the adapter's word that the TUN was opened with IFF_VNET_HDR and
  TUN_F_CSUM|TSO4|TSO6) the client leg's segments go to `out.tun` as `TunFrame`s (virtio 1.x
  §5.1.6 header + packet): the TCP checksum is left to the kernel (NEEDS_CSUM, csum_start at
  the TCP header, csum_offset 16, the field holding the pseudo-header sum, RFC 9293 §3.1), and
  the leg sends super-segments of up to ~64 KB that the kernel cuts into MSS-sized ones
  (gso_type TCPV4/TCPV6, gso_size = the leg's send MSS; IPv4 identification advanced by the
  segment count, as Linux TSO numbers them, RFC 6864 §4.1). The server leg's packets cross
  the tunnel and always carry complete checksums.
- MSS (RFC 9293 §3.7.1 MUST-14/16): the server leg advertises and sends at most the tunnel MTU
  toward that server less 40 (IPv4) or 60 (IPv6) bytes; the client leg the TUN MTU less the
  same. `tx_max_segment` asks the client leg for larger output segments when the TUN takes TSO
  super-packets (0: one MSS per segment; the TUN adapter coalesces them, GRO-style).
- Memory per flow: the rule's `max_buffer` split over the four leg buffers (splice.py).
  `max_splices` bounds the number of flows: a SYN beyond it is answered with a RST (counted).
- A packet for a terminated 4-tuple whose splice is gone and that is not a SYN gets the RST of
  a closed connection (RFC 9293 §3.10.7.1); an RST is never answered.
- ICMP errors from the tunnel (RFC 792 type 3/4/11/12, RFC 4443 type 1-4) addressed to a
  client of a live splice and quoting one of its server leg's TCP segments go to that leg
  (`Splice.server_icmp`), and so does our own "no route" for a server leg's packet
  (Destination Unreachable code 0, RFC 1812 §5.2.7.1, RFC 4443 §3.1): a connection attempt
  that cannot succeed ends with the RST to the client at once (bridge/userspace/splice.py), counted
  in `drops` ("icmp_to_server_leg", "no_peer"). While the splice connects, the error also
  goes on to the client, before that RST: it quotes the client's own SYN (same 4-tuple and
  ISN), so the client's stack reports the real cause (RFC 1122 §4.2.3.9); once the client
  leg exists, the client's connection is with it and the error stays with the server leg.
- Reaping: a splice whose legs are both CLOSED is forgotten; one idle for `idle_timeout` is
  aborted (CloseReason.IDLE). TIME-WAIT uses `msl` (default 15 s, not the 2 minutes of RFC
  9293 §3.6.1: the splice is a middlebox whose legs both see the real endpoints' TIME-WAIT).
- RTO as Linux computes it: SRTT + max(4*RTTVAR, `rto_min`), `rto_min` 0.2 s (TCP_RTO_MIN),
  instead of RFC 6298 §2.4's 1 s floor on the sum: both legs face real stacks a few ms away,
  a 1 s floor turns every tail loss into a stall, and a 0.2 s floor on the sum races the
  peers' 200 ms delayed ACKs (stack/loss.py).
- Nagle off on both legs (TCP_NODELAY, RFC 9293 §3.7.4 MUST-17 lets the application disable
  it): each leg sends as soon as the other side's bytes arrive, so the splice adds no Nagle
  wait behind a peer's delayed ACK; whoever sent the bytes already chose how to segment them.
- Malformed packets (bad lengths, checksums) are dropped and counted in `drops`; nothing a peer
  sends raises. An exception from a splice (a bug of ours) resets that flow only, counted as
  "internal_error" and recorded in the flow's metadata, so one broken flow cannot make every
  batch of the endpoint fail. Inspector output is flushed by the adapter
  (`flush_inspectors`), off this path.

Theory of operation
`from_tun(pkt, n, now)` routes one inner packet from the local site to its splice's client leg
and marks the splice touched; `flush(now, out)` (end of each batch) steps every touched splice
once (so a batch's data crosses the inspector chain as one chunk and its ACKs aggregate) and
emits both legs' segments. `from_peer(pkts, now, out)` is the one entry from the tunnel: the
Bridge hands it the decapsulated packets its sequence policy delivered (a batch's, or the
reorder buffers' flushed by the timer) before any reach the TUN; the server legs take theirs,
every other packet goes on to `out.tun` in order, then it flushes. Consecutive in-order data
segments of one server leg, and a `TunFrame` the Bridge's GRO path merged (and checked), reach
the leg as one segment (bridge/userspace/legwire.py merge_run: every checksum still checked, by
one sum over the run), and `from_tun_super(sp, now)` gives a client's TSO frame to its leg whole
(the kernel built it; nothing is summed). The legs' IP framing (plain packets, TunFrames) is
bridge/userspace/legwire.py. Timers: each splice's deadline is recorded when it is emitted
(every change to a splice ends in `flush`); `get_timer()` is the minimum of those and of the
next reap scan; `handle_timer(now, out)` runs the due ones. `warm(now, lane)` is the keep-warm
hook: one hop of a throw-away connection through a private shadow (bridge/userspace/warm.py),
never this Terminator's own state.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from bridge.flows import Backend, FlowKey, FlowTable, InspectRule, Verdict, selector_for
from bridge.inspect.api import CloseReason
from bridge.inspect.manager import InspectorManager
from bridge.tunframe import TunFrame
from bridge.userspace import legwire
from bridge.userspace.legwire import TSO_MAX_SEGMENT, LegFramer, merge_run, run_part
from bridge.userspace.splice import Splice
from bridge.userspace.warm import WarmCycle
from stack.connection import reset_reply
from stack.events import IcmpKind
from stack.tcp_config import TcpConfig
from stack.wire.icmp import parse_icmp_error
from stack.wire.ip import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, V4_PROTO, V6_NXT
from stack.wire.prelude import V4_DST_AT, V4_SRC_AT, V6_DST_AT, V6_SRC_AT, tcp_key
from stack.wire.tcp import ACK, RST, SYN, TcpSegment, parse_tcp
from stack.wire.vnet import F_DATA_VALID, F_NEEDS_CSUM, GSO_SIZE_AT, VNET_HDR_LEN

__all__ = ["Terminator", "SendToPeer", "TSO_MAX_SEGMENT"]

_QUOTE = struct.Struct("!HHI")  # the quoted TCP header's ports and sequence number

SendToPeer = Callable[[bytes, float, Any], bool]  # (inner packet, now, out) -> sent
_ICMP_KINDS = {  # (IP version, ICMP type) -> what it says (RFC 792, RFC 4443 §2.1)
    (4, 3): IcmpKind.UNREACHABLE, (4, 4): IcmpKind.SOURCE_QUENCH, (4, 11): IcmpKind.TIME_EXCEEDED,
    (4, 12): IcmpKind.PARAMETER_PROBLEM, (6, 1): IcmpKind.UNREACHABLE,
    (6, 2): IcmpKind.PACKET_TOO_BIG, (6, 3): IcmpKind.TIME_EXCEEDED,
    (6, 4): IcmpKind.PARAMETER_PROBLEM}
WARM_WINDOW = 1.0  # warm() works while a splice is live or for this long after one opened
def _has_userspace(rules: Iterable[InspectRule]) -> bool:
    return any(r.backend is Backend.USERSPACE and r.action is not Verdict.FORWARD for r in rules)


class Terminator:
    """All userspace-terminated flows of one endpoint."""

    def __init__(self, rules: tuple[InspectRule, ...], send_to_peer: SendToPeer,
                 mtu_for: Callable[[bytes], int], tun_mtu: Callable[[], int], *,
                 manager: InspectorManager | None = None, tx_max_segment: int = 0,
                 idle_timeout: float = 300.0, msl: float = 15.0, max_splices: int = 10_000,
                 syn_retries: int = 5, rto_min: float = 0.2) -> None:
        self.rules = rules
        self.table = FlowTable(selector_for(rules, Backend.USERSPACE), idle_timeout=idle_timeout)
        self.manager = manager if manager is not None else InspectorManager(rules)
        self.send_to_peer = send_to_peer
        self.mtu_for = mtu_for
        self.tun_mtu = tun_mtu
        self.tx_max_segment = tx_max_segment
        self.idle_timeout = idle_timeout
        self.msl = msl
        self.max_splices = max_splices
        self.syn_retries = syn_retries
        self.rto_min = rto_min
        self.splices: dict[FlowKey, Splice] = {}
        self.touched: dict[FlowKey, Splice] = {}
        self.drops: dict[str, int] = {}
        self.counters: dict[str, int] = {"splices": 0, "to_client": 0, "to_server": 0,
                                         "from_client": 0, "from_server": 0, "refused_rst": 0,
                                         "server_runs": 0, "checksum_completed": 0}
        self.ended: dict[str, int] = {}
        framer = LegFramer()
        self.packet = framer.packet  # IP framing of the legs' segments (legwire.py)
        self._frame = framer.frame
        self._pending_rst: list[tuple[FlowKey, TcpSegment]] = []
        self._clients: dict[bytes, int] = {}  # client address -> live splices (from_peer filter)
        self._deadlines: dict[FlowKey, float] = {}  # each splice's timer, as of its last emit
        self._next_scan: float | None = None
        self._configs: dict[tuple[int, int, int, int], tuple[TcpConfig, TcpConfig]] = {}
        self.tun_offload = False
        self._warm: dict[int, WarmCycle] = {}  # lane -> shadow (bridge/userspace/warm.py)
        self._last_new = float("-inf")  # when the last splice was opened (warm)

    def use_tun_offload(self, on: bool = True) -> None:
        """The TUN takes vnet-header writes with checksum and TSO offload (the I/O adapter
        calls this): client-leg segments become `TunFrame`s, up to TSO_MAX_SEGMENT long.
        Splices that exist keep their configuration."""
        self.tun_offload = on
        self.tx_max_segment = TSO_MAX_SEGMENT if on else 0

    @classmethod
    def for_bridge(cls, bridge: Any, now: float) -> Terminator | None:
        """A Terminator wired to a Bridge, or None when no rule uses the userspace backend."""
        rules = bridge.config.inspect_rules()
        if not rules or not _has_userspace(rules):
            return None

        def mtu_for(dst: bytes) -> int:
            idx = bridge.table.route(dst)
            return int(bridge.peers[idx].mtu) if idx >= 0 else int(bridge.tun_mtu)

        return cls(tuple(rules), bridge.send_inner, mtu_for, lambda: int(bridge.tun_mtu))

    # ------------------------------------------------------------------ input

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _segment(self, pkt: bytes | bytearray | memoryview, n: int, off: int,
                 key: FlowKey) -> TcpSegment | None:
        mv = pkt if isinstance(pkt, memoryview) else memoryview(pkt)
        if (seg := parse_tcp(mv[off:n], key[1], key[2])) is None:  # left partial? else counted
            fixed = legwire.completed_partial(mv[off:n], key[1], key[2])
            self.counters["checksum_completed"] += fixed is not None
            seg = parse_tcp(fixed or mv[off:n], key[1], key[2], drops=self.drops,
                            verify_checksum=fixed is None)  # completed: right by making
        return seg

    def from_tun(self, pkt: bytes | bytearray | memoryview, n: int, now: float) -> bool:
        """An inner packet from the local site. True when it was ours (consumed)."""
        k = tcp_key(pkt, n)
        if k is None:
            return False
        key, off, flags = k
        sp = self.splices.get(key)
        if sp is not None:
            seg = self._segment(pkt, n, off, key)
            if seg is None:
                return True
            if sp.finished and flags & (SYN | ACK | RST) == SYN and seg.seq != sp.syn.seq:
                # a new connection on the 4-tuple of an ended one whose legs linger in
                # TIME-WAIT (RFC 9293 §3.6.1 MAY-2, RFC 6191): the old splice gives way
                self.forget(sp)
            else:
                self.counters["from_client"] += 1
                sp.from_client(seg, now)
                self.touched[key] = sp
                return True
        verdict = self.table.classify(key, flags, now)
        if verdict is Verdict.FORWARD:
            return False
        seg = self._segment(pkt, n, off, key)
        if seg is None:
            return True
        if verdict is Verdict.DROP:  # answered like a closed port (RFC 9293 §3.10.7.1)
            self._drop("rule_drop")
            rst = reset_reply(seg)
            if rst is not None:
                self._pending_rst.append((key, rst))
            return True
        if flags & (SYN | ACK | RST) != SYN:
            self._stray(key, seg)  # a terminated flow whose splice is gone
            return True
        self._new_splice(key, seg, now)
        return True

    def from_tun_super(self, sp: Any, now: float) -> bool:
        """A TCP TSO frame from the TUN (bridge/gso.py SuperPacket: `frame`, `offset`, the
        packet after the vnet header) of a live splice's client: the leg takes its whole
        payload as one segment (the stack accepts segments above the MSS) and True is
        returned. The kernel built it (NEEDS_CSUM: the checksum field holds only the
        pseudo-header sum; or DATA_VALID), so no byte is summed. False, having done
        nothing, for anything else: the caller splits it and takes the per-packet path."""
        frame = sp.frame
        if not frame[0] & (F_NEEDS_CSUM | F_DATA_VALID):
            return False
        pkt = memoryview(frame)[sp.offset:]
        n = len(pkt)
        k = tcp_key(pkt, n)
        if k is None:
            return False
        key, off, flags = k
        splice = self.splices.get(key)
        if splice is None or flags & (SYN | RST):
            return False
        seg = parse_tcp(pkt[off:n], key[1], key[2], drops=self.drops, verify_checksum=False)
        if seg is None:
            return True
        g = sp.gso_size
        self.counters["from_client"] += -(-len(seg.payload) // g) if g > 0 else 1
        splice.from_client(seg, now)
        self.touched[key] = splice
        return True

    def _stray(self, key: FlowKey, seg: TcpSegment) -> None:
        self._drop("no_splice")
        rst = reset_reply(seg)  # RFC 9293 §3.10.7.1
        if rst is not None:
            self._pending_rst.append((key, rst))

    def configs_for(self, key: FlowKey, rule: InspectRule | None) -> tuple[TcpConfig, TcpConfig]:
        """(client leg, server leg) TCP settings of a new splice on `key` under `rule`
        (MSS from the tunnel and TUN MTUs, buffers from the rule), cached per shape."""
        v6 = key[0] == 6
        hdr = 60 if v6 else 40
        server_mss = max(self.mtu_for(key[2]) - hdr, 88)
        client_mss = max(self.tun_mtu() - hdr, 88)
        buf = (rule.max_buffer if rule is not None else 1 << 20) // 4
        ck = (server_mss, client_mss, buf, self.tx_max_segment)
        cached = self._configs.get(ck)
        if cached is None:
            rbuf = max(buf, server_mss, client_mss)
            common: dict[str, Any] = dict(recv_buffer=rbuf, send_buffer=max(buf, 1),
                                          auto_consume=False, msl=self.msl,
                                          rto_min=self.rto_min, rto_var_min=self.rto_min,
                                          nagle=False)
            cached = (TcpConfig(mss=client_mss, tx_max_segment=self.tx_max_segment, **common),
                      TcpConfig(mss=server_mss, syn_retries=self.syn_retries, **common))
            self._configs[ck] = cached
        return cached

    def _new_splice(self, key: FlowKey, syn: TcpSegment, now: float) -> None:
        if len(self.splices) >= self.max_splices:
            self._drop("too_many_splices")
            rst = reset_reply(syn)
            if rst is not None:
                self._pending_rst.append((key, rst))
            return
        found = self.table.lookup(key)
        rule = found[1] if found is not None else None
        chain = self.manager.chains.get(rule.name) if rule is not None else None
        ccfg, scfg = self.configs_for(key, rule)
        sp = Splice(key, syn, rule, chain, ccfg, scfg, now)
        self.counters["splices"] += 1
        self._last_new = now
        sp.open(now)
        self.splices[key] = sp
        self._clients[key[1]] = self._clients.get(key[1], 0) + 1
        if self._next_scan is None:
            self._next_scan = now + 1.0
        self.touched[key] = sp

    def _server_side(self, pkt: bytes | bytearray | memoryview, n: int
                     ) -> tuple[Splice, FlowKey, FlowKey, int, int] | None:
        """(splice, its key, the packet's key, TCP offset, flags) of a server leg's packet."""
        if n < 40 or bytes(pkt[V4_DST_AT] if pkt[0] >> 4 == 4 else pkt[V6_DST_AT]) \
                not in self._clients:
            return None  # not addressed to a client of a live splice: the fast path
        k = tcp_key(pkt, n)
        if k is None:
            return None
        key, off, flags = k
        ck = (key[0], key[2], key[1], key[4], key[3])
        sp = self.splices.get(ck)
        if sp is None:
            return None
        return sp, ck, key, off, flags

    def from_peer(self, pkts: Sequence[bytes | bytearray], now: float, out: Any) -> None:
        """The decapsulated packets from the tunnel, in the order the Bridge's sequence
        policy delivered them (TunFrames of its GRO path among them): the server legs take
        theirs and the ICMP errors about their segments; every other packet is appended to
        `out.tun`, in order. Then the touched splices are stepped (`flush`).

        Consecutive in-order data segments of one server leg (a GRO batch of the tunnel)
        reach the leg as one segment (`_server_run`)."""
        tun = out.tun
        if not self.splices:
            tun.extend(pkts)
        elif pkts:
            run: list[bytes | bytearray] = []
            run_sp: Splice | None = None
            run_tmpl = b""
            run_next = 0
            run_off = 0
            for pkt in pkts:
                if type(pkt) is TunFrame:  # a run the Bridge merged and checked (bridge/gso.py)
                    if not self._server_frame(pkt, now):
                        tun.append(pkt)
                    continue
                n = len(pkt)
                found = self._server_side(pkt, n)
                if found is None:
                    if not self._leg_icmp(pkt, n, now):
                        tun.append(pkt)  # another flow's: order against ours does not matter
                    continue
                sp, ck, key, off, flags = found
                r = run_part(pkt, n, off, flags)
                if r is not None:
                    seq, pl, tmpl = r
                    if run and run_sp is sp and seq == run_next and tmpl == run_tmpl and \
                            off == run_off:
                        run.append(pkt)
                        run_next = (seq + pl) & 0xFFFFFFFF
                        if pl & 1:  # only a run's last payload may be odd (word alignment)
                            self._server_run(run, run_sp, off, now)
                            run = []
                        continue
                    if run:
                        self._server_run(run, run_sp, run_off, now)
                    run = [pkt]
                    run_sp, run_tmpl, run_off = sp, tmpl, off
                    run_next = (seq + pl) & 0xFFFFFFFF
                    if pl & 1:
                        self._server_run(run, run_sp, off, now)
                        run = []
                    continue
                if run:
                    self._server_run(run, run_sp, run_off, now)
                    run = []
                seg = self._segment(pkt, n, off, key)
                if seg is not None:
                    self.counters["from_server"] += 1
                    sp.from_server(seg, now)
                    self.touched[ck] = sp
            if run:
                self._server_run(run, run_sp, run_off, now)
        if self.touched or self._pending_rst:
            self.flush(now, out)

    def _leg_icmp(self, pkt: bytes | bytearray, n: int, now: float) -> bool:
        """An ICMP error about a server leg's segment: hand it to the leg; True when it
        is consumed (not passed on to the client)."""
        if n < 28:
            return False  # not even an IPv4 header and 8 bytes: nothing to look at
        v6 = pkt[0] >> 4 == 6
        if v6:
            if n < 48 or pkt[V6_NXT] != PROTO_ICMPV6:
                return False  # not ICMPv6 (RFC 4443): the common case
        elif n < 28 or pkt[V4_PROTO] != PROTO_ICMP:
            return False  # not ICMP (RFC 792)
        if bytes(pkt[V6_DST_AT] if v6 else pkt[V4_DST_AT]) not in self._clients:
            return False
        err = parse_icmp_error(memoryview(pkt)[:n])
        if err is None:
            return False
        q = err.quoted
        off = 40 if v6 else (q[0] & 0x0F) * 4 if q else 0
        if len(q) < off + 8 or q[0] >> 4 != err.version or \
                q[V6_NXT if v6 else V4_PROTO] != PROTO_TCP:
            return False  # RFC 792: the quote holds the IP header and 8 bytes of TCP
        src, dst = (q[V6_SRC_AT], q[V6_DST_AT]) if v6 else (q[V4_SRC_AT], q[V4_DST_AT])
        sport, dport, seq = _QUOTE.unpack_from(q, off)
        sp = self.splices.get((err.version, bytes(src), bytes(dst), sport, dport))
        kind = _ICMP_KINDS.get((err.version, err.type))
        if sp is None or kind is None or bytes(src) != err.dst:
            return False
        mtu = err.info & 0xFFFF if not v6 else err.info
        self._drop("icmp_to_server_leg")
        connecting = sp.client is None
        sp.server_icmp(kind, err.code, mtu or None, seq, now)
        self.touched[sp.key] = sp
        return not connecting  # connecting: the client gets it too (module docstring)

    def _server_frame(self, frame: TunFrame, now: float) -> bool:
        """A `TunFrame` from the Bridge's receive fast path (bridge/gro.py coalesce_rows:
        one contiguous TCP run, every segment's checksum checked there, the merged packet's
        checksum field holding the pseudo-header sum, NEEDS_CSUM). When it is a server leg's,
        the leg takes it as one segment (no second checksum pass) and True is returned."""
        mv = memoryview(frame)[VNET_HDR_LEN:]
        n = len(mv)
        if frame[0] != F_NEEDS_CSUM:
            return False
        found = self._server_side(mv, n)
        if found is None:
            return False
        sp, ck, key, off, _flags = found
        seg = parse_tcp(mv[off:n], key[1], key[2], drops=self.drops, verify_checksum=False)
        if seg is not None:
            gso_size = frame[GSO_SIZE_AT] | frame[GSO_SIZE_AT + 1] << 8  # little-endian
            k = -(-len(seg.payload) // gso_size) if gso_size else 1
            self.counters["from_server"] += k
            self.counters["server_runs"] += 1
            sp.from_server(seg, now)
            self.touched[ck] = sp
        return True

    def _server_run(self, run: list[bytes | bytearray], sp: Splice | None, off: int,
                    now: float) -> None:
        """Hand a run of contiguous data segments of one server leg to it as one segment
        (bridge/userspace/legwire.py merge_run checks every checksum); packet by packet when the run
        is one packet or does not merge (each then checked on its own, a bad one dropped)."""
        assert sp is not None
        key = sp.key
        seg = merge_run(run, off, key[2], key[1]) if len(run) > 1 else None
        if seg is None:
            skey = (key[0], key[2], key[1], key[4], key[3])
            for pkt in run:
                s1 = self._segment(pkt, len(pkt), off, skey)
                if s1 is not None:
                    self.counters["from_server"] += 1
                    sp.from_server(s1, now)
        else:
            self.counters["from_server"] += len(run)
            self.counters["server_runs"] += 1
            sp.from_server(seg, now)
        self.touched[key] = sp

    # ------------------------------------------------------------------ output

    def flush(self, now: float, out: Any) -> None:
        """Step every touched splice once and emit both legs' segments."""
        for key, rst in self._pending_rst:
            out.tun.append(self.packet(key[2], key[1], rst))
            self.counters["refused_rst"] += 1
        self._pending_rst.clear()
        touched = self.touched
        if not touched:
            return
        self.touched = {}
        for sp in touched.values():
            try:
                sp.step(now)
                self._emit(sp, now, out)
            except Exception as exc:  # noqa: BLE001 - a bug of ours costs this flow only
                self._drop("internal_error")
                sp.fail(exc, now)
                try:
                    self._emit(sp, now, out)     # the RSTs of the aborted legs
                except Exception:  # noqa: BLE001
                    self.forget(sp)

    def _emit(self, sp: Splice, now: float, out: Any) -> None:
        key = sp.key
        _v, caddr, saddr = key[0], key[1], key[2]
        segs = sp.to_client(now)
        if segs:
            tun = out.tun
            if self.tun_offload:
                client = sp.client
                mss = client.send_mss if client is not None else 0xFFFF
                for seg in segs:
                    tun.append(self._frame(saddr, caddr, seg, mss))
            else:
                for seg in segs:
                    tun.append(self.packet(saddr, caddr, seg))
            self.counters["to_client"] += len(segs)
        segs = sp.to_server(now)
        if segs:
            send = self.send_to_peer
            lost = False
            for seg in segs:
                if not send(self.packet(caddr, saddr, seg), now, out):
                    self._drop("no_peer")
                    lost = True
            self.counters["to_server"] += len(segs)
            if lost and not sp.finished:  # our own Destination Unreachable, code 0
                sp.server_icmp(IcmpKind.UNREACHABLE, 0, None, None, now)
                sp.step(now)
                if sp.finished:
                    self._emit(sp, now, out)  # the RST to the client
                    return
        if sp.dead:
            self.forget(sp)
            return
        t = sp.get_timer()  # every change to a splice's timers ends here (flush)
        if t is None:
            self._deadlines.pop(key, None)
        else:
            self._deadlines[key] = t

    def forget(self, sp: Splice) -> None:
        """Drop `sp` from every table (its legs are done, or it gives way to a new SYN)."""
        if self.splices.get(sp.key) is sp:
            del self.splices[sp.key]
            self._deadlines.pop(sp.key, None)
            left = self._clients.pop(sp.key[1], 1) - 1
            if left:
                self._clients[sp.key[1]] = left
            self.touched.pop(sp.key, None)
            reason = sp.flow.close_reason.value if sp.flow.close_reason else "closed"
            self.ended[reason] = self.ended.get(reason, 0) + 1

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The earliest deadline of any splice, or of the next idle scan; None when idle."""
        if not self.splices:
            return None
        best = min(self._deadlines.values(), default=None)
        scan = self._next_scan
        return scan if best is None or (scan is not None and scan < best) else best

    def handle_timer(self, now: float, out: Any) -> None:
        """Run expired splice timers, reap dead and idle splices, emit what they produced."""
        due = [k for k, t in self._deadlines.items() if t <= now]
        for key in due:
            sp = self.splices[key]
            sp.handle_timer(now)
            self.touched[key] = sp
        if self._next_scan is None or now >= self._next_scan:
            self._next_scan = now + 1.0
            limit = now - self.idle_timeout
            for sp in list(self.splices.values()):
                if not sp.finished and sp.last_seen < limit:
                    sp.abort(CloseReason.IDLE, now)
                    self.touched[sp.key] = sp
                elif sp.dead:
                    self.forget(sp)
            self.table.expire(now)
        self.flush(now, out)

    def shutdown(self, now: float, out: Any) -> None:
        """grebe stops: RST every flow (CloseReason.SHUTDOWN), emit, close the inspectors."""
        for sp in list(self.splices.values()):
            if not sp.finished:
                sp.abort(CloseReason.SHUTDOWN, now)
            self.touched[sp.key] = sp
        self.flush(now, out)
        self.manager.close()

    def flush_inspectors(self) -> None:
        """Write what the inspectors buffered (log lines, pcap); the adapter calls it on a
        timer, off the data path."""
        self.manager.flush()

    # ------------------------------------------------------------------ introspection

    def warm(self, now: float, lane: int = 0) -> None:
        """Keep-warm hook (bridge/io/warm.py): one hop of a throw-away connection through a
        private shadow of this Terminator (bridge/userspace/warm.py), so that the next real
        new connection finds this code in the CPU caches. A no-op unless a splice is live or
        one was opened in the last WARM_WINDOW seconds. Touches no real splice, counter,
        timer or inspector; each `lane` (one per calling thread) has its own shadow."""
        if not self.splices and now - self._last_new > WARM_WINDOW:
            return
        w = self._warm.get(lane)
        if w is None:
            w = self._warm[lane] = WarmCycle(self)
        w.step(now)

    def flows(self, now: float) -> list[dict[str, Any]]:
        """One JSON-able record per live splice, for `grebe flows`."""
        return [sp.info(now) for sp in self.splices.values()]

    def status(self) -> dict[str, Any]:
        """Counters of the backend, the flow table and the inspector chains."""
        return {"live": len(self.splices), "counters": dict(self.counters),
                "ended": dict(self.ended), "drops": dict(self.drops),
                "flow_table": dict(self.table.counters), "rules": self.manager.counters()}



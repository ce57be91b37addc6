"""Terminator: the userspace termination backend of one endpoint (its Splices, keyed by 4-tuple).

Rules of this module (pure, sans-I/O: inner IP packets and `now` in, packets and deadlines out)
- Which flows: the first SYN of a TCP flow from the local site (read from the TUN) is classified
  once by a `FlowTable` over `selector_for(rules, Backend.USERSPACE)` (bridge/flows.py): only
  INSPECT with backend "userspace" creates a Splice; DROP rules answer the SYN with an RST,
  as a closed port would (counted); every other packet, and every non-SYN packet of an unknown
  flow, is not ours (`from_tun` returns False) and stays on the Bridge's fast path untouched.
  Flows that start on the far site (their SYN arrives from the tunnel) are never terminated.
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
  segment count, as Linux TSO numbers them, RFC 6864 §4.1); with `parts`, TunFrameParts (one
  writev, bridge/tunframe.py). The server leg's packets always carry complete checksums.
- MSS (RFC 9293 §3.7.1 MUST-14/16): the server leg advertises and sends at most the tunnel MTU
  toward that server less 40 (IPv4) or 60 (IPv6) bytes; the client leg the TUN MTU less the
  same. `tx_max_segment` asks the client leg for larger output segments when the TUN takes TSO
  super-packets (0: one MSS per segment; the TUN adapter coalesces them, GRO-style).
- Memory per flow: the rule's `max_buffer` per direction (splice.py; `configs_for`).
- Admission (bridge/userspace/bounds.py, the endpoint's `[userspace]` limits): a SYN is
  refused with a RST past `max_splices` live flows (a flow whose legs only linger in
  TIME-WAIT holds no slot); past the half-open caps (in total, and per /24 or /64 source
  prefix) it is answered with a stateless SYN cookie (RFC 4987 §3.6), and a bare ACK that
  returns a valid cookie opens the splice with its client leg ESTABLISHED. A splice is
  half-open until its client leg is ESTABLISHED; by default (accept first, splice.py) the
  server leg only opens then, so no spoofed SYN ever reaches a server.
- Keep-alives (RFC 9293 §3.8.4): both legs probe their peer after 2 h of silence (Linux's
  defaults: 9 probes 75 s apart); a dead peer resets its leg and the other leg with it.
- A packet for a terminated 4-tuple whose splice is gone and that is not a SYN gets the RST of
  a closed connection (RFC 9293 §3.10.7.1); an RST is never answered.
- ICMP errors from the tunnel (RFC 792 type 3/4/11/12, RFC 4443 type 1-4) addressed to a
  client of a live splice and quoting one of its server leg's TCP segments go to that leg
  (`Splice.server_icmp`), and so does our own "no route" for a server leg's packet
  (Destination Unreachable code 0, RFC 1812 §5.2.7.1, RFC 4443 §3.1): a connection attempt
  that cannot succeed ends with the RST to the client at once (splice.py), counted in `drops`
  ("icmp_to_server_leg", "no_peer"). While the splice connects, the error also goes on to the
  client, before that RST: it quotes the client's own SYN (same 4-tuple and ISN), so the
  client's stack reports the real cause (RFC 1122 §4.2.3.9); once the client leg exists, the
  client's connection is with it and the error stays with the server leg.
- Reaping: a splice whose legs are both CLOSED is forgotten; one idle for its rule's
  `idle_timeout` is aborted (CloseReason.IDLE, counted `idle_aborts`). TIME-WAIT uses `msl`
  (default 15 s, not RFC 9293 §3.6.1's 2 minutes: both legs see the endpoints' TIME-WAIT).
- RTO as Linux computes it: SRTT + max(4*RTTVAR, `rto_min`), `rto_min` 0.2 s (TCP_RTO_MIN),
  instead of RFC 6298 §2.4's 1 s floor on the sum: both legs face real stacks a few ms away,
  a 1 s floor turns every tail loss into a stall, and a 0.2 s floor on the sum races the
  peers' 200 ms delayed ACKs (stack/loss.py).
- ECN (RFC 3168 §6.1.1) mirrors the client: the client leg accepts an ECN-setup SYN (its
  SYN-ACK then has ECE) and the server leg asks the server for ECN only if the client's
  SYN did (`configs_for(..., ecn=)`). A SYN answered with a cookie is not ECN on either leg
  (the cookie does not remember the request). Each leg that negotiated it marks its new
  data ECT(0), echoes CE marks and halves its window on an echo (stack/send.py), on its
  own path; `status()` counts the legs with ECN, the CE marks they received and their
  reductions (summed over live splices and those forgotten).
- Nagle off on both legs (TCP_NODELAY, RFC 9293 §3.7.4 MUST-17 lets the application disable
  it): each leg sends as soon as the other side's bytes arrive, so the splice adds no Nagle
  wait behind a peer's delayed ACK; whoever sent the bytes already chose how to segment them.
- Malformed packets (bad lengths, checksums) are dropped and counted in `drops`; nothing a peer
  sends raises. An exception from a splice (a bug of ours) resets that flow only, counted as
  "internal_error" and recorded in the flow's metadata, so one broken flow cannot make every
  batch of the endpoint fail. Inspector output is flushed by the adapter
  (`flush_inspectors`), off this path.

Theory of operation
`from_tun(pkt, n, now)` routes one inner packet from the local site to its splice's client
leg and marks the splice touched; `flush(now, out)` (end of each batch) steps every touched
splice once (so a batch's data crosses the inspector chain as one chunk and its ACKs
aggregate) and emits both legs' segments. `from_peer(pkts, now, out)` is the one entry from
the tunnel: the Bridge hands it the decapsulated packets its sequence policy delivered (a
batch's, or the reorder buffers' flushed by the timer) before any reach the TUN; the server
legs take theirs, every other packet goes on to `out.tun` in order, then it flushes.
Consecutive in-order data segments of one server leg, and a `TunFrame` the Bridge's GRO path
merged (and checked), reach the leg as one segment (bridge/userspace/legwire.py merge_run:
every checksum still checked, by one sum over the run), and
`from_tun_super(sp, now)` gives a client's TSO frame to its leg whole (the kernel built it;
nothing is summed). The legs' IP framing (plain packets, TunFrames) is bridge/userspace/legwire.py.
Timers: each splice's deadline is recorded when it is
emitted (every change to a splice ends in `flush`) in a heap (bridge/userspace/bounds.py),
next to one idle check per splice (re-armed from `last_seen` when it comes due);
`get_timer()` is the earliest of those and of the flow table's expiry, `handle_timer(now,
out)` runs the due ones: both cost O(log n) per due timer, not O(n) per batch.
`warm(now, lane)` is the keep-warm hook: one hop of a throw-away connection through a private shadow
(bridge/userspace/warm.py), never this Terminator's own state.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any

from bridge.flows import (
    DEFAULT_MAX_BUFFER,
    Backend,
    FlowKey,
    FlowTable,
    InspectRule,
    SpliceLimits,
    Verdict,
    selector_for,
)
from bridge.inspect.api import CloseReason
from bridge.inspect.manager import InspectorManager
from bridge.userspace.bounds import Admission, Admit, Deadlines, MemoryBudget
from bridge.userspace.legwire import TSO_MAX_SEGMENT, LegFramer, ecn_of
from bridge.userspace.splice import Splice
from bridge.userspace.tunnel import TunnelSide
from bridge.userspace.warm import WarmCycle
from stack.connection import reset_reply
from stack.events import IcmpKind
from stack.seq import MASK
from stack.tcp_config import TcpConfig
from stack.wire.prelude import tcp_key
from stack.wire.tcp import ACK, CWR, ECE, RST, SYN, TcpSegment, parse_tcp
from stack.wire.vnet import F_DATA_VALID, F_NEEDS_CSUM

__all__ = ["Terminator", "SendToPeer", "TSO_MAX_SEGMENT"]

SendToPeer = Callable[[bytes, float, Any], bool]  # (inner packet, now, out) -> sent
WARM_WINDOW = 1.0  # warm() works while a splice is live or for this long after one opened
WARM_BULK_QUIET = 0.1  # ... but not this soon after a server leg took a merged run (bulk)
# Status counters summed over the legs' TcpConnection.info(): resent segments, tail loss
# probes, timeouts and fast recoveries undone as spurious.
LOSS = ("retransmissions", "tlp", "spurious_rtos", "spurious_recoveries")


def _has_userspace(rules: Iterable[InspectRule]) -> bool:
    return any(r.backend is Backend.USERSPACE and r.action is not Verdict.FORWARD for r in rules)


class Terminator(TunnelSide):
    """All userspace-terminated flows of one endpoint."""

    def __init__(self, rules: tuple[InspectRule, ...], send_to_peer: SendToPeer,
                 mtu_for: Callable[[bytes], int], tun_mtu: Callable[[], int], *,
                 manager: InspectorManager | None = None, tx_max_segment: int = 0,
                 idle_timeout: float | None = None, msl: float = 15.0,
                 max_splices: int | None = None, syn_retries: int = 5, rto_min: float = 0.2,
                 limits: SpliceLimits | None = None, secret: bytes | None = None) -> None:
        self.rules = rules
        self.table = FlowTable(selector_for(rules, Backend.USERSPACE))
        lim = limits if limits is not None else SpliceLimits()
        if max_splices is not None:
            lim = replace(lim, max_splices=max_splices)
        self.limits = lim
        # half-open caps and SYN cookies (admission.py); the cookie key: a random secret
        self.admission = Admission(lim, secret if secret is not None else secrets.token_bytes(16))
        self.manager = manager if manager is not None else InspectorManager(rules)
        self.send_to_peer = send_to_peer
        self.mtu_for = mtu_for
        self.tun_mtu = tun_mtu
        self.tx_max_segment = tx_max_segment
        self.idle_timeout = idle_timeout
        self.msl = msl
        self.max_splices = lim.max_splices
        self.syn_retries = syn_retries
        self.rto_min = rto_min
        self.splices: dict[FlowKey, Splice] = {}
        self.touched: dict[FlowKey, Splice] = {}
        self.drops: dict[str, int] = {}
        self.counters: dict[str, int] = {"splices": 0, "to_client": 0, "to_server": 0,
                                         "from_client": 0, "from_server": 0, "refused_rst": 0,
                                         "server_runs": 0, "idle_aborts": 0,
                                         "checksum_completed": 0, "ecn_legs": 0,
                                         "ce_marks": 0, "ecn_cuts": 0, **dict.fromkeys(LOSS, 0)}
        self.ended: dict[str, int] = {}
        framer = self._framer = LegFramer()
        self.packet = framer.packet  # IP framing of the legs' segments (legwire.py)
        self._frame: Callable[..., bytes] = framer.frame
        self._pending_rst: list[tuple[FlowKey, TcpSegment]] = []
        self._clients: dict[bytes, int] = {}  # client address -> live splices (from_peer filter)
        self._deadlines = Deadlines()  # each splice's timer, as of its last emit (a heap)
        self._idle = Deadlines()  # each splice's idle check (re-armed from last_seen)
        self._done: set[FlowKey] = set()
        self.budget = MemoryBudget(lim.memory_budget)  # bytes all splices hold (bounds.py)
        self._configs: dict[tuple[int, int, int, int, str],
                            tuple[TcpConfig, TcpConfig, TcpConfig, TcpConfig]] = {}
        self.tun_offload = False
        self._warm: dict[int, WarmCycle] = {}  # lane -> shadow (bridge/userspace/warm.py)
        self._last_new = float("-inf")  # when the last splice was opened (warm)
        self._bulk_at = float("-inf")  # when a server leg last took a merged run (warm)

    def use_tun_offload(self, on: bool = True, parts: bool = False) -> None:
        """The TUN takes vnet-header writes with checksum and TSO offload (the I/O adapter
        calls this): client-leg segments become `TunFrame`s up to TSO_MAX_SEGMENT long (with
        `parts`, `TunFrameParts` for writev). Splices that exist keep their configuration."""
        self.tun_offload = on
        self._frame = partial(self._framer.frame, parts=True) if parts else self._framer.frame
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

        return cls(tuple(rules), bridge.send_inner, mtu_for, lambda: int(bridge.tun_mtu),
                   limits=bridge.config.userspace)

    # ------------------------------------------------------------------ input

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
            if sp.finished and flags & (SYN | ACK | RST) == SYN and sp.reusable(seg):
                # a new connection on the 4-tuple of an ended one whose legs linger in
                # TIME-WAIT (RFC 9293 §3.6.1 MAY-2, RFC 6191): the old splice gives way
                self.forget(sp)
            else:
                self.counters["from_client"] += 1
                sp.from_client(seg, now)
                self.touched[key] = sp
                return True
        elif flags & (SYN | ACK | RST) == ACK and self.admission.cookies_recent(now) and \
                self._cookie_ack(key, pkt, n, off, now):
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
        seg = parse_tcp(pkt[off:n], key[1], key[2], drops=self.drops, verify_checksum=False,
                        ecn=ecn_of(pkt))  # RFC 3168 §5
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

    def configs_for(self, key: FlowKey, rule: InspectRule | None, ecn: bool = False
                    ) -> tuple[TcpConfig, TcpConfig]:
        """(client leg, server leg) TCP settings of a new splice on `key` under `rule`
        (MSS from the tunnel and TUN MTUs, buffers from the rule), cached per shape. The
        client leg accepts ECN when asked; the server leg asks for it when `ecn` (the
        client's SYN did, RFC 3168 §6.1.1)."""
        cached = self._leg_configs(key, rule)
        return cached[0], cached[2] if ecn else cached[1]

    def client_config_without_ecn(self, key: FlowKey, rule: InspectRule | None) -> TcpConfig:
        """The client leg's settings of a connect-first splice whose server refused ECN
        (the client leg then refuses too, RFC 3168 §6.1.1), cached as the others are."""
        return self._leg_configs(key, rule)[3]

    def _leg_configs(self, key: FlowKey, rule: InspectRule | None
                     ) -> tuple[TcpConfig, TcpConfig, TcpConfig, TcpConfig]:
        """(client leg, server leg, server leg asking ECN, client leg without ECN)."""
        v6 = key[0] == 6
        hdr = 60 if v6 else 40
        server_mss = max(self.mtu_for(key[2]) - hdr, 88)
        client_mss = max(self.tun_mtu() - hdr, 88)
        buf = rule.max_buffer if rule is not None else DEFAULT_MAX_BUFFER
        cc = rule.congestion if rule is not None else "cubic"
        ck = (server_mss, client_mss, buf, self.tx_max_segment, cc)
        cached = self._configs.get(ck)
        if cached is None:
            # Each leg's buffers start at Linux's tcp_rmem default (128 KiB) and autotune up
            # to their share of the rule's max_buffer per direction (the splice's memory
            # bound): three quarters for the receive window, whose room a lossy path needs
            # above a hole for a round trip, a quarter for the send buffer on the other leg.
            rmax = max(buf - buf // 4, server_mss, client_mss)
            smax = max(buf // 4, 1)
            rbuf = max(min(rmax, 128 << 10), server_mss, client_mss)
            common: dict[str, Any] = dict(recv_buffer=rbuf, send_buffer=min(smax, 128 << 10),
                                          auto_consume=False, msl=self.msl,
                                          rto_min=self.rto_min, rto_var_min=self.rto_min,
                                          nagle=False, keepalive=True, congestion=cc,
                                          recv_buffer_max=rmax, send_buffer_max=smax)
            server = TcpConfig(mss=server_mss, syn_retries=self.syn_retries, **common)
            client = TcpConfig(mss=client_mss, tx_max_segment=self.tx_max_segment,
                               syn_retries=self.limits.synack_retries, ecn=True, **common)
            cached = (client, server, replace(server, ecn=True), replace(client, ecn=False))
            self._configs[ck] = cached
        return cached

    def _new_splice(self, key: FlowKey, syn: TcpSegment, now: float) -> None:
        """A SYN: a stateful splice, a SYN cookie, or the closed port's RST (admission.py)."""
        adm = self.admission.admit(key, len(self.splices) - len(self._done), now)
        found = self.table.lookup(key)
        rule = found[1] if found is not None else None
        if adm is not Admit.NEW:
            self.table.remove(key)  # nothing of this SYN is kept
            if adm is Admit.COOKIE:
                ccfg = self.configs_for(key, rule)[0]
                self._pending_rst.append((key, self.admission.cookie_syn_ack(
                    key, syn, ccfg.mss, ccfg.recv_buffer, now)))
                return
            full = len(self.splices) - len(self._done) >= self.limits.max_splices
            self._drop("too_many_splices" if full else "half_open_refused")
            rst = reset_reply(syn)
            if rst is not None:
                self._pending_rst.append((key, rst))
            return
        asks = syn.flags & (ECE | CWR) == ECE | CWR  # an ECN-setup SYN (RFC 3168 §6.1.1)
        first = rule is not None and rule.connect_first
        self._register(Splice(key, syn, rule, self._chain(rule),
                              *self.configs_for(key, rule, asks), now, connect_first=first,
                              client_cfg_refused=self.client_config_without_ecn(key, rule)
                              if first else None), now)
        self.splices[key].open(now)
        self.admission.opened(key)

    def _chain(self, rule: InspectRule | None) -> Any:
        return self.manager.chains.get(rule.name) if rule is not None else None

    def _register(self, sp: Splice, now: float) -> None:
        key = sp.key
        if self.idle_timeout is not None:  # the Terminator's cap on every rule's
            sp.idle_timeout = min(sp.idle_timeout, self.idle_timeout)
        self.counters["splices"] += 1
        self._last_new = now
        self.splices[key] = sp
        self._clients[key[1]] = self._clients.get(key[1], 0) + 1
        self._idle.set(key, now + sp.idle_timeout)
        self.touched[key] = sp

    def _cookie_ack(self, key: FlowKey, pkt: bytes | bytearray | memoryview, n: int, off: int,
                    now: float) -> bool:
        """A bare ACK of an unknown flow while cookies are out: when it returns a valid
        cookie of a flow a userspace rule inspects, open its splice (client leg ESTABLISHED,
        RFC 4987 §3.6) and return True; else False (it takes the ordinary path)."""
        verdict, rule = self.table.selector.classify(key)
        if verdict is not Verdict.INSPECT:
            return False
        seg = self._segment(pkt, n, off, key)
        if seg is None:
            return True
        mss = self.admission.check_cookie(key, seg, now)
        if mss is None:
            return False
        if len(self.splices) - len(self._done) >= self.limits.max_splices:
            self._drop("too_many_splices")
            self._stray(key, seg)
            return True
        syn = TcpSegment(seg.src_port, seg.dst_port, (seg.seq - 1) & MASK, 0, SYN, seg.window,
                         b"", 0, mss)
        sp = Splice(key, syn, rule, self._chain(rule), *self.configs_for(key, rule), now)
        self._register(sp, now)
        sp.open_cookie((seg.ack - 1) & MASK, seg, now)
        self.counters["from_client"] += 1
        return True

    # ------------------------------------------------------------------ output

    def flush(self, now: float, out: Any) -> None:
        """Step every touched splice once and emit both legs' segments."""
        for key, rst in self._pending_rst:  # RSTs, and SYN-ACKs carrying cookies
            out.tun.append(self.packet(key[2], key[1], rst))
            if rst.flags & RST:
                self.counters["refused_rst"] += 1
        self._pending_rst.clear()
        for _round in range(2):  # a second round: splices the memory budget let go (_account)
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
        self._deadlines.set(key, sp.get_timer())  # every change to a splice's timers ends here
        for k in self.budget.account(key, sp.buffered(), sp):  # memory budget: let go
            p = self.splices.get(k)
            if p is not None:
                p.allow = None
                self.touched[k] = p  # gives back what it owes (flush's second round)
        if not sp.half_open:
            self.admission.settled(key)  # the client completed its handshake, or it ended
            if sp.finished:
                self._done.add(key)  # TIME-WAIT legs hold no max_splices slot

    def forget(self, sp: Splice) -> None:
        """Drop `sp` from every table (its legs are done, or it gives way to a new SYN)."""
        if self.splices.get(sp.key) is sp:
            del self.splices[sp.key]
            self._deadlines.set(sp.key, None)
            self._idle.set(sp.key, None)
            self._done.discard(sp.key)
            self.admission.settled(sp.key)
            self.budget.forget(sp.key)
            left = self._clients.pop(sp.key[1], 1) - 1
            if left:
                self._clients[sp.key[1]] = left
            self.touched.pop(sp.key, None)
            self._count_legs(sp, self.counters)
            reason = sp.flow.close_reason.value if sp.flow.close_reason else "closed"
            self.ended[reason] = self.ended.get(reason, 0) + 1

    def path_mtu_changed(self) -> None:
        """A tunnel or TUN MTU shrank (Bridge.set_path_mtu): every live leg lowers its send
        MSS to it (RFC 1191 §6.3, RFC 8201 §5.2) and resends in-flight data at the next flush."""
        tun = self.tun_mtu()
        for key, sp in self.splices.items():
            sp.server.path_mtu(self.mtu_for(key[2]))
            if sp.client is not None:
                sp.client.path_mtu(tun)
            self.touched[key] = sp

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The earliest deadline of any splice, idle check or flow-table expiry; None when
        there is none. O(1) amortised, whatever the number of splices (deadlines.py)."""
        best = self._deadlines.earliest()
        for t in (self._idle.earliest(), self.table.next_expiry()):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def handle_timer(self, now: float, out: Any) -> None:
        """Run expired splice timers and idle checks, expire the flow table, emit."""
        splices = self.splices
        for key in self._deadlines.pop_due(now):
            sp = splices.get(key)
            if sp is not None:
                sp.handle_timer(now)
                self.touched[key] = sp
        for key in self._idle.pop_due(now):
            sp = splices.get(key)
            if sp is None or sp.finished:
                continue  # an ended flow's legs finish on their own timers
            due = sp.last_seen + sp.idle_timeout
            if due > now:
                self._idle.set(key, due)  # it spoke since: check again then
                continue
            sp.abort(CloseReason.IDLE, now)
            self.counters["idle_aborts"] += 1
            self.touched[key] = sp
        t = self.table.next_expiry()
        if t is not None and t <= now:
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
        one was opened in the last WARM_WINDOW seconds, and none while a bulk transfer runs
        (a server leg took a merged run of BULK_RUN segments or more in the last
        WARM_BULK_QUIET seconds, tunnel.py): the real segments keep the code hot, and a
        0.3-0.6 ms hop only holds the GIL the busy data thread waits for. Touches no real
        splice, counter, timer or inspector; each `lane` (one per calling thread) has its
        own shadow."""
        if not self.splices and now - self._last_new > WARM_WINDOW:
            return
        if now - self._bulk_at < WARM_BULK_QUIET:
            return  # a bulk transfer keeps this code hot; a hop would only take the GIL
        w = self._warm.get(lane)
        if w is None:
            w = self._warm[lane] = WarmCycle(self)
        w.step(now)

    @staticmethod
    def _count_legs(sp: Splice, into: dict[str, int]) -> None:
        """Add `sp`'s legs' loss recovery (LOSS) and ECN numbers (RFC 3168: legs that
        negotiated it, CE marks received, window reductions for an echo) to `into`."""
        for leg in filter(None, (sp.client, sp.server)):
            info = leg.info()
            for name in LOSS:
                into[name] += int(info[name])  # type: ignore[call-overload]
            if leg.ecn:
                into["ecn_legs"] += 1
                into["ce_marks"] += leg.ce_marks
                into["ecn_cuts"] += leg.ecn_cuts

    def flows(self, now: float) -> list[dict[str, Any]]:
        """One JSON-able record per live splice, for `grebe flows`."""
        return [sp.info(now) for sp in self.splices.values()]

    def status(self) -> dict[str, Any]:
        """Counters of the backend, the flow table and the inspector chains."""
        counters = {**self.counters, "memory_pressure": self.budget.events}
        for sp in self.splices.values():  # the live legs' numbers (forget adds the rest)
            self._count_legs(sp, counters)
        return {"live": len(self.splices), "half_open": self.admission.half_open,
                "memory": self.budget.total, "memory_pressed": len(self.budget.pressed),
                "time_wait": len(self._done),
                "counters": counters,
                "admission": dict(self.admission.counters),
                "ended": dict(self.ended), "drops": dict(self.drops),
                "flow_table": dict(self.table.counters), "rules": self.manager.counters()}



"""The tunnel side of the Terminator: the server legs' packets, runs and ICMP errors.

Rules of this module (pure, sans-I/O: decapsulated inner packets and `now` in; legs updated)
- `from_peer` takes the packets the Bridge's sequence policy delivered from the tunnel, in
  order: a server leg's own packets go to it, every other packet is appended to `out.tun`
  in order (another flow's: its order against ours does not matter), then the touched
  splices are stepped (the Terminator's `flush`).
- Only packets addressed to a client with a live splice are looked at (`_clients`, one set
  lookup); anything else is the fast path's.
- Consecutive in-order data segments of one server leg (a GRO batch of the tunnel) reach the
  leg as one segment (legwire.py `merge_run`: every checksum still checked, by one sum over
  the run; a bad one is dropped alone); a `TunFrame` the Bridge's GRO path merged and
  checked (bridge/gro.py, NEEDS_CSUM) is taken whole without a second checksum pass, and
  so is a `LegRun` (bridge/tunframe.py), the run the GRO path merged for a server leg
  because `leg_run` said the flow is a live splice's: its payload object goes to the leg
  as it is; one that no leg claims is dropped and counted "leg_run_unclaimed", never
  written to the TUN.
- ICMP errors quoting a server leg's segment go to that leg (legwire.py `quoted_leg`, counted
  "icmp_to_server_leg"); while the splice has no client leg (connect first) the error also
  goes on to the client, whose own SYN it quotes (RFC 1122 §4.2.3.9).
- Malformed packets are dropped and counted by parse_tcp (`drops`); nothing raises.
- Every segment reaches its leg with its IP header's ECN field (RFC 3168 §5, legwire.py
  `ecn_of`, `TcpSegment.ecn`): a CE mark on either path is the leg's to echo.
- A merged run of at least BULK_RUN segments marks a bulk transfer (`_bulk_at`): the
  Terminator's keep-warm hop then pauses (terminator.py `warm`).

Theory of operation: `TunnelSide` is a mixin of the Terminator (terminator.py), which owns
the tables it reads and writes (`splices`, `touched`, `counters`, `drops`, `_clients`) and
`flush`; it is its own module only to keep each file one subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge.flows import FlowKey
from bridge.tunframe import LegRun, TunFrame
from bridge.userspace.legwire import completed_partial, ecn_of, merge_run, quoted_leg, run_part
from bridge.userspace.splice import Splice
from stack.wire.prelude import V4_DST_AT, V6_DST_AT, tcp_key
from stack.wire.tcp import TcpSegment, parse_tcp
from stack.wire.vnet import F_NEEDS_CSUM, GSO_SIZE_AT, VNET_HDR_LEN

__all__ = ["TunnelSide", "BULK_RUN"]

# A merged run of this many segments is a bulk transfer (`_bulk_at`, Terminator.warm): more
# than a Linux initial window (RFC 6928: 10 segments), so the sender's window has grown.
BULK_RUN = 16


class TunnelSide:
    """The Terminator's input from the tunnel (mixin: the Terminator owns the state)."""

    splices: dict[FlowKey, Splice]
    touched: dict[FlowKey, Splice]
    counters: dict[str, int]
    drops: dict[str, int]
    _clients: dict[bytes, int]
    _pending_rst: list[tuple[FlowKey, TcpSegment]]
    _bulk_at: float  # when a server leg last took a merged run (Terminator.warm)

    def flush(self, now: float, out: Any) -> None:  # the Terminator's
        raise NotImplementedError

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _segment(self, pkt: bytes | bytearray | memoryview, n: int, off: int,
                 key: FlowKey) -> TcpSegment | None:
        mv = pkt if isinstance(pkt, memoryview) else memoryview(pkt)
        ecn = ecn_of(pkt)  # RFC 3168 §5: the leg sees the IP ECN field
        if (seg := parse_tcp(mv[off:n], key[1], key[2], ecn=ecn)) is None:  # partial? else counted
            fixed = completed_partial(mv[off:n], key[1], key[2])
            self.counters["checksum_completed"] += fixed is not None
            seg = parse_tcp(fixed or mv[off:n], key[1], key[2], drops=self.drops,
                            verify_checksum=fixed is None, ecn=ecn)  # completed: right by making
        return seg

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

    def leg_run(self, pkt: memoryview) -> bool:
        """True when inner packet `pkt` (the first of a GRO run, bridge/fastpath.py) is a live
        splice's server leg's: its run may then be merged past 64 KB (bridge/gro.py
        LEG_RUN_MAX), since `from_peer` hands it to the leg whole, never to the TUN."""
        return self._server_side(pkt, len(pkt)) is not None

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
                if type(pkt) is TunFrame:  # a run the Bridge merged and checked (bridge/gro.py)
                    if not self._server_frame(pkt, now):
                        tun.append(pkt)
                    continue
                if type(pkt) is LegRun:  # the same, for a server leg only: never the TUN's
                    if not self._server_leg_run(pkt, now):
                        self._drop("leg_run_unclaimed")
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
        """An ICMP error about a server leg's segment (legwire.py): hand it
        to the leg; True when it is consumed (not passed on to the client)."""
        found = quoted_leg(pkt, n, self._clients)
        if found is None:
            return False
        key, kind, code, mtu, seq = found
        sp = self.splices.get(key)
        if sp is None:
            return False
        self._drop("icmp_to_server_leg")
        connecting = sp.client is None
        sp.server_icmp(kind, code, mtu, seq, now)
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
        seg = parse_tcp(mv[off:n], key[1], key[2], drops=self.drops, verify_checksum=False,
                        ecn=ecn_of(mv))  # GRO merged only equal IP headers (bridge/gro.py)
        if seg is not None:
            gso_size = frame[GSO_SIZE_AT] | frame[GSO_SIZE_AT + 1] << 8  # little-endian
            self._leg_takes_run(sp, ck, seg, gso_size, now)
        return True

    def _leg_takes_run(self, sp: Splice, ck: FlowKey, seg: TcpSegment, gso_size: int,
                       now: float) -> None:
        """Server leg `sp` takes merged run `seg` (its segments of `gso_size` counted)."""
        k = -(-len(seg.payload) // gso_size) if gso_size else 1
        self.counters["from_server"] += k
        self.counters["server_runs"] += 1
        if k >= BULK_RUN:
            self._bulk_at = now
        sp.from_server(seg, now)
        self.touched[ck] = sp

    def _server_leg_run(self, run: LegRun, now: float) -> bool:
        """A `LegRun` (bridge/gro.py: a run merged for a server leg, every segment's checksum
        checked there): its leg takes header and payload as one segment, the payload object
        as it is. False when no live splice claims it (the caller drops it)."""
        n = len(run)
        found = self._server_side(run, n)
        if found is None:
            return False
        sp, ck, key, off, _flags = found
        mv = memoryview(run)
        seg = parse_tcp(mv[off:n], key[1], key[2], drops=self.drops, verify_checksum=False,
                        ecn=ecn_of(mv))  # GRO merged only equal IP headers (bridge/gro.py)
        if seg is not None:
            self._leg_takes_run(sp, ck, seg._replace(payload=run.payload), run.gso_size, now)
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
            if len(run) >= BULK_RUN:
                self._bulk_at = now
            sp.from_server(seg, now)
        self.touched[key] = sp

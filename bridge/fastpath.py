"""The data plane's fast paths: a TSO super-packet out, a GRO batch in (bridge/gso.py).

Rules: each function makes the per-flow (send) or per-peer (receive) decisions of
`Bridge.from_tun` / `Bridge.from_udp` (bridge/pipeline.py) once, and hands the per-segment
work to bridge/gso.py; whenever a segment or datagram could need per-packet treatment it
returns without having done anything (False / 0 / -1), and the Bridge takes its per-packet
path. Sending steps aside for:
- a destination without a route or a peer down and withdrawn (per-segment ICMP
  unreachable, rate limited), an inner TTL <= 1 (RFC 2003 §3.1, RFC 1812 §5.3.1: Time
  Exceeded per segment), a tunnel endpoint as destination (RFC 2003 §4, "loop");
- segments above the peer's tunnel MTU (RFC 2003 §5.1, RFC 4459: ICMP or inner
  fragmentation per segment);
- SYN or RST (MSS clamping, RFC 9293 §3.7.1; never TSO'd anyway).
GRE checksums (RFC 2784 §2.5) and every sequence policy stay on the fast path: bridge/gso.py
builds and verifies the checksums per row.
Receiving steps aside for: userspace-terminated flows, several peers behind one host (the
GRE key picks, RFC 2890 §2.1), a first sequence number the policy would not deliver at once
(RFC 2890 §2.2: out of the window for drop-late; for reorder anything but exactly the next
one, or any packet held: `SeqReceiver.run_may_start`), a bad GRE checksum (RFC 2784 §2.5:
the row ends the run and is dropped and counted by the per-packet path), a spoofed inner
source (AllowedIPs), TTL 0 (RFC 2003 §3.1), a tunnel endpoint (RFC 2003 §4), a martian or a
hairpin as inner destination (bridge/peers.py `accept`), and anything that is not a
contiguous run of one TCP flow (see `coalesce_rows`). Liveness (`heard`) only after all
of them, as on the per-packet path.
tests/unit/bridge/test_bridge_gso.py and test_fastpath_seq_csum.py (out-of-order, lost,
replayed and damaged datagrams, batch after batch) prove both paths put the same bytes on the
wire and into the TUN, with the same counters and sequence policy state.

Seams: a `FastPath` is built by the Bridge with what it needs and nothing else: the peer
table (bridge/peers.py, whose `forward` / `accept` are the same route, peer state, TTL, MTU,
AllowedIPs and loop checks the per-packet path makes), the counters, and the liveness
callback (`Bridge.heard`). Datagrams enter `Output` through `bridge.output.emit`, as the
per-packet path's do; a GRO run goes to the list the Bridge names (`tun`: the TUN's, or the
packets it hands to its terminator).

Theory of operation: sending, `send_super` checks route, peer state, TTL, MTU (`forward`),
flags and GRE options on the super-packet's header, then `encap_segments` builds every datagram
(one `UdpRun`, GRE checksums included), GRE sequence numbers advance by the count,
counters and flow-hash ports are updated once. Receiving, `receive_run` checks peer, GRE
header, sequence policy (RFC 2890 §2.2), AllowedIPs, TTL (RFC 2003 §3.1) and loop guard
(RFC 2003 §4) on the first datagram of a run, and `coalesce_rows` checks all rows at once
(GRE checksums too) and builds one `TunFrame`; the sequence policy then advances as if the
rows had come one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from bridge.counters import Counters
from bridge.encap import decode_gre, flow_source_port
from bridge.gro import GroBatch, coalesce_rows
from bridge.gso import SuperPacket, UdpRun, encap_segments
from bridge.output import Output, emit
from bridge.peers import Addr, PeerState, PeerTable
from stack.wire.ip import V4_DST, V4_SRC, V4_TTL, V6_DST, V6_HLIM, V6_SRC
from stack.wire.prelude import (
    V4_DST_AT,
    V4_DST_END,
    V4_SRC_END,
    V6_DST_AT,
    V6_DST_END,
    V6_SRC_END,
    plain_tcp,
)

__all__ = ["FastPath", "ROWS_PROBE"]

ROWS_PROBE = 8  # the fewest rows a run looks at after one broke early (`expand`)

Buf = bytes | bytearray | memoryview


class FastPath:
    """The super-packet (send) and GRO batch (receive) fast paths of one Bridge."""

    __slots__ = ("table", "peers", "counters", "heard")

    def __init__(self, table: PeerTable, counters: Counters,
                 heard: Callable[[PeerState, float], None]) -> None:
        self.table = table
        self.peers = table.states
        self.counters = counters
        self.heard = heard

    def send_super(self, sp: SuperPacket, now: float, out: Output) -> bool:
        """The super-packet fast path: the per-flow decisions of `from_tun` once, then every
        segment segmented and encapsulated at once (bridge/gso.py). False, having done
        nothing, whenever a segment could need per-packet treatment: no route / peer down /
        TTL <= 1 (per-segment drops and ICMP), segments above the tunnel MTU, SYN or RST
        (MSS clamping, never TSO'd anyway). The caller keeps terminated flows away."""
        pkt = sp.packet()
        parsed = plain_tcp(pkt)
        g = sp.gso_size
        if parsed is None or g <= 0:
            return False
        v4, ihl, doff = parsed
        if pkt[ihl + 13] & 0x06:  # SYN or RST
            return False
        if v4:
            idx = self.table.forward(pkt[V4_DST_AT], pkt[V4_TTL], ihl + doff + g)
        else:
            idx = self.table.forward(pkt[V6_DST_AT], pkt[V6_HLIM], ihl + doff + g)
        if idx < 0:
            return False
        peer = self.peers[idx]
        enc = peer.encoder
        csum_at = -1
        if peer.gre:
            prefix, seq_at = enc.prefix(not v4)
            if enc.csum:
                csum_at = 4  # RFC 2784 §2.1: the checksum follows flags and protocol type
        else:
            prefix, seq_at = b"", -1
        items: list[bytes | bytearray] = []
        room = peer.room
        k = encap_segments(pkt, v4, ihl, doff, g, prefix, seq_at, enc.seq, items, run=True,
                           csum_at=csum_at, room=room)
        if peer.gre:
            enc.advance(k)
        sport = flow_source_port(pkt) if peer.flow_sport else -1
        c = self.counters
        for item in items:  # one per item: a UdpRun stands for all its datagrams
            if type(item) is UdpRun:
                n = -(-len(item) // item.seg)
                emit(out, c, peer, item, n, now, sport,
                     len(item) - (room[0] + room[1]) * n if item.head else -1)
            else:
                emit(out, c, peer, item, 1, now, sport)
        return True

    def receive_run(self, b: GroBatch, start: int, addr: Addr, now: float,
                    tun: list[bytes | bytearray],
                    leg: Callable[[memoryview], bool] | None = None, max_rows: int = 0) -> int:
        """The receive fast path: a GRO batch of one TCP flow becomes one TunFrame appended
        to `tun` (bridge/gso.py `coalesce_rows` checks every row at once). The per-peer
        decisions of `from_udp` (peer, GRE header, sequence policy, `accept`) are made once,
        on the first datagram of a run. Starts at `buf[start:]`; returns the bytes consumed
        (a run), 0 when the datagram at `start` must go alone through the per-packet path
        (a sequence number the policy would not deliver at once, packets held for
        reordering, a bad GRE checksum, not the start of a contiguous TCP run, ...), -1
        when no datagram of this batch can take the fast path (unknown or ambiguous peer).
        A terminated flow's run reaches its server leg as one segment
        (`Terminator.from_peer`): when `leg` (the Terminator's `leg_run`) says the first
        datagram's inner packet is a live splice's, the run is a `LegRun` of up to
        bridge/gro.py LEG_RUN_MAX bytes (the leg takes it whole, it never reaches the TUN).
        Only an I/O layer whose TUN takes TunFrames (vnet header) hands GroBatches in.
        `max_rows` > 0: look at no more rows than that (`expand`)."""
        table = self.table
        cands = table.by_host(addr[0]) if isinstance(addr, tuple) and addr else ()
        if len(cands) != 1:
            return -1
        peer = self.peers[cands[0]]
        sr = peer.seq
        buf, seg = b.buf, b.seg
        if sr.held or len(buf) - start < 2 * seg:
            return 0  # held packets: only receive() knows what the next ones release
        first = memoryview(buf)[start:start + seg]
        off, gseq, gseq_at, csum_at = 0, -1, -1, -1
        if peer.gre:
            status, off, gseq = decode_gre(first, peer.key_in, peer.csum_in)
            if status != -1:
                return 0
            gseq_at = off - 4 if gseq >= 0 else -1
            csum_at = 4 if peer.csum_in else -1  # RFC 2784 §2.1
        if not sr.run_may_start(gseq):
            return 0
        parsed = plain_tcp(first[off:])
        if parsed is None:
            return 0
        v4, ihl, doff = parsed
        if v4:
            reason = table.accept(peer.index, first[off + V4_SRC:off + V4_SRC_END],
                                  first[off + V4_DST:off + V4_DST_END], first[off + V4_TTL])
        else:
            reason = table.accept(peer.index, first[off + V6_SRC:off + V6_SRC_END],
                                  first[off + V6_DST:off + V6_DST_END], first[off + V6_HLIM])
        if reason >= 0:
            return 0
        r = coalesce_rows(buf, start, seg, off, gseq_at, v4, ihl, doff, csum_at,
                          leg is not None and leg(first[off:]), max_rows)
        if r is None:
            return 0
        sup, merged, last, used = r
        sr.run_received(last)
        self.heard(peer, now)
        tun.append(sup)  # a TunFrame (the TUN adapter writes it whole) or a server leg's LegRun
        c = self.counters
        c.rx_packets[peer.index] += merged
        c.rx_bytes[peer.index] += used
        return used

    def expand(self, datagrams: Iterable[tuple[Buf | GroBatch, Addr]], now: float,
               tun: list[bytes | bytearray], fast: bool = True,
               leg: Callable[[memoryview], bool] | None = None) -> Iterator[tuple[Buf, Addr]]:
        """The datagrams one by one, for `Bridge.from_udp`'s per-packet loop; a `GroBatch`
        goes through `receive_run` (its TunFrames to `tun`) first, and what that leaves (all
        of it, or a short last datagram) comes out one by one, in order. One without a
        segment size (an adapter's mistake) is one datagram. `fast` False (the Bridge has
        [[scrub]] rules, bridge/scrub.py): every datagram comes out, none takes a run.
        `leg`: see `receive_run`. After a run that ended before the rows it was given
        (loss or reordering in the batch), the next run of the batch looks at no more than
        twice as many rows (at least ROWS_PROBE), doubling while runs fill what they look
        at: without that cap each of a lossy batch's short runs checked the whole rest of
        the buffer (quadratic in the batch)."""
        receive_run = self.receive_run
        for payload, addr in datagrams:
            if type(payload) is GroBatch:
                buf, seg = payload.buf, payload.seg
                if seg <= 0 or not fast:
                    if seg > 0:
                        for o in range(0, len(buf), seg):
                            yield buf[o:o + seg], addr
                        continue
                    yield buf, addr
                    continue
                pos, n = 0, len(buf)
                cap = 0  # rows the next run may look at (0: all)
                while pos < n:
                    used = receive_run(payload, pos, addr, now, tun, leg, cap)
                    if used > 0:
                        k = used // seg
                        if k < (cap or (n - pos) // seg):  # the run broke early
                            cap = max(ROWS_PROBE, 2 * k)
                        elif cap:
                            cap *= 2
                        pos += used
                        continue
                    if used < 0:  # nothing in this batch can take the fast path
                        for o in range(pos, n, seg):
                            yield buf[o:o + seg], addr
                        break
                    yield buf[pos:pos + seg], addr  # one by one until a run starts
                    pos += seg
            else:
                yield payload, addr

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
(RFC 2890 §2.2: late for drop-late; for reorder anything but exactly the next one, or any
packet held: `SeqReceiver.run_may_start`), a bad GRE checksum (RFC 2784 §2.5: the row ends
the run and is dropped and counted by the per-packet path), a spoofed inner source
(AllowedIPs), TTL 0 (RFC 2003 §3.1), a tunnel endpoint as inner destination (RFC 2003 §4),
and anything that is not a contiguous run of one TCP flow (see `coalesce_rows`).
tests/unit/bridge/test_bridge_gso.py and test_fastpath_seq_csum.py (out-of-order, lost,
replayed and damaged datagrams, batch after batch) prove both paths put the same bytes on the
wire and into the TUN, with the same counters and sequence policy state.

Theory of operation: sending, `send_super` checks route, peer state, TTL, MTU, flags and
GRE options on the super-packet's header, then `encap_segments` builds every datagram
(one `UdpRun`, GRE checksums included), GRE sequence numbers advance by the count,
counters and flow-hash ports are updated once. Receiving, `receive_run` checks peer, GRE
header, sequence policy (RFC 2890 §2.2), AllowedIPs, TTL (RFC 2003 §3.1) and loop guard
(RFC 2003 §4) on the first datagram of a run, and `coalesce_rows` checks all rows at once
(GRE checksums too) and builds one `TunFrame`; the sequence policy then advances as if the
rows had come one by one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.encap import decode_gre, flow_source_port
from bridge.gso import GroBatch, SuperPacket, coalesce_rows, encap_segments
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

if TYPE_CHECKING:
    from bridge.pipeline import Addr, Bridge, Output

__all__ = ["send_super", "receive_run"]


def send_super(bridge: Bridge, sp: SuperPacket, now: float, out: Output) -> bool:
    """The super-packet fast path: the per-flow decisions of `from_tun` once, then every
    segment segmented and encapsulated at once (bridge/gso.py). False, having done
    nothing, whenever a segment could need per-packet treatment: a userspace-terminated
    flow, no route / peer down / TTL <= 1 (per-segment drops and ICMP), segments above
    the tunnel MTU, SYN or RST (MSS clamping, never TSO'd anyway)."""
    if bridge.terminator is not None:
        return False
    pkt = sp.packet()
    parsed = plain_tcp(pkt)
    g = sp.gso_size
    if parsed is None or g <= 0:
        return False
    v4, ihl, doff = parsed
    if pkt[ihl + 13] & 0x06:  # SYN or RST
        return False
    if v4:
        idx = bridge.table.route(pkt[V4_DST_AT])
        ttl = pkt[V4_TTL]
    else:
        idx = bridge.table.route(pkt[V6_DST_AT])
        ttl = pkt[V6_HLIM]
    if idx < 0 or ttl <= 1:
        return False
    peer = bridge.peers[idx]
    if (peer.withdraw and not peer.up) or ihl + doff + g > peer.mtu:
        return False
    enc = peer.encoder
    csum_at = -1
    if peer.gre:
        prefix, seq_at = enc.prefix(not v4)
        if enc.csum:
            csum_at = 4  # RFC 2784 §2.1: the checksum follows flags and protocol type
    else:
        prefix, seq_at = b"", -1
    lst = out.udp.get(peer.addr)
    if lst is None:
        lst = out.udp[peer.addr] = []
    start = len(lst)
    k = encap_segments(pkt, v4, ihl, doff, g, prefix, seq_at, enc.seq, lst, run=True,
                       csum_at=csum_at)
    if peer.gre:
        enc.advance(k)
    c = bridge.counters
    c.tx_packets[peer.index] += k
    c.tx_bytes[peer.index] += sum(map(len, lst[start:]))
    peer.last_tx = now
    if peer.flow_sport:
        sports = out.udp_sport.get(peer.addr)
        if sports is None:
            sports = out.udp_sport[peer.addr] = []
        sports.extend([flow_source_port(pkt)] * (len(lst) - start))  # one per item
    return True


def receive_run(bridge: Bridge, b: GroBatch, start: int, addr: Addr, now: float,
                out: Output) -> int:
    """The receive fast path: a GRO batch of one TCP flow becomes one InnerSuper in
    out.tun (bridge/gso.py `coalesce_rows` checks every row at once). The per-peer
    decisions of `from_udp` (peer, GRE header, sequence policy, AllowedIPs, TTL, loop)
    are made once, on the first datagram of a run. Starts at `buf[start:]`; returns
    the bytes consumed (a run), 0 when the datagram at `start` must go alone through the
    per-packet path (a sequence number the policy would not deliver at once, packets held
    for reordering, a bad GRE checksum, not the start of a contiguous TCP run, ...), -1
    when no datagram of this batch can take the fast path (unknown or ambiguous peer). A
    terminated flow's run is taken back from out.tun by `Terminator.divert` (one segment
    for its server leg). Only an I/O layer whose TUN takes TunFrames (vnet header) hands
    GroBatches in."""
    cands = bridge.table.by_host(addr[0]) if isinstance(addr, tuple) and addr else ()
    if len(cands) != 1:
        return -1
    peer = bridge.peers[cands[0]]
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
        src, dst = first[off + V4_SRC:off + V4_SRC_END], first[off + V4_DST:off + V4_DST_END]
        ttl = first[off + V4_TTL]
    else:
        src, dst = first[off + V6_SRC:off + V6_SRC_END], first[off + V6_DST:off + V6_DST_END]
        ttl = first[off + V6_HLIM]
    table = bridge.table
    if ttl == 0 or not table.allowed(peer.index, src) or table.is_endpoint(dst):
        return 0
    r = coalesce_rows(buf, start, seg, off, gseq_at, v4, ihl, doff, csum_at)
    if r is None:
        return 0
    sup, merged, last, used = r
    sr.run_received(last)
    bridge._heard(peer, now)
    out.tun.append(sup)  # a TunFrame: the TUN adapter writes it whole
    c = bridge.counters
    c.rx_packets[peer.index] += merged
    c.rx_bytes[peer.index] += used
    return used

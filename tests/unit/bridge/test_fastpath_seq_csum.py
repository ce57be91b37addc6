"""The GRO fast path (bridge/fastpath.py `receive_run`) with GRE checksums (RFC 2784 §2.5) and
the sequence policies (RFC 2890 §2.2) over out-of-order, duplicated, lost and damaged
datagrams, batch after batch with reorder timers in between: the TUN sees the same packets,
the counters and the policy state are the same as with the per-datagram path. And the fast
path is really taken: a damaged row ends a run, the rows after it start the next one."""

from __future__ import annotations

import random

import pytest
from grebe_sites import Pair, site_config
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from bridge.gro import GroBatch
from bridge.gso import SuperPacket, UdpRun
from bridge.io import offload as ol
from bridge.pipeline import Bridge, Output
from bridge.seqpolicy import SeqReceiver
from bridge.tunframe import TunFrame
from stack.wire import vnet
from stack.wire.checksum import pseudo_sum_v4, pseudo_sum_v6

SRC = ("198.18.0.1", 4754)
MSS = 1000
CSUM_VARIANTS = ["checksum = true", 'checksum = true\nkey = 7\nsequence = "reorder"',
                 'checksum = true\nsequence = "drop-late"']
SEQ_VARIANTS = ['sequence = "reorder"', 'key = 7\nsequence = "reorder"\nmax_packets_held = 3',
                'sequence = "drop-late"', 'checksum = true\nsequence = "reorder"',
                'checksum = true\nkey = 7\nsequence = "drop-late"', "checksum = true"]


def _datagrams(extra: str, v6: bool, rows: int, bursts: int = 1, tail: int = 0
               ) -> list[bytes]:
    """`bursts` TSO frames of `rows` full segments each (one TCP flow, contiguous, IPv4
    identification counting up across bursts, so that merging and splitting anywhere gives
    the same packets), as site A sends them to B: equal-size datagrams with consecutive GRE
    sequence numbers (plus, with `tail`, one shorter datagram of `tail` payload bytes)."""
    pair = Pair(extra)
    out: list[bytes] = []
    seq = 5000
    for b in range(bursts):
        data = random.Random(b).randbytes(rows * MSS + (tail if b == bursts - 1 else 0))
        tcp = TCP(sport=40000, dport=80, seq=seq, ack=55, flags="A", window=500)
        pkt = bytearray(bytes((IPv6(src="2001:db8:10::5", dst="2001:db8:20::7") if v6 else
                               IP(src="198.18.10.5", dst="198.18.20.7", flags="DF",
                                  id=1 + b * rows))
                              / tcp / data))
        ihl = 40 if v6 else 20
        ps = pseudo_sum_v6(pkt[8:24], pkt[24:40], 6, 0) if v6 else \
            pseudo_sum_v4(pkt[12:16], pkt[16:20], 6, 0)
        pkt[ihl + 16:ihl + 18] = ps.to_bytes(2, "big")
        frame = vnet.build_vnet(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6 if v6 else vnet.GSO_TCPV4,
                              ihl + 20, MSS, ihl, 16) + bytes(pkt)
        oa = Output()
        pair.a.from_tun([SuperPacket(frame, vnet.VNET_HDR_LEN, MSS, ol.split_frame)], 0, oa)
        for d in oa.udp[pair.b_addr]:
            out += d.datagrams() if isinstance(d, UdpRun) else [bytes(d)]
        seq += rows * MSS
    assert len({len(d) for d in out[:len(out) - (tail > 0)]}) == 1
    return out


def _seq_state(sr: SeqReceiver) -> tuple[object, ...]:
    return sr.last, sr.started, sr.run_n, sr.run_last, sr.run_since, sr.run_fast, sr.prev, \
        sorted(sr.held), sr.held_since, sr.flushes, sr.resyncs


def _packets(items: list[bytes | bytearray]) -> list[bytes]:
    frames: list[bytes] = []
    ol.coalesce(items, frames)
    pkts: list[bytes] = []
    for f in frames:
        assert ol.split_frame(f, pkts)
    return pkts


def _replay(extra: str, batches: list[list[bytes]], times: list[float]
            ) -> tuple[Bridge, Bridge, int]:
    """Feed each batch to `fast` as one GroBatch and to `ref` datagram by datagram, with
    handle_timer at each time; everything must match after every step. Returns the bridges
    and how many TunFrames (fast-path runs) `fast` wrote."""
    fast = Bridge(site_config("b", extra), 0)
    ref = Bridge(site_config("b", extra), 0)
    runs = 0
    for batch, now in zip(batches, times, strict=True):
        of, orf = Output(), Output()
        fast.handle_timer(now, of)
        ref.handle_timer(now, orf)
        if batch:
            fast.from_udp([(GroBatch(bytearray(b"".join(batch)), len(batch[0])), SRC)], now, of)
            ref.from_udp([(d, SRC) for d in batch], now, orf)
        runs += sum(type(p) is TunFrame for p in of.tun)
        assert _packets(of.tun) == _packets(orf.tun)
        assert fast.counters.snapshot() == ref.counters.snapshot()
        assert [_seq_state(p.seq) for p in fast.peers] == \
            [_seq_state(p.seq) for p in ref.peers]
        assert fast.get_timer() == ref.get_timer()
    return fast, ref, runs


def _damage_csum(d: bytes) -> bytes:
    b = bytearray(d)
    b[5] ^= 0x40  # RFC 2784 §2.1: the checksum field, bytes 4-5
    return bytes(b)


@pytest.mark.parametrize("extra", CSUM_VARIANTS)
@pytest.mark.parametrize("v6", [False, True])
def test_bad_checksum_row_ends_the_run_and_the_rest_continue(extra: str, v6: bool) -> None:
    """RFC 2784 §2.5: row 7's checksum is wrong (and only it: headers and TCP intact). It is
    dropped and counted "checksum" as the per-packet path counts it; rows 0-6 and 8-19 make
    two fast-path runs."""
    dg = _datagrams(extra, v6, 20)
    dg[7] = _damage_csum(dg[7])
    fast, _ref, runs = _replay(extra, [dg], [1.0])
    assert fast.counters.drop("checksum") == 1 and runs == 2
    assert fast.counters.rx_packets == [19]


@pytest.mark.parametrize("v6", [False, True])
def test_checksummed_tail_joins_the_run_and_a_bad_tail_does_not(v6: bool) -> None:
    """GRO ends a batch with a shorter datagram: it joins the run only with an intact GRE
    checksum (`_tail_ok`)."""
    extra = "checksum = true"
    dg = _datagrams(extra, v6, 9, tail=333)
    assert len(dg) == 10 and len(dg[-1]) == len(dg[0]) - MSS + 333
    fast, _ref, runs = _replay(extra, [dg], [1.0])
    assert runs == 1 and fast.counters.rx_packets == [10]
    dg[-1] = _damage_csum(dg[-1])
    fast, _ref, runs = _replay(extra, [dg], [1.0])
    assert runs == 1 and fast.counters.drop("checksum") == 1
    assert fast.counters.rx_packets == [9]


@pytest.mark.parametrize("v6", [False, True])
def test_reorder_falls_back_around_a_gap_and_resumes(v6: bool) -> None:
    """RFC 2890 §2.2 with MAX_PACKETS_HELD 5: rows 0-9 in order (one run); then 12-29: 12-17
    are held until the sixth trips the limit (flushed in order, ignoring the gap), after
    which 18-29 are in order again and take the fast path; 10 and 11 come late and are
    discarded. The timer is then not armed (nothing held)."""
    extra = 'sequence = "reorder"'
    dg = _datagrams(extra, v6, 30)
    fast, _ref, runs = _replay(extra, [dg[:10], dg[12:], dg[10:12]], [1.0, 1.01, 1.02])
    assert runs == 2
    c = fast.counters
    assert c.drop("sequence") == 2 and c.rx_packets == [28]
    assert fast.peers[0].seq.flushes == 1 and fast.get_timer() != 1.01 + 0.1


def test_reorder_held_packets_wait_for_the_timer_then_the_fast_path_resumes() -> None:
    """OUTOFORDER_TIMER: 3 packets held past a gap wait 100 ms; the flush at the deadline
    releases them; the next batch continues from the last one flushed, on the fast path."""
    extra = 'sequence = "reorder"'
    dg = _datagrams(extra, False, 20)
    fast, _ref, runs = _replay(extra, [dg[:5], dg[6:9], [], dg[9:20]],
                               [1.0, 1.05, 1.15, 1.2])
    assert runs == 2 and fast.peers[0].seq.flushes == 1 and fast.counters.rx_packets == [19]


@settings(max_examples=120, deadline=None)
@given(variant=st.sampled_from(SEQ_VARIANTS), v6=st.booleans(),
       rows=st.integers(4, 14), bursts=st.integers(1, 3),
       ops=st.lists(st.tuples(st.sampled_from(["swap", "drop", "dup", "csum", "replay"]),
                              st.integers(0, 10**6), st.integers(1, 6)), max_size=6),
       cuts=st.lists(st.integers(0, 10**6), max_size=5),
       gaps=st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.2]), min_size=6, max_size=6))
def test_out_of_order_batches_equal_per_datagram(variant: str, v6: bool, rows: int,
                                                  bursts: int, ops: list[tuple[str, int, int]],
                                                  cuts: list[int], gaps: list[float]) -> None:
    """Reordered, lost, duplicated, replayed and checksum-damaged datagrams, cut into GRO
    batches with time passing between them (reorder flushes by MAX_PACKETS_HELD and by
    OUTOFORDER_TIMER): the fast path gives what the per-datagram path gives, step by step."""
    dg = _datagrams(variant, v6, rows, bursts)
    n0 = len(dg)
    for op, pos, k in ops:
        i = pos % len(dg)
        if op == "swap":  # a block of k moves behind the next one
            j = min(len(dg), i + k)
            dg[i:j + k] = dg[j:j + k] + dg[i:j]
        elif op == "drop":
            del dg[i:i + k]
        elif op == "dup":
            dg[i:i] = dg[i:i + k]
        elif op == "replay":  # an old stretch again, later
            dg += dg[i:i + k]
        elif "checksum" in variant:
            dg[i] = _damage_csum(dg[i])
        if not dg:
            dg = _datagrams(variant, v6, 2)
    points = sorted({c % (len(dg) + 1) for c in cuts} | {0, len(dg)})
    batches = [dg[a:b] for a, b in zip(points, points[1:], strict=False)]
    times, t = [], 1.0
    for i in range(len(batches)):
        t += gaps[i % len(gaps)]
        times.append(t)
    batches.append([])  # and a last timer run, later
    times.append(t + 1.0)
    _replay(variant, batches, times)
    assert n0 >= 4

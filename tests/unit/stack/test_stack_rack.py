"""RACK-TLP (RFC 8985): reordering tolerance after a D-SACK, the reordering timer, and the
tail loss probe."""

from __future__ import annotations

from dataclasses import replace

import pytest
from tcp_script import ALL_OPTIONS, REMOTE_SEQ, lseq, recv, rseq, send, syn_sent

from stack.connection import TcpConnection
from stack.loss import Rack
from stack.wire.tcp import ACK, SYN

MSS = 1460


def _conn(rack: bool = True) -> tuple[TcpConnection, int, list[int]]:
    """An established connection with SACK and timestamps, SRTT about 100 ms, then ten
    segments in flight sent at t = 0.2; returns (conn, smss, their TSvals)."""
    # (handshake at 0 -> 0.1, one segment at 0.1 -> 0.2: two 100 ms RTT samples)
    cfg = replace(ALL_OPTIONS, nagle=False, initial_cwnd=20 * MSS, rto_min=0.2,
                  rto_var_min=0.2, rack=rack, congestion="newreno")
    conn = syn_sent(cfg, 0.0)
    syn_ts = conn._snd.ts_off  # our TSval at t = 0
    send(conn, 0.1, flags=SYN | ACK, seq=REMOTE_SEQ, ack=lseq(1), mss=1460, window=65535,
         ts=(1000, syn_ts), sack_perm=True)
    m = conn.send_mss
    conn.send(bytes(m))
    (first,) = [s for s in recv(conn, 0.1) if s.payload]
    assert first.ts is not None
    send(conn, 0.2, seq=rseq(1), ack=lseq(1 + m), window=65535, ts=(1001, first.ts[0]))
    conn.send(bytes(10 * m))
    segs = recv(conn, 0.2)
    assert len(segs) == 10
    return conn, m, [s.ts[0] for s in segs if s.ts is not None]


def _ack(conn: TcpConnection, t: float, una: int, m: int, tsecr: int,
         *blocks: tuple[int, int]) -> None:
    send(conn, t, seq=rseq(1), ack=lseq(1 + m + una * m), window=65535, ts=(1002, tsecr),
         sack=tuple((lseq(1 + m + a * m), lseq(1 + m + b * m)) for a, b in blocks))


def test_rack_tolerates_reordering_once_a_dsack_showed_it() -> None:
    conn, m, tsv = _conn()
    # A D-SACK for data already acknowledged: the path reorders (RFC 2883, RFC 8985 §6.2).
    send(conn, 0.3, seq=rseq(1), ack=lseq(1 + m), window=65535, ts=(1002, tsv[0]),
         sack=((lseq(1), lseq(1 + m)),))
    # Segment 0 of the ten is late, 1..5 SACKed: by DupThresh it would be lost at once.
    _ack(conn, 0.3, 0, m, tsv[5], (1, 6))
    assert [s for s in recv(conn, 0.3) if s.payload and s.seq == lseq(1 + m)] == []
    assert not conn.info()["in_recovery"]
    # It never comes: the reordering timer marks it lost within a fraction of the RTT.
    t = conn.get_timer()
    assert t is not None and t < 0.5
    conn.handle_timer(t)
    rx = [s for s in recv(conn, t) if s.payload]
    assert rx and rx[0].seq == lseq(1 + m)


def test_without_rack_the_same_reordering_is_a_fast_retransmit() -> None:
    conn, m, tsv = _conn(rack=False)
    send(conn, 0.3, seq=rseq(1), ack=lseq(1 + m), window=65535, ts=(1002, tsv[0]),
         sack=((lseq(1), lseq(1 + m)),))
    _ack(conn, 0.3, 0, m, tsv[5], (1, 6))
    rx = [s for s in recv(conn, 0.3) if s.payload]
    assert rx and rx[0].seq == lseq(1 + m)


def test_rack_without_reordering_seen_acts_at_dupthresh() -> None:
    conn, m, tsv = _conn()
    _ack(conn, 0.3, 0, m, tsv[5], (1, 6))
    rx = [s for s in recv(conn, 0.3) if s.payload]
    assert rx and rx[0].seq == lseq(1 + m)
    assert conn.info()["in_recovery"]


def test_tail_loss_probe_resends_the_last_segment_before_the_rto() -> None:
    """RFC 8985 §7: the last four segments are lost and no ACK will come for them; after
    PTO = 2 SRTT the highest segment is sent again (its SACK then shows the hole to
    recovery), well before the RTO that would restart from one segment."""
    conn, m, tsv = _conn()
    _ack(conn, 0.3, 6, m, tsv[5])
    rto_at = conn._snd.rto_at
    t = conn.get_timer()
    assert t is not None and rto_at is not None and t < rto_at
    conn.handle_timer(t)
    rx = [s for s in recv(conn, t) if s.payload]
    assert [s.seq for s in rx] == [lseq(1 + m + 9 * m)]
    assert conn._snd.tlp_probes == 1
    # Its ACK SACKs the probe: segments 6..8 are lost, recovery resends them, no RTO.
    _ack(conn, t + 0.1, 6, m, rx[0].ts[0] if rx[0].ts else 0, (9, 10))
    again = [s.seq for s in recv(conn, t + 0.1) if s.payload]
    assert again[:1] == [lseq(1 + m + 6 * m)]
    assert conn.info()["in_recovery"]


def test_rfc8985_6_2_reo_wnd_mult_resets_after_16_recoveries_without_dsack() -> None:
    """§6.2 step 4: a D-SACK round raises reo_wnd_mult and sets reo_wnd_persist = 16; each
    recovery that ends counts down, and at 0 the window is back to min_RTT/4."""
    rack = Rack()
    rack.min_rtt = 0.04
    rack.dsack(1.0, 0.04)
    rack.dsack(1.1, 0.04)
    assert rack.mult == 3
    rack.edge(0, 0.05, False, 0)
    assert rack.reo == pytest.approx(3 * 0.04 / 4)
    for _ in range(15):
        rack.recovery_over()
    assert rack.mult == 3
    rack.recovery_over()
    assert rack.mult == 1
    rack.edge(0, 0.05, False, 0)
    assert rack.reo == pytest.approx(0.04 / 4)
    rack.dsack(2.0, 0.04)  # reordering again: it grows again
    assert rack.mult == 2


def test_a_fast_recovery_that_ends_counts_down_reo_wnd_persist() -> None:
    conn, m, tsv = _conn()
    rack = conn._snd.rack
    rack.persist, rack.mult = 2, 4
    _ack(conn, 0.3, 0, m, tsv[5], (1, 6))
    rx = [s for s in recv(conn, 0.3) if s.payload]
    assert rx and conn.info()["in_recovery"]
    _ack(conn, 0.41, 10, m, rx[0].ts[0] if rx[0].ts else 0)
    assert not conn.info()["in_recovery"] and (rack.persist, rack.mult) == (1, 4)

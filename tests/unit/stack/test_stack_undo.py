"""Undoing a spurious fast recovery (RFC 3522 §3.2 Eifel detection with timestamps, RFC 3708
D-SACK detection, RFC 4015 §3 response; Linux tcp_try_undo_recovery, tcp_try_undo_dsack):
on a path that reorders, a late segment starts a recovery and a retransmission; once the
original's arrival is proven, the window comes back to what it was."""

from __future__ import annotations

from dataclasses import replace

import pytest
from tcp_script import (
    ALL_OPTIONS,
    LOCAL,
    LOCAL_SEQ,
    REMOTE,
    REMOTE_SEQ,
    lseq,
    recv,
    rseq,
    send,
    syn_sent,
)

from stack.connection import TcpConnection
from stack.wire.tcp import ACK, ECE, SYN


def _flight(cc: str = "newreno", ts: bool = True, rack: bool = False
            ) -> tuple[TcpConnection, int, list[int], tuple[object, object]]:
    """An established connection with SACK (and timestamps), RTT 100 ms, then ten segments
    in flight sent at t = 0.2; returns (conn, smss, their TSvals, (cwnd, ssthresh))."""
    cfg = replace(ALL_OPTIONS, nagle=False, initial_cwnd=20 * 1460, rto_min=0.2,
                  rto_var_min=0.2, congestion=cc, timestamps=ts, rack=rack)
    conn = syn_sent(cfg, 0.0)
    syn_ts = conn._snd.ts_off
    send(conn, 0.1, flags=SYN | ACK, seq=REMOTE_SEQ, ack=lseq(1), mss=1460, window=65535,
         ts=(1000, syn_ts) if ts else None, sack_perm=True)
    m = conn.send_mss
    conn.send(bytes(m))
    (first,) = [s for s in recv(conn, 0.1) if s.payload]
    send(conn, 0.2, seq=rseq(1), ack=lseq(1 + m), window=65535,
         ts=(1001, first.ts[0]) if first.ts else None)
    conn.send(bytes(10 * m))
    segs = recv(conn, 0.2)
    assert len(segs) == 10
    info = conn.info()
    return conn, m, [s.ts[0] for s in segs if s.ts is not None], (info["cwnd"], info["ssthresh"])


def _ack(conn: TcpConnection, t: float, una: int, m: int, tsecr: int | None,
         *blocks: tuple[int, int]) -> None:
    """The peer ACKs segment `una` (0..10 of the flight) with SACK blocks in segments;
    a block (a, b) with b <= una is a D-SACK."""
    send(conn, t, seq=rseq(1), ack=lseq(1 + m + una * m), window=65535,
         ts=(1002, tsecr) if tsecr is not None else None,
         sack=tuple((lseq(1 + m + a * m), lseq(1 + m + b * m)) for a, b in blocks))


def _recover(conn: TcpConnection, m: int, tsecr: int | None) -> int | None:
    """Segment 0 is late, 1..5 are SACKed: the recovery starts and segment 0 is resent.
    Returns the retransmission's TSval."""
    _ack(conn, 0.3, 0, m, tsecr, (1, 6))
    rx = [s for s in recv(conn, 0.3) if s.payload]
    assert rx and rx[0].seq == lseq(1 + m) and conn.info()["in_recovery"]
    return rx[0].ts[0] if rx[0].ts else None


@pytest.mark.parametrize("cc", ["newreno", "cubic"])
def test_rfc3522_eifel_undoes_a_recovery_the_original_segment_completed(cc: str) -> None:
    conn, m, tsv, before = _flight(cc)
    _recover(conn, m, tsv[5])
    assert conn.info()["cwnd"] < before[0]  # type: ignore[operator]
    # The original segment 0 arrives (late) and fills the hole: the receiver's ACK of the
    # whole flight echoes its TSval (RFC 7323 §4.3), older than the retransmission's.
    _ack(conn, 0.31, 10, m, tsv[0])
    info = conn.info()
    assert not info["in_recovery"] and info["spurious_recoveries"] == 1
    assert (info["cwnd"], info["ssthresh"]) == before


def test_rfc3522_a_recovery_the_retransmission_completed_is_kept() -> None:
    conn, m, tsv, before = _flight()
    rx_ts = _recover(conn, m, tsv[5])
    assert rx_ts is not None
    _ack(conn, 0.41, 10, m, rx_ts)  # echoes the retransmission: segment 0 was lost
    info = conn.info()
    assert not info["in_recovery"] and info["spurious_recoveries"] == 0
    assert info["ssthresh"] < before[1] and info["cwnd"] < before[0]  # type: ignore[operator]


@pytest.mark.parametrize("rack", [False, True])
def test_rfc3708_every_retransmission_dsacked_undoes_the_recovery_after_it_ended(
        rack: bool) -> None:
    """Without timestamps only the D-SACK tells: the retransmission of segment 0 arrives
    after the original and is reported as a duplicate (RFC 2883 §4)."""
    conn, m, _tsv, before = _flight(ts=False, rack=rack)
    _recover(conn, m, None)
    _ack(conn, 0.31, 10, m, None)  # the original filled the hole: recovery ends, reduced
    info = conn.info()
    assert not info["in_recovery"] and info["spurious_recoveries"] == 0
    assert info["cwnd"] < before[0]  # type: ignore[operator]
    _ack(conn, 0.4, 10, m, None, (0, 1))  # D-SACK of segment 0: the resend was a duplicate
    info = conn.info()
    assert info["spurious_recoveries"] == 1
    assert info["cwnd"] >= before[0] and info["ssthresh"] == before[1]  # type: ignore[operator]


def test_rfc3708_a_dsack_of_data_outside_the_recovery_undoes_nothing() -> None:
    conn, m, _tsv, before = _flight(ts=False)
    _recover(conn, m, None)
    _ack(conn, 0.31, 10, m, None)
    _ack(conn, 0.4, 10, m, None, (-1, 0))  # a duplicate of the segment before the flight
    info = conn.info()
    assert info["spurious_recoveries"] == 0 and info["cwnd"] < before[0]  # type: ignore[operator]


def test_a_recovery_with_a_real_loss_besides_the_late_segment_is_not_undone() -> None:
    """Segments 0 and 6 both resent; only 0's resend comes back as a D-SACK: 6 was lost."""
    conn, m, _tsv, before = _flight(ts=False)
    _recover(conn, m, None)
    _ack(conn, 0.31, 0, m, None, (1, 6), (7, 10))  # 6 is a hole too (lost)
    recv(conn, 0.31)
    _ack(conn, 0.32, 6, m, None, (7, 10))  # the original 0 arrived
    recv(conn, 0.32)
    _ack(conn, 0.4, 10, m, None)  # 6's resend arrived
    _ack(conn, 0.41, 10, m, None, (0, 1))  # 0's resend: a duplicate
    info = conn.info()
    assert conn.retransmissions >= 2
    assert info["spurious_recoveries"] == 0 and info["cwnd"] < before[0]  # type: ignore[operator]


def _ecn_flight() -> tuple[TcpConnection, int]:
    """An ECN connection (RFC 3168 §6.1.1) with SACK, no timestamps, ten segments in flight."""
    cfg = replace(ALL_OPTIONS, nagle=False, initial_cwnd=20 * 1460, rto_min=0.2,
                  rto_var_min=0.2, congestion="newreno", timestamps=False, rack=False, ecn=True,
                  send_buffer=1 << 20)
    conn = TcpConnection(LOCAL, REMOTE, cfg, iss=LOCAL_SEQ)
    conn.connect(0.0)
    recv(conn, 0.0)  # the ECN-setup SYN
    send(conn, 0.1, flags=SYN | ACK | ECE, seq=REMOTE_SEQ, ack=lseq(1), mss=1460,
         window=65535, sack_perm=True)
    assert conn.ecn
    m = conn.send_mss
    conn.send(bytes(m))
    recv(conn, 0.1)
    send(conn, 0.2, seq=rseq(1), ack=lseq(1 + m), window=65535)
    conn.send(bytes(10 * m))
    assert len([s for s in recv(conn, 0.2) if s.payload]) == 10
    conn.send(bytes(40 * m))  # more to send: new data goes out during the recovery
    return conn, m


def test_an_ece_during_a_recovery_forbids_its_undo() -> None:
    """RFC 3168 §6.1.2: a CE mark is congestion. An ECE that arrives while a recovery is on
    is absorbed by that recovery's reduction, so that reduction must stay even if a D-SACK
    later shows the retransmission needless (Linux: FLAG_ECE clears prior_ssthresh)."""
    conn, m = _ecn_flight()
    _ack(conn, 0.3, 0, m, None, (1, 10))  # segment 0 late: recovery, segment 0 resent
    recv(conn, 0.3)
    reduced = conn.info()["cwnd"]
    _ack(conn, 0.31, 0, m, None, (1, 10))
    send(conn, 0.32, seq=rseq(1), ack=lseq(1 + m), window=65535, flags=ACK | ECE,
         sack=((lseq(1 + 2 * m), lseq(1 + 11 * m)),))
    _ack(conn, 0.33, 10, m, None)   # the original arrived; recovery over
    _ack(conn, 0.4, 10, m, None, (0, 1))  # D-SACK of the resend: needless, but CE was seen
    info = conn.info()
    assert info["spurious_recoveries"] == 0 and info["cwnd"] <= reduced


def test_a_late_dsack_does_not_undo_an_ecn_reduction_made_since() -> None:
    """The recovery's reduction was kept; an ECE then cut cwnd for newer data and owes a
    CWR. A late D-SACK for the recovery's resend must not give that window back nor
    withdraw the CWR (before: cwnd and ssthresh restored, cwr_pending cleared)."""
    conn, m = _ecn_flight()
    _ack(conn, 0.3, 0, m, None, (1, 6))
    recv(conn, 0.3)
    _ack(conn, 0.31, 10, m, None)
    recv(conn, 0.31)
    top = conn._snd.max
    send(conn, 0.35, seq=rseq(1), ack=(lseq(0) + top) & 0xFFFFFFFF, window=65535,
         flags=ACK | ECE)
    assert conn._snd.ecn_cuts == 1 and conn._snd.cwr_pending
    cut = (conn.info()["cwnd"], conn.info()["ssthresh"])
    send(conn, 0.4, seq=rseq(1), ack=(lseq(0) + top) & 0xFFFFFFFF, window=65535,
         sack=((lseq(1 + m), lseq(1 + 2 * m)),))
    assert (conn.info()["cwnd"], conn.info()["ssthresh"]) == cut
    assert conn._snd.cwr_pending and conn.info()["spurious_recoveries"] == 0


def test_a_sack_block_4_gib_later_is_not_taken_for_a_dsack() -> None:
    """dsack_undo maps a block's right edge below the ACK; a block above it must not alias
    2**32 bytes down into an old recovery's range and undo it."""
    from stack.retransmit import RecoveryUndo

    conn, m, _tsv, _before = _flight()
    snd = conn._snd
    start = 1_000_000
    u = RecoveryUndo(cwnd=100 * m, ssthresh=1 << 30, ecn_high=0, start=start,
                     end=start + 10 * m)
    u.retrans = 1
    snd.rec_undo = u
    ack_abs = start + (1 << 32) + 5 * m
    wire_ack = (snd.iss + ack_abs) & 0xFFFFFFFF
    snd.dsack_undo(((wire_ack + 2 * m) & 0xFFFFFFFF, (wire_ack + 3 * m) & 0xFFFFFFFF), ack_abs)
    assert snd.rec_undo is u and snd.spurious_recoveries == 0

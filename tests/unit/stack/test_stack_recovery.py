"""Loss recovery: RFC 6298 RTO and Karn, RFC 5681 fast retransmit, RFC 6582 NewReno,
RFC 6675-style SACK holes, and R2 (RFC 9293 §3.8.3)."""

from __future__ import annotations

import pytest
from tcp_script import (
    REMOTE_SEQ,
    active,
    cfg,
    events,
    lseq,
    recv,
    recv_nothing,
    rseq,
    run_timers_while,
    send,
    syn_sent,
)

from stack.congestion import NewReno, initial_window
from stack.connection import TcpConnection
from stack.events import Closed, ConnectionReset
from stack.loss import RtoEstimator
from stack.state import State
from stack.wire.tcp import ACK, SYN

MSS = 1460


def _sizes(segs: list) -> list[int]:  # type: ignore[type-arg]
    return [len(s.payload) for s in segs]


def test_rfc5681_initial_window() -> None:
    assert initial_window(1460) == 4380
    assert initial_window(536) == 2144
    assert initial_window(2500) == 5000


def test_rfc5681_slow_start_then_window_grows() -> None:
    conn = active(cfg(nagle=False), window=65535)
    conn.send(bytes(40 * MSS))
    assert _sizes(recv(conn, 1.0)) == [MSS] * 3  # IW = 3 segments for SMSS 1460
    send(conn, 1.1, seq=rseq(1), ack=lseq(1 + 2 * MSS), window=65535)
    # cwnd += min(acked, 2 SMSS) = 3 + 2 = 5 segments, 1 still out: 4 new ones.
    assert _sizes(recv(conn, 1.1)) == [MSS] * 4


def test_rfc6298_initial_rto_is_one_second_and_doubles() -> None:
    est = RtoEstimator()
    assert est.rto == 1.0
    est.backoff()
    est.backoff()
    assert est.rto == 4.0
    est.sample(0.1)
    assert est.srtt == 0.1 and est.rttvar == 0.05
    assert est.rto == 1.0  # 0.1 + 4 * 0.05 = 0.3, rounded up to the 1 s minimum (§2.4)
    fine = RtoEstimator(minimum=0.2)
    fine.sample(0.1)
    fine.sample(0.2)
    assert fine.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.1)  # RTTVAR first (§2.3)
    assert fine.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)
    for _ in range(20):
        fine.backoff()
    assert fine.rto == 60.0  # the maximum (§2.5)


def test_rfc9293_must_19_rfc6298_timer_go_back_backoff_and_slow_start() -> None:
    conn = active(cfg(nagle=False), window=65535)
    conn.send(bytes(3 * MSS))
    recv(conn, 0.0)
    assert conn.get_timer() == pytest.approx(1.0)  # §5.1
    conn.handle_timer(1.0)
    segs = recv(conn, 1.0)
    # §5.4: the earliest unacknowledged segment; RFC 5681: cwnd = 1 SMSS.
    assert _sizes(segs) == [MSS] and segs[0].seq == lseq(1)
    assert conn.get_timer() == pytest.approx(3.0)  # §5.5: RTO doubled
    info = conn.info()
    assert info["cwnd"] == MSS and info["ssthresh"] == 2 * MSS
    send(conn, 3.5, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
    assert conn.get_timer() == pytest.approx(3.5 + 2.0)  # §5.3 restart, still backed off


def test_rfc9293_must_18_karn_no_sample_from_retransmission() -> None:
    conn = active(cfg(nagle=False), window=65535)
    srtt0 = conn.info()["srtt"]
    conn.send(b"x" * 100)
    recv(conn, 0.0)
    conn.handle_timer(1.0)
    recv(conn, 1.0)
    send(conn, 1.9, seq=rseq(1), ack=lseq(101), window=65535)  # ambiguous ACK
    assert conn.info()["srtt"] == srtt0


def test_rfc9293_must_20_r2_gives_up_with_timeout() -> None:
    conn = active(cfg(max_retries=2), window=65535)
    events(conn)
    conn.send(b"x")
    recv(conn, 0.0)
    for _ in range(2):
        t = conn.get_timer()
        assert t is not None
        conn.handle_timer(t)
        assert len(recv(conn, t)) == 1
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    assert conn.state is State.CLOSED
    assert events(conn) == [ConnectionReset("timeout"), Closed()]


def _flight(n: int) -> tuple:  # type: ignore[type-arg]
    conn = active(cfg(nagle=False, initial_cwnd=20 * MSS), window=65535)
    conn.send(bytes(n * MSS))
    segs = recv(conn, 0.0)
    assert len(segs) == n
    return conn, segs


def test_rfc5681_fast_retransmit_on_third_duplicate_ack() -> None:
    conn, _ = _flight(10)
    send(conn, 0.1, seq=rseq(1), ack=lseq(1 + MSS), window=65535)  # segment 2 lost
    recv(conn, 0.1)
    for i in range(2):
        send(conn, 0.1 + i / 100, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
        recv_nothing(conn, 0.1)
    send(conn, 0.13, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
    segs = recv(conn, 0.13)
    assert segs[0].seq == lseq(1 + MSS) and len(segs[0].payload) == MSS
    info = conn.info()
    # ssthresh = FlightSize / 2 = 9 * MSS / 2; cwnd = ssthresh + 3 SMSS.
    assert info["ssthresh"] == 9 * MSS // 2 and info["in_recovery"]
    assert info["cwnd"] == 9 * MSS // 2 + 3 * MSS


def test_rfc6582_newreno_partial_ack_retransmits_next_hole() -> None:
    conn, _ = _flight(10)  # segments 2 and 5 lost
    send(conn, 0.1, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
    for i in range(3):
        send(conn, 0.11 + i / 100, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
    segs = recv(conn, 0.14)
    assert segs[0].seq == lseq(1 + MSS)
    # The retransmission arrives: a partial ACK up to the next hole (segment 5).
    send(conn, 0.2, seq=rseq(1), ack=lseq(1 + 4 * MSS), window=65535)
    segs = recv(conn, 0.2)
    assert segs[0].seq == lseq(1 + 4 * MSS)
    assert conn.info()["in_recovery"]
    # Full ACK beyond `recover` ends recovery: cwnd = min(ssthresh, FlightSize + SMSS).
    send(conn, 0.3, seq=rseq(1), ack=lseq(1 + 10 * MSS), window=65535)
    info = conn.info()
    assert not info["in_recovery"]
    assert info["cwnd"] <= info["ssthresh"]  # type: ignore[operator]


def test_rfc6582_no_second_fast_retransmit_for_data_before_an_rto() -> None:
    cc = NewReno(1000)
    cc.on_timeout(snd_max=50_000, flight=40_000, first=True)
    for _ in range(3):
        assert not cc.on_dupack(snd_una=20_000, snd_max=50_000, flight=30_000)


def test_rfc6675_sack_holes_are_retransmitted_one_per_dupack() -> None:
    conn = active(cfg(nagle=False, initial_cwnd=20 * MSS, sack=True), window=65535,
                  sack_perm=True)
    conn.send(bytes(10 * MSS))
    recv(conn, 0.0)

    def sack_ack(t: float, *blocks: tuple[int, int]) -> None:
        send(conn, t, seq=rseq(1), ack=lseq(1 + MSS), window=65535,
             sack=tuple((lseq(1 + a * MSS), lseq(1 + b * MSS)) for a, b in blocks))

    # Segments 1 and 3 lost (0-based), the rest SACKed as they arrive.
    send(conn, 0.1, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
    recv(conn, 0.1)
    sack_ack(0.1, (2, 3))
    sack_ack(0.1, (2, 3), (4, 5))
    sack_ack(0.1, (2, 3), (4, 6))
    first = recv(conn, 0.1)
    assert first[0].seq == lseq(1 + MSS)  # fast retransmit of the first hole
    info = conn.info()
    assert info["cwnd"] == info["ssthresh"] == 9 * MSS // 2  # RFC 6675: no inflation
    # Segment 3 has only 2 SMSS SACKed above it: not yet lost (IsLost), and pipe
    # (4 SMSS) leaves no room under cwnd (4.5 SMSS).
    sack_ack(0.11, (2, 3), (4, 7))
    recv_nothing(conn, 0.11)
    sack_ack(0.12, (2, 3), (4, 8))
    second = recv(conn, 0.12)
    assert second[0].seq == lseq(1 + 3 * MSS)  # the next hole, without waiting an RTT
    assert conn.info()["retransmissions"] == 2


def test_rfc6675_5_1_sack_information_is_kept_across_an_rto() -> None:
    """Issue 11 #2: after a timeout the sender resends the holes, not what the receiver
    already SACKed (RFC 6675 §5.1: use the SACK information in the slow start after an
    RTO; Linux keeps its scoreboard unless the receiver reneges)."""
    conn = _sack_flight(4)
    _sacks(conn, 0.1, 0, 65535, (2, 4))  # segments 0 and 1 lost; 2 SMSS SACKed: not lost
    recv_nothing(conn, 0.1)
    t = conn.get_timer() or 0.0
    conn.handle_timer(t)
    assert [s.seq for s in recv(conn, t)] == [lseq(1)]  # cwnd = 1 SMSS
    assert conn._snd.board.sacked
    _sacks(conn, t + 0.01, 1, 65535, (2, 4))
    # cwnd = 2 SMSS: the second hole only, not the SACKed segments 2 and 3
    assert [s.seq for s in recv(conn, t + 0.01)] == [lseq(1 + MSS)]


def test_rfc2018_8_sack_reneging_forgets_the_scoreboard() -> None:
    """A cumulative ACK that stops at the start of a SACKed range: the receiver discarded
    what it SACKed (RFC 2018 §8); its SACK information is forgotten (Linux
    tcp_check_sack_reneging)."""
    conn = _sack_flight(4)
    _sacks(conn, 0.1, 0, 65535, (2, 4))
    assert conn._snd.board.sacked
    _sacks(conn, 0.11, 2, 65535)  # up to segment 2, which was SACKed, and no further
    assert conn._snd.board.sacked == []


def test_rfc5681_4_1_idle_restart_window() -> None:
    conn = active(cfg(nagle=False, initial_cwnd=30 * MSS), window=65535)
    conn.send(bytes(MSS))
    recv(conn, 0.0)
    send(conn, 0.1, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
    conn.send(bytes(20 * MSS))
    assert len(recv(conn, 100.0)) == 3  # idle > RTO: back to IW (3 segments)


def test_rfc6675_islost_setpipe_nextseg_arithmetic() -> None:
    from stack.loss import lost_edge, next_hole, pipe, sacked_between

    m = 1000
    sacked = [(2 * m, 3 * m), (4 * m, 7 * m)]  # holes: [0,2m) [3m,4m) [7m,10m)
    assert sacked_between(sacked, 0, 10 * m) == 4 * m
    # IsLost: more than 2 SMSS SACKed above: true below 5m (3m..5m of the top range).
    edge = lost_edge(0, sacked, m)
    assert edge == 5 * m
    assert lost_edge(0, [(4 * m, 6 * m)], m) == 0  # exactly 2 SMSS above: not lost
    # SetPipe: unSACKed and not lost [5m,10m) minus SACKed [5m,7m) = 3m; nothing resent.
    assert pipe(0, 10 * m, 0, sacked, edge) == 3 * m
    # After resending [0, 2m): those octets count too.
    assert pipe(0, 10 * m, 2 * m, sacked, edge) == 5 * m
    # NextSeg rule 1 from HighRxt = 2m: the hole at 3m; rule 3 up to the top SACK: none
    # above 7m below 7m.
    assert next_hole(2 * m, edge, sacked) == 3 * m
    assert next_hole(4 * m, edge, sacked) is None
    assert next_hole(4 * m, 7 * m, sacked) is None
    assert next_hole(0, edge, sacked) == 0


def test_rfc9293_must_54_56_packet_too_big_lowers_the_send_mss() -> None:
    conn = active(cfg(nagle=False, initial_cwnd=10 * MSS), window=65535)
    conn.send(bytes(4 * MSS))
    assert _sizes(recv(conn, 1.0)) == [MSS] * 4
    conn.path_mtu(1280)  # e.g. an ICMP Fragmentation Needed from a tunnel on the path
    assert conn.send_mss == 1240
    segs = recv(conn, 1.01)  # what was in flight goes again, in smaller segments
    assert segs[0].seq == lseq(1) and max(_sizes(segs)) == 1240
    assert sum(_sizes(segs)) == 4 * MSS
    conn.path_mtu(9000)  # never raised
    conn.path_mtu(100)  # never below the RFC 9293 MUST-15 default
    assert conn.send_mss == 536
    assert conn.state is State.ESTABLISHED  # MUST-56: not a reason to abort


def test_rfc9293_shld_11_data_r2_lasts_at_least_100_seconds() -> None:
    conn = active(cfg(), window=65535)
    conn.send(b"x")
    recv(conn, 0.0)
    assert run_timers_while(conn, State.ESTABLISHED) >= 100.0
    assert events(conn)[-2:] == [ConnectionReset("timeout"), Closed()]


def test_rfc2018_sack_blocks_on_a_new_ack_reach_the_scoreboard() -> None:
    conn = active(cfg(nagle=False, initial_cwnd=20 * MSS, sack=True), window=65535,
                  sack_perm=True)
    conn.send(bytes(6 * MSS))
    recv(conn, 0.0)
    # A cumulative ACK of one segment that also SACKs segments 3-4 (2 is missing).
    send(conn, 0.1, seq=rseq(1), ack=lseq(1 + MSS), window=65535,
         sack=((lseq(1 + 2 * MSS), lseq(1 + 4 * MSS)),))
    assert conn._snd.board.sacked == [(1 + 2 * MSS, 1 + 4 * MSS)]


def test_sack_negotiated_but_no_blocks_falls_back_to_newreno_partial_acks() -> None:
    conn = active(cfg(nagle=False, initial_cwnd=20 * MSS, sack=True), window=65535,
                  sack_perm=True)
    conn.send(bytes(10 * MSS))
    recv(conn, 0.0)
    send(conn, 0.1, seq=rseq(1), ack=lseq(1 + MSS), window=65535)  # 2 and 5 lost, no SACK
    for i in range(3):
        send(conn, 0.11 + i / 100, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
    assert recv(conn, 0.14)[0].seq == lseq(1 + MSS)
    send(conn, 0.2, seq=rseq(1), ack=lseq(1 + 4 * MSS), window=65535)  # partial ACK
    assert recv(conn, 0.2)[0].seq == lseq(1 + 4 * MSS)  # the next hole, no RTO needed


def _sack_flight(n: int) -> TcpConnection:
    conn = active(cfg(nagle=False, initial_cwnd=20 * MSS, sack=True), window=65535,
                  sack_perm=True)
    conn.send(bytes(n * MSS))
    assert len(recv(conn, 0.0)) == n
    return conn


def _sacks(conn: TcpConnection, t: float, una: int, window: int,
           *blocks: tuple[int, int]) -> None:
    send(conn, t, seq=rseq(1), ack=lseq(1 + una * MSS), window=window,
         sack=tuple((lseq(1 + a * MSS), lseq(1 + b * MSS)) for a, b in blocks))


def test_rfc6675_dupack_with_sack_needs_no_unchanged_window() -> None:
    """Issue 11 #4: the receiver's window grows with every ACK (its application reads);
    an ACK SACKing new data is a duplicate ACK all the same (RFC 6675 §2, "DupAck"), so
    the third one starts recovery (§5) instead of waiting for the RTO."""
    conn = _sack_flight(10)
    for i in range(3):  # segment 0 lost; 1, 2, 3 SACKed one by one, the window growing
        _sacks(conn, 0.1 + i / 100, 0, 20000 + 1000 * i, (1, 2 + i))
        if i < 2:
            assert all(s.seq != lseq(1) for s in recv(conn, 0.1 + i / 100))
    segs = recv(conn, 0.13)
    assert segs and segs[0].seq == lseq(1) and len(segs[0].payload) == MSS
    assert conn.info()["in_recovery"]


def test_rfc6675_islost_starts_recovery_before_three_dupacks() -> None:
    """RFC 6675 §5 step (2): IsLost(HighACK + 1), more than (DupThresh - 1) * SMSS SACKed
    above SND.UNA, starts recovery even on the first duplicate ACK (the others were lost
    or stretched into one)."""
    conn = _sack_flight(10)
    _sacks(conn, 0.1, 0, 65535, (1, 5))
    segs = recv(conn, 0.1)
    assert segs and segs[0].seq == lseq(1)
    assert conn.info()["in_recovery"]


def test_rfc6675_rescue_retransmission_of_the_tail() -> None:
    """RFC 6675 §4 NextSeg rule (4): the first and the last segment are lost and there is
    no new data; the last one is neither lost by IsLost nor below a SACKed block, so only
    the rescue retransmission (once per recovery) resends it before the RTO."""
    conn = _sack_flight(6)
    _sacks(conn, 0.1, 0, 65535, (1, 5))  # segments 0 and 5 lost
    segs = recv(conn, 0.1)
    assert [s.seq for s in segs] == [lseq(1), lseq(1 + 5 * MSS)]
    assert len(segs[1].payload) == MSS
    _sacks(conn, 0.11, 0, 65535, (1, 5))
    recv_nothing(conn, 0.11)  # once per recovery


def test_linux_rto_min_is_added_to_srtt_not_a_floor_on_the_sum() -> None:
    """Issue 11 #2: Linux computes RTO = SRTT + max(4 * RTTVAR, rto_min) (its RTTVAR never
    drops below TCP_RTO_MIN), so a peer's 200 ms delayed ACK a LAN RTT away never meets a
    timer set to exactly 200 ms; RFC 6298 §2.4's floor on the sum would fire first."""
    est = RtoEstimator(initial=1.0, minimum=0.2, var_min=0.2)
    for _ in range(20):
        est.sample(0.001)
    assert est.rto == pytest.approx(0.201)
    rfc = RtoEstimator(initial=1.0, minimum=0.2)
    rfc.sample(0.001)
    assert rfc.rto == pytest.approx(0.2)  # the RFC 6298 floor, unchanged without var_min


def test_one_small_write_to_a_200ms_delayed_ack_peer_is_not_retransmitted() -> None:
    conn = syn_sent(cfg(nagle=False, rto_min=0.2, rto_var_min=0.2), 0.0)
    send(conn, 0.001, flags=SYN | ACK, seq=REMOTE_SEQ, ack=lseq(1), mss=1460)
    recv(conn, 0.001)
    conn.send(b"x" * 100)
    assert _sizes(recv(conn, 1.0)) == [100]
    timer = conn.get_timer()
    assert timer is not None and timer > 1.2005
    send(conn, 1.2005, seq=rseq(1), ack=lseq(101), window=65535)  # 200 ms delayed ACK
    assert conn.info()["retransmissions"] == 0
    assert conn.info()["cwnd"] >= 3 * MSS


def test_rfc4015_spurious_rto_detected_by_timestamps_is_undone() -> None:
    """Issue 11 #2: the peer's ACK was only late (a 200 ms delayed ACK, a delay spike):
    the first ACK after the timeout echoes the TSval of the original transmission, not of
    the retransmission (RFC 3522 Eifel detection), so the timeout was spurious: ssthresh
    and cwnd come back (RFC 4015 §3 response) and the sender goes on with new data
    instead of resending the whole flight (SND.NXT = SND.MAX)."""
    conn = active(cfg(nagle=False, timestamps=True, rto_min=0.2, rto_var_min=0.2),
                  0.0, window=65535, ts=(1000, 0))
    m = conn.send_mss  # 1460 less the TSopt
    conn.send(bytes(6 * m))
    first = recv(conn, 1.0)
    assert len(first) == 3 and first[0].ts is not None
    before = conn.info()
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    rx = recv(conn, t)
    assert [s.seq for s in rx] == [lseq(1)]
    assert conn.info()["cwnd"] == m
    # The late ACK of the whole first flight, echoing the original segments' TSval.
    send(conn, t + 0.05, seq=rseq(1), ack=lseq(1 + 3 * m), window=65535,
         ts=(1001, first[2].ts[0]))
    info = conn.info()
    assert info["ssthresh"] == before["ssthresh"]
    assert info["cwnd"] >= 3 * m  # type: ignore[operator]
    nxt = recv(conn, t + 0.05)
    assert [s.seq for s in nxt] == [lseq(1 + 3 * m), lseq(1 + 4 * m), lseq(1 + 5 * m)]


def test_rfc3522_a_real_loss_is_not_undone() -> None:
    conn = active(cfg(nagle=False, timestamps=True, rto_min=0.2, rto_var_min=0.2),
                  0.0, window=65535, ts=(1000, 0))
    conn.send(bytes(6 * MSS))
    recv(conn, 1.0)
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    (rx,) = recv(conn, t)
    assert rx.ts is not None
    # The ACK the retransmission caused: it echoes the retransmission's TSval.
    send(conn, t + 0.05, seq=rseq(1), ack=lseq(1 + 3 * MSS), window=65535,
         ts=(1001, rx.ts[0]))
    info = conn.info()
    assert info["ssthresh"] < 1 << 30  # type: ignore[operator]


def _frto_flight() -> tuple[TcpConnection, float]:
    """No timestamps: six segments out, three in flight, the RTO fires and resends one."""
    conn = active(cfg(nagle=False, rto_min=0.2, rto_var_min=0.2, initial_cwnd=3 * MSS),
                  0.0, window=65535)
    conn.send(bytes(8 * MSS))
    assert len(recv(conn, 0.0)) == 3
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    assert [s.seq for s in recv(conn, t)] == [lseq(1)]
    return conn, t


def test_rfc5682_frto_detects_a_spurious_timeout_without_timestamps() -> None:
    """The originals were only delayed: the ACK of the first two arrives, F-RTO sends new
    data (not the rest of the flight), and the next ACK covers the third original too:
    the timeout was spurious, ssthresh comes back (RFC 5682 §2 step 3b, RFC 4015)."""
    conn, t = _frto_flight()
    before_ss = 1 << 30
    send(conn, t + 0.01, seq=rseq(1), ack=lseq(1 + 2 * MSS), window=65535)
    nxt = [s.seq for s in recv(conn, t + 0.01)]
    assert nxt and nxt[0] == lseq(1 + 3 * MSS)  # new data, not segment 2 again
    send(conn, t + 0.02, seq=rseq(1), ack=lseq(1 + 4 * MSS), window=65535)
    info = conn.info()
    assert info["spurious_rtos"] == 1 and info["ssthresh"] == before_ss


def test_rfc5682_frto_duplicate_ack_means_a_real_loss() -> None:
    conn, t = _frto_flight()
    send(conn, t + 0.01, seq=rseq(1), ack=lseq(1 + MSS), window=65535)
    assert [s.seq for s in recv(conn, t + 0.01)][:1] == [lseq(1 + 3 * MSS)]
    send(conn, t + 0.02, seq=rseq(1), ack=lseq(1 + MSS), window=65535)  # duplicate
    again = [s.seq for s in recv(conn, t + 0.02)]
    assert again[:1] == [lseq(1 + MSS)]  # resend the flight from SND.UNA
    assert conn.info()["spurious_rtos"] == 0

"""Options in connections: MSS (RFC 9293), WSopt/TSopt/PAWS (RFC 7323), SACK (RFC 2018)."""

from __future__ import annotations

from tcp_script import (
    BASE,
    LOCAL,
    LOCAL_SEQ,
    REMOTE,
    REMOTE_SEQ,
    active,
    cfg,
    events,
    expect,
    lseq,
    passive,
    recv,
    recv_nothing,
    recv_one,
    rseq,
    send,
    wire,
)

from stack.connection import TcpConnection
from stack.events import Connected, DataReceived
from stack.wire.tcp import ACK, SYN, TcpSegment

ALL = cfg(window_scaling=True, timestamps=True, sack=True, recv_buffer=1 << 20)
IPV6_LOCAL = (bytes(15) + b"\x01", 80)
IPV6_REMOTE = (bytes(15) + b"\x02", 5000)


def test_rfc9293_must_14_our_syn_carries_mss_and_options() -> None:
    conn = TcpConnection(LOCAL, REMOTE, ALL, iss=LOCAL_SEQ)
    conn.connect(1.0)
    syn = recv_one(conn, 1.0)
    expect(syn, mss=1460, wscale=5, sack_perm=True, window=65535)
    assert syn.ts is not None and syn.ts[1] == 0


def test_rfc9293_must_15_default_send_mss_without_option() -> None:
    conn = TcpConnection(LOCAL, REMOTE, BASE, iss=LOCAL_SEQ)
    conn.listen()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ)  # no MSS option
    assert conn.send_mss == 536
    conn6 = TcpConnection(IPV6_LOCAL, IPV6_REMOTE, BASE, iss=LOCAL_SEQ)
    conn6.listen()
    conn6.receive_segment(wire(TcpSegment(5000, 80, 1, 0, SYN, 1000), IPV6_REMOTE[0],
                               IPV6_LOCAL[0]), 0.0)
    assert conn6.send_mss == 1220


def test_rfc9293_must_65_no_mss_on_non_syn_segments() -> None:
    conn = passive(ALL, wscale=2, sack_perm=True, ts=(100, 0))
    conn.send(b"data")
    for seg in recv(conn, 1.0):
        assert seg.mss is None and seg.wscale is None and not seg.sack_perm


def test_rfc7323_window_scaling_applies_both_ways() -> None:
    conn = passive(ALL, wscale=3)
    events(conn)
    # Their windows are scaled by 3: 1000 << 3 = 8000 bytes.
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), window=1000, ts=(101, 0))
    conn.send(b"x" * 20000)
    sent = sum(len(s.payload) for s in recv(conn, 1.0))
    assert sent == min(8000, conn.info()["cwnd"])  # type: ignore[type-var]
    # Ours are scaled by 5 (1 MiB buffer): 2**20 >> 5 = 32768 when empty.
    assert recv(conn, 1.0) == []
    send(conn, 1.1, seq=rseq(1), ack=lseq(1), window=1000, ts=(102, 0), payload=b"y" * 1448)
    send(conn, 1.1, seq=rseq(1449), ack=lseq(1), window=1000, ts=(102, 0), payload=b"y" * 1448)
    seg = recv(conn, 1.1)[-1]
    # 2896 bytes unread: the right edge stays at 2**20 past the start, rounded up.
    assert seg.window == -(-((1 << 20) - 2896) >> 5)


def test_rfc7323_no_scaling_unless_both_offer_it() -> None:
    conn = passive(ALL)  # the peer's SYN has no WSopt
    assert conn.info()["wscale"] is None
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 1448, ts=(2, 0))
    send(conn, 1.0, seq=rseq(1449), ack=lseq(1), payload=b"a" * 1448, ts=(2, 0))
    assert recv_one(conn, 1.0).window == 65535  # capped at 16 bits, unscaled


def test_rfc7323_syn_ack_window_is_not_scaled() -> None:
    conn = TcpConnection(LOCAL, REMOTE, ALL, iss=LOCAL_SEQ)
    conn.listen()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ, wscale=14, window=100)
    synack = recv_one(conn, 0.0)
    expect(synack, window=65535, wscale=5)
    assert conn.info()["snd_wnd"] == 100  # their SYN's window is taken as is


def test_rfc7323_wscale_above_14_is_taken_as_14() -> None:
    conn = passive(ALL, wscale=15, ts=(1, 0))
    assert conn.info()["wscale"] == (14, 5)


def test_rfc7323_tsopt_in_every_segment_echoing_ts_recent() -> None:
    conn = passive(ALL, ts=(1000, 0))
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), ts=(1005, 0), payload=b"ab")
    conn.handle_timer(2.0)
    ack = recv_one(conn, 2.0)
    assert ack.ts is not None and ack.ts[1] == 1005


def test_rfc7323_paws_drops_old_timestamp_and_acks() -> None:
    conn = passive(ALL, ts=(1000, 0))
    events(conn)
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), ts=(2000, 0), payload=b"new")
    recv(conn, 1.0)
    send(conn, 1.1, seq=rseq(4), ack=lseq(1), ts=(1500, 0), payload=b"old")  # TSval went back
    assert conn.drops["paws"] == 1
    expect(recv_one(conn, 1.1), flags=ACK, ack=rseq(4))
    assert events(conn) == [DataReceived(b"new")]


def test_rfc7323_paws_works_across_the_tsval_wrap() -> None:
    conn = passive(ALL, ts=(0xFFFF_FFF0, 0))
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), ts=(5, 0), payload=b"wrapped")  # newer
    assert conn.read() == b"wrapped"


def test_rfc7323_segment_without_tsopt_is_dropped_silently() -> None:
    conn = passive(ALL, ts=(1000, 0))
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"no ts")
    recv_nothing(conn, 1.0)
    assert conn.drops["missing_timestamp"] == 1
    assert conn.read() == b""


def test_rfc7323_rst_without_tsopt_is_accepted() -> None:
    conn = passive(ALL, ts=(1000, 0))
    send(conn, 1.0, flags=0x04, seq=rseq(1))
    assert conn.state.name == "CLOSED"


def test_rfc7323_rttm_from_tsecr() -> None:
    conn = active(ALL, ts=(1, 0), sack_perm=True, wscale=0)
    conn.send(b"x" * 100)
    seg = recv_one(conn, 1.0)
    assert seg.ts is not None
    send(conn, 1.25, seq=rseq(1), ack=lseq(101), ts=(2, seg.ts[0]))
    # The SYN-ACK gave R = 0 (no TSecr: timed), then TSecr gives R = 0.25:
    # SRTT = 7/8 * 0 + 1/8 * 0.25 (RFC 6298 §2.3).
    assert abs(conn.info()["srtt"] - 0.25 / 8) < 0.001  # type: ignore[operator]


def test_rfc2018_sack_blocks_most_recent_first() -> None:
    conn = passive(ALL, sack_perm=True, ts=(10, 0))
    send(conn, 1.0, seq=rseq(101), ack=lseq(1), ts=(11, 0), payload=b"b" * 10)
    first = recv_one(conn, 1.0)
    assert first.sack == ((rseq(101), rseq(111)),)
    send(conn, 1.0, seq=rseq(201), ack=lseq(1), ts=(11, 0), payload=b"c" * 10)
    second = recv_one(conn, 1.0)
    assert second.sack == ((rseq(201), rseq(211)), (rseq(101), rseq(111)))
    send(conn, 1.0, seq=rseq(111), ack=lseq(1), ts=(11, 0), payload=b"b" * 10)  # extends one
    third = recv_one(conn, 1.0)
    assert third.sack == ((rseq(101), rseq(121)), (rseq(201), rseq(211)))
    assert third.ack == rseq(1)


def test_rfc2018_no_sack_blocks_unless_permitted() -> None:
    conn = passive(ALL, ts=(10, 0))  # the peer did not send SACK-permitted
    send(conn, 1.0, seq=rseq(101), ack=lseq(1), ts=(11, 0), payload=b"b" * 10)
    assert recv_one(conn, 1.0).sack == ()


def test_options_handshake_then_data_event() -> None:
    conn = active(ALL, ts=(7, 0), sack_perm=True, wscale=2)
    assert events(conn) == [Connected()]


def test_rfc9293_must_67_advertised_mss_comes_from_the_mtu() -> None:
    conn6 = TcpConnection(IPV6_LOCAL, IPV6_REMOTE, cfg(mss=0, mtu=1500), iss=LOCAL_SEQ)
    conn6.connect(0.0)
    [syn6] = conn6.segments_to_send(0.0)
    assert syn6.mss == 1440  # 1500 - 40 (IPv6) - 20 (TCP)
    conn4 = TcpConnection(LOCAL, REMOTE, cfg(mss=0, mtu=9000), iss=LOCAL_SEQ)
    conn4.connect(0.0)
    [syn4] = conn4.segments_to_send(0.0)
    assert syn4.mss == 8960


def test_rfc2883_dsack_reports_a_duplicate_once() -> None:
    conn = passive(ALL, sack_perm=True, ts=(10, 0))
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), ts=(11, 0), payload=b"a" * 100)
    recv(conn, 1.0)
    send(conn, 1.1, seq=rseq(1), ack=lseq(1), ts=(12, 0), payload=b"a" * 100)  # again
    dup = recv_one(conn, 1.1)
    assert dup.sack == ((rseq(1), rseq(101)),) and dup.ack == rseq(101)
    send(conn, 1.2, seq=rseq(51), ack=lseq(1), ts=(13, 0), payload=b"a" * 50 + b"b" * 50)
    conn.handle_timer(2.0)
    part = recv_one(conn, 2.0)  # the overlapping half is reported, the rest taken
    assert part.sack == ((rseq(51), rseq(101)),) and part.ack == rseq(151)
    send(conn, 2.5, seq=rseq(151), ack=lseq(1), ts=(14, 0), payload=b"c" * 10)
    conn.handle_timer(3.0)
    assert recv_one(conn, 3.0).sack == ()  # reported once only


def test_rfc2883_dsack_reports_a_duplicate_of_out_of_order_data() -> None:
    """RFC 2883 §4 Example 3: a segment held already above a hole comes again (the sender
    retransmitted it too early, or the network duplicated it): the ACK's first SACK block
    names it, before the block that holds it. A Linux sender learns reordering from it."""
    conn = passive(ALL, sack_perm=True, ts=(10, 0))
    send(conn, 1.0, seq=rseq(101), ack=lseq(1), ts=(11, 0), payload=b"b" * 100)  # a hole
    assert recv_one(conn, 1.0).sack == ((rseq(101), rseq(201)),)
    send(conn, 1.1, seq=rseq(101), ack=lseq(1), ts=(12, 0), payload=b"b" * 100)  # again
    dup = recv_one(conn, 1.1)
    assert dup.ack == rseq(1)
    assert dup.sack == ((rseq(101), rseq(201)), (rseq(101), rseq(201)))
    send(conn, 1.2, seq=rseq(301), ack=lseq(1), ts=(13, 0), payload=b"d" * 10)
    assert recv_one(conn, 1.2).sack == ((rseq(301), rseq(311)), (rseq(101), rseq(201)))

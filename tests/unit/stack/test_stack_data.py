"""Data transfer rules: acceptability, ACK policy, windows, SWS, Nagle, probes (RFC 9293)."""

from __future__ import annotations

import pytest
from tcp_script import (
    SEND_TEMPL,
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
)

from stack.events import Connected, DataReceived, LocalProtocolError
from stack.wire.tcp import ACK, PSH


def test_a_reused_buffer_is_copied_and_an_immutable_frame_is_kept() -> None:
    """The caller may reuse its receive buffer (a bytearray) once receive_segment returns;
    a view into an immutable bytes frame (a TUN's GRO frame) is kept without a copy, in the
    fast path and in the slow path (stack/receive.py `keep`), and delivered joined once."""
    conn = passive()
    events(conn)
    buf = bytearray(b"a" * 1000)
    conn.receive_segment(SEND_TEMPL._replace(seq=rseq(1), ack=lseq(1),
                                             payload=memoryview(buf)), 1.0)
    buf[:] = b"b" * 1000  # reused at once
    frame = bytes(40) + b"c" * 1000
    conn.receive_segment(SEND_TEMPL._replace(seq=rseq(1001), ack=lseq(1),
                                             payload=memoryview(frame)[40:]), 1.0)
    assert conn.fast_path == 2
    frame2 = bytes(40) + b"d" * 500
    conn.receive_segment(SEND_TEMPL._replace(seq=rseq(2001), ack=lseq(1), flags=ACK | PSH,
                                             window=1000,  # a new window: the slow path
                                             payload=memoryview(frame2)[40:]), 1.0)
    assert conn.fast_path == 2
    rx = conn._rcv.rx  # white box: what the receive queue holds
    assert [getattr(c, "obj", None) for c in rx] == [None, frame, frame2]
    small = bytes(2000) + b"e" * 10  # a view that would pin a much larger buffer: copied
    conn.receive_segment(SEND_TEMPL._replace(seq=rseq(2501), ack=lseq(1), window=1000,
                                             payload=memoryview(small)[2000:]), 1.0)
    assert type(rx[-1]) is bytes
    assert events(conn) == [DataReceived(b"a" * 1000 + b"c" * 1000 + b"d" * 500 + b"e" * 10)]


def test_rfc9293_in_order_data_is_delivered_across_the_wrap() -> None:
    conn = passive()
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"0123456789abcdefghij")
    assert events(conn) == [Connected(), DataReceived(b"0123456789abcdefghij")]
    assert rseq(21) < rseq(1)  # the peer's sequence numbers wrapped inside that segment
    send(conn, 1.0, seq=rseq(21), ack=lseq(1), payload=b"more")
    assert conn.read() == b"more"


@pytest.mark.parametrize(
    ("window", "seq_off", "payload", "acceptable"),
    [
        (0, 0, b"", True),  # case 1: SEG.LEN = 0, RCV.WND = 0: SEG.SEQ = RCV.NXT
        (0, 1, b"", False),
        (100, 0, b"", True),  # case 2: RCV.NXT =< SEG.SEQ < RCV.NXT + RCV.WND
        (100, 99, b"", True),
        (100, 100, b"", False),
        (100, -1, b"", False),
        (0, 0, b"x", False),  # case 3: SEG.LEN > 0, RCV.WND = 0: never
        (100, 0, b"xy", True),  # case 4: either end inside the window
        (100, -1, b"xy", True),
        (100, 99, b"xy", True),
        (100, 100, b"xy", False),
        (100, -2, b"xy", False),
    ],
)
def test_rfc9293_acceptability_test_four_cases(
    window: int, seq_off: int, payload: bytes, acceptable: bool
) -> None:
    conn = passive(cfg(recv_buffer=200, mss=100))
    events(conn)
    # Fill the buffer so that exactly `window` bytes of window remain at RCV.NXT.
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"f" * (200 - window))
    recv(conn, 1.0)
    conn._rcv.adv = conn._rcv.nxt + window  # the window we advertised last (white box)
    def refused() -> int:  # a zero window refuses text but still takes the ACK (MUST-66)
        return conn.drops.get("unacceptable", 0) + conn.drops.get("zero_window", 0)

    drops_before = refused()
    send(conn, 2.0, seq=rseq(1 + 200 - window + seq_off), ack=lseq(1), payload=payload)
    got_unacceptable = refused() - drops_before
    assert got_unacceptable == (0 if acceptable else 1)
    if not acceptable:
        # RFC 9293 §3.10.7.4: an unacceptable segment is answered with an ACK.
        expect(recv_one(conn, 2.0), flags=ACK, seq=lseq(1), ack=rseq(1 + 200 - window))


def test_rfc9293_unacceptable_old_duplicate_gets_ack() -> None:
    conn = passive()
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"abc")
    recv(conn, 1.0)
    send(conn, 2.0, seq=rseq(1), ack=lseq(1), payload=b"a")  # entirely old
    expect(recv_one(conn, 2.0), flags=ACK, ack=rseq(4))


def test_rfc9293_must_40_delayed_ack_under_half_a_second() -> None:
    conn = passive(cfg(delayed_ack=0.2))
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"abc")
    recv_nothing(conn, 1.0)
    assert conn.get_timer() == pytest.approx(1.2)
    conn.handle_timer(1.2)
    expect(recv_one(conn, 1.2), flags=ACK, ack=rseq(4))
    assert conn.get_timer() is None
    with pytest.raises(ValueError):
        cfg(delayed_ack=0.5)


def test_rfc9293_shld_19_ack_every_second_full_segment() -> None:
    conn = passive()
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 1460)
    recv_nothing(conn, 1.0)
    send(conn, 1.0, seq=rseq(1461), ack=lseq(1), payload=b"b" * 1460)
    expect(recv_one(conn, 1.0), ack=rseq(2921))


def test_rfc9293_must_58_59_acks_are_aggregated_over_a_batch() -> None:
    conn = passive()
    for i in range(6):
        send(conn, 1.0, seq=rseq(1 + 1460 * i), ack=lseq(1), payload=b"z" * 1460)
    expect(recv_one(conn, 1.0), ack=rseq(1 + 6 * 1460))  # one ACK for the whole batch


def test_super_segment_larger_than_mss_is_accepted() -> None:
    conn = passive(cfg(recv_buffer=1 << 20, mss=1460, window_scaling=True), wscale=7)
    blob = bytes(range(250)) * 240  # 60,000 bytes: a TSO/GRO super-segment
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=blob, window=4096)
    expect(recv_one(conn, 1.0), ack=rseq(1 + len(blob)))
    assert conn.read() == blob


def test_rfc5681_out_of_order_data_gets_immediate_duplicate_ack() -> None:
    conn = passive()
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"aaaa")
    recv(conn, 1.0)
    send(conn, 1.1, seq=rseq(9), ack=lseq(1), payload=b"cccc")  # hole at 5..8
    expect(recv_one(conn, 1.1), ack=rseq(5))
    send(conn, 1.2, seq=rseq(13), ack=lseq(1), payload=b"dddd")
    expect(recv_one(conn, 1.2), ack=rseq(5))
    # RFC 5681 §4.2: the segment filling the gap is acknowledged at once.
    send(conn, 1.3, seq=rseq(5), ack=lseq(1), payload=b"bbbb")
    expect(recv_one(conn, 1.3), ack=rseq(17))
    assert conn.read() == b"aaaabbbbccccdddd"


def test_rfc9293_shld_31_reassembly_is_bounded() -> None:
    conn = passive(cfg(reassembly_cap=10))
    send(conn, 1.0, seq=rseq(101), ack=lseq(1), payload=b"x" * 8)
    send(conn, 1.0, seq=rseq(201), ack=lseq(1), payload=b"y" * 8)  # over the cap: dropped
    assert conn.drops["reassembly_full"] == 1
    assert conn.info()["out_of_order"] == 8


def test_overlapping_retransmission_is_trimmed() -> None:
    conn = passive()
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"hello")
    send(conn, 1.0, seq=rseq(3), ack=lseq(1), payload=b"llo world")
    assert conn.read() == b"hello world"


def test_rfc9293_must_39_receiver_sws_avoidance_and_back_pressure() -> None:
    conn = passive(cfg(recv_buffer=4000, mss=1000, auto_consume=False))
    events(conn)
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 1000)
    send(conn, 1.0, seq=rseq(1001), ack=lseq(1), payload=b"b" * 1000)
    expect(recv_one(conn, 1.0), ack=rseq(2001), window=2000)
    send(conn, 1.1, seq=rseq(2001), ack=lseq(1), payload=b"c" * 1500)
    conn.handle_timer(2.0)
    # Only 500 bytes free < min(RCV.BUFF/2, MSS): the right edge stays put (4001), it
    # neither advances by a silly amount nor shrinks.
    expect(recv_one(conn, 2.0), ack=rseq(3501), window=500)
    send(conn, 2.1, seq=rseq(3501), ack=lseq(1), payload=b"d" * 500)
    conn.handle_timer(3.0)
    expect(recv_one(conn, 3.0), ack=rseq(4001), window=0)
    [ev] = events(conn)
    assert isinstance(ev, DataReceived) and len(ev.data) == 4000
    conn.consumed(300)  # a small read: no window update (it would be a silly window)
    recv_nothing(conn, 3.1)
    conn.consumed(3700)  # the window grows by a useful amount: update at once
    expect(recv_one(conn, 3.2), ack=rseq(4001), window=4000)
    with pytest.raises(LocalProtocolError):
        conn.consumed(1)


def test_rfc9293_must_34_window_is_never_shrunk_by_us() -> None:
    conn = passive(cfg(recv_buffer=4000, mss=1000, auto_consume=False))
    recv_nothing(conn, 0.0)
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 3000)
    seg = recv_one(conn, 1.0)
    assert seg.ack + seg.window >= rseq(1) + 4000 - 2**32 or seg.window == 1000


def test_rfc9293_must_38_sender_sws_avoidance() -> None:
    conn = active(cfg(nagle=False), window=2000)  # the largest window offered: 2000
    conn.send(b"q" * 5000)
    # 540 bytes of window after one full segment: < SMSS and < max window / 2: wait.
    assert [len(s.payload) for s in recv(conn, 1.0)] == [1460]
    # A window of at least half the largest one lets a sub-MSS segment go.
    send(conn, 1.1, seq=rseq(1), ack=lseq(1461), window=1000)
    assert [len(s.payload) for s in recv(conn, 1.1)] == [1000]
    send(conn, 1.2, seq=rseq(1), ack=lseq(2461), window=1539)
    assert [len(s.payload) for s in recv(conn, 1.2)] == [1460]  # and 79 wait


def test_rfc9293_shld_7_nagle_holds_small_segments() -> None:
    conn = passive()
    conn.send(b"a")
    expect(recv_one(conn, 1.0), payload=b"a", flags=ACK | PSH)
    conn.send(b"b")
    conn.send(b"c")
    recv_nothing(conn, 1.0)  # "a" unacknowledged: small segments wait
    send(conn, 1.1, seq=rseq(1), ack=lseq(2))
    expect(recv_one(conn, 1.1), payload=b"bc", seq=lseq(2))


def test_rfc9293_must_17_nagle_can_be_disabled() -> None:
    conn = passive(cfg(nagle=False))
    conn.send(b"a")
    recv_one(conn, 1.0)
    conn.send(b"b")
    expect(recv_one(conn, 1.0), payload=b"b", seq=lseq(2))


def test_rfc9293_must_35_36_37_zero_window_probing() -> None:
    conn = passive(cfg(max_retries=3))
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), window=0)
    conn.send(b"hello")
    recv_nothing(conn, 1.0)
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    probe = recv_one(conn, t)
    expect(probe, seq=lseq(1), payload=b"h")  # MUST-36: one octet beyond the window
    # MUST-37: the peer may keep the window at zero indefinitely: we keep probing, with
    # backoff, and never abort for it (even past max_retries).
    last = t
    for _ in range(8):
        send(conn, last, seq=rseq(1), ack=lseq(1), window=0)
        t = conn.get_timer()
        assert t is not None and t > last
        conn.handle_timer(t)
        expect(recv_one(conn, t), seq=lseq(1), payload=b"h")
        last = t
    assert conn.state.name == "ESTABLISHED"
    send(conn, last + 0.1, seq=rseq(1), ack=lseq(2), window=4096)  # probe accepted
    expect(recv_one(conn, last + 0.1), seq=lseq(2), payload=b"ello")


def test_tx_max_segment_makes_super_segments_of_whole_mss() -> None:
    conn = passive(cfg(tx_max_segment=65535, nagle=False, initial_cwnd=1 << 20))
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), window=65535)
    conn.send(bytes(50_000))
    assert [len(s.payload) for s in recv(conn, 1.0)] == [50_000]
    send(conn, 1.1, seq=rseq(1), ack=lseq(50_001), window=65535)
    conn.send(bytes(70_000))
    # One super-segment of a whole number of SMSS (the kernel's GSO cuts it to MSS).
    assert [len(s.payload) for s in recv(conn, 1.1)] == [1460 * (65535 // 1460)]
    assert conn.send_mss == 1460


def test_send_buffer_is_bounded() -> None:
    conn = active(cfg(send_buffer=1000))
    assert conn.send(b"x" * 1500) == 1000
    assert conn.send(b"y") == 0
    assert conn.send_buffer_free == 0


def test_read_with_limit_keeps_the_rest() -> None:
    conn = passive()
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"abcdef")
    assert conn.read(4) == b"abcd"
    assert conn.read() == b"ef"
    assert events(conn) == [Connected()]  # data taken by read() makes no event


def test_rfc9293_must_66_zero_window_still_takes_ack_and_rst() -> None:
    conn = passive(cfg(recv_buffer=2000, mss=1000, auto_consume=False, nagle=False))
    events(conn)
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 2000)  # fills our window
    recv(conn, 1.0)
    conn.send(b"ours")
    recv(conn, 1.0)
    # Window 0: the text is refused, but the ACK of our data is processed...
    send(conn, 1.1, seq=rseq(2001), ack=lseq(5), payload=b"more")
    assert conn.info()["in_flight"] == 0
    expect(recv_one(conn, 1.1), ack=rseq(2001), window=0)
    # ...and so is an RST at RCV.NXT.
    send(conn, 1.2, flags=0x04, seq=rseq(2001))
    assert conn.state.name == "CLOSED"


def test_rfc9293_must_1_window_is_unsigned_and_scaled_to_2_30() -> None:
    conn = active(cfg(window_scaling=True), wscale=14, window=0xFFFF)
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), window=0xFFFF)
    assert conn.info()["snd_wnd"] == 0xFFFF << 14  # 2**30 - 2**14, never negative


def test_urgent_data_is_delivered_inline() -> None:
    # URG (RFC 9293 §3.8.5) is not signalled to the application: urgent octets stay in
    # the stream, like SO_OOBINLINE. Nothing is lost or reordered.
    conn = passive()
    send(conn, 1.0, flags=0x20 | ACK, seq=rseq(1), ack=lseq(1), payload=b"!urgent", urg=1)
    assert conn.read() == b"!urgent"


def test_header_prediction_takes_in_order_data_and_pure_acks() -> None:
    conn = passive(cfg(nagle=False))
    for i in range(10):
        send(conn, 1.0, seq=rseq(1 + 100 * i), ack=lseq(1), payload=b"p" * 100)
    conn.send(b"x" * 100)
    recv(conn, 1.0)
    send(conn, 1.1, seq=rseq(1001), ack=lseq(101))
    assert conn.fast_path == 11
    assert conn.read() == b"p" * 1000 and conn.info()["in_flight"] == 0


def test_rfc9293_must_34_peer_shrinking_its_window_is_survived() -> None:
    conn = active(cfg(nagle=False, initial_cwnd=10 * 1460), window=10_000)
    conn.send(bytes(20_000))
    assert sum(len(s.payload) for s in recv(conn, 1.0)) == 6 * 1460  # SWS: 1240 left waits
    # The peer takes back its window (acks 1000 bytes, offers 500): we must not send
    # beyond the new right edge, and we must not fail.
    send(conn, 1.1, seq=rseq(1), ack=lseq(1001), window=500)
    recv_nothing(conn, 1.1)
    assert conn.receive_window == 65535
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)  # RTO: back to SND.UNA; 500 bytes < SMSS and < max window / 2
    recv_nothing(conn, t)
    t2 = conn.get_timer()
    assert t2 is not None and t2 > t
    conn.handle_timer(t2)  # the persist / SWS override timer sends what fits
    assert [(s.seq, len(s.payload)) for s in recv(conn, t2)] == [(lseq(1001), 500)]

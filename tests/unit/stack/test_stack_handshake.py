"""Opening and resetting connections: RFC 9293 §3.5, §3.10.7.1-3, RFC 5961, RFC 6528."""

from __future__ import annotations

import pytest
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
    listening,
    lseq,
    passive,
    recv,
    recv_nothing,
    recv_one,
    rseq,
    run_timers_while,
    send,
    syn_sent,
)

from stack.connection import TcpConnection
from stack.events import (
    Closed,
    Connected,
    ConnectionReset,
    LocalProtocolError,
    ResetToListen,
)
from stack.seq import isn_rfc6528
from stack.state import State
from stack.wire.tcp import ACK, FIN, RST, SYN


def test_rfc9293_passive_open_three_way_handshake() -> None:
    conn = listening()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ, ack=0, mss=1400)
    assert conn.state is State.SYN_RECEIVED
    synack = recv_one(conn, 0.0)
    expect(synack, flags=SYN | ACK, seq=LOCAL_SEQ, ack=rseq(1), mss=1460, window=65535)
    recv_nothing(conn, 0.0)
    send(conn, 0.1, seq=rseq(1), ack=lseq(1))
    assert conn.state is State.ESTABLISHED
    assert events(conn) == [Connected()]
    assert conn.send_mss == 1400  # MUST-14: the peer's MSS bounds ours


def test_rfc9293_active_open_three_way_handshake() -> None:
    conn = TcpConnection(LOCAL, REMOTE, BASE, iss=LOCAL_SEQ)
    conn.connect(0.0)
    syn = recv_one(conn, 0.0)
    expect(syn, flags=SYN, seq=LOCAL_SEQ, mss=1460, wscale=None, sack_perm=False, ts=None)
    send(conn, 0.05, flags=SYN | ACK, seq=REMOTE_SEQ, ack=lseq(1), mss=1460)
    assert conn.state is State.ESTABLISHED
    expect(recv_one(conn, 0.05), flags=ACK, seq=lseq(1), ack=rseq(1))
    assert events(conn) == [Connected()]
    assert conn.info()["srtt"] == pytest.approx(0.05)


def test_rfc9293_must_10_simultaneous_open() -> None:
    conn = syn_sent()  # our SYN
    send(conn, 0.01, flags=SYN, seq=REMOTE_SEQ, ack=0, mss=1460)  # their SYN crosses it
    assert conn.state is State.SYN_RECEIVED
    expect(recv_one(conn, 0.01), flags=SYN | ACK, seq=LOCAL_SEQ, ack=rseq(1))
    send(conn, 0.02, flags=SYN | ACK, seq=REMOTE_SEQ, ack=lseq(1))  # their SYN-ACK
    assert conn.state is State.ESTABLISHED
    assert events(conn) == [Connected()]


def test_rfc9293_must_11_rst_in_syn_received_returns_to_listen() -> None:
    conn = listening()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ, ack=0)
    recv_one(conn, 0.0)
    send(conn, 0.1, flags=RST, seq=rseq(1), ack=0)
    assert conn.state is State.LISTEN
    assert events(conn) == [ResetToListen()]  # "need not be informed": told, no abort
    send(conn, 0.2, flags=SYN, seq=rseq(100), ack=0)  # and it can be opened again
    assert conn.state is State.SYN_RECEIVED


def test_rfc9293_must_12_rst_aborts_and_is_reported() -> None:
    conn = passive()
    events(conn)
    send(conn, 1.0, flags=RST, seq=rseq(1))
    assert conn.state is State.CLOSED
    assert events(conn) == [ConnectionReset("reset"), Closed()]


def test_rfc9293_syn_sent_rst_acking_our_syn_is_refused() -> None:
    conn = syn_sent()
    send(conn, 0.1, flags=RST, seq=0, ack=lseq(2))  # does not ack our SYN: ignored
    assert conn.state is State.SYN_SENT
    send(conn, 0.1, flags=RST | ACK, seq=0, ack=lseq(1))
    assert conn.state is State.CLOSED
    assert events(conn) == [ConnectionReset("refused"), Closed()]


def test_rfc9293_syn_sent_bad_ack_gets_rst() -> None:
    conn = syn_sent()
    send(conn, 0.1, flags=SYN | ACK, seq=REMOTE_SEQ, ack=lseq(5))
    expect(recv_one(conn, 0.1), flags=RST, seq=lseq(5))
    assert conn.state is State.SYN_SENT


def test_rfc9293_listen_ack_gets_rst_and_rst_is_ignored() -> None:
    conn = listening()
    send(conn, 0.0, flags=ACK, seq=123, ack=456)
    expect(recv_one(conn, 0.0), flags=RST, seq=456)
    send(conn, 0.0, flags=RST, seq=123)
    recv_nothing(conn, 0.0)
    assert conn.state is State.LISTEN
    assert conn.drops == {"ack_in_listen": 1, "rst_in_listen": 1}


def test_rfc9293_syn_received_bad_ack_gets_rst() -> None:
    conn = listening()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ)
    recv_one(conn, 0.0)
    send(conn, 0.1, seq=rseq(1), ack=lseq(7))
    expect(recv_one(conn, 0.1), flags=RST, seq=lseq(7))
    assert conn.state is State.SYN_RECEIVED


def test_rfc9293_retransmitted_syn_gets_syn_ack_again() -> None:
    conn = listening()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ)
    recv_one(conn, 0.0)
    send(conn, 0.5, flags=SYN, seq=REMOTE_SEQ)
    expect(recv_one(conn, 0.5), flags=SYN | ACK, seq=LOCAL_SEQ, ack=rseq(1))


def test_rfc6298_syn_retransmission_backoff_and_must_22_give_up() -> None:
    conn = syn_sent(cfg(syn_retries=3))
    deadlines = []
    for _ in range(3):
        t = conn.get_timer()
        assert t is not None
        deadlines.append(t)
        conn.handle_timer(t)
        expect(recv_one(conn, t), flags=SYN, seq=LOCAL_SEQ)
    assert deadlines == [1.0, 3.0, 7.0]  # RTO 1 s, doubled per expiry (RFC 6298 §5.5)
    t = conn.get_timer()
    assert t == 15.0
    conn.handle_timer(t)
    assert conn.state is State.CLOSED
    assert events(conn) == [ConnectionReset("timeout"), Closed()]


def test_rfc6298_5_7_rto_is_3s_after_a_syn_timeout() -> None:
    conn = syn_sent()
    conn.handle_timer(1.0)
    recv_one(conn, 1.0)
    send(conn, 1.01, flags=SYN | ACK, seq=REMOTE_SEQ, ack=lseq(1))
    assert conn.info()["rto"] == 3.0


def test_rfc9293_must_8_must_9_isn_clock_driven_and_rfc6528_keyed() -> None:
    key = b"secret"
    a = isn_rfc6528(key, LOCAL, REMOTE, 100.0)
    assert isn_rfc6528(key, LOCAL, REMOTE, 100.0 + 4e-6 * 1000) == (a + 1000) & 0xFFFFFFFF
    assert isn_rfc6528(key, LOCAL, (REMOTE[0], REMOTE[1] + 1), 100.0) != a
    assert isn_rfc6528(b"other", LOCAL, REMOTE, 100.0) != a  # MUST-9: the key matters
    conn = TcpConnection(LOCAL, REMOTE, cfg(isn_key=key))
    conn.connect(100.0)
    expect(recv_one(conn, 100.0), seq=a)


def test_rfc5961_rst_in_window_but_not_exact_gets_challenge_ack() -> None:
    conn = passive()
    events(conn)
    send(conn, 1.0, flags=RST, seq=rseq(100))
    assert conn.state is State.ESTABLISHED
    expect(recv_one(conn, 1.0), flags=ACK, seq=lseq(1), ack=rseq(1))
    send(conn, 1.0, flags=RST, seq=rseq(70000))  # outside the window: silently dropped
    recv_nothing(conn, 1.0)
    assert conn.drops["rst_challenged"] == 1 and conn.drops["rst_out_of_window"] == 1


def test_rfc5961_syn_in_established_gets_challenge_ack() -> None:
    conn = passive()
    send(conn, 1.0, flags=SYN, seq=rseq(50), ack=0)
    assert conn.state is State.ESTABLISHED
    expect(recv_one(conn, 1.0), flags=ACK, seq=lseq(1), ack=rseq(1))


def test_rfc5961_challenge_acks_are_rate_limited() -> None:
    conn = passive(cfg(challenge_ack_limit=2))
    for _ in range(5):
        send(conn, 1.0, flags=RST, seq=rseq(10))
    assert len(recv(conn, 1.0)) == 1  # aggregated: one ACK out
    assert conn.drops["challenge_ack_limited"] == 3


def test_rfc5961_ack_of_unsent_data_gets_ack_and_is_dropped() -> None:
    conn = passive()
    send(conn, 1.0, seq=rseq(1), ack=lseq(500), payload=b"x")
    expect(recv_one(conn, 1.0), flags=ACK, ack=rseq(1))
    assert conn.drops["ack_of_unsent"] == 1
    assert conn.read() == b""


def test_rfc9293_must_16_effective_send_mss_and_negotiated_options() -> None:
    conn = active(
        cfg(window_scaling=True, timestamps=True, sack=True, recv_buffer=1 << 20),
        wscale=7, sack_perm=True, ts=(5000, 0), mss=1400,
    )
    info = conn.info()
    assert info["wscale"] == (7, 5) and info["sack"] is True and info["ts"] is True
    assert info["mss"] == 1400 - 12  # MUST-16: less the TSopt we put in every segment


def test_api_misuse_raises_local_protocol_error() -> None:
    conn = TcpConnection(LOCAL, REMOTE, BASE, iss=LOCAL_SEQ)
    with pytest.raises(LocalProtocolError):
        conn.send(b"x")
    with pytest.raises(LocalProtocolError):
        conn.close()
    conn.connect(0.0)
    with pytest.raises(LocalProtocolError):
        conn.connect(0.0)
    with pytest.raises(LocalProtocolError):
        conn.listen()
    with pytest.raises(LocalProtocolError):
        conn.consumed(1)


def test_abort_sends_rst_and_closes() -> None:
    conn = passive()
    events(conn)
    conn.send(b"queued")
    conn.abort()
    segs = recv(conn, 1.0)
    assert [s.flags for s in segs] == [RST]
    expect(segs[0], seq=lseq(1))
    assert events(conn) == [Closed()]
    assert conn.get_timer() is None


def test_closed_connection_answers_with_rst() -> None:
    conn = TcpConnection(LOCAL, REMOTE, BASE, iss=LOCAL_SEQ)
    send(conn, 0.0, flags=ACK | FIN, seq=77, ack=88)
    expect(recv_one(conn, 0.0), flags=RST, seq=88)
    send(conn, 0.0, flags=SYN, seq=77, ack=0)
    expect(recv_one(conn, 0.0), flags=RST | ACK, seq=0, ack=78)
    send(conn, 0.0, flags=RST, seq=77)
    recv_nothing(conn, 0.0)


def test_rfc9293_must_23_syn_retried_for_at_least_3_minutes() -> None:
    conn = syn_sent(cfg())
    assert run_timers_while(conn, State.SYN_SENT) >= 180.0


def test_retransmitted_syn_then_ack_in_one_batch_establishes_at_snd_nxt_1() -> None:
    # Regression (commit 22b36ed): the client's SYN again, then its ACK, before any output.
    # The SYN asked for the SYN-ACK to be resent (SND.NXT = 0); the ACK then established the
    # connection with SND.NXT behind SND.UNA, and segments_to_send raised.
    conn = listening()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ)
    expect(recv_one(conn, 0.0), flags=SYN | ACK)
    send(conn, 1.0, flags=SYN, seq=REMOTE_SEQ)
    send(conn, 1.0, seq=rseq(1), ack=lseq(1), payload=b"hi")
    assert conn.state is State.ESTABLISHED
    assert conn._snd.una == conn._snd.nxt == 1
    assert conn.send(b"data") == 4
    out = recv(conn, 1.0)
    assert [s.flags & SYN for s in out] == [0]  # no stale SYN-ACK once established
    expect(out[0], seq=lseq(1), ack=rseq(3), payload=b"data")
    assert events(conn)[0] == Connected()


def test_syn_ack_rto_then_ack_before_output_establishes_at_snd_nxt_1() -> None:
    # The same hole by the other door: the SYN-ACK's RTO fires, the ACK arrives first.
    conn = listening()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ)
    recv_one(conn, 0.0)
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    send(conn, t, seq=rseq(1), ack=lseq(1))
    assert conn.state is State.ESTABLISHED
    conn.send(b"x")
    expect(recv_one(conn, t), seq=lseq(1), payload=b"x")

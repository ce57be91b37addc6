"""Closing: FIN, half-close, CLOSING, LAST-ACK, TIME-WAIT (RFC 9293 §3.6, §3.10.7.4)."""

from __future__ import annotations

import pytest
from tcp_script import (
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
    send,
)

from stack.connection import TcpConnection
from stack.events import (
    Closed,
    Connected,
    ConnectionReset,
    DataReceived,
    LocalProtocolError,
    PeerFinished,
)
from stack.state import State
from stack.wire.tcp import ACK, FIN, PSH, SYN


def time_wait() -> TcpConnection:
    """MSL 10 s; we close first (FIN at 1.0), the peer's ACK + FIN at 1.1 is acknowledged:
    TIME-WAIT, ending at 21.1."""
    conn = active(cfg(msl=10.0))
    conn.close()
    recv(conn, 1.0)
    send(conn, 1.1, flags=ACK | FIN, seq=rseq(1), ack=lseq(2))
    recv(conn, 1.1)
    assert conn.state is State.TIME_WAIT
    return conn


def test_rfc9293_active_close_fin_wait_to_time_wait() -> None:
    conn = active(cfg(msl=10.0))
    conn.send(b"bye")
    conn.close()
    assert conn.state is State.FIN_WAIT_1
    expect(recv_one(conn, 1.0), flags=ACK | PSH | FIN, seq=lseq(1), payload=b"bye")
    send(conn, 1.1, seq=rseq(1), ack=lseq(5))
    assert conn.state is State.FIN_WAIT_2
    recv_nothing(conn, 1.1)
    send(conn, 1.2, flags=ACK | FIN, seq=rseq(1), ack=lseq(5))
    assert conn.state is State.TIME_WAIT
    expect(recv_one(conn, 1.2), flags=ACK, seq=lseq(5), ack=rseq(2))
    assert events(conn) == [Connected(), PeerFinished()]


def test_rfc9293_must_13_time_wait_lasts_2msl_and_reacks_fin() -> None:
    conn = time_wait()
    assert conn.get_timer() == pytest.approx(21.1)
    # A retransmitted FIN is acknowledged again and restarts the 2*MSL timer.
    send(conn, 5.0, flags=ACK | FIN, seq=rseq(1), ack=lseq(2))
    expect(recv_one(conn, 5.0), flags=ACK, ack=rseq(2))
    assert conn.get_timer() == pytest.approx(25.0)
    conn.handle_timer(24.9)
    assert conn.state is State.TIME_WAIT
    conn.handle_timer(25.0)
    assert conn.state is State.CLOSED
    assert events(conn)[-1] == Closed()
    assert conn.get_timer() is None


def test_rfc9293_default_msl_is_two_minutes() -> None:
    assert cfg().msl == 120.0


def test_rfc9293_half_close_peer_fin_then_we_keep_sending() -> None:
    conn = passive()
    events(conn)
    send(conn, 1.0, flags=ACK | FIN, seq=rseq(1), ack=lseq(1), payload=b"request")
    assert conn.state is State.CLOSE_WAIT
    assert events(conn) == [DataReceived(b"request"), PeerFinished()]
    expect(recv_one(conn, 1.0), ack=rseq(9))  # FIN is acknowledged at once
    conn.send(b"response part 1, ")
    conn.send(b"part 2")
    expect(recv_one(conn, 1.1), payload=b"response part 1, part 2")
    send(conn, 1.2, seq=rseq(9), ack=lseq(24))
    conn.close()
    assert conn.state is State.LAST_ACK
    expect(recv_one(conn, 1.3), flags=ACK | FIN, seq=lseq(24))
    send(conn, 1.4, seq=rseq(9), ack=lseq(25))
    assert conn.state is State.CLOSED
    assert events(conn) == [Closed()]


def test_rfc9293_we_half_close_and_still_receive() -> None:
    conn = passive()
    events(conn)
    conn.close()
    expect(recv_one(conn, 1.0), flags=ACK | FIN, seq=lseq(1))
    send(conn, 1.1, seq=rseq(1), ack=lseq(2), payload=b"still talking")
    assert conn.state is State.FIN_WAIT_2
    assert events(conn) == [DataReceived(b"still talking")]
    with pytest.raises(LocalProtocolError):
        conn.send(b"no")
    with pytest.raises(LocalProtocolError):
        conn.close()


def test_rfc9293_simultaneous_close_goes_through_closing() -> None:
    conn = passive(cfg(msl=1.0))
    conn.close()
    recv(conn, 1.0)
    send(conn, 1.1, flags=ACK | FIN, seq=rseq(1), ack=lseq(1))  # their FIN, ours not acked
    assert conn.state is State.CLOSING
    expect(recv_one(conn, 1.1), ack=rseq(2))
    send(conn, 1.2, seq=rseq(2), ack=lseq(2))
    assert conn.state is State.TIME_WAIT
    conn.handle_timer(3.2)
    assert conn.state is State.CLOSED


def test_rfc9293_fin_after_a_gap_waits_for_the_gap() -> None:
    conn = passive()
    events(conn)
    send(conn, 1.0, flags=ACK | FIN, seq=rseq(4), ack=lseq(1), payload=b"def")
    assert conn.state is State.ESTABLISHED
    expect(recv_one(conn, 1.0), ack=rseq(1))
    send(conn, 1.1, seq=rseq(1), ack=lseq(1), payload=b"abc")
    assert conn.state is State.CLOSE_WAIT
    assert events(conn) == [DataReceived(b"abcdef"), PeerFinished()]
    expect(recv_one(conn, 1.1), ack=rseq(8))


def test_fin_is_retransmitted_on_timeout() -> None:
    conn = passive()
    conn.close()
    expect(recv_one(conn, 1.0), flags=ACK | FIN, seq=lseq(1))
    t = conn.get_timer()
    assert t == pytest.approx(2.0)
    conn.handle_timer(t)
    expect(recv_one(conn, t), flags=ACK | FIN, seq=lseq(1))


def test_close_in_syn_received_sends_fin_after_establishment() -> None:
    conn = listening()
    send(conn, 0.0, flags=SYN, seq=REMOTE_SEQ)
    recv(conn, 0.0)
    conn.close()
    assert conn.state is State.SYN_RECEIVED
    send(conn, 0.1, seq=rseq(1), ack=lseq(1))
    assert conn.state is State.FIN_WAIT_1
    expect(recv_one(conn, 0.1), flags=ACK | FIN, seq=lseq(1))


def test_rfc9293_abort_in_time_wait_sends_no_rst() -> None:
    conn = time_wait()
    conn.abort()
    recv_nothing(conn, 1.2)
    assert conn.state is State.CLOSED


def test_rfc9293_must_24_to_29_keepalive() -> None:
    assert cfg().keepalive is False and cfg().keepalive_idle >= 7200  # MUST-26, MUST-28
    conn = passive(cfg(keepalive=True, keepalive_idle=60.0, keepalive_interval=5.0,
                       keepalive_probes=2))
    events(conn)
    conn.send(b"busy")
    recv(conn, 0.0)
    send(conn, 10.0, seq=rseq(1), ack=lseq(5))  # acked at t=10: idle from now on
    assert conn.get_timer() == pytest.approx(70.0)  # MUST-25: only after idle time
    conn.handle_timer(70.0)
    ka = recv_one(conn, 70.0)
    expect(ka, flags=ACK, seq=lseq(4), payload=b"")  # SND.NXT - 1
    # The answer was lost (MUST-29: that alone is no failure): a second probe.
    conn.handle_timer(75.0)
    expect(recv_one(conn, 75.0), seq=lseq(4))
    send(conn, 76.0, seq=rseq(1), ack=lseq(5))  # answered: idle again from 76
    assert conn.get_timer() == pytest.approx(136.0)
    for t in (136.0, 141.0, 146.0):
        conn.handle_timer(t)
        recv(conn, t)
    assert conn.state is State.CLOSED  # two unanswered probes, then the third deadline
    assert events(conn)[-2:] == [ConnectionReset("timeout"), Closed()]


def test_rfc9293_must_29_late_keepalive_timer_probes_once_then_waits_an_interval() -> None:
    # Found by the random traces: a keep-alive deadline handled late (a busy loop, a
    # suspended host) used to leave the next probe's deadline in the past, so the same
    # handle_timer call site fired every probe back to back and declared a timeout at once.
    conn = passive(cfg(keepalive=True, keepalive_idle=5.0, keepalive_interval=1.0,
                       keepalive_probes=2))
    events(conn)
    conn.handle_timer(30.0)  # due at 5.0, handled at 30.0
    expect(recv_one(conn, 30.0), seq=lseq(0))
    assert conn.get_timer() == pytest.approx(31.0)  # one interval after this probe
    conn.handle_timer(30.0)
    recv_nothing(conn, 30.0)
    assert conn.state is State.ESTABLISHED


@pytest.mark.parametrize("flags", [ACK, ACK | PSH])
def test_rfc9293_bare_fin_after_a_gap_is_kept_and_acked_when_the_gap_fills(flags: int) -> None:
    """Issue 11 #5: the last data segment is lost, the bare FIN behind it arrives; the
    retransmission (in order, header-prediction shaped) fills the gap: the FIN takes
    effect then (RFC 9293 §3.10.7.4 eighth step, the FIN kept beyond the gap) and the ACK
    covering both goes out at once (RFC 5681 §4.2), not after the peer's FIN timeout."""
    conn = passive()
    events(conn)
    send(conn, 1.0, flags=ACK | FIN, seq=rseq(4), ack=lseq(1), payload=b"")
    assert conn.state is State.ESTABLISHED
    expect(recv_one(conn, 1.0), ack=rseq(1))  # a duplicate ACK at once
    send(conn, 1.1, flags=flags, seq=rseq(1), ack=lseq(1), payload=b"abc")
    assert conn.state is State.CLOSE_WAIT
    assert events(conn) == [DataReceived(b"abc"), PeerFinished()]
    expect(recv_one(conn, 1.1), ack=rseq(5))  # at once, covering the FIN

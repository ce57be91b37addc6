"""ICMP errors for a connection: RFC 9293 §3.9.1.4 (MUST-54/55/56, SHLD-25/26), RFC 1191,
RFC 8201, RFC 5927 §4.1."""

from __future__ import annotations

import pytest
from tcp_script import (
    BASE,
    LOCAL_SEQ,
    events,
    listening,
    lseq,
    passive,
    recv,
    syn_sent,
)

from stack.connection import TcpConnection
from stack.events import Closed, ConnectionReset, IcmpKind, SoftError
from stack.state import State


@pytest.mark.parametrize("code", [0, 1, 5])
def test_rfc9293_must_54_must_56_unreachable_0_1_5_are_soft(code: int) -> None:
    conn = passive()
    events(conn)
    conn.send(b"x" * 100)
    recv(conn, 0.0)
    conn.icmp_error(IcmpKind.UNREACHABLE, code, None, 0.1)
    assert conn.state is State.ESTABLISHED  # MUST-56: never abort
    assert events(conn) == [SoftError(IcmpKind.UNREACHABLE, code)]  # SHLD-25: reported
    assert conn.info()["soft_error"] == ("unreachable", code, 0.1)


@pytest.mark.parametrize("kind", [IcmpKind.TIME_EXCEEDED, IcmpKind.PARAMETER_PROBLEM])
@pytest.mark.parametrize("code", [0, 1])
def test_rfc9293_must_54_time_exceeded_and_parameter_problem_are_soft(
    kind: IcmpKind, code: int
) -> None:
    conn = passive()
    events(conn)
    conn.icmp_error(kind, code, now=1.0)
    assert conn.state is State.ESTABLISHED
    assert events(conn) == [SoftError(kind, code)]


@pytest.mark.parametrize("code", [2, 3])
def test_rfc9293_shld_26_unreachable_2_3_abort(code: int) -> None:
    conn = passive()
    events(conn)
    conn.icmp_error("unreachable", code, None, 1.0)
    assert conn.state is State.CLOSED
    assert events(conn) == [ConnectionReset("unreachable"), Closed()]
    assert recv(conn, 1.0) == []  # no RST for an ICMP-reported failure


def test_rfc9293_shld_26_hard_error_aborts_a_connecting_socket() -> None:
    conn = syn_sent()
    conn.icmp_error(IcmpKind.UNREACHABLE, 3, now=0.2, seq=lseq(0))
    assert events(conn) == [ConnectionReset("unreachable"), Closed()]


def test_icmpv6_port_unreachable_is_hard_other_codes_soft() -> None:
    v6l, v6r = (b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01", 80), (b"\x20\x01\x0d\xb8" +
                                                                bytes(11) + b"\x02", 5000)
    conn = TcpConnection(v6l, v6r, BASE, iss=LOCAL_SEQ)
    conn.connect(0.0)
    conn.segments_to_send(0.0)
    for code in (0, 1, 2, 3, 5, 6):
        conn.icmp_error(IcmpKind.UNREACHABLE, code, now=0.1)
    assert conn.state is State.SYN_SENT
    conn.icmp_error(IcmpKind.UNREACHABLE, 4, now=0.2)
    assert conn.state is State.CLOSED


def test_rfc1191_fragmentation_needed_lowers_mss_never_aborts() -> None:
    conn = passive()
    conn.send(b"y" * 4000)
    assert recv(conn, 0.0)[0].payload.nbytes == 1460
    conn.icmp_error(IcmpKind.UNREACHABLE, 4, 1300, 0.1)  # IPv4 Fragmentation Needed
    assert conn.state is State.ESTABLISHED and conn.send_mss == 1260
    assert [len(s.payload) for s in recv(conn, 0.1)][0] == 1260  # resent smaller
    conn.icmp_error(IcmpKind.UNREACHABLE, 4, None, 0.2)  # no MTU given: nothing to learn
    assert conn.state is State.ESTABLISHED and conn.send_mss == 1260
    conn.icmp_error(IcmpKind.PACKET_TOO_BIG, 0, 1200, 0.3)
    assert conn.send_mss == 1160


def test_rfc9293_must_55_source_quench_is_ignored() -> None:
    conn = passive()
    events(conn)
    conn.icmp_error(IcmpKind.SOURCE_QUENCH, 0, now=0.0)
    assert events(conn) == [] and conn.drops["icmp_source_quench"] == 1


def test_rfc5927_icmp_quoting_a_sequence_outside_the_flight_is_ignored() -> None:
    conn = passive()
    events(conn)
    conn.send(b"z" * 100)
    recv(conn, 0.0)
    conn.icmp_error(IcmpKind.UNREACHABLE, 3, now=0.1, seq=lseq(5000))  # blind attack
    conn.icmp_error(IcmpKind.UNREACHABLE, 3, now=0.1, seq=lseq(0))  # before SND.UNA
    assert conn.state is State.ESTABLISHED and conn.drops["icmp_out_of_window"] == 2
    conn.icmp_error(IcmpKind.UNREACHABLE, 3, now=0.1, seq=lseq(50))  # in flight
    assert conn.state is State.CLOSED


def test_icmp_for_closed_or_listening_connection_is_dropped() -> None:
    conn = listening()
    conn.icmp_error(IcmpKind.UNREACHABLE, 3, now=0.0)
    assert conn.state is State.LISTEN and conn.drops["icmp_no_connection"] == 1


def test_icmp_error_unknown_kind_is_our_misuse() -> None:
    with pytest.raises(ValueError):
        passive().icmp_error("bogus", 0, now=0.0)


def test_a_burst_of_the_same_soft_error_is_one_event() -> None:
    conn = passive()
    events(conn)
    for _ in range(1000):  # e.g. spoofed ICMP: the event queue does not grow with it
        conn.icmp_error(IcmpKind.TIME_EXCEEDED, 0, now=0.0)
    conn.icmp_error(IcmpKind.UNREACHABLE, 1, now=0.0)
    assert events(conn) == [SoftError(IcmpKind.TIME_EXCEEDED, 0),
                            SoftError(IcmpKind.UNREACHABLE, 1)]

"""Urgent data: RFC 9293 §3.8.5 MUST-30..33 (inline delivery, RFC 6093 semantics)."""

from __future__ import annotations

from tcp_script import cfg, events, expect, lseq, passive, recv, recv_one, rseq, send

from stack.events import DataReceived, UrgentData
from stack.wire.tcp import ACK, PSH, URG


def test_rfc9293_must_31_urgent_pointer_names_the_first_non_urgent_octet() -> None:
    conn = passive()
    conn.send(b"norm")
    conn.send(b"!!", urgent=True)
    conn.send(b"tail")
    (seg,) = recv(conn, 0.0)
    expect(seg, seq=lseq(1), flags=ACK | PSH | URG, urg=6, payload=b"norm!!tail")
    send(conn, 0.1, seq=rseq(1), ack=lseq(11))
    conn.send(b"after")
    expect(recv_one(conn, 0.1), flags=ACK | PSH, urg=0)  # past SND.UP: no URG


def test_rfc9293_must_31_urgent_pointer_is_relative_to_each_segment() -> None:
    conn = passive(cfg(nagle=False))
    conn.send(b"u" * 3000, urgent=True)
    segs = recv(conn, 0.0)
    assert [(s.flags & URG, s.urg) for s in segs] == [(URG, 3000), (URG, 1540), (URG, 80)]
    # A retransmission carries it too.
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    expect(recv(conn, t)[0], flags=ACK | URG, urg=3000)


def test_rfc9293_must_30_32_33_urgent_data_is_signalled_and_delivered_inline() -> None:
    conn = passive()
    events(conn)
    # SEG.UP = 3 from offset 0: octets 0..2 are urgent, the pointer reaches beyond this
    # segment (MUST-30: urgent data of any length).
    send(conn, 0.0, seq=rseq(1), ack=lseq(1), flags=ACK | URG, urg=3, payload=b"ab")
    assert events(conn) == [UrgentData(3), DataReceived(b"ab")]  # MUST-32, inline
    assert conn.urgent_remaining == 1  # MUST-33: "c" is urgent and not read yet
    # The same pointer again is no news (MUST-32: only when it advances).
    send(conn, 0.0, seq=rseq(3), ack=lseq(1), flags=ACK | URG, urg=1, payload=b"c")
    assert conn.urgent_remaining == 1
    assert conn.read() == b"c" and conn.urgent_remaining == 0
    assert events(conn) == []
    send(conn, 0.0, seq=rseq(4), ack=lseq(1), flags=ACK | URG, urg=2, payload=b"defg")
    assert conn.urgent_remaining == 2
    assert events(conn) == [UrgentData(5), DataReceived(b"defg")]
    assert conn.urgent_remaining == 0
    # A pointer behind what was read, or on a segment outside the window, changes nothing.
    send(conn, 0.0, seq=rseq(8), ack=lseq(1), flags=ACK | URG, urg=0, payload=b"h")
    send(conn, 0.0, seq=rseq(90000), ack=lseq(1), flags=ACK | URG, urg=9, payload=b"x")
    assert events(conn) == [DataReceived(b"h")] and conn.urgent_remaining == 0

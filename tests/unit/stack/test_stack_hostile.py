"""A misbehaving peer never raises: random segments against connections in every state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tcp_demux import TcpDemux
from tcp_script import (
    ALL_OPTIONS,
    BASE,
    LOCAL,
    LOCAL_SEQ,
    REMOTE,
    active,
    cfg,
    lseq,
    passive,
    rseq,
    send,
)

from stack.connection import TcpConnection
from stack.state import State
from stack.wire.tcp import ACK, FIN, TcpSegment, emit_tcp

U32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def segments(draw: st.DrawFn) -> TcpSegment:
    near = st.sampled_from([rseq(1), rseq(2), rseq(100), rseq(0), rseq(-1), rseq(70000)])
    seq = draw(st.one_of(near, U32))
    ack = draw(st.one_of(st.integers(LOCAL_SEQ - 5, LOCAL_SEQ + 3000), U32))
    return TcpSegment(
        REMOTE[1], LOCAL[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
        draw(st.integers(0, 0xFF)), draw(st.integers(0, 0xFFFF)),
        draw(st.binary(max_size=3000)), draw(st.integers(0, 0xFFFF)),
        draw(st.one_of(st.none(), st.integers(0, 0xFFFF))),
        draw(st.one_of(st.none(), st.integers(0, 255))),
        draw(st.booleans()),
        draw(st.one_of(st.none(), st.tuples(U32, U32))),
        tuple(draw(st.lists(st.tuples(U32, U32), max_size=3))),
    )


def _invariants(conn: TcpConnection) -> None:
    assert conn._snd.una <= conn._snd.nxt <= conn._snd.max or conn._snd.max == 0
    assert conn._rcv.adv >= conn._rcv.nxt or conn._rcv.adv == 0
    assert conn._rcv.ooo.nbytes <= conn._rcv.ooo.cap_bytes
    assert len(conn._snd.buf) <= conn._snd.buf.capacity


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 6), st.lists(segments(), min_size=1, max_size=12),
       st.lists(st.floats(0, 5), min_size=1, max_size=12))
def test_random_segments_never_raise(kind: int, segs: list[TcpSegment],
                                     gaps: list[float]) -> None:
    if kind == 0:
        conn = TcpConnection(LOCAL, REMOTE, BASE, iss=LOCAL_SEQ)
        conn.listen()
    elif kind == 1:
        conn = TcpConnection(LOCAL, REMOTE, BASE, iss=LOCAL_SEQ)
        conn.connect(0.0)
        conn.segments_to_send(0.0)
    elif kind == 2:
        conn = passive(ALL_OPTIONS, wscale=3, sack_perm=True, ts=(5, 0))
        conn.send(b"d" * 5000)
    elif kind == 3:
        conn = active(BASE)
        conn.send(b"d" * 5000)
        conn.close()
    elif kind == 4:
        conn = passive(BASE)
        conn.close()
    elif kind == 5:  # TIME-WAIT, keep-alives on
        conn = active(cfg(keepalive=True, keepalive_idle=1.0, keepalive_interval=0.5))
        conn.close()
        conn.segments_to_send(0.0)
        send(conn, 0.0, flags=ACK | FIN, seq=rseq(1), ack=lseq(2))
    else:  # CLOSE-WAIT with data out of order held
        conn = passive(ALL_OPTIONS, sack_perm=True, ts=(5, 0))
        send(conn, 0.0, seq=rseq(500), ack=lseq(1), payload=b"o" * 700, ts=(6, 0))
        send(conn, 0.0, flags=ACK | FIN, seq=rseq(1), ack=lseq(1), payload=b"i" * 10,
             ts=(6, 0))
    now = 0.0
    for i, seg in enumerate(segs):
        now += gaps[i % len(gaps)]
        conn.receive_segment(seg, now)
        _invariants(conn)
        for out in conn.segments_to_send(now):
            emit_tcp(out, LOCAL[0], REMOTE[0])  # everything we send is well-formed
        t = conn.get_timer()
        if t is not None and t <= now + 1:
            conn.handle_timer(max(t, now))
            conn.segments_to_send(max(t, now))
        while conn.next_event() is not None:
            pass
        _invariants(conn)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=80), min_size=1, max_size=10))
def test_demux_random_bytes_never_raise(packets: list[bytes]) -> None:
    demux = TcpDemux(BASE, accept_any=True)
    for raw in packets:
        demux.receive_packet(REMOTE[0], LOCAL[0], raw, 0.0)
        demux.receive_packet(REMOTE[0], LOCAL[0], emit_tcp(
            TcpSegment(1, 80, len(raw), 0, raw[0] if raw else 2, 100, raw), REMOTE[0],
            LOCAL[0]), 0.0)
    demux.segments_to_send(0.0)


def _pair() -> tuple[TcpConnection, TcpConnection, TcpSegment]:
    a = TcpConnection(LOCAL, REMOTE, ALL_OPTIONS)
    b = TcpConnection(REMOTE, LOCAL, ALL_OPTIONS)
    b.listen()
    a.connect(0.0)
    last = None
    for _ in range(4):
        for seg in a.segments_to_send(0.0):
            b.receive_segment(seg, 0.0)
            last = seg
        for seg in b.segments_to_send(0.0):
            a.receive_segment(seg, 0.0)
    assert last is not None
    return a, b, last


def test_rfc5961_7_an_injected_segment_does_not_start_an_endless_ack_exchange() -> None:
    """Issue 11 #9: one spoofed data segment into b (in its window, as if from a) makes b
    acknowledge bytes a never sent; a answers that ACK of unsent data with an ACK whose
    sequence number is now old for b; b answers that unacceptable segment with its ACK
    again, and so on forever. The ACKs answering unacceptable segments and ACKs of unsent
    data are rate limited per connection (RFC 5961 §7; Linux tcp_invalid_ratelimit,
    500 ms; data segments and SYNs are never limited), so the exchange dies out."""
    a, b, last = _pair()
    assert a.state is State.ESTABLISHED and b.state is State.ESTABLISHED
    assert last.ts is not None
    spoof = last._replace(payload=b"evil", ts=(last.ts[0] + 1, last.ts[1]))
    b.receive_segment(spoof, 1.0)
    exchanged = 0
    t = 1.0
    for _ in range(200):  # 200 round trips of 1 ms
        for conn in (a, b):
            due = conn.get_timer()
            if due is not None and due <= t:
                conn.handle_timer(t)
        out_b = b.segments_to_send(t)
        for seg in out_b:
            a.receive_segment(seg, t)
        out_a = a.segments_to_send(t)
        for seg in out_a:
            b.receive_segment(seg, t)
        exchanged += len(out_a) + len(out_b)
        t += 0.001
    assert 1 <= exchanged <= 4

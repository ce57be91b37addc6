"""TcpDemux: 4-tuple routing, passive opens, RSTs for strangers (RFC 9293 §3.10.7.1-2)."""

from __future__ import annotations

from typing import Any

import pytest
from tcp_demux import TcpDemux
from tcp_script import BASE, cfg

from stack.connection import TcpConnection
from stack.events import Connected, DataReceived
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, FIN, RST, SYN, TcpSegment, emit_tcp

SRV = bytes([198, 18, 1, 1])
CLI = bytes([198, 18, 2, 2])


def _pump(a: TcpDemux, b: TcpDemux, now: float) -> int:
    n = 0
    for src, dst, seg in a.segments_to_send(now):
        b.receive_packet(src, dst, emit_tcp(seg, src, dst), now)
        n += 1
    for src, dst, seg in b.segments_to_send(now):
        a.receive_packet(src, dst, emit_tcp(seg, src, dst), now)
        n += 1
    return n


def _connected(server_cfg: TcpConfig = BASE, client_cfg: TcpConfig = BASE
               ) -> tuple[TcpDemux, TcpDemux, TcpConnection, TcpConnection]:
    """A server demux listening on port 80 and a client demux connected to it (handshake
    pumped at time 0): (server, client, client's connection, server's accepted one)."""
    server = TcpDemux(server_cfg)
    server.listen(80)
    client = TcpDemux(client_cfg)
    c = client.connect((CLI, 40000), (SRV, 80), 0.0)
    while _pump(client, server, 0.0):
        pass
    s = server.accept()
    assert s is not None
    return server, client, c, s


def test_demux_passive_open_and_data_both_ways() -> None:
    server, client, c, s = _connected()
    assert s.state is State.ESTABLISHED and server.accept() is None
    c.send(b"GET / HTTP/1.0\r\n\r\n")
    while _pump(client, server, 0.1):
        pass
    assert [type(e) for e in iter(s.next_event, None)] == [Connected, DataReceived]
    assert c.next_event() == Connected()


def test_rfc9293_3_10_7_1_unknown_segment_gets_rst_but_rst_does_not() -> None:
    demux = TcpDemux(BASE)
    demux.receive(CLI, SRV, TcpSegment(5555, 81, 100, 200, ACK, 10, b"x"), 0.0)
    demux.receive(CLI, SRV, TcpSegment(5555, 81, 100, 0, SYN, 10), 0.0)  # port not listening
    demux.receive(CLI, SRV, TcpSegment(5555, 81, 100, 0, RST, 10), 0.0)
    out = demux.segments_to_send(0.0)
    assert [(s.flags, s.seq, s.ack) for _, _, s in out] == [(RST, 200, 0), (RST | ACK, 0, 101)]
    assert all(src == SRV and dst == CLI for src, dst, _ in out)
    assert demux.drops["no_connection"] == 3


def test_rfc9293_must_57_must_63_syn_to_or_from_multicast_is_discarded() -> None:
    demux = TcpDemux(BASE, accept_any=True)
    demux.receive(CLI, bytes([224, 0, 0, 1]), TcpSegment(1, 80, 1, 0, SYN, 10), 0.0)
    demux.receive(bytes([255, 255, 255, 255]), SRV, TcpSegment(1, 80, 1, 0, SYN, 10), 0.0)
    assert demux.segments_to_send(0.0) == []
    assert demux.drops["syn_bad_address"] == 2 and not demux.connections


def test_demux_bad_checksum_is_counted_not_raised() -> None:
    demux = TcpDemux(BASE, accept_any=True)
    raw = bytearray(emit_tcp(TcpSegment(1, 80, 1, 0, SYN, 10), CLI, SRV))
    raw[4] ^= 0xFF
    assert demux.receive_packet(CLI, SRV, bytes(raw), 0.0) is None
    assert demux.drops == {"bad_checksum": 1}


def test_demux_table_is_bounded() -> None:
    demux = TcpDemux(BASE, accept_any=True, max_connections=2)
    for port in range(3):
        demux.receive(CLI, SRV, TcpSegment(1000 + port, 80, 1, 0, SYN, 10), 0.0)
    assert len(demux.connections) == 2 and demux.drops["table_full"] == 1


def test_rfc9293_may_2_new_syn_in_time_wait_reopens() -> None:
    server, client, c, s = _connected(cfg(msl=30.0))
    s.close()  # the server closes first: it ends in TIME-WAIT
    while _pump(client, server, 0.1):
        pass
    c.close()
    while _pump(client, server, 0.2):
        pass
    assert s.state is State.TIME_WAIT
    new_syn = TcpSegment(40000, 80, (s.rcv_nxt_seq + 100_000) & 0xFFFFFFFF, 0, SYN, 1000)
    fresh = server.receive(CLI, SRV, new_syn, 1.0)
    assert fresh is not None and fresh is not s and fresh.state is State.SYN_RECEIVED


def test_demux_timers_and_closed_connections_are_forgotten() -> None:
    server, client, c, s = _connected(cfg(msl=1.0), cfg(msl=1.0))
    c.close()
    while _pump(client, server, 0.1):
        pass
    s.close()
    while _pump(client, server, 0.2):
        pass
    assert not server.connections  # LAST-ACK -> CLOSED, forgotten
    t = client.get_timer()
    assert t is not None
    client.handle_timer(t)
    client.segments_to_send(t)
    assert not client.connections and c.state is State.CLOSED


def _open_many(n: int) -> tuple[TcpDemux, TcpDemux, list[TcpConnection]]:
    server = TcpDemux(cfg(delayed_ack=0.04))
    server.listen(80)
    client = TcpDemux(cfg())
    conns = [client.connect((CLI, 20000 + i), (SRV, 80), 0.0) for i in range(n)]
    while _pump(client, server, 0.0):
        pass
    assert all(c.state is State.ESTABLISHED for c in conns)
    return server, client, conns


class _Calls:
    """Counts segments_to_send/get_timer/handle_timer calls on every connection of a demux."""

    def __init__(self, demux: TcpDemux) -> None:
        self.n = 0
        for conn in demux.connections.values():
            for name in ("segments_to_send", "get_timer", "handle_timer"):
                orig = getattr(conn, name)
                setattr(conn, name, self._wrap(orig))

    def _wrap(self, orig: Any) -> Any:
        def call(*a: Any) -> Any:
            self.n += 1
            return orig(*a)
        return call


def test_demux_batch_cost_is_per_touched_connection_not_per_connection() -> None:
    server, client, conns = _open_many(250)
    server.segments_to_send(0.0)
    assert server.get_timer() is None  # everything idle: no deadline at all
    calls = _Calls(server)
    for _ in range(5):  # idle batches: no connection is looked at
        assert server.segments_to_send(1.0) == []
        assert server.get_timer() is None
        server.handle_timer(1.0)
    assert calls.n == 0
    # One client sends: only its server connection is visited (output, then its deadline).
    conns[7].send(b"hello")
    for src, dst, seg in client.segments_to_send(1.0):
        server.receive_packet(src, dst, emit_tcp(seg, src, dst), 1.0)
    assert server.segments_to_send(1.0) == []  # the ACK is delayed ...
    assert server.get_timer() == pytest.approx(1.04)  # ... until the delayed-ACK deadline
    assert calls.n <= 3
    server.handle_timer(1.04)
    out = server.segments_to_send(1.04)
    assert [(s.dst_port, s.flags) for _a, _b, s in out] == [(20007, ACK)]
    assert calls.n <= 7


def test_demux_application_calls_on_an_idle_connection_are_seen() -> None:
    server, client, conns = _open_many(5)
    server.segments_to_send(0.0)
    client.segments_to_send(0.0)
    conns[3].send(b"late")  # no segment arrived: the demux learns through the hook
    out = client.segments_to_send(2.0)
    assert [bytes(s.payload) for _a, _b, s in out] == [b"late"]
    assert client.get_timer() == pytest.approx(3.0)  # the RTO of that segment
    conns[1].close()
    assert [s.flags & FIN for _a, _b, s in client.segments_to_send(2.0)] == [FIN]
    conns[2].abort()
    assert [s.flags for _a, _b, s in client.segments_to_send(2.0)] == [RST]
    assert len(client.connections) == 4  # the aborted one is forgotten


def _deliver(a: TcpDemux, b: TcpDemux, now: float) -> list[TcpSegment]:
    out = a.segments_to_send(now)
    for src, dst, seg in out:
        b.receive_packet(src, dst, emit_tcp(seg, src, dst), now)
    return [seg for _s, _d, seg in out]


def test_demux_timer_heap_follows_moving_deadlines() -> None:
    server, client, conns = _open_many(3)
    server.segments_to_send(0.0)
    client.segments_to_send(0.0)
    conns[0].send(b"a")
    _deliver(client, server, 0.0)  # RTO at 1.0
    conns[1].send(b"b")
    client.segments_to_send(0.5)  # RTO at 1.5 (this one is lost)
    assert client.get_timer() == pytest.approx(1.0)
    # conns[0] is acknowledged (delayed ACK): its deadline goes away, conns[1]'s is next.
    server.handle_timer(0.6)
    assert len(_deliver(server, client, 0.6)) == 1
    client.segments_to_send(0.6)
    assert client.get_timer() == pytest.approx(1.5)
    client.handle_timer(1.5)  # the RTO fires: retransmission, timer backed off
    assert [bytes(s.payload) for s in _deliver(client, server, 1.5)] == [b"b"]
    assert client.get_timer() == pytest.approx(3.5)


def test_demux_output_follows_the_order_connections_were_touched() -> None:
    server, client, conns = _open_many(6)
    server.segments_to_send(0.0)
    client.segments_to_send(0.0)
    order = [3, 1, 5, 0, 4]
    for i in order:
        conns[i].send(bytes([i]))
    out = client.segments_to_send(0.1)
    assert [s.src_port - 20000 for _a, _b, s in out] == order  # deterministic, not by hash


def test_demux_sees_a_window_reopened_by_the_application() -> None:
    # No segment arrives and no timer runs: only consumed() makes output (a window update).
    server, client, c, s = _connected(cfg(recv_buffer=8192, auto_consume=False), cfg(nagle=False))
    c.send(bytes(20000))
    now = 0.0
    while _pump(client, server, now) or _pump(server, client, now):
        pass
    assert s.receive_window < 1460  # the client is stalled: the window is (nearly) closed
    got = b"".join(ev.data for ev in iter(s.next_event, None) if isinstance(ev, DataReceived))
    assert server.segments_to_send(now) == []
    s.consumed(len(got))
    out = server.segments_to_send(now)
    assert len(out) == 1 and out[0][2].window >= 4096

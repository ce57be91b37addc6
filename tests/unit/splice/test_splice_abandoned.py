"""Issue 11 #1: a client that gives up half-way (RST) ends the splice and the server leg
at once (RFC 9293 §3.10.7.4 second step; §3.5.2), instead of after the idle timeout."""

from __future__ import annotations

import ipaddress

from bridge.flows import InspectRule
from bridge.inspect.api import CloseReason
from bridge.userspace.splice import Splice
from stack.connection import TcpConnection
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, RST, SYN, TcpSegment

C = (ipaddress.ip_address("198.18.1.10").packed, 40000)
S = (ipaddress.ip_address("198.18.2.10").packed, 80)
KEY = (4, C[0], S[0], C[1], S[1])
CISN = 1000


def _splice() -> tuple[Splice, TcpSegment]:
    syn = TcpSegment(C[1], S[1], CISN, 0, SYN, 65535, b"", 0, 1460, 7, True, (1, 0))
    cfg = TcpConfig(auto_consume=False, rto_min=0.2)
    sp = Splice(KEY, syn, InspectRule(name="t", inspectors=()), None, cfg, cfg, 0.0,
                connect_first=True)  # these tests are about the upstream leg connecting
    assert sp.open(0.0)
    return sp, syn


def _client_rst() -> TcpSegment:
    return TcpSegment(C[1], S[1], CISN + 1, 0, RST, 0)


def test_client_rst_while_upstream_connects_ends_flow() -> None:
    sp, _syn = _splice()
    up = sp.to_server(0.0)
    assert len(up) == 1 and up[0].flags == SYN
    sp.from_client(_client_rst(), 0.01)
    sp.step(0.01)
    assert sp.finished
    assert sp.flow.close_reason is CloseReason.CLIENT_RESET
    assert sp.server.state is State.CLOSED
    # the server's late SYN-ACK meets a closed leg: RST (RFC 9293 §3.10.7.1)
    synack = TcpSegment(S[1], C[1], 5000, (CISN + 1) & 0xFFFFFFFF, SYN | ACK, 65535, b"",
                        0, 1460)
    sp.from_server(synack, 0.02)
    sp.step(0.02)
    out = sp.to_server(0.02)
    assert [s.flags & RST for s in out] == [RST]
    assert sp.dead


def test_client_rst_out_of_window_while_connecting_is_ignored() -> None:
    sp, _syn = _splice()
    sp.to_server(0.0)
    sp.from_client(_client_rst()._replace(seq=CISN + 70000), 0.01)
    sp.step(0.01)
    assert not sp.finished


def test_client_rst_in_syn_received_resets_server_leg() -> None:
    sp, syn = _splice()
    server = TcpConnection(S, C, TcpConfig())
    server.listen()
    for seg in sp.to_server(0.0):
        server.receive_segment(seg, 0.001)
    for seg in server.segments_to_send(0.001):
        sp.from_server(seg, 0.002)
    sp.step(0.002)
    for seg in sp.to_server(0.002):  # the ACK of the server's SYN-ACK
        server.receive_segment(seg, 0.003)
    assert server.state is State.ESTABLISHED
    assert sp.client is not None and sp.client.state is State.SYN_RECEIVED
    assert any(s.flags == SYN | ACK for s in sp.to_client(0.002))
    # a SYN scan / happy-eyeballs loser: the client answers our SYN-ACK with a RST
    sp.from_client(_client_rst(), 0.01)
    sp.step(0.01)
    assert sp.finished
    assert sp.flow.close_reason is CloseReason.CLIENT_RESET
    out = sp.to_server(0.01)
    assert any(s.flags & RST for s in out)
    for seg in out:
        server.receive_segment(seg, 0.011)
    assert server.state is State.CLOSED
    assert sp.dead


def test_client_rst_answering_a_late_synack_is_forwarded_to_the_server() -> None:
    """The client gave up while the server leg connected (the flow ended, the splice is
    gone); the server's SYN-ACK, arriving late, reaches the client, whose stack answers
    with a RST (RFC 9293 §3.10.7.1). That RST must reach the server, which would otherwise
    keep its half-open connection: the Terminator, holding no state for the flow any more,
    passes it on (a regression guard: this already held)."""
    from splice_harness import C_ADDR, S_ADDR, Harness

    h = Harness(InspectRule(name="t", inspectors=(), connect_first=True), [])
    h.s2t.delay = 0.01  # the server's SYN-ACK comes back after the client's RST
    assert h.run(lambda h: bool(h.term.splices))
    (sp,) = h.term.splices.values()
    h.client.conn.abort()  # SYN-SENT: the TCB goes, nothing is sent (RFC 9293 §3.10.5)
    rst = TcpSegment(C[1], S[1], (sp.syn.seq + 1) & 0xFFFFFFFF, 0, RST, 0)
    h.c2t.put(h.term.packet(C_ADDR, S_ADDR, rst), h.now)
    assert h.run(lambda h: sp.finished)
    assert sp.flow.close_reason is CloseReason.CLIENT_RESET
    assert h.run(lambda h: any(p[33] & RST for p in h.forwarded))  # not swallowed

"""ICMP errors about a server leg reach it; a failed connection attempt answers the client's
SYN with the closed port's RST at once (RFC 5461 §4, RFC 9293 §3.9.1.4, RFC 5927 §4.1)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from splice_harness import TUN_MTU, _Out, _tcp_of

from bridge.flows import InspectRule
from bridge.inspect.manager import InspectorChain, InspectorManager
from bridge.userspace.terminator import Terminator
from stack.connection import TcpConnection
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.icmp import icmp4_error, icmp6_error
from stack.wire.tcp import ACK, RST, parse_tcp

C4, S4 = ipaddress.ip_address("198.18.1.10").packed, ipaddress.ip_address("198.18.2.10").packed
C6 = ipaddress.ip_address("2001:db8:1::10").packed
S6 = ipaddress.ip_address("2001:db8:2::10").packed
GW4, GW6 = ipaddress.ip_address("198.18.2.1").packed, ipaddress.ip_address("2001:db8:2::1").packed


class World:
    """A client TcpConnection, a Terminator; the server side is what the test makes of it."""

    def __init__(self, v6: bool = False, route: bool = True) -> None:
        self.c, self.s = (C6, S6) if v6 else (C4, S4)
        rule = InspectRule(name="t", inspectors=(), connect_first=True)
        mgr = InspectorManager(())
        mgr.chains["t"] = InspectorChain(rule, [])
        self.route = route
        self.term = Terminator((rule,), self._to_peer, lambda d: TUN_MTU, lambda: TUN_MTU,
                               manager=mgr)
        self.client = TcpConnection((self.c, 40000), (self.s, 80), TcpConfig())
        self.client.connect(0.0)
        self.peer: list[bytes] = []

    def _to_peer(self, pkt: bytes, now: float, out: Any) -> bool:
        if self.route:
            self.peer.append(pkt)
        return self.route

    def syn(self, now: float = 0.0) -> _Out:
        out = _Out()
        for seg in self.client.segments_to_send(now):
            pkt = self.term.packet(self.c, self.s, seg)
            assert self.term.from_tun(pkt, len(pkt), now)
        self.term.flush(now, out)
        return out

    def from_tunnel(self, pkts: list[bytes], now: float) -> _Out:
        out = _Out()
        self.term.from_peer(pkts, now, out)
        return out

    def to_client(self, out: _Out) -> list[Any]:
        return [parse_tcp(_tcp_of(p)[2], self.s, self.c) for p in out.tun]


def unreachable(w: World, pkt: bytes, code: int) -> bytes:
    if w.c == C6:
        return icmp6_error(pkt, 1, code, GW6)
    return icmp4_error(pkt, 3, code, GW4)


def assert_refused(w: World, out: _Out) -> None:
    rst = w.to_client(out)[-1]
    assert rst.flags == RST | ACK and rst.ack == (w.client._snd.iss + 1) & 0xFFFFFFFF
    w.client.receive_segment(rst, 0.1)
    assert w.client.state is State.CLOSED     # the client's connect fails now, not in ~1 min
    assert not w.term.splices and w.term.ended == {"connect_failed": 1}


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("code", [0, 1, 3])  # net, host (soft: RFC 5461 §4), port/addr
def test_unreachable_while_connecting_refuses_the_client_at_once(v6: bool, code: int) -> None:
    w = World(v6)
    w.syn()
    (syn,) = w.peer
    icmp = unreachable(w, syn, code)
    out = w.from_tunnel([icmp], 0.05)
    # the error quotes the client's own SYN (same ISN): it goes on first, then the RST
    assert len(out.tun) == 2 and out.tun[0] == icmp
    assert_refused(w, out)
    assert w.term.drops["icmp_to_server_leg"] == 1


def test_our_own_no_route_refuses_the_client_in_the_call_that_opened_the_splice() -> None:
    w = World(route=False)
    out = w.syn()
    assert len(out.tun) == 1
    assert_refused(w, out)
    assert w.term.drops["no_peer"] == 1


def test_icmp_quoting_another_sequence_number_is_ignored() -> None:
    """RFC 5927 §4.1: a blind attacker does not know the server leg's ISS."""
    w = World()
    w.syn()
    (syn,) = w.peer
    forged = bytearray(syn)
    forged[24:28] = ((int.from_bytes(syn[24:28], "big") + 10_000) & 0xFFFFFFFF).to_bytes(4, "big")
    icmp = unreachable(w, bytes(forged), 1)
    out = w.from_tunnel([icmp], 0.05)
    assert out.tun == [icmp] and len(w.term.splices) == 1   # not acted on
    (sp,) = w.term.splices.values()
    assert sp.server.state is State.SYN_SENT and sp.server.drops["icmp_out_of_window"] == 1


def test_soft_error_on_an_established_leg_does_not_end_the_flow() -> None:
    w = World()
    w.syn()
    (syn,) = w.peer
    server = TcpConnection((S4, 80), (C4, 40000), TcpConfig())
    server.listen()
    server.receive_segment(parse_tcp(_tcp_of(syn)[2], C4, S4), 0.0)
    w.from_tunnel([w.term.packet(S4, C4, s) for s in server.segments_to_send(0.0)], 0.01)
    (sp,) = w.term.splices.values()
    assert sp.server.state is State.ESTABLISHED and sp.client is not None
    w.peer.clear()
    sp.server.send(b"x")  # a server-leg segment in flight for the ICMP to quote
    w.term.touched[sp.key] = sp
    w.term.flush(0.02, _Out())
    data = [p for p in w.peer if len(p) > 52]
    assert data
    out = w.from_tunnel([unreachable(w, data[0], 1)], 0.03)
    assert out.tun == [] and not sp.finished and sp.server.state is State.ESTABLISHED


def test_icmp_about_other_flows_passes_through() -> None:
    w = World()
    w.syn()
    other = TcpConnection((C4, 40001), (S4, 81), TcpConfig())
    other.connect(0.0)
    (seg,) = other.segments_to_send(0.0)
    icmp = unreachable(w, w.term.packet(C4, S4, seg), 1)
    out = w.from_tunnel([icmp], 0.05)
    assert out.tun == [icmp] and len(w.term.splices) == 1


def test_a_truncated_or_corrupt_icmp_passes_through_untouched() -> None:
    w = World()
    w.syn()
    (syn,) = w.peer
    icmp = bytearray(unreachable(w, syn, 1))
    icmp[30] ^= 0xFF   # checksum no longer matches
    short = unreachable(w, syn[:24], 1)  # quote too short for the ports and sequence
    out = w.from_tunnel([bytes(icmp), short], 0.05)
    assert out.tun == [bytes(icmp), short]
    (sp,) = w.term.splices.values()
    assert sp.server.state is State.SYN_SENT


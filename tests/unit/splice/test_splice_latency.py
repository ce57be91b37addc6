"""Time to first byte through a splice: what leaves in which core call (explicit `now`).

Observer chains (every inspector `observer = True`, fail_open): a chunk is handed to the other
leg in the very call that received it and inspected TAP_DELAY later (`drain`, run by the timer
`get_timer()` reports), so that a request's parse does not hold up its response. Other chains
inspect first, as before.
"""

from __future__ import annotations

from typing import Any

from splice_harness import C_ADDR, S_ADDR, Harness, _Out, _tcp_of

from bridge.flows import InspectRule
from bridge.inspect.api import RESET, CloseReason, Direction, Flow, Inspector
from bridge.inspect.http import HttpInspector
from bridge.userspace.splice import TAP_DELAY, TAP_MAX, Phase
from stack.state import State
from stack.wire.tcp import parse_tcp

C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: s\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Watch(Inspector):
    """Records every hook call in order, with the flow's last_seen at that moment."""

    observer = True

    def __init__(self, answer: Any = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer = answer

    def data(self, flow: Flow, direction: Direction, data: bytes) -> Any:
        self.calls.append(("data", direction, bytes(data), flow.last_seen))
        return self.answer

    def eof(self, flow: Flow, direction: Direction) -> None:
        self.calls.append(("eof", direction))

    def flow_end(self, flow: Flow, reason: CloseReason) -> None:
        self.calls.append(("end", reason))

    def seen(self, d: Direction) -> bytes:
        return b"".join(c[2] for c in self.calls if c[0] == "data" and c[1] is d)


class NotObserver(Watch):
    observer = False


def rule(**kw: Any) -> InspectRule:
    return InspectRule(name="t", inspectors=("x",), **kw)


def established(inspectors: list[Any], **kw: Any) -> Harness:
    h = Harness(rule(**kw), inspectors)
    assert h.run(lambda h: h.client.conn.state is State.ESTABLISHED and h.server is not None
                 and h.server.conn.state is State.ESTABLISHED and bool(h.term.splices)
                 and next(iter(h.term.splices.values())).phase == Phase.OPEN)
    assert h.run(lambda h: not any(x.q for x in (h.c2t, h.t2c, h.t2s, h.s2t)))
    return h


def payloads(pkts: list[bytes]) -> bytes:
    out = b""
    for p in pkts:
        src, dst, tcp = _tcp_of(p)
        seg = parse_tcp(tcp, src, dst)
        assert seg is not None
        out += bytes(seg.payload)
    return out


def client_sends(h: Harness, data: bytes, now: float, fin: bool = False) -> _Out:
    """The client's segments reach the Terminator as one batch: from_tun + flush at `now`."""
    h.client.conn.send(data)
    if fin:
        h.client.conn.close()
    out = _Out()
    for seg in h.client.conn.segments_to_send(now):
        pkt = h.term.packet(C_ADDR, S_ADDR, seg)
        assert h.term.from_tun(pkt, len(pkt), now)
    h.term.flush(now, out)
    return out


def server_sends(h: Harness, data: bytes, now: float) -> _Out:
    """The server's segments come back from the tunnel as one batch: from_peer at `now`."""
    assert h.server is not None
    h.server.conn.send(data)
    out = _Out()
    h.term.from_peer([h.term.packet(S_ADDR, C_ADDR, seg)
                      for seg in h.server.conn.segments_to_send(now)], now, out)
    return out


def test_observer_chain_forwards_the_request_in_the_call_that_receives_it() -> None:
    w = Watch()
    http = HttpInspector()
    h = established([http, w])
    now = h.now + 0.01
    out = client_sends(h, REQUEST, now)
    assert payloads(out.peer) == REQUEST          # upstream within the same core call ...
    assert w.calls == []                          # ... before any inspector ran
    t = h.term.get_timer()
    assert t == now + TAP_DELAY                   # the inspection is due a little later
    h.term.handle_timer(now + TAP_DELAY / 2, _Out())
    assert w.calls == []                          # not before
    out2 = _Out()
    h.term.handle_timer(now + TAP_DELAY, out2)
    assert w.seen(C2S) == REQUEST and w.calls[0][3] == now
    (sp,) = h.term.splices.values()
    assert sp.flow.metadata["http"][0]["target"] == "/small.txt"
    assert payloads(out2.peer) == b""             # nothing forwarded twice
    t = h.term.get_timer()
    assert t is None or t > now + TAP_DELAY       # drained: no busy timer


def test_observer_chain_forwards_the_response_in_the_divert_call() -> None:
    w = Watch()
    h = established([HttpInspector(), w])
    now = h.now + 0.01
    client_sends(h, REQUEST, now)
    out = server_sends(h, RESPONSE, now + 0.001)
    assert payloads(out.tun) == RESPONSE          # to the client within the from_peer call
    assert w.calls == []                          # the request is not parsed yet either
    h.term.handle_timer(now + TAP_DELAY, _Out())  # one drain: request, then response
    assert [c[1] for c in w.calls] == [C2S, S2C]
    assert w.seen(C2S) == REQUEST and w.seen(S2C) == RESPONSE
    (sp,) = h.term.splices.values()
    assert sp.flow.metadata["http"][0]["status"] == 200


def test_a_response_that_carries_the_fin_is_forwarded_with_it_before_any_parse() -> None:
    """nginx with keepalive_timeout 0 and tcp_nopush: headers, body and FIN in one segment.
    The observers' eof runs in the drain, after the data, not before forwarding."""
    w = Watch()
    h = established([HttpInspector(), w])
    now = h.now + 0.01
    client_sends(h, REQUEST, now)
    assert h.server is not None
    h.server.conn.send(RESPONSE)
    h.server.conn.close()
    out = _Out()
    segs = h.server.conn.segments_to_send(now + 0.001)
    assert len(segs) == 1 and segs[0].flags & 0x01  # FIN on the data segment
    h.term.from_peer([h.term.packet(S_ADDR, C_ADDR, segs[0])], now + 0.001, out)
    assert payloads(out.tun) == RESPONSE          # to the client within the from_peer call ...
    fins = [p for p in out.tun if parse_tcp(_tcp_of(p)[2], S_ADDR, C_ADDR).flags & 0x01]
    assert fins                                   # ... with the FIN
    assert w.calls == []                          # nothing parsed yet
    h.term.handle_timer(now + TAP_DELAY, _Out())
    assert [(c[0], c[1]) for c in w.calls] == [("data", C2S), ("data", S2C), ("eof", S2C)]
    (sp,) = h.term.splices.values()
    assert sp.flow.metadata["http"][0]["status"] == 200


def test_inspection_runs_later_but_sees_the_arrival_time() -> None:
    """pcap and log take flow.last_seen as the chunk's time: drain restores the arrival."""
    w = Watch()
    h = established([w])
    now = h.now + 0.01
    client_sends(h, REQUEST, now)
    h.term.handle_timer(now + 0.5, _Out())
    assert w.calls[0][3] == now
    (sp,) = h.term.splices.values()
    assert sp.flow.last_seen == now


def test_a_chain_that_may_rewrite_inspects_before_forwarding() -> None:
    for chain, kw in (([NotObserver()], {}), ([Watch()], {"fail_open": False})):
        h = established(chain, **kw)
        now = h.now + 0.01
        out = client_sends(h, REQUEST, now)
        assert chain[0].seen(C2S) == REQUEST      # inspected inside the same call
        assert payloads(out.peer) == REQUEST


def test_a_chunk_beyond_the_tap_drains_it_first_and_is_inspected_inline() -> None:
    w = Watch()
    h = established([w])
    now = h.now + 0.01
    client_sends(h, REQUEST, now)
    big = bytes(range(256)) * (TAP_MAX // 256 + 1)
    assert len(REQUEST) + len(big) > TAP_MAX
    (sp,) = h.term.splices.values()
    assert sp.life.received(C2S, big, now + 0.001) == big  # one chunk, as a leg hands it over
    assert w.seen(C2S) == REQUEST + big           # in order, inline, nothing left behind
    assert sp.life.tapped == 0 and sp.life.tap_due is None


def test_eof_and_flow_end_come_after_every_byte() -> None:
    w = Watch()
    h = Harness(rule(), [w], client_data=REQUEST, server_data=RESPONSE, client_close=True,
                server_close=True)
    assert h.run(lambda h: any(c[0] == "end" for c in w.calls))
    kinds = [(c[0], c[1]) for c in w.calls]
    assert kinds.index(("eof", C2S)) > kinds.index(("data", C2S))
    assert kinds.index(("eof", S2C)) > kinds.index(("data", S2C))
    assert kinds[-1] == ("end", CloseReason.CLOSED)
    assert w.seen(C2S) == REQUEST and w.seen(S2C) == RESPONSE


def test_an_observer_that_answers_reset_in_drain_aborts_the_flow() -> None:
    w = Watch(answer=RESET)  # breaks its word: observers never reset
    h = established([w])
    now = h.now + 0.01
    client_sends(h, REQUEST, now)
    out = _Out()
    h.term.handle_timer(now + TAP_DELAY, out)
    (sp,) = h.term.splices.values() or [None]
    assert sp is None or sp.finished
    assert h.term.ended.get("inspector_reset", 0) + (sp is not None) >= 1
    assert any(c == ("end", CloseReason.INSPECTOR_RESET) for c in w.calls)
    rst_client = [p for p in out.tun if parse_tcp(_tcp_of(p)[2], S_ADDR, C_ADDR).flags & 0x04]
    rst_server = [p for p in out.peer if parse_tcp(_tcp_of(p)[2], C_ADDR, S_ADDR).flags & 0x04]
    assert rst_client and rst_server


def test_second_small_write_is_forwarded_at_once_both_ways() -> None:
    """Issue 11 #3: the legs mirror a TCP_NODELAY endpoint (RFC 9293 §3.7.4: the application
    may disable Nagle). A second small write, sent while the first is still unacknowledged
    (the peer delays its ACK, 200 ms like Windows), leaves the splice in the same call."""
    from stack.tcp_config import TcpConfig

    nodelay = TcpConfig(mss=1400, msl=1.0, nagle=False, delayed_ack=0.2)
    h = Harness(rule(), [NotObserver()], client_cfg=nodelay, server_cfg=nodelay)
    assert h.run(lambda h: h.server is not None and h.server.conn.state is State.ESTABLISHED
                 and bool(h.term.splices)
                 and next(iter(h.term.splices.values())).phase == Phase.OPEN)
    assert h.run(lambda h: not any(x.q for x in (h.c2t, h.t2c, h.t2s, h.s2t)))
    now = h.now + 0.01
    assert payloads(client_sends(h, b"1" * 20, now).peer) == b"1" * 20
    # the server has not acknowledged: Nagle on the server leg would hold this back
    assert payloads(client_sends(h, b"2" * 20, now + 0.001).peer) == b"2" * 20
    assert payloads(server_sends(h, b"3" * 20, now + 0.002).tun) == b"3" * 20
    assert payloads(server_sends(h, b"4" * 20, now + 0.003).tun) == b"4" * 20


def test_legs_run_without_nagle_and_with_linux_rto() -> None:
    """Issue 11 #2/#3: both legs' settings: TCP_NODELAY, and RTO = SRTT + max(4*RTTVAR,
    200 ms) so a real peer's 200 ms delayed ACK does not race the timer."""
    from bridge.userspace.terminator import Terminator

    term = Terminator((), lambda *a: None, lambda dst: 1500, lambda: 1500)
    key = (4, C_ADDR, S_ADDR, 40000, 80)
    for leg in term.configs_for(key, None):
        assert not leg.nagle
        assert leg.rto_var_min == 0.2 and leg.rto_min == 0.2

"""Splice through the Terminator: client TcpConnection <-> splice <-> server TcpConnection."""

from __future__ import annotations

import os
from typing import Any

from splice_harness import C_ADDR, S_ADDR, Harness, finished

from bridge.flows import InspectRule
from bridge.inspect.api import RESET, CloseReason, Deny, Direction, Flow, Inspector
from bridge.inspect.replace import ReplaceInspector
from bridge.inspect.rules import parse_rules
from stack.events import Closed, ConnectionReset, PeerFinished
from stack.state import State
from stack.tcp_config import TcpConfig


class Recorder(Inspector):
    def __init__(self) -> None:
        self.ends: list[CloseReason] = []
        self.chunks: dict[Direction, bytearray] = {}
        self.flows: list[Flow] = []

    def flow_start(self, flow: Flow) -> Any:
        self.flows.append(flow)
        return super().flow_start(flow)

    def data(self, flow: Flow, direction: Direction, data: bytes) -> None:
        self.chunks.setdefault(direction, bytearray()).extend(data)
        return None

    def flow_end(self, flow: Flow, reason: CloseReason) -> None:
        self.ends.append(reason)


class Denier(Inspector):
    def flow_start(self, flow: Flow) -> Deny:
        return Deny("not today")


class Boom(Inspector):
    def data(self, flow: Flow, direction: Direction, data: bytes) -> None:
        raise RuntimeError("boom")


class ResetOn(Inspector):
    def __init__(self, needle: bytes) -> None:
        self.needle = needle

    def data(self, flow: Flow, direction: Direction, data: bytes) -> Any:
        return RESET if self.needle in data else None


def rule(**kw: Any) -> InspectRule:
    return InspectRule(name="t", inspectors=("x",), **kw)


def replace_rule(pairs: list[list[str]], **kw: Any) -> InspectRule:
    """A `replace` rule as the configuration gives it (options parsed by the rule parser)."""
    return parse_rules([{"name": "t", "inspectors": ["replace"], "replace": pairs, **kw}])[0]


def both_done(h: Harness) -> bool:
    assert h.server is not None
    return finished(h.client) and finished(h.server)


def test_data_both_ways_byte_exact_and_half_close() -> None:
    up = os.urandom(300_000)
    down = os.urandom(700_000)
    rec = Recorder()
    h = Harness(rule(connect_first=True), [rec], client_data=up, server_data=down,
                client_close=True, server_close=True)
    assert h.run(both_done, max_time=30)
    assert h.server is not None
    assert bytes(h.server.rx) == up and bytes(h.client.rx) == down
    assert h.client.has(PeerFinished) and h.server.has(PeerFinished)
    assert bytes(rec.chunks[Direction.CLIENT_TO_SERVER]) == up
    assert rec.ends == [CloseReason.CLOSED]
    flow = rec.flows[0]
    assert (flow.bytes_c2s, flow.bytes_s2c) == (len(up), len(down))
    # the server saw the client's own address and ISN, the client the server's ISN
    assert h.server_syns[0].seq == h.client.conn._snd.iss
    assert h.client_syns[0].seq == h.server.conn._snd.iss
    # both legs reaped once CLOSED (TIME-WAIT of msl)
    assert h.run(lambda h: not h.term.splices, max_time=200)
    assert h.term.ended == {"closed": 1}


def test_half_close_keeps_other_direction_open() -> None:
    """The client sends FIN first; the server keeps sending for a while, then closes."""
    h = Harness(rule(), [Recorder()], client_data=b"GET / HTTP/1.0\r\n\r\n", client_close=True)
    assert h.server is not None
    assert h.run(lambda h: h.server is not None and h.server.has(PeerFinished))
    assert h.server.conn.state is State.CLOSE_WAIT
    h.server.to_send = memoryview(b"late reply " * 10_000)
    h.server.close_after = True
    assert h.run(both_done)
    assert bytes(h.client.rx) == b"late reply " * 10_000
    assert h.server.rx == b"GET / HTTP/1.0\r\n\r\n"


def test_rewrite_by_replace() -> None:
    r = replace_rule([["hello", "HOWDY"]])
    body = b"hello world, " * 5000 + b"hel"
    h = Harness(r, [ReplaceInspector(r)], server_data=body, server_close=True,
                client_close=True)
    assert h.run(both_done)
    assert bytes(h.client.rx) == body.replace(b"hello", b"HOWDY")


def test_growing_rewrite_is_byte_exact() -> None:
    r = replace_rule([["a", "aaaa"]], max_buffer=16384)
    body = os.urandom(20_000) + b"a" * 50_000
    h = Harness(r, [ReplaceInspector(r)], server_data=body, server_close=True,
                client_close=True)
    assert h.run(both_done)
    assert bytes(h.client.rx) == body.replace(b"a", b"aaaa")


def test_deny_resets_client_and_never_reaches_server() -> None:
    rec = Recorder()
    h = Harness(rule(), [Denier(), rec], client_data=b"x")
    assert h.run(lambda h: finished(h.client))
    assert h.client.has(ConnectionReset) and not h.server_syns
    assert rec.ends == [CloseReason.DENIED]
    assert h.run(lambda h: not h.term.splices)


def test_connect_refused_upstream_resets_client() -> None:
    rec = Recorder()
    h = Harness(rule(connect_first=True), [rec], server_cfg=None, client_data=b"x")
    assert h.run(lambda h: finished(h.client))
    assert [type(e).__name__ for e in h.client.events] == ["ConnectionReset", "Closed"]
    assert h.client.events[0] == ConnectionReset("refused")
    assert rec.ends == [CloseReason.CONNECT_FAILED]
    assert h.term.status()["ended"] == {"connect_failed": 1}


def test_upstream_silent_times_out_with_rst() -> None:
    h = Harness(rule(), [Recorder()], server_cfg=None, terminator_kw={"syn_retries": 1})
    h.t2s.loss = 1.0  # the server never answers
    assert h.run(lambda h: finished(h.client), max_time=30)
    assert h.client.has(ConnectionReset)


def test_client_rst_reaches_server() -> None:
    rec = Recorder()
    h = Harness(rule(), [rec], server_data=b"x" * 2_000_000)
    assert h.server is not None
    assert h.run(lambda h: len(h.client.rx) > 100_000)
    h.client.conn.abort()
    assert h.run(lambda h: h.server is not None and finished(h.server))
    assert h.server.has(ConnectionReset)
    assert rec.ends == [CloseReason.CLIENT_RESET]


def test_server_rst_reaches_client() -> None:
    rec = Recorder()
    h = Harness(rule(), [rec], client_data=b"y" * 2_000_000)
    assert h.server is not None
    assert h.run(lambda h: h.server is not None and len(h.server.rx) > 100_000)
    h.server.conn.abort()
    assert h.run(lambda h: finished(h.client))
    assert h.client.has(ConnectionReset)
    assert rec.ends == [CloseReason.SERVER_RESET]


def test_inspector_reset_aborts_both() -> None:
    h = Harness(rule(connect_first=True), [ResetOn(b"EVIL")], client_data=b"fine " * 100 + b"EVIL")
    assert h.run(both_done)
    assert h.server is not None
    assert h.client.has(ConnectionReset) and h.server.has(ConnectionReset)
    assert b"EVIL" not in h.server.rx


def test_inspector_raises_fail_open_passes_data() -> None:
    rec = Recorder()
    data = os.urandom(50_000)
    h = Harness(rule(fail_open=True), [Boom(), rec], client_data=data, client_close=True,
                server_close=True)
    assert h.run(both_done)
    assert h.server is not None and bytes(h.server.rx) == data
    assert rec.ends == [CloseReason.CLOSED]
    assert "Boom.data" in rec.flows[0].metadata["errors"][0]


def test_inspector_raises_fail_closed_resets() -> None:
    rec = Recorder()
    h = Harness(rule(fail_open=False, connect_first=True), [Boom(), rec], client_data=b"z" * 5000)
    assert h.run(both_done)
    assert h.client.has(ConnectionReset)
    assert h.server is not None and h.server.has(ConnectionReset)
    assert rec.ends == [CloseReason.INSPECTOR_ERROR]


def test_back_pressure_bounds_memory_and_closes_client_window() -> None:
    """The server stops reading: the splice holds at most max_buffer, the client sees 0."""
    max_buffer = 64 * 1024
    data = os.urandom(2_000_000)
    h = Harness(rule(max_buffer=max_buffer), [Recorder()], client_data=data,
                client_cfg=TcpConfig(mss=1400, msl=1.0, send_buffer=64 * 1024),
                server_cfg=TcpConfig(auto_consume=False, recv_buffer=32 * 1024, msl=1.0),
                server_reading=False)
    assert h.server is not None
    peak = [0]
    zero_window_seen = [False]

    def watch(h: Harness) -> None:
        for sp in h.term.splices.values():
            held = sp.held_bytes()
            for leg in (sp.client, sp.server):
                if leg is not None:
                    i = leg.info()
                    held += int(i["unsent"]) + int(i["in_flight"])  # type: ignore[call-overload]
                    # rx_held is not added: those bytes are the ones queued between
                    # the legs (held_bytes), still counted in the leg's window until the
                    # other leg's send buffer takes them (consumed()).
                    held += leg._rcv.rx_len + leg._rcv.ooo.nbytes
            peak[0] = max(peak[0], held)
        if h.client.conn._snd.wnd == 0 and h.client.conn.state is State.ESTABLISHED:
            zero_window_seen[0] = True

    h.hooks.append(watch)
    h.run(lambda h: False, max_time=20)
    assert zero_window_seen[0], "the client never saw a zero window"
    assert len(h.server.rx) <= 32 * 1024
    # the client is held back, not buffered: what left it is bounded by the buffers on the way
    moved = len(data) - len(h.client.to_send)
    assert moved <= 64 * 1024 + max_buffer + 32 * 1024 + 3000, moved
    assert peak[0] <= max_buffer + 2 * 1500, peak[0]
    # the reader wakes up: everything arrives byte-exact
    h.server.reading = True
    h.server.conn.consumed(h.server.conn._rcv.rx_held)
    h.client.close_after = True
    h.server.close_after = True
    assert h.run(both_done, max_time=200)
    assert bytes(h.server.rx) == data


def test_flows_table_has_both_legs() -> None:
    h = Harness(rule(), [Recorder()], server_data=b"q" * 100_000)
    assert h.run(lambda h: len(h.client.rx) == 100_000)
    (info,) = h.term.flows(h.now)
    assert info["src"] == "198.18.1.10" and info["dport"] == 80 and info["phase"] == "open"
    assert info["client_leg"]["state"] == "ESTABLISHED"
    assert info["server_leg"]["bytes_in"] >= 100_000
    assert info["inspectors"] == ["Recorder"]
    assert {"srtt", "rto", "cwnd", "retransmissions"} <= set(info["server_leg"])


def test_unselected_flow_is_not_taken() -> None:
    r = rule(dst_ports=((443, 443),))
    h = Harness(r, [Recorder()])
    h.run(lambda h: bool(h.forwarded), max_time=1)
    assert h.forwarded and not h.term.splices
    assert bytes(h.forwarded[0][12:20]) == C_ADDR + S_ADDR


def test_stray_segment_of_reaped_flow_gets_rst() -> None:
    h = Harness(rule(), [Recorder()], client_close=True, server_close=True)
    assert h.run(both_done)
    assert h.run(lambda h: not h.term.splices, max_time=200)
    # the flow table still says INSPECT; a late ACK for the dead connection gets a RST
    from stack.wire.tcp import ACK, TcpSegment

    late = TcpSegment(40000, 80, 12345, 678, ACK, 100)
    pkt = h.term.packet(C_ADDR, S_ADDR, late)
    assert h.term.from_tun(pkt, len(pkt), h.now)
    h.term.flush(h.now, h.out)
    assert len(h.out.tun) == 1 and h.out.tun[0][33] & 0x04  # RST
    assert h.client.has(Closed)


def test_new_syn_on_lingering_4tuple_gets_a_new_splice() -> None:
    h = Harness(rule(), [Recorder()], server_data=b"first", client_close=True,
                server_close=True, terminator_kw={"msl": 60.0})
    assert h.run(both_done)
    (old,) = h.term.splices.values()
    assert old.finished and not old.dead     # a leg lingers in TIME-WAIT for 2 * msl
    from splice_harness import C_PORT, S_PORT, App

    from stack.connection import TcpConnection

    assert h.server is not None
    h.client = App(TcpConnection((C_ADDR, C_PORT), (S_ADDR, S_PORT), h.client.conn.config))
    server = TcpConnection((S_ADDR, S_PORT), (C_ADDR, C_PORT), h.server.conn.config)
    server.listen()
    h.server = App(server, b"second", True)
    h.client.close_after = True
    h.client.conn.connect(h.now)
    assert h.run(both_done, max_time=h.now + 30)
    assert bytes(h.client.rx) == b"second"
    assert h.term.counters["splices"] == 2


def test_from_peer_leaves_other_flows_alone_while_a_splice_lives() -> None:
    from stack.wire.tcp import ACK, TcpSegment

    h = Harness(rule(), [Recorder()], server_data=b"x" * 1000)
    assert h.run(lambda h: len(h.client.rx) == 1000)
    other_client = bytes([198, 18, 1, 11])
    for dst, dport in ((other_client, 40000), (C_ADDR, 40001)):
        pkt = h.term.packet(S_ADDR, dst, TcpSegment(80, dport, 1, 2, ACK, 100, b"data"))
        h.out.tun.clear()
        h.term.from_peer([pkt], h.now, h.out)
        assert h.out.tun == [pkt]  # not a server leg's: passed on to the TUN as it is
    mine = h.term.packet(S_ADDR, C_ADDR, TcpSegment(80, 40000, 1, 2, ACK, 100))
    h.out.tun.clear()
    h.term.from_peer([mine], h.now, h.out)
    assert mine not in h.out.tun  # the server leg took it


def test_idle_flow_is_reset_after_idle_timeout() -> None:
    rec = Recorder()
    h = Harness(rule(), [rec], server_data=b"hi", terminator_kw={"idle_timeout": 5.0})
    assert h.run(lambda h: h.client.rx == b"hi")
    assert h.run(both_done, max_time=30)
    assert h.client.has(ConnectionReset)
    assert h.server is not None and h.server.has(ConnectionReset)
    assert rec.ends == [CloseReason.IDLE] and 5.0 <= h.now < 8.0


def test_client_syn_retransmit_and_ack_in_one_batch() -> None:
    """Under load the client retransmits its SYN (our SYN-ACK waits for the server) and the
    retransmission reaches the client leg in the same batch as the client's ACK of our SYN-ACK,
    while the server's first bytes (an SSH banner) are already queued on the client leg."""
    h = Harness(rule(connect_first=True), [Recorder()], server_data=b"SSH-2.0-banner\r\n",
                client_close=True, server_close=True)
    syn_pkt = h.term.packet(C_ADDR, S_ADDR, h.client.conn.segments_to_send(0.0)[0])
    h.client.conn._snd.nxt = 0  # the harness sends this SYN (again) as usual
    assert h.run(lambda h: bool(h.client_syns))   # the client has our SYN-ACK
    h.step()                                        # ... and its ACK is on the wire: hold it
    held = [p for _, _, p in h.c2t.q]
    h.c2t.q.clear()

    def banner_queued(h: Harness) -> bool:
        sp = next(iter(h.term.splices.values()))
        return sp.client is not None and sp.client.info()["unsent"] > 0

    assert h.run(banner_queued)
    for pkt in [syn_pkt, *held]:                    # one batch: the old SYN, then the ACK
        assert h.term.from_tun(pkt, len(pkt), h.now)
    h.term.flush(h.now, h.out)
    assert h.run(both_done)
    assert h.client.rx == b"SSH-2.0-banner\r\n"


def test_a_bug_in_one_splice_resets_that_flow_only() -> None:
    rec = Recorder()
    h = Harness(rule(), [rec], server_data=b"z" * 100_000)
    assert h.run(lambda h: len(h.client.rx) > 10_000)
    (sp,) = h.term.splices.values()
    assert sp.client is not None

    leg = sp.client
    real = leg.segments_to_send

    def broken(now: float) -> list[Any]:
        leg.segments_to_send = real  # type: ignore[method-assign]
        raise ValueError("a bug")

    leg.segments_to_send = broken  # type: ignore[method-assign]
    assert h.run(lambda h: finished(h.client) and h.server is not None
                 and finished(h.server), max_time=30)
    assert h.server is not None and h.server.has(ConnectionReset)
    assert h.term.drops["internal_error"] == 1 and not h.term.splices
    assert "internal: ValueError('a bug')" in rec.flows[0].metadata["errors"]
    assert rec.ends == [CloseReason.SHUTDOWN]

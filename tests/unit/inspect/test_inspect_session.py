"""InspectSession: the sans-I/O stream life shared by the kernel relay and the userspace splice."""

from __future__ import annotations

from helpers_inspect import flow, rule

from bridge.inspect.api import C2S, S2C, CloseReason
from bridge.inspect.manager import InspectorManager
from bridge.inspect.session import Abort, Closed, Deliver, HalfClose, InspectSession


def session(body: str) -> InspectSession:
    m = InspectorManager([rule(body)])
    return InspectSession(flow(), m.chain("r"))


def test_half_close_each_way_then_closed_with_held_bytes_released() -> None:
    s = session('inspectors=["log", "replace"]\nreplace=[["abc", "xyz"]]')
    assert s.start(1.0)
    assert s.received(C2S, b"hello ab", 1.1) == [Deliver(C2S, b"hello ")]
    assert s.eof(C2S, 1.2) == [Deliver(C2S, b"ab"), HalfClose(C2S)]
    assert s.received(C2S, b"late", 1.3) == []          # nothing after our own FIN
    assert s.received(S2C, b"abc!", 1.4) == [Deliver(S2C, b"xyz!")]
    assert s.eof(S2C, 1.5) == [HalfClose(S2C), Closed()]
    assert s.finished and s.reason is CloseReason.CLOSED
    f = s.flow
    assert (f.bytes_c2s, f.bytes_s2c, f.end) == (8, 4, 1.5)
    assert s.reset(C2S, 2.0) == [] and s.abort(CloseReason.SHUTDOWN, 2.0) == []
    log = s.chain.inspectors[0]  # type: ignore[union-attr]
    assert len(log.pending()) == 1                     # flow_end ran exactly once


def test_peer_reset_aborts_with_reason() -> None:
    s = session('inspectors=["log"]')
    s.start(0.0)
    assert s.reset(S2C, 1.0) == [Abort(CloseReason.SERVER_RESET)]
    assert s.received(C2S, b"x", 1.1) == [] and s.eof(C2S, 1.2) == []


def test_inspector_reset_and_fail_closed_error() -> None:
    s = session('inspectors=["block"]\nblock=["bad"]')
    s.start(0.0)
    assert s.received(C2S, b"so b", 0.1) == [Deliver(C2S, b"so b")]
    assert s.received(C2S, b"ad", 0.2) == [Abort(CloseReason.INSPECTOR_RESET)]
    s2 = session('inspectors=["sample_inspectors:Boom"]\nfail_open=false')
    s2.start(0.0)
    assert s2.received(S2C, b"x", 0.1) == [Abort(CloseReason.INSPECTOR_ERROR)]


def test_denied_at_start() -> None:
    s = session('inspectors=["block"]\nblock_dst=["198.18.2.0/24"]')
    assert s.start(0.0) is False and s.finished and s.reason is CloseReason.DENIED


def test_no_chain_relays_untouched() -> None:
    s = InspectSession(flow(), None)
    assert s.start(0.0)
    assert s.received(C2S, b"abc", 0.1) == [Deliver(C2S, b"abc")]
    assert s.abort(CloseReason.CONNECT_FAILED, 0.2) == [Abort(CloseReason.CONNECT_FAILED)]
    assert s.flow.close_reason is CloseReason.CONNECT_FAILED


def test_drop_delivers_nothing() -> None:
    s = session('inspectors=["sample_inspectors:Dropper"]')
    s.start(0.0)
    assert s.received(C2S, b"please drop", 0.1) == []
    assert s.received(C2S, b"keep", 0.2) == [Deliver(C2S, b"keep")]

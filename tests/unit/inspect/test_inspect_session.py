"""InspectSession: the sans-I/O flow life both backends (kernel relay, userspace splice) use."""

from __future__ import annotations

from helpers_inspect import flow, rule

from bridge.inspect.api import C2S, S2C, CloseReason, Direction, Flow, Inspector
from bridge.inspect.manager import InspectorChain, InspectorManager
from bridge.inspect.session import TAP_DELAY, TAP_MAX, Abort, InspectSession, Phase


def session(body: str, tap: bool = False) -> InspectSession:
    m = InspectorManager([rule(body)])
    return InspectSession(flow(), m.chain("r"), tap=tap)


def test_half_close_each_way_then_closed_with_held_bytes_released() -> None:
    s = session('inspectors=["log", "replace"]\nreplace=[["abc", "xyz"]]')
    assert s.start(1.0) and s.phase == Phase.CONNECTING
    s.opened()
    assert s.phase == Phase.OPEN
    assert s.received(C2S, b"hello ab", 1.1) == b"hello "
    assert s.eof(C2S, 1.2) == b"ab"                   # the held tail, before the FIN
    assert s.received(C2S, b"late", 1.3) is None      # nothing after the sender's FIN
    assert s.received(S2C, b"abc!", 1.4) == b"xyz!"
    assert not s.both_ended
    assert s.eof(S2C, 1.5) == b"" and s.both_ended and not s.finished
    assert s.close(1.6) is None
    assert s.finished and s.flow.close_reason is CloseReason.CLOSED and s.phase == Phase.ENDED
    f = s.flow
    assert (f.bytes_c2s, f.bytes_s2c, f.end) == (12, 4, 1.6)
    assert s.reset(C2S, 2.0) is None and s.abort(CloseReason.SHUTDOWN, 2.0) is None
    log = s.chain.inspectors[0]  # type: ignore[union-attr]
    assert len(log.pending()) == 1                     # flow_end ran exactly once


def test_peer_reset_aborts_with_reason() -> None:
    s = session('inspectors=["log"]')
    s.start(0.0)
    assert s.reset(S2C, 1.0) == Abort(CloseReason.SERVER_RESET)
    assert s.received(C2S, b"x", 1.1) is None and s.eof(C2S, 1.2) is None
    assert s.flow.bytes_c2s == 1                       # counted, not inspected


def test_inspector_reset_and_fail_closed_error() -> None:
    s = session('inspectors=["block"]\nblock=["bad"]')
    s.start(0.0)
    assert s.received(C2S, b"so b", 0.1) == b"so b"
    assert s.received(C2S, b"ad", 0.2) == Abort(CloseReason.INSPECTOR_RESET)
    assert s.flow.close_reason is CloseReason.INSPECTOR_RESET
    s2 = session('inspectors=["sample_inspectors:Boom"]\nfail_open=false')
    s2.start(0.0)
    assert s2.received(S2C, b"x", 0.1) == Abort(CloseReason.INSPECTOR_ERROR)


def test_denied_at_start() -> None:
    s = session('inspectors=["block"]\nblock_dst=["198.18.2.0/24"]')
    assert s.start(0.0) is False and s.finished and s.flow.close_reason is CloseReason.DENIED


def test_no_chain_relays_untouched() -> None:
    s = InspectSession(flow(), None)
    assert s.start(0.0)
    assert s.received(C2S, b"abc", 0.1) == b"abc"
    assert s.eof(C2S, 0.15) == b""
    assert s.abort(CloseReason.CONNECT_FAILED, 0.2) == Abort(CloseReason.CONNECT_FAILED)
    assert s.flow.close_reason is CloseReason.CONNECT_FAILED


def test_drop_delivers_nothing() -> None:
    s = session('inspectors=["sample_inspectors:Dropper"]')
    s.start(0.0)
    assert s.received(C2S, b"please drop", 0.1) == b""
    assert s.received(C2S, b"keep", 0.2) == b"keep"


# --- the observer tap (what the userspace splice uses for its time to first byte) ----------

class Seen(Inspector):
    observer = True

    def __init__(self) -> None:
        self.log: list[tuple[str, Direction, bytes, float]] = []

    def data(self, flow: Flow, direction: Direction, data: bytes) -> None:
        self.log.append(("data", direction, data, flow.last_seen))

    def eof(self, flow: Flow, direction: Direction) -> None:
        self.log.append(("eof", direction, b"", flow.last_seen))

    def flow_end(self, flow: Flow, reason: CloseReason) -> None:
        self.log.append(("end", C2S, reason.value.encode(), flow.last_seen))


def tapped() -> tuple[InspectSession, Seen]:
    w = Seen()
    s = InspectSession(flow(), InspectorChain(rule('inspectors=["log"]'), [w]), tap=True)
    s.start(0.0)
    return s, w


def test_tap_forwards_first_and_inspects_at_the_deadline_in_order() -> None:
    s, w = tapped()
    assert s.received(C2S, b"GET", 1.0) == b"GET" and w.log == []
    assert s.tap_due == 1.0 + TAP_DELAY and s.tapped == 3
    assert s.received(S2C, b"200", 1.001) == b"200"
    assert s.eof(S2C, 1.002) == b""                    # the FIN passes at once
    assert s.drain(1.0 + TAP_DELAY) is None
    assert [(k, d, b, t) for k, d, b, t in w.log] == [
        ("data", C2S, b"GET", 1.0), ("data", S2C, b"200", 1.001), ("eof", S2C, b"", 1.002)]
    assert s.tap_due is None and s.tapped == 0


def test_tap_overflow_drains_then_inspects_inline() -> None:
    s, w = tapped()
    s.received(C2S, b"a", 1.0)
    big = b"b" * TAP_MAX
    assert s.received(C2S, big, 1.001) == big
    assert [x[2] for x in w.log] == [b"a", big] and s.tapped == 0


def test_flow_end_comes_after_the_tapped_bytes() -> None:
    s, w = tapped()
    s.received(C2S, b"x", 1.0)
    assert s.abort(CloseReason.SHUTDOWN, 1.001) == Abort(CloseReason.SHUTDOWN)
    assert [x[0] for x in w.log] == ["data", "end"]

"""Terminator.warm: a throw-away connection through a private shadow, never the real state."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from splice_harness import Harness

from bridge.flows import InspectRule
from bridge.inspect.api import CloseReason, Direction, Flow, Inspector
from bridge.userspace.terminator import WARM_BULK_QUIET, WARM_WINDOW
from bridge.userspace.warm import WarmCycle
from stack.state import State

REQUEST = b"GET / HTTP/1.1\r\n\r\n"


class Count(Inspector):
    observer = True

    def __init__(self) -> None:
        self.calls = 0

    def flow_start(self, flow: Flow) -> Any:
        self.calls += 1
        return super().flow_start(flow)

    def data(self, flow: Flow, direction: Direction, data: bytes) -> None:
        self.calls += 1

    def flow_end(self, flow: Flow, reason: CloseReason) -> None:
        self.calls += 1


def live(tun_offload: bool = False) -> tuple[Harness, Count]:
    insp = Count()
    h = Harness(InspectRule(name="t", inspectors=("x",)), [insp], client_data=REQUEST,
                tun_offload=tun_offload)
    assert h.run(lambda h: h.server is not None and bytes(h.server.rx) == REQUEST)
    return h, insp


def snapshot(h: Harness) -> str:
    t = h.term
    return json.dumps([t.status(), t.flows(h.now), sorted(t._deadlines._at.items()), t.get_timer(),
                       len(t.table), sorted(t._clients.items())], default=repr, sort_keys=True)


def test_warm_without_terminated_traffic_does_nothing() -> None:
    h = Harness(InspectRule(name="t", inspectors=("x",)), [])
    h.term.warm(5.0)
    assert h.term._warm == {}


@pytest.mark.parametrize("tun_offload", [False, True])
def test_warm_runs_whole_connections_in_the_shadow_and_leaves_real_state_alone(
        tun_offload: bool) -> None:
    h, insp = live(tun_offload)
    before, calls = snapshot(h), insp.calls
    (sp,) = h.term.splices.values()
    legs = copy.copy(sp.server.info()), copy.copy(sp.client.info() if sp.client else None)
    now = h.now
    for i in range(5 * 40):
        h.term.warm(now + i * 0.0005)
        w = h.term._warm[0]
        assert len(w.term.splices) <= 1
        assert len(w.term.table) <= 8
    assert snapshot(h) == before and insp.calls == calls
    assert (sp.server.info(), sp.client.info() if sp.client else None) == legs
    shadow = h.term._warm[0].term
    assert shadow.counters["splices"] == 40 and not shadow.splices
    assert shadow.ended == {CloseReason.CLIENT_RESET.value: 40}
    # every hop happened: SYN-ACK and response from the server leg, ACK and request
    # from the client leg, in each of the 40 connections
    assert shadow.counters["from_server"] >= 80 and shadow.counters["from_client"] >= 80
    assert shadow.drops == {}
    # the real flow still works afterwards
    assert h.server is not None
    h.server.to_send = memoryview(b"reply")
    assert h.run(lambda h: bytes(h.client.rx) == b"reply")


def test_each_lane_has_its_own_shadow_and_warm_stops_after_the_window() -> None:
    h, _ = live()
    now = h.now
    h.term.warm(now, lane=0)
    h.term.warm(now, lane=1)
    assert isinstance(h.term._warm[0], WarmCycle) and h.term._warm[0] is not h.term._warm[1]
    # the real flow ends; warm goes on for WARM_WINDOW after the last splice opened
    for sp in list(h.term.splices.values()):
        h.term.forget(sp)
    w = h.term._warm[0]
    phase = w.phase
    h.term.warm(h.term._last_new + WARM_WINDOW / 2)
    assert w.phase != phase
    phase = w.phase
    h.term.warm(h.term._last_new + WARM_WINDOW * 2)
    assert w.phase == phase


def test_a_shadow_client_really_gets_the_response() -> None:
    h, _ = live()
    w = WarmCycle(h.term)
    now = h.now
    for i in range(4):
        w.step(now + i * 0.001)
    assert w.client is not None and w.client.state is State.ESTABLISHED
    w._client_in(w.client, now + 0.004)
    got = b""
    while (ev := w.client.next_event()) is not None:
        got += getattr(ev, "data", b"")
    assert got == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_no_warm_hop_while_a_server_leg_takes_bulk_runs() -> None:
    """A hop holds the GIL for 0.3-0.6 ms: while a server leg takes merged runs (a bulk
    transfer keeps the code hot) warm() does nothing, and it resumes after WARM_BULK_QUIET."""
    h, _ = live()
    assert h.server is not None
    h.s2t.rate = float("inf")  # its bursts arrive at once, in one batch: they merge
    h.server.to_send = memoryview(bytes(8 * 1400))  # a small response: a short run
    assert h.run(lambda h: len(h.client.rx) >= 8 * 1400)
    assert h.term.counters["server_runs"] > 0
    h.term.warm(h.now)
    assert isinstance(h.term._warm.get(0), WarmCycle)  # not a bulk transfer: warm goes on
    h.term._warm.clear()
    h.server.to_send = memoryview(bytes(200_000))
    assert h.run(lambda h: len(h.client.rx) >= 8 * 1400 + 200_000)  # in long runs
    bulk = h.term._bulk_at
    h.term.warm(bulk + WARM_BULK_QUIET / 2)
    assert h.term._warm == {}
    h.term.warm(bulk + 2 * WARM_BULK_QUIET)
    assert isinstance(h.term._warm.get(0), WarmCycle)

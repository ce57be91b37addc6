"""SeqReceiver.run_may_start / run_received (the GRO fast path's use of the policy, RFC 2890
§2.2): a run it allows is one that `receive` would deliver packet by packet, at once and in
order, and `run_received` leaves exactly the state those `receive` calls leave; a run it
refuses is one that `receive` would not deliver that way."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import SeqPolicy
from bridge.seqpolicy import JUMP_MAX, RESYNC_TIME, SeqReceiver


def _state(sr: SeqReceiver) -> tuple[object, ...]:
    return sr.last, sr.started, sr.run_n, sr.run_last, sr.run_since, sr.run_fast, sr.prev, \
        sorted(sr.held), sr.held_since, sr.flushes, sr.resyncs


@settings(max_examples=400, deadline=None)
@given(policy=st.sampled_from(list(SeqPolicy)), max_held=st.integers(1, 5),
       history=st.lists(st.tuples(st.integers(-1, 40), st.floats(0, 0.3)), max_size=40),
       base=st.sampled_from([0, 2**32 - 20]),
       start=st.one_of(st.just("next"), st.integers(-1, 45)), n=st.integers(1, 8))
def test_run_equals_receive_one_by_one(policy: SeqPolicy, max_held: int,
                                       history: list[tuple[int, float]], base: int,
                                       start: str | int, n: int) -> None:
    sr = SeqReceiver(policy, max_held, 0.1)
    now = 0.0
    sink: list[bytes | bytearray] = []
    for s, dt in history:  # some state: gaps, held packets, late ones, flushes, wrap-around
        now += dt
        sr.expire(now, sink)
        sr.receive(s if s < 0 else (base + s) & 0xFFFFFFFF, b"h", now, sink)
    first = (sr.last + 1) & 0xFFFFFFFF if start == "next" else \
        (-1 if start == -1 else (base + int(start)) & 0xFFFFFFFF)
    ref = copy.deepcopy(sr)
    out: list[bytes | bytearray] = []
    pkts = [bytes([i]) for i in range(n)]
    reasons = [ref.receive(-1 if first < 0 else (first + i) & 0xFFFFFFFF, p, now, out)
               for i, p in enumerate(pkts)]
    # delivered one by one at once: nothing dropped, held, released or flushed
    at_once = reasons == [-1] * n and out == pkts and not ref.held and \
        ref.flushes == sr.flushes
    if sr.run_may_start(first):
        assert at_once and ref.resyncs == sr.resyncs
        sr.run_received(-1 if first < 0 else (first + n - 1) & 0xFFFFFFFF)
        if policy is not SeqPolicy.OFF:
            assert _state(sr) == _state(ref)
    else:
        assert policy is not SeqPolicy.OFF
        # refused: receive() holds, releases, flushes, drops or resynchronises (a run of
        # out-of-window packets that completes is accepted anew: the per-packet path must
        # see it)
        assert not at_once or ref.resyncs > sr.resyncs


def test_reorder_refuses_the_next_number_while_packets_are_held() -> None:
    """seq == last + 1 with a held successor: receive() releases it too, so no run."""
    sr = SeqReceiver(SeqPolicy.REORDER, 5, 0.1)
    out: list[bytes | bytearray] = []
    assert sr.run_may_start(0)
    sr.receive(1, b"1", 0.0, out)  # held: 0 is missing
    assert sr.held and not sr.run_may_start(0) and not sr.run_may_start(2)
    sr.receive(0, b"0", 0.0, out)
    assert out == [b"0", b"1"] and sr.run_may_start(2) and not sr.run_may_start(1)


def test_drop_late_run_clears_the_late_count() -> None:
    """An accepted run ends a run of out-of-window packets, as an accepted packet does: the
    resynchronisation needs a run with no packet taken in the window meanwhile."""
    sr = SeqReceiver(SeqPolicy.DROP_LATE)
    out: list[bytes | bytearray] = []
    sr.receive(100, b"x", 0.0, out)
    for i in range(5):
        sr.receive(5 + i, b"late", RESYNC_TIME * i / 10, out)
    assert sr.run_n == 5 and sr.run_may_start(101)
    sr.run_received(110)
    assert sr.run_n == 0 and sr.last == 110 and sr.started
    assert not sr.run_may_start(110) and sr.run_may_start(111)
    assert sr.run_may_start(110 + JUMP_MAX) and not sr.run_may_start(111 + JUMP_MAX)
    sr.receive(10, b"late", RESYNC_TIME, out)  # a new run starts: the old one was ended
    assert out == [b"x"] and sr.resyncs == 0 and sr.run_n == 1

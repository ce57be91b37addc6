"""Timers.earliest (stack/timers.py) is the minimum of every deadline a connection has.

It is unrolled for speed (it runs after every segment a connection takes or sends) and tests
the keep-alive's idle condition inline: these tests compare it with the plain minimum over
random deadlines, on idle and busy connections, so that a deadline left out of the unrolled
code, or a keep-alive deadline given to a busy connection, fails here.
"""

from __future__ import annotations

import random

import pytest

from stack.connection import TcpConnection
from stack.state import State
from stack.tcp_config import TcpConfig

A = (bytes([198, 18, 10, 5]), 40001)
B = (bytes([198, 18, 20, 7]), 80)


def _reference(conn: TcpConnection) -> float | None:
    tm, snd, rcv = conn._timers, conn._snd, conn._rcv
    ts = [snd.rto_at, rcv.delack_at, snd.persist_at, tm.timewait_at, snd.early_at]
    if tm.keepalive:
        ts.append(tm._keepalive_at(conn.state, snd, rcv))  # None unless idle (RFC 9293 §3.8.4)
    found = [t for t in ts if t is not None]
    return min(found) if found else None


@pytest.mark.parametrize("keepalive", [False, True])
def test_earliest_is_the_minimum_of_every_deadline(keepalive: bool) -> None:
    rng = random.Random(7)
    conn = TcpConnection(A, B, TcpConfig(keepalive=keepalive, keepalive_idle=50.0))
    conn._state = State.ESTABLISHED
    tm, snd, rcv = conn._timers, conn._snd, conn._rcv
    seen_ka = 0
    for _ in range(3000):
        for obj, name in ((snd, "rto_at"), (rcv, "delack_at"), (snd, "persist_at"),
                          (tm, "timewait_at"), (snd, "early_at")):
            setattr(obj, name, rng.uniform(0, 100) if rng.random() < 0.4 else None)
        rcv.last_rx = rng.uniform(0, 100)
        snd.una = rng.randrange(3)
        snd.max = snd.una + rng.randrange(2)      # in flight, or not
        snd.nxt = snd.max
        snd.buf.end = snd.nxt - rng.randrange(2)  # queued, or not
        want = _reference(conn)
        assert tm.earliest(conn.state, snd, rcv) == want
        assert conn.get_timer() == want
        seen_ka += keepalive and want == rcv.last_rx + 50.0
    assert seen_ka > 0 or not keepalive  # the keep-alive deadline was the earliest at times

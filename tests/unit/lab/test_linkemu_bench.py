"""Cost of the emulator scheduler per frame, as ratios to a bare deque (prints, no timing asserts).

Run with -s to see the table. The runner adds one recv and one send per frame on top.
"""

from __future__ import annotations

import random
import time
from collections import deque

from bridge.lab.linkemu import EmuParams, Scheduler

N = 10000
FRAME = bytes(1400)


def _deque_baseline() -> float:
    q: deque[tuple[float, bytes]] = deque()
    t0 = time.perf_counter()
    for i in range(N):
        q.append((i * 1e-5 + 0.01, FRAME))
        while q and q[0][0] <= i * 1e-5:
            q.popleft()
    return time.perf_counter() - t0


def _scheduler(params: EmuParams) -> tuple[float, int]:
    sched = Scheduler(params, random.Random(1))
    released = 0
    t0 = time.perf_counter()
    for i in range(N):
        now = i * 1e-5  # 100k frames/s offered
        sched.push(FRAME, now)
        released += len(sched.pop_due(now))
    released += len(sched.pop_due(1e9))
    return time.perf_counter() - t0, released


def test_scheduler_cost_per_frame() -> None:
    base = min(_deque_baseline() for _ in range(2))
    rows = []
    for name, params in [
        ("delay", EmuParams(delay=0.01)),
        ("delay+jitter", EmuParams(delay=0.01, jitter=0.002)),
        ("all", EmuParams(delay=0.01, jitter=0.002, reorder_pct=5, duplicate_pct=5)),
    ]:
        cost, released = min(_scheduler(params) for _ in range(2))
        assert released >= N  # everything pushed comes out (plus duplicates)
        rows.append(f"{name:13} {cost / N * 1e6:6.2f} us/frame  {cost / base:5.1f}x deque")
    print(f"\nlinkemu scheduler, {N} frames (deque baseline {base / N * 1e6:.2f} us/frame)")
    print("\n".join(rows))

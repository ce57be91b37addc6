"""Per-batch timer cost of the Terminator against the number of live splices (not a test:
prints, never asserts). Issue 11 #8: get_timer/handle_timer walked every splice after each
batch (150-280 µs at 10,000 splices, 13 µs at 500).

    .venv/bin/python tests/unit/splice/bench_timers.py

N splices are opened (each a SYN from its own source, client leg in SYN-RECEIVED with its
SYN-ACK retransmission timer pending). One "batch" is what the adapter does after each batch
of packets: `get_timer()`, then `handle_timer(now, out)` when something is due, with one
splice's timer due per batch (its SYN-ACK goes again). Printed: µs per batch at 500 and
10,000 splices and the ratio; next to it, as the anchor measured in the same run, the old
approach's cost (a min() over every splice's deadline and a scan for due ones, which is what
the code before the heap did per batch), at both sizes.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bridge.flows import InspectRule, SpliceLimits  # noqa: E402
from bridge.inspect.manager import InspectorChain, InspectorManager  # noqa: E402
from bridge.userspace.terminator import Terminator  # noqa: E402
from stack.wire.tcp import SYN, TcpSegment  # noqa: E402

SRV = ipaddress.ip_address("198.18.2.10").packed


class _Out:
    def __init__(self) -> None:
        self.tun: list[Any] = []


def build(n: int) -> Terminator:
    rule = InspectRule(name="t", inspectors=())
    mgr = InspectorManager(())
    mgr.chains["t"] = InspectorChain(rule, [])
    lim = SpliceLimits(max_splices=n + 10, max_half_open=n + 10, max_half_open_per_prefix=n + 10)
    t = Terminator((rule,), lambda p, now, o: True, lambda d: 1440, lambda: 1440, manager=mgr,
                   limits=lim)
    out = _Out()
    for i in range(n):
        src = ipaddress.ip_address(0xC6130000 + i).packed  # 198.19.x.y
        # spread the SYNs over 1 s so that the timers are spread too
        now = i / n
        pkt = t.packet(src, SRV, TcpSegment(1024 + i % 60000, 80, i, 0, SYN, 64240, b"", 0, 1400))
        t.from_tun(pkt, len(pkt), now)
        t.flush(now, out)
    return t


def per_batch(t: Terminator, batches: int, start: float) -> float:
    """µs per batch over `batches` batches from `start` (the first SYN-ACK retransmissions
    are due from 1.0 s on, one per 1/n s: each batch has one due)."""
    out = _Out()
    n = len(t.splices)
    t0 = time.perf_counter()
    for b in range(batches):
        now = start + b / n
        nt = t.get_timer()
        if nt is not None and nt <= now:
            t.handle_timer(now, out)
        out.tun.clear()
    return (time.perf_counter() - t0) / batches * 1e6


def idle_batch(t: Terminator, batches: int) -> float:
    """µs per batch when nothing is due (the common case): get_timer() only."""
    t0 = time.perf_counter()
    for _ in range(batches):
        t.get_timer()
    return (time.perf_counter() - t0) / batches * 1e6


def old_way(deadlines: dict[Any, float], batches: int) -> float:
    """What the code before the heap did per batch: min() over all, a scan for due ones."""
    t0 = time.perf_counter()
    for b in range(batches):
        now = 1.0 + b / len(deadlines)
        min(deadlines.values())
        _due = [k for k, v in deadlines.items() if v <= now]
    return (time.perf_counter() - t0) / batches * 1e6


def main() -> None:
    rows = {}
    for n in (500, 10_000):
        t = build(n)
        batches = min(n, 1500) // 3   # three disjoint windows of due timers, the best kept
        cost = min(per_batch(t, batches, 1.0 + k * batches / n) for k in range(3))
        dl = {k: 1.0 + i / n for i, k in enumerate(t.splices)}
        old = min(old_way(dl, 200) for _ in range(3))
        rows[n] = (cost, old)
        idle = min(idle_batch(t, 2000) for _ in range(3))
        print(f"{n:6d} splices: {cost:7.2f} µs per batch with one timer due, {idle:5.2f} µs "
              f"with none (heap)   old per-batch walk: {old:8.2f} µs")
    (c5, o5), (c10, o10) = rows[500], rows[10_000]
    print(f"ratio 10,000/500: heap {c10 / c5:.2f}x, old walk {o10 / o5:.2f}x "
          f"(splice count x20)")


if __name__ == "__main__":
    main()

"""The link emulator's pure scheduler, driven with explicit time (no root, no sockets)."""

from __future__ import annotations

import bisect
import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from bridge.lab.linkemu import EmuParams, Runner, Scheduler


def frames(n: int) -> list[bytes]:
    return [i.to_bytes(4, "big") + b"x" * 60 for i in range(n)]


def seqno(frame: bytes) -> int:
    return int.from_bytes(frame[:4], "big")


def simulate(sched: Scheduler, arrivals: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """Push each frame at its arrival time and pop at every deadline, like the runner."""
    out: list[tuple[float, bytes]] = []
    pending = sorted(arrivals, key=lambda a: a[0])
    i = 0
    while i < len(pending) or sched.next_deadline() is not None:
        deadline = sched.next_deadline()
        arrival = pending[i][0] if i < len(pending) else None
        if arrival is not None and (deadline is None or arrival <= deadline):
            now = arrival
            while i < len(pending) and pending[i][0] == now:
                sched.push(pending[i][1], now)
                i += 1
        else:
            assert deadline is not None
            now = deadline
        for release, frame in sched.pop_due(now):
            assert release <= now
            out.append((now, frame))
    return out


def stream(n: int, gap: float, start: float = 100.0) -> list[tuple[float, bytes]]:
    return [(start + k * gap, f) for k, f in enumerate(frames(n))]


def make(seed: int = 1, **kw: float) -> Scheduler:
    return Scheduler(EmuParams(**kw), random.Random(seed))  # type: ignore[arg-type]


def test_no_impairment_passes_frames_at_once_in_order() -> None:
    sched = make()
    arr = stream(50, 0.001)
    out = simulate(sched, arr)
    assert [f for _, f in out] == [f for _, f in arr]
    assert all(t_out == t_in for (t_out, _), (t_in, _) in zip(out, arr, strict=True))
    assert sched.queued == 0 and sched.next_deadline() is None


def test_delay_releases_each_frame_exactly_delay_later() -> None:
    sched = make(delay=0.020)
    sched.push(b"a", 10.0)
    sched.push(b"b", 10.005)
    assert sched.pop_due(10.0199) == []
    assert sched.next_deadline() == pytest.approx(10.020)
    assert sched.pop_due(10.020) == [(pytest.approx(10.020), b"a")]
    assert sched.pop_due(10.030) == [(pytest.approx(10.025), b"b")]
    assert sched.stats()["released"] == 2


def test_jitter_spreads_delay_within_bounds_and_keeps_order() -> None:
    sched = make(delay=0.020, jitter=0.005, seed=7)
    arr = stream(2000, 0.010)  # gaps wider than the jitter: order is never forced
    out = simulate(sched, arr)
    assert [seqno(f) for _, f in out] == list(range(2000))
    delays = [t_out - t_in for (t_out, _), (t_in, _) in zip(out, arr, strict=True)]
    assert min(delays) >= 0.015 - 1e-9 and max(delays) <= 0.025 + 1e-9
    assert max(delays) - min(delays) > 0.009  # really spread, over nearly the whole band
    assert sum(delays) / len(delays) == pytest.approx(0.020, abs=0.0005)


def test_jitter_never_reorders_even_when_frames_are_close() -> None:
    sched = make(delay=0.010, jitter=0.010, seed=3)
    out = simulate(sched, stream(1000, 0.0001))
    assert [seqno(f) for _, f in out] == list(range(1000))


def test_jitter_larger_than_delay_clamps_at_zero() -> None:
    sched = make(delay=0.001, jitter=0.010, seed=3)
    arr = stream(500, 0.050)
    out = simulate(sched, arr)
    delays = [t_out - t_in for (t_out, _), (t_in, _) in zip(out, arr, strict=True)]
    assert min(delays) == 0.0 and max(delays) <= 0.011


def out_of_order(seqs: list[int]) -> int:
    """Arrivals below the highest sequence number already seen (what a receiver counts)."""
    top, late = -1, 0
    for s in seqs:
        if s < top:
            late += 1
        top = max(top, s)
    return late


def test_reorder_fraction_and_each_held_frame_overtaken_by_one() -> None:
    sched = make(delay=0.005, reorder_pct=10.0, seed=11)
    out = simulate(sched, stream(5000, 0.001))
    seqs = [seqno(f) for _, f in out]
    assert sorted(seqs) == list(range(5000))  # nothing lost, nothing added
    late = out_of_order(seqs)
    assert 400 <= late <= 600  # 10% of 5000, binomial sd ~21
    assert sched.stats()["reordered"] == late
    # Every late frame was overtaken by exactly one frame (the first one not held).
    seen: list[int] = []
    for s in seqs:
        overtaken_by = len(seen) - bisect.bisect_right(seen, s)
        assert overtaken_by in (0, 1)
        bisect.insort(seen, s)


def test_reorder_works_without_delay() -> None:
    sched = make(reorder_pct=25.0, seed=5)
    out = simulate(sched, stream(400, 0.001))
    assert out_of_order([seqno(f) for _, f in out]) > 60


def test_held_frame_without_follower_goes_out_after_hold() -> None:
    sched = make(delay=0.010, reorder_pct=100.0, hold=0.050)
    sched.push(b"only", 1.0)
    assert sched.next_deadline() == pytest.approx(1.060)
    assert sched.pop_due(1.059) == []
    assert [f for _, f in sched.pop_due(1.060)] == [b"only"]
    stats = sched.stats()
    assert stats["hold_expired"] == 1 and stats["reordered"] == 0


def test_duplicates_are_back_to_back_at_the_set_rate() -> None:
    sched = make(delay=0.002, duplicate_pct=5.0, seed=2)
    out = simulate(sched, stream(4000, 0.001))
    seqs = [seqno(f) for _, f in out]
    dups = len(seqs) - len(set(seqs))
    assert 140 <= dups <= 260  # 5% of 4000, sd ~14
    assert sched.stats()["duplicated"] == dups
    for k in range(1, len(seqs)):
        if seqs[k] in seqs[:k]:
            assert seqs[k - 1] == seqs[k]
    assert sorted(set(seqs)) == list(range(4000))


def test_queue_cap_in_frames_drops_and_counts() -> None:
    sched = make(delay=1.0, max_frames=10)
    for k, f in enumerate(frames(15)):
        sched.push(f, k * 0.001)
    assert sched.queued == 10 and sched.stats()["dropped_full"] == 5
    assert len(sched.pop_due(5.0)) == 10
    sched.push(b"again", 5.0)
    assert sched.queued == 1


def test_queue_cap_in_bytes() -> None:
    sched = make(delay=1.0, max_bytes=1000)
    for k in range(20):
        sched.push(b"z" * 100, k * 0.001)
    assert sched.queued == 10 and sched.stats()["dropped_full"] == 10


def test_same_seed_same_output_other_seed_differs() -> None:
    kw = {"delay": 0.01, "jitter": 0.004, "reorder_pct": 5.0, "duplicate_pct": 3.0}
    arr = stream(3000, 0.0007)
    a = simulate(make(seed=42, **kw), arr)
    b = simulate(make(seed=42, **kw), arr)
    c = simulate(make(seed=43, **kw), arr)
    assert a == b
    assert a != c


@pytest.mark.parametrize("kw", [
    {"delay": -0.001}, {"jitter": 61.0}, {"reorder_pct": 101.0}, {"duplicate_pct": -1.0},
    {"max_frames": 0}, {"max_bytes": 0}, {"hold": -1.0},
])
def test_params_reject_out_of_range(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EmuParams(**kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the runner, on fake sockets


def fake_port() -> tuple[socket.socket, socket.socket]:
    """(the runner's end, the wire's end): a datagram socketpair stands in for AF_PACKET."""
    ours, wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    wire.settimeout(5)
    return ours, wire


def test_runner_delays_both_directions_and_counts(tmp_path: Path) -> None:
    dev, dev_wire = fake_port()
    tap, tap_wire = fake_port()
    runner = Runner(dev, tap, EmuParams(delay=0.030, duplicate_pct=100.0), seed=1)
    stats = tmp_path / "stats.json"
    thread = threading.Thread(target=runner.loop, args=(str(stats), time.monotonic() + 0.5))
    thread.start()
    sent = time.monotonic()
    for k in range(3):
        dev_wire.send(b"arriving %d" % k)  # from the peer: comes out on TAP
        tap_wire.send(b"leaving %d" % k)  # from the node: goes out on DEV
    got_in = [tap_wire.recv(100) for _ in range(6)]
    got_out = [dev_wire.recv(100) for _ in range(6)]
    elapsed = time.monotonic() - sent
    thread.join()
    assert elapsed >= 0.030
    assert got_in == [b"arriving %d" % (k // 2) for k in range(6)]  # each one twice
    assert got_out == [b"leaving %d" % (k // 2) for k in range(6)]
    counters = json.loads(stats.read_text())
    assert counters["in"]["received"] == 3 and counters["in"]["duplicated"] == 3
    assert counters["out"]["released"] == 6 and counters["tx_refused"] == {"in": 0, "out": 0}
    for s in (dev, dev_wire, tap, tap_wire):
        s.close()


def test_runner_counts_writes_the_kernel_refuses() -> None:
    """A full transmit queue (EAGAIN, like a qdisc's ENOBUFS) drops and counts, never stalls."""
    dev, dev_wire = fake_port()
    tap, tap_wire = fake_port()  # nobody reads tap_wire while the runner runs
    tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the minimum: a few frames
    runner = Runner(dev, tap, EmuParams(), seed=1)
    thread = threading.Thread(target=runner.loop, args=(None, time.monotonic() + 0.5))
    thread.start()
    for k in range(100):
        dev_wire.send(b"frame %d" % k)
    thread.join()
    assert runner.sched_in.received == 100
    assert runner.tx_refused["in"] > 0
    delivered = 0
    tap_wire.setblocking(False)
    while True:
        try:
            tap_wire.recv(100)
        except BlockingIOError:
            break
        delivered += 1
    assert delivered + runner.tx_refused["in"] == 100
    for s in (dev, dev_wire, tap, tap_wire):
        s.close()

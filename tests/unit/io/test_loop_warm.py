"""Keep-warm (bridge/io/warm.py): the shadow runs the hot path without touching the real Bridge,
and the Runner ticks only in the second after traffic."""

from __future__ import annotations

import logging
import time

import pytest
from scapy.layers.inet import ICMP, IP
from test_loop_fake import _pair, running, wait_for  # same directory (pytest rootdir import)

import bridge.io.runner as runner
from bridge.io.fake import MemoryNet, MemoryTun
from bridge.io.loop import Engine
from bridge.io.warm import Warmer
from bridge.pipeline import Bridge, Output

PING = bytes(IP(src="198.18.1.10", dst="198.18.2.10", ttl=64) / ICMP() / b"ping")


def _snapshot(b: Bridge) -> tuple[object, ...]:
    c = b.counters
    return (list(c.drops), list(c.events), list(c.tx_packets), list(c.rx_packets),
            [p.last_tx for p in b.peers], [getattr(p.encoder, "seq", None) for p in b.peers])


def test_shadow_runs_the_path_and_leaves_the_real_bridge_alone() -> None:
    ea, eb, _net, clock = _pair("gre")
    out = Output()
    ea.bridge.from_tun([PING], clock(), out)
    dgram = next(iter(out.udp.values()))[0]
    w = Warmer(eb.bridge)
    w.note_udp([(bytes(dgram), ("198.18.0.1", 4754))])
    wa = Warmer(ea.bridge)
    wa.note_tun([PING])
    before_a, before_b = _snapshot(ea.bridge), _snapshot(eb.bridge)
    for _ in range(5):
        wa.tun()
        w.udp()
    assert _snapshot(ea.bridge) == before_a and _snapshot(eb.bridge) == before_b
    assert wa.ticks == 5 and w.ticks == 5
    # the shadows really went the whole way: encapsulated, and decapsulated to the TUN
    assert wa._t.counters.tx_packets[0] == 5  # noqa: SLF001
    assert w._u.counters.rx_packets[0] == 5  # noqa: SLF001


def test_only_lone_small_packets_are_kept_as_samples() -> None:
    ea, _eb, _net, _clock = _pair("gre")
    w = Warmer(ea.bridge)
    w.note_tun([PING, PING])
    assert w.pkt is None  # a batch: the throughput path, not a latency sample
    w.note_tun([bytes(1400)])
    assert w.pkt is None
    w.note_tun([PING])
    assert w.pkt == PING
    w.tun()
    w.udp()  # no datagram seen yet: nothing to run, and no tick counted
    assert w.ticks == 1


def test_a_shadow_that_raises_turns_keep_warm_off(caplog: pytest.LogCaptureFixture) -> None:
    ea, _eb, _net, _clock = _pair("gre")
    w = Warmer(ea.bridge)
    w.pkt = 12345  # our own bug, simulated
    with caplog.at_level(logging.ERROR, logger="grebe.warm"):
        w.tun()
        w.tun()
    assert not w.enabled and w.ticks == 1
    assert "keep-warm is off" in caplog.text


def test_runner_ticks_after_traffic_and_stops_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "WARM_FOR", 0.3)
    monkeypatch.setattr(runner, "WARM_TICK_MS", 1.0)
    ea, eb, _net, _ = _pair("gre", time.monotonic, keep_warm=True)
    with running(ea, eb):
        wa = ea.warmer
        assert wa is not None
        time.sleep(0.05)  # an idle tunnel: nothing to keep warm
        assert wa.ticks == 0
        ea.tun.inject(PING)  # type: ignore[attr-defined]
        wait_for(lambda: eb.tun.take() != [], 5, "the ping at B")  # type: ignore[attr-defined]
        wait_for(lambda: wa.ticks >= 10, 5, "keep-warm ticks after traffic")
        # WARM_FOR after the last packet the ticks stop (keepalives do not count as traffic)
        def quiet() -> bool:
            n = wa.ticks
            time.sleep(0.1)
            return wa.ticks == n
        wait_for(quiet, 5, "ticks to stop once idle")
        assert ea.status()["io"]["keep_warm_ticks"] == wa.ticks


def test_keep_warm_off_by_default_in_the_engine_api() -> None:
    tun = MemoryTun("x")
    net = MemoryNet()
    ea, _eb, _n, clock = _pair("gre")
    e = Engine(ea.bridge, tun, net.endpoint("198.18.0.9"), clock)
    assert e.warmer is None and e.status()["io"]["keep_warm_ticks"] == 0
    warm = Engine(ea.bridge, tun, net.endpoint("198.18.0.10"), clock, keep_warm=True)
    assert warm.warmer is not None and warm.twin().warmer is not None


def test_the_tun_tick_also_warms_the_terminator() -> None:
    """With userspace [[inspect]] rules, the TUN thread's tick moves the Terminator's own
    throw-away connection one hop (Terminator.warm, lane 0) with the engine's clock."""
    from bridge.config import loads_config

    cfg = loads_config("""
[tun]
name = "grebe-w"
mtu = 1400
[listen]
address = "198.18.0.1"
[[peers]]
name = "b"
endpoint = "198.18.0.2:4754"
prefixes = ["198.18.2.0/24"]
[[inspect]]
name = "web"
dst = ["198.18.2.10/32"]
dst_ports = [80]
inspectors = ["log"]
log_path = "/dev/null"
""")
    real = Bridge(cfg, 5.0)
    assert real.terminator is not None
    calls: list[tuple[float, int]] = []
    real.terminator.warm = lambda now, lane=0: calls.append((now, lane))  # type: ignore[method-assign]
    w = Warmer(real, clock=lambda: 7.5)
    w.tun()  # no sample packet yet: the Terminator still gets its hop
    w.pkt = PING
    w.tun()
    assert calls == [(7.5, 0), (7.5, 0)]
    assert w._t.terminator is None  # noqa: SLF001  # the shadow Bridge terminates nothing


_HEAP_PROBE = """
import ctypes, sys
from bridge.io.warm import keep_heap
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MI
kept = keep_heap()
bufs = [bytearray(64000) for _ in range(40)]  # 40 batch buffers, then all freed
del bufs
top = libc.mallinfo2().keepcost
print(kept, top)
"""


@pytest.mark.parametrize("on", [True, False])
def test_keep_heap_keeps_freed_batch_buffers_mapped(on: bool) -> None:
    """With keep_heap, 2.5 MB of freed 64 KB buffers stay at the heap's top (no page faults
    when the next batches take them again); glibc's default gives all but ~0.4 MB back."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, GREBE_KEEP_HEAP="1" if on else "0")
    got = subprocess.run([sys.executable, "-c", _HEAP_PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert got[0] == str(on)
    kept = int(got[1])
    assert (kept > 2_000_000) if on else (kept < 1_000_000)

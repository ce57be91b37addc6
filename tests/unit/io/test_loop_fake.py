"""Two Bridges through the real loop (Engine) over the in-memory fakes (wireguard-go genTestPair).

Site A (198.18.1.0/24, 2001:db8:1::/48) at 198.18.0.1, site B (198.18.2.0/24,
2001:db8:2::/48) at 198.18.0.2; GRE-in-UDP with key and sequence numbers, or IPIP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from bridge.config import loads_config
from bridge.io.adapters import UdpCaps
from bridge.io.fake import MemoryNet, MemoryTun, MemoryUdp, drive
from bridge.io.loop import Engine
from bridge.pipeline import Bridge


def _cfg(me: str, peer: str, name: str, prefixes: list[str], encap: str) -> str:
    extra = 'key = 42\nsequence = "drop-late"\n' if encap == "gre" else ""
    return f"""
[tun]
name = "grebe-{name}"
mtu = 1400
[listen]
address = "{me}"
[[peers]]
name = "to-{name}"
endpoint = "{peer}:4754"
prefixes = {prefixes!r}
encapsulation = "{encap}"
keepalive = 1
{extra}"""


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` (backing off to 50 ms) until true; AssertionError naming `what`."""
    import time

    deadline = time.monotonic() + timeout
    delay = 0.002
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _pair(encap: str, clock: Callable[[], float] | None = None,
          **kw: Any) -> tuple[Engine, Engine, MemoryNet, Clock]:
    """Two Engines over the fakes; `clock` (default: a Clock a test moves) and Engine
    keywords (keep_warm, ...) for both."""
    fake = Clock()
    net = MemoryNet()
    ca = loads_config(_cfg("198.18.0.1", "198.18.0.2", "a",
                           ["198.18.2.0/24", "2001:db8:2::/48"], encap))
    cb = loads_config(_cfg("198.18.0.2", "198.18.0.1", "b",
                           ["198.18.1.0/24", "2001:db8:1::/48"], encap))
    c = clock or fake
    ea = Engine(Bridge(ca, c()), MemoryTun("a"), net.endpoint("198.18.0.1"), c, **kw)
    eb = Engine(Bridge(cb, c()), MemoryTun("b"), net.endpoint("198.18.0.2"), c, **kw)
    return ea, eb, net, fake


def _packets(ttl: int) -> list[bytes]:
    return [bytes(p) for p in (
        IP(src="198.18.1.10", dst="198.18.2.10", ttl=ttl) / ICMP() / b"ping",
        IP(src="198.18.1.10", dst="198.18.2.10", ttl=ttl) / UDP(sport=1, dport=2) / (b"u" * 1000),
        IPv6(src="2001:db8:1::10", dst="2001:db8:2::10", hlim=ttl) / TCP(sport=5, dport=80,
                                                                         flags="A") / b"t",
    )]


def _ip(src: str, dst: str, ttl: int, seq: int) -> bytes:
    return bytes(IP(src=src, dst=dst, ttl=ttl) / TCP(sport=40000, dport=80, seq=seq, flags="A")
                 / bytes(1300))


@pytest.mark.parametrize("encap", ["gre", "ipip"])
def test_packets_cross_both_ways(encap: str) -> None:
    ea, eb, net, _ = _pair(encap)
    ta, tb = ea.tun, eb.tun
    ta.inject(*_packets(64))  # type: ignore[attr-defined]
    drive([ea, eb])
    assert tb.take() == _packets(63)  # type: ignore[attr-defined]  # routed: TTL - 1
    # the underlay saw one datagram per inner packet, to B's endpoint
    assert [(s, d) for s, d, _ in net.log] == [(("198.18.0.1", 4754), ("198.18.0.2", 4754))] * 3
    back = IP(src="198.18.2.10", dst="198.18.1.10", ttl=9) / ICMP(type=0) / b"pong"
    tb.inject(bytes(back))  # type: ignore[attr-defined]
    drive([ea, eb])
    back.ttl = 8
    assert ta.take() == [bytes(back)]  # type: ignore[attr-defined]
    st = eb.status()
    assert st["peers"][0]["rx_packets"] == 3 and st["peers"][0]["tx_packets"] == 1
    assert st["io"]["udp_datagrams"] == 3


def test_bulk_tcp_and_hostile_datagrams() -> None:
    ea, eb, net, _ = _pair("gre")
    segs = [_ip("198.18.1.10", "198.18.2.10", 64, 1 + i * 1300) for i in range(500)]
    ea.tun.inject(*segs)  # type: ignore[attr-defined]
    drive([ea, eb], rounds=1000)
    want = [_ip("198.18.1.10", "198.18.2.10", 63, 1 + i * 1300) for i in range(500)]
    assert eb.tun.take() == want  # type: ignore[attr-defined]
    attacker = ("198.18.0.66", 4754)
    eb.udp.inject(b"\x00", attacker)  # type: ignore[attr-defined]
    eb.udp.inject(b"\x00", ("198.18.0.1", 4754))  # truncated GRE from the peer's address
    drive([ea, eb])
    assert eb.tun.take() == []  # type: ignore[attr-defined]
    drops = eb.status()["drops"]
    assert drops["unknown_peer"] == 1
    assert drops["malformed"] == 1


def test_timer_sends_keepalives() -> None:
    ea, eb, net, clock = _pair("gre")
    assert ea.pump_timer() is not None
    before = len(net.log)
    clock.t += 1.5
    ea.pump_timer()
    eb.pump_udp()
    assert len(net.log) == before + 1
    assert eb.status()["events"]["keepalive_rx"] == 1


def test_peer_state_changes_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    ea, eb, net, clock = _pair("gre")
    caplog.set_level("INFO", logger="grebe.loop")

    def lines(word: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if word in r.getMessage()]

    eb.pump_timer()
    assert lines("peer") == []  # no change yet: nothing logged
    clock.t += 10  # keepalive 1 s -> down after 3 s without a word from A
    eb.pump_timer()
    eb.pump_timer()
    assert lines("is down") == ["peer to-b (198.18.0.1:4754) is down"]
    ea.tun.inject(_packets(64)[0])  # type: ignore[attr-defined]
    drive([ea, eb])
    eb.pump_timer()
    eb.pump_timer()
    assert lines("is up") == ["peer to-b (198.18.0.1:4754) is up"]
    assert len(lines("peer")) == 2


def test_a_core_exception_still_counts_every_datagram(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Should a bug ever raise out of the core, the batch it was working on is not lost
    silently: each of its datagrams (a GRO batch: each datagram in it) and TUN packets is
    counted under the drop reason internal_error, in status and metrics; the exception is
    logged once per type and counted in io.internal_errors."""
    from bridge.gro import GroBatch

    ea, eb, net, _ = _pair("gre")
    ea.tun.inject(*_packets(64))  # type: ignore[attr-defined]
    ea.pump_tun()  # three datagrams wait at B
    eb.udp.inject(GroBatch(bytearray(2500), 1000), ("198.18.0.1", 4754))  # type: ignore
    caplog.set_level("ERROR", logger="grebe.loop")

    def boom(*_a: object) -> None:
        raise RuntimeError("a core bug")

    monkeypatch.setattr(eb.bridge, "from_udp", boom)
    monkeypatch.setattr(eb.bridge, "from_tun", boom)
    eb.pump_udp()  # 3 + 3
    eb.udp.inject(b"\x00", ("198.18.0.1", 4754))  # type: ignore[attr-defined]
    eb.pump_udp()  # 1
    eb.tun.inject(*_packets(64)[:2])  # type: ignore[attr-defined]
    eb.pump_tun()  # 2
    st = eb.status()
    assert st["drops"]["internal_error"] == 9 and st["io"]["internal_errors"] == 3
    assert 'grebe_drops_total{reason="internal_error"} 9' in eb.metrics_text()
    assert len([r for r in caplog.records if "internal error" in r.getMessage()]) == 1


@contextlib.contextmanager
def running(*engines: Engine, **kw: Any) -> Iterator[list[Any]]:
    """The real threaded Runner (Runner(engine, **kw)) on each engine for the `with` body;
    stopped and joined after it, and no thread may outlive it."""
    import threading

    from bridge.io.runner import Runner

    runners = [Runner(e, **kw) for e in engines]
    threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
    for t in threads:
        t.start()
    try:
        yield runners
    finally:
        for r in runners:
            r.stop()
        for t in threads:
            t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_threaded_runner_over_the_fakes() -> None:
    """The real Runner (one thread per direction + timer thread) between two fake sites."""
    import time

    ea, eb, net, _ = _pair("gre", time.monotonic)  # real time: keepalives on the timer thread
    with running(ea, eb):
        segs = [_ip("198.18.1.10", "198.18.2.10", 64, 1 + i * 1300) for i in range(300)]
        ea.tun.inject(*segs)  # type: ignore[attr-defined]
        want = [_ip("198.18.1.10", "198.18.2.10", 63, 1 + i * 1300) for i in range(300)]
        got: list[bytes] = []

        def arrived() -> bool:
            got.extend(eb.tun.take())  # type: ignore[attr-defined]
            return len(got) >= len(want)

        wait_for(arrived, 20, "300 segments through two threaded Runners")
        assert got == want
        # the timer thread sends keepalives (interval 1 s) without any traffic
        before = eb.status()["events"]["keepalive_rx"]
        wait_for(lambda: eb.status()["events"]["keepalive_rx"] > before, 10, "a keepalive")


def test_both_directions_at_once_through_threaded_runners() -> None:
    """Traffic both ways at once, through the two data threads of each Runner, arrives
    intact and in order, and the per-peer counters are exact."""
    import time

    ea, eb, _net, _ = _pair("gre", time.monotonic)
    n = 400
    fwd = [_ip("198.18.1.10", "198.18.2.10", 64, 1 + i * 1300) for i in range(n)]
    rev = [_ip("198.18.2.10", "198.18.1.10", 64, 1 + i * 1300) for i in range(n)]
    with running(ea, eb):
        for i in range(0, n, 50):  # interleaved bursts: both directions busy at once
            ea.tun.inject(*fwd[i:i + 50])  # type: ignore[attr-defined]
            eb.tun.inject(*rev[i:i + 50])  # type: ignore[attr-defined]
        got_b: list[bytes] = []
        got_a: list[bytes] = []

        def arrived() -> bool:
            got_b.extend(eb.tun.take())  # type: ignore[attr-defined]
            got_a.extend(ea.tun.take())  # type: ignore[attr-defined]
            return len(got_a) >= n and len(got_b) >= n

        wait_for(arrived, 30, "400 segments each way")
        assert got_b == [_ip("198.18.1.10", "198.18.2.10", 63, 1 + i * 1300) for i in range(n)]
        assert got_a == [_ip("198.18.2.10", "198.18.1.10", 63, 1 + i * 1300) for i in range(n)]
        sa, sb = ea.status(), eb.status()
    pa, pb = sa["peers"][0], sb["peers"][0]
    ka, kb = sa["events"]["keepalive_tx"], sb["events"]["keepalive_tx"]  # counted as tx too
    assert pa["tx_packets"] == n + ka and pb["rx_packets"] == n
    assert pb["tx_packets"] == n + kb and pa["rx_packets"] == n


def test_a_shrunken_path_mtu_reaches_the_core_and_the_tun() -> None:
    """Engine.learn_path_mtu: the peer that met EMSGSIZE gets the kernel's path MTU minus the
    encapsulation overhead (Bridge.set_path_mtu), and the TUN follows; below 576 is ignored."""
    ea, _eb, _net, _clock = _pair("gre")
    tun, udp = ea.tun, ea.udp
    assert isinstance(tun, MemoryTun) and isinstance(udp, MemoryUdp)
    peer = ("198.18.0.2", 4754)
    udp.too_big.add(peer)
    udp.path_mtus[peer] = 1400
    ea.learn_path_mtu()
    overhead = 20 + 8 + 12  # IPv4 + UDP + GRE with key and sequence number
    assert ea.bridge.peers[0].mtu == 1400 - overhead and tun.mtus == [1400 - overhead]
    assert ea.stats["pmtu_updates"] == 1 and not udp.too_big
    udp.too_big.add(peer)
    udp.path_mtus[peer] = 500
    ea.learn_path_mtu()  # an unusable underlay: logged, the MTU stays
    assert ea.bridge.peers[0].mtu == 1400 - overhead and tun.mtus == [1400 - overhead]


def test_the_path_mtu_grows_back_on_the_timer() -> None:
    """RFC 1191 §6.3: the kernel forgets a learned path MTU after a while; the timer thread
    reads it again every PMTU_RECHECK seconds and the tunnel MTU (and the TUN) follow up."""
    from bridge.io.loop import PMTU_RECHECK

    ea, _eb, _net, clock = _pair("gre")
    tun, udp = ea.tun, ea.udp
    assert isinstance(tun, MemoryTun) and isinstance(udp, MemoryUdp)
    peer = ("198.18.0.2", 4754)
    udp.path_mtus[peer] = 1300
    udp.too_big.add(peer)
    ea.learn_path_mtu()
    udp.path_mtus[peer] = 1500  # the learned value expired in the kernel
    assert ea.pump_timer() is not None  # the recheck is a deadline of its own
    assert ea.bridge.peers[0].mtu == 1300 - 40  # not yet: PMTU_RECHECK has not passed
    clock.t += PMTU_RECHECK
    ea.pump_timer()
    assert ea.bridge.peers[0].mtu == 1400 and tun.mtus == [1260, 1400]  # up to tun.mtu 1400
    assert ea.stats["pmtu_updates"] == 2


class _PortsUdp(MemoryUdp):
    """A UDP fake that records the source ports the engine passes with each send."""

    def __init__(self, net: MemoryNet, addr: tuple[str, int], caps: UdpCaps) -> None:
        super().__init__(net, addr)
        self.caps = caps
        self.ports: list[Any] = []

    def send_datagrams(self, addr: Any, datagrams: Any, sports: Any = None) -> int:
        self.ports.append(sports)
        return super().send_datagrams(addr, datagrams, sports)


@pytest.mark.parametrize("declared", [True, False])
def test_source_ports_are_passed_only_to_an_adapter_that_declares_them(declared: bool) -> None:
    """RFC 8086 §3.2.1 flow-hash ports (the peer's default): the engine reads
    `UdpCaps.source_ports` once; an adapter without it gets no ports."""
    ea, _eb, net, clock = _pair("gre")
    udp = _PortsUdp(net, ("198.18.0.7", 4754), UdpCaps(source_ports=declared))
    e = Engine(ea.bridge, MemoryTun("p"), udp, clock)
    e.tun.inject(*_packets(64))  # type: ignore[attr-defined]
    e.pump_tun()
    assert udp.ports and all((p is not None) == declared for p in udp.ports)


def test_declared_capabilities_that_do_not_fit_are_refused() -> None:
    """GRO batches are answered with TunFrames: a UDP adapter that hands them over needs a
    TUN with the vnet header. One process per direction never runs a terminating Bridge."""
    ea, _eb, net, clock = _pair("gre")
    gro = _PortsUdp(net, ("198.18.0.8", 4754), UdpCaps(gro_batches=True))
    with pytest.raises(ValueError, match="vnet header"):
        Engine(ea.bridge, MemoryTun("g"), gro, clock)
    assert not MemoryTun.caps.vnet_hdr and not MemoryUdp.caps.gro_batches
    assert MemoryUdp.caps.path_mtu and not MemoryUdp.caps.source_ports

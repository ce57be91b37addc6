"""Link impairment, measured in a real lab: every setting must show up in the traffic.

Measurements use UDP sockets that this test process opens inside the lab's namespaces, so
both ends share one clock: one-way delays are measured directly (send time to the kernel's
receive timestamp, so that a busy test process does not add its own latency), and every
datagram carries a sequence number, so loss, duplicates and reordering are counted per
direction. Throughput is
measured with iperf3. Every impairment applies to each direction of a link.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bridge.lab import impair, procs
from bridge.lab.netlink import Lab

LabFactory = Callable[..., Lab]  # tests/lab/conftest.py's lab_factory

pytestmark = pytest.mark.netns  # conftest.py skips these without root and /dev/net/tun

GW_A, GW_B = "198.18.0.1", "198.18.0.2"  # two-sites-plain: wan-a and wan-b meet in `wan`
SEQ = struct.Struct("!I")
SO_TIMESTAMPNS = 35  # == SCM_TIMESTAMPNS: the kernel's receive time, as a struct timespec
TIMESPEC = struct.Struct("qq")


@pytest.fixture(scope="module")
def lab(two_sites_plain: Lab) -> Lab:
    """client - gw-a - wan (bridge) - gw-b - server, shared by this module's tests."""
    return two_sites_plain


@pytest.fixture
def wan_a(lab: Lab) -> Iterator[str]:
    """The link gw-a <-> wan (bridge); left clear after each test."""
    yield "wan-a"
    impair.clear(lab, "wan-a")


def udp(lab: Lab, node: str, addr: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.bind((addr, 0))
        s.setblocking(False)
        return s

    return procs.in_netns(lab.ns_path(node), make)


@dataclass
class Trace:
    sent: dict[int, float] = field(default_factory=dict)
    arrived: list[tuple[int, float]] = field(default_factory=list)  # at B, arrival order
    echoed: list[tuple[int, float]] = field(default_factory=list)  # back at A

    @property
    def seqs(self) -> list[int]:
        return [s for s, _ in self.arrived]

    def one_way_ms(self) -> list[float]:
        first: dict[int, float] = {}
        for s, t in self.arrived:
            first.setdefault(s, t)
        return [(t - self.sent[s]) * 1000 for s, t in first.items()]

    def rtt_ms(self) -> list[float]:
        first: dict[int, float] = {}
        for s, t in self.echoed:
            first.setdefault(s, t)
        return [(t - self.sent[s]) * 1000 for s, t in first.items()]

    def delivered(self) -> float:
        return len(set(self.seqs)) / len(self.sent)

    def duplicates(self) -> int:
        return len(self.arrived) - len(set(self.seqs))

    def out_of_order(self) -> int:
        top, late = -1, 0
        for s in self.seqs:
            late += s < top
            top = max(top, s)
        return late


def exchange(lab: Lab, a: tuple[str, str], b: tuple[str, str], count: int, interval: float,
             echo: bool = False, settle: float = 0.4, size: int = 100) -> Trace:
    """Send `count` numbered datagrams from node a to node b every `interval` seconds.

    With `echo`, b sends each one back. Waits `settle` seconds after the last send.
    """
    sa, sb = udp(lab, *a), udp(lab, *b)
    dst = sb.getsockname()
    trace = Trace()
    sel = selectors.DefaultSelector()
    sel.register(sa, selectors.EVENT_READ, "a")
    sel.register(sb, selectors.EVENT_READ, "b")
    pad = bytes(size - SEQ.size)
    seq, next_send, end = 0, time.time(), None
    try:
        while True:
            now = time.time()
            while seq < count and now >= next_send:
                trace.sent[seq] = time.time()
                sa.sendto(SEQ.pack(seq) + pad, dst)
                seq += 1
                next_send += interval
            if seq == count and end is None:
                end = now + settle
            if end is not None and now >= end:
                return trace
            wake = next_send if seq < count else end
            assert wake is not None
            for key, _ in sel.select(max(0.0, wake - now)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                while True:
                    try:
                        data, anc, _, src = sock.recvmsg(2048, 64)
                    except BlockingIOError:
                        break
                    t = time.time()
                    for level, kind, value in anc:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                            sec, nsec = TIMESPEC.unpack_from(value)
                            t = sec + nsec / 1e9
                    (n,) = SEQ.unpack_from(data)
                    if key.data == "b":
                        trace.arrived.append((n, t))
                        if echo:
                            sb.sendto(data, src)
                    else:
                        trace.echoed.append((n, t))
    finally:
        sel.close()
        sa.close()
        sb.close()


def ab(lab: Lab, count: int, interval: float, **kw: object) -> Trace:
    return exchange(lab, ("gw-a", GW_A), ("gw-b", GW_B), count, interval, **kw)  # type: ignore[arg-type]


def ba(lab: Lab, count: int, interval: float, **kw: object) -> Trace:
    return exchange(lab, ("gw-b", GW_B), ("gw-a", GW_A), count, interval, **kw)  # type: ignore[arg-type]


def warm(lab: Lab) -> None:
    """Resolve neighbours before impairing, so that ARP does not skew the first counts."""
    t = ab(lab, 5, 0.01, echo=True, settle=0.2)
    assert len(t.echoed) == 5


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------- the measurements


def test_delay_raises_rtt_by_twice_the_one_way_delay(lab: Lab, wan_a: str) -> None:
    warm(lab)
    base = ab(lab, 50, 0.01, echo=True)
    impair.apply(lab, wan_a, impair.parse_impairment({"delay": "20ms"}, "t"))
    slow = ab(lab, 100, 0.01, echo=True)
    base_rtt, rtt, one_way = base.rtt_ms(), slow.rtt_ms(), slow.one_way_ms()
    print(f"rtt median {statistics.median(base_rtt):.2f} -> {statistics.median(rtt):.2f} ms, "
          f"one way {statistics.median(one_way):.2f} ms")
    assert len(rtt) == 100 and slow.duplicates() == 0
    assert statistics.median(base_rtt) < 5
    assert 20 <= min(one_way) and statistics.median(one_way) < 24
    assert 40 <= min(rtt) and statistics.median(rtt) < 46
    v6 = exchange(lab, ("gw-a", "2001:db8::1"), ("gw-b", "2001:db8::2"), 30, 0.01, echo=True)
    assert len(v6.echoed) == 30 and min(v6.rtt_ms()) >= 40  # neighbour discovery passes too


def test_jitter_widens_the_rtt_spread(lab: Lab, wan_a: str) -> None:
    warm(lab)
    impair.apply(lab, wan_a, impair.parse_impairment({"delay": "20ms"}, "t"))
    steady = ab(lab, 100, 0.02).one_way_ms()
    impair.apply(lab, wan_a, impair.parse_impairment({"delay": "20ms", "jitter": "8ms"}, "t"))
    jittery = ab(lab, 100, 0.02).one_way_ms()
    spread = [pct(v, 0.9) - pct(v, 0.1) for v in (steady, jittery)]
    print(f"one-way p10..p90 spread: {spread[0]:.2f} ms -> {spread[1]:.2f} ms, "
          f"jittered min {min(jittery):.2f} median {statistics.median(jittery):.2f} "
          f"max {max(jittery):.2f} ms")
    assert spread[1] > spread[0] + 6  # uniform ±8 ms: p10..p90 is 12.8 ms
    assert min(jittery) >= 12  # never earlier than delay - jitter
    assert 17 <= statistics.median(jittery) <= 23.5


def test_loss_applies_to_each_direction(lab: Lab, wan_a: str) -> None:
    warm(lab)
    impair.apply(lab, wan_a, impair.parse_impairment({"loss": "20%"}, "t"))
    fwd, back = ab(lab, 1000, 0.0005, settle=0.2), ba(lab, 1000, 0.0005, settle=0.2)
    rt = ab(lab, 400, 0.001, echo=True, settle=0.2)
    rt_ok = len({s for s, _ in rt.echoed}) / 400
    print(f"delivered a->b {fwd.delivered():.3f}, b->a {back.delivered():.3f}, "
          f"round trip {rt_ok:.3f} (expect 0.8, 0.8, 0.64)")
    assert 0.75 <= fwd.delivered() <= 0.85  # binomial sd 1.3%
    assert 0.75 <= back.delivered() <= 0.85
    assert 0.56 <= rt_ok <= 0.72  # 0.8 * 0.8, sd 2.4%


def test_reordering_is_seen_by_the_receiver(lab: Lab, wan_a: str) -> None:
    warm(lab)
    impair.apply(lab, wan_a, impair.parse_impairment(
        {"delay": "5ms", "reorder": "10%", "seed": 3}, "t"))
    for t in (ab(lab, 2000, 0.0005), ba(lab, 2000, 0.0005)):
        late = t.out_of_order() / len(t.sent)
        print(f"out of order {late:.3f}, delivered {t.delivered():.3f}, dups {t.duplicates()}")
        assert t.delivered() == 1.0 and t.duplicates() == 0
        assert 0.07 <= late <= 0.13  # binomial sd 0.7%


def test_duplicates_are_seen_by_the_receiver(lab: Lab, wan_a: str) -> None:
    warm(lab)
    impair.apply(lab, wan_a, impair.parse_impairment({"duplicate": "5%", "seed": 9}, "t"))
    for t in (ab(lab, 2000, 0.0005), ba(lab, 2000, 0.0005)):
        dup = t.duplicates() / len(t.sent)
        print(f"duplicated {dup:.3f}, delivered {t.delivered():.3f}")
        assert t.delivered() == 1.0 and t.out_of_order() == 0
        assert 0.035 <= dup <= 0.065  # binomial sd 0.5%
    _, stats = impair.current(lab, wan_a)
    lab.wait_for(lambda: impair.current(lab, wan_a)[1].get("in", {}).get("duplicated"),
                 timeout=3, what="emulator counters")


def iperf(lab: Lab, reverse: bool = False) -> float:
    """TCP goodput gw-a -> gw-b (or back) in Mbit/s, 2 s of iperf3."""
    port = str(5300 + os.getpid() % 500)
    server = lab.popen("gw-b", ["iperf3", "-s", "-1", "-B", GW_B, "-p", port],
                       log=str(Path(lab.state_dir, "iperf3.log")))
    try:
        lab.wait_for(lambda: port in lab.run("gw-b", ["ss", "-Hltn"]).stdout, timeout=5,
                     what="iperf3 server")
        cp = lab.run("gw-a", ["iperf3", "-c", GW_B, "-p", port, "-t", "2", "-J",
                              *(["-R"] if reverse else [])], timeout=20)
    finally:
        server.kill()
        server.wait()
    return float(json.loads(cp.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6


def test_rate_caps_tcp_throughput_both_ways(lab: Lab, wan_a: str) -> None:
    base = iperf(lab)
    impair.apply(lab, wan_a, impair.parse_impairment({"rate": "40mbit"}, "t"))
    up, down = iperf(lab), iperf(lab, reverse=True)
    print(f"iperf3: {base:.0f} Mbit/s unimpaired, {up:.1f} / {down:.1f} Mbit/s at 40mbit")
    assert base > 200
    assert 32 <= up <= 42 and 32 <= down <= 42


def test_clear_restores_the_link_and_leaves_nothing_behind(lab: Lab, wan_a: str) -> None:
    warm(lab)
    impair.apply(lab, wan_a, impair.parse_impairment(
        {"rate": "100mbit", "loss": "1%", "delay": "10ms", "duplicate": "1%"}, "t"))
    _, stats = impair.current(lab, wan_a)
    state = json.loads(next(Path(lab.state_dir, "impair").glob("*.json")).read_text())
    pid = state["emulator"]["pid"]
    assert procs.start_time(pid) is not None
    impair.clear(lab, wan_a)
    impair.clear(lab, wan_a)  # idempotent
    t = ab(lab, 50, 0.005, echo=True)
    assert max(t.rtt_ms()) < 5 and len(t.echoed) == 50
    assert procs.start_time(pid) is None or procs.is_zombie(pid)
    for node, ifname in (("gw-a", "wan0"), ("wan", "gw-a")):
        qdiscs = lab.run(node, ["tc", "qdisc", "show", "dev", ifname]).stdout
        assert "tbf" not in qdiscs and "clsact" not in qdiscs
        assert "gb_" not in lab.run(node, ["nft", "list", "tables"]).stdout
    assert "gbi" not in lab.run("wan", ["ip", "-br", "link"]).stdout
    assert not list(Path(lab.state_dir, "impair").glob("*.json"))
    assert impair.current(lab, wan_a)[0].is_off


def test_cli_sets_shows_and_removes(lab: Lab, wan_a: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert impair.cli(lab, [wan_a, "delay=10ms", "loss=1%", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "delay 10 ms" in out and "loss 1%" in out and " in wan; gw-a->wan: " in out
    assert impair.current(lab, wan_a)[0] == impair.Impairment(
        delay_ms=10, loss_pct=1, seed=7)
    assert impair.cli(lab, [wan_a]) == 0
    assert "delay 10 ms" in capsys.readouterr().out
    assert impair.cli(lab, [wan_a, "delay=fast"]) == 2
    assert "impair wan-a.delay" in capsys.readouterr().err
    assert impair.current(lab, wan_a)[0].delay_ms == 10  # a bad command changes nothing
    assert impair.cli(lab, ["no-such-link", "delay=1ms"]) == 2
    state = json.loads(next(Path(lab.state_dir, "impair").glob("*.json")).read_text())
    procs.kill_pids({state["emulator"]["pid"]: state["emulator"]["start_time"]})
    assert impair.cli(lab, [wan_a]) == 0
    assert "NOT RUNNING" in capsys.readouterr().out  # a dead emulator is not hidden
    assert impair.cli(lab, [wan_a, "off"]) == 0
    assert f"{wan_a} (gw-a:wan0 <-> wan:gw-a): off" in capsys.readouterr().out


def test_topology_impairment_on_a_host_to_host_link(tmp_path: Path,
                                                    lab_factory: LabFactory) -> None:
    """`impair = {...}` in a topology is applied at `up`; the emulator sits in a host."""
    topo = tmp_path / "pair.toml"
    topo.write_text("""
name = "imp-pair"
[nodes.left]
addresses = { eth0 = ["198.18.9.1/24"] }
[nodes.right]
addresses = { eth0 = ["198.18.9.2/24"] }
[[links]]
name = "wire"
endpoints = ["left:eth0", "right:eth0"]
impair = { delay = "15ms", seed = 1 }
""")
    pair = lab_factory(topo, start=False)
    t = exchange(pair, ("left", "198.18.9.1"), ("right", "198.18.9.2"), 60, 0.01, echo=True)
    rtt = t.rtt_ms()
    print(f"host-to-host rtt median {statistics.median(rtt):.2f} ms")
    assert len(rtt) == 60 and 30 <= min(rtt) and statistics.median(rtt) < 36
    assert "delay 15 ms" in impair._show(pair, "wire")


def test_two_emulated_links_in_one_bridge_add_up(lab: Lab, wan_a: str) -> None:
    warm(lab)
    impair.apply(lab, wan_a, impair.parse_impairment({"delay": "10ms"}, "t"))
    impair.apply(lab, "wan-b", impair.parse_impairment({"delay": "5ms", "seed": 2}, "t"))
    try:
        rtt = ab(lab, 60, 0.01, echo=True).rtt_ms()
    finally:
        impair.clear(lab, "wan-b")
    print(f"rtt over two delayed links: median {statistics.median(rtt):.2f} ms (expect 30)")
    assert len(rtt) == 60 and 30 <= min(rtt) and statistics.median(rtt) < 36


def test_tcp_through_the_emulator_and_a_rate_limit(lab: Lab, wan_a: str) -> None:
    """Bulk TCP through linkemu (both ways), alone and in front of tbf; prints the rates."""
    impair.apply(lab, wan_a, impair.parse_impairment({"delay": "1ms"}, "t"))
    free = iperf(lab), iperf(lab, reverse=True)
    impair.apply(lab, wan_a, impair.parse_impairment({"delay": "5ms", "rate": "40mbit"}, "t"))
    capped = iperf(lab), iperf(lab, reverse=True)
    _, stats = impair.current(lab, wan_a)
    print(f"iperf3 through linkemu, delay 1ms: {free[0]:.0f} / {free[1]:.0f} Mbit/s; "
          f"delay 5ms + 40mbit: {capped[0]:.1f} / {capped[1]:.1f} Mbit/s; counters {stats}")
    assert min(free) > 40  # the emulator is not the bottleneck of a 40 Mbit/s link
    assert all(30 <= c <= 42 for c in capped)


def test_cli_in_other_processes_attaches_to_the_running_lab(lab: Lab, wan_a: str) -> None:
    """`netns-lab.sh impair` runs in a process of its own: set there, measured here, then off."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        code = ("import sys; from bridge.lab import impair; from bridge.lab.netlink import Lab; "
                f"sys.exit(impair.cli(Lab.attach({lab.instance!r}), sys.argv[1:]))")
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, timeout=30, check=True)

    warm(lab)
    assert "delay 15 ms" in cli(wan_a, "delay=15ms").stdout
    rtt = ab(lab, 40, 0.01, echo=True).rtt_ms()
    assert len(rtt) == 40 and min(rtt) >= 30
    state = json.loads(next(Path(lab.state_dir, "impair").glob("*.json")).read_text())
    pid = state["emulator"]["pid"]
    assert "off" in cli(wan_a, "off").stdout
    assert procs.start_time(pid) is None or procs.is_zombie(pid)
    assert max(ab(lab, 40, 0.005, echo=True).rtt_ms()) < 5


def test_udp_gso_super_datagrams_cross_the_emulator_intact(lab: Lab, wan_a: str) -> None:
    """grebe sends with UDP_SEGMENT: GSO skbs (PACKET_VNET_HDR) cross linkemu and arrive whole."""
    udp_segment = 103  # linux/udp.h
    warm(lab)
    impair.apply(lab, wan_a, impair.parse_impairment({"delay": "2ms"}, "t"))
    sa, sb = udp(lab, "gw-a", GW_A), udp(lab, "gw-b", GW_B)
    try:
        sa.setsockopt(socket.SOL_UDP, udp_segment, 1000)
        for i in range(3):
            sa.sendto(bytes([i]) * 10000, sb.getsockname())  # 10 segments each
        got: list[bytes] = []
        lab.wait_for(lambda: _drain(sb, got) >= 30, timeout=5, what="30 segments")
    finally:
        sa.close()
        sb.close()
    assert sorted(got) == sorted(bytes([i]) * 1000 for i in range(3) for _ in range(10))
    frames = lab.wait_for(
        lambda: impair.current(lab, wan_a)[1].get("in", {}).get("released", 0),
        timeout=3, what="emulator counters")
    print(f"30 segments crossed linkemu as {frames} frames (GSO skbs count as one)")


def _drain(sock: socket.socket, into: list[bytes]) -> int:
    while True:
        try:
            into.append(sock.recv(65535))
        except BlockingIOError:
            return len(into)

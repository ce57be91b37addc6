"""Time to first byte of a new inspected connection, per core call (prints, never asserts).

    .venv/bin/python tests/unit/splice/bench_first_byte.py [N] [--cold] [--profile[=STEPS]] [--v6]
        [--plain-tun] [--plain-flow]

One complete new connection, N times: client SYN .. first response byte .. close, through a
Bridge built from topologies/two-sites-inspect/gw-a.toml (the `log` + `http` rule, userspace
backend) and a plain Bridge from topologies/two-sites/gw-b.toml, every hop real bytes (inner
IP packets, GRE-in-UDP datagrams). The client (curl's part) and the server are our own
TcpConnections; the server answers as the bench's nginx does (`keepalive_timeout 0`,
`tcp_nopush on`: headers and the 1 KB file in one segment that carries the FIN too). Only
gw-a's core calls are timed (time.perf_counter_ns around each `from_tun` / `from_udp` /
`handle_timer` that moves the connection); gw-b and the ends run
outside the clock. Virtual time advances 50 µs per hop, as on the lab's veths. gw-a's TUN
takes vnet writes as in the lab (`Terminator.use_tun_offload`; --plain-tun: without).
--plain-flow: server port 8081, which no rule selects: the same steps as plain tunnel
crossings (the ack step is then the client's ACK forwarded), the floor to compare with.

The steps on the first-byte path, in order (what curl's time_starttransfer spans):
  syn      client SYN from the TUN: flow verdict, Splice, the client leg's SYN-ACK to the TUN
           (accept first, bridge/userspace/splice.py)
  ack      client's ACK of its SYN-ACK from the TUN: client leg up, server leg's SYN out
  get      client's request from the TUN: queued in the server leg (still connecting)
  synack   server SYN-ACK from the tunnel: server leg up, its ACK and the request out
  resp     server's response from the tunnel: to the client leg, out to the TUN
and after it: drain (the observer tap, TAP_DELAY later), close (FINs and their ACKs both
ways, the delayed ACKs), reap (TIME-WAIT over: the splice is forgotten).

Printed: p10, median and p90 µs per step (p10 is the steadiest on a shared machine), and
the first-byte sum (syn+synack+ack+get+resp).
--cold runs a cache-evicting workload between hops (the lab's gateway sleeps between the
packets of one connection, so the code is cold there); --profile prints cProfile's top
functions of the timed calls, or of some steps' (--profile=syn,get; BENCH_SORT=cumulative
sorts by cumulative time; without --profile only the perf counter runs).
"""

from __future__ import annotations

import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bridge.config import load_config  # noqa: E402
from bridge.io.offload import split_frame  # noqa: E402
from bridge.pipeline import Bridge, Output  # noqa: E402
from bridge.tunframe import TunFrame  # noqa: E402
from stack.connection import TcpConnection  # noqa: E402
from stack.events import DataReceived  # noqa: E402
from stack.state import State  # noqa: E402
from stack.tcp_config import TcpConfig  # noqa: E402
from stack.wire.tcp import parse_tcp  # noqa: E402

CLIENT4 = bytes((198, 18, 1, 10))
SERVER4 = bytes((198, 18, 2, 10))
CLIENT6 = bytes.fromhex("20010db8000100000000000000000010")
SERVER6 = bytes.fromhex("20010db8000200000000000000000010")
A_ADDR = ("198.18.0.1", 4754)
B_ADDR = ("198.18.0.2", 4754)
HOP = 50e-6
REQUEST = (b"GET /small.txt HTTP/1.1\r\nHost: 198.18.2.10\r\nUser-Agent: curl/7.88.1\r\n"
           b"Accept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 16:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Wed, 25 Nov 2026 15:00:00 GMT\r\nConnection: close\r\n"
            b'ETag: "6565d9a0-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024)
FIRST_BYTE = ("syn", "synack", "ack", "get", "resp")
STEPS = FIRST_BYTE + ("drain", "close", "reap")


def tcp_of(pkt: Any) -> Any:
    pkt = bytes(pkt)
    off = 40 if pkt[0] >> 4 == 6 else (pkt[0] & 15) * 4
    src, dst = (pkt[8:24], pkt[24:40]) if off == 40 else (pkt[12:16], pkt[16:20])
    return parse_tcp(memoryview(pkt)[off:], src, dst)


class _Cold:
    """Evicts the CPU caches between hops: a walk over 16 MB and some unrelated Python."""

    def __init__(self) -> None:
        self.buf = bytearray(16 << 20)
        self.junk = [dict(a=i, b=str(i)) for i in range(20000)]

    def __call__(self) -> None:
        b = self.buf
        for i in range(0, len(b), 64):
            b[i] = (b[i] + 1) & 0xFF
        sum(len(d["b"]) for d in self.junk)


class World:
    def __init__(self, v6: bool, cold: bool, profile: cProfile.Profile | None,
                 offload: bool = True) -> None:
        self.logdir = tempfile.mkdtemp(prefix="gb-bench-")
        os.environ["GREBE_LAB_DIR"] = self.logdir
        self.a = Bridge(load_config(str(ROOT / "topologies/two-sites-inspect/gw-a.toml")), 0.0)
        self.b = Bridge(load_config(str(ROOT / "topologies/two-sites/gw-b.toml")), 0.0)
        assert self.a.terminator is not None
        if offload:  # as in the lab: a vnet TUN, client-leg segments as TunFrames
            self.a.terminator.use_tun_offload()
        self.c, self.s = (CLIENT6, SERVER6) if v6 else (CLIENT4, SERVER4)
        self.now = 0.0
        self.oa, self.ob = Output(), Output()
        self.times: dict[str, list[float]] = {k: [] for k in STEPS}
        self.cold = _Cold() if cold else None
        self.profile = profile
        self.profile_step: str | None = None
        self.port = 30000
        self.server_port = 80  # 8081: no rule matches, the plain tunnel (--plain-flow)
        self.packet = self.a.terminator.packet

    # ------------------------------------------------------------------ gw-a (timed)

    def _timed(self, step: str, fn: Any, *args: Any) -> None:
        if self.cold is not None:
            self.cold()
        ps = self.profile_step
        prof = self.profile if ps is None or step in ps.split(",") else None
        t0 = time.perf_counter_ns()
        if prof is not None:
            prof.enable()
        fn(*args)
        if prof is not None:
            prof.disable()
        self.acc[step] = self.acc.get(step, 0) + time.perf_counter_ns() - t0

    def a_from_tun(self, step: str, pkts: list[bytes]) -> None:
        self.oa.clear()
        self._timed(step, self.a.from_tun, pkts, self.now, self.oa)
        self._a_out()

    def a_from_udp(self, step: str, dgrams: list[Any]) -> None:
        self.oa.clear()
        self._timed(step, self.a.from_udp, [(d, B_ADDR) for d in dgrams], self.now, self.oa)
        self._a_out()

    def a_timer(self, step: str) -> None:
        t = self.a.get_timer()
        if t is not None and t <= self.now:
            self.oa.clear()
            self._timed(step, self.a.handle_timer, self.now, self.oa)
            self._a_out()

    def _a_out(self) -> None:
        self.to_client = [p if type(p) is TunFrame else bytes(p) for p in self.oa.tun]
        self.to_b = [bytes(d) for dgs in self.oa.udp.values() for d in dgs]

    # ------------------------------------------------------------------ the rest (untimed)

    def tick(self) -> None:
        self.now += HOP

    def deliver_client(self) -> None:
        for p in self.to_client:
            if type(p) is TunFrame:  # what the kernel makes of a vnet write
                segs: list[bytes] = []
                assert split_frame(p, segs)
                for q in segs:
                    self.client.receive_segment(tcp_of(q), self.now)
                continue
            self.client.receive_segment(tcp_of(p), self.now)
        self.to_client = []

    def via_b_to_server(self) -> None:
        """gw-a's datagrams cross gw-b to the server."""
        if not self.to_b:
            return
        ob = self.ob
        ob.clear()
        self.b.from_udp([(d, A_ADDR) for d in self.to_b], self.now, ob)
        self.to_b = []
        for p in ob.tun:
            self.server.receive_segment(tcp_of(p), self.now)

    def server_to_a(self) -> list[bytes]:
        """The server's segments, encapsulated by gw-b: datagrams toward gw-a."""
        segs = self.server.segments_to_send(self.now)
        if not segs:
            return []
        ob = self.ob
        ob.clear()
        self.b.from_tun([self.packet(self.s, self.c, s) for s in segs], self.now, ob)
        return [bytes(d) for dgs in ob.udp.values() for d in dgs]

    def client_pkts(self) -> list[bytes]:
        return [self.packet(self.c, self.s, s) for s in self.client.segments_to_send(self.now)]

    def timers(self) -> None:
        for conn in (self.client, self.server):
            t = conn.get_timer()
            if t is not None and t <= self.now:
                conn.handle_timer(self.now)
        t = self.b.get_timer()
        if t is not None and t <= self.now:
            self.ob.clear()
            self.b.handle_timer(self.now, self.ob)

    # ------------------------------------------------------------------ one connection

    def connection(self) -> int:
        """SYN .. first response byte .. close; returns the response bytes the client got."""
        self.acc: dict[str, int] = {}
        self.port = self.port + 1 if self.port < 60000 else 30000
        sport = self.server_port
        self.client = TcpConnection((self.c, self.port), (self.s, sport), TcpConfig(msl=1.0))
        self.server = TcpConnection((self.s, sport), (self.c, self.port), TcpConfig(msl=1.0))
        self.server.listen()
        self.client.connect(self.now)
        self.a_from_tun("syn", self.client_pkts())   # accept first: the client leg answers
        self.tick()
        self.via_b_to_server()          # nothing goes upstream for a SYN alone
        self.deliver_client()           # the SYN-ACK
        assert self.client.state is State.ESTABLISHED, self.client.state
        self.a_from_tun("ack", self.client_pkts())   # the server leg's SYN goes out
        self.tick()
        self.via_b_to_server()
        self.client.send(REQUEST)
        self.a_from_tun("get", self.client_pkts())   # queued in the server leg
        self.tick()
        self.a_from_udp("synack", self.server_to_a())   # the server leg's ACK and the request
        self.tick()
        self.via_b_to_server()
        self.server.next_event()  # Connected
        got = b""
        while (ev := self.server.next_event()) is not None:
            if isinstance(ev, DataReceived):
                got += ev.data
        assert got == REQUEST, got
        self.server.send(RESPONSE)
        self.server.close()             # keepalive_timeout 0: the FIN rides on the response
        self.tick()
        self.a_from_udp("resp", self.server_to_a())
        self.tick()
        self.deliver_client()
        rx = 0
        while (ev := self.client.next_event()) is not None:
            if isinstance(ev, DataReceived):
                rx += len(ev.data)
        self.client.close()
        # the rest: the client's FIN and ACKs, the drain, the delayed ACKs, TIME-WAIT
        end = self.now + 0.05
        while self.now < end:
            pkts = self.client_pkts()
            if pkts:
                self.a_from_tun("close", pkts)
            self.tick()
            self.via_b_to_server()
            self.timers()
            dg = self.server_to_a()
            if dg:
                self.a_from_udp("close", dg)
            self.deliver_client()
            self.a_timer("drain" if "drain" not in self.acc else "close")
            self.deliver_client()
            self.via_b_to_server()
            self.now += 0.001
        for k, v in self.acc.items():
            self.times[k].append(v / 1000)
        self.acc = {}
        return rx

    def reap(self) -> None:
        """Jump past TIME-WAIT (the Terminator's msl) and let gw-a forget the splices."""
        self.now += 31.0
        self.acc = {}
        self.a_timer("reap")
        self.a_timer("reap")
        for k, v in self.acc.items():
            self.times[k].append(v / 1000)
        self.a.terminator.flush_inspectors()  # the log lines to the temp file (I/O, untimed)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 300
    popt = [a for a in sys.argv if a.startswith("--profile")]
    prof = cProfile.Profile() if popt else None
    w = World("--v6" in sys.argv, "--cold" in sys.argv, prof, "--plain-tun" not in sys.argv)
    if "--plain-flow" in sys.argv:
        w.server_port = 8081
    for _ in range(20):  # warm-up, not counted
        w.connection()
    w.reap()
    w.times = {k: [] for k in STEPS}
    if prof is not None:
        prof = cProfile.Profile()
        w.profile = prof
        w.profile_step = popt[0].partition("=")[2] or None
    gc.collect()
    for i in range(n):
        assert w.connection() == len(RESPONSE)
        if i % 50 == 49:
            w.reap()
    term = w.a.terminator
    assert term is not None
    print(f"{n} connections, {'cold' if w.cold else 'warm'} caches, "
          f"{'IPv6' if '--v6' in sys.argv else 'IPv4'}; gw-a core calls, µs:")
    print(f"{'step':>8} {'p10':>8} {'median':>8} {'p90':>8} {'calls':>6}")
    fb = []
    for k in STEPS:
        xs = w.times[k]
        if not xs:
            continue
        xs2 = sorted(xs)
        print(f"{k:>8} {xs2[len(xs2) // 10]:8.1f} {statistics.median(xs):8.1f} "
              f"{xs2[int(len(xs2) * 0.9)]:8.1f} {len(xs):6d}")
    for i in range(n):
        fb.append(sum(w.times[k][i] for k in FIRST_BYTE))
    fb.sort()
    print(f"first byte (syn+synack+ack+get+resp): p10 {fb[len(fb) // 10]:.1f} µs, median "
          f"{statistics.median(fb):.1f} µs, p90 {fb[int(len(fb) * 0.9)]:.1f} µs")
    print(f"splices opened {term.counters['splices']}, ended {term.ended}, drops {term.drops}")
    if prof is not None:
        s = io.StringIO()
        order = os.environ.get("BENCH_SORT", "tottime")
        pstats.Stats(prof, stream=s).sort_stats(order).print_stats(40)
        print(s.getvalue())


if __name__ == "__main__":
    main()

"""Micro-benchmark of the userspace termination backend (not a test: prints, never asserts).

    .venv/bin/python tests/unit/splice/bench_splice.py [MB]

A server TcpConnection sends MB megabytes through a Terminator (one Splice) to a client
TcpConnection, in memory, as real IP packets in batches (what the Bridge hands over per
`from_udp` / `from_tun` call). Only the time inside the Terminator is counted. Printed: µs per
server segment, the MB/s that CPU time allows (plain TUN, and a vnet TUN: TunFrames toward
the client, the server's batch merged into runs), and the ratio to the floor of the same segment's
wire work (one parse with checksum verification plus one emit with checksum, the least a
terminating middlebox must do per segment), with no inspector and with the `http` inspector.
"""

from __future__ import annotations

import os
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bridge.flows import InspectRule  # noqa: E402
from bridge.inspect.http import HttpInspector  # noqa: E402
from bridge.inspect.manager import InspectorChain, InspectorManager  # noqa: E402
from bridge.io.offload import split_frame  # noqa: E402
from bridge.tunframe import TunFrame  # noqa: E402
from bridge.userspace.terminator import Terminator  # noqa: E402
from stack.connection import TcpConnection  # noqa: E402
from stack.events import DataReceived  # noqa: E402
from stack.tcp_config import TcpConfig  # noqa: E402
from stack.wire.tcp import ACK, TcpSegment, emit_tcp_parts, parse_tcp  # noqa: E402

C = (bytes([198, 18, 1, 10]), 40000)
S = (bytes([198, 18, 2, 10]), 80)


class _Out:
    def __init__(self) -> None:
        self.tun: list[bytes] = []
        self.peer: list[bytes] = []


def _tcp(pkt: bytes) -> Any:
    ihl = (pkt[0] & 15) * 4
    return parse_tcp(memoryview(pkt)[ihl:], bytes(pkt[12:16]), bytes(pkt[16:20]))


def run(total: int, inspectors: list[Any], offload: bool = False) -> tuple[int, float]:
    """Returns (server segments, seconds spent inside the Terminator). `offload`: the TUN
    takes vnet writes (Terminator.use_tun_offload: NEEDS_CSUM + GSO TunFrames toward the
    client, split here as the kernel would, outside the timed part)."""
    rule = InspectRule(name="bench", inspectors=("x",))
    mgr = InspectorManager(())
    mgr.chains["bench"] = InspectorChain(rule, inspectors)

    def to_peer(pkt: bytes, now: float, out: Any) -> bool:
        out.peer.append(pkt)
        return True

    term = Terminator((rule,), to_peer, lambda d: 1440, lambda: 1440, manager=mgr)
    if offload:
        term.use_tun_offload()
    client = TcpConnection(C, S, TcpConfig(mss=1400))
    server = TcpConnection(S, C, TcpConfig(mss=1400))
    server.listen()
    client.connect(0.0)
    data = os.urandom(total)
    sent = got = segments = 0
    now = inside = 0.0
    while got < total:
        now += 0.0002
        for conn in (client, server):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
        if sent < total and server.state.name == "ESTABLISHED":
            sent += server.send(memoryview(data)[sent:sent + 262144])
        up = [term.packet(C[0], S[0], s) for s in client.segments_to_send(now)]
        down = [term.packet(S[0], C[0], s) for s in server.segments_to_send(now)]
        segments += len(down)
        t0 = time.perf_counter()
        out = _Out()
        for p in up:
            term.from_tun(p, len(p), now)
        term.flush(now, out)
        term.from_peer(down, now, out)
        t = term.get_timer()
        if t is not None and t <= now:
            term.handle_timer(now, out)
        inside += time.perf_counter() - t0
        for p in out.tun:
            if type(p) is TunFrame:
                segs: list[bytes] = []
                split_frame(p, segs)
                for q in segs:
                    client.receive_segment(_tcp(q), now)
                continue
            client.receive_segment(_tcp(p), now)
        for p in out.peer:
            server.receive_segment(_tcp(p), now)
        while (ev := client.next_event()) is not None:
            if isinstance(ev, DataReceived):
                got += len(ev.data)
        while server.next_event() is not None:
            pass
    return segments, inside


def floor_us() -> float:
    seg = TcpSegment(80, 40000, 1, 2, ACK, 500, os.urandom(1388), ts=(1, 2))
    head, payload = emit_tcp_parts(seg, S[0], C[0])
    raw = memoryview(head + bytes(payload))
    n = 5000

    def both() -> None:
        parse_tcp(raw, S[0], C[0])
        emit_tcp_parts(seg, S[0], C[0])

    return timeit.timeit(both, number=n) / n * 1e6


def main() -> None:
    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    total = int(mb * 1e6)
    base = floor_us()
    print(f"floor (parse+verify + emit of one 1388-byte segment): {base:.1f} µs")
    rule = InspectRule(name="bench", inspectors=("http",))
    for name, ins, off in (("no inspector", [], False),
                           ("http inspector", [HttpInspector(rule)], False),
                           ("no insp, vnet", [], True),
                           ("http, vnet", [HttpInspector(rule)], True)):
        segs, inside = run(total, ins, off)
        us = inside / segs * 1e6
        print(f"{name:>15}: {us:5.1f} µs per server segment = {total / inside / 1e6:5.1f} MB/s of "
              f"Terminator CPU; ratio to the floor {us / base:.2f}")


if __name__ == "__main__":
    main()

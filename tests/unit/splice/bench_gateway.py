"""Micro-benchmark of an inspecting gateway's whole data path (not a test: prints, never asserts).

    .venv/bin/python tests/unit/splice/bench_gateway.py [MB] [--lossy | --lossy-each]
                                       [--profile [--cumtime]] [--no-psh] [--ack-late]
                                       [--no-parts]

What the lab's `inspect-userspace` download costs gateway A, in memory and on one core: a
server TcpConnection sends MB megabytes through Bridge B (its encapsulation, as the far
gateway does), the datagrams reach Bridge A glued as UDP GRO glues them and the UDP adapter
joins them (`GroBatch`, up to bridge/io/udp.py JOIN_MAX bytes), A terminates the flow
(userspace backend, `log` + `http` inspectors as the bench rule, TUN offload on: TunFrames
toward the client) and the client TcpConnection takes each TunFrame whole, as Linux's TCP
takes a GSO packet from a TUN, and ACKs it through A's `from_tun`. Only the time inside
Bridge A is counted (`from_udp`, `from_tun`, its timers), as this thread's CPU time
(time.thread_time: other processes' load moves it less than wall time). Printed, the best
of 3 runs: µs of A per 64 KB and the MB/s that CPU time allows; with --profile, one run
under cProfile (A's calls only). Compare runs made one after the other. --lossy: 2 % of
B's sends toward A lost and 3 % one place late (the lossy bench row's WAN, without its
delay; bridge/lab/impair.py takes the kernel's skb as its unit, so a GSO send of up to 64
datagrams goes or stays whole); --lossy-each: the same per datagram, many more short runs,
so the per-packet paths (sequence policy, leg runs of single datagrams) are timed.

Two habits of the lab's Linux ends are modelled, since the lab's profile is shaped by them:
the server marks the last segment of each TSO frame (PSH_EVERY segments) PSH, and the
client ACKs each TunFrame at once (more than one full segment: an immediate ACK), each ACK
a TUN read and a `from_tun` call of its own. --no-psh and --ack-late give the older model
(no PSH; the client's ACKs gathered once per round), whose runs were three times longer
and whose ACKs were a fifth as many as the lab's.

A's client leg writes `TunFrameParts` (headers and payload apart, one writev in the TUN
adapter, as `grebe up` on a vnet TUN does); --no-parts: joined TunFrames, the older way.
"""

from __future__ import annotations

import cProfile
import ipaddress
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bridge.config import loads_config  # noqa: E402
from bridge.gro import GroBatch  # noqa: E402
from bridge.gso import UdpRun  # noqa: E402
from bridge.io.udp import JOIN_MAX  # noqa: E402
from bridge.pipeline import Bridge, Output  # noqa: E402
from bridge.tunframe import TunFrame, TunFrameParts, joined  # noqa: E402
from stack.connection import TcpConnection  # noqa: E402
from stack.events import DataReceived  # noqa: E402
from stack.state import State  # noqa: E402
from stack.tcp_config import TcpConfig  # noqa: E402
from stack.wire.tcp import PSH, parse_tcp  # noqa: E402
from stack.wire.vnet import VNET_HDR_LEN  # noqa: E402

CLIENT = ipaddress.ip_address("198.18.10.5").packed
SERVER = ipaddress.ip_address("198.18.20.7").packed
LOSS, REORDER = 0.02, 0.03  # --lossy, toward A only (the lab's wan-a impairment, in part)
PSH_EVERY = 45  # segments of a Linux server's TSO frame (64 KB), the last one PSH
A_ADDR = ("198.18.0.1", 4754)
B_ADDR = ("198.18.0.2", 4754)

SITE = """
[tun]
name = "gb{side}"
addresses = ["{tun4}"]
[listen]
address = "{listen}"
port = 4754
[pmtu]
underlay_mtu = 1500
[[peers]]
name = "other"
endpoint = "{endpoint}:4754"
prefixes = [{prefixes}]
"""

RULE = """
[[inspect]]
name = "bench-http"
backend = "userspace"
dst_ports = [80]
inspectors = ["log", "http"]
log_path = "{log}"
"""


def _tcp(pkt: bytes | bytearray | memoryview, verify: bool = True) -> Any:
    off = (pkt[0] & 15) * 4
    return parse_tcp(memoryview(pkt)[off:], bytes(pkt[12:16]), bytes(pkt[16:20]),
                     verify_checksum=verify)


def _datagrams(out: Output) -> list[bytes | bytearray]:
    got: list[bytes | bytearray] = []
    for items in out.udp.values():
        for d in items:
            got.extend(d.datagrams() if isinstance(d, UdpRun) else [d])
    return got


def _gro(dgrams: list[bytes | bytearray]) -> list[GroBatch | bytes | bytearray]:
    """Glue runs of equal-size datagrams (the last may be shorter) as UDP GRO does and the
    UDP adapter joins consecutive GRO buffers (bridge/io/udp.py, up to JOIN_MAX bytes)."""
    batches: list[GroBatch | bytes | bytearray] = []
    most = max(JOIN_MAX, 65536)
    i = 0
    while i < len(dgrams):
        seg = len(dgrams[i])
        j = i + 1
        while j < len(dgrams) and (j - i + 1) * seg <= most and len(dgrams[j]) == seg:
            j += 1
        if j < len(dgrams) and (j - i + 1) * seg <= most and len(dgrams[j]) < seg:
            j += 1
        if j - i == 1:
            batches.append(dgrams[i])
        else:
            batches.append(GroBatch(bytearray(b"".join(dgrams[i:j])), seg))
        i = j
    return batches


def _sends(out: Output) -> list[list[bytes | bytearray]]:
    """The datagrams of `out` in groups as the lab's gateway B sends them: one GSO send
    (one skb) per TSO frame of the server, PSH_EVERY datagrams (this bench's server hands
    B single segments, so B's own output has no such groups)."""
    d = _datagrams(out)
    return [d[i:i + PSH_EVERY] for i in range(0, len(d), PSH_EVERY)]


def _impair(dgrams: list[Any], rng: random.Random) -> list[Any]:
    """--lossy: drop LOSS of the items toward A (sends, or datagrams with --lossy-each),
    and move REORDER of them one place later."""
    out: list[Any] = []
    late: Any = None
    for d in dgrams:
        if rng.random() < LOSS:
            continue
        if late is None and rng.random() < REORDER:
            late = d
            continue
        out.append(d)
        if late is not None:
            out.append(late)
            late = None
    if late is not None:
        out.append(late)
    return out


def run(total: int, log: str, prof: cProfile.Profile | None = None,
        lossy: str = "", psh: bool = True, ack_each: bool = True, parts: bool = True
        ) -> tuple[int, float]:
    """Returns (bytes the client got, seconds inside Bridge A)."""
    rng = random.Random(11)
    a = Bridge(loads_config(SITE.format(side="a", tun4="198.18.100.1/30", listen=A_ADDR[0],
                                        endpoint=B_ADDR[0], prefixes='"198.18.20.0/24"')
                            + RULE.format(log=log)), 0.0)
    b = Bridge(loads_config(SITE.format(side="b", tun4="198.18.100.2/30", listen=B_ADDR[0],
                                        endpoint=A_ADDR[0], prefixes='"198.18.10.0/24"')), 0.0)
    assert a.terminator is not None
    a.terminator.use_tun_offload(parts=parts)
    term = a.terminator
    client = TcpConnection((CLIENT, 40001), (SERVER, 80), TcpConfig(mss=1460, msl=1.0,
                                                                   recv_buffer=6 << 20))
    server = TcpConnection((SERVER, 80), (CLIENT, 40001), TcpConfig(mss=1400, msl=1.0,
                                                                   send_buffer=4 << 20))
    server.listen()
    client.connect(0.0)
    data = os.urandom(1 << 20)
    sent = got = 0
    now = inside = 0.0
    request = False
    nseg = 0  # the server's data segments so far
    acks: list[list[bytes]] = []  # the client's ACKs of each TunFrame, for A's next from_tun
    while got < total and now < 120.0:
        now += 0.0001
        for conn in (client, server):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
        if server.state is State.ESTABLISHED and not request:
            client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            request = True
        if request and sent < total:
            sent += server.send(memoryview(data)[:min(len(data), total - sent)])
        oa, ob = Output(), Output()
        acks.append([term.packet(CLIENT, SERVER, s) for s in client.segments_to_send(now)])
        ups, acks = [u for u in acks if u], []
        segs = server.segments_to_send(now)
        if psh:  # Linux's server marks the last segment of each TSO frame (~64 KB) PSH
            for i, s in enumerate(segs):
                if s.payload:
                    nseg += 1
                    if nseg % PSH_EVERY == 0:
                        segs[i] = s._replace(flags=s.flags | PSH)
        b.from_tun([term.packet(SERVER, CLIENT, s) for s in segs], now, ob)
        if lossy == "each":
            dgrams = _impair(_datagrams(ob), rng)
        elif lossy:  # the lab's impairment takes a GSO send (one skb) as its unit
            dgrams = [d for send in _impair(_sends(ob), rng) for d in send]
        else:
            dgrams = _datagrams(ob)
        to_a = [(g, B_ADDR) for g in _gro(dgrams)]
        if prof is not None:
            prof.enable()
        t0 = time.thread_time()
        for up in ups:  # each of the client's ACK bursts is a TUN read of its own
            a.from_tun(up, now, oa)
        if to_a:
            a.from_udp(to_a, now, oa)
        t = a.get_timer()
        if t is not None and t <= now:
            a.handle_timer(now, oa)
        inside += time.thread_time() - t0
        if prof is not None:
            prof.disable()
        ib = Output()
        b.from_udp([(d, A_ADDR) for d in _datagrams(oa)], now, ib)
        for p in ib.tun:
            server.receive_segment(_tcp(p), now)
        for p in oa.tun:
            if type(p) is TunFrame or type(p) is TunFrameParts:  # the client's kernel takes
                f = joined(p)  # a GSO packet whole (a writev of the parts: one frame)
                client.receive_segment(_tcp(memoryview(f)[VNET_HDR_LEN:], False), now)
                if ack_each:  # and ACKs it at once (Linux: more than one full segment)
                    acks.append([term.packet(CLIENT, SERVER, s)
                                 for s in client.segments_to_send(now)])
            else:
                client.receive_segment(_tcp(p), now)
        while (ev := client.next_event()) is not None:
            if isinstance(ev, DataReceived):
                got += len(ev.data)
        while server.next_event() is not None:
            pass
    return got, inside


def main() -> None:
    args = [x for x in sys.argv[1:] if not x.startswith("--")]
    mb = float(args[0]) if args else 50.0
    prof = cProfile.Profile() if "--profile" in sys.argv else None
    rounds = 1 if prof is not None else 3
    best = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):  # the best of a few: the machine's load only adds time
            got, t = run(int(mb * 1e6), os.path.join(tmp, "flows.jsonl"), prof,
                         "each" if "--lossy-each" in sys.argv
                         else "sends" if "--lossy" in sys.argv else "",
                         "--no-psh" not in sys.argv,
                         "--ack-late" not in sys.argv, "--no-parts" not in sys.argv)
            best = min(best, t)
    inside = best
    print(f"gateway A: {got / 1e6:.1f} MB in {inside:.3f} s = {inside / got * 65536 * 1e6:.0f} µs "
          f"per 64 KB = {got / inside / 1e6:.1f} MB/s of gateway CPU")
    if prof is not None:
        key = "cumtime" if "--cumtime" in sys.argv else "tottime"
        pstats.Stats(prof).sort_stats(key).print_stats(45)


if __name__ == "__main__":
    main()

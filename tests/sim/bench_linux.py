"""Throughput of the stack terminating a real Linux TCP flow through a plain TUN (root).

Run: sudo .venv/bin/python tests/sim/bench_linux.py [--mb 50] [--profile lossy]

Linux (in a private gb-h6-* namespace) sends N MB to our sink over a TUN without offloads
(one packet per read/write), then our stack sends N MB to a Linux sink. Prints MB/s for
each direction (wall, and per CPU-second of this process, which the load of a shared
machine disturbs less), next to the goal of 66-73 MB/s (mitmproxy's smoltcp WireGuard mode, one
terminated flow; ANCHORS.md). The bridge's TUN with TSO/GRO would hand over 64 KB
super-segments instead; see bench_stack.py for that path.

The Linux sender's congestion control is named, never inherited: a new namespace takes the
host's default, and on a host whose default is BBR (this lab machine's is) the comparison
was BBR's model-based sending, which does not treat random loss as congestion, against our
loss-based CUBIC (measured with `ss -tin` in the peer namespace under the lossy profile:
BBR cwnd 190-395 segments, 24 MB/s; CUBIC on the same pump cwnd 3-10 segments, 1.6 MB/s).
So the lossy profile runs the Linux sender twice, CUBIC (like for like: our default, RFC
9438) and the host's default, and prints the ratio against each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tcp_demux

from linux_peer import KERNEL, KERNEL_ADDR, STACK, STACK_ADDR, LinuxPeer  # noqa: E402
from tcp_demux import TcpDemux  # noqa: E402

from stack.events import Closed, ConnectionReset, DataReceived, PeerFinished  # noqa: E402
from stack.tcp_config import TcpConfig  # noqa: E402

CFG = TcpConfig(recv_buffer=4 << 20, send_buffer=4 << 20, rto_min=0.2)

LINUX_SENDER = r"""
import socket, sys, time
n = int(sys.argv[1]); block = bytes(1 << 20)
s = socket.socket(); s.settimeout(60)
if sys.argv[3]:  # TCP_CONGESTION per socket: the namespace's default is the host's
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[3].encode())
s.connect((sys.argv[2], 8080))
print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).strip(b"\0").decode())
t0 = time.monotonic()
for _ in range(n):
    s.sendall(block)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(time.monotonic() - t0)
"""

LINUX_SINK = r"""
import socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], 9000)); ls.listen(1); print("LISTENING", flush=True)
c, _ = ls.accept(); total = 0
while chunk := c.recv(1 << 20):
    total += len(chunk)
print(total, flush=True); c.close()
"""


# The lossy-WAN profile of issue 11 (bridge/lab/impair.py keys, each way).
LOSSY_WAN = {"loss": 0.02, "reorder": 0.03, "delay": 0.002}


def host_default_cc() -> str:
    """The kernel's default congestion control (a new namespace starts with the host's)."""
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def linux_to_stack(mb: int, cc: str = "", **wan: float) -> tuple[float, float]:
    """Linux sends `mb` MiB to our stack with congestion control `cc` ("": the default)."""
    demux = TcpDemux(CFG)
    demux.listen(8080)
    peer = LinuxPeer(demux, **wan)
    got = [0]
    conns = []
    try:
        proc = peer.popen([sys.executable, "-c", LINUX_SENDER, str(mb), STACK_ADDR, cc])

        def step(now: float) -> None:
            while (c := demux.accept()) is not None:
                conns.append(c)
            for c in conns:
                while (ev := c.next_event()) is not None:
                    if isinstance(ev, DataReceived):
                        got[0] += len(ev.data)
                    elif isinstance(ev, PeerFinished):
                        c.close()

        t0, c0 = time.monotonic(), time.process_time()
        peer.pump(step, lambda: proc.poll() is not None, timeout=300)
        dt, cpu = time.monotonic() - t0, time.process_time() - c0
        assert got[0] == mb << 20, got[0]
        assert proc.stdout is not None
        name = proc.stdout.readline().strip().decode()
        assert not cc or name == cc, (name, cc)
        return (mb << 20) / dt / 1e6, (mb << 20) / cpu / 1e6
    finally:
        peer.close()


def stack_to_linux(mb: int, **wan: float) -> tuple[float, float]:
    demux = TcpDemux(CFG)
    peer = LinuxPeer(demux, **wan)
    try:
        sink = peer.popen([sys.executable, "-u", "-c", LINUX_SINK, KERNEL_ADDR])
        assert sink.stdout is not None and sink.stdout.readline().strip() == b"LISTENING"
        conn = demux.connect((STACK, 40000), (KERNEL, 9000), time.monotonic())
        block = bytes(1 << 20)
        state = {"sent": 0, "off": 0, "done": False}

        def step(now: float) -> None:
            if str(conn.state) == "ESTABLISHED" and state["sent"] < mb:
                while state["sent"] < mb:
                    n = conn.send(memoryview(block)[state["off"]:])
                    if not n:
                        break
                    state["off"] += n
                    if state["off"] == len(block):
                        state["sent"] += 1
                        state["off"] = 0
                if state["sent"] == mb:
                    conn.close()
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, (PeerFinished, Closed, ConnectionReset)):
                    state["done"] = True

        t0, c0 = time.monotonic(), time.process_time()
        peer.pump(step, lambda: bool(state["done"]), timeout=300)
        dt, cpu = time.monotonic() - t0, time.process_time() - c0
        return (mb << 20) / dt / 1e6, (mb << 20) / cpu / 1e6
    finally:
        peer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--profile", choices=("clean", "lossy"), default="clean",
                    help="lossy: loss=2%% reorder=3%% delay=2ms each way (issue 11)")
    args = ap.parse_args()
    mb = args.mb
    wan = LOSSY_WAN if args.profile == "lossy" else {}
    default = host_default_cc()
    a = linux_to_stack(mb, "cubic", **wan)
    b = stack_to_linux(mb, **wan)
    d = linux_to_stack(mb, default, **wan) if default != "cubic" else a
    print(f"Linux -> stack: {a[0]:6.1f} MB/s wall, {a[1]:6.1f} MB per CPU-second of this "
          f"process (TUN I/O included), Linux CUBIC")
    if d is not a:
        print(f"Linux -> stack: {d[0]:6.1f} MB/s wall, {d[1]:6.1f} MB per CPU-second, Linux "
              f"{default} (this host's default)")
    print(f"stack -> Linux: {b[0]:6.1f} MB/s wall, {b[1]:6.1f} MB per CPU-second (our CUBIC)")
    print(f"sender ratio stack/Linux ({args.profile}): {b[0] / a[0]:.2f}x wall against Linux "
          "CUBIC (each sender against the other's receiver, same pump and impairment)")
    if d is not a:
        print(f"sender ratio stack/Linux {default} ({args.profile}): {b[0] / d[0]:.2f}x wall "
              f"({default} is not loss-based: random loss does not shrink its window)")
    print(f"(goal 66-73 MB/s for one terminated flow; plain TUN, no offloads, {mb} MB; the "
          "machine's load decides the wall numbers)")

if __name__ == "__main__":
    main()

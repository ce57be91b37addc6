"""A real Linux TCP peer for the sans-I/O stack: a TUN device in a private namespace.

LinuxPeer creates a network namespace `gb-h6-<pid>-<hex>` (lab rules: gb- prefix,
198.18.0.0/15 addresses, nothing in the root namespace), a TUN device inside it with
198.18.77.1/24 and 2001:db8:77::1/64, and hands the TUN file descriptor to this process.
Whatever the kernel in that namespace sends to 198.18.77.2 or 2001:db8:77::2 comes out of
the TUN; `pump()` parses it, gives the TCP segments to a TcpDemux (our stack) and writes
the stack's answers
back, optionally dropping a seeded fraction of packets both ways and delaying and
reordering them (the lossy-WAN profile of bridge/lab/impair.py, `delay`/`reorder`).
Real tools run inside the namespace with `popen()`. Only needs root and /dev/net/tun; the
bridge is not involved.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import random
import secrets
import select
import struct
import subprocess
import time
from collections.abc import Callable

from pyroute2 import IPRoute, netns
from tcp_demux import TcpDemux

from stack.wire.ip import Ipv4Header, Ipv6Header, build_ipv4, build_ipv6, parse_ipv4, parse_ipv6
from stack.wire.tcp import emit_tcp

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
KERNEL_ADDR = "198.18.77.1"
STACK_ADDR = "198.18.77.2"
KERNEL = bytes([198, 18, 77, 1])
STACK = bytes([198, 18, 77, 2])
KERNEL6_ADDR = "2001:db8:77::1"
STACK6_ADDR = "2001:db8:77::2"
KERNEL6 = bytes.fromhex("20010db8007700000000000000000001")
STACK6 = bytes.fromhex("20010db8007700000000000000000002")
IFA_F_NODAD = 0x02


def available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


class LinuxPeer:
    """A namespace with a TUN whose far side is our TcpDemux."""

    def __init__(self, demux: TcpDemux, *, loss: float = 0.0, seed: int = 1,
                 mtu: int = 1500, record: list[dict[str, object]] | None = None,
                 delay: float = 0.0, reorder: float = 0.0,
                 reorder_delay: float = 0.004) -> None:
        self.demux = demux
        # The lossy-WAN profile (bridge/lab/impair.py's keys, each way): `delay` one way,
        # `reorder` the share of packets held back a random extra up to `reorder_delay`.
        self.delay = delay
        self.reorder = reorder
        self.reorder_delay = reorder_delay
        self._line: list[tuple[float, int, bool, bytes]] = []  # (due, n, inbound, packet)
        self._n = 0
        self.record = record  # per pump round: t, segments in, timer run, segments out
        # Packets read per round before the stack's output is collected: the ACK clock of
        # a Linux sender needs ACKs more often than once per 256 segments.
        self.batch = 64
        self.loss = loss
        self.rng = random.Random(seed)
        self.name = f"gb-h6-{os.getpid()}-{secrets.token_hex(2)}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dropped = 0
        self.packets_in = 0
        self.packets_out = 0
        netns.create(self.name)
        self.fd = -1
        try:
            netns.pushns(self.name)
            try:
                self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
                ifr = struct.pack("16sH", b"gbh6tun", IFF_TUN | IFF_NO_PI)
                fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            finally:
                netns.popns()
            with IPRoute(netns=self.name) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                idx = ipr.link_lookup(ifname="gbh6tun")[0]
                ipr.link("set", index=idx, mtu=mtu)
                ipr.addr("add", index=idx, address=KERNEL_ADDR, prefixlen=24)
                ipr.addr("add", index=idx, address=KERNEL6_ADDR, prefixlen=64,
                         flags=IFA_F_NODAD)
                ipr.link("set", index=idx, state="up")
        except BaseException:
            self.close()
            raise

    def popen(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start argv inside the namespace; close() kills it if still running."""
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def pump(self, step: Callable[[float], None], done: Callable[[], bool],
             timeout: float = 60.0) -> None:
        """Move packets between the TUN and the demux until done() or the timeout.

        `step(now)` runs the application once per round. Raises TimeoutError.
        """
        demux, fd = self.demux, self.fd
        end = time.monotonic() + timeout
        line = self._line
        while not done():
            now = time.monotonic()
            if now > end:
                raise TimeoutError(f"interop did not finish in {timeout} s")
            t = demux.get_timer()
            if line and (t is None or line[0][0] < t):
                t = line[0][0]
            wait = 0.02 if t is None else min(max(t - now, 0.0), 0.02)
            select.select([fd], [], [], wait)
            now = time.monotonic()
            ins: list[str] = []
            arrived: list[bytes] = []
            while line and line[0][0] <= now:
                _due, _n, inbound, held = heapq.heappop(line)
                if inbound:
                    arrived.append(held)
                else:
                    os.write(fd, held)
            for _ in range(self.batch):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if self.loss and self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                if not self._hold(now, True, pkt):
                    arrived.append(pkt)
            for pkt in arrived:
                if pkt and pkt[0] >> 4 == 6:
                    p6 = parse_ipv6(pkt)
                    if p6 is None or p6[0].next_header != 6:
                        continue
                    src, dst, tcp = p6[0].src, p6[0].dst, p6[1]
                else:
                    p4 = parse_ipv4(pkt)
                    if p4 is None or p4[0].proto != 6:
                        continue
                    src, dst, tcp = p4[0].src, p4[0].dst, p4[1]
                self.packets_in += 1
                if self.record is not None:
                    ins.append(src.hex() + ":" + dst.hex() + ":" + tcp.hex())
                demux.receive_packet(src, dst, tcp, now)
            t = demux.get_timer()
            timer = t is not None and t <= now
            if timer:
                demux.handle_timer(now)
            step(now)
            outs: list[str] = []
            for src, dst, seg in demux.segments_to_send(now):
                tcp = emit_tcp(seg, src, dst)
                if self.record is not None:
                    outs.append(src.hex() + ":" + dst.hex() + ":" + tcp.hex())
                if self.loss and self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                if len(src) == 4:
                    raw = build_ipv4(Ipv4Header(src, dst, 6, df=True), tcp)
                else:
                    raw = build_ipv6(Ipv6Header(src, dst, 6), tcp)
                if not self._hold(now, False, raw):
                    os.write(fd, raw)
                self.packets_out += 1
            if self.record is not None and (ins or outs or timer):
                self.record.append({"t": now, "in": ins, "timer": timer, "out": outs})

    def _hold(self, now: float, inbound: bool, pkt: bytes) -> bool:
        """Put `pkt` on the delay line (True), or leave it to go at once (False)."""
        if not self.delay and not self.reorder:
            return False
        due = now + self.delay
        if self.reorder and self.rng.random() < self.reorder:
            due += self.rng.random() * self.reorder_delay
        self._n += 1
        heapq.heappush(self._line, (due, self._n, inbound, pkt))
        return True

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            netns.remove(self.name)
        except OSError:
            pass

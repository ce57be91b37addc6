"""The underlay UDP socket: GSO sends, GRO receives, batches. I/O adapter, no logic.

Rules:
- One socket bound to the configured listen address (IPv4 or IPv6; "::" is dual-stack and
  IPv4-mapped peer addresses are reported and accepted as plain IPv4), 4 MiB send and
  receive buffers, non-blocking, optional SO_REUSEPORT for per-core workers.
- Outer DF is set (IP_PMTUDISC_DO / IPV6_PMTUDISC_DO), the Linux GRE default `pmtudisc`;
  the tunnel MTU is derived so that datagrams fit.
- UDP GSO (Linux udp(7) UDP_SEGMENT): a run of equal-size datagrams to one destination
  (the last may be shorter), at most 64 segments and 64 KB, goes out in one sendmsg; the
  kernel cuts it into ordinary datagrams, so the wire still carries one GRE/IPIP packet
  per UDP datagram. UDP GRO (UDP_GRO): one recvmsg may return several datagrams of one
  source glued together; the cmsg gives their size, and they are cut here, or handed to
  the core whole when a `gro_batch` factory (bridge/gro.py GroBatch) is given at
  construction. `caps` (bridge/io/adapters.py) declares that, the source-port choice below
  and the path-MTU reading. A core-built
  `bridge.gso.UdpRun` (equal datagrams back to back) is sent straight from its buffer.
- RFC 8086 §3.2.1 flow-hash source ports (peer `source_port = "flow-hash"`): the core gives
  one port per datagram (out.udp_sport); they select one of `sport_pool` (8) send-only
  sockets, each bound on first use to a free port in 49152-65535, so each inner flow keeps
  one source port and flows spread over up to 8 (a receiver ignores the source port and
  replies go to the listen port). Cost: a run of equal ports is one GSO send, as before;
  a TCP flow's datagrams share a port, so bulk transfers lose nothing. The config default
  stays "fixed" (bridge/config.py is not this module's); choosing "flow-hash" for GRE
  lets the peer's NIC RSS and ECMP in the underlay spread flows (RFC 8086 §3.2.1's aim).
- Both are probed once: if setsockopt/sendmsg refuse them, plain sendto/recvfrom is used.
- Send errors never raise: EAGAIN waits briefly for room, then drops; EMSGSIZE and
  others are counted in `send_errors` by errno name. An EMSGSIZE also puts its peer in
  `too_big`, for the loop to learn the new path MTU (`path_mtu`, RFC 1191 / RFC 8201).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from bridge.gso import UdpRun
from bridge.io.adapters import GroBatchFactory, UdpCaps

log = logging.getLogger("grebe.udp")

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_MTU_DISCOVER = 10
IP_MTU = 14  # getsockopt on a connected socket: the path MTU the kernel knows (ip(7))
IPV6_MTU = 24  # the same for IPv6 (ipv6(7))
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
GSO_MAX_SEGMENTS = 64
BUFSIZE = 4 * 1024 * 1024
RECV_BUF = 65536 + 64
# consecutive GRO batches of one source are joined up to this many bytes (0: never)
JOIN_MAX = int(os.environ.get("GREBE_JOIN_MAX", str(256 * 1024)))
SPORT_POOL = 8  # flow-hash source port sockets (RFC 8086 §3.2.1); 0 turns them off

_GSO_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")

Addr = tuple[str, int]


def _bind(s: socket.socket, address: str, port: int, patience: float = 5.0) -> None:
    """bind(); an IPv6 address still in duplicate address detection (RFC 4862 §5.4) gives
    EADDRNOTAVAIL for a moment: retry for up to `patience` seconds, then raise."""
    deadline = time.monotonic() + patience
    while True:
        try:
            s.bind((address, port))
            return
        except OSError as e:
            if (e.errno != errno.EADDRNOTAVAIL or ":" not in address   # DAD is IPv6's only
                    or time.monotonic() >= deadline):
                s.close()
                raise OSError(e.errno, f"cannot listen on {address} port {port}: "
                              f"{e.strerror}") from None
        time.sleep(0.1)


class UdpEndpoint:
    """The bridge's UDP socket. `recv_datagrams`/`send_datagrams` are the whole data API."""

    def __init__(self, address: str, port: int, reuseport: bool = False,
                 gso: bool = True, gro: bool = True, sport_pool: int = SPORT_POOL,
                 gro_batch: GroBatchFactory | None = None) -> None:
        self.v6 = ":" in address
        fam = socket.AF_INET6 if self.v6 else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        self.sock = s
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFSIZE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFSIZE)
        for opt in ("SO_SNDBUFFORCE", "SO_RCVBUFFORCE"):  # root may exceed net.core.*mem_max
            try:
                s.setsockopt(socket.SOL_SOCKET, getattr(socket, opt), BUFSIZE)
            except (OSError, AttributeError):
                pass
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self.v6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address == "::" else 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        _bind(s, address, port)
        s.setblocking(False)
        self.dual = self.v6 and address == "::"
        self.gso = gso
        self.gro = False
        if gro:
            try:
                s.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                log.info("UDP GRO unavailable; plain receive")
        self._buf = bytearray(RECV_BUF)
        self._view = memoryview(self._buf)
        self._anc = socket.CMSG_SPACE(_GRO_SIZE.size)
        self.send_errors: dict[str, int] = {}
        self.too_big: set[Addr] = set()  # peers that refused a datagram with EMSGSIZE
        # One GSO send's UDP payload: IPv4 total length 65,535 - 20 - 8; IPv6 payload
        # length 65,535 - 8. A dual-stack socket's IPv4 peers keep the IPv4 limit.
        self.max_payload = 65507 if not self.v6 else 65527
        self.address = address
        # With UDP GRO and a factory (bridge/gro.py GroBatch in `grebe up`), a GRO buffer
        # is handed to the core whole instead of being cut into datagrams here.
        self._gro_batch = gro_batch if self.gro else None
        # RFC 8086 §3.2.1 flow-hash source ports: send-only sockets, created on first use
        self.sport_pool = sport_pool
        self._pool: dict[int, socket.socket] = {}
        self.mark = 0  # SO_MARK of every socket (a full tunnel's fwmark, bridge/io/policy.py)
        self.caps = UdpCaps(gro_batches=self._gro_batch is not None,
                            source_ports=sport_pool > 0, path_mtu=True)

    def fileno(self) -> int:
        return self.sock.fileno()

    def set_mark(self, mark: int) -> None:
        """SO_MARK `mark` on this socket and its flow-hash sockets, now and later: a full
        tunnel's policy rule sends marked datagrams by the main table, not into the TUN."""
        self.mark = mark
        for s in {id(x): x for x in (self.sock, *self._pool.values())}.values():
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)

    def close(self) -> None:
        for s in self._pool.values():
            if s is not self.sock:
                s.close()
        self._pool.clear()
        self.sock.close()

    def _err(self, e: OSError, dest: Addr | None = None) -> None:
        name = errno.errorcode.get(e.errno or 0, "error").lower()
        self.send_errors[name] = self.send_errors.get(name, 0) + 1
        if e.errno == errno.EMSGSIZE and dest is not None:
            # RFC 1191 / RFC 8201: the kernel learned a smaller path MTU toward `dest` (an
            # ICMP Fragmentation Needed / Packet Too Big on the underlay); the loop asks
            # path_mtu() and tells the core (Engine.learn_path_mtu)
            host = dest[0][7:] if dest[0].startswith("::ffff:") else dest[0]
            self.too_big.add((host, dest[1]))

    def _over_path_mtu(self, size: int, dest: Addr) -> bool:
        """Would a `size`-byte datagram to `dest` exceed the kernel's path MTU?"""
        host = dest[0][7:] if dest[0].startswith("::ffff:") else dest[0]
        mtu = self.path_mtu((host, dest[1]))
        return mtu is not None and size + (48 if ":" in host else 28) > mtu

    def path_mtu(self, addr: Addr) -> int | None:
        """The path MTU the kernel holds toward `addr` (IP_MTU / IPV6_MTU of a connected
        socket: no packet is sent), or None if it cannot tell."""
        v6 = ":" in addr[0]
        try:
            with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                               socket.SOCK_DGRAM) as s:
                s.connect(addr)
                if v6:
                    return int(s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
                return int(s.getsockopt(socket.IPPROTO_IP, IP_MTU))
        except OSError:
            return None

    # -- receive ------------------------------------------------------------------------

    def recv_datagrams(self, out: list[tuple[Any, Addr]], limit: int = 64) -> int:
        """recvmsg until EAGAIN (or `limit` calls); append (payload, (host, port)) to `out`."""
        sock = self.sock
        view = self._view
        bufs = [self._buf]
        anc = self._anc
        calls = 0
        dual = self.dual
        gb = self._gro_batch
        prev: bytearray | None = None  # the buffer of the GRO batch this call appended last,
        prev_seg = 0  # while that batch is out[-1]
        prev_addr: Addr | None = None
        while calls < limit:
            try:
                n, ancdata, _flags, addr = sock.recvmsg_into(bufs, anc)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:  # e.g. ECONNREFUSED from an ICMP error: not fatal
                calls += 1
                continue
            calls += 1
            host = addr[0]
            if dual and host.startswith("::ffff:"):
                host = host[7:]
            a = (host, addr[1])
            seg = 0
            for level, typ, data in ancdata:
                if level == SOL_UDP and typ == UDP_GRO:
                    seg = _GRO_SIZE.unpack_from(data.ljust(4, b"\0"))[0]
            if prev is not None and JOIN_MAX:
                # Join this recv onto the previous GRO batch when it simply continues it:
                # same source, same datagram size, the previous one ending on a whole
                # datagram. The core then coalesces up to 64 KB per call instead of one
                # GRO buffer (~20 datagrams here) per call: numpy's per-call cost is paid
                # half as often (see JOIN_MAX). The batch holds `prev` itself.
                if (prev_addr == a and len(prev) + n <= JOIN_MAX
                        and (seg == prev_seg if seg and seg < n else 0 < n <= prev_seg)
                        and not len(prev) % prev_seg):
                    prev += view[:n]
                    continue
            if seg and seg < n and gb is not None:  # one copy; the core takes it whole
                prev, prev_seg, prev_addr = bytearray(view[:n]), seg, a
                out.append((gb(prev, seg), a))
            elif seg and seg < n:
                prev = None
                for off in range(0, n, seg):
                    out.append((bytes(view[off:min(off + seg, n)]), a))
            else:
                prev = None
                out.append((bytes(view[:n]), a))
        return calls

    # -- send ---------------------------------------------------------------------------

    def _max_payload(self, dest: Addr) -> int:
        return 65507 if self.dual and dest[0].startswith("::ffff:") else self.max_payload

    def _dest(self, addr: Addr) -> Addr:
        if self.dual and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return addr

    def send_datagrams(self, addr: Addr, datagrams: Sequence[bytes | bytearray],
                       sports: Sequence[int] | None = None) -> int:
        """Send datagrams to `addr` in order, GSO runs where sizes allow; return sendmsg calls.

        `sports` (RFC 8086 §3.2.1 flow-hash ports, one per datagram, from the core): each
        run of equal ports leaves through the pool socket of that port (`_pool_socket`)."""
        dest = self._dest(addr)
        if not sports or not self.sport_pool or len(sports) != len(datagrams):
            return self._send_run(self.sock, datagrams, dest)
        calls = 0
        i = 0
        n = len(datagrams)
        while i < n:
            port = sports[i]
            j = i + 1
            while j < n and sports[j] == port:
                j += 1
            run = datagrams if i == 0 and j == n else datagrams[i:j]
            calls += self._send_run(self._pool_socket(port), run, dest)
            i = j
        return calls

    def _pool_socket(self, port: int) -> socket.socket:
        """The send-only socket for flow-hash port `port`: slot port % sport_pool, bound on
        first use to a free port in 49152-65535 (RFC 8086 §3.2.1), `port` itself if it is
        free. Falls back to the main socket if no port can be bound."""
        slot = port % self.sport_pool
        s = self._pool.get(slot)
        if s is not None:
            return s
        fam = socket.AF_INET6 if self.v6 else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFSIZE)
        if self.mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        with contextlib.suppress(OSError, AttributeError):
            s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_SNDBUFFORCE", 32), BUFSIZE)
        if self.v6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.dual else 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        for k in range(64):
            p = 49152 + (port - 49152 + k * 257) % 16384
            try:
                s.bind((self.address, p))
                break
            except OSError:
                continue
        else:
            s.close()
            log.warning("no free source port for flow-hash slot %d; using the main socket", slot)
            self._pool[slot] = self.sock
            return self.sock
        s.setblocking(False)
        self._pool[slot] = s
        return s

    def _send_udprun(self, sock: socket.socket, r: UdpRun, dest: Addr) -> int:
        """A core-built run of equal datagrams: GSO sendmsg straight from its buffer, in
        chunks of at most 64 datagrams and 64 KB; datagram by datagram without GSO."""
        seg = r.seg
        mv = memoryview(r)
        n = len(r)
        if not self.gso or seg <= 0:
            for o in range(0, n, max(seg, 1)):
                self._send_one(mv[o:o + seg], dest, sock)
            return (n + seg - 1) // seg if seg > 0 else 1
        per = min(GSO_MAX_SEGMENTS, self._max_payload(dest) // seg) * seg
        calls = 0
        for o in range(0, n, per):
            chunk = mv[o:o + per]
            if len(chunk) <= seg:
                self._send_one(chunk, dest, sock)
            else:
                self._send_gso([chunk], seg, dest, sock)
            calls += 1
        return calls

    def _send_run(self, sock: socket.socket, datagrams: Sequence[bytes | bytearray],
                  dest: Addr) -> int:
        if not self.gso:
            calls = 0
            for d in datagrams:
                if type(d) is UdpRun:
                    calls += self._send_udprun(sock, d, dest)
                else:
                    self._send_one(d, dest, sock)
                    calls += 1
            return calls
        calls = 0
        i = 0
        n = len(datagrams)
        maxp = self._max_payload(dest)
        while i < n:
            first = datagrams[i]
            if type(first) is UdpRun:
                calls += self._send_udprun(sock, first, dest)
                i += 1
                continue
            size = len(first)
            j = i + 1
            total = size
            # equal sizes; a shorter one may end the run (udp(7) UDP_SEGMENT)
            while (j < n and j - i < GSO_MAX_SEGMENTS and total + len(datagrams[j]) <= maxp):
                if type(datagrams[j]) is UdpRun:
                    break
                ln = len(datagrams[j])
                if ln > size:
                    break
                total += ln
                j += 1
                if ln < size:
                    break
            if j - i == 1:
                self._send_one(datagrams[i], dest, sock)
            else:
                self._send_gso(datagrams[i:j], size, dest, sock)
            calls += 1
            i = j
        return calls

    def _send_gso(self, run: Sequence[bytes | bytearray | memoryview], size: int,
                  dest: Addr, sock: socket.socket) -> None:
        cmsg = [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))]
        data = [run[0] if len(run) == 1 else b"".join(run)]
        try:
            self._retry(sock, lambda: sock.sendmsg(data, cmsg, 0, dest))
        except OSError as e:
            if e.errno == errno.EINVAL and self._over_path_mtu(size, dest):
                # udp(7): a GSO segment larger than the path MTU is EINVAL, not EMSGSIZE;
                # it is a shrunken path, not a kernel without GSO
                self._err(OSError(errno.EMSGSIZE, "segment above the path MTU"), dest)
                return
            if e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                log.info("UDP GSO refused (%s); plain sends from now on", e)
                self.gso = False
                for d in run:
                    for o in range(0, len(d), size):  # a joined chunk: cut it again
                        self._send_one(memoryview(d)[o:o + size], dest, sock)
                return
            self._err(e, dest)

    def _send_one(self, d: bytes | bytearray | memoryview, dest: Addr,
                  sock: socket.socket) -> None:
        try:
            self._retry(sock, lambda: sock.sendto(d, dest))
        except OSError as e:
            self._err(e, dest)

    def _retry(self, sock: socket.socket, fn: Callable[[], int]) -> None:
        """Call fn; on EAGAIN wait up to 50 ms for room in the socket buffer, once."""
        try:
            fn()
            return
        except BlockingIOError:
            pass
        p = select.poll()
        p.register(sock.fileno(), select.POLLOUT)
        if p.poll(50):
            fn()
        else:
            raise BlockingIOError(errno.EAGAIN, "send buffer full")

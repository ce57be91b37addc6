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
  source glued together; the cmsg gives their size, and they are cut here.
- Both are probed once: if setsockopt/sendmsg refuse them, plain sendto/recvfrom is used.
- Send errors never raise: EAGAIN waits briefly for room, then drops; EMSGSIZE and
  others are counted in `send_errors` by errno name.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("grebe.udp")

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
GSO_MAX_SEGMENTS = 64
BUFSIZE = 4 * 1024 * 1024
RECV_BUF = 65536 + 64

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
            if e.errno != errno.EADDRNOTAVAIL or time.monotonic() >= deadline:
                s.close()
                raise OSError(e.errno, f"cannot listen on {address} port {port}: "
                              f"{e.strerror}") from None
        time.sleep(0.1)


class UdpEndpoint:
    """The bridge's UDP socket. `recv_datagrams`/`send_datagrams` are the whole data API."""

    def __init__(self, address: str, port: int, reuseport: bool = False,
                 gso: bool = True, gro: bool = True) -> None:
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
        self.max_payload = 65507 if not self.v6 else 65527

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _err(self, e: OSError) -> None:
        name = errno.errorcode.get(e.errno or 0, "error").lower()
        self.send_errors[name] = self.send_errors.get(name, 0) + 1

    # -- receive ------------------------------------------------------------------------

    def recv_datagrams(self, out: list[tuple[bytes, Addr]], limit: int = 64) -> int:
        """recvmsg until EAGAIN (or `limit` calls); append (payload, (host, port)) to `out`."""
        sock = self.sock
        view = self._view
        bufs = [self._buf]
        anc = self._anc
        calls = 0
        dual = self.dual
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
            if seg and seg < n:
                for off in range(0, n, seg):
                    out.append((bytes(view[off:min(off + seg, n)]), a))
            else:
                out.append((bytes(view[:n]), a))
        return calls

    # -- send ---------------------------------------------------------------------------

    def _dest(self, addr: Addr) -> Addr:
        if self.dual and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return addr

    def send_datagrams(self, addr: Addr, datagrams: Sequence[bytes | bytearray]) -> int:
        """Send datagrams to `addr` in order, GSO runs where sizes allow; return sendmsg calls."""
        dest = self._dest(addr)
        if not self.gso:
            for d in datagrams:
                self._send_one(d, dest)
            return len(datagrams)
        calls = 0
        i = 0
        n = len(datagrams)
        maxp = self.max_payload
        while i < n:
            size = len(datagrams[i])
            j = i + 1
            total = size
            # equal sizes; a shorter one may end the run (udp(7) UDP_SEGMENT)
            while (j < n and j - i < GSO_MAX_SEGMENTS and total + len(datagrams[j]) <= maxp):
                ln = len(datagrams[j])
                if ln > size:
                    break
                total += ln
                j += 1
                if ln < size:
                    break
            if j - i == 1:
                self._send_one(datagrams[i], dest)
            else:
                self._send_gso(datagrams[i:j], size, dest)
            calls += 1
            i = j
        return calls

    def _send_gso(self, run: Sequence[bytes | bytearray], size: int, dest: Addr) -> None:
        cmsg = [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))]
        data = [b"".join(run)]
        try:
            self._retry(lambda: self.sock.sendmsg(data, cmsg, 0, dest))
        except OSError as e:
            if e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                log.info("UDP GSO refused (%s); plain sends from now on", e)
                self.gso = False
                for d in run:
                    self._send_one(d, dest)
                return
            self._err(e)

    def _send_one(self, d: bytes | bytearray, dest: Addr) -> None:
        try:
            self._retry(lambda: self.sock.sendto(d, dest))
        except OSError as e:
            self._err(e)

    def _retry(self, fn: Callable[[], int]) -> None:
        """Call fn; on EAGAIN wait up to 50 ms for room in the socket buffer, once."""
        try:
            fn()
            return
        except BlockingIOError:
            pass
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLOUT)
        if p.poll(50):
            fn()
        else:
            raise BlockingIOError(errno.EAGAIN, "send buffer full")

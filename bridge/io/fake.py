"""In-memory fakes of the TUN and the UDP socket, for tests (wireguard-go tuntest/bindtest).

Rules:
- The same protocols as `TunDevice` / `UdpEndpoint` (bridge/io/adapters.py: read_packets,
  write_packets, set_mtu; recv_datagrams, send_datagrams, path_mtu, too_big), so
  `loop.Engine` runs over them unchanged. Their capabilities are declared like the real
  adapters': no vnet header, no TSO frames or GRO batches (plain packets and datagrams), no
  source-port choice (the engine then passes no ports); the path MTU is read from
  `path_mtus`, which a test sets as the kernel would learn it.
- Deterministic: no threads, no clock. `MemoryNet` delivers a datagram to the endpoint bound
  at its destination immediately, through an optional `impair(payload, src, dst)` hook that
  returns the datagrams to deliver (empty list = lost, two = duplicated).
- `fileno()` returns an eventfd that is readable while something is queued, so the threaded
  `runner.Runner` runs over them too (deques are thread-safe for append/popleft); Engine-driven
  tests just call the pumps.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from bridge.io.adapters import Addr, TunCaps, UdpCaps

Impair = Callable[[bytes, Addr, Addr], list[bytes]]


class _Ready:
    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def set(self) -> None:
        os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class MemoryTun:
    """A TUN whose kernel side is two queues: `inject()` to it, `written` from it."""

    caps = TunCaps()

    def __init__(self, name: str = "mem0") -> None:
        self.name = name
        self.inbound: deque[bytes] = deque()  # packets the "kernel" routes into the TUN
        self.written: list[bytes] = []  # packets the bridge wrote
        self.mtus: list[int] = []  # every MTU the bridge set, in order
        self._ready = _Ready()

    def inject(self, *packets: bytes) -> None:
        self.inbound.extend(packets)
        self._ready.set()

    def fileno(self) -> int:
        return self._ready.fd

    def read_packets(self, out: list[Any], limit: int = 64) -> int:
        self._ready.clear()  # before draining: a packet injected meanwhile sets it again
        n = 0
        while self.inbound and n < limit:
            out.append(self.inbound.popleft())
            n += 1
        if self.inbound:
            self._ready.set()
        return n

    def write_packets(self, packets: Sequence[bytes | bytearray | memoryview]) -> int:
        self.written.extend(bytes(p) for p in packets)
        return len(packets)

    def set_mtu(self, mtu: int) -> None:
        self.mtus.append(mtu)

    def take(self) -> list[bytes]:
        """Return and forget what the bridge wrote."""
        w, self.written = self.written, []
        return w

    def close(self) -> None:
        self._ready.close()


class MemoryNet:
    """The underlay: endpoints by address, optional impairment, a log of every datagram."""

    def __init__(self, impair: Impair | None = None) -> None:
        self.endpoints: dict[Addr, MemoryUdp] = {}
        self.impair = impair
        self.log: list[tuple[Addr, Addr, bytes]] = []  # (src, dst, payload)

    def endpoint(self, host: str, port: int = 4754) -> MemoryUdp:
        ep = MemoryUdp(self, (host, port))
        self.endpoints[(host, port)] = ep
        return ep

    def deliver(self, payload: bytes, src: Addr, dst: Addr) -> None:
        self.log.append((src, dst, payload))
        ep = self.endpoints.get(dst)
        if ep is None:
            return
        for d in self.impair(payload, src, dst) if self.impair else [payload]:
            ep.inbound.append((d, src))
            ep._ready.set()


class MemoryUdp:
    """A UDP socket on a MemoryNet. `inject()` lets a test play an attacker."""

    caps = UdpCaps(path_mtu=True)

    def __init__(self, net: MemoryNet, addr: Addr) -> None:
        self.net = net
        self.addr = addr
        self.inbound: deque[tuple[bytes, Addr]] = deque()
        self.sent = 0
        self.too_big: set[Addr] = set()  # a test plays a send that met EMSGSIZE
        self.path_mtus: dict[Addr, int] = {}  # the underlay path MTU the "kernel" knows
        self._ready = _Ready()

    def inject(self, payload: bytes, src: Addr) -> None:
        self.inbound.append((payload, src))
        self._ready.set()

    def fileno(self) -> int:
        return self._ready.fd

    def recv_datagrams(self, out: list[tuple[Any, Addr]], limit: int = 64) -> int:
        self._ready.clear()  # before draining: a datagram delivered meanwhile sets it again
        n = 0
        while self.inbound and n < limit:
            out.append(self.inbound.popleft())
            n += 1
        if self.inbound:
            self._ready.set()
        return n

    def send_datagrams(self, addr: Addr, datagrams: Sequence[bytes | bytearray],
                       sports: Sequence[int] | None = None) -> int:
        for d in datagrams:
            self.sent += 1
            self.net.deliver(bytes(d), self.addr, addr)
        return len(datagrams)

    def path_mtu(self, addr: Addr) -> int | None:
        return self.path_mtus.get(addr)

    def close(self) -> None:
        self._ready.close()


class Pumps(Protocol):
    def pump_tun(self) -> int: ...
    def pump_udp(self) -> int: ...


def drive(engines: Sequence[Pumps], rounds: int = 100) -> int:
    """Pump every engine's TUN and UDP until nothing moves (or `rounds`); return rounds used."""
    for r in range(rounds):
        moved = 0
        for e in engines:
            moved += e.pump_tun() + e.pump_udp()
        if not moved:
            return r
    return rounds

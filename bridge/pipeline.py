"""Bridge: the sans-I/O data plane (batches in, batches out). INTERFACE FIRST VERSION.

Contract (docs/DESIGN.md):
    bridge = Bridge(config, now, underlay_mtu=None)
    out = Output()                        # reused per batch; out.clear()
    bridge.from_tun(packets, now, out)    # inner IP packets
    bridge.from_udp(datagrams, now, out)  # [(payload, (host, port)), ...]
    bridge.handle_timer(now, out); bridge.get_timer() -> float | None
    out.udp: dict[(host, port), list[bytes]]   datagrams per destination, in order
    out.udp_sport: dict[(host, port), list[int]]  only for peers with source_port =
        "flow-hash": the RFC 8086 §3.2.1 source port of each datagram in out.udp[dest]
        (same index). An I/O layer that cannot pick source ports may ignore it.
    out.tun: list[bytes]                  inner packets (and ICMP errors) for the TUN
    bridge.counters; bridge.status(now) -> dict; bridge.tun_mtu -> int
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bridge.config import Config
from bridge.counters import Counters

__all__ = ["Bridge", "Output"]

Addr = tuple[str, int]


class Output:
    """What one call produced. Reuse it: `clear()` between batches."""

    __slots__ = ("udp", "udp_sport", "tun")

    def __init__(self) -> None:
        self.udp: dict[Addr, list[bytes]] = {}
        self.udp_sport: dict[Addr, list[int]] = {}
        self.tun: list[bytes] = []

    def clear(self) -> None:
        self.udp.clear()
        self.udp_sport.clear()
        self.tun.clear()

    def __bool__(self) -> bool:
        return bool(self.udp or self.tun)


class Bridge:
    """The data plane of one endpoint. Pure: no sockets, no clock (`now` is passed in)."""

    def __init__(self, config: Config, now: float, underlay_mtu: int | None = None) -> None:
        self.config = config
        self.counters = Counters([p.name for p in config.peers])
        self.tun_mtu = config.tun.mtu or (underlay_mtu or config.pmtu.underlay_mtu) - 56

    def from_tun(self, packets: Iterable[bytes | bytearray | memoryview], now: float,
                 out: Output) -> None:
        """Encapsulate inner packets toward their peers (out.udp), ICMP errors to out.tun."""
        raise NotImplementedError

    def from_udp(self, datagrams: Iterable[tuple[bytes | bytearray | memoryview, Addr]],
                 now: float, out: Output) -> None:
        """Decapsulate datagrams; inner packets go to out.tun. Never raises for bad input."""
        raise NotImplementedError

    def get_timer(self) -> float | None:
        """The next deadline (keepalive, liveness, reorder flush), or None."""
        return None

    def handle_timer(self, now: float, out: Output) -> None:
        """Run everything due at `now` (keepalives to out.udp, reorder flushes to out.tun)."""

    def status(self, now: float) -> dict[str, Any]:
        """JSON-able status for `grebe status`."""
        return {"tun_mtu": self.tun_mtu, "counters": self.counters.snapshot()}

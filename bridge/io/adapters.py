"""What the engine (bridge/io/loop.py) asks of a TUN and a UDP adapter, and what each declares.

Rules:
- An adapter implements the whole protocol (`TunLike` / `UdpLike`): the engine calls every
  method without probing for it. What differs between adapters is declared once, at
  construction, in a frozen capabilities record (`caps`), as wireguard-go's tun.Device
  declares its BatchSize and its offload flags: the engine reads the record when it is built,
  never per packet.
- A capability that needs a core type (a TSO frame handed over whole, a GRO buffer handed
  over whole) is given to the adapter as a factory at construction (`TsoFrameFactory`,
  `GroBatchFactory`, bridge/gso.py's classes in `grebe up`); nothing is injected later.
- The in-memory fakes (bridge/io/fake.py) declare theirs like the real adapters
  (bridge/io/tun.py, bridge/io/udp.py).

What the declarations mean to the engine:
- `TunCaps.vnet_hdr`: frames carry the virtio-net header (checksum and TSO offload both
  ways), so the adapter takes TunFrames (bridge/tunframe.py) and coalesces writes. The core
  answers GRO batches with TunFrames, so `UdpCaps.gro_batches` needs it; the userspace
  Terminator sends TunFrames on such a TUN (bridge/io/flows.py).
- `TunCaps.tso_frames`: `read_packets` hands TCP TSO frames to the core whole.
- `TunCaps.frame_parts`: `write_packets` takes `TunFrameParts` (headers and payload apart,
  one writev per frame), so the Terminator does not join its client leg's payload into
  each frame (bridge/io/flows.py).
- `UdpCaps.gro_batches`: `recv_datagrams` hands UDP GRO buffers to the core whole.
- `UdpCaps.source_ports`: `send_datagrams` honours one source port per datagram (RFC 8086
  §3.2.1 flow-hash ports, `Output.udp_sport`); without it the engine does not pass them.
- `UdpCaps.path_mtu`: `path_mtu(addr)` reads the underlay's path MTU (RFC 1191 / RFC 8201),
  so the engine rereads it on its timer; `too_big` (filled by sends that met EMSGSIZE) is
  read after every send whatever the declaration.

There is no batch-size field: the engine chooses how many reads one call makes
(GREBE_BATCH) and every adapter honours any limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Addr = tuple[str, int]
# A TSO splitter (bridge/io/offload.py split_frame): appends a frame's segments to `out`.
Splitter = Callable[[bytes, list[bytes]], bool]
# (frame, offset of the IP packet in it, gso_size, splitter) -> what the core takes whole
TsoFrameFactory = Callable[[bytes, int, int, Splitter], object]


# (buffer, datagram size) -> what the core takes whole; the adapter keeps the bytearray and
# may append the next GRO buffer of the same run to it (bridge/gro.py GroBatch)
GroBatchFactory = Callable[[bytearray, int], object]


@dataclass(frozen=True, slots=True)
class TunCaps:
    """What a TUN adapter does (module docstring)."""

    vnet_hdr: bool = False
    tso_frames: bool = False
    frame_parts: bool = False


@dataclass(frozen=True, slots=True)
class UdpCaps:
    """What a UDP adapter does (module docstring)."""

    gro_batches: bool = False
    source_ports: bool = False
    path_mtu: bool = False


class TunLike(Protocol):
    caps: TunCaps

    def fileno(self) -> int: ...
    def read_packets(self, out: list[Any], limit: int = ...) -> int: ...
    def write_packets(self, packets: Sequence[bytes | bytearray | memoryview]) -> int: ...
    def set_mtu(self, mtu: int) -> None: ...


class UdpLike(Protocol):
    caps: UdpCaps
    too_big: set[Addr]  # peers a send met EMSGSIZE toward (the engine empties it)

    def fileno(self) -> int: ...
    def recv_datagrams(self, out: list[tuple[Any, Addr]], limit: int = ...) -> int: ...
    def send_datagrams(self, addr: Addr, datagrams: Sequence[bytes | bytearray],
                       sports: Sequence[int] | None = None) -> int: ...
    def path_mtu(self, addr: Addr) -> int | None: ...

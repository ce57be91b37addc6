"""TunFrame: a packet the core hands to a vnet TUN already framed (virtio-net header first).

Rules:
- A `TunFrame` in `Output.tun` is `virtio_net_hdr (10 bytes) + IP packet`, built by the core
  for a TUN opened with IFF_VNET_HDR and TUN_F_CSUM|TSO4|TSO6 (virtio 1.x §5.1.6). The TUN
  adapter writes it as it is (`bridge/io/offload.coalesce` passes it through, in order); a
  core only produces them after the adapter said the TUN takes them
  (`Terminator.use_tun_offload`), never for a plain TUN or the in-memory fakes.
- Why: the core can then leave the TCP checksum to the kernel (VIRTIO_NET_HDR_F_NEEDS_CSUM:
  the checksum field holds the pseudo-header sum) and hand it one 64 KB super-segment
  (gso_type TCPV4/TCPV6, gso_size = MSS) for the kernel to segment, instead of summing
  every payload byte twice (emit, then the coalescer's check) and writing one packet per MSS.
- A `TunFrameParts` is a TunFrame in two pieces: the bytes object is the virtio-net header
  and the packet's IP and TCP headers, `payload` the TCP payload (the client leg's send
  buffer chunk, often a 64 KB `bytes` or a view of one). The TUN adapter writes both with one
  writev (tun takes any iovec; the frame is one write, as a joined TunFrame is), so the
  payload is not copied into a joined frame first. Only a Terminator told so by the adapter
  (`use_tun_offload(parts=True)`, bridge/io/flows.py for a TunDevice) makes them; a
  consumer that needs one buffer joins `bytes(f) + f.payload` (`joined`).
- A `LegRun` is never written to a TUN: bridge/gro.py makes it only for a run whose 4-tuple
  the Terminator said is a live splice's server leg (bridge/fastpath.py `leg`), and the
  Terminator's `from_peer` hands it to that leg (or drops and counts it), never to
  `out.tun`. It is the merged packet's IP + TCP header as bytes (length field 0 over
  64 KB, as BIG TCP) with the whole payload beside it (`payload`, one `bytes`): the
  leg's receive queue keeps that object as it is, so the payload is copied once, from
  the datagrams.
"""

from __future__ import annotations

__all__ = ["TunFrame", "TunFrameParts", "LegRun", "joined"]


class TunFrame(bytes):
    """bytes: virtio-net header + IP packet, written to the TUN unchanged."""

    __slots__ = ()


class TunFrameParts(bytes):
    """bytes: virtio-net header + IP and TCP headers; `payload` the TCP payload, written
    beside it (one writev): together one TunFrame."""

    def __init__(self, head: bytes | bytearray, payload: bytes | memoryview) -> None:
        super().__init__()
        self.payload = payload

    def __new__(cls, head: bytes | bytearray, payload: bytes | memoryview) -> TunFrameParts:
        return super().__new__(cls, head)


def joined(frame: TunFrame | TunFrameParts) -> TunFrame:
    """The frame as one buffer (tests, tools; the TUN adapter writes the parts as they are)."""
    if type(frame) is TunFrameParts:
        return TunFrame(b"".join((frame, frame.payload)))
    return frame  # type: ignore[return-value]


class LegRun(bytes):
    """bytes: the IP + TCP header of a merged run for a server leg; `payload` its data
    (bytes), `gso_size` the payload of each datagram merged (for the segment counters)."""

    def __init__(self, header: bytes | bytearray, payload: bytes, gso_size: int) -> None:
        super().__init__()
        self.payload = payload
        self.gso_size = gso_size

    def __new__(cls, header: bytes | bytearray, payload: bytes, gso_size: int) -> LegRun:
        return super().__new__(cls, header)

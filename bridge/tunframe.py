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
"""

from __future__ import annotations

__all__ = ["TunFrame"]


class TunFrame(bytes):
    """bytes: virtio-net header + IP packet, written to the TUN unchanged."""

    __slots__ = ()

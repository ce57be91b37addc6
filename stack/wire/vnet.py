"""The virtio-net header that a TUN opened with IFF_VNET_HDR puts before every packet.

Rules:
- virtio 1.x §5.1.6 struct virtio_net_hdr, 10 bytes (TUNSETVNETHDRSZ 10), little-endian on a
  TUN (TUNSETVNETLE / a little-endian host): flags (u8), gso_type (u8), hdr_len (le16),
  gso_size (le16), csum_start (le16), csum_offset (le16).
- flags: VIRTIO_NET_HDR_F_NEEDS_CSUM (1): the checksum over [csum_start:] is not done; the
  field at csum_start + csum_offset holds the pseudo-header sum (virtio §5.1.6.2); the
  receiver (for a TUN write: the kernel) completes it. VIRTIO_NET_HDR_F_DATA_VALID (2): the
  checksum was already verified (§5.1.6.3).
- gso_type: NONE (0), TCPV4 (1), TCPV6 (4), with the ECN bit (0x80) when the segments carry
  CWR (RFC 3168 §6.1.2); gso_size is the payload of each segment, hdr_len the headers'.
- `complete_checksum` finishes a NEEDS_CSUM checksum (RFC 1071 over [csum_start:], seeded
  with the pseudo-header sum in the field) and never raises: bad offsets give False.

Theory of operation: the one `struct.Struct` (`VNET`) and the named values; the hot paths
`pack_into`/`unpack_from` it directly (bridge/gso.py, bridge/io/offload.py,
bridge/userspace/legwire.py), control paths use `build_vnet` / `parse_vnet`.
"""

from __future__ import annotations

import struct

from stack.wire.checksum import checksum

__all__ = [
    "VNET",
    "VNET_HDR_LEN",
    "VNET_NONE",
    "F_NEEDS_CSUM",
    "F_DATA_VALID",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_ECN",
    "GSO_SIZE_AT",
    "parse_vnet",
    "build_vnet",
    "complete_checksum",
]

VNET = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET.size  # 10
VNET_NONE = bytes(VNET_HDR_LEN)  # no flags, no GSO: a plain packet follows
GSO_SIZE_AT = 4  # offset of the little-endian gso_size

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80

_U16 = struct.Struct(">H")


def parse_vnet(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int]:
    """Return (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset).

    Raises struct.error if `buf` is shorter than 10 bytes (our own reads never are).
    """
    return VNET.unpack_from(buf, 0)


def build_vnet(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
               csum_start: int = 0, csum_offset: int = 0) -> bytes:
    """Return the 10-byte virtio-net header."""
    return VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def complete_checksum(pkt: bytearray, csum_start: int, csum_offset: int) -> bool:
    """Finish a NEEDS_CSUM checksum in place (virtio §5.1.6.2). False if the offsets are bad."""
    at = csum_start + csum_offset
    if csum_start >= len(pkt) or at + 2 > len(pkt):
        return False
    initial = _U16.unpack_from(pkt, at)[0]
    pkt[at] = 0
    pkt[at + 1] = 0
    _U16.pack_into(pkt, at, checksum(memoryview(pkt)[csum_start:], initial))
    return True

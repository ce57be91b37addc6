"""TUN offloads: the virtio-net header, TSO splitting and receive-side TCP coalescing.

Pure functions (bytes in, bytes out); the TUN adapter (`tun.py`) and the loop call them.

Rules:
- The virtio-net header (virtio 1.x §5.1.6) is stack/wire/vnet.py's (re-exported here for the
  TUN adapter). NEEDS_CSUM without GSO (virtio §5.1.6.2): the checksum over [csum_start:] is
  completed (`complete_checksum`) before the packet leaves the machine.
- TSO split (RFC 9293 §3.1, RFC 791 §3.1, RFC 8200 §3): every segment gets the headers of the
  super-packet with its own IPv4 total length / IPv6 payload length, IPv4 identification
  incremented per segment (RFC 6864 §4.1 leaves it to the sender; Linux does +1 per segment),
  a fresh IPv4 header checksum, sequence number = seq + i * gso_size, FIN and PSH only on the
  last segment, CWR only on the first (RFC 3168 §6.1.2), and a complete TCP checksum.
- Coalescing (the receive path, like Linux GRO): consecutive segments of one TCP flow are
  joined into one GSO write only when they share addresses, ports, IP TTL/TOS(traffic class)/DF,
  the TCP header bytes except seq and checksum (same flags, ACK only, same options), the
  sequence numbers are contiguous, and all payloads have the size of the first except a
  shorter last one. Any doubt: the packet is written on its own, and the kernel checks it.
  The joined packet carries the pseudo-header sum in its TCP checksum field (NEEDS_CSUM), so
  the segments' own checksums are verified first (one aggregate check over the group; on
  failure every packet goes alone and the kernel drops the bad one).
- Every IPv4 header checksum is verified before its packet joins or starts a group (RFC 791
  §3.1; Linux inet_gro_receive flushes on a bad one too): the merged header is rebuilt from
  the first packet with fresh lengths, identification and checksum, so merging would
  "repair" a damaged header the kernel must drop. A bad one goes alone, unchanged.

Theory of operation: most of the cost is the payload checksum. `tso_split` sums all full-size
segment payloads with one numpy reshape (rows = segments; ANCHORS.md: +58 % throughput) and
folds each row with the segment's TCP header and pseudo-header through `stack.wire.checksum`;
`use_numpy=False` gives the pure-Python path, and the tests check both give equal bytes.
Coalescing compares a continuing segment's headers with its group's first as one masked
integer; the IPv4 header checksum of the first is checked with `stack.wire.checksum.verify`,
that of a continuing one on the same integer (its top 20 bytes modulo 0xFFFF, the RFC 1071
arithmetic of checksum.py: zero when intact), which costs ~6 % of the coalescer's time.
Nothing here raises on malformed input: `split_frame` returns False and the caller counts it.

Partial checksums from a local eBPF sender (docs/DESIGN.md "The inspected-flow stall"): a
TCP packet written alone (not merged: a group of one, a failed group, SYN/FIN/RST) whose
checksum field holds exactly the pseudo-header sum is written with NEEDS_CSUM (the kernel
completes it, or a receiver on this host trusts it, as it would the sender's skb), and one
longer than the TUN's MTU (an unsegmented TSO super-packet) also with TCP GSO, gso_size the
MTU less its headers. A program on the same host leaves both so (its offload is done by the
egress device, and a veth does neither); a damaged packet matches with odds of 1 in 65,535,
and a complete checksum that happens to equal the pattern is completed to itself.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from bridge.tunframe import TunFrame, TunFrameParts
from stack.wire.checksum import (
    checksum,
    partial,
    partial_le_rows,
    pseudo_sum_v4,
    pseudo_sum_v6,
    swap16,
    verify,
)
from stack.wire.prelude import (
    V4_DST_AT,
    V4_SRC_AT,
    V6_DST_AT,
    V6_SRC_AT,
    plain_tcp,
)
from stack.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET,
    VNET_HDR_LEN,
    VNET_NONE,
    complete_checksum,
)

try:  # numpy is a declared dependency; the fallback keeps the module importable without it
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

__all__ = [
    "tso_split",
    "split_frame",
    "coalesce",
]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_V4_ID_LEN = struct.Struct(">HH")  # total length at 2, identification at 4
_TCP_SEQ = struct.Struct(">I")

_TCP = 6
_FIN, _PSH, _ACK, _CWR = 0x01, 0x08, 0x10, 0x80
_NOT_LAST_MASK = 0xFF & ~(_FIN | _PSH)
_MAX_IP_LEN = 65535
NUMPY_MIN_SEGMENTS = 4  # below this, numpy's call overhead costs more than it saves


def _fold_le_to_csum(sums: Any) -> Any:
    """numpy: little-endian word sums per row -> the Internet checksum of each row."""
    return (~partial_le_rows(sums)) & 0xFFFF


def _split_full_numpy(hdr: bytearray, payload: memoryview, ihl: int, mss: int, n: int,
                      v4: bool, ip_id: int, seq: int, flags: int, pseudo: int,
                      out: list[bytes]) -> None:
    """Build the `n` full-size segments at once: one row of a numpy array per segment.

    `hdr` holds the headers with lengths already set for a full segment and zeroed
    checksums; rows are padded to a multiple of 4 bytes for the 32-bit word sums.
    """
    np = _np
    hl = len(hdr)
    width = hl + mss
    a = np.zeros((n, (width + 3) & ~3), dtype=np.uint8)
    a[:, :hl] = np.frombuffer(hdr, dtype=np.uint8)
    a[:, hl:width] = np.frombuffer(payload, dtype=np.uint8, count=n * mss).reshape(n, mss)
    idx = np.arange(n, dtype=np.uint64)
    seqs = ((idx * mss + seq) & 0xFFFFFFFF).astype(">u4")
    a[:, ihl + 4:ihl + 8] = seqs.view(np.uint8).reshape(n, 4)
    a[:, ihl + 13] = flags & _NOT_LAST_MASK & ~_CWR
    a[0, ihl + 13] = flags & _NOT_LAST_MASK
    if v4:
        ids = ((idx + ip_id) & 0xFFFF).astype(">u2")
        a[:, 4:6] = ids.view(np.uint8).reshape(n, 2)
        ipc = _fold_le_to_csum(a[:, :ihl].view("<u4").sum(axis=1, dtype=np.uint64))
        a[:, 10:12] = ipc.astype(">u2").view(np.uint8).reshape(n, 2)
    tsum = a[:, ihl:].view("<u4").sum(axis=1, dtype=np.uint64) + swap16(pseudo)
    a[:, ihl + 16:ihl + 18] = _fold_le_to_csum(tsum).astype(">u2").view(np.uint8).reshape(n, 2)
    flat = a.tobytes()  # one copy out of numpy, then one slice per segment
    w4 = a.shape[1]
    out.extend([flat[i:i + width] for i in range(0, n * w4, w4)])


def tso_split(pkt: memoryview, gso_size: int, csum_start: int, out: list[bytes],
              use_numpy: bool = True) -> bool:
    """Split one TCP super-packet (no vnet header) into segments of `gso_size` payload bytes.

    Appends the segments to `out` and returns True; returns False (appending nothing) when
    the packet is not a well-formed IPv4/IPv6 TCP packet with the transport header at
    `csum_start`, or is longer than its IP length field can say.
    """
    n = len(pkt)
    if n < 20 or gso_size <= 0:
        return False
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or pkt[9] != _TCP or ihl != csum_start or n > _MAX_IP_LEN:
            return False  # longer than a total length can say (RFC 791 §3.1)
        v4 = True
    elif version == 6:
        ihl = csum_start
        if ihl < 40 or n < 40 or n - 40 > _MAX_IP_LEN:
            return False  # longer than a payload length can say (RFC 8200 §3)
        v4 = False
    else:
        return False
    if n < ihl + 20:
        return False
    doff = (pkt[ihl + 12] >> 4) * 4
    hdr_len = ihl + doff
    if doff < 20 or n < hdr_len:
        return False
    payload = pkt[hdr_len:]
    plen = n - hdr_len
    if plen <= gso_size:  # nothing to split: just finish the checksum
        one = bytearray(pkt)
        _fix_lengths(one, v4, ihl, n)
        _finish_tcp(one, v4, ihl, 0)
        out.append(bytes(one))
        return True
    hdr = bytearray(pkt[:hdr_len])
    hdr[ihl + 16] = 0
    hdr[ihl + 17] = 0
    seq = _TCP_SEQ.unpack_from(hdr, ihl + 4)[0]
    flags = hdr[ihl + 13]
    ip_id = _U16.unpack_from(hdr, 4)[0] if v4 else 0
    if v4:
        src, dst = bytes(hdr[V4_SRC_AT]), bytes(hdr[V4_DST_AT])
        pseudo = pseudo_sum_v4
    else:
        src, dst = bytes(hdr[V6_SRC_AT]), bytes(hdr[V6_DST_AT])
        pseudo = pseudo_sum_v6
    n_full, last_len = divmod(plen, gso_size)
    if last_len == 0:
        n_full -= 1
        last_len = gso_size
    full_pseudo = pseudo(src, dst, _TCP, doff + gso_size)
    first = 0
    if use_numpy and _np is not None and n_full >= NUMPY_MIN_SEGMENTS:
        h = bytearray(hdr)
        if v4:
            _U16.pack_into(h, 2, hdr_len + gso_size)
            h[10] = 0
            h[11] = 0
        else:
            _U16.pack_into(h, 4, hdr_len - 40 + gso_size)
        _split_full_numpy(h, payload, ihl, gso_size, n_full, v4, ip_id, seq, flags,
                          full_pseudo, out)
        first = n_full
    last_i = n_full
    for i in range(first, n_full + 1):
        seg_plen = gso_size if i < last_i else last_len
        start = i * gso_size
        h = hdr if i == last_i else bytearray(hdr)
        if v4:
            _V4_ID_LEN.pack_into(h, 2, hdr_len + seg_plen, (ip_id + i) & 0xFFFF)
            h[10] = 0
            h[11] = 0
            _U16.pack_into(h, 10, checksum(memoryview(h)[:ihl]))
        else:
            _U16.pack_into(h, 4, hdr_len - 40 + seg_plen)
        _TCP_SEQ.pack_into(h, ihl + 4, (seq + i * gso_size) & 0xFFFFFFFF)
        f = flags if i == last_i else flags & _NOT_LAST_MASK
        if i:
            f &= ~_CWR
        h[ihl + 13] = f
        ps = full_pseudo if i < last_i else pseudo(src, dst, _TCP, doff + seg_plen)
        seg = payload[start:start + seg_plen]
        _U16.pack_into(h, ihl + 16, checksum(memoryview(h)[ihl:], (ps + partial(seg)) % 0xFFFF))
        out.append(bytes(h) + seg)
    return True


def _fix_lengths(pkt: bytearray, v4: bool, ihl: int, n: int) -> None:
    if v4:
        _U16.pack_into(pkt, 2, n)
        pkt[10] = 0
        pkt[11] = 0
        _U16.pack_into(pkt, 10, checksum(memoryview(pkt)[:ihl]))
    else:
        _U16.pack_into(pkt, 4, n - 40)


def _finish_tcp(pkt: bytearray, v4: bool, ihl: int, initial: int) -> None:
    """Compute the TCP checksum of a whole packet from scratch (RFC 9293 §3.1)."""
    pkt[ihl + 16] = 0
    pkt[ihl + 17] = 0
    tlen = len(pkt) - ihl
    if v4:
        ps = pseudo_sum_v4(bytes(pkt[V4_SRC_AT]), bytes(pkt[V4_DST_AT]), _TCP, tlen)
    else:
        ps = pseudo_sum_v6(bytes(pkt[V6_SRC_AT]), bytes(pkt[V6_DST_AT]), _TCP, tlen)
    _U16.pack_into(pkt, ihl + 16, checksum(memoryview(pkt)[ihl:], ps))


def split_frame(frame: bytes | bytearray | memoryview, out: list[bytes],
                use_numpy: bool = True) -> bool:
    """Turn one TUN read (vnet header + packet) into inner packets appended to `out`.

    Returns False (appending nothing) for a frame this code cannot handle; the caller counts
    it. GSO frames are split; NEEDS_CSUM frames get their checksum completed; others are
    copied as they are.
    """
    mv = memoryview(frame)
    if len(mv) <= VNET_HDR_LEN:
        return False
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(mv, 0)
    pkt = mv[VNET_HDR_LEN:]
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            buf = bytearray(pkt)
            if not complete_checksum(buf, csum_start, csum_offset):
                return False
            out.append(bytes(buf))
        else:
            out.append(bytes(pkt))
        return True
    if gso in (GSO_TCPV4, GSO_TCPV6):
        return tso_split(pkt, gso_size, csum_start, out, use_numpy)
    return False


def _mask(ihl: int, doff: int) -> int:
    """Header bytes a continuing segment must share with its group's first (as one int).

    Zero where segments of one run differ: IPv4 total length, identification and header
    checksum, or the IPv6 flow label's low bytes and payload length; the TCP sequence number
    and checksum. The TCP flags byte may differ only in PSH.
    """
    m = bytearray(b"\xff" * (ihl + doff))
    skip = (2, 3, 4, 5, 10, 11) if ihl == 20 else (2, 3, 4, 5)
    for i in (*skip, ihl + 4, ihl + 5, ihl + 6, ihl + 7, ihl + 16, ihl + 17):
        m[i] = 0
    m[ihl + 13] = 0xFF & ~_PSH
    return int.from_bytes(m, "big")


_MASKS: dict[tuple[int, int], int] = {}


class _Group:
    __slots__ = ("pkts", "next_seq", "size", "total", "closed", "ihl", "doff", "hl", "tmpl",
                 "mask", "v4", "tbits")

    def __init__(self, pkt: bytes, ihl: int, doff: int, seq: int) -> None:
        self.pkts = [pkt]
        self.ihl = ihl
        self.doff = doff
        self.hl = hl = ihl + doff
        self.v4 = ihl == 20
        self.tbits = doff * 8  # h >> tbits: the IPv4 header of `h`, the headers as one int
        self.size = len(pkt) - hl
        self.next_seq = (seq + self.size) & 0xFFFFFFFF
        self.total = len(pkt)
        self.closed = self.size == 0 or bool(pkt[ihl + 13] & _PSH)
        self.tmpl = int.from_bytes(pkt[:hl], "big")
        mask = _MASKS.get((ihl, doff))
        if mask is None:
            mask = _MASKS[(ihl, doff)] = _mask(ihl, doff)
        self.mask = mask

    def extends(self, p: bytes) -> int:
        """Payload size if `p` is the next segment of this (open) group, else 0."""
        n = len(p)
        hl = self.hl
        size = n - hl
        if not 0 < size <= self.size or self.total + size > _MAX_IP_LEN:
            return 0
        h = int.from_bytes(p[:hl], "big")
        if (h ^ self.tmpl) & self.mask:
            return 0
        if self.v4:
            if (p[2] << 8 | p[3]) != n or (h >> self.tbits) % 0xFFFF:
                return 0  # bad length or IPv4 header checksum (RFC 791 §3.1): goes alone
        elif (p[4] << 8 | p[5]) != n - 40:
            return 0
        if _U32.unpack_from(p, self.ihl + 4)[0] != self.next_seq:
            return 0
        return size

    def add(self, p: bytes, size: int) -> None:
        self.pkts.append(p)
        self.total += size
        self.next_seq = (self.next_seq + size) & 0xFFFFFFFF
        if size < self.size or p[self.ihl + 13] & _PSH:
            self.closed = True


def coalesce(packets: Sequence[bytes | bytearray | memoryview], out: list[bytes],
             mtu: int = 0) -> int:
    """Append TUN frames (vnet header + packet) for `packets` to `out`; return frames written.

    Consecutive segments of one TCP flow become one GSO frame (rules in the module
    docstring); everything else becomes a frame with an empty vnet header. The relative
    order of the packets of each flow is kept. Fast path: a segment that continues the
    group of the previous one is recognised by one masked integer comparison of headers.
    `mtu`: the TUN's, for a partial-checksum super-packet's gso_size (module docstring).
    """
    groups: list[_Group | bytes] = []
    open_by_key: dict[bytes, _Group] = {}
    last: _Group | None = None
    for p in packets:
        if type(p) is TunFrame or type(p) is TunFrameParts:  # framed by the core
            # (bridge/tunframe.py): as it is, in order
            groups.append(p)
            open_by_key.clear()
            last = None
            continue
        if type(p) is not bytes:
            p = bytes(p)  # keys must be hashable; bytearray/memoryview from the core
        if last is not None and not last.closed and len(p) > last.hl:
            size = last.extends(p)
            if size:
                last.add(p, size)
                continue
        # A group starts at a plain TCP packet (stack/wire/prelude.py) that also has no IPv4
        # options or reserved bit, its exact IP length, and ACK (and PSH) only: SYN, FIN,
        # RST, URG, ECE and CWR go alone. The key holds every header byte that must be equal
        # across a group's segments: version, TOS/traffic class, fragment field (DF only),
        # TTL/hop limit, protocol, addresses, ports, ack number, data offset, window, urgent
        # pointer and options.
        t = plain_tcp(p)
        if t is None:
            groups.append(p)
            last = None
            continue
        v4, ihl, doff = t
        hl = ihl + doff
        if p[ihl + 13] & 0xF7 != _ACK:
            key = None
        elif v4:
            key = p[0:2] + p[6:10] + p[12:24] + p[28:33] + p[34:36] + p[38:hl] if ihl == 20 \
                and not p[6] & 0x80 and (p[2] << 8 | p[3]) == len(p) else None
        else:
            key = p[0:2] + p[6:44] + p[48:53] + p[54:56] + p[58:hl] \
                if (p[4] << 8 | p[5]) == len(p) - 40 else None
        if key is None:
            groups.append(p)
            last = None
            continue
        g = open_by_key.get(key)
        if g is not None and not g.closed:
            size = g.extends(p)
            if size:
                g.add(p, size)
                last = g
                continue
        if ihl == 20 and not verify(p[:20]):  # RFC 791 §3.1: a damaged IPv4 header
            groups.append(p)                   # goes alone, for the kernel to drop
            last = None
            continue
        g = _Group(p, ihl, doff, _U32.unpack_from(p, ihl + 4)[0])
        open_by_key[key] = g
        groups.append(g)
        last = g
    before = len(out)
    for item in groups:
        if type(item) is TunFrame or type(item) is TunFrameParts:
            out.append(item)
        elif isinstance(item, bytes):
            out.append(_alone(item, mtu))
        elif len(item.pkts) == 1:
            out.append(_alone(item.pkts[0], mtu))
        else:
            _emit_group(item, out, mtu)
    return len(out) - before


def _alone(p: bytes, mtu: int) -> bytes:
    """The frame of a packet written on its own: an empty vnet header, or NEEDS_CSUM (and
    TCP GSO above `mtu`) when its TCP checksum was left partial (module docstring)."""
    t = plain_tcp(p)
    if t is None:
        return VNET_NONE + p
    v4, ihl, doff = t
    if v4:
        ps = pseudo_sum_v4(p[V4_SRC_AT], p[V4_DST_AT], _TCP, len(p) - ihl)
    else:
        ps = pseudo_sum_v6(p[V6_SRC_AT], p[V6_DST_AT], _TCP, len(p) - ihl)
    field = p[ihl + 16] << 8 | p[ihl + 17]
    if field != ps and field != (ps or 0xFFFF):
        return VNET_NONE + p
    hl = ihl + doff
    if hl < mtu < len(p):
        return VNET.pack(F_NEEDS_CSUM, GSO_TCPV4 if v4 else GSO_TCPV6, hl, mtu - hl, ihl,
                         16) + p
    return VNET.pack(F_NEEDS_CSUM, GSO_NONE, hl, 0, ihl, 16) + p


def _emit_group(g: _Group, out: list[bytes], mtu: int) -> None:
    """Append one GSO frame for the group, or its packets one by one if a checksum is bad."""
    ihl, doff = g.ihl, g.doff
    hl = ihl + doff
    first = g.pkts[0]
    v4 = ihl == 20 and first[0] >> 4 == 4
    total = g.total
    h = bytearray(first[:hl])
    h[ihl + 13] |= g.pkts[-1][ihl + 13] & _PSH
    if v4:
        _fix_lengths(h, True, ihl, total)
        ps = pseudo_sum_v4(first[V4_SRC_AT], first[V4_DST_AT], _TCP, total - ihl)
        gso_type = GSO_TCPV4
    else:
        _U16.pack_into(h, 4, total - 40)
        ps = pseudo_sum_v6(first[V6_SRC_AT], first[V6_DST_AT], _TCP, total - ihl)
        gso_type = GSO_TCPV6
    # NEEDS_CSUM: the field holds the folded pseudo-header sum, not its complement.
    _U16.pack_into(h, ihl + 16, ps)
    vh = VNET.pack(F_NEEDS_CSUM, gso_type, hl, g.size, ihl, 16)
    frame = b"".join([vh, h, *[memoryview(p)[hl:] for p in g.pkts]])  # the one copy
    # Aggregate verification: each intact segment sums to 0 mod 0xFFFF over pseudo-header,
    # TCP header and payload; the payloads are all even-sized but maybe the last, so their
    # joined sum equals the sum of their sums (16-bit words stay on even offsets).
    if g.size & 1:
        ok = all(_tcp_ok(p, v4, ihl) for p in g.pkts)
    else:
        n = len(g.pkts)
        pseudo = pseudo_sum_v4 if v4 else pseudo_sum_v6
        a, b = (first[V4_SRC_AT], first[V4_DST_AT]) if v4 else (first[V6_SRC_AT], first[V6_DST_AT])
        s = (_sum(memoryview(frame)[VNET_HDR_LEN + hl:])
             + _sum(b"".join([p[ihl:hl] for p in g.pkts]))
             + (n - 1) * pseudo(a, b, _TCP, doff + g.size)
             + pseudo(a, b, _TCP, len(g.pkts[-1]) - ihl))
        ok = s % 0xFFFF == 0
    if ok:
        out.append(frame)
    else:
        for p in g.pkts:
            out.append(_alone(p, mtu))


def _tcp_ok(p: bytes, v4: bool, ihl: int) -> bool:
    tlen = len(p) - ihl
    if v4:
        ps = pseudo_sum_v4(p[V4_SRC_AT], p[V4_DST_AT], _TCP, tlen)
    else:
        ps = pseudo_sum_v6(p[V6_SRC_AT], p[V6_DST_AT], _TCP, tlen)
    return partial(memoryview(p)[ihl:], ps) == 0xFFFF


def _sum(buf: bytes | memoryview) -> int:
    """One's complement sum of `buf` modulo 0xFFFF (numpy over 32-bit words when available)."""
    if _np is None:
        return partial(buf)
    n = len(buf)
    m = n & ~3
    s = int(_np.frombuffer(buf, dtype="<u4", count=m >> 2).sum(dtype=_np.uint64)) if m else 0
    v: int = swap16(s % 0xFFFF)  # RFC 1071 §2(B): byte order independence
    if m != n:
        v += int.from_bytes(bytes(buf[m:]) + bytes(4 - (n - m)), "big") % 0xFFFF
    return v

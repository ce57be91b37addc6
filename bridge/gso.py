"""Super-packets: one TCP TSO packet from the TUN, segmented and encapsulated at once.

The TUN (IFF_VNET_HDR + TUNSETOFFLOAD TSO) hands the bridge up to 64 KB of one TCP flow in
one read. Every segment cut from it has the same addresses, ports, TTL, DSCP and flow, so
the per-flow work of `Bridge.from_tun` (route lookup, loop guard, peer state, TTL check, MTU
check, flow hash) is done once for the super-packet (bridge/fastpath.py
`FastPath.send_super`), and this module builds all the datagrams: outer prefix (GRE header,
or nothing for IPIP) + inner segment.

Rules (each segment must be byte-for-byte what TSO splitting followed by the per-packet
path would send; tests/unit/bridge/test_bridge_gso.py proves it with hypothesis):
- Segmentation as TSO does it (RFC 9293 §3.1, RFC 791 §3.1, RFC 8200 §3): headers of the
  super-packet with the segment's own IPv4 total length / IPv6 payload length, IPv4
  identification + 1 per segment (RFC 6864 §4.1, what Linux does), sequence number
  seq + i * gso_size, FIN and PSH only on the last segment, CWR only on the first (RFC 3168
  §6.1.2), a complete TCP checksum (pseudo-header, RFC 9293 §3.1).
- RFC 2003 §3.1 / RFC 1812 §5.3.1: the encapsulator decrements the inner TTL / hop limit;
  the IPv4 header checksum is first computed over the segment, then patched incrementally
  for the decrement (RFC 1624 eqn. 3), exactly as the per-packet path does.
- RFC 2890 §2.2: with sequence numbers on, consecutive segments take consecutive GRE
  sequence numbers (a vector patch of the prefix).
- RFC 2784 §2.5 / §2.1: with GRE checksums on, each datagram's checksum covers its GRE header
  (checksum field zero) and the whole inner segment, as `GreEncoder.seal` computes it. The
  numpy rows get it without reading the payload again (Linux's "local checksum offload",
  Documentation/networking/checksum-offloads.rst): modulo 0xFFFF a row's words sum to
  prefix + IP header + TCP segment, where a valid IPv4 header sums to 0 and a TCP segment
  with its checksum to minus its pseudo-header sum (RFC 1071 §2, RFC 9293 §3.1); only the
  sequence number (2**16 = 1, so its value mod 0xFFFF) differs between rows. The Python row
  builder sums the datagram directly, and the tests compare the two.
- The wire stays one GRE/IPIP packet per UDP datagram; the I/O layer sends the equal-size
  datagrams with one UDP GSO sendmsg.
- The receive side (a GRO run of datagrams merged into one TUN frame) is bridge/gro.py; it
  shares this module's record layouts (`row_fields`, `counts`) and MAX_MERGED.

Theory of operation: the callers (bridge/fastpath.py) take only a plain TCP packet
(stack/wire/prelude.py `plain_tcp`: IPv4 without fragment bits, IPv6 without extension
headers) with its header lengths. `encap_segments`
builds the full-size segments as rows of one numpy array: one header template broadcast,
the payload one reshape, and only the fields that differ between rows (sequence numbers,
IPv4 ids, checksums) computed as short column vectors from per-frame constants and written
through a record view of the rows (`row_fields`). numpy costs microseconds per call and
little per byte, so the call count is what is kept low; only the payload is summed, once
(the `stack.wire.checksum` identities, RFC 1071 §2(B)). One copy comes out of numpy; the
short last segment (and everything, with `use_numpy=False` or few segments) goes through
the pure-Python row builder, which calls `stack.wire.checksum`. The numpy and Python paths
give equal bytes (tested).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, final

from stack.wire.checksum import (
    checksum,
    incremental_update16,
    partial,
    pseudo_sum_v4,
    pseudo_sum_v6,
)
from stack.wire.prelude import (
    V4_DST_AT,
    V4_SRC_AT,
    V6_DST_AT,
    V6_SRC_AT,
)

try:  # numpy is a declared dependency; without it everything takes the Python path
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

__all__ = ["SuperPacket", "UdpRun", "encap_segments", "row_fields", "counts",
           "NUMPY_MIN_SEGMENTS", "MAX_MERGED", "CACHE_MAX"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_TCP = 6
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80
_NOT_LAST = 0xFF & ~(_FIN | _PSH)
NUMPY_MIN_SEGMENTS = 4  # below this, numpy's per-call overhead costs more than it saves
# The longest packet `coalesce_rows` merges, IP header included: an IPv4 total length is 16
# bits (RFC 791 §3.1); IPv6 (whose payload length alone is 16 bits, RFC 8200 §3) is held
# to the same, as the TUN coalescer does (bridge/io/offload.py), so both paths group alike.
MAX_MERGED = 0xFFFF


@final
class SuperPacket:
    """A TCP TSO frame read from the TUN, handed to `Bridge.from_tun` among the packets.

    `frame[offset:]` is the IP packet; `split(out)` is the I/O layer's TSO splitter (the
    core's fallback: it appends the segments to `out`, False for a frame it cannot handle).
    """

    __slots__ = ("frame", "offset", "gso_size", "splitter")

    def __init__(self, frame: bytes, offset: int, gso_size: int,
                 splitter: Callable[[bytes, list[bytes]], bool]) -> None:
        self.frame = frame
        self.offset = offset
        self.gso_size = gso_size
        self.splitter = splitter

    def packet(self) -> memoryview:
        return memoryview(self.frame)[self.offset:]

    def split(self, out: list[bytes]) -> bool:
        return self.splitter(self.frame, out)


def _row(prefix: bytes, seq_at: int, gseq: int, hdr: bytearray, payload: memoryview,
         v4: bool, ihl: int, doff: int, ip_id: int, tseq: int, flags: int, src: bytes,
         dst: bytes, csum_at: int = -1) -> bytes:
    """One datagram built in Python: prefix + segment header + payload (hdr is scratch).
    With `csum_at` >= 0 (the GRE checksum field in `prefix`, which reads zero there) the
    GRE checksum over the whole datagram (RFC 2784 §2.5) is filled in."""
    hl = ihl + doff
    plen = len(payload)
    h = hdr
    if v4:
        _U16.pack_into(h, 2, hl + plen)
        _U16.pack_into(h, 4, ip_id & 0xFFFF)
        h[10] = h[11] = 0
        _U16.pack_into(h, 10, checksum(memoryview(h)[:ihl]))
    else:
        _U16.pack_into(h, 4, hl - 40 + plen)
    _U32.pack_into(h, ihl + 4, tseq & 0xFFFFFFFF)
    h[ihl + 13] = flags
    h[ihl + 16] = h[ihl + 17] = 0
    ps = (pseudo_sum_v4 if v4 else pseudo_sum_v6)(src, dst, _TCP, doff + plen)
    pp = partial(payload)
    _U16.pack_into(h, ihl + 16, checksum(memoryview(h)[ihl:], (ps + pp) % 0xFFFF))
    if v4:  # RFC 1624: the TTL decrement patched into the fresh header checksum
        ttl = h[8]
        old = (ttl << 8) | h[9]
        h[8] = ttl - 1
        _U16.pack_into(h, 10, incremental_update16(_U16.unpack_from(h, 10)[0], old,
                                                   old - 0x100))
    else:
        h[7] -= 1
    if seq_at >= 0 or csum_at >= 0:
        pre = bytearray(prefix)
        if seq_at >= 0:
            _U32.pack_into(pre, seq_at, gseq & 0xFFFFFFFF)
        if csum_at >= 0:  # prefix and header lengths are even: the partial sums add up
            _U16.pack_into(pre, csum_at, checksum(pre, (partial(h) + pp) % 0xFFFF))
        return bytes(pre + h + payload)
    return b"".join((prefix, h, payload))


class UdpRun(bytearray):
    """Equal-size datagrams of `seg` bytes back to back (the last may be shorter), one item
    of `Output.udp` standing for all of them: the I/O layer sends it with UDP GSO as it is
    (no per-datagram objects, no join). `datagrams()` cuts it. A bytearray so that numpy
    builds the rows in it directly (no copy out); nothing changes it after the core but
    the sealing of a run built with room (`head` > 0, `encap_segments(room=...)`): each
    row of `seg` bytes then holds its datagram at row[head:len - tail], the secure header
    and tag around it to be written in place (bridge/securelink.py), and head is 0 again
    once they are."""

    __slots__ = ("seg", "head")

    def __init__(self, data: int | bytes | bytearray = 0, seg: int = 0, head: int = 0) -> None:
        super().__init__(data)
        self.seg = seg
        self.head = head

    def datagrams(self) -> list[bytes]:
        s = self.seg
        return [bytes(self[o:o + s]) for o in range(0, len(self), s)]


def encap_segments(pkt: memoryview, v4: bool, ihl: int, doff: int, gso_size: int,
                   prefix: bytes, seq_at: int, gseq: int, out: list[bytes | bytearray],
                   use_numpy: bool = True, run: bool = False, csum_at: int = -1,
                   room: tuple[int, int] = (0, 0)) -> int:
    """Append one datagram per segment of `pkt` (prefix + TSO segment, TTL decremented) to
    `out`; return how many. `seq_at` is the offset of the GRE sequence number in `prefix`
    (-1: none), `gseq` the first one to use; `csum_at` the offset of the GRE checksum
    (-1: none; whatever `prefix` holds there is ignored). The caller checked TTL > 1 and
    the sizes. With `run`, the numpy path appends one `UdpRun` holding all the datagrams;
    `room` (head, tail) then leaves that many free bytes before and after each datagram
    in it (`UdpRun.head`: a secure header and tag sealed in place, no second buffer).
    Other items never have room.
    """
    if csum_at >= 0:
        prefix = prefix[:csum_at] + b"\0\0" + prefix[csum_at + 2:]
    hl = ihl + doff
    plen = len(pkt) - hl
    hdr = bytearray(pkt[:hl])
    tseq = _U32.unpack_from(hdr, ihl + 4)[0]
    flags = hdr[ihl + 13]
    ip_id = _U16.unpack_from(hdr, 4)[0] if v4 else 0
    src, dst = (bytes(hdr[V4_SRC_AT]), bytes(hdr[V4_DST_AT])) if v4 else \
        (bytes(hdr[V6_SRC_AT]), bytes(hdr[V6_DST_AT]))
    if plen <= gso_size:
        out.append(_row(prefix, seq_at, gseq, hdr, pkt[hl:], v4, ihl, doff, ip_id, tseq,
                        flags, src, dst, csum_at))
        return 1
    n_full, last_len = divmod(plen, gso_size)
    if last_len == 0:
        n_full -= 1
        last_len = gso_size
    first = 0
    if use_numpy and _np is not None and n_full >= NUMPY_MIN_SEGMENTS:
        if _rows_numpy(pkt, v4, ihl, doff, gso_size, n_full, prefix, seq_at, gseq, hdr, tseq,
                       flags, ip_id, src, dst, out, last_len if run else 0, csum_at, room):
            return n_full + 1
        first = n_full
    for i in range(first, n_full + 1):
        start = hl + i * gso_size
        last = i == n_full
        f = flags if last else flags & _NOT_LAST
        if i:
            f &= ~_CWR
        out.append(_row(prefix, seq_at, gseq + i, bytearray(hdr),
                        pkt[start:start + (last_len if last else gso_size)], v4, ihl, doff,
                        ip_id + i, tseq + i * gso_size, f, src, dst, csum_at))
    return n_full + 1


def _rows_numpy(pkt: memoryview, v4: bool, ihl: int, doff: int, g: int, rows: int,
                prefix: bytes, seq_at: int, gseq: int, hdr0: bytearray, tseq: int,
                flags: int, ip_id: int, src: bytes, dst: bytes,
                out: list[bytes | bytearray], last_len: int = 0,
                csum_at: int = -1, room: tuple[int, int] = (0, 0)) -> bool:
    """The `rows` full-size datagrams at once, one numpy row each (see the module doc).
    With `last_len` (the last segment's payload) and even-size rows, one UdpRun of all,
    the last datagram included (`_last_row`): returns True then, else False. `room`
    (head, tail): the run's rows are head + width + tail bytes, each datagram at head.

    numpy's cost here is per call (microseconds each), not per byte, so the rows share one
    header template and only the fields that differ between rows are computed, as
    46-element vectors, from per-frame constants (all sums modulo 0xFFFF, RFC 1071 §2):
    - TCP checksum: pseudo-header + template header + the row's sequence number (2**16 = 1,
      so its value) + the row's payload words. The payload is summed as little-endian
      words straight from the rows, and a little-endian sum is 256 times the big-endian one
      (a byte swap is a multiplication by 256 modulo 0xFFFF, and 256 * 256 = 1).
    - IPv4 header checksum: the template's sum + the row's identification, then the TTL
      decrement as RFC 1624 eqn. 3 applies it, folded into one constant.
    A sum S > 0 folds to the `partial` value ((S - 1) mod 0xFFFF) + 1, so a field
    ~partial reads 0xFFFE - (S - 1) mod 0xFFFF: the bytes of the per-packet path."""
    np = _np
    hl = ihl + doff
    p = len(prefix)  # 0 (IPIP) or 4..16 (GRE)
    width = p + hl + g
    w4 = width + (g & 1)  # TCP part summed in 16-bit words: pad an odd one with a zero
    t = p + ihl
    hdr = bytearray(hdr0)  # the segments' header before the TTL decrement
    if v4:
        _U16.pack_into(hdr, 2, hl + g)
        hdr[4] = hdr[5] = hdr[10] = hdr[11] = 0
    else:
        _U16.pack_into(hdr, 4, hl - 40 + g)
    hdr[ihl + 4:ihl + 8] = b"\0\0\0\0"
    hdr[ihl + 16] = hdr[ihl + 17] = 0
    common = flags & _NOT_LAST & ~_CWR
    hdr[ihl + 13] = common
    ps = (pseudo_sum_v4 if v4 else pseudo_sum_v6)(src, dst, _TCP, doff + g)
    kt = ps + partial(memoryview(hdr)[ihl:]) - 1  # TCP: all but sequence number and payload
    tpl = bytearray(prefix) + hdr  # the row template, TTL / hop limit decremented
    if v4:
        k_ip = partial(memoryview(hdr)[:ihl]) - 1  # IPv4: all but the identification
        old = (hdr[8] << 8) | hdr[9]
        k_ip += ((~old) & 0xFFFF) + (old - 0x100)  # RFC 1624 eqn. 3, the TTL decrement
        tpl[p + 8] -= 1
    else:
        tpl[p + 7] -= 1
    flat_run = last_len > 0 and w4 == width
    head, tail = room if flat_run else (0, 0)
    full = head + width + tail  # a row of the run, room included
    if flat_run:
        run = UdpRun(rows * full + head + p + hl + last_len + tail, full, head)
        flat = np.frombuffer(run, dtype=np.uint8, count=rows * full)  # numpy writes in it
        a = flat.reshape(rows, full)[:, head:head + width]
        f = np.ndarray((rows,), row_fields(w4, p, ihl, seq_at, v4), run, head, (full,))
    else:
        flat = np.zeros(rows * w4, dtype=np.uint8)
        a = flat.reshape(rows, w4)
        f = np.ndarray((rows,), row_fields(w4, p, ihl, seq_at, v4), flat)  # varying fields
    a[:, :p + hl] = np.frombuffer(tpl, dtype=np.uint8)
    a[:, p + hl:width] = np.frombuffer(pkt, dtype=np.uint8, count=rows * g,
                                       offset=hl).reshape(rows, g)
    idx = counts(rows)  # uint32: sums below wrap modulo 2**32 as sequence numbers do
    seq = counts(rows, g) + tseq
    f["ts"] = seq
    words = np.add.reduce(a[:, p + hl:w4].view("<u2"), axis=1, dtype=np.uint32)
    tsum = np.multiply(words, 256, dtype=np.uint64)
    tsum += seq
    tsum += kt
    if flags & _CWR:
        tsum[0] += _CWR  # CWR stays on the first segment only
        a[0, t + 13] = common | _CWR
    f["tc"] = 0xFFFE - tsum % 0xFFFF
    if v4:
        ids = (idx + ip_id) & 0xFFFF
        f["id"] = ids
        ids += k_ip
        f["ic"] = 0xFFFE - ids % 0xFFFF
    gs = None
    if seq_at >= 0:
        gs = idx + (gseq & 0xFFFFFFFF)
        f["gs"] = gs
    if csum_at >= 0:
        _gre_csums(a, prefix, seq_at, gs, csum_at, v4, hdr, ps)
    if flat_run:
        del a, f, flat  # no numpy view of the run outlives this call
        _last_row(run, rows * full + head, tpl, pkt[hl + rows * g:], v4, p, ihl, doff, seq_at,
                  (gseq + rows) & 0xFFFFFFFF, (tseq + rows * g) & 0xFFFFFFFF,
                  flags & ~_CWR, (ip_id + rows) & 0xFFFF, src, dst, csum_at)
        out.append(run)
        return True
    b = flat.tobytes()  # one copy out of numpy, then one slice per datagram
    out.extend([b[i:i + width] for i in range(0, rows * w4, w4)])
    return False


def _last_row(run: UdpRun, at: int, tpl: bytearray, payload: memoryview, v4: bool, p: int,
              ihl: int, doff: int, seq_at: int, gseq: int, tseq: int, flags: int, ip_id: int,
              src: bytes, dst: bytes, csum_at: int) -> None:
    """The last datagram of a run, written at `run[at:]` from the rows' template (prefix +
    header, TTL already decremented): its own lengths, sequence numbers, flags, id and
    checksums, the bytes `_row` would build (the per-packet path's, RFC 1624 included)."""
    n = len(payload)
    hl = ihl + doff
    t = at + p + ihl
    end = at + p + hl + n  # the run may go on (room for a secure tag)
    run[at:at + p + hl] = tpl
    run[at + p + hl:end] = payload
    if seq_at >= 0:
        _U32.pack_into(run, at + seq_at, gseq)
    _U32.pack_into(run, t + 4, tseq)
    run[t + 13] = flags
    mv = memoryview(run)
    if v4:
        _U16.pack_into(run, at + p + 2, hl + n)
        _U16.pack_into(run, at + p + 4, ip_id)
        # the checksum of the header before the TTL decrement (TTL is the high byte of the
        # word at 8: + 0x100), then RFC 1624 eqn. 3 for the decrement, as `_row` does
        old = ((run[at + p + 8] + 1) << 8) | run[at + p + 9]
        s = partial(mv[at + p:t]) + 0x100 - 1
        s = s % 0xFFFF + 1 + ((~old) & 0xFFFF) + (old - 0x100)
        _U16.pack_into(run, at + p + 10, 0xFFFE - (s - 1) % 0xFFFF)
        ps = pseudo_sum_v4(src, dst, _TCP, doff + n)
    else:
        _U16.pack_into(run, at + p + 4, hl - 40 + n)
        ps = pseudo_sum_v6(src, dst, _TCP, doff + n)
    _U16.pack_into(run, t + 16, checksum(mv[t:end], ps))
    if csum_at >= 0:  # RFC 2784 §2.5: over the whole datagram, the field zero
        _U16.pack_into(run, at + csum_at, checksum(mv[at:end]))


_COUNTS: dict[tuple[int, int], Any] = {}
_FIELDS: dict[tuple[int, int, int, int, bool], Any] = {}
# The layout caches are keyed by sizes a peer chooses (segment size, header lengths): each is
# emptied when it reaches this many entries, so a peer cycling through sizes costs us CPU to
# rebuild entries, never memory (a handful of layouts is live in real traffic).
CACHE_MAX = 256


def counts(rows: int, step: int = 1) -> Any:
    """0, step, 2 * step, ... (rows of them) as uint32, made once per (rows, step)."""
    a = _COUNTS.get((rows, step))
    if a is None:
        if len(_COUNTS) >= CACHE_MAX:
            _COUNTS.clear()
        a = _COUNTS[(rows, step)] = (_np.arange(rows, dtype=_np.uint64) * step
                                     ).astype(_np.uint32)
        a.flags.writeable = False
    return a


def row_fields(width: int, p: int, ihl: int, seq_at: int, v4: bool) -> Any:
    """A numpy record type over one datagram row naming the fields that differ between
    rows, so each is written with one call: TCP sequence number and checksum, IPv4
    identification and header checksum, GRE sequence number (RFC 2890 §2.2)."""
    key = (width, p, ihl, seq_at, v4)
    dt = _FIELDS.get(key)
    if dt is None:
        if len(_FIELDS) >= CACHE_MAX:
            _FIELDS.clear()
        t = p + ihl
        fields = {"ts": (">u4", t + 4), "tc": (">u2", t + 16)}
        if v4:
            fields.update(id=(">u2", p + 4), ic=(">u2", p + 10))
        if seq_at >= 0:
            fields["gs"] = (">u4", seq_at)
        dt = _FIELDS[key] = _np.dtype({"names": list(fields),
                                       "formats": [v[0] for v in fields.values()],
                                       "offsets": [v[1] for v in fields.values()],
                                       "itemsize": width})
    return dt


def _gre_csums(a: Any, prefix: bytes, seq_at: int, gs: Any, csum_at: int, v4: bool,
               hdr: bytearray, ps: int) -> None:
    """Fill the GRE checksum column of the finished rows `a` (RFC 2784 §2.5) by the
    identity of the module doc: row sum = prefix (sequence number apart) + IP header (0 for
    IPv4, the same for every row for IPv6) + TCP segment (-ps) + the row's sequence number.
    The field gets (-sum) mod 0xFFFF, which is what `GreEncoder.seal` stores."""
    np = _np
    pre = bytearray(prefix)
    if seq_at >= 0:
        pre[seq_at:seq_at + 4] = bytes(4)
    k = partial(pre) + 0xFFFF - ps
    if not v4:  # the IPv6 header as on the wire: the hop limit decremented
        h6 = bytearray(hdr[:40])
        h6[7] -= 1
        k += partial(h6)
    if gs is None:
        a[:, csum_at:csum_at + 2] = np.frombuffer(_U16.pack((0xFFFF - k % 0xFFFF) % 0xFFFF),
                                                  dtype=np.uint8)
        return
    c = (0xFFFF - (gs.astype(np.uint64) + k) % 0xFFFF) % 0xFFFF  # gs: uint32, k: up to 2**18
    a[:, csum_at:csum_at + 2] = c.astype(">u2").view(np.uint8).reshape(len(c), 2)

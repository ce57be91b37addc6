"""GRO batches: a run of datagrams from one peer, checked and merged into one TUN frame.

UDP GRO (udp(7) UDP_GRO) hands the receive side several equal-size datagrams of one source
in one buffer (`GroBatch`). When they carry consecutive segments of one TCP flow, the
bridge writes them to the TUN as one GSO frame (`coalesce_rows` -> `TunFrame`), as Linux
GRO merges segments before TCP sees them. The send side, one TSO frame cut into datagrams,
is bridge/gso.py; both share its numpy record layouts (`row_fields`, `counts`).

Rules (what Linux GRO requires, and what the per-packet path would have checked):
- Every datagram of the run has the same outer prefix but for the GRE sequence number,
  which must count up by one (RFC 2890 §2.2), and the GRE checksum (RFC 2784 §2.5), which
  must be right; the inner headers are equal but for IPv4 identification and checksum, TCP
  sequence number and checksum (like Linux GRO, so merging changes nothing a receiver
  sees), the TCP sequence numbers contiguous, flags ACK only (PSH allowed on the last).
- Every IPv4 header checksum and every TCP checksum (with pseudo-header, RFC 9293 §3.1) is
  verified before merging; the merged packet carries the pseudo-header sum in its TCP
  checksum field (virtio NEEDS_CSUM), so a damaged segment must never be hidden in it.
- A merged packet is at most MAX_MERGED (65,535) bytes, its IP header included (RFC 791
  §3.1: the IPv4 total length is 16 bits; IPv6 held to the same): datagrams that would not
  fit are left to the next run or the per-packet path, never a wrapped length.
- Except a run for a terminated flow's server leg (`leg`, given only by a caller that
  checked the run's 4-tuple is a live splice's, bridge/fastpath.py): it never reaches a
  TUN, so it is a `LegRun` (bridge/tunframe.py: the merged IP + TCP header, and the
  payload as one `bytes` gathered from the rows in one copy, which the leg's receive queue
  keeps as it is) of up to LEG_RUN_MAX bytes: one call merges a whole joined receive
  buffer, so numpy's fixed cost per call is paid once per buffer, not per 64 KB, and the
  payload is copied once instead of three times (frame, TunFrame, the leg's join). Over
  65,535 bytes its IPv4 total length (IPv6 payload length) is 0, as Linux marks a BIG TCP
  packet. A shorter last datagram does not join a LegRun (it follows on its own). A
  LegRun is not ended by PSH (a Linux sender marks the last segment of every TSO frame, so
  ending there cut each receive buffer into 64 KB runs and paid the per-run work, numpy's
  fixed cost and the leg's, three times; the merged header keeps PSH if any row had it),
  nor by newer timestamps (RFC 7323 §3, NOP NOP TS as the first option): TSval may differ
  between rows but never goes back from one row to the next and stays within 2**24 ticks
  ahead of the first row's (steps that each look newer modulo 2**32 can add up to an older
  one), so every row would have passed PAWS (RFC 7323 §5.3) where the first does, unless
  the first is itself nearly 2**31 ahead of TS.Recent. The merged header carries the first
  row's TSval, what the leg would have echoed anyway (§4.3: TS.Recent takes the TSval of
  the first segment after the last ACK sent). TSecr may differ too: the rows' ACK fields are
  equal, so no row but the first could have given an RTT sample (§4.2: only an ACK of new
  data), and the merged header carries the first row's.
- Nothing raises on a peer's bytes: a run that does not merge returns None and the caller
  takes the datagrams one by one.

Theory of operation: all rows are checked with a handful of whole-array numpy calls (a
cached mask and record view per layout, `_coalesce_layout`); an IPv4 header is intact when
its id + checksum equals row 0's, whose header was checked; TCP checksums by the RFC 1071
identities of stack/wire/checksum.py (a row's words sum, modulo 0xFFFF, to its pseudo-header
complement when intact); GRE checksums by the identity in bridge/gso.py's docstring. The
layout caches are bounded (CACHE_MAX), so a peer cycling through sizes costs CPU, never
memory.
"""

from __future__ import annotations

import struct
from typing import Any, final

from bridge.gso import CACHE_MAX, MAX_MERGED, counts, row_fields
from bridge.tunframe import LegRun, TunFrame
from stack.wire.checksum import checksum, partial, pseudo_sum_v4, pseudo_sum_v6, swap16
from stack.wire.ip import V4_DST, V4_SRC, V6_DST, V6_SRC
from stack.wire.prelude import (
    V4_DST_END,
    V4_SRC_END,
    V6_DST_END,
    V6_SRC_END,
)
from stack.wire.vnet import F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, VNET, VNET_HDR_LEN

try:  # numpy is a declared dependency; without it the per-packet path takes every datagram
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

__all__ = ["GroBatch", "coalesce_rows", "LEG_RUN_MAX"]

# The longest run merged for a terminated flow's server leg (module rules): a few joined
# GRO buffers (bridge/io/udp.py JOIN_MAX), bounded so one call's arrays stay small.
LEG_RUN_MAX = 1 << 20

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_TCP = 6

def _coalesce_layout(seg: int, off: int, ihl: int, doff: int, gseq_at: int, csum_at: int,
                     v4: bool, ts_at: int = -1) -> tuple[Any, Any]:
    """For `coalesce_rows`, made once per layout: the mask of the header bytes that must be
    equal in every row, and the sending side's record type of the per-row fields
    (`_row_fields`: TCP sequence number, IPv4 identification and checksum, GRE sequence
    number; the TCP checksum field goes unused here). `ts_at` >= 0 (a server leg's run
    whose rows carry the timestamp option there, module rules): its TSval and TSecr are
    left out of the mask (the caller checks that they never go back)."""
    key = (seg, off, ihl, doff, gseq_at, csum_at, v4, ts_at)
    got = _LAYOUTS.get(key)
    if got is None:
        if len(_LAYOUTS) >= CACHE_MAX:
            _LAYOUTS.clear()
        np = _np
        t = off + ihl
        n8 = -(-(t + doff) // 8) * 8  # compared as 64-bit words; the payload bytes masked
        mask = np.zeros(n8, dtype=np.uint8)
        mask[:t + doff] = 0xFF
        if gseq_at >= 0:
            mask[gseq_at:gseq_at + 4] = 0
        if csum_at >= 0:
            mask[csum_at:csum_at + 2] = 0
        mask[t + 4:t + 8] = 0
        mask[t + 13] = 0xF7  # flags: row 0's (ACK, checked first) but for PSH
        mask[t + 16:t + 18] = 0
        if v4:
            mask[off + 4:off + 6] = 0
            mask[off + 10:off + 12] = 0
        if ts_at >= 0:
            mask[ts_at:ts_at + 8] = 0
        mask.flags.writeable = False
        got = _LAYOUTS[key] = (mask, row_fields(seg, off, ihl, gseq_at, v4))
    return got


_LAYOUTS: dict[tuple[int, int, int, int, int, int, bool, int], tuple[Any, Any]] = {}


_ACK = 0x10
_TS_FIRST = b"\x01\x01\x08\x0a"  # NOP, NOP, timestamps (RFC 7323 Appendix A layout)


@final
class GroBatch:
    """Datagrams of one source glued by UDP GRO (udp(7) UDP_GRO): `buf` holds equal-size
    datagrams of `seg` bytes (the last may be shorter). Handed to `Bridge.from_udp` as the
    payload of a (payload, addr) pair; `split()` gives the datagrams one by one."""

    __slots__ = ("buf", "seg")

    def __init__(self, buf: bytes | bytearray, seg: int) -> None:
        self.buf = buf  # a bytearray from the UDP adapter, which may join consecutive batches
        self.seg = seg

    def split(self) -> list[bytes | bytearray]:
        b, s = self.buf, self.seg
        if s <= 0:  # no segment size: one datagram, as `Bridge.from_udp` takes it
            return [b]
        return [b[o:o + s] for o in range(0, len(b), s)]

    def count(self) -> int:
        """How many datagrams `split()` gives, without cutting them."""
        return 1 if self.seg <= 0 else -(-len(self.buf) // self.seg)


def coalesce_rows(buf: bytes | bytearray, start: int, seg: int, off: int, gseq_at: int,
                  v4: bool, ihl: int, doff: int, csum_at: int = -1, leg: bool = False,
                  max_rows: int = 0) -> tuple[TunFrame | LegRun, int, int, int] | None:
    """Merge the longest run of datagrams of `seg` bytes from `buf[start:]` (encapsulation
    header of `off` bytes, then one TCP segment each) into one TUN frame (bridge/tunframe.py:
    virtio-net header, GSO TCPV4/TCPV6 with gso_size = the segments' payload, NEEDS_CSUM,
    then the merged packet with the lengths of the whole and the pseudo-header sum in the TCP
    checksum field). Returns (frame, datagrams merged, last GRE sequence number or -1, bytes
    consumed), or None when not even the first two datagrams make a run. A shorter datagram
    after all the rows (GRO's run end) joins if it continues the run. The merged packet is
    at most MAX_MERGED bytes (`leg`: a `LegRun` of up to LEG_RUN_MAX, module rules): the
    rows are capped to fit, and a tail that would not fit is left (for the next run, or
    the per-packet path). `max_rows` > 0 caps the rows looked at (bridge/fastpath.py
    `expand`: after a run that broke early, the next call need not check the whole rest
    of the buffer, which made a lossy path's many short runs cost quadratic work).

    The rules of the per-packet path plus TUN coalescing, checked over all rows at once (a
    row breaking one ends the run before it): encapsulation headers equal but for the GRE
    sequence number, which must count up by one (RFC 2890 §2.2), and the GRE checksum at
    `csum_at` (-1: none), which must be intact (RFC 2784 §2.5); inner headers equal but for
    IPv4 identification and checksum, TCP sequence number and checksum (like Linux GRO, so
    a changed window or timestamp ends a run); exact IP lengths (no padding); contiguous TCP
    sequence numbers; ACK-only segments, PSH ends a run (it is kept on the merged packet;
    a LegRun's rows may differ in PSH, TSecr and, never going back, TSval: module rules);
    every IPv4 header checksum and every TCP checksum (with pseudo-header, RFC 9293 §3.1)
    intact, since the kernel will not check a NEEDS_CSUM packet.
    """
    if _np is None:
        return None
    np = _np
    hl = ihl + doff
    plen = seg - off - hl
    max_merged = LEG_RUN_MAX if leg else MAX_MERGED
    rows = min((len(buf) - start) // seg, (max_merged - hl) // max(plen, 1))
    if 0 < max_rows < rows:
        rows = max(max_rows, 2)
    if rows < 2 or plen <= 0 or (seg - off - ihl) & 1 or ihl & 1:
        return None
    ln_at = start + off + (2 if v4 else 4)
    if int.from_bytes(buf[ln_at:ln_at + 2], "big") != (seg - off if v4 else seg - off - 40):
        return None  # padded or short: the per-packet path decides
    if v4 and partial(buf[start + off:start + off + ihl]) != 0xFFFF:
        return None  # the first row's IPv4 header checksum (the others: below)
    t = off + ihl  # before any numpy: do the first two rows make a run? (a lossy path's
    f0 = start + t  # many one-row runs made a third of the calls cost the whole setup)
    if buf[f0 + 13] != _ACK or (_U32.unpack_from(buf, f0 + seg + 4)[0]
                                - _U32.unpack_from(buf, f0 + 4)[0]) & 0xFFFFFFFF != plen:
        return None  # not ACK-only (PSH ends a run with its row), or row 1 does not follow
    flat = np.frombuffer(buf, dtype=np.uint8, count=rows * seg, offset=start)
    a = flat.reshape(rows, seg)
    ts_at = f0 + 24 - start if leg and doff >= 32 and buf[f0 + 20:f0 + 24] == _TS_FIRST else -1
    mask, dt = _coalesce_layout(seg, off, ihl, doff, gseq_at, csum_at, v4, ts_at)
    f = np.ndarray((rows,), dt, flat)  # the fields that differ between rows, by name
    if len(mask) <= seg:  # headers as 64-bit words (the mask padded with zeros)
        h = a[:, :len(mask)].view("<u8")
        bad = np.logical_or.reduce((h ^ h[0]) & mask.view("<u8"), axis=1)
    else:  # segments of a few bytes
        h = a[:, :off + hl]
        bad = np.logical_or.reduce((h ^ h[0]) & mask[:off + hl], axis=1)
    fl = a[:, t + 13]  # ACK, or ACK + PSH: the mask held every other flag to row 0's
    idx = counts(rows)
    ts = f["ts"]
    tseq0 = int(ts[0])
    bad |= (ts - counts(rows, plen)) != tseq0  # uint32: modulo 2**32
    gs = None
    if gseq_at >= 0:
        gs = f["gs"]
        bad |= (gs - idx) != int(gs[0])
    if ts_at >= 0:  # TSval never goes back, and stays near row 0's (module rules: PAWS)
        tv = a[:, ts_at:ts_at + 4].view(">u4")[:, 0]
        bad[1:] |= (tv[1:] - tv[:-1]) >= 0x80000000
        bad |= (tv - tv[0]) >= 1 << 24  # uint32: modulo 2**32
    if v4:  # equal headers but for id and checksum: intact iff id + checksum is row 0's
        ic = f["id"].astype(np.uint32)
        ic += f["ic"]
        bad |= ic % 0xFFFF != int(ic[0]) % 0xFFFF
        ip = start + off
        src, dst = bytes(buf[ip + V4_SRC:ip + V4_SRC_END]), bytes(buf[ip + V4_DST:ip + V4_DST_END])
        ps = pseudo_sum_v4(src, dst, _TCP, seg - t)
    else:
        ip = start + off
        src, dst = bytes(buf[ip + V6_SRC:ip + V6_SRC_END]), bytes(buf[ip + V6_DST:ip + V6_DST_END])
        ps = pseudo_sum_v6(src, dst, _TCP, seg - t)
    sums = np.add.reduce(a[:, t:].view("<u2"), axis=1, dtype=np.uint32)  # < 2**31 (< 64 KB)
    sums += swap16(ps)
    bad |= sums % 0xFFFF != 0  # intact: the sum is "negative zero" (RFC 1071)
    if csum_at >= 0:  # a row whose IP and TCP sums pass sums to prefix + IPv6 header - ps
        k = 0xFFFF - swap16(ps) % 0xFFFF
        if not v4:
            k += swap16(partial(buf[start + off:start + t]))
        bad |= (a[:, :off].view("<u2").sum(axis=1, dtype=np.uint64) + k) % 0xFFFF != 0
    k = int(bad.argmax())  # the first bad row (numpy's .any() and flatnonzero cost more)
    if not bad[k]:
        k = rows
    if leg:  # PSH ends no server leg's run; the merged header keeps it if a row had it
        if k < 2:
            return None
        last_flags = int(fl[:k].max())
    else:
        psh = fl[:k] & 0x08
        j = int(psh.argmax()) if k else 0
        if k and psh[j]:
            k = j + 1  # PSH ends the run with its row
        if k < 2:
            return None
        last_flags = int(fl[k - 1])
    last_gseq = int(gs[k - 1]) if gs is not None else -1
    used = k * seg
    # A shorter last datagram (GRO ends a run with it) joins if it continues the run and
    # the merged packet still fits MAX_MERGED; else it goes on alone (the per-packet path).
    end_at = start + used
    tail = len(buf) - end_at
    tplen = tail - off - hl
    if k == rows and tail and not leg and last_flags == _ACK and 0 < tplen < plen and \
            hl + k * plen + tplen <= max_merged and _tail_ok(
            buf, end_at, a[0, :off + hl], mask[:off + hl], v4, off, ihl, tail, src, dst,
            (tseq0 + k * plen) & 0xFFFFFFFF, last_gseq, csum_at >= 0):
        last_flags = buf[end_at + t + 13]
        if last_gseq >= 0:
            last_gseq = (last_gseq + 1) & 0xFFFFFFFF
        used += tail
    else:
        tplen = 0
    rows = k
    a = a[:k]
    total = hl + rows * plen + tplen
    hdr = bytearray(buf[start + off:start + off + hl])
    hdr[ihl + 13] = last_flags
    big = total > MAX_MERGED  # a server leg's run only: length 0, as BIG TCP (module rules)
    if v4:
        _U16.pack_into(hdr, 2, 0 if big else total)
        hdr[10] = hdr[11] = 0
        _U16.pack_into(hdr, 10, checksum(memoryview(hdr)[:ihl]))
    else:
        _U16.pack_into(hdr, 4, 0 if big else total - 40)
    if leg:  # the header, and the payload gathered from the rows in one copy (module rules)
        return LegRun(hdr, a[:, off + hl:].tobytes(), plen), k, last_gseq, used
    out = bytearray(VNET_HDR_LEN + total)
    o = np.frombuffer(out, dtype=np.uint8)
    end = VNET_HDR_LEN + hl + rows * plen
    o[VNET_HDR_LEN + hl:end].reshape(rows, plen)[:] = a[:, off + hl:]  # one strided copy
    if tplen:
        out[end:] = buf[len(buf) - tplen:]
    tps = pseudo_sum_v4(src, dst, _TCP, total - ihl) if v4 \
        else pseudo_sum_v6(src, dst, _TCP, total - ihl)
    _U16.pack_into(hdr, ihl + 16, tps)  # NEEDS_CSUM: the folded pseudo-header sum
    out[VNET_HDR_LEN:VNET_HDR_LEN + hl] = hdr
    VNET.pack_into(out, 0, F_NEEDS_CSUM, GSO_TCPV4 if v4 else GSO_TCPV6, hl, plen, ihl, 16)
    return TunFrame(out), k + (tplen > 0), last_gseq, used


def _tail_ok(buf: bytes | bytearray, at: int, h0: Any, mask: Any, v4: bool, off: int, ihl: int,
             tail: int, src: bytes, dst: bytes, tseq: int, last_gseq: int,
             gre_csum: bool = False) -> bool:
    """The short last datagram at `buf[at:]` continues the run: same headers under `mask`,
    exact length, the next TCP (and GRE) sequence number, intact checksums (GRE's too, with
    `gre_csum`, by the identity of `coalesce_rows`), ACK or ACK+PSH."""
    np = _np
    n = len(h0)
    th = np.frombuffer(buf, dtype=np.uint8, count=n, offset=at)
    mask = mask.copy()
    ln = off + 2 if v4 else off + 4
    mask[ln:ln + 2] = 0  # its own length, checked below
    if ((th ^ h0) & mask).any():
        return False
    t = at + off + ihl
    if (buf[t + 13] & ~0x08) != _ACK:
        return False
    if v4:
        if _U16.unpack_from(buf, at + off + 2)[0] != tail - off:
            return False
        if partial(buf[at + off:t]) != 0xFFFF:
            return False
        ps = pseudo_sum_v4(src, dst, _TCP, tail - off - ihl)
    else:
        if _U16.unpack_from(buf, at + off + 4)[0] != tail - off - 40:
            return False
        ps = pseudo_sum_v6(src, dst, _TCP, tail - off - ihl)
    if _U32.unpack_from(buf, t + 4)[0] != tseq:
        return False
    if last_gseq >= 0 and _U32.unpack_from(buf, at + off - 4)[0] != (last_gseq + 1) & 0xFFFFFFFF:
        return False
    if gre_csum and (partial(buf[at:t]) + 0xFFFF - ps) % 0xFFFF:
        return False  # the tail's prefix + IP header: for IPv4 the header adds 0
    return partial(buf[t:], ps) == 0xFFFF

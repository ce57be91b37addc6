"""legwire.completed_partial: a TCP segment whose checksum a local sender left to "hardware"
(the field holds the pseudo-header sum, Linux CHECKSUM_PARTIAL) is completed in a copy;
anything else is left alone (the eBPF fast path's stall, issue 14; the lab test is
tests/lab/test_ebpf.py test_inspected_download_with_tso_from_a_program_is_byte_exact)."""

from __future__ import annotations

import os

from bridge.userspace.legwire import completed_partial
from stack.wire.checksum import checksum, pseudo_sum_v4, pseudo_sum_v6, verify
from stack.wire.ip import PROTO_TCP

SRC4, DST4 = bytes([198, 18, 2, 10]), bytes([198, 18, 1, 10])
SRC6, DST6 = bytes.fromhex("20010db8000200000000000000000010"), bytes(16)


def segment(payload: bytes) -> bytearray:
    hdr = bytearray(20)
    hdr[0:4] = (80).to_bytes(2, "big") + (40000).to_bytes(2, "big")
    hdr[12] = 5 << 4
    hdr[13] = 0x10
    return hdr + payload


def partial_field(seg: bytearray, src: bytes, dst: bytes) -> bytearray:
    f = pseudo_sum_v4 if len(src) == 4 else pseudo_sum_v6
    ps = f(src, dst, PROTO_TCP, len(seg))
    seg[16:18] = ps.to_bytes(2, "big")
    return seg


def complete(seg: bytearray, src: bytes, dst: bytes) -> bytearray:
    f = pseudo_sum_v4 if len(src) == 4 else pseudo_sum_v6
    seg[16:18] = b"\0\0"
    seg[16:18] = checksum(seg, f(src, dst, PROTO_TCP, len(seg))).to_bytes(2, "big")
    return seg


def test_a_partial_checksum_is_completed_v4_and_v6_odd_and_super_sized() -> None:
    for src, dst in ((SRC4, DST4), (SRC6, DST6)):
        for size in (0, 1, 1400, 7000, 64_001):
            payload = os.urandom(size)
            seg = partial_field(segment(payload), src, dst)
            fixed = completed_partial(memoryview(seg), src, dst)
            assert fixed is not None
            assert fixed == complete(segment(payload), src, dst)
            f = pseudo_sum_v4 if len(src) == 4 else pseudo_sum_v6
            assert verify(fixed, f(src, dst, PROTO_TCP, len(fixed)))
            assert seg[16:18] != fixed[16:18] or verify(seg, f(src, dst, PROTO_TCP, len(seg)))


def test_a_damaged_checksum_is_not_repaired() -> None:
    seg = complete(segment(os.urandom(1000)), SRC4, DST4)
    seg[40] ^= 0xFF  # payload damaged after the checksum
    assert completed_partial(memoryview(seg), SRC4, DST4) is None
    seg = partial_field(segment(os.urandom(100)), SRC4, DST4)
    seg[17] ^= 1  # the field is neither complete nor the pseudo-header sum
    assert completed_partial(memoryview(seg), SRC4, DST4) is None
    assert completed_partial(memoryview(bytearray(19)), SRC4, DST4) is None
    # the pseudo-header sum of other addresses: not this segment's partial checksum
    other = partial_field(segment(os.urandom(100)), SRC4, bytes([198, 18, 1, 11]))
    assert completed_partial(memoryview(other), SRC4, DST4) is None

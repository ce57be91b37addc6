"""The Internet checksum against a word-by-word reference (RFC 1071 §1 and its §3 example)."""

from __future__ import annotations

import os
import struct

from hypothesis import given
from hypothesis import strategies as st

from stack.wire import checksum as ck


def reference(data: bytes) -> int:
    """RFC 1071 §4.1, one 16-bit word at a time."""
    if len(data) & 1:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_rfc1071_section3_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2; the checksum is its complement.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ck.partial(data) == 0xDDF2
    assert ck.checksum(data) == 0x220D


@given(st.binary(max_size=3000))
def test_matches_reference(data: bytes) -> None:
    assert ck.checksum(data) == reference(data)


def test_edge_cases() -> None:
    for data in (b"", b"\0", b"\xff", b"\xff\xff", b"\xff\xff" * 7, b"\0\0" * 3):
        assert ck.checksum(data) == reference(data), data


def test_verify_round_trip_with_embedded_checksum() -> None:
    for n in (20, 21, 1448, 1449):
        body = bytearray(os.urandom(n))
        body[0:2] = b"\0\0"
        struct.pack_into("!H", body, 0, ck.checksum(body))
        assert ck.verify(body)
        body[5] ^= 0x10
        assert not ck.verify(body)


def test_pseudo_headers_fold_like_a_concatenation() -> None:
    src4, dst4 = bytes([198, 18, 1, 10]), bytes([198, 18, 2, 10])
    payload = os.urandom(101)
    pseudo4 = src4 + dst4 + struct.pack("!BBH", 0, 6, len(payload))
    assert ck.checksum(payload, ck.pseudo_sum_v4(src4, dst4, 6, len(payload))) == reference(
        pseudo4 + payload
    )
    src6 = bytes.fromhex("20010db8000100000000000000000010")
    dst6 = bytes.fromhex("20010db8000200000000000000000010")
    pseudo6 = src6 + dst6 + struct.pack("!I3xB", len(payload), 17)
    assert ck.checksum(payload, ck.pseudo_sum_v6(src6, dst6, 17, len(payload))) == reference(
        pseudo6 + payload
    )


def test_udp_zero_is_sent_as_all_ones() -> None:
    assert ck.udp_fixup(0) == 0xFFFF
    assert ck.udp_fixup(0x1234) == 0x1234


@given(st.binary(min_size=20, max_size=200).filter(lambda b: len(b) % 2 == 0), st.integers(0, 9),
       st.integers(0, 0xFFFF))
def test_rfc1624_incremental_update(data: bytes, word_index: int, new_word: int) -> None:
    buf = bytearray(data)
    old_csum = ck.checksum(buf)
    (old_word,) = struct.unpack_from("!H", buf, word_index * 2)
    struct.pack_into("!H", buf, word_index * 2, new_word)
    updated = ck.incremental_update16(old_csum, old_word, new_word)
    # RFC 1624 §3: the result may differ from a recomputation only in the +0/-0 representation.
    assert updated == ck.checksum(buf) or {updated, ck.checksum(buf)} <= {0, 0xFFFF}


def test_batch_rows_fold_like_partial() -> None:
    """The identities bridge/gso.py uses on numpy columns (module doc): 256 times the sum of
    a row's little-endian words, 16- or 32-bit, folds to what `partial` gives."""
    import numpy as np

    rows = [os.urandom(64) for _ in range(50)] + [b"\0" * 62 + b"\0\1", b"\xff" * 64]
    a = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), 64)
    for word in ("<u2", "<u4"):
        sums = a.view(word).sum(axis=1, dtype=np.uint64) * 256
        assert [(int(v) - 1) % 0xFFFF + 1 for v in sums] == [ck.partial(r) for r in rows]
        assert [int(v) for v in ck.partial_le_rows(sums // 256)] == \
            [ck.partial(r) for r in rows]
    assert ck.swap16(0x1234) == 0x3412

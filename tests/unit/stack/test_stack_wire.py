"""TCP wire format, options, sequence arithmetic and buffers (RFC 9293 §3.1, §3.4)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stack.buffers import ReassemblyBuffer, SendBuffer
from stack.seq import seq_add, seq_ge, seq_gt, seq_in, seq_le, seq_lt, seq_sub, unwrap
from stack.wire.options import build_options, parse_options
from stack.wire.tcp import ACK, FIN, PSH, SYN, TcpSegment, emit_tcp, parse_tcp

V4_SRC, V4_DST = bytes([198, 18, 0, 2]), bytes([198, 18, 0, 1])
V6_SRC, V6_DST = bytes.fromhex("20010db8" + "00" * 11 + "02"), bytes.fromhex(
    "20010db8" + "00" * 11 + "01")

# (segment, scapy TCP fields) pairs used both ways, scapy (tests only, GPLv2) as the oracle:
# emit(segment) == bytes(scapy packet) and parse(those bytes) == segment.
CASES = [
    (
        TcpSegment(49152, 80, 1, 0, SYN, 65535, b"", 0, 1460, 7, True, (100, 0)),
        dict(sport=49152, dport=80, seq=1, ack=0, flags="S", window=65535,
             options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (100, 0)), ("NOP", None),
                      ("WScale", 7)]),
        b"",
    ),
    (
        TcpSegment(80, 49152, 0xFFFFFFFF, 7, ACK | PSH, 512, b"hello", 0, ts=(5, 6)),
        dict(sport=80, dport=49152, seq=0xFFFFFFFF, ack=7, flags="PA", window=512,
             options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))]),
        b"hello",
    ),
    (
        TcpSegment(80, 49152, 10, 20, ACK, 100, b"odd", 0, sack=((1000, 2000), (3000, 4000))),
        dict(sport=80, dport=49152, seq=10, ack=20, flags="A", window=100,
             options=[("NOP", None), ("NOP", None), ("SAck", (1000, 2000, 3000, 4000))]),
        b"odd",
    ),
    (
        TcpSegment(1, 2, 3, 4, FIN | ACK, 0, b""),
        dict(sport=1, dport=2, seq=3, ack=4, flags="FA", window=0),
        b"",
    ),
]


def _scapy_bytes(fields: dict, payload: bytes) -> bytes:  # type: ignore[type-arg]
    scapy_all = pytest.importorskip("scapy.all")
    pkt = scapy_all.IP(src="198.18.0.2", dst="198.18.0.1") / scapy_all.TCP(**fields) / payload
    return bytes(pkt)[20:]


@pytest.mark.parametrize(("seg", "fields", "payload"), CASES)
def test_rfc9293_must_2_emit_matches_scapy(seg: TcpSegment, fields: dict, payload: bytes) -> None:  # type: ignore[type-arg]
    assert emit_tcp(seg, V4_SRC, V4_DST) == _scapy_bytes(fields, payload)


@pytest.mark.parametrize(("seg", "fields", "payload"), CASES)
def test_rfc9293_must_3_parse_scapy_bytes(seg: TcpSegment, fields: dict, payload: bytes) -> None:  # type: ignore[type-arg]
    assert parse_tcp(_scapy_bytes(fields, payload), V4_SRC, V4_DST) == seg


def test_ipv6_pseudo_header() -> None:
    seg = TcpSegment(1, 2, 3, 4, ACK, 5, b"odd")
    raw = emit_tcp(seg, V6_SRC, V6_DST)
    assert parse_tcp(raw, V6_SRC, V6_DST) == seg
    assert parse_tcp(raw, V4_SRC, V4_DST) is None  # wrong pseudo-header


def test_rfc9293_must_3_bad_checksum_dropped_and_counted() -> None:
    raw = bytearray(emit_tcp(TcpSegment(1, 2, 3, 4, ACK, 5, b"data"), V4_SRC, V4_DST))
    raw[-1] ^= 1
    drops: dict[str, int] = {}
    assert parse_tcp(raw, V4_SRC, V4_DST, drops=drops) is None
    assert drops == {"bad_checksum": 1}
    assert parse_tcp(raw, V4_SRC, V4_DST, verify_checksum=False) is not None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00" * 19, "truncated"),
        (bytes.fromhex("0001000200000003000000044010ffff00000000"), "bad_offset"),  # 4 words
        (bytes.fromhex("000100020000000300000004f010ffff00000000"), "bad_offset"),  # past end
    ],
)
def test_malformed_headers_are_counted(raw: bytes, reason: str) -> None:
    drops: dict[str, int] = {}
    assert parse_tcp(raw, V4_SRC, V4_DST, drops=drops) is None
    assert drops == {reason: 1}


def test_payload_is_a_zero_copy_view_and_super_segments_parse() -> None:
    blob = bytes(range(256)) * 256
    raw = bytearray(emit_tcp(TcpSegment(1, 2, 3, 4, ACK, 5, blob), V4_SRC, V4_DST))
    seg = parse_tcp(raw, V4_SRC, V4_DST)
    assert seg is not None and isinstance(seg.payload, memoryview)
    assert seg.payload.obj is raw and bytes(seg.payload) == blob


def test_rfc9293_must_4_must_6_must_68_eol_nop_mss_unknown_skipped_by_length() -> None:
    opts = bytes([1, 1, 99, 4, 0xAA, 0xBB, 2, 4, 0x05, 0xB4, 0, 2, 4, 0, 0])
    assert parse_options(opts, 0, len(opts)) == (1460, None, False, None, ())


def test_rfc9293_must_5_options_in_any_segment() -> None:
    seg = TcpSegment(1, 2, 3, 4, ACK, 5, b"", 0, mss=1200)  # MSS on a non-SYN is parsed
    parsed = parse_tcp(emit_tcp(seg, V4_SRC, V4_DST), V4_SRC, V4_DST)
    assert parsed is not None and parsed.mss == 1200


@pytest.mark.parametrize(
    "opts",
    [
        bytes([2]),  # kind without length
        bytes([2, 0, 5, 180]),  # length 0
        bytes([2, 1, 5, 180]),  # length 1
        bytes([8, 10, 0, 0]),  # length past the end
        bytes([2, 5, 5, 180, 0]),  # MSS with wrong length: ignored
        bytes([8, 9] + [0] * 7),  # TSopt with wrong length: ignored
        bytes([5, 7] + [0] * 6),  # SACK not 8n+2: ignored
    ],
)
def test_rfc9293_must_7_illegal_option_lengths(opts: bytes) -> None:
    mss, ws, sp, ts, sack = parse_options(opts, 0, len(opts))
    assert mss is None and ts is None and sack == ()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_rfc9293_must_7_garbage_never_raises(garbage: bytes) -> None:
    parse_options(garbage, 0, len(garbage))
    # The same bytes as the options and payload of a whole segment.
    hdr = bytearray(emit_tcp(TcpSegment(1, 2, 3, 4, ACK, 5), V4_SRC, V4_DST))
    raw = bytes(hdr[:12]) + bytes([((20 + (len(garbage) & ~3)) // 4 % 16) << 4]) + bytes(
        hdr[13:]) + garbage
    parse_tcp(raw, V4_SRC, V4_DST, verify_checksum=False)
    parse_tcp(raw, V4_SRC, V4_DST)


def test_rfc9293_must_69_options_padded_and_bounded() -> None:
    block = build_options(None, 3, False, None, ())
    assert len(block) % 4 == 0
    with pytest.raises(ValueError):
        build_options(1460, None, False, (1, 2), ((1, 2),) * 4)


def test_fin_and_syn_count_in_seg_len() -> None:
    assert TcpSegment(1, 2, 3, 4, SYN | FIN, 0, b"ab").seg_len == 4
    seg = CASES[0][0]
    assert isinstance(seg, TcpSegment)
    assert "SF." in repr(seg._replace(flags=SYN | FIN | ACK))


def test_rfc9293_3_4_sequence_comparisons_modulo_2_32() -> None:
    assert seq_lt(0xFFFFFFF0, 5) and seq_gt(5, 0xFFFFFFF0)
    assert seq_le(7, 7) and seq_ge(7, 7) and not seq_lt(7, 7)
    assert seq_add(0xFFFFFFFF, 2) == 1 and seq_sub(1, 0xFFFFFFFF) == 2
    assert seq_sub(0xFFFFFFFF, 1) == -2
    assert seq_in(2, 0xFFFFFFFE, 5) and not seq_in(5, 0xFFFFFFFE, 5)
    assert unwrap(3, 0xFFFFFFFE, 1000) == 1005
    assert unwrap(0xFFFFFFFC, 0xFFFFFFFE, 1000) == 998


def test_send_buffer_peek_across_chunks_and_release() -> None:
    buf = SendBuffer(100)
    assert buf.append(b"a" * 3000) == 100
    buf = SendBuffer(10_000)
    buf.append(b"x" * 3000)
    buf.append(b"y" * 3000)
    view = buf.peek(100, 50)
    assert isinstance(view, memoryview) and bytes(view) == b"x" * 50  # zero-copy
    assert buf.peek(2990, 20) == b"x" * 10 + b"y" * 10
    buf.release(3500)
    assert len(buf) == 2500 and buf.peek(3500, 10) == b"y" * 10
    with pytest.raises(ValueError):
        buf.peek(10, 5)


def test_send_buffer_merges_tiny_writes() -> None:
    buf = SendBuffer(10_000)
    for _ in range(100):
        buf.append(b"ab")
    assert len(buf._chunks) == 1 and buf.peek(0, 200) == b"ab" * 100


def test_reassembly_trims_overlaps_and_pops_in_order() -> None:
    ooo = ReassemblyBuffer(1000)
    assert ooo.insert(10, b"klmno") == 5
    assert ooo.insert(12, b"mnopq") == 2  # overlap trimmed
    assert ooo.insert(10, b"klm") == 0  # duplicate
    assert ooo.insert(20, b"uv") == 2
    assert ooo.blocks(4) == [(20, 22), (10, 17)]
    nxt, pieces = ooo.pop_ready(5)
    assert nxt == 5 and pieces == []
    nxt, pieces = ooo.pop_ready(11)
    assert nxt == 17 and b"".join(pieces) == b"lmnopq"
    assert ooo.nbytes == 2


def test_reassembly_caps_bytes_and_ranges() -> None:
    ooo = ReassemblyBuffer(10, cap_ranges=2)
    assert ooo.insert(0, b"x" * 8) == 8
    assert ooo.insert(100, b"y" * 3) == -1  # bytes cap
    assert ooo.insert(100, b"y") == 1
    assert ooo.insert(200, b"z") == -1  # range cap


def test_reassembly_merges_adjacent_segments_into_one_range() -> None:
    ooo = ReassemblyBuffer(1 << 20, cap_ranges=2)
    for i in range(100):  # a long run after one hole: one range, not 100
        assert ooo.insert(1000 + 10 * i, bytes([i]) * 10) == 10
    assert len(ooo) == 1 and ooo.blocks(4) == [(1000, 2000)]
    assert ooo.insert(500, b"x" * 10) == 10  # a second range fits
    assert ooo.insert(990, b"y" * 10) == 10  # touching both: 2 ranges stay 2
    assert ooo.insert(100, b"z") == -1  # a third does not
    nxt, pieces = ooo.pop_ready(505)
    assert nxt == 510 and pieces == [b"x" * 5]
    nxt, pieces = ooo.pop_ready(995)
    run = b"".join(bytes([i]) * 10 for i in range(100))
    assert nxt == 2000 and b"".join(pieces) == b"y" * 5 + run


def test_rfc9293_must_64_options_at_any_alignment() -> None:
    # One NOP puts MSS at an odd offset, then TSopt and SACK-permitted unaligned too.
    opts = bytes([1, 2, 4, 0x05, 0xB4, 4, 2, 8, 10]) + (7).to_bytes(4, "big") + bytes(4)
    opts += bytes(-len(opts) % 4)
    assert parse_options(opts, 0, len(opts)) == (1460, None, True, (7, 0), ())
    seg = TcpSegment(1, 2, 3, 4, SYN, 5)
    raw = bytearray(emit_tcp(seg, V4_SRC, V4_DST))
    raw[12] = ((20 + len(opts)) // 4) << 4
    raw[16:18] = b"\0\0"
    parsed = parse_tcp(bytes(raw) + opts, V4_SRC, V4_DST, verify_checksum=False)
    assert parsed is not None and parsed.mss == 1460 and parsed.ts == (7, 0)

"""GRE / IPIP codec: one table used both ways, malformed cases, scapy as an oracle."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE

from bridge import counters as C
from bridge.encap import (
    ETH_IPV4,
    ETH_IPV6,
    KEEPALIVE,
    GreEncoder,
    GreHeader,
    build_gre,
    decode_gre,
    flow_source_port,
    overhead,
    parse_gre,
)
from stack.wire.checksum import checksum

INNER4 = bytes(IP(src="198.18.1.1", dst="198.18.2.2", ttl=9) / UDP(sport=1, dport=2) / b"hi")
INNER6 = bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2") / UDP(sport=1, dport=2) / b"hi")


def _with_csum(head: bytes, payload: bytes) -> bytes:
    """Fill the GRE checksum by hand (RFC 2784 §2.5.1) for the expected bytes."""
    c = checksum(head + payload)
    return head[:4] + c.to_bytes(2, "big") + head[6:] + payload


# (header fields, payload, exact wire bytes): used for build AND parse.
CASES = [
    (GreHeader(ETH_IPV4), INNER4, b"\x00\x00\x08\x00" + INNER4),
    (GreHeader(ETH_IPV6), INNER6, b"\x00\x00\x86\xdd" + INNER6),
    (GreHeader(ETH_IPV4, key=0x01020304), INNER4,
     b"\x20\x00\x08\x00\x01\x02\x03\x04" + INNER4),
    (GreHeader(ETH_IPV4, seq=7), INNER4, b"\x10\x00\x08\x00\x00\x00\x00\x07" + INNER4),
    (GreHeader(ETH_IPV6, key=42, seq=0xFFFFFFFF), INNER6,
     b"\x30\x00\x86\xdd\x00\x00\x00\x2a\xff\xff\xff\xff" + INNER6),
    (GreHeader(ETH_IPV4, checksum_present=True), INNER4,
     _with_csum(b"\x80\x00\x08\x00\x00\x00\x00\x00", INNER4)),
    (GreHeader(ETH_IPV4, key=1, seq=2, checksum_present=True), INNER4,
     _with_csum(b"\xb0\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x02", INNER4)),
    (GreHeader(0, key=5), b"", b"\x20\x00\x00\x00\x00\x00\x00\x05"),  # keepalive
]


@pytest.mark.parametrize(("hdr", "payload", "wire"), CASES)
def test_build_matches_table(hdr: GreHeader, payload: bytes, wire: bytes) -> None:
    assert build_gre(hdr, payload) == wire


@pytest.mark.parametrize(("hdr", "payload", "wire"), CASES)
def test_parse_matches_table(hdr: GreHeader, payload: bytes, wire: bytes) -> None:
    parsed = parse_gre(wire)
    assert not isinstance(parsed, int)
    got, data = parsed
    assert (got.protocol, got.key, got.seq, got.checksum_present) == (
        hdr.protocol, hdr.key, hdr.seq, hdr.checksum_present)
    assert data == payload
    assert got.length == len(wire) - len(payload)


MALFORMED = [
    (b"", C.R_MALFORMED),
    (b"\x00\x00\x08", C.R_MALFORMED),
    (b"\x00\x01\x08\x00" + INNER4, C.R_BAD_VERSION),  # version 1 = PPTP enhanced GRE
    (b"\x00\x07\x08\x00" + INNER4, C.R_BAD_VERSION),
    (b"\x40\x00\x08\x00" + INNER4, C.R_BAD_FLAGS),  # R (routing)
    (b"\x08\x00\x08\x00" + INNER4, C.R_BAD_FLAGS),  # s (strict source route)
    (b"\x04\x00\x08\x00" + INNER4, C.R_BAD_FLAGS),  # recursion bit 5
    (b"\x20\x00\x08\x00\x00\x00", C.R_MALFORMED),  # K but key truncated
    (b"\xb0\x00\x08\x00\x00\x00\x00\x00\x00\x00", C.R_MALFORMED),  # C+K+S truncated
]


@pytest.mark.parametrize(("wire", "reason"), MALFORMED)
def test_parse_malformed(wire: bytes, reason: int) -> None:
    assert parse_gre(wire) == reason


def test_bits_6_to_12_are_ignored_on_receipt() -> None:
    # RFC 2784 §2.5: bits 6-12 MUST be ignored (low recursion bits, RFC 1701 flags).
    wire = b"\x03\xf8\x08\x00" + INNER4
    parsed = parse_gre(wire)
    assert not isinstance(parsed, int)
    assert decode_gre(wire, None, False) == (-1, 4, -1)


@pytest.mark.parametrize(("hdr", "payload", "wire"), CASES)
def test_scapy_parses_what_we_build(hdr: GreHeader, payload: bytes, wire: bytes) -> None:
    pkt = IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=50000, dport=4754) / wire
    s = IP(bytes(pkt))
    g = s[GRE]
    assert g.proto == hdr.protocol
    assert g.version == 0
    assert bool(g.key_present) == (hdr.key is not None)
    if hdr.key is not None:
        assert g.key == hdr.key
    assert bool(g.seqnum_present) == (hdr.seq is not None)
    if hdr.seq is not None:
        assert g.sequence_number == hdr.seq
    if hdr.checksum_present:
        # Recompute with scapy: zero the field, let scapy fill it, compare.
        ours = g.chksum
        g2 = GRE(bytes(g))
        g2.chksum = None
        assert GRE(bytes(g2)).chksum == ours
    if payload:
        assert bytes(g.payload) == payload


@pytest.mark.parametrize("key", [None, 0, 0xDEADBEEF])
@pytest.mark.parametrize("seq", [None, 0, 123456])
@pytest.mark.parametrize("csum", [False, True])
@pytest.mark.parametrize("inner", [INNER4, INNER6])
def test_we_parse_what_scapy_builds(key: int | None, seq: int | None, csum: bool,
                                    inner: bytes) -> None:
    fields = {"proto": ETH_IPV4 if inner[0] >> 4 == 4 else ETH_IPV6}
    if key is not None:
        fields |= {"key_present": 1, "key": key}
    if seq is not None:
        fields |= {"seqnum_present": 1, "sequence_number": seq}
    if csum:
        fields |= {"chksum_present": 1}
    wire = bytes(GRE(**fields) / inner)
    status, off, got_seq = decode_gre(wire, key, csum)
    assert status == -1
    assert wire[off:] == inner
    assert got_seq == (-1 if seq is None else seq)
    parsed = parse_gre(wire)
    assert not isinstance(parsed, int)
    assert (parsed[0].key, parsed[0].seq, parsed[0].checksum_present) == (key, seq, csum)


def test_decode_policy_reasons() -> None:
    good = build_gre(GreHeader(ETH_IPV4, key=7), INNER4)
    assert decode_gre(good, 7, False)[0] == -1
    assert decode_gre(good, 8, False)[0] == C.R_WRONG_KEY
    assert decode_gre(good, None, False)[0] == C.R_WRONG_KEY  # K set, we expect none
    nokey = build_gre(GreHeader(ETH_IPV4), INNER4)
    assert decode_gre(nokey, 7, False)[0] == C.R_WRONG_KEY  # key expected, K clear
    # Linux icsum/ocsum: C presence must match in both directions.
    assert decode_gre(nokey, None, True)[0] == C.R_CHECKSUM
    withc = build_gre(GreHeader(ETH_IPV4, checksum_present=True), INNER4)
    assert decode_gre(withc, None, False)[0] == C.R_CHECKSUM
    corrupt = bytearray(withc)
    corrupt[-1] ^= 0x01
    assert decode_gre(bytes(corrupt), None, True)[0] == C.R_CHECKSUM
    assert decode_gre(withc, None, True)[0] == -1
    assert decode_gre(build_gre(GreHeader(0x6558), INNER4), None, False)[0] == C.R_BAD_PROTO
    # Protocol says IPv6, payload is IPv4: malformed.
    assert decode_gre(build_gre(GreHeader(ETH_IPV6), INNER4), None, False)[0] == C.R_MALFORMED
    assert decode_gre(build_gre(GreHeader(ETH_IPV4), b""), None, False)[0] == C.R_MALFORMED
    assert decode_gre(build_gre(GreHeader(0, key=3)), 3, False)[0] == KEEPALIVE
    assert decode_gre(build_gre(GreHeader(0, key=3), b"x"), 3, False)[0] == C.R_BAD_PROTO


def test_encoder_sequence_starts_at_zero_and_wraps() -> None:
    enc = GreEncoder(key=9, seq=True, csum=True)
    enc.seq = 0xFFFFFFFE
    seqs = []
    for _ in range(3):
        d = enc.wrap(INNER4, False)
        enc.seal(d)
        status, off, s = decode_gre(bytes(d), 9, True)
        assert status == -1 and bytes(d[off:]) == INNER4
        seqs.append(s)
    assert seqs == [0xFFFFFFFE, 0xFFFFFFFF, 0]
    assert GreEncoder(None, True, False).wrap(INNER6, True)[4:8] == b"\x00\x00\x00\x00"


def test_encoder_matches_build_gre() -> None:
    enc = GreEncoder(key=0x11223344, seq=True, csum=True)
    d = enc.wrap(INNER6, True)
    enc.seal(d)
    assert bytes(d) == build_gre(GreHeader(ETH_IPV6, key=0x11223344, seq=0,
                                           checksum_present=True), INNER6)
    assert enc.keepalive() == build_gre(GreHeader(0, key=0x11223344, checksum_present=True))


def test_overhead_matches_field_table() -> None:
    # FIELD.md §3.6: GRE-in-UDP 32 / +key 36 / +key+seq 40 (v4), +20 for IPv6; FOU IPIP 28/48.
    assert overhead(True, False, False, False, False) == 32
    assert overhead(True, False, True, False, False) == 36
    assert overhead(True, False, True, True, False) == 40
    assert overhead(True, False, True, True, True) == 44
    assert overhead(True, True, True, True, False) == 60
    assert overhead(False, False, False, False, False) == 28
    assert overhead(False, True, False, False, False) == 48


def test_flow_source_port_range_and_stability() -> None:
    ports = set()
    for sport in range(200):
        pkt = bytes(IP(src="198.18.1.1", dst="198.18.2.2") / TCP(sport=sport, dport=80))
        p = flow_source_port(pkt)
        assert 49152 <= p <= 65535
        assert p == flow_source_port(pkt)  # constant per flow
        ports.add(p)
    assert len(ports) > 150  # entropy: flows spread over the range
    six = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=5, dport=6))
    assert 49152 <= flow_source_port(six) <= 65535
    assert flow_source_port(b"\x45") == 49152

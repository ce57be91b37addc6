"""IPv4/IPv6 headers: one table for parse and build, malformed cases, TTL, fragmentation."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP, defragment
from scapy.layers.inet6 import IPv6

from stack.wire.ip import (
    Ipv4Header,
    Ipv6Header,
    build_ipv4,
    build_ipv6,
    decrement_ttl_v4,
    fragment_v4,
    packet_length,
    parse_ipv4,
    parse_ipv6,
)

A4, B4 = bytes([198, 18, 1, 1]), bytes([198, 18, 2, 2])
A6 = bytes.fromhex("20010db8000100000000000000000001")
B6 = bytes.fromhex("20010db8000200000000000000000002")

V4_CASES = [
    (Ipv4Header(A4, B4, 17, ttl=64, ident=1, df=True), b"abcd",
     bytes(IP(src="198.18.1.1", dst="198.18.2.2", proto=17, ttl=64, id=1, flags="DF") / b"abcd")),
    (Ipv4Header(A4, B4, 6, ttl=1, tos=0xB8, ident=0xFFFF, mf=True, frag_offset=100), b"",
     bytes(IP(src="198.18.1.1", dst="198.18.2.2", proto=6, ttl=1, tos=0xB8, id=0xFFFF,
              flags="MF", frag=100))),
    (Ipv4Header(A4, B4, 1, options=b"\x94\x04\x00\x00"), b"z" * 9,
     bytes(IP(src="198.18.1.1", dst="198.18.2.2", proto=1, id=0, options=b"\x94\x04\x00\x00")
           / (b"z" * 9))),
]
V6_CASES = [
    (Ipv6Header(A6, B6, 17, hop_limit=3, traffic_class=0x2E, flow_label=0xABCDE), b"data",
     bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2", nh=17, hlim=3, tc=0x2E,
                fl=0xABCDE) / b"data")),
    (Ipv6Header(A6, B6, 59), b"", bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2", nh=59))),
]


@pytest.mark.parametrize(("hdr", "payload", "wire"), V4_CASES)
def test_v4_table_both_ways(hdr: Ipv4Header, payload: bytes, wire: bytes) -> None:
    assert build_ipv4(hdr, payload) == wire
    parsed = parse_ipv4(wire)
    assert parsed is not None
    got, data = parsed
    assert data == payload
    fields = ("src", "dst", "proto", "ttl", "tos", "ident", "df", "mf", "frag_offset", "options")
    assert all(getattr(got, f) == getattr(hdr, f) for f in fields)
    assert got.total_length == len(wire) and got.header_length == 20 + len(hdr.options)


@pytest.mark.parametrize(("hdr", "payload", "wire"), V6_CASES)
def test_v6_table_both_ways(hdr: Ipv6Header, payload: bytes, wire: bytes) -> None:
    assert build_ipv6(hdr, payload) == wire
    parsed = parse_ipv6(wire)
    assert parsed is not None
    got, data = parsed
    assert data == payload
    assert (got.src, got.dst, got.next_header, got.hop_limit, got.traffic_class,
            got.flow_label) == (hdr.src, hdr.dst, hdr.next_header, hdr.hop_limit,
                                hdr.traffic_class, hdr.flow_label)


GOOD4 = V4_CASES[0][2]
GOOD6 = V6_CASES[0][2]
MALFORMED = [
    b"",
    GOOD4[:19],
    b"\x44" + GOOD4[1:],  # IHL 4 words < 5
    b"\x4f" + GOOD4[1:],  # IHL 60 bytes > total length
    GOOD4[:2] + b"\xff\xff" + GOOD4[4:],  # total length beyond the buffer
    GOOD4[:2] + b"\x00\x13" + GOOD4[4:],  # total length < header
    b"\x55" + GOOD4[1:],  # version 5
    GOOD6[:39],
    GOOD6[:4] + b"\x00\xff" + GOOD6[6:],  # payload length beyond the buffer
]


@pytest.mark.parametrize("wire", MALFORMED)
def test_malformed(wire: bytes) -> None:
    assert packet_length(wire) == 0
    assert parse_ipv4(wire) is None and parse_ipv6(wire) is None


def test_trailing_padding_is_not_part_of_the_packet() -> None:
    assert packet_length(GOOD4 + b"\x00" * 6) == len(GOOD4)
    parsed = parse_ipv4(GOOD4 + b"pad")
    assert parsed is not None and parsed[1] == b"abcd"
    assert packet_length(GOOD6 + b"\x00") == len(GOOD6)


@pytest.mark.parametrize("ttl", [1, 2, 64, 255])
def test_decrement_ttl_fixes_checksum_incrementally(ttl: int) -> None:
    pkt = bytearray(bytes(IP(src="198.18.1.1", dst="198.18.2.2", ttl=ttl, tos=3) / UDP()))
    decrement_ttl_v4(pkt)
    ref = IP(src="198.18.1.1", dst="198.18.2.2", ttl=ttl - 1, tos=3) / UDP()
    assert bytes(pkt) == bytes(ref)
    framed = bytearray(b"HDR!") + bytes(IP(src="198.18.1.1", dst="198.18.2.2", ttl=ttl) / UDP())
    decrement_ttl_v4(framed, 4)
    assert IP(bytes(framed[4:])).ttl == ttl - 1
    assert bytes(framed[4:]) == bytes(IP(src="198.18.1.1", dst="198.18.2.2", ttl=ttl - 1) / UDP())


@pytest.mark.parametrize("mtu", [68, 576, 1000, 1499])
def test_fragments_reassemble_with_scapy(mtu: int) -> None:
    orig = IP(src="198.18.1.1", dst="198.18.2.2", id=99, options=b"\x94\x04\x00\x00"
              + b"\x07\x03\x04\x00") / UDP(sport=1, dport=2) / (bytes(range(256)) * 10)
    raw = bytes(orig)
    frags = fragment_v4(raw, mtu)
    assert len(frags) > 1
    assert all(len(f) <= mtu for f in frags)
    parsed = [IP(f) for f in frags]
    # RFC 791: the copied option (0x94 router alert) is in every fragment; record route only
    # in the first.
    assert all(bytes(p.options[0]) [:1] == b"\x94" for p in parsed)
    assert len(parsed[0].options) == 3 and len(parsed[1].options) == 1
    assert all(p.flags.MF for p in parsed[:-1]) and not parsed[-1].flags.MF
    whole = defragment(parsed)[0]
    assert bytes(whole[UDP]) == bytes(IP(raw)[UDP])
    for f in frags:  # every fragment's header checksum is right
        p = IP(f)
        c = p.chksum
        del p.chksum
        assert IP(bytes(p)).chksum == c


def test_fragmenting_a_fragment_keeps_offsets() -> None:
    raw = bytes(IP(src="198.18.1.1", dst="198.18.2.2", flags="MF", frag=10) / (b"q" * 200))
    frags = [IP(f) for f in fragment_v4(raw, 100)]
    assert frags[0].frag == 10 and all(f.flags.MF for f in frags)
    assert frags[1].frag == 10 + 80 // 8


def test_fragment_misuse_raises() -> None:
    with pytest.raises(ValueError):
        fragment_v4(b"\x45", 100)
    with pytest.raises(ValueError):
        fragment_v4(GOOD4 + b"x" * 100, 24)

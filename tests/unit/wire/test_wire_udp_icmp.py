"""UDP (RFC 768, RFC 8086 §3.2 checksum rules) and ICMP/ICMPv6 errors, scapy as the oracle."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6

from stack.wire import icmp
from stack.wire.udp import UdpHeader, build_udp, parse_udp, verify_udp

S4, D4 = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
S6 = bytes.fromhex("20010db800ff00000000000000000001")
D6 = bytes.fromhex("20010db800ff00000000000000000002")
GRE_PAYLOAD = b"\x20\x00\x08\x00\x00\x00\x00\x07" + b"inner"


@pytest.mark.parametrize(("src", "dst", "cls", "s", "d"), [
    (S4, D4, IP, "198.18.0.1", "198.18.0.2"),
    (S6, D6, IPv6, "2001:db8:ff::1", "2001:db8:ff::2"),
])
def test_udp_table_both_ways(src: bytes, dst: bytes, cls: type, s: str, d: str) -> None:
    ours = build_udp(50000, 4754, GRE_PAYLOAD, src, dst)
    ref = bytes(cls(src=s, dst=d) / UDP(sport=50000, dport=4754) / GRE_PAYLOAD)
    hdr_len = 20 if cls is IP else 40
    assert ours == ref[hdr_len:]
    parsed = parse_udp(ours)
    assert parsed is not None
    assert parsed[0] == UdpHeader(50000, 4754, 8 + len(GRE_PAYLOAD), parsed[0].checksum)
    assert parsed[1] == GRE_PAYLOAD
    assert verify_udp(ours, src, dst)
    bad = bytearray(ours)
    bad[-1] ^= 1
    assert not verify_udp(bytes(bad), src, dst)


def test_rfc8086_zero_checksum_rules() -> None:
    # RFC 8086 §3.2.2: IPv4 may carry a zero UDP checksum; IPv6 must not (general Internet).
    zero = build_udp(50000, 4754, GRE_PAYLOAD)
    assert zero[6:8] == b"\x00\x00"
    assert verify_udp(zero, S4, D4)
    assert not verify_udp(zero, S6, D6)
    assert verify_udp(zero, S6, D6, allow_zero_v6=True)


def test_udp_malformed() -> None:
    assert parse_udp(b"\x00" * 7) is None
    assert parse_udp(b"\x00\x01\x00\x02\x00\x07\x00\x00") is None  # length < 8
    assert parse_udp(b"\x00\x01\x00\x02\x00\x20\x00\x00") is None  # length > buffer
    assert not verify_udp(b"short", S4, D4)
    with pytest.raises(ValueError):
        build_udp(70000, 1, b"")


ORIG4 = bytes(IP(src="198.18.10.5", dst="198.18.20.7", ttl=1) / UDP(sport=1, dport=2)
              / (b"p" * 1000))
ORIG6 = bytes(IPv6(src="2001:db8:10::5", dst="2001:db8:20::7") / UDP(sport=1, dport=2)
              / (b"p" * 1500))
ME4 = bytes([198, 18, 100, 1])
ME6 = bytes.fromhex("20010db8010000000000000000000001")


def test_icmp4_frag_needed_read_by_scapy() -> None:
    raw = icmp.icmp4_error(ORIG4, icmp.ICMP4_UNREACH, icmp.UNREACH_FRAG_NEEDED, ME4, 1400)
    p = IP(raw)
    assert (p.src, p.dst, p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (
        "198.18.100.1", "198.18.10.5", 3, 4, 1400)
    assert len(raw) == 576 and bytes(p[IPerror])[:20] == ORIG4[:20]
    c = p[ICMP].chksum
    p[ICMP].chksum = None
    assert IP(bytes(p))[ICMP].chksum == c
    back = icmp.parse_icmp_error(raw)
    assert back is not None and (back.type, back.code, back.info) == (3, 4, 1400)
    assert back.quoted == ORIG4[: len(back.quoted)]


def test_icmp6_packet_too_big_read_by_scapy() -> None:
    raw = icmp.icmp6_error(ORIG6, icmp.ICMP6_PACKET_TOO_BIG, 0, ME6, 1452)
    p = IPv6(raw)
    assert p[ICMPv6PacketTooBig].mtu == 1452 and len(raw) == 1280
    c = p[ICMPv6PacketTooBig].cksum
    p[ICMPv6PacketTooBig].cksum = None
    assert IPv6(bytes(p))[ICMPv6PacketTooBig].cksum == c
    un = IPv6(icmp.icmp6_error(ORIG6[:200], icmp.ICMP6_UNREACH, 0, ME6))
    assert un[ICMPv6DestUnreach].code == 0
    back = icmp.parse_icmp_error(raw)
    assert back is not None and (back.version, back.type, back.info) == (6, 2, 1452)


def test_parse_icmp_error_rejects() -> None:
    raw = bytearray(icmp.icmp4_error(ORIG4, 11, 0, ME4))
    raw[-1] ^= 1
    assert icmp.parse_icmp_error(bytes(raw)) is None
    assert icmp.parse_icmp_error(ORIG4) is None
    assert icmp.parse_icmp_error(b"junk") is None
    echo = bytes(IP(src="198.18.1.1", dst="198.18.1.2") / ICMP(type=8))
    assert icmp.parse_icmp_error(echo) is None


@pytest.mark.parametrize(("pkt", "allowed"), [
    (ORIG4, True),
    (bytes(IP(src="198.18.10.5", dst="198.18.20.7", frag=10) / (b"x" * 8)), False),
    (bytes(IP(src="0.0.0.0", dst="198.18.20.7") / UDP()), False),
    (bytes(IP(src="224.0.0.1", dst="198.18.20.7") / UDP()), False),
    (bytes(IP(src="198.18.10.5", dst="224.0.0.5") / UDP()), False),
    (bytes(IP(src="198.18.10.5", dst="255.255.255.255") / UDP()), False),
    (bytes(IP(src="198.18.10.5", dst="198.18.20.7") / ICMP(type=8)), True),
    (bytes(IP(src="198.18.10.5", dst="198.18.20.7") / ICMP(type=3)), False),
    (bytes(IP(src="198.18.10.5", dst="198.18.20.7") / ICMP(type=11)), False),
    (b"garbage", False),
])
def test_error_allowed_v4(pkt: bytes, allowed: bool) -> None:
    assert icmp.error_allowed_v4(pkt) is allowed


def test_error_allowed_v6() -> None:
    from scapy.layers.inet6 import ICMPv6EchoRequest

    assert icmp.error_allowed_v6(ORIG6)
    assert not icmp.error_allowed_v6(bytes(IPv6(src="::", dst="2001:db8::1") / UDP()))
    assert not icmp.error_allowed_v6(bytes(IPv6(src="2001:db8::1", dst="ff02::1") / UDP()))
    assert icmp.error_allowed_v6(bytes(IPv6(src="2001:db8::1", dst="ff02::1") / UDP()), True)
    assert icmp.error_allowed_v6(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2")
                                       / ICMPv6EchoRequest()))
    assert not icmp.error_allowed_v6(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2")
                                           / ICMPv6PacketTooBig()))

"""The L3/L4 prelude (stack/wire/prelude.py): one table for the three views of a TCP packet
(plain_tcp, tcp_key, syn_candidate), the named address slices, and never raising on junk.
The IPv6 chain walker and `uninspectable` have their own tables in tests/unit/bridge/
test_mss_v6_ext.py and tests/unit/splice/test_uninspectable_chain.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.packet import Packet

from stack.wire.prelude import (
    V4_DST_AT,
    V4_SRC_AT,
    V6_DST_AT,
    V6_SRC_AT,
    plain_tcp,
    syn_candidate,
    tcp_key,
)
from stack.wire.vnet import VNET, VNET_HDR_LEN, build_vnet, complete_checksum, parse_vnet

S4, D4 = "198.18.1.1", "198.18.2.2"
S6, D6 = "2001:db8:1::1", "2001:db8:2::2"
MSS = [("MSS", 1460)]


def _v4(flags: str = "S", frag: int = 0, ipflags: str = "DF", opts: list | None = None,
        payload: bytes = b"") -> Packet:
    return IP(src=S4, dst=D4, flags=ipflags, frag=frag) / TCP(
        sport=1234, dport=80, flags=flags, options=MSS if opts is None else opts) / payload


def _v6(*ext: Packet, flags: str = "S") -> Packet:
    p: Packet = IPv6(src=S6, dst=D6)
    for e in ext:
        p = p / e
    return p / TCP(sport=1234, dport=80, flags=flags, options=MSS)


# (packet, plain_tcp says TCP, tcp_key keys it, syn_candidate)
CASES = [
    ("v4 SYN", _v4(), True, True, True),
    ("v4 ACK", _v4("A", opts=[]), True, True, False),
    ("v4 SYN first fragment (MF)", _v4(ipflags="MF"), False, True, True),
    ("v4 later fragment", _v4(frag=10), False, False, False),
    ("v4 UDP", IP(src=S4, dst=D4) / UDP(sport=1, dport=2) / (b"x" * 30), False, False, False),
    ("v6 SYN", _v6(), True, True, True),
    ("v6 SYN behind Destination Options", _v6(IPv6ExtHdrDestOpt()), False, True, True),
    ("v6 SYN first fragment", _v6(IPv6ExtHdrFragment(m=1)), False, True, True),
    ("v6 later fragment", _v6(IPv6ExtHdrFragment(offset=5)), False, False, True),
]


@pytest.mark.parametrize("name,pkt,plain,keyed,syn", CASES, ids=[c[0] for c in CASES])
def test_the_three_views(name: str, pkt: Packet, plain: bool, keyed: bool, syn: bool) -> None:
    b = bytes(pkt)
    assert (plain_tcp(memoryview(b)) is not None) is plain
    k = tcp_key(b, len(b))
    assert (k is not None) is keyed
    if k is not None:
        v6 = b[0] >> 4 == 6
        assert k[0] == (6 if v6 else 4, b[V6_SRC_AT if v6 else V4_SRC_AT],
                        b[V6_DST_AT if v6 else V4_DST_AT], 1234, 80)
    assert syn_candidate(b, 0, len(b)) is syn


def test_plain_tcp_lengths() -> None:
    b = bytes(_v4("A", opts=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))],
                  payload=b"x" * 100))
    assert plain_tcp(b) == (True, 20, 32)
    assert plain_tcp(b[:20 + 31]) is None  # options cut short
    b6 = bytes(_v6(flags="A"))
    assert plain_tcp(b6) == (False, 40, 24)


def test_tiny_first_fragment_is_judged_a_connection_attempt() -> None:
    """RFC 1858 §3: an IPv4 first fragment with 8 bytes of TCP has ports but no flags."""
    full = bytes(_v4())
    tiny = bytearray(full[:28])
    tiny[2:4] = (28).to_bytes(2, "big")
    tiny[6] |= 0x20  # MF
    k = tcp_key(bytes(tiny), 28)
    assert k is not None and k[0][3:] == (1234, 80) and k[2] == 0x02


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([0x45, 0x46, 0x60, 0x4F, 0x00]))
def test_junk_never_raises(data: bytes, first: int) -> None:
    b = bytes([first]) + data
    plain_tcp(b)
    tcp_key(b, len(b))
    if len(b) >= 60:
        syn_candidate(b, 0, len(b))


def test_vnet_header_round_trip_and_checksum_completion() -> None:
    h = build_vnet(1, 4, 60, 1440, 40, 16)
    assert len(h) == VNET_HDR_LEN == VNET.size and parse_vnet(h) == (1, 4, 60, 1440, 40, 16)
    pkt = bytearray(bytes(_v4("A", opts=[], payload=b"abc")))
    want = bytes(pkt)
    # what the kernel hands over with NEEDS_CSUM: the pseudo-header sum in the field
    from stack.wire.checksum import pseudo_sum_v4

    pkt[36:38] = pseudo_sum_v4(bytes(pkt[12:16]), bytes(pkt[16:20]), 6, len(pkt) - 20
                               ).to_bytes(2, "big")
    assert complete_checksum(pkt, 20, 16) and bytes(pkt) == want
    assert not complete_checksum(bytearray(10), 20, 16)

"""MSS clamping behind IPv6 extension headers (bridge/mss.py, RFC 8200 §4, RFC 4302 §2.2).

scapy (tests only) builds the chains and is the independent reference for the TCP checksum.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.layers.ipsec import AH
from scapy.packet import Packet, Raw

from bridge.config import loads_config
from bridge.mss import clamp_packet
from bridge.pipeline import Bridge, Output
from stack.wire.prelude import MAX_EXT_HEADERS, V6_EXT_HEADERS, v6_tcp_offset

SRC, DST = "2001:db8:1::10", "2001:db8:2::10"
MTU = 1400  # -> MSS 1340 for IPv6


def _tcp(mss: int = 1440, flags: str = "S") -> TCP:
    return TCP(sport=40000, dport=80, flags=flags, seq=1,
               options=[("MSS", mss), ("NOP", None), ("WScale", 7), ("SAckOK", b"")])


def _pkt(*ext: Packet, tcp: Packet | None = None) -> bytearray:
    p: Packet = IPv6(src=SRC, dst=DST, hlim=64)
    for e in ext:
        p = p / e
    return bytearray(bytes(p / (tcp if tcp is not None else _tcp())))


def _mss_and_csum_ok(buf: bytearray) -> tuple[int | None, bool]:
    p = IPv6(bytes(buf))
    t = p[TCP]
    c = t.chksum
    t.chksum = None
    ok = IPv6(bytes(p))[TCP].chksum == c  # scapy recomputes over the whole chain
    return dict(t.options).get("MSS"), ok


HBH = IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\x00" * 4)])
DEST = IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 12)])  # 16 bytes: len field 1
RH = IPv6ExtHdrRouting(type=0, addresses=["2001:db8::99"], segleft=0)
FRAG0 = IPv6ExtHdrFragment(offset=0, m=0, id=7)
FRAG0_MORE = IPv6ExtHdrFragment(offset=0, m=1, id=7)


CLAMPED = [  # (chain, TCP offset)
    ((HBH,), 48),
    ((DEST,), 56),
    ((RH,), 64),
    ((FRAG0,), 48),
    ((FRAG0_MORE,), 48),  # the first fragment of several holds the whole chain (§4.5)
    ((HBH, DEST, RH, FRAG0), 40 + 8 + 16 + 24 + 8),
    ((HBH, RH, DEST), 40 + 8 + 24 + 16),
    ((DEST, RH, DEST), 40 + 16 + 24 + 16),  # Destination Options twice (§4.1)
]


@pytest.mark.parametrize("chain,tcp_at", CLAMPED)
def test_syn_behind_extension_headers_is_clamped(chain: tuple[Packet, ...], tcp_at: int
                                                 ) -> None:
    pkt = _pkt(*chain)
    assert v6_tcp_offset(pkt, 0) == (tcp_at, False)
    assert clamp_packet(pkt, 0, MTU) is True
    assert _mss_and_csum_ok(pkt) == (1340, True)


@pytest.mark.parametrize("chain", [c for c, _ in CLAMPED])
def test_syn_ack_behind_extension_headers_is_clamped_and_small_kept(
        chain: tuple[Packet, ...]) -> None:
    pkt = _pkt(*chain, tcp=_tcp(1440, "SA"))
    assert clamp_packet(pkt, 0, MTU) and _mss_and_csum_ok(pkt) == (1340, True)
    small = _pkt(*chain, tcp=_tcp(1200))
    before = bytes(small)
    assert clamp_packet(small, 0, MTU) is False and bytes(small) == before
    ack = _pkt(*chain, tcp=_tcp(1440, "A"))
    before = bytes(ack)
    assert clamp_packet(ack, 0, MTU) is False and bytes(ack) == before


def test_clamp_inside_an_encapsulated_datagram() -> None:
    """`start` > 0, as on the send path (GRE prefix before the inner packet)."""
    prefix = b"\x20\x00\x86\xdd" + bytes(4)
    buf = bytearray(prefix) + _pkt(HBH, DEST)
    assert clamp_packet(buf, len(prefix), MTU)
    assert buf[:len(prefix)] == prefix
    assert _mss_and_csum_ok(buf[len(prefix):]) == (1340, True)


def _ah(nxt: int, icv: int) -> AH:
    """An AH of 12 + `icv` bytes, its Payload Len set by hand (RFC 4302 §2.2)."""
    return AH(nh=nxt, payloadlen=(12 + icv) // 4 - 2, spi=1, seq=1, icv=b"\x00" * icv)


def _raw_ext(nxt: int, hdr_len: int, size: int) -> bytes:
    return bytes([nxt, hdr_len]) + bytes(size - 2)


def _with_raw_chain(first_nh: int, chain: bytes, tcp: bytes | None = None,
                    plen: int | None = None) -> bytearray:
    t = bytes(_tcp()) if tcp is None else tcp
    # the checksum does not matter here: these packets must stay untouched
    body = chain + t
    ip = IPv6(src=SRC, dst=DST, nh=first_nh, plen=len(body) if plen is None else plen)
    return bytearray(bytes(ip) + body)


UNTOUCHED = {
    "AH (found, not rewritten: RFC 4302 §3.3.3.1)": _pkt(_ah(6, 12)),
    "ESP": _with_raw_chain(50, bytes(16)),
    "no next header": _with_raw_chain(59, b""),
    "HBH not first": _with_raw_chain(60, _raw_ext(0, 0, 8) + _raw_ext(6, 0, 8)),
    "non-first fragment": _pkt(IPv6ExtHdrFragment(offset=185, m=0, id=7)),
    "unknown header 253": _with_raw_chain(253, _raw_ext(6, 0, 8)),
    "UDP behind HBH": _with_raw_chain(0, _raw_ext(17, 0, 8), tcp=bytes(20)),
    "length past the payload": _with_raw_chain(60, _raw_ext(6, 200, 8)),
    "TCP header cut": _with_raw_chain(60, _raw_ext(6, 0, 8), tcp=bytes(_tcp())[:19]),
    "chain cut inside a header": _with_raw_chain(43, bytes([6, 0, 0])),
    "payload length past the buffer": _with_raw_chain(0, _raw_ext(6, 0, 8), plen=5000),
    "payload length cuts the TCP header": _with_raw_chain(0, _raw_ext(6, 0, 8), plen=20),
    "too many headers": _with_raw_chain(60, _raw_ext(60, 0, 8) * MAX_EXT_HEADERS
                                        + _raw_ext(6, 0, 8)),
    "AH length past the payload": _with_raw_chain(51, _raw_ext(6, 250, 12)),
    "truncated IPv6 header": bytearray(bytes(IPv6(src=SRC, dst=DST, nh=0))[:30]),
}


@pytest.mark.parametrize("name", list(UNTOUCHED))
def test_malformed_or_unreachable_chains_are_left_alone(name: str) -> None:
    pkt = UNTOUCHED[name]
    before = bytes(pkt)
    assert clamp_packet(pkt, 0, MTU) is False
    assert bytes(pkt) == before


def test_ah_length_rule_finds_the_tcp_header() -> None:
    """AH's length counts 32-bit words minus 2 (RFC 4302 §2.2), not 8-byte units minus 1."""
    pkt = _pkt(_ah(6, 12))  # 12 + 12 = 24 bytes: Payload Len 4
    assert pkt[41] == 4
    assert v6_tcp_offset(pkt, 0) == (64, True)
    hbh = IPv6ExtHdrHopByHop(nh=51, options=[PadN(optdata=b"\x00" * 4)])
    pkt = _pkt(hbh, _ah(60, 16), DEST)  # AH of 28 bytes: Payload Len 5
    assert pkt[49] == 5
    assert v6_tcp_offset(pkt, 0) == (40 + 8 + 28 + 16, True)


def test_max_extension_headers_is_the_bound() -> None:
    ok = _with_raw_chain(60, _raw_ext(60, 0, 8) * (MAX_EXT_HEADERS - 1) + _raw_ext(6, 0, 8))
    assert v6_tcp_offset(ok, 0) == (40 + 8 * MAX_EXT_HEADERS, False)
    assert V6_EXT_HEADERS == {0, 43, 44, 51, 60}


@settings(max_examples=400, deadline=None)
@given(data=st.binary(min_size=0, max_size=200), nh=st.sampled_from([0, 43, 44, 51, 60, 6]),
       plen=st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_random_chains_never_raise(data: bytes, nh: int, plen: int | None) -> None:
    ip = IPv6(src=SRC, dst=DST, nh=nh, plen=len(data) if plen is None else plen)
    pkt = bytearray(bytes(ip) + data)
    tcp, _ah = v6_tcp_offset(pkt, 0)
    assert tcp < 0 or 40 <= tcp <= len(pkt) - 20
    clamp_packet(pkt, 0, MTU)  # whatever it decides, it does not raise
    assert len(pkt) == 40 + len(data)


# ------------------------------------------------------------- through the Bridge, both ways

_SITE = """
mss_clamp = true
[tun]
name = "t{n}"
mtu = {mtu}
[listen]
address = "{me}"
[[peers]]
name = "p"
endpoint = "{peer}:4754"
prefixes = ["{pfx}"]
"""


def _bridges() -> tuple[Bridge, Bridge]:
    a = Bridge(loads_config(_SITE.format(n="a", mtu=MTU, me="198.18.0.1", peer="198.18.0.2",
                                         pfx="2001:db8:2::/64")), 0.0)
    b = Bridge(loads_config(_SITE.format(n="b", mtu=MTU, me="198.18.0.2", peer="198.18.0.1",
                                         pfx="2001:db8:1::/64")), 0.0)
    return a, b


def test_bridge_clamps_a_syn_behind_hop_by_hop_on_send() -> None:
    a, _b = _bridges()
    out = Output()
    a.from_tun([bytes(_pkt(HBH, DEST))], 1.0, out)
    (dgram,) = out.udp[("198.18.0.2", 4754)]
    inner = bytearray(dgram[len(dgram) - len(_pkt(HBH, DEST)):])
    assert _mss_and_csum_ok(inner) == (a.peers[0].mtu - 60, True)
    assert a.counters.snapshot()["events"]["mss_clamped"] == 1


def test_bridge_clamps_a_syn_ack_behind_destination_options_on_receive() -> None:
    """The peer's own clamp is off (a bigger tunnel MTU there), so only ours can act."""
    a, b = _bridges()
    syn_ack = IPv6(src=SRC, dst="2001:db8:1::10", hlim=64) / DEST / _tcp(1440, "SA")
    syn_ack[IPv6].src = "2001:db8:2::10"
    out = Output()
    b_to_a = bytes(syn_ack)
    b.mss_clamp = False
    b.from_tun([b_to_a], 1.0, out)
    (dgram,) = out.udp[("198.18.0.1", 4754)]
    assert _mss_and_csum_ok(bytearray(dgram[len(dgram) - len(b_to_a):]))[0] == 1440
    a.mss_clamp = True
    out_a = Output()
    a.from_udp([(dgram, ("198.18.0.2", 4754))], 1.0, out_a)
    (inner,) = out_a.tun
    assert _mss_and_csum_ok(bytearray(inner)) == (a.peers[0].mtu - 60, True)
    assert a.counters.snapshot()["events"]["mss_clamped"] == 1


def test_no_syn_unchanged_and_raw_payload_kept() -> None:
    pkt = _pkt(HBH, tcp=_tcp(1440, "A") / Raw(b"x" * 100))
    before = bytes(pkt)
    assert clamp_packet(pkt, 0, MTU) is False and bytes(pkt) == before

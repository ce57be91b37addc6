"""Inspection is not evaded by framing: a TCP SYN behind IPv6 extension headers, or the first
fragment of a TCP datagram, to a port an [[inspect]] rule selects never passes the Terminator
uninspected (stack/wire/prelude.py tcp_key)."""

from __future__ import annotations

import struct

import pytest
from test_terminate_bridge import CLIENT, CLIENT6, SERVER, SERVER6, bridges, ip_packet

from bridge.pipeline import Output
from stack.wire.tcp import SYN, TcpSegment


def _with_dest_opts(pkt: bytes) -> bytes:
    """The IPv6 packet with an 8-byte Destination Options header (PadN) before its TCP."""
    opts = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next header TCP, length 0 (8 bytes), PadN(4)
    b = bytearray(pkt[:40]) + opts + pkt[40:]
    struct.pack_into(">H", b, 4, len(b) - 40)
    b[6] = 60  # Destination Options
    return bytes(b)


def _first_fragment_v4(pkt: bytes, cut: int) -> bytes:
    """The first fragment (MF, offset 0) of an IPv4 packet: its header and `cut` bytes."""
    from stack.wire.checksum import checksum

    ihl = (pkt[0] & 15) * 4
    b = bytearray(pkt[:ihl + cut])
    struct.pack_into(">H", b, 2, len(b))
    b[6] = 0x20  # MF, offset 0 (and no DF)
    b[7] = 0
    b[10:12] = b"\0\0"
    struct.pack_into(">H", b, 10, checksum(bytes(b[:ihl])))
    return bytes(b)


def test_a_syn_behind_a_destination_options_header_is_terminated() -> None:
    a, _b = bridges()
    syn = ip_packet(a, CLIENT6, SERVER6, TcpSegment(40010, 80, 7, 0, SYN, 500, mss=1400))
    out = Output()
    a.from_tun([_with_dest_opts(syn)], 0.0, out)
    assert len(a.flows(0.0)) == 1  # a splice: the flow is inspected like any other
    # accept first: the client leg answers it; nothing of the client's went out upstream
    assert not out.udp.get(("198.18.0.2", 4754))


def test_a_syn_behind_extension_headers_to_an_unselected_port_is_forwarded() -> None:
    a, _b = bridges()
    syn = ip_packet(a, CLIENT6, SERVER6, TcpSegment(40011, 8080, 7, 0, SYN, 500, mss=1400))
    out = Output()
    a.from_tun([_with_dest_opts(syn)], 0.0, out)
    assert not a.flows(0.0)
    (dgram,) = out.udp[("198.18.0.2", 4754)]
    assert bytes(dgram).find(bytes([6, 0, 1, 4, 0, 0, 0, 0])) > 0  # as the client sent it


@pytest.mark.parametrize("port,forwarded", [(80, False), (8080, True)])
def test_the_first_fragment_of_a_syn_is_judged_by_the_rules(port: int, forwarded: bool) -> None:
    """To a selected port, the first fragment (a full TCP header, half the payload) is the
    Terminator's: incomplete, it fails the TCP checksum and is dropped, counted; to an
    unselected port it is forwarded as sent."""
    a, _b = bridges()
    syn = ip_packet(a, CLIENT, SERVER, TcpSegment(40012, port, 7, 0, SYN, 500, mss=1400,
                                                 payload=bytes(64)))
    out = Output()
    a.from_tun([_first_fragment_v4(syn, 24)], 0.0, out)
    assert bool(out.udp) is forwarded and not a.flows(0.0)
    assert sum(a.terminator.drops.values()) == (0 if forwarded else 1)  # type: ignore[union-attr]


def test_a_tiny_first_fragment_is_judged_by_its_ports() -> None:
    """RFC 1858 §3: a first fragment with only 8 bytes of TCP (ports, no flags) to a selected
    port is dropped; to an unselected one it passes."""
    a, _b = bridges()
    for port, forwarded in ((80, False), (8080, True)):
        syn = ip_packet(a, CLIENT, SERVER, TcpSegment(40014, port, 7, 0, SYN, 500, mss=1400))
        out = Output()
        a.from_tun([_first_fragment_v4(syn, 8)], 0.0, out)
        assert bool(out.udp) is forwarded and not a.flows(0.0)

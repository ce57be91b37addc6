"""Issue 9, defect 1: a packet whose IPv6 header chain cannot be walked to its end (more than
MAX_EXT_HEADERS headers, truncated, an extension header we do not walk) and whose addresses an
[[inspect]] rule covers is never forwarded, by either backend: it is dropped and counted as
"uninspectable" (stack/wire/prelude.py `uninspectable`, applied by the Bridge in both directions).

On main before the fix, a SYN to an inspected port behind 9 or 12 Destination Options headers
was not keyed by the Terminator and went out through the tunnel as sent."""

from __future__ import annotations

import struct

import pytest
from test_terminate_bridge import CLIENT6, SERVER6, SITE, bridges, ip_packet

from bridge.config import loads_config
from bridge.encap import GreEncoder
from bridge.pipeline import Bridge, Output
from stack.wire.prelude import MAX_EXT_HEADERS, V6_NO_TCP, V6_UNWALKABLE, v6_tcp_offset
from stack.wire.tcp import SYN, TcpSegment

PEER = ("198.18.0.2", 4754)
DEST_OPT = bytes([60, 0, 1, 4, 0, 0, 0, 0])  # next header Destination Options, PadN(4)


def behind_chain(pkt: bytes, count: int, last_next: int = 6, head: int = 60) -> bytes:
    """The IPv6 packet with `count` 8-byte extension headers (the first of type `head`, the
    rest Destination Options) before its upper-layer header `last_next`."""
    chain = bytearray(DEST_OPT * count)
    chain[8 * (count - 1)] = last_next
    b = bytearray(pkt[:40]) + chain + pkt[40:]
    struct.pack_into(">H", b, 4, len(b) - 40)
    b[6] = head
    return bytes(b)


def syn6(port: int = 80, sport: int = 40100) -> bytes:
    a, _b = bridges()
    return ip_packet(a, CLIENT6, SERVER6, TcpSegment(sport, port, 7, 0, SYN, 500, mss=1400))


def sent_as_is(out: Output, pkt: bytes) -> bool:
    """True when a datagram to the peer carries `pkt`'s extension chain (the client's bytes)."""
    return any(bytes(d).find(pkt[40:40 + 16]) > 0 for d in out.udp.get(PEER, []))


@pytest.mark.parametrize("count", [1, 8, 9, 12])
def test_a_syn_behind_n_destination_options_never_passes_uninspected(count: int) -> None:
    a, _b = bridges()
    pkt = behind_chain(syn6(), count)
    out = Output()
    a.from_tun([pkt], 0.0, out)
    assert not sent_as_is(out, pkt)
    if count <= MAX_EXT_HEADERS:
        assert len(a.flows(0.0)) == 1  # walked: terminated like any SYN
        assert a.counters.drop("uninspectable") == 0
    else:
        assert not a.flows(0.0) and not out.udp  # cannot be walked: dropped, counted
        assert a.counters.drop("uninspectable") == 1


@pytest.mark.parametrize("head", [135, 139, 140, 253, 254])
def test_an_extension_header_we_do_not_walk_is_uninspectable(head: int) -> None:
    a, _b = bridges()
    pkt = behind_chain(syn6(), 2, head=head)
    out = Output()
    a.from_tun([pkt], 0.0, out)
    assert not out.udp and a.counters.drop("uninspectable") == 1


def test_truncated_tcp_header_behind_a_chain_is_uninspectable() -> None:
    a, _b = bridges()
    full = behind_chain(syn6(), 1)
    pkt = bytearray(full[:40 + 8 + 12])
    struct.pack_into(">H", pkt, 4, len(pkt) - 40)
    out = Output()
    a.from_tun([bytes(pkt)], 0.0, out)
    assert not out.udp and a.counters.drop("uninspectable") == 1


def test_an_uncovered_destination_passes_as_sent() -> None:
    """Only addresses a rule covers are guarded: the same 12-header SYN to a destination no
    rule selects is someone else's business and goes out untouched."""
    cfg = loads_config(SITE.format(
        side="a", tun4="198.18.100.1/30", tun6="2001:db8:100::1/64", listen="198.18.0.1",
        endpoint="198.18.0.2", seq="off", prefixes='"198.18.20.0/24", "2001:db8:20::/48"')
        + '[[inspect]]\nname = "one"\ndst = ["2001:db8:20::99/128"]\ndst_ports = [80]\n'
          'inspectors = ["log"]\nbackend = "userspace"\n')
    a = Bridge(cfg, 0.0)
    pkt = behind_chain(syn6(), 12)
    out = Output()
    a.from_tun([pkt], 0.0, out)
    assert sent_as_is(out, pkt) and a.counters.drop("uninspectable") == 0


def test_the_kernel_backend_gets_the_same_rule() -> None:
    """With only a kernel-backend rule there is no Terminator; a packet nftables could not
    classify reaches the TUN, and the Bridge drops it rather than tunnel it."""
    cfg = loads_config(SITE.format(
        side="a", tun4="198.18.100.1/30", tun6="2001:db8:100::1/64", listen="198.18.0.1",
        endpoint="198.18.0.2", seq="off", prefixes='"198.18.20.0/24", "2001:db8:20::/48"')
        + '[[inspect]]\nname = "k"\ndst_ports = [80]\ninspectors = ["log"]\n'
          'backend = "kernel"\n')
    a = Bridge(cfg, 0.0)
    assert a.terminator is None
    out = Output()
    a.from_tun([behind_chain(syn6(), 9, head=253)], 0.0, out)
    a.from_tun([behind_chain(syn6(), 12)], 0.0, out)
    assert not out.udp and a.counters.drop("uninspectable") == 2


def test_from_the_tunnel_too() -> None:
    """Decapsulated packets pass the same rule before they reach the TUN."""
    _a, b = bridges()
    cfg = loads_config(SITE.format(
        side="b", tun4="198.18.100.2/30", tun6="2001:db8:100::2/64", listen="198.18.0.2",
        endpoint="198.18.0.1", seq="off", prefixes='"198.18.10.0/24", "2001:db8:10::/48"')
        + '[[inspect]]\nname = "k"\ndst = ["2001:db8:20::/48"]\ninspectors = ["log"]\n'
          'backend = "kernel"\n')
    b = Bridge(cfg, 0.0)
    enc = GreEncoder(42, False, False)
    # a packet from a host of the peer's site to an inspected address of this site
    inner = behind_chain(syn6(), 12)
    inner = inner[:8] + CLIENT6 + SERVER6 + inner[40:]
    dgram = enc.wrap(inner, True)
    enc.seal(dgram)
    out = Output()
    b.from_udp([(bytes(dgram), ("198.18.0.1", 4754))], 0.0, out)
    assert not out.tun and b.counters.drop("uninspectable") == 1


def test_the_walker_tells_unwalkable_from_not_tcp() -> None:
    syn = syn6()
    assert v6_tcp_offset(behind_chain(syn, 8), 0)[0] == 40 + 64
    assert v6_tcp_offset(behind_chain(syn, 9), 0)[0] == V6_UNWALKABLE
    assert v6_tcp_offset(behind_chain(syn, 2, head=253), 0)[0] == V6_UNWALKABLE
    udp = behind_chain(syn, 2, last_next=17)
    assert v6_tcp_offset(udp, 0)[0] == V6_NO_TCP
    assert v6_tcp_offset(behind_chain(syn, 2, last_next=59), 0)[0] == V6_NO_TCP

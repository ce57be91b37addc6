"""The host's own link chatter on the TUN (router solicitations, MLD reports) is counted as
"link_local", never as "no_route", and answered with no ICMP (bridge/peers.py link_scope)."""

from __future__ import annotations

import ipaddress

import pytest
from grebe_sites import site_config
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (
    ICMPv6MLReport2,
    ICMPv6ND_RS,
    IPv6,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)

from bridge.peers import link_scope
from bridge.pipeline import Bridge, Output

LINK_SCOPE = ["ff02::16", "ff02::2", "ff02::1:ff00:1", "ff01::1", "ff12::1234", "ff00::1",
              "fe80::1", "febf::1", "224.0.0.22", "224.0.0.251", "169.254.1.1"]
ROUTABLE_SCOPE = ["ff05::2", "ff0e::1", "ff15::1", "fec0::1", "fe7f::1", "2001:db8:99::1",
                  "224.0.1.1", "239.1.1.1", "169.253.1.1", "198.18.99.1", "225.0.0.1"]


@pytest.mark.parametrize("addr", LINK_SCOPE)
def test_link_scope(addr: str) -> None:
    assert link_scope(ipaddress.ip_address(addr).packed)


@pytest.mark.parametrize("addr", ROUTABLE_SCOPE)
def test_not_link_scope(addr: str) -> None:
    assert not link_scope(ipaddress.ip_address(addr).packed)


def _mld_report() -> bytes:  # what the kernel sends from :: at link up (RFC 3810 §5.2)
    return bytes(IPv6(src="::", dst="ff02::16", hlim=1)
                 / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / ICMPv6MLReport2())


def _rs() -> bytes:  # RFC 4861 §4.1
    return bytes(IPv6(src="fe80::1", dst="ff02::2", hlim=255) / ICMPv6ND_RS())


def test_kernel_chatter_counts_link_local_not_no_route() -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    mdns = bytes(IP(src="198.18.100.1", dst="224.0.0.251", ttl=255) / UDP(sport=5353,
                                                                          dport=5353))
    b.from_tun([_mld_report(), _rs(), mdns], 0, out)
    drops = b.counters.snapshot()["drops"]
    assert drops["link_local"] == 3 and drops["no_route"] == 0
    assert not out.tun and not out.udp  # no ICMP errors about our own chatter
    assert b.counters.snapshot()["events"]["icmp_sent"] == 0


def test_unrouted_global_destinations_still_count_no_route() -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    b.from_tun([bytes(IPv6(src="2001:db8:10::5", dst="ff05::2") / UDP()),
                bytes(IPv6(src="2001:db8:10::5", dst="2001:db8:99::1") / UDP())], 0, out)
    drops = b.counters.snapshot()["drops"]
    assert drops["no_route"] == 2 and drops["link_local"] == 0
    assert len(out.tun) == 1  # the unicast one gets its ICMPv6 unreachable


def test_link_local_is_a_prometheus_drop_reason() -> None:
    b = Bridge(site_config("a"), 0)
    b.from_tun([_mld_report()], 0, Output())
    assert 'reason="link_local"} 1' in b.metrics_text()

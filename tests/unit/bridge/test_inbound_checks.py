"""Inbound checks of issue 12 (plain mode) with the sans-I/O Bridge: liveness only from
datagrams that pass every check; the inner destination must be a unicast address of this
site (not multicast, broadcast, loopback, unspecified, link-local, nor routed back into the
tunnel, except between two peers of a hub)."""

from __future__ import annotations

import pytest
from grebe_sites import A_ADDR, B_ADDR, Pair, v4, v6

from bridge.output import Output


def _send(pair: Pair, pkts: list[bytes], now: float) -> Output:
    """Packets from site A's TUN, through A, into B; B's output."""
    oa, ob = Output(), Output()
    pair.a.from_tun(pkts, now, oa)
    pair.b.from_udp([(d, A_ADDR) for d in oa.udp.get(B_ADDR, [])], now, ob)
    return ob


@pytest.mark.parametrize("sequence", ["off", "drop-late"])
def test_spoofed_inner_sources_do_not_keep_a_peer_alive(sequence: str) -> None:
    pair = Pair(f'key = 3\nsequence = "{sequence}"\nkeepalive = 0\ndead_after = 6\n'
                'down_action = "withdraw"')
    b = pair.b
    assert _send(pair, [v4()], 1.0).tun  # heard at 1.0
    for t in range(2, 12):  # then only spoofed inner sources from A's address and key
        spoofed = v4(src="198.18.30.1") if t % 2 else v6(src="2001:db8:30::1")
        assert not _send(pair, [spoofed], t).tun
    assert b.counters.drop("spoofed_source") == 10
    assert b.status(6.5)["peers"][0]["last_seen_s"] == 5.5
    out = Output()
    b.handle_timer(7.0, out)
    assert b.status(7.0)["peers"][0]["up"] is False and b.counters.event("peer_down") == 1
    _send(pair, [v4(src="198.18.30.1")], 8.0)
    assert b.status(8.0)["peers"][0]["up"] is False  # still down: withdraw holds
    assert _send(pair, [v4()], 9.0).tun
    assert b.status(9.0)["peers"][0]["up"] is True and b.counters.event("peer_up") == 1


def test_sequence_drops_do_not_count_as_heard() -> None:
    pair = Pair('key = 3\nsequence = "drop-late"\nkeepalive = 0\ndead_after = 6')
    oa = Output()
    pair.a.from_tun([v4(), v4()], 0.0, oa)
    d0, d1 = oa.udp[B_ADDR]
    ob = Output()
    pair.b.from_udp([(d1, A_ADDR)], 1.0, ob)
    pair.b.from_udp([(d0, A_ADDR)], 3.0, ob)  # late: dropped, not heard
    assert len(ob.tun) == 1 and pair.b.counters.drop("sequence") == 1
    assert pair.b.status(3.0)["peers"][0]["last_seen_s"] == 2.0


def test_a_keepalive_still_counts_as_heard() -> None:
    # Plain keepalives carry nothing to check beyond address and key (documented in
    # bridge/pipeline.py): they must keep an idle tunnel up.
    pair = Pair("key = 3\nkeepalive = 2\ndead_after = 6")
    oa = Output()
    pair.a.handle_timer(2.0, oa)
    ob = Output()
    pair.b.from_udp([(oa.udp[B_ADDR][0], A_ADDR)], 5.0, ob)
    assert pair.b.status(5.0)["peers"][0]["last_seen_s"] == 0.0


# ------------------------------------------------------------------ inner destination


def _from_a(pair: Pair, pkt: bytes, now: float = 0.0) -> Output:
    """One datagram as A's endpoint would send it, whatever its inner destination."""
    d = pair.a.peers[0].encoder.wrap(pkt, pkt[0] >> 4 == 6)
    ob = Output()
    pair.b.from_udp([(bytes(d), A_ADDR)], now, ob)
    return ob


MARTIANS = ["224.0.0.1", "239.1.2.3", "255.255.255.255", "198.18.100.3", "127.0.0.1",
            "0.0.0.0", "0.1.2.3", "169.254.1.1", "240.0.0.1",
            "ff02::1", "ff0e::1", "::", "::1", "fe80::1"]


@pytest.mark.parametrize("dst", MARTIANS)
def test_a_peer_cannot_send_to_addresses_no_site_host_has(dst: str) -> None:
    pair = Pair("key = 3")  # B's TUN is 198.18.100.2/30: 198.18.100.3 is its broadcast
    pkt = v6(dst=dst) if ":" in dst else v4(dst=dst)
    assert not _from_a(pair, pkt).tun
    assert pair.b.counters.drop("bad_destination") == 1
    assert pair.b.status(0.0)["drops"]["bad_destination"] == 1
    assert 'grebe_drops_total{reason="bad_destination"} 1' in pair.b.metrics_text()


@pytest.mark.parametrize("dst", ["198.18.10.9", "2001:db8:10::9"])
def test_a_destination_routed_back_to_the_same_peer_is_a_hairpin(dst: str) -> None:
    pair = Pair("key = 3")  # 198.18.10.0/24 and 2001:db8:10::/48 are site A's
    pkt = v6(dst=dst) if ":" in dst else v4(dst=dst)
    assert not _from_a(pair, pkt).tun
    assert pair.b.counters.drop("hairpin") == 1
    assert 'grebe_drops_total{reason="hairpin"} 1' in pair.b.metrics_text()


@pytest.mark.parametrize("dst", ["198.18.20.7", "198.18.99.1", "2001:db8:20::7",
                                 "198.18.100.1"])
def test_unicast_destinations_of_the_site_still_pass(dst: str) -> None:
    pair = Pair("key = 3")
    pkt = v6(dst=dst) if ":" in dst else v4(dst=dst)
    assert len(_from_a(pair, pkt).tun) == 1
    assert pair.b.counters.total_drops == 0


HUB = """
[tun]
name = "gbhub"
addresses = ["198.18.100.1/24"]

[listen]
address = "198.18.0.1"

[[peers]]
name = "b"
endpoint = "198.18.0.2:4754"
prefixes = ["198.18.2.0/24"]
key = 42

[[peers]]
name = "c"
endpoint = "198.18.0.3:4754"
prefixes = ["198.18.3.0/24"]
key = 42
"""


def test_a_hub_forwards_between_its_peers_but_not_back() -> None:
    from bridge.config import loads_config
    from bridge.encap import GreEncoder
    from bridge.pipeline import Bridge

    hub = Bridge(loads_config(HUB), 0.0)
    enc = GreEncoder(42, False, False)
    out = Output()
    hub.from_udp([(bytes(enc.wrap(v4(src="198.18.2.5", dst="198.18.3.5"), False)),
                   ("198.18.0.2", 4754))], 0.0, out)
    assert len(out.tun) == 1  # spoke b to spoke c: the kernel sends it on to c
    hub.from_udp([(bytes(enc.wrap(v4(src="198.18.2.5", dst="198.18.2.6"), False)),
                   ("198.18.0.2", 4754)),
                  (bytes(enc.wrap(v4(src="198.18.2.5", dst="198.18.100.255"), False)),
                   ("198.18.0.2", 4754))], 0.0, out)
    assert len(out.tun) == 1
    assert hub.counters.drop("hairpin") == 1 and hub.counters.drop("bad_destination") == 1

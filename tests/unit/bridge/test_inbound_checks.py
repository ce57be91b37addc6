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

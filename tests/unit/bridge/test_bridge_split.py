"""One process per direction (bridge/io/split.py), the parts without a fork: the receiving
copy's timer (`rx_only`), liveness handed over (`note_heard`), counters added up
(`Counters.merged`, `merge_status`). The lab tests run every endpoint split."""

from __future__ import annotations

from grebe_sites import A_ADDR, B_ADDR, Pair, v4

from bridge.counters import Counters
from bridge.io.split import merge_status
from bridge.pipeline import Output


def test_rx_only_timer_flushes_reorder_and_sends_nothing() -> None:
    pair = Pair('keepalive = 2\ndead_after = 6\nsequence = "reorder"')
    a, b = pair.a, pair.b
    b.rx_only = True
    assert b.get_timer() is None  # no keepalive, no liveness deadline in the receiving copy
    oa = Output()
    a.from_tun([v4(), v4()], 1.0, oa)
    first, second = oa.udp[B_ADDR]
    ob = Output()
    b.from_udp([(second, A_ADDR)], 1.0, ob)  # out of order: held
    assert not ob.tun and b.get_timer() is not None
    b.handle_timer(100.0, ob)  # long after dead_after and every keepalive
    assert len(ob.tun) == 1 and not ob.udp  # the flush only
    assert b.status(100.0)["peers"][0]["up"] is True
    assert b.counters.event("keepalive_tx") == 0 and b.counters.event("peer_down") == 0


def test_note_heard_keeps_a_peer_up_and_brings_it_back() -> None:
    pair = Pair('keepalive = 2\ndead_after = 6\ndown_action = "withdraw"')
    a = pair.a  # the sending process: it never receives, the other process tells it
    out = Output()
    a.note_heard(0, 5.0)
    a.handle_timer(8.0, out)
    assert a.status(8.0)["peers"][0]["up"] is True  # heard at 5: dead only at 11
    a.handle_timer(11.0, out)
    assert a.status(11.0)["peers"][0]["up"] is False
    a.note_heard(0, 4.0)  # older than what it knows: nothing
    assert a.status(11.0)["peers"][0]["up"] is False
    a.note_heard(0, 12.0)
    st = a.status(12.0)["peers"][0]
    assert st["up"] is True and st["last_seen_s"] == 0.0
    assert a.counters.event("peer_up") == 1 and a.counters.event("peer_down") == 1


def test_counters_merged_adds_every_list() -> None:
    a, b = Counters(["x", "y"]), Counters(["x", "y"])
    a.drops[3] = 2
    b.drops[3] = 5
    b.events[1] = 7
    a.tx_packets[1] = 4
    b.rx_packets[1] = 9
    b.rx_bytes[0] = 100
    m = a.merged(b.export())
    assert m.drops[3] == 7 and m.events[1] == 7 and m.tx_packets[1] == 4
    assert m.rx_packets == [0, 9] and m.rx_bytes == [100, 0]
    assert a.drops[3] == 2  # the operands are untouched
    assert 'grebe_peer_rx_packets_total{peer="y"} 9' in m.prometheus()


def test_merge_status_adds_the_receiving_side() -> None:
    pair = Pair('sequence = "reorder"')
    a, b = pair.a, pair.b
    oa = Output()
    a.from_tun([v4(), v4(), v4()], 1.0, oa)
    d = oa.udp[B_ADDR]
    ob = Output()
    b.from_udp([(d[0], A_ADDR), (d[2], A_ADDR), (b"\x00" * 3, A_ADDR)], 1.0, ob)
    parent = pair.b.__class__(pair.b.config, 0.0)  # the sending half: nothing received
    st = parent.status(1.0)
    exp = b.counters.export()
    child = {"counters": exp, "seq": [[len(p.seq.held), p.seq.flushes] for p in b.peers],
             "io": {"udp_recvs": 3, "tun_writes": 1, "udp_gso": True}}
    merge_status(st, child)
    p = st["peers"][0]
    assert p["rx_packets"] == 2 and p["sequence"]["held"] == 1
    assert st["drops"]["malformed"] == 1
    assert st["io"]["udp_recvs"] == 3 and st["io"]["processes"] == 2
    assert "udp_gso" not in st["io"]  # flags are not added up

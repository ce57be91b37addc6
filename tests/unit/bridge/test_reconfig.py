"""Hot reload of a running Bridge (bridge/reconfig.py): peers added, removed and changed
take effect at once; an unchanged peer keeps its state (sequence numbers, liveness,
counters), so the traffic it carries does not notice."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_network

import pytest
from grebe_sites import A_ADDR, B_ADDR, Pair, syn6, v4

from bridge.config import Config, loads_config
from bridge.encap import decode_gre
from bridge.pipeline import Bridge, Output
from bridge.reconfig import needs_secure_socket, needs_terminator, reconfigure, same_wire

C_ADDR = ("198.18.0.3", 4754)
PEER_C = '''
[[peers]]
name = "site-c"
endpoint = "198.18.0.3:4754"
prefixes = ["198.18.30.0/24"]
key = 9
'''


def _with_c() -> Config:
    return loads_config(_text() + PEER_C)


def _text() -> str:
    """Site A's file (grebe_sites.site_config's template), key 5 and drop-late."""
    import grebe_sites

    return grebe_sites.SITE.format(
        name="a", tun_addrs='"198.18.100.1/30", "2001:db8:100::1/64"', mtu='"auto"',
        listen="198.18.0.1", underlay=1500, icmp_rate=1000.0, icmp_burst=1000,
        fragment="true", peer="site-b", endpoint="198.18.0.2:4754",
        prefixes='"198.18.20.0/24", "2001:db8:20::/48"',
        peer_extra='key = 5\nsequence = "drop-late"')


def _seqs(dgs: list[bytes]) -> list[int]:
    return [decode_gre(d, 5, False)[2] for d in dgs]


def test_adding_a_peer_keeps_the_running_peer_untouched() -> None:
    pair = Pair('key = 5\nsequence = "drop-late"')
    a = pair.a
    for t in range(3):  # site-b's traffic both ways: sequence numbers 0..2 out, 0..2 in
        _oa, ob = pair.a_to_b([v4()], float(t))
        assert len(ob.tun) == 1
        back = Output()
        pair.b.from_tun([v4(src="198.18.20.5", dst="198.18.10.5")], float(t), back)
        got = Output()
        a.from_udp([(d, B_ADDR) for d in back.udp[A_ADDR]], float(t), got)
        assert len(got.tun) == 1
    b_state = a.peers[0]
    rx_before = a.counters.rx_packets[0]
    new = _with_c()
    done = reconfigure(a, new, 10.0)
    assert (done.kept, done.added, done.renewed, done.removed) == (("site-b",), ("site-c",),
                                                                   (), ())
    assert a.peers[0] is b_state and a.counters.rx_packets[0] == rx_before
    # site-b's sequence numbers go on where they were: B's drop-late receiver sees no restart
    oa, ob = pair.a_to_b([v4()], 11.0)
    assert _seqs(oa.udp[B_ADDR]) == [3] and len(ob.tun) == 1
    assert pair.b.counters.total_drops == 0
    # site-c is routed, with its own key and its sequence from 0
    out = Output()
    a.from_tun([v4(dst="198.18.30.7")], 11.0, out)
    (dg,) = out.udp[C_ADDR]
    assert decode_gre(dg, 9, False)[0] == -1
    st = a.status(11.0)
    assert [p["name"] for p in st["peers"]] == ["site-b", "site-c"]
    assert st["peers"][1]["tx_packets"] == 1 and st["peers"][0]["rx_packets"] == 3
    # datagrams from site-c are accepted (source inside its prefixes)
    assert a.table.by_host("198.18.0.3") == (1,)


def test_changed_and_removed_peers_take_effect() -> None:
    pair = Pair('key = 5\nsequence = "drop-late"')
    a = pair.a
    a.counters.tx_packets[0] += 7
    cfg = a.config
    b = cfg.peers[0]
    # prefixes only: the state stays, the new prefix is routed, the old one no longer
    moved = replace(cfg, peers=(replace(b, prefixes=(*b.prefixes[1:],
                                                     ip_network("198.18.21.0/24"))),))
    state = a.peers[0]
    done = reconfigure(a, moved, 1.0)
    assert done.kept == ("site-b",) and a.peers[0] is state
    out = Output()
    a.from_tun([v4(dst="198.18.21.1"), v4(dst="198.18.20.1")], 1.0, out)
    assert len(out.udp[B_ADDR]) == 1 and a.counters.drop("no_route") == 1
    # a new key: a fresh peer state (the encoder carries the key), counters by name kept
    rekeyed = replace(moved, peers=(replace(moved.peers[0], key_in=6, key_out=6),))
    assert not same_wire(moved.peers[0], rekeyed.peers[0])
    done = reconfigure(a, rekeyed, 2.0)
    assert done.renewed == ("site-b",) and a.peers[0] is not state
    assert a.peers[0].key_in == 6 and a.counters.tx_packets[0] == 8
    out = Output()
    a.from_tun([v4(dst="198.18.21.1")], 2.0, out)
    (dg,) = out.udp[B_ADDR]
    assert decode_gre(dg, 6, False)[0] == -1 and decode_gre(dg, 5, False)[0] != -1
    # B still speaks key 5: its datagrams are now refused by the key check
    back = Output()
    pair.b.from_tun([v4(src="198.18.20.5", dst="198.18.10.5")], 2.0, back)
    a.from_udp([(d, B_ADDR) for d in back.udp[A_ADDR]], 2.0, Output())
    assert a.counters.drop("wrong_key") == 1
    # removed: no route, no peer for its address, its counters gone
    gone = replace(rekeyed, peers=())
    done = reconfigure(a, gone, 3.0)
    assert done.removed == ("site-b",) and a.peers == [] and a.counters.peer_names == ()
    a.from_tun([v4(dst="198.18.21.1")], 3.0, Output())
    assert a.counters.drop("no_route") == 2 and a.table.by_host("198.18.0.2") == ()


def test_liveness_and_mss_clamp_in_place() -> None:
    pair = Pair("keepalive = 2\ndead_after = 6")
    a = pair.a
    a.heard(a.peers[0], 5.0)
    cfg = a.config
    new = replace(cfg, mss_clamp=False,
                  peers=(replace(cfg.peers[0], keepalive=1.0, dead_after=4.0),))
    reconfigure(a, new, 5.0)
    p = a.peers[0]
    assert (p.keepalive, p.dead_after, p.last_rx, a.mss_clamp) == (1.0, 4.0, 5.0, False)
    a.handle_timer(9.5, Output())
    assert a.status(9.5)["peers"][0]["up"] is False


def test_secure_and_terminator_changes_are_refused_untouched() -> None:
    pair = Pair()
    a = pair.a
    cfg = a.config
    assert not needs_secure_socket(cfg, cfg)
    rule = loads_config(_text() + '[[inspect]]\nname = "u"\nbackend = "userspace"\n'
                        'dst_ports = [80]\ninspectors = ["log"]\n')
    assert needs_terminator(cfg, rule)
    before = list(a.peers)
    with pytest.raises(ValueError, match="userspace"):
        reconfigure(a, rule, 1.0)
    assert a.peers == before and a.config is cfg


def _behind_experimental_header(pkt: bytes) -> bytes:
    """`pkt` (IPv6) behind one extension header of type 253 (RFC 3692), which the header
    walker does not walk: its ports cannot be read (stack/wire/prelude.py `uninspectable`)."""
    b = bytearray(pkt[:40]) + bytes([pkt[6], 0, 1, 4, 0, 0, 0, 0]) + pkt[40:]
    b[4:6] = (len(b) - 40).to_bytes(2, "big")
    b[6] = 253
    return bytes(b)


def test_a_reload_moves_the_uninspectable_guard_with_the_rules() -> None:
    """Issue 9's guard (a packet whose ports cannot be read is dropped when an [[inspect]]
    rule covers its addresses) follows [[inspect]] rules added and removed by a reload."""
    a = Bridge(loads_config(_text()), 0.0)
    pkt = _behind_experimental_header(syn6())

    def sent() -> bool:
        out = Output()
        a.from_tun([pkt], 1.0, out)
        return bool(out.udp)

    assert sent() and a.counters.drop("uninspectable") == 0
    rule = loads_config(_text() + '[[inspect]]\nname = "k"\ndst_ports = [80]\n'
                        'inspectors = ["log"]\nbackend = "kernel"\n')
    reconfigure(a, rule, 1.0)
    assert not sent() and a.counters.drop("uninspectable") == 1
    reconfigure(a, loads_config(_text()), 2.0)
    assert sent() and a.counters.drop("uninspectable") == 1


def test_userspace_rules_change_for_new_flows_only() -> None:
    """A changed userspace rule: new SYNs follow it (the flow table's selector), the old
    chain is retired under another name (flows still using it keep it), an unchanged rule
    keeps its chain."""
    rules = ('[[inspect]]\nname = "web"\nbackend = "userspace"\ndst_ports = [80]\n'
             'inspectors = ["log"]\n[[inspect]]\nname = "ssh"\nbackend = "userspace"\n'
             'dst_ports = [22]\ninspectors = ["log"]\n')
    old = loads_config(_text() + rules)
    a = Bridge(old, 0.0)
    term = a.terminator
    assert term is not None
    ssh, web = term.manager.chains["ssh"], term.manager.chains["web"]
    selector = term.table.selector
    new = loads_config(_text() + rules.replace("[80]", "[80, 8080]"))
    reconfigure(a, new, 1.0)
    assert a.terminator is term and term.table.selector is not selector
    chains = term.manager.chains
    assert chains["ssh"] is ssh and chains["web~1"] is web and chains["web"] is not web
    assert [r.dst_ports for r in term.rules if r.name == "web"] == [((80, 80), (8080, 8080))]


def test_scrub_rules_added_by_a_reload_apply_and_keep_the_sequence_state() -> None:
    """A reload that adds a [[scrub]] deny rule and a peer: the rule applies at once to
    the kept peer's inbound packets, and that peer's drop-late receiver keeps its place
    (bridge/seqpolicy.py `filtered` carries the state), so nothing after looks late."""
    pair = Pair('key = 5\nsequence = "drop-late"')
    a = pair.a

    def back(t: float, src: str) -> int:
        out = Output()
        pair.b.from_tun([v4(src=src, dst="198.18.10.5")], t, out)
        got = Output()
        a.from_udp([(d, B_ADDR) for d in out.udp[A_ADDR]], t, got)
        return len(got.tun)

    assert [back(float(t), "198.18.20.5") for t in range(3)] == [1, 1, 1]
    last = a.peers[0].seq.last
    new = loads_config(_text() + PEER_C + '[[scrub]]\naction = "deny"\ndirection = "in"\n'
                       'src = ["198.18.20.66/32"]\n')
    done = reconfigure(a, new, 10.0)
    assert done.kept == ("site-b",) and a.scrub is not None
    assert a.peers[0].seq.last == last  # the sequence state survived the new filter
    assert back(11.0, "198.18.20.66") == 0  # denied by the new rule
    assert back(12.0, "198.18.20.5") == 1  # the next one is in order, delivered
    assert a.counters.drop("scrub_denied") == 1 and a.counters.drop("sequence") == 0
    # and a reload that removes the rule unwraps the filter, again keeping the state
    done = reconfigure(a, _with_c(), 20.0)
    assert a.scrub is None and back(21.0, "198.18.20.66") == 1
    assert a.counters.drop("sequence") == 0

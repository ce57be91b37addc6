"""[[scrub]] rules (bridge/scrub.py): first match, deny, token buckets per peer and prefix,
both directions, TSO super-packets, GRO batches, counters, config errors, zero state
without rules."""

from __future__ import annotations

import pytest
from grebe_sites import A_ADDR, B_ADDR, site_config, v4, v6

from bridge.config import ConfigErrors, loads_config
from bridge.encap import GreHeader, build_gre
from bridge.gro import GroBatch
from bridge.pipeline import Bridge, Output
from bridge.scrub import Action, Bucket, Direction, parse_scrub


def _rules(text: str) -> str:
    return "\n" + text  # after the [[peers]] table: the rules are top-level [[scrub]]


def _to_b(b: Bridge, pkts: list[bytes], now: float) -> Output:
    """Datagrams from site A's gateway (plain GRE, no key) into B's from_udp."""
    out = Output()
    b.from_udp([(build_gre(GreHeader(0x0800 if p[0] >> 4 == 4 else 0x86DD), p), A_ADDR)
                for p in pkts], now, out)
    return out


def test_no_rules_no_scrubber() -> None:
    b = Bridge(site_config("b"), 0)
    assert b.scrub is None and "scrub" not in b.status(0)
    assert "grebe_scrub" not in b.metrics_text()


def test_inbound_deny_first_match_wins() -> None:
    b = Bridge(site_config("b", _rules(
        '[[scrub]]\ndirection = "in"\nsrc = ["198.18.10.5/32"]\naction = "allow"\n'
        '[[scrub]]\ndirection = "in"\nsrc = ["198.18.10.0/24", "2001:db8:10::/48"]\n'
        'action = "deny"\n')), 0)
    out = _to_b(b, [v4(src="198.18.10.5"), v4(src="198.18.10.6"), v6()], 1.0)
    assert len(out.tun) == 1  # the /32 allow matched first; .6 and the v6 one denied
    assert b.counters.drop("scrub_denied") == 2
    st = b.status(1.0)
    assert st["drops"]["scrub_denied"] == 2
    assert [(r["matched"], r["dropped"]) for r in st["scrub"]] == [(1, 0), (2, 2)]
    text = b.metrics_text()
    assert 'grebe_drops_total{reason="scrub_denied"} 2' in text
    assert 'grebe_scrub_dropped_total{rule="1"} 2' in text


def test_family_mismatch_does_not_match() -> None:
    b = Bridge(site_config("b", _rules('[[scrub]]\nsrc = ["198.18.10.0/24"]\n'
                                       'action = "deny"\n')), 0)
    assert len(_to_b(b, [v6()], 0).tun) == 1  # a v4-only list does not match IPv6


def test_inbound_rate_limit_token_bucket_with_burst() -> None:
    b = Bridge(site_config("b", _rules(
        '[[scrub]]\ndirection = "in"\npeer = "site-a"\naction = "allow"\n'
        'rate = 100\nburst = 10\n')), 0)
    out = _to_b(b, [v4()] * 50, 0.0)  # a flood: the burst passes, the rest is dropped
    assert len(out.tun) == 10 and b.counters.drop("scrub_rate") == 40
    out = _to_b(b, [v4()] * 5, 0.05)  # 50 ms later: 5 tokens back
    assert len(out.tun) == 5
    out = _to_b(b, [v4()], 0.05)
    assert len(out.tun) == 0 and b.counters.drop("scrub_rate") == 41
    # under the rate, nothing is lost: one packet every 20 ms for 10 s
    t, got = 1.0, 0
    for _ in range(500):
        t += 0.02
        got += len(_to_b(b, [v4()], t).tun)
    assert got == 500 and b.counters.drop("scrub_rate") == 41


def test_outbound_deny_and_rate_per_prefix() -> None:
    a = Bridge(site_config("a", _rules(
        '[[scrub]]\ndirection = "out"\ndst = ["198.18.20.66/32"]\naction = "deny"\n'
        '[[scrub]]\ndirection = "out"\ndst = ["198.18.20.0/25"]\naction = "allow"\n'
        'rate = 1000\nburst = 3\n')), 0)
    out = Output()
    a.from_tun([v4(dst="198.18.20.66")] + [v4(dst="198.18.20.7")] * 6
               + [v4(dst="198.18.20.200")] * 6, 0.0, out)
    # .66 denied; the /25 bucket passes 3 of 6; .200 is outside both rules: all 6 pass
    assert len(out.udp[B_ADDR]) == 9
    assert a.counters.drop("scrub_denied") == 1 and a.counters.drop("scrub_rate") == 3
    # the inbound direction is not affected by out rules
    b = Bridge(site_config("b"), 0)
    ob = Output()
    b.from_udp([(d, A_ADDR) for d in out.udp[B_ADDR]], 0.0, ob)
    assert len(ob.tun) == 9


def test_bucket_per_peer_and_shared() -> None:
    for bucket, passed in (("peer", 4), ("rule", 2)):
        a = Bridge(loads_config(_config_text(bucket)), 0)
        out = Output()
        a.from_tun([v4(dst="198.18.20.7")] * 3 + [v4(dst="198.18.30.7")] * 3, 0.0, out)
        assert sum(len(v) for v in out.udp.values()) == passed, bucket
        assert a.counters.drop("scrub_rate") == 6 - passed


def _config_text(bucket: str) -> str:
    return f"""
[tun]
name = "gba"
addresses = ["198.18.100.1/30"]
[listen]
address = "198.18.0.1"
port = 4754
[[peers]]
name = "site-b"
endpoint = "198.18.0.2:4754"
prefixes = ["198.18.20.0/24"]
[[peers]]
name = "site-c"
endpoint = "198.18.0.3:4754"
prefixes = ["198.18.30.0/24"]
[[scrub]]
direction = "out"
action = "allow"
rate = 1
burst = 2
bucket = "{bucket}"
"""


def test_gro_batch_is_scrubbed_per_datagram() -> None:
    """A GRO batch (bridge/gso.py) never bypasses the rules through the fast path; without
    rules the same batch takes it (one TunFrame)."""
    from test_bridge_gso import _bulk  # same directory (pytest rootdir import)

    rows = _bulk("", False, 1000, 8, 0)
    seg = len(rows[0])
    assert all(len(r) == seg for r in rows)
    batch = [(GroBatch(b"".join(rows), seg), A_ADDR)]
    plain = Bridge(site_config("b"), 0)
    out = Output()
    plain.from_udp(batch, 0.0, out)
    assert len(out.tun) == 1 and plain.counters.rx_packets[0] == 8  # one GRO run
    b = Bridge(site_config("b", _rules('[[scrub]]\ndirection = "in"\naction = "allow"\n'
                                       'rate = 10\nburst = 3\n')), 0)
    out = Output()
    b.from_udp(batch, 0.0, out)
    assert len(out.tun) == 3 and b.counters.drop("scrub_rate") == 5


def test_super_packet_weighs_its_segments() -> None:
    from test_bridge_gso import _frame, _sp, _super  # same directory

    segs = 6
    frame = _frame(_super(False, 1000 * segs, "A"), False, 1000)
    a = Bridge(site_config("a", _rules('[[scrub]]\ndirection = "out"\naction = "allow"\n'
                                       f'rate = 1\nburst = {segs}\n')), 0)
    out = Output()
    a.from_tun([_sp(frame)], 0.0, out)
    assert a.counters.drop("scrub_rate") == 0 and a.counters.tx_packets[0] == segs
    a.from_tun([_sp(frame)], 0.0, out)  # the bucket is empty: the whole super-packet goes
    assert a.counters.drop("scrub_rate") == segs and a.counters.tx_packets[0] == segs


def test_parse_errors_and_defaults() -> None:
    rules, errors = parse_scrub([{"action": "allow", "rate": 50}], ["p"])
    assert not errors
    r = rules[0]
    assert (r.action, r.direction, r.bucket, r.burst, r.rate) == (
        Action.ALLOW, Direction.BOTH, Bucket.PEER, 50, 50.0)
    _, errors = parse_scrub([{"action": "drop", "src": ["198.18.0.1/16"], "peer": "x",
                              "rate": -1, "burst": 0, "colour": 1}, {"rate": 5},
                             {"action": "deny", "rate": 5}, "x"], ["p"])
    keys = {k for k, _ in errors}
    assert {"scrub[0].action", "scrub[0].src", "scrub[0].peer", "scrub[0].rate",
            "scrub[0].burst", "scrub[0].colour", "scrub[1].action", "scrub[2].rate",
            "scrub[3]"} <= keys
    with pytest.raises(ConfigErrors) as e:
        site_config("b", _rules('[[scrub]]\naction = "deny"\npeer = "nobody"\n'))
    assert "scrub[0].peer" in str(e.value)
    with pytest.raises(ConfigErrors):
        loads_config(_config_text("peer").replace('[tun]', 'datapath = "ebpf"\n[tun]'))


@pytest.mark.parametrize("policy", ["drop-late", "reorder"])
def test_rate_limited_packets_keep_their_place_in_the_sequence(policy: str) -> None:
    """A flood the rate limit drops must not make the packets after it look late or far
    ahead to the sequence policy (RFC 2890 §2.2): the rules see what the policy delivers,
    and every packet to an unlimited destination is delivered, in order."""
    extra = f'key = 1\nsequence = "{policy}"\n' + _rules(
        '[[scrub]]\ndirection = "in"\ndst = ["198.18.20.7/32"]\naction = "allow"\n'
        'rate = 10\nburst = 2\n')
    a = Bridge(site_config("a", f'key = 1\nsequence = "{policy}"'), 0)
    b = Bridge(site_config("b", extra), 0)
    got = 0
    for i in range(40):  # a flood of 100 to the limited host, then one to another host
        oa = Output()
        a.from_tun([v4(dst="198.18.20.7")] * 100 + [v4(dst="198.18.20.8")], i * 0.01, oa)
        ob = Output()
        b.from_udp([(d, A_ADDR) for d in oa.udp[B_ADDR]], i * 0.01, ob)
        got += sum(1 for p in ob.tun if p[19] == 8)
    assert got == 40
    assert b.counters.drop("sequence") == 0 and b.counters.event("seq_resync") == 0
    assert b.counters.drop("scrub_rate") >= 40 * 100 - 2 - 10


def test_grebe_status_text_lists_the_rules_with_their_counters() -> None:
    from bridge.ctl import format_status

    b = Bridge(site_config("b", _rules(
        '[[scrub]]\ndirection = "in"\nsrc = ["198.18.10.6/32"]\naction = "deny"\n'
        '[[scrub]]\naction = "allow"\nrate = 5\nburst = 2\n')), 0)
    _to_b(b, [v4(src="198.18.10.6")] + [v4()] * 4, 0.0)
    text = format_status(b.status(0.0))
    assert "scrub_denied=1" in text and "scrub_rate=2" in text
    assert "scrub[0] in any peer src 198.18.10.6/32 -> deny: matched 1, dropped 1" in text
    assert "scrub[1] both any peer any -> allow rate 5/s burst 2 per peer: matched 4, " \
        "dropped 2" in text


def _source_rule(buckets: int) -> str:
    return _rules('[[scrub]]\ndirection = "in"\naction = "allow"\nrate = 100\nburst = 3\n'
                  f'bucket = "source"\nbuckets = {buckets}\n')


def test_bucket_per_source_each_source_its_own_rate() -> None:
    """Two IPv4 sources and one IPv6 /64 (two addresses in it) flood at once: each gets
    the burst. The hash key is fixed here so that they do not collide (checked first)."""
    from bridge.scrub import Scrubber

    rules, errors = parse_scrub([{"action": "allow", "direction": "in", "rate": 100,
                                  "burst": 3, "bucket": "source", "buckets": 64}], ["p"])
    assert not errors and rules[0].bucket is Bucket.SOURCE and rules[0].buckets == 64
    drops = [0] * 64
    s = Scrubber(rules, ["p"], 0.0, drops, rng=lambda n: bytes(range(7, 7 + n)))
    pkts = {"a": v4(src="198.18.10.5"), "b": v4(src="198.18.10.6"),
            "c1": v6(src="2001:db8:10::5"), "c2": v6(src="2001:db8:10::ffff:6")}
    slots = {k: s.source_bucket(0, p) for k, p in pkts.items()}
    assert slots["c1"] == slots["c2"]  # one /64, one bucket
    assert len({slots["a"], slots["b"], slots["c1"]}) == 3
    passed = {k: sum(s.passes_in(0, p, 0.0) for _ in range(5)) for k, p in pkts.items()
              if k != "c2"}
    assert passed == {"a": 3, "b": 3, "c1": 3}
    assert sum(s.passes_in(0, pkts["c2"], 0.0) for _ in range(5)) == 0  # c1's bucket: empty
    assert s.passes_in(0, pkts["a"], 0.01)  # 10 ms later: one token back for each


def test_bucket_per_source_table_is_fixed_and_collisions_share() -> None:
    b = Bridge(site_config("b", _source_rule(1)), 0)  # one bucket: every source shares it
    out = _to_b(b, [v4(src=f"198.18.10.{i}") for i in range(1, 11)], 0.0)
    assert len(out.tun) == 3 and b.counters.drop("scrub_rate") == 7
    b = Bridge(site_config("b", _source_rule(256)), 0)
    scrub = b.scrub
    assert scrub is not None
    size = len(scrub.tokens)
    assert size == 256
    for n in range(40):  # 10,000 sources, each new: no state is made for any of them
        _to_b(b, [v4(src=f"198.18.{10 + n % 2}.{i}") for i in range(250)], n * 0.001)
    assert len(scrub.tokens) == size == len(scrub.stamps)
    assert b.counters.drop("scrub_rate") > 0  # and the shared buckets still limit the flood
    assert b.status(1.0)["scrub"][0]["buckets"] == 256


def test_bucket_source_parse_errors() -> None:
    _, errors = parse_scrub([{"action": "allow", "rate": 5, "bucket": "source",
                              "buckets": 1000},
                             {"action": "allow", "rate": 5, "buckets": 16},
                             {"action": "allow", "bucket": "source", "buckets": 16},
                             {"action": "allow", "rate": 5, "bucket": "source",
                              "buckets": True}], ["p"])
    assert {k for k, _ in errors} == {"scrub[0].buckets", "scrub[1].buckets",
                                      "scrub[2].buckets", "scrub[3].buckets"}
    rules, errors = parse_scrub([{"action": "allow", "rate": 5, "bucket": "source"}], ["p"])
    assert not errors and rules[0].buckets == 1024

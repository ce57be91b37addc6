"""bridge/inspect/rules.py and bridge/flows.py: [[inspect]] rule parsing, first-match selection,
the verdict cache."""

from __future__ import annotations

import ipaddress
import tomllib

import pytest

from bridge.errors import ConfigError
from bridge.flows import (
    Backend,
    FlowSelector,
    FlowTable,
    InspectRule,
    Verdict,
    flow_key,
    reverse_key,
)
from bridge.inspect.rules import parse_rules

GOOD = """
[[inspect]]
name = "web"
src = ["198.18.1.0/24"]
dst = ["198.18.2.10/32", "2001:db8:2::/64"]
dst_ports = [80, "8000-8080", 22]
inspectors = ["log", "http", "mymod:MyClass"]
fail_open = false
backend = "kernel"
log_path = "/tmp/x.jsonl"
max_buffer = 65536
[inspect.options]
colour = "blue"

[[inspect]]
name = "deny-evil"
action = "drop"
dst = ["198.18.66.0/24"]

[[inspect]]
name = "all-tls"
dst_ports = [443]
inspectors = ["tls", "block", "replace", "pcap"]
block = ["evil\\\\.example"]
replace = [["foo", "bar"]]
pcap_path = "/tmp/x.pcap"
"""


def rules_from(text: str) -> tuple[InspectRule, ...]:
    return parse_rules(tomllib.loads(text)["inspect"], "inspect")


def test_good_config_parses_every_field() -> None:
    web, deny, tls = rules_from(GOOD)
    assert web.name == "web" and web.backend is Backend.KERNEL and web.fail_open is False
    assert web.src == (ipaddress.ip_network("198.18.1.0/24"),)
    assert web.dst_ports == ((80, 80), (8000, 8080), (22, 22))
    assert web.inspectors == ("log", "http", "mymod:MyClass")
    assert web.options["log_path"] == "/tmp/x.jsonl" and web.max_buffer == 65536
    assert web.options["colour"] == "blue"
    assert deny.action is Verdict.DROP and deny.backend is Backend.USERSPACE and deny.fail_open
    assert tls.options["block"] == (rb"evil\.example",)
    assert tls.options["replace"] == ((b"foo", b"bar"),)
    assert tls.options["block_window"] == 4096 and tls.options["pcap_mss"] == 1460  # defaults


@pytest.mark.parametrize(("text", "where"), [
    ('[[inspect]]\nsrc=["1.2.3.4/8"]\nname="x"\ninspectors=["log"]', "inspect[0].src[0]"),
    ('[[inspect]]\nname="x"\ninspectors=["log"]\ndst_ports=[80, "90-70"]',
     "inspect[0].dst_ports[1]"),
    ('[[inspect]]\nname="x"\ninspectors=["log"]\ndst_ports=[0]', "inspect[0].dst_ports[0]"),
    ('[[inspect]]\nname="x"\ninspectors=["log"]\ndst_ports=[true]', "inspect[0].dst_ports[0]"),
    ('[[inspect]]\nname="x"\ninspectors=["lgo"]', "inspect[0].inspectors[0]"),
    ('[[inspect]]\nname="x"\ninspectors=["log"]\nbackend="ebpf"', "inspect[0].backend"),
    ('[[inspect]]\nname="x"\ninspectors=["log"]\nfail_open="yes"', "inspect[0].fail_open"),
    ('[[inspect]]\nname="x"\ninspectors=["log"]\nlog_pth="/x"', "inspect[0].log_pth"),
    ('[[inspect]]\nname="x"\ninspectors=["block"]\nblock=["(unclosed"]', "inspect[0].block[0]"),
    ('[[inspect]]\nname="x"\ninspectors=["block"]', "inspect[0].block"),
    ('[[inspect]]\nname="x"\ninspectors=["replace"]\nreplace=[["a"]]', "inspect[0].replace[0]"),
    ('[[inspect]]\nname="x"\ninspectors=["pcap"]', "inspect[0].pcap_path"),
    ('[[inspect]]\nname="x"\ninspectors=["log"]\nmax_buffer=10', "inspect[0].max_buffer"),
    ('[[inspect]]\ninspectors=["log"]', "inspect[0].name"),
    ('[[inspect]]\nname="x"', "inspect[0].inspectors"),
    ('[[inspect]]\nname="x"\ninspectors=["log"]\n[[inspect]]\nname="x"\ninspectors=["log"]',
     "inspect[1].name"),
])
def test_bad_config_names_the_key_path(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        rules_from(text)
    assert info.value.path == where


def test_not_a_list() -> None:
    with pytest.raises(ConfigError, match="array of tables"):
        parse_rules({"name": "x"}, "inspect")  # type: ignore[arg-type]


def test_first_match_and_forward_carve_out() -> None:
    rules = rules_from("""
[[inspect]]
name = "not-this-host"
action = "forward"
dst = ["198.18.2.99/32"]
[[inspect]]
name = "web"
dst = ["198.18.2.0/24"]
dst_ports = [80]
inspectors = ["log"]
""")
    sel = FlowSelector(rules)
    assert sel.classify(flow_key("198.18.1.5", "198.18.2.10", 40000, 80))[0] is Verdict.INSPECT
    assert sel.classify(flow_key("198.18.1.5", "198.18.2.99", 40000, 80)) == (
        Verdict.FORWARD, rules[0])
    assert sel.classify(flow_key("198.18.1.5", "198.18.2.10", 40000, 81)) == (Verdict.FORWARD, None)
    # v6 flow never matches a v4 prefix
    assert sel.classify(flow_key("2001:db8::1", "2001:db8::2", 1, 80)) == (Verdict.FORWARD, None)


def test_hook_overrides() -> None:
    rules = rules_from('[[inspect]]\nname="w"\ninspectors=["log"]\ndst_ports=[80]')
    sel = FlowSelector(rules, hook=lambda k, v, r: (Verdict.DROP, r) if k[3] == 666 else (v, r))
    assert sel.classify(flow_key("198.18.1.1", "198.18.2.1", 666, 80))[0] is Verdict.DROP
    assert sel.classify(flow_key("198.18.1.1", "198.18.2.1", 667, 80))[0] is Verdict.INSPECT


# --- the verdict cache ----------------------------------------------------------------------
# The data plane reads (key, flags) from each packet (the terminator's one header parse) and
# asks FlowTable.classify; these tests do the same.

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def seg(ft: FlowTable, src: str, dst: str, sport: int, dport: int, flags: int,
        now: float) -> Verdict:
    return ft.classify(flow_key(src, dst, sport, dport), flags, now)


WEB = '[[inspect]]\nname="web"\ninspectors=["log"]\ndst=["198.18.2.0/24","2001:db8:2::/64"]\n' \
      'dst_ports=[80]'


def table(**kw: float) -> FlowTable:
    return FlowTable(FlowSelector(rules_from(WEB)), **kw)  # type: ignore[arg-type]


def test_verdict_decided_on_syn_and_cached_both_directions() -> None:
    ft = table()
    syn = flow_key("198.18.1.5", "198.18.2.10", 40000, 80)
    assert ft.classify(syn, SYN, 0.0) is Verdict.INSPECT
    assert ft.classify(reverse_key(syn), SYN | ACK, 0.1) is Verdict.INSPECT
    assert ft.classify(syn, ACK, 0.2) is Verdict.INSPECT
    assert len(ft) == 1 and ft.counters["syn_classified"] == 1
    assert ft.snapshot()[0]["rule"] == "web"


def test_flow_started_before_the_rule_passes_untouched() -> None:
    ft = table()
    # mid-stream packets of a flow we never saw the SYN of: FORWARD and not cached
    for t in range(5):
        assert seg(ft, "198.18.1.5", "198.18.2.10", 40001, 80, ACK, float(t)) is Verdict.FORWARD
    assert len(ft) == 0 and ft.counters["midstream"] == 5
    # the same host's new connection is inspected
    assert seg(ft, "198.18.1.5", "198.18.2.10", 40002, 80, SYN, 6.0) \
        is Verdict.INSPECT


def test_hot_reload_keeps_cached_decisions() -> None:
    ft = FlowTable(FlowSelector(()))
    assert seg(ft, "198.18.1.5", "198.18.2.10", 1, 80, SYN, 0) is Verdict.FORWARD
    ft.set_selector(FlowSelector(rules_from(WEB)))
    # old flow continues as FORWARD; a new SYN is inspected
    assert seg(ft, "198.18.1.5", "198.18.2.10", 1, 80, ACK, 1) is Verdict.FORWARD
    assert seg(ft, "198.18.1.5", "198.18.2.10", 2, 80, SYN, 1) is Verdict.INSPECT


def test_idle_expiry_fin_timeout_and_rst() -> None:
    ft = table(idle_timeout=10.0, fin_timeout=1.0)
    a = flow_key("198.18.1.5", "198.18.2.10", 1, 80)
    b = flow_key("198.18.1.5", "198.18.2.10", 2, 80)
    ft.classify(a, SYN, 0.0)
    ft.classify(b, SYN, 5.0)
    assert ft.next_expiry() == 10.0
    assert ft.expire(9.9) == 0 and ft.expire(10.0) == 1 and len(ft) == 1
    ft.classify(reverse_key(b), FIN | ACK, 11.0)
    assert ft.expire(11.5) == 0 and ft.expire(12.0) == 1 and len(ft) == 0
    ft.classify(a, SYN, 20.0)
    assert ft.classify(a, RST, 20.5) is Verdict.INSPECT
    assert len(ft) == 0 and ft.counters["reset"] == 1


def test_bounded_lru() -> None:
    ft = table(max_flows=3)
    for port in range(1, 6):
        seg(ft, "198.18.1.5", "198.18.2.10", port, 80, SYN, float(port))
        # touch flow 1 so it stays the most recently used
        seg(ft, "198.18.2.10", "198.18.1.5", 80, 1, ACK, float(port))
    assert len(ft) == 3 and ft.counters["evicted"] == 2
    assert ft.lookup(flow_key("198.18.1.5", "198.18.2.10", 1, 80)) is not None
    assert ft.lookup(flow_key("198.18.1.5", "198.18.2.10", 2, 80)) is None


def test_forward_flood_never_evicts_inspected_flow() -> None:
    ft = table(max_flows=2)
    seg(ft, "198.18.1.5", "198.18.2.10", 1, 80, SYN, 0.0)
    for port in range(1000, 1100):
        assert seg(ft, "198.18.1.5", "198.18.3.1", port, 80, SYN, 0.0) \
            is Verdict.FORWARD
    assert ft.lookup(flow_key("198.18.1.5", "198.18.2.10", 1, 80))[0] is Verdict.INSPECT  # type: ignore[index]


def test_drop_rule_is_cached() -> None:
    ft = FlowTable(FlowSelector(rules_from('[[inspect]]\nname="d"\naction="drop"\ndst_ports=[25]')))
    assert seg(ft, "198.18.1.5", "198.18.2.10", 1, 25, SYN, 0) is Verdict.DROP
    assert seg(ft, "198.18.1.5", "198.18.2.10", 1, 25, SYN, 1) is Verdict.DROP
    assert ft.counters["drop"] == 1


def test_reverse_key() -> None:
    k = flow_key("198.18.1.5", "198.18.2.10", 1, 80)
    assert reverse_key(reverse_key(k)) == k and reverse_key(k)[3] == 80
    with pytest.raises(ValueError):
        flow_key("198.18.1.5", "2001:db8::1", 1, 2)


def test_selector_for_backend_turns_other_backend_into_carve_outs() -> None:
    from bridge.flows import selector_for
    rules = rules_from("""
[[inspect]]
name = "k"
backend = "kernel"
dst_ports = [80]
inspectors = ["log"]
[[inspect]]
name = "u"
dst_ports = [80, 443]
inspectors = ["log"]
""")
    user = selector_for(rules, Backend.USERSPACE)
    kern = selector_for(rules, Backend.KERNEL)
    k80 = flow_key("198.18.1.5", "198.18.2.10", 1, 80)
    k443 = flow_key("198.18.1.5", "198.18.2.10", 1, 443)
    assert user.classify(k80)[0] is Verdict.FORWARD       # the kernel backend owns port 80
    assert user.classify(k443)[0] is Verdict.INSPECT
    assert kern.classify(k80) == (Verdict.INSPECT, rules[0])
    assert kern.classify(k443)[0] is Verdict.FORWARD


def test_v6_flow_is_selected_by_its_v6_prefix() -> None:
    ft = table()
    assert seg(ft, "2001:db8:1::5", "2001:db8:2::10", 5, 80, SYN, 0) is Verdict.INSPECT
    assert seg(ft, "2001:db8:1::5", "2001:db8:3::10", 5, 80, SYN, 0) is Verdict.FORWARD


def test_max_buffer_defaults_by_backend() -> None:
    """16 MiB per direction for userspace rules (the receiving leg's window autotunes up to
    three quarters, 12 MiB: the room a lossy WAN needs above a hole), 1 MiB for kernel rules
    (kernel TCP autotunes its own windows; a larger relay buffer only lets a fast server
    finish long before a slow client)."""
    from bridge.flows import DEFAULT_MAX_BUFFER, KERNEL_MAX_BUFFER
    from bridge.inspect.rules import parse_rules

    user, kern, set_ = parse_rules([
        {"name": "u", "dst_ports": [80], "inspectors": ["log"]},
        {"name": "k", "dst_ports": [81], "backend": "kernel", "inspectors": ["log"]},
        {"name": "s", "dst_ports": [82], "backend": "kernel", "inspectors": ["log"],
         "max_buffer": 65536}])
    assert (user.max_buffer, kern.max_buffer, set_.max_buffer) == (
        DEFAULT_MAX_BUFFER, KERNEL_MAX_BUFFER, 65536)
    assert DEFAULT_MAX_BUFFER == 16 << 20 and KERNEL_MAX_BUFFER == 1 << 20

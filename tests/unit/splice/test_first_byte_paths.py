"""The cheaper first-byte path gives the same answers as the plain code it replaced:
FlowSelector's integer prefixes against InspectRule.matches, Flow's lazy address text."""

from __future__ import annotations

import ipaddress
import random
import tomllib

from bridge.flows import FlowSelector, InspectRule, Verdict
from bridge.inspect.api import C2S, S2C, Direction, Flow
from bridge.inspect.rules import parse_rules

RULES = """
[[inspect]]
name = "web"
src = ["198.18.1.0/24", "2001:db8:1::/64"]
dst = ["198.18.2.10/32", "2001:db8:2::/64"]
dst_ports = [80, "8000-8080", 22]
inspectors = ["log"]

[[inspect]]
name = "v6-any-port"
dst = ["2001:db8:3::/48"]
inspectors = ["log"]

[[inspect]]
name = "deny"
action = "drop"
src = ["198.18.9.0/25"]

[[inspect]]
name = "ports-only"
dst_ports = ["440-450"]
inspectors = ["log"]
"""


def _rules() -> tuple[InspectRule, ...]:
    return parse_rules(tomllib.loads(RULES)["inspect"], "inspect")


def _addr(rng: random.Random, v6: bool) -> bytes:
    if v6:
        base = rng.choice(["2001:db8:1::", "2001:db8:2::", "2001:db8:3:7::", "2001:db8:4::"])
        net = ipaddress.ip_address(base).packed[:8]
        return net + rng.randbytes(8)
    third = rng.choice([1, 2, 9, 77])
    return bytes((198, 18, third, rng.choice([10, 5, 127, 128, 200])))


def test_selector_agrees_with_the_rules_own_matches() -> None:
    rules = _rules()
    sel = FlowSelector(rules)
    rng = random.Random(7)
    seen = set()
    for _ in range(20000):
        v6 = rng.random() < 0.5
        key = (6 if v6 else 4, _addr(rng, v6), _addr(rng, v6), rng.randrange(1, 65536),
               rng.choice([22, 80, 443, 445, 8000, 8080, 8081, rng.randrange(1, 65536)]))
        expect = next((r for r in rules if r.matches(key)), None)
        verdict, found = sel.classify(key)
        assert found is expect, key
        assert verdict is (expect.action if expect is not None else Verdict.FORWARD)
        seen.add(found.name if found is not None else None)
    assert seen == {"web", "v6-any-port", "deny", "ports-only", None}  # every branch ran


def test_selector_hook_still_decides_last() -> None:
    rules = _rules()
    sel = FlowSelector(rules, hook=lambda k, v, r: (Verdict.FORWARD, None))
    key = (4, bytes((198, 18, 1, 5)), bytes((198, 18, 2, 10)), 40000, 80)
    assert FlowSelector(rules).classify(key) == (Verdict.INSPECT, rules[0])
    assert sel.classify(key) == (Verdict.FORWARD, None)


def test_flow_addresses_as_text_when_read() -> None:
    f4 = Flow((4, bytes((198, 18, 1, 10)), bytes((198, 18, 2, 10)), 40000, 80), "r",
              "userspace", 1.0)
    f6 = Flow((6, ipaddress.ip_address("2001:db8:1::10").packed,
               ipaddress.ip_address("2001:db8:2:0:0:0:0:a").packed, 40000, 443), "r",
              "kernel", 1.0)
    assert (f4.src, f4.dst, f4.sport, f4.dport, f4.version) == (
        "198.18.1.10", "198.18.2.10", 40000, 80, 4)
    assert (f6.src, f6.dst, f6.dport, f6.version) == ("2001:db8:1::10", "2001:db8:2::a", 443, 6)
    assert "198.18.1.10:40000 -> 198.18.2.10:80" in repr(f4)


def test_direction_hashes_by_identity_and_still_keys_dicts() -> None:
    d = {C2S: 1, S2C: 2}
    assert d[Direction.CLIENT_TO_SERVER] == 1 and d[Direction("s2c")] == 2
    assert hash(C2S) != hash(S2C) and C2S.other is S2C

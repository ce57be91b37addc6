"""Topology loading and validation (bridge/lab/topology.py): no root, no namespaces."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from bridge.errors import ConfigErrors
from bridge.lab import topology
from bridge.lab.topology import load
from bridge.lab.topomodel import Endpoint, NodeKind

FIX = Path(__file__).parent / "fixtures"


def errors_of(name: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load(FIX / f"{name}.toml")
    return [str(e) for e in info.value.errors]


def one_error(name: str, key_path: str, words: str) -> str:
    """Exactly the error naming `key_path`: it names the file and contains `words`."""
    found = [e for e in errors_of(name) if f": {key_path}: " in e]
    assert len(found) == 1, errors_of(name)
    assert str(FIX / f"{name}.toml") in found[0]
    assert words in found[0]
    return found[0]


# ---------------------------------------------------------------- good files


def test_good_base_builds_every_field() -> None:
    t = load(FIX / "good-base.toml")
    assert t.name == "good-base" and t.description.startswith("two hosts")
    assert [n.name for n in t.nodes] == ["h1", "sw", "h2"]
    h1, sw, h2 = t.nodes
    assert h1.kind is NodeKind.HOST and sw.kind is NodeKind.BRIDGE
    assert sw.interfaces == ("h1", "h2") and h1.interfaces == ("eth0",)
    assert h1.address("eth0", 6) == ipaddress.ip_address("2001:db8:5::1")
    assert h2.address("eth0") == ipaddress.ip_address("198.18.5.2")  # a single string is fine
    assert sw.addresses[0].interface == "br0"
    assert [str(r.dst) for r in h1.routes] == ["198.18.6.0/24", "::/0"]
    assert str(h1.routes[1].via) == "2001:db8:5::2"
    assert h1.sysctl == (("net.ipv4.ip_forward", "1"),)
    assert h2.mtu == (("eth0", 1400),)
    first, second = t.links
    assert first.name == "h1:eth0--sw:h1" and first.mtu == 9000
    assert (first.a, first.b) == (Endpoint("h1", "eth0"), Endpoint("sw", "h1"))
    assert second.name == "to-h2" and t.link("to-h2") is second
    assert t.links_of("h2") == (second,)
    with pytest.raises(KeyError):
        t.node("nope")
    with pytest.raises(KeyError):
        h2.address("eth0", 6)


def test_extends_merges_nodes_links_and_adds_run() -> None:
    t = load(FIX / "good-child.toml")
    assert t.name == "good-child"  # the child's stem, not the parent's name
    assert t.description.startswith("two hosts")  # inherited
    h1 = t.node("h1")
    # dict-valued keys merge entry by entry over the parent's
    assert {a.interface for a in h1.addresses} == {"eth0", "lo"}
    assert dict(h1.sysctl) == {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
    assert len(h1.routes) == 2  # untouched keys are inherited
    # a link with the parent's name is merged key by key; new links are appended
    assert t.link("to-h2").mtu == 1300 and t.link("to-h2").a == Endpoint("h2", "eth0")
    assert [lk.name for lk in t.links] == ["h1:eth0--sw:h1", "to-h2", "h3:eth0--sw:h3"]
    assert t.node("sw").interfaces == ("h1", "h2", "h3")
    # run lines: shlex-split, ./ made absolute against the defining file, cwd kept
    first, second = h1.run
    assert first.argv[0] == str(FIX / "tool.sh")
    assert first.argv[1] == f"--config={FIX / 'h1.conf'}"
    assert first.cwd == str(FIX)
    assert first.resolve("/run/grebe-lab/x") == (
        str(FIX / "tool.sh"), f"--config={FIX / 'h1.conf'}", "/run/grebe-lab/x/x")
    assert second.argv == ("sleep", "a b")


def test_shipped_topologies_load_with_fixed_addresses() -> None:
    plain = load("two-sites-plain")
    want = {
        ("client", "eth0"): {"198.18.1.10/24", "2001:db8:1::10/64"},
        ("gw-a", "lan0"): {"198.18.1.1/24", "2001:db8:1::1/64"},
        ("gw-a", "wan0"): {"198.18.0.1/24", "2001:db8::1/64"},
        ("gw-b", "wan0"): {"198.18.0.2/24", "2001:db8::2/64"},
        ("gw-b", "lan0"): {"198.18.2.1/24", "2001:db8:2::1/64"},
        ("server", "eth0"): {"198.18.2.10/24", "2001:db8:2::10/64"},
        ("attacker", "eth0"): {"198.18.0.66/24", "2001:db8::66/64"},
    }
    got: dict[tuple[str, str], set[str]] = {}
    for node in plain.nodes:
        for a in node.addresses:
            got.setdefault((node.name, a.interface), set()).add(str(a.address))
    assert got == want
    assert plain.node("wan").kind is NodeKind.BRIDGE
    assert plain.node("wan").addresses == ()  # the WAN knows nothing of the sites
    assert {lk.name for lk in plain.links} == {"lan-a", "lan-b", "wan-a", "wan-b", "wan-x"}
    assert plain.link("wan-x").endpoints == (Endpoint("attacker", "eth0"),
                                             Endpoint("wan", "attacker"))
    for gw in ("gw-a", "gw-b"):
        assert dict(plain.node(gw).sysctl)["net.ipv4.ip_forward"] == "1"
    two = load("two-sites")
    assert [n.name for n in two.nodes] == [n.name for n in plain.nodes]
    for name in topology.TOPOLOGY_DIR.glob("*.toml"):
        load(name)  # every shipped topology is valid


# ---------------------------------------------------------------- each error kind


def test_unknown_node_in_link() -> None:
    one_error("bad-unknown-node", "links[0].endpoints[1]", "unknown node 'ghost'")


def test_unknown_keys_everywhere() -> None:
    one_error("bad-unknown-key", "colour", "unknown key")
    one_error("bad-unknown-key", "nodes.a.adresses", "unknown key")
    one_error("bad-unknown-key", "links[0].speed", "unknown key")


def test_duplicate_address() -> None:
    msg = one_error("bad-duplicate-address", "nodes.b.addresses.eth0[0]", "duplicate address")
    assert "nodes.a.addresses.eth0[0]" in msg  # names where it was seen first


def test_interface_name_too_long() -> None:
    one_error("bad-long-ifname", "links[0].endpoints[0]", "at most 15 bytes")


def test_interface_used_twice() -> None:
    one_error("bad-interface-twice", "links[1].endpoints[0]", "a:eth0 is already used")


def test_addresses_and_routes_outside_lab_ranges() -> None:
    one_error("bad-outside-range", "nodes.a.addresses.eth0[0]", "outside the lab ranges")
    one_error("bad-outside-range", "nodes.a.addresses.eth0[1]", "outside the lab ranges")
    one_error("bad-outside-range", "nodes.a.routes[0].dst", "outside the lab ranges")
    one_error("bad-outside-range", "nodes.a.routes[1].via", "outside the lab ranges")


def test_bad_prefix_syntax() -> None:
    one_error("bad-prefix", "nodes.a.addresses.eth0[0]", "not ADDRESS/PREFIXLEN")
    one_error("bad-prefix", "nodes.a.addresses.eth0[1]", "bad prefix")
    one_error("bad-prefix", "nodes.a.addresses.eth0[2]", "bad prefix")
    one_error("bad-prefix", "nodes.a.routes[0].dst", "bad prefix")


def test_node_name_too_long_for_namespace() -> None:
    one_error("bad-long-node", "nodes.a-very-long-node-name-indeed", "namespace")


def test_every_error_is_reported_together() -> None:
    errs = errors_of("bad-many")
    text = "\n".join(errs)
    for part in ("links[0].endpoints[1]", "nodes.a.addresses.eth0", "nodes.a.addresses.eth9",
                 'nodes.a.sysctl."kernel.panic"', "nodes.a.run", "nodes.b.mtu.eth0"):
        assert f": {part}: " in text, (part, errs)
    assert len(errs) >= 6


def test_error_in_child_names_the_child_file() -> None:
    child = str(FIX / "bad-child.toml")
    errs = errors_of("bad-child")
    dup = [e for e in errs if "nodes.h2.addresses.eth0[0]" in e]
    assert dup and dup[0].startswith(child) and "duplicate address 198.18.5.1" in dup[0]
    kind = [e for e in errs if "nodes.h2.kind" in e]
    assert kind and kind[0].startswith(child) and "'router'" in kind[0]


def test_extends_cycle_and_missing_file() -> None:
    errs = errors_of("bad-cycle-a")
    assert len(errs) == 1 and "extends cycle" in errs[0]
    with pytest.raises(ConfigErrors, match="topology file not found"):
        load(FIX / "no-such-topology.toml")


@pytest.mark.parametrize(("text", "fragment"), [
    ('[nodes.a]\nsysctl = {"net.ipv4.ip_forward" = true}', "integer or a string"),
    ('[nodes.a]\nroutes = [{dst = "default"}]', "needs `via` or `dev`"),
    ('[nodes.a]\nroutes = [{dst = "198.18.1.0/24", via = "2001:db8::1"}]', "is not IPv4"),
    ('[nodes.a]\nroutes = [{dst = "198.18.1.0/24", dev = "eth7"}]', "no such interface"),
    ('[nodes.a]\nkind = "bridge"', "needs at least one link"),
    ('[nodes.A]', "lowercase"),
    ('[nodes.a]\nrun = ["echo \'unclosed"]', "cannot split"),
    ('[nodes.a]\n[nodes.b]\n[[links]]\nendpoints = ["a:x", "b:y"]\nmtu = 40', "68..65535"),
    ('[nodes.a]\n[[links]]\nendpoints = ["a:x", "a:y"]', "two different nodes"),
    ('[nodes.a]\n[nodes.b]\n[[links]]\nendpoints = ["a:x/1", "b:y"]', "bad interface name"),
    ('[[links]]\nendpoints = ["a:x", "b:y"]', "unknown node"),
    ("extends = 3\n[nodes.a]", "topology name or path"),
])
def test_small_mistakes(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ConfigErrors) as info:
        load(path)
    assert any(fragment in str(e) and str(path) in str(e) for e in info.value.errors), \
        info.value.errors

"""`grebe pair` (bridge/pair.py): both ends of every tunnel derived from one description agree."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bridge.config import loads_config
from bridge.errors import ConfigError
from bridge.pair import EXAMPLE, endpoint_files, parse_description, run
from bridge.peers import PeerTable

THREE = EXAMPLE + """
[sites.c]
endpoint = "198.18.0.3"
prefixes = ["198.18.3.0/24"]
"""


def _cfgs(text: str) -> dict[str, object]:
    return {n: loads_config(t) for n, t in endpoint_files(parse_description(text)).items()}


def test_two_sites_mirror_each_other() -> None:
    cfgs = _cfgs(EXAMPLE)
    a, b = cfgs["a"], cfgs["b"]
    (pa,), (pb,) = a.peers, b.peers  # type: ignore[attr-defined]
    assert (pa.name, pa.host, pa.port) == ("b", "198.18.0.2", 4754)
    assert (pb.name, pb.host) == ("a", "198.18.0.1")
    assert pa.key_out == pb.key_in == 42 and pb.key_out == pa.key_in == 42
    assert pa.sequence == pb.sequence and pa.encapsulation == pb.encapsulation
    # a routes site b's prefixes and b's tunnel address to b, and the other way round
    ta = PeerTable(a.peers, local=[])  # type: ignore[attr-defined]
    for dst in ("198.18.2.7", "2001:db8:2::7", "198.18.100.2", "2001:db8:100::2"):
        import ipaddress
        assert ta.route(ipaddress.ip_address(dst).packed) == 0
    assert [str(x) for x in a.tun.addresses] == ["198.18.100.1/24", "2001:db8:100::1/64"]  # type: ignore[attr-defined]
    assert [str(x) for x in b.tun.addresses] == ["198.18.100.2/24", "2001:db8:100::2/64"]  # type: ignore[attr-defined]


def test_full_mesh_and_ipv6_underlay() -> None:
    cfgs = _cfgs(THREE)
    assert [p.name for p in cfgs["a"].peers] == ["b", "c"]  # type: ignore[attr-defined]
    assert [p.name for p in cfgs["c"].peers] == ["a", "b"]  # type: ignore[attr-defined]
    v6 = THREE.replace('"198.18.0.1"', '"2001:db8::1"').replace('"198.18.0.2"', '"2001:db8::2"')
    v6 = v6.replace('"198.18.0.3"', '"2001:db8::3"')
    assert '"[2001:db8::3]:4754"' in endpoint_files(parse_description(v6))["a"]
    with pytest.raises(ConfigError, match="one IP version"):
        parse_description(THREE.replace('"198.18.0.3"', '"2001:db8::3"'))


def test_hub_and_spoke_carries_the_other_spokes_through_the_hub() -> None:
    cfgs = _cfgs(THREE.replace('# hub = "a"', 'hub = "a"'))
    assert [p.name for p in cfgs["a"].peers] == ["b", "c"]  # type: ignore[attr-defined]
    (to_hub,) = cfgs["b"].peers  # type: ignore[attr-defined]
    assert to_hub.name == "a"
    assert "198.18.3.0/24" in [str(p) for p in to_hub.prefixes]  # spoke c, via the hub


@pytest.mark.parametrize("bad,path", [
    ('[sites.a]\nendpoint = "198.18.0.1"\nprefixes = ["198.18.1.0/24"]\n', "sites"),
    (EXAMPLE.replace('endpoint = "198.18.0.2"', 'endpoint = "nowhere"'), "sites.b.endpoint"),
    (EXAMPLE.replace('"198.18.2.0/24"', '"198.18.2.1/24"'), "sites.b.prefixes[0]"),
    (EXAMPLE.replace("key = 42", "key = -1"), "key"),
    (EXAMPLE.replace('# hub = "a"', 'hub = "z"'), "hub"),
    (EXAMPLE.replace('sequence = "drop-late"', 'sequence = "sometimes"'), "site a: peers[0]"),
])
def test_bad_descriptions_name_the_key(bad: str, path: str) -> None:
    with pytest.raises(ConfigError) as e:
        endpoint_files(parse_description(bad))
    assert str(e.value).startswith(path), str(e.value)


def test_writing_twice_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    desc = tmp_path / "sites.toml"
    desc.write_text(EXAMPLE)
    args = argparse.Namespace(description=str(desc), out=str(tmp_path / "etc"), example=False)
    assert run(args) == 0
    assert capsys.readouterr().out.count("written") == 2
    assert run(args) == 0
    assert capsys.readouterr().out.count("unchanged") == 2
    loads_config((tmp_path / "etc" / "b.toml").read_text())

"""`grebe pair` with host-name endpoints and a full-tunnel site (bridge/pair.py): what it
writes parses with bridge/config.py and passes `grebe check-config`."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest

from bridge.cli import cmd_check_config
from bridge.config import check_config, load_config, loads_config
from bridge.errors import ConfigError
from bridge.pair import EXAMPLE, endpoint_files, parse_description, run
from bridge.peers import PeerTable

NAMES = {"gw-b.example.net": "198.18.0.2", "gw-a.example.net": "198.18.0.1"}
NAMED_B = EXAMPLE.replace('endpoint = "198.18.0.2"',
                          'endpoint = "gw-b.example.net:4800"\nlisten = "198.18.0.2"')


def fake_resolve(name: str, version: int, hosts_file: str | None) -> str:
    """What the I/O layer's resolver (bridge/io/resolve.py) answers here, without DNS."""
    if name not in NAMES:
        raise ValueError("no such host")
    return NAMES[name]


def _write(tmp_path: Path, text: str, **kw: object) -> dict[str, Path]:
    desc = tmp_path / "sites.toml"
    desc.write_text(text)
    args = argparse.Namespace(description=str(desc), out=str(tmp_path / "etc"),
                              example=False, endpoint=[], full_tunnel=None)
    vars(args).update(kw)
    assert run(args) == 0
    return {n: tmp_path / "etc" / f"{n}.toml" for n in ("a", "b")}


def _routes_to(cfg: object, dst: str) -> int:
    table = PeerTable(cfg.peers, local=[])  # type: ignore[attr-defined]
    return table.route(ipaddress.ip_address(dst).packed)


def test_a_host_name_endpoint_is_what_the_others_write(tmp_path: Path) -> None:
    files = _write(tmp_path, NAMED_B)
    a_text, b_text = files["a"].read_text(), files["b"].read_text()
    assert 'endpoint = "gw-b.example.net:4800"' in a_text
    assert 'address = "198.18.0.2"' in b_text and "port = 4754" in b_text  # b listens there
    for f in files.values():
        assert check_config(str(f), fake_resolve) == [], f.read_text()
    (to_b,) = load_config(str(files["a"]), fake_resolve).peers
    assert (to_b.hostname, to_b.host, to_b.port) == ("gw-b.example.net", "198.18.0.2", 4800)
    assert loads_config(b_text).peers[0].host == "198.18.0.1"  # a's endpoint: a literal


def test_command_line_endpoint_and_full_tunnel_pass_check_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    files = _write(tmp_path, EXAMPLE, endpoint=["b=gw-b.example.net:4754"], full_tunnel="b")
    a_text, b_text = files["a"].read_text(), files["b"].read_text()
    assert 'endpoint = "gw-b.example.net:4754"' in a_text
    assert 'address = "198.18.0.2"' in b_text  # the description's literal: b's listen address
    monkeypatch.setattr("bridge.io.resolve.resolve", fake_resolve)
    capsys.readouterr()
    for f in files.values():
        assert cmd_check_config(argparse.Namespace(file=str(f))) == 0, capsys.readouterr().err
    a = load_config(str(files["a"]), fake_resolve)
    (to_b,) = a.peers
    assert {"0.0.0.0/0", "::/0", "198.18.2.0/24"} <= {str(p) for p in to_b.prefixes}
    assert _routes_to(a, "192.0.2.77") == 0 and _routes_to(a, "2001:db8:77::1") == 0
    (to_a,) = loads_config(b_text).peers  # the full-tunnel side routes only a's site to a
    assert not any(p.prefixlen == 0 for p in to_a.prefixes)


def test_a_full_tunnel_spoke_is_reached_through_the_hub() -> None:
    text = EXAMPLE.replace('# hub = "a"', 'hub = "a"') + (
        '\n[sites.c]\nendpoint = "198.18.0.3"\nprefixes = ["198.18.3.0/24"]\n'
        'full_tunnel = true\n')
    cfgs = {n: loads_config(t) for n, t in endpoint_files(parse_description(text)).items()}
    (to_hub,) = cfgs["b"].peers
    assert to_hub.name == "a" and "0.0.0.0/0" in [str(p) for p in to_hub.prefixes]
    hub = {p.name: [str(x) for x in p.prefixes] for p in cfgs["a"].peers}
    assert "0.0.0.0/0" in hub["c"] and "0.0.0.0/0" not in hub["b"]


def test_a_wildcard_listen_with_a_host_name_still_checks(tmp_path: Path) -> None:
    text = NAMED_B.replace('listen = "198.18.0.2"', 'listen = "0.0.0.0"')
    files = endpoint_files(parse_description(text))
    assert 'address = "0.0.0.0"' in files["b"]
    assert 'endpoint = "gw-b.example.net:4800"' in files["a"]
    for f in _write(tmp_path, text).values():
        assert check_config(str(f), fake_resolve) == [], f.read_text()


@pytest.mark.parametrize("text,kw,path", [
    (EXAMPLE.replace('endpoint = "198.18.0.2"', 'endpoint = "gw-b.example.net"'), {},
     "sites.b.endpoint"),
    (NAMED_B.replace('listen = "198.18.0.2"', 'listen = "gw-b"'), {}, "sites.b.listen"),
    (EXAMPLE.replace("# full_tunnel = true", "full_tunnel = 1"), {}, "sites.b.full_tunnel"),
    (EXAMPLE.replace('prefixes = ["198.18.1.0/24", "2001:db8:1::/64"]',
                     'prefixes = ["198.18.1.0/24"]\nfull_tunnel = true')
     .replace("# full_tunnel = true", "full_tunnel = true"), {}, "sites.b.full_tunnel"),
    (EXAMPLE, {"endpoints": {"z": "gw-z.example.net"}}, "--endpoint"),
    (EXAMPLE, {"full_tunnel": "z"}, "--full-tunnel"),
])
def test_bad_options_name_the_key(text: str, kw: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as e:
        endpoint_files(parse_description(text, **kw))  # type: ignore[arg-type]
    assert str(e.value).startswith(path), str(e.value)

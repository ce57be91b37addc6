"""Endpoints by host name (bridge/io/resolve.py, resolved by the CLI, never the core) and
full-tunnel prefixes (a /0 may cover the peer's endpoint: policy routing keeps the
tunnel's datagrams out of it, bridge/io/policy.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import cli
from bridge.config import check_config, host_name, load_config, loads_config
from bridge.errors import ConfigErrors
from bridge.io.resolve import from_hosts_file, resolve

FILE = """\
hosts_file = "{hosts}"
[tun]
name = "gb0"
{tun}
[listen]
address = "198.18.0.1"
[[peers]]
name = "b"
endpoint = "{endpoint}"
prefixes = [{prefixes}]
"""


def _write(tmp_path: Path, endpoint: str = "gw-b.lab:4755", prefixes: str = '"198.18.2.0/24"',
           tun: str = "", hosts: str = "hosts") -> Path:
    (tmp_path / "hosts").write_text("# lab names\n2001:db8::2 gw-b.lab\n198.18.0.2  gw-b.lab "
                                    "gw-b  # v4\n")
    f = tmp_path / "g.toml"
    f.write_text(FILE.format(endpoint=endpoint, prefixes=prefixes, tun=tun, hosts=hosts))
    return f


def test_host_names_are_told_from_addresses() -> None:
    assert host_name("gw-b.example.net:4755") == ("gw-b.example.net", 4755)
    assert host_name("gw-b") == ("gw-b", 4754)
    for bad in ("198.18.0.2", "-x.example", "a..b", "x:port", "2001:db8::1", "1.2.3"):
        assert host_name(bad) is None, bad


def test_a_name_resolves_through_the_hosts_file_beside_the_config(tmp_path: Path) -> None:
    f = _write(tmp_path)
    cfg = load_config(str(f), resolve)
    p = cfg.peers[0]
    assert (p.host, p.port, p.hostname) == ("198.18.0.2", 4755, "gw-b.lab")  # v4: listen's
    assert from_hosts_file(str(tmp_path / "hosts"), "GW-B", 0) == "198.18.0.2"
    assert from_hosts_file(str(tmp_path / "hosts"), "gw-b.lab", 6) == "2001:db8::2"
    assert resolve("localhost", 4, None) == "127.0.0.1"   # the system resolver after it
    # the core never resolves: without a resolver a name is an error of its key
    with pytest.raises(ConfigErrors, match=r"peers\[0\].endpoint.*is a host name"):
        load_config(str(f))


def test_check_config_names_an_unresolvable_endpoint(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path, endpoint="nowhere.invalid:4754")
    errors = check_config(str(f), resolve)
    assert len(errors) == 1 and errors[0].path == "peers[0].endpoint"
    assert "'nowhere.invalid': cannot resolve the host name" in str(errors[0])
    assert "nor in hosts_file" in str(errors[0])
    assert cli.main(["check-config", str(f)]) == cli.EXIT_CONFIG
    assert "cannot resolve the host name" in capsys.readouterr().err
    f = _write(tmp_path, endpoint="gw-b.lab", hosts="missing-hosts")
    assert "hosts_file" in str(check_config(str(f), resolve)[0])


def test_a_full_tunnel_prefix_may_cover_the_endpoint(tmp_path: Path) -> None:
    f = _write(tmp_path, endpoint="198.18.0.2", prefixes='"0.0.0.0/0", "::/0"')
    cfg = load_config(str(f), resolve)
    assert [str(n) for n in cfg.peers[0].prefixes] == ["0.0.0.0/0", "::/0"]
    assert (cfg.tun.table, cfg.tun.fwmark) == (4755, 4754)   # 4754: the kernel backend's
    # anything narrower that covers it still loops: refused as before
    f = _write(tmp_path, endpoint="198.18.0.2", prefixes='"128.0.0.0/1"')
    assert "covers the peer's own endpoint" in str(check_config(str(f), resolve)[0])
    f = _write(tmp_path, endpoint="198.18.0.2", prefixes='"0.0.0.0/0"',
               tun="table = 254\nfwmark = 51820")
    (err,) = check_config(str(f), resolve)
    assert err.path == "tun.table" and "main" in str(err)
    cfg = loads_config(FILE.format(endpoint="198.18.0.2", prefixes='"0.0.0.0/0"', hosts="h",
                                   tun="table = 100\nfwmark = 0x51820"))
    assert (cfg.tun.table, cfg.tun.fwmark) == (100, 0x51820)


def test_a_full_tunnel_peer_delivers_to_this_site() -> None:
    """Inbound from a /0 peer: a destination only the /0 covers is this site's (the host's
    specific routes win over the full tunnel), not a hairpin; one inside another peer's
    prefix is still forwarded, and one inside the same peer's specific prefix a hairpin."""
    import ipaddress

    from bridge import counters as C
    from bridge.peers import PeerTable

    cfg = loads_config(FILE.format(endpoint="198.18.0.2", hosts="h", tun="",
                                   prefixes='"0.0.0.0/0", "198.18.9.0/24"')
                       + '[[peers]]\nname = "c"\nendpoint = "198.18.0.3"\n'
                         'prefixes = ["198.18.3.0/24"]\n')
    t = PeerTable(cfg.peers)

    def ip(a: str) -> bytes:
        return ipaddress.ip_address(a).packed

    src = ip("198.19.0.10")   # the internet, behind the full-tunnel peer
    assert t.accept(0, src, ip("198.18.1.10"), 64) == -1
    assert t.accept(0, src, ip("198.18.3.10"), 64) == -1           # to peer c: forwarded
    assert t.accept(0, src, ip("198.18.9.1"), 64) == C.R_HAIRPIN
    assert t.accept(1, ip("198.18.3.10"), ip("198.18.1.10"), 64) == -1

    # outbound, the link's own chatter is not the full tunnel's (MLD reports, hop limit 1)
    assert t.route(ip("ff02::16")) == -1 and t.route(ip("224.0.0.22")) == -1
    assert t.route(ip("2001:db8:99::10")) == -1   # no ::/0 in this file
    assert t.route(ip("198.19.0.10")) == 0

"""bridge/lab/__main__.py pieces that need no root and build no lab."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.lab import __main__ as labcli
from bridge.lab.netlink import Lab
from bridge.lab.topology import load


def test_describe_shows_nodes_addresses_routes_links() -> None:
    lab = Lab(load("two-sites"), "lab", [n.name for n in load("two-sites").nodes])
    text = labcli.describe(lab)
    for part in ("gb-lab-client", "198.18.1.10/24", "2001:db8:2::10/64", "(bridge br0)",
                 "route 0.0.0.0/0 via 198.18.1.1", "wan-x   attacker:eth0 <-> wan:attacker",
                 "lan-b   server:eth0 <-> gw-b:lan0"):
        assert part in text, part
    for gw in ("gw-a", "gw-b"):
        assert any(line.strip().startswith("run") and "grebe" in line
                   for line in text.splitlines()), gw


def test_parser_knows_every_subcommand() -> None:
    p = labcli.parser()
    args = p.parse_args(["exec", "-i", "x1", "client", "--", "sh", "-c", "exit 3"])
    assert (args.cmd, args.instance, args.node, args.argv) == (
        "exec", "x1", "client", ["sh", "-c", "exit 3"])
    assert p.parse_args(["up"]).topology == "two-sites"
    assert p.parse_args(["up", "x.toml", "--wait", "--no-run"]).wait
    assert p.parse_args(["clean"]).instance is None  # bare clean: every gb-* namespace
    assert p.parse_args(["impair", "wan-a", "rate=10mbit"]).settings == ["rate=10mbit"]
    with pytest.raises(SystemExit):
        p.parse_args(["nonsense"])


def test_test_and_bench_hand_their_arguments_over(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(labcli, "cmd_test", lambda argv: seen.append(("test", argv)) or 0)
    monkeypatch.setattr(labcli, "cmd_bench", lambda argv: seen.append(("bench", argv)) or 0)
    assert labcli.main(["test", "-k", "x", "--up"]) == 0
    assert labcli.main(["bench", "--quick", "--only", "plain"]) == 0
    assert seen == [("test", ["-k", "x", "--up"]), ("bench", ["--quick", "--only", "plain"])]


def test_list_runs_without_building_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert labcli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "topologies:" in out and "two-sites-plain" in out


def test_up_with_a_bad_topology_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labcli.os, "geteuid", lambda: 0)
    bad = tmp_path / "bad.toml"
    bad.write_text("[nodes.a]\nkind = 'switch'\n")
    assert labcli.main(["up", str(bad), "--instance", "never"]) == 2
    assert f"{bad}: nodes.a.kind: must be 'host', 'bridge' or 'linux-vm'" in capsys.readouterr().out

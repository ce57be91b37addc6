"""topologies/two-sites-inspect{,-kernel}: each gw-a config is two-sites' gw-a plus [[inspect]]
(no drift), with the backend its topology names, and `grebe up` is all the topology starts on
gw-a."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bridge.flows import Backend
from bridge.inspect.rules import parse_rules
from bridge.lab.topology import load

TOPO = Path(__file__).resolve().parents[3] / "topologies"
CASES = [("two-sites-inspect", Backend.USERSPACE), ("two-sites-inspect-kernel", Backend.KERNEL)]


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_gw_a_config_is_two_sites_plus_inspect_rules(name: str, backend: Backend) -> None:
    ours = tomllib.loads((TOPO / name / "gw-a.toml").read_text())
    base = tomllib.loads((TOPO / "two-sites" / "gw-a.toml").read_text())
    rules = parse_rules(ours.pop("inspect"), "inspect")
    assert ours == base, f"{name}/gw-a.toml drifted from two-sites/gw-a.toml"
    rule = rules[0]
    assert all(r.backend is backend for r in rules)
    assert rule.backend is backend and rule.inspectors == ("log", "http")
    assert {lo for lo, _ in rule.dst_ports} == {80, 22}
    assert rule.options["log_path"] == "${GREBE_LAB_DIR}/inspect-gw-a.jsonl"


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_topology_runs_what_its_backend_needs_on_gw_a(name: str, backend: Backend) -> None:
    topo = load(TOPO / f"{name}.toml")
    gw_a = next(n for n in topo.nodes if n.name == "gw-a")
    argvs = [" ".join(r.argv) for r in gw_a.run]
    assert any(a.startswith("grebe up -c") and a.endswith(f"{name}/gw-a.toml") for a in argvs)
    # `grebe up` runs the kernel backend itself (bridge/kernel/run.py): nothing else on gw-a
    assert len(argvs) == 1
    if backend is Backend.KERNEL:
        rules = parse_rules(tomllib.loads((TOPO / name / "gw-a.toml").read_text())["inspect"])
        assert all(r.iif == ("lan0",) for r in rules)       # intercepted on the LAN side only
        assert [r.action.value for r in rules] == ["inspect", "drop"]

"""topologies/two-sites-inspect: its gw-a config is two-sites' gw-a plus [[inspect]] (no drift)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bridge.flows import Backend, parse_rules
from bridge.lab.topology import load

TOPO = Path(__file__).resolve().parents[3] / "topologies"


def test_gw_a_config_is_two_sites_plus_inspect_rules() -> None:
    ours = tomllib.loads((TOPO / "two-sites-inspect" / "gw-a.toml").read_text())
    base = tomllib.loads((TOPO / "two-sites" / "gw-a.toml").read_text())
    rules = parse_rules(ours.pop("inspect"), "inspect")
    assert ours == base, "two-sites-inspect/gw-a.toml drifted from two-sites/gw-a.toml"
    (rule,) = rules
    assert rule.backend is Backend.KERNEL and rule.inspectors == ("log", "http")
    assert {lo for lo, _ in rule.dst_ports} == {80, 22}
    assert rule.log_path == "${GREBE_LAB_DIR}/inspect-gw-a.jsonl"


def test_topology_runs_grebe_and_the_kernel_backend_on_gw_a() -> None:
    topo = load(TOPO / "two-sites-inspect.toml")
    gw_a = next(n for n in topo.nodes if n.name == "gw-a")
    argvs = [" ".join(r.argv) for r in gw_a.run]
    assert any(a.startswith("grebe up -c") and a.endswith("two-sites-inspect/gw-a.toml")
               for a in argvs)
    assert any("-m bridge.tproxy" in a and "--iif lan0" in a for a in argvs)

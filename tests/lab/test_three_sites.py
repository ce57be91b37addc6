"""Three sites, full mesh and hub and spoke (topologies/three-sites*.toml, endpoint files from
`grebe pair`): every pair of sites pings both ways over IPv4 and IPv6, and in the hub topology
the spokes' traffic to each other crosses the hub (its counters show it)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

SITES = {"a": ("198.18.1.10", "2001:db8:1::10"), "b": ("198.18.2.10", "2001:db8:2::10"),
         "c": ("198.18.3.10", "2001:db8:3::10")}


def _status(lab: Any, gw: str) -> dict[str, Any]:
    cp = lab.run(gw, ["grebe", "status", "--json"], check=False)
    return json.loads(cp.stdout) if cp.returncode == 0 and cp.stdout.strip() else {}


def all_pairs_ping(lab: Any) -> None:
    for x, y in itertools.permutations(SITES, 2):
        for addr in SITES[y]:
            lab.wait_for(lambda x=x, addr=addr: lab.run(
                f"h-{x}", ["ping", "-c", "1", "-W", "1", addr], check=False).returncode == 0,
                20, f"h-{x} -> {addr}")


@pytest.mark.parametrize("topology", ["three-sites", "three-sites-hub"])
def test_every_pair_of_sites_reaches_each_other(lab_factory: Any, topology: str) -> None:
    lab = lab_factory(topology)
    for gw in ("gw-a", "gw-b", "gw-c"):
        lab.wait_for(lambda gw=gw: _status(lab, gw), 20, f"grebe on {gw}")
    all_pairs_ping(lab)
    a = _status(lab, "gw-a")
    if topology == "three-sites-hub":
        # b <-> c crosses the hub: gw-a forwards the 5 echo requests to gw-c and the 5
        # replies to gw-b (keepalives may add a few)
        def tx(st: dict[str, Any]) -> dict[str, int]:
            return {p["name"]: p["tx_packets"] for p in st["peers"]}

        before = tx(a)
        lab.run("h-b", ["ping", "-c", "5", "-i", "0.1", "198.18.3.10"])
        a = _status(lab, "gw-a")
        assert all(tx(a)[n] - before[n] >= 5 for n in ("gw-b", "gw-c")), (before, tx(a))
        assert {p["name"] for p in a["peers"]} == {"gw-b", "gw-c"}
        assert {p["name"] for p in _status(lab, "gw-b")["peers"]} == {"gw-a"}
    else:
        assert {p["name"] for p in a["peers"]} == {"gw-b", "gw-c"}
        assert {p["name"] for p in _status(lab, "gw-c")["peers"]} == {"gw-a", "gw-b"}
    assert all(p["up"] for p in a["peers"])

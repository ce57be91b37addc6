"""Full tunnel (issue 13), topologies/full-tunnel.toml: gw-a's peer gw-b owns 0.0.0.0/0 and
::/0. The client behind gw-a reaches an "internet" host only gw-b routes to, over IPv4 and
IPv6, byte-exact over TCP; gw-a's own default route stays (the /0 lives in table 4755 by
policy routing, bridge/io/policy.py), and the tunnel keeps working although its endpoint
is reachable only by that default route: grebe's socket carries the fwmark, so its
datagrams are not looped into the TUN (gw-a counts no "loop" drop). gw-a starts as a split
tunnel (gw-a.split.toml) and becomes a full tunnel by `grebe reload`, then back: the rules
come and go with the /0, and on exit nothing is left."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from bridge.lab.netlink import Lab

HERE = Path(__file__).parent
CFG = HERE.parent.parent / "topologies" / "full-tunnel"
PACED = str(HERE / "paced.py")
INET = ("198.19.0.10", "2001:db8:99::10")


def _status(lab: Lab, gw: str) -> dict[str, Any]:
    cp = lab.run(gw, ["grebe", "status", "--json"], check=False)
    return json.loads(cp.stdout) if cp.returncode == 0 and cp.stdout.strip() else {}


def _rules(lab: Lab, v: str) -> str:
    return str(lab.run("gw-a", ["ip", v, "rule", "show"]).stdout)


def _ping(lab: Lab, node: str, addr: str) -> bool:
    return lab.run(node, ["ping", "-c", "1", "-W", "1", addr], check=False).returncode == 0


def test_full_tunnel_reaches_the_internet_behind_gw_b(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("full-tunnel")
    cfg = tmp_path / "gw-a.toml"
    shutil.copy(CFG / "gw-a.split.toml", cfg)
    procs = {gw: lab.popen(gw, ["grebe", "up", "-c", str(cfg if gw == "gw-a" else
                                                         CFG / f"{gw}.toml")],
                           log=str(lab.state_dir / f"grebe-{gw}.log"))
             for gw in ("gw-a", "gw-b")}
    for gw in procs:
        lab.wait_for(lambda gw=gw: _status(lab, gw), 20, f"grebe on {gw}")
    # a split tunnel first: site b through gw-b, the internet host not (gw-b's WAN drops it)
    lab.wait_for(lambda: _ping(lab, "client", "198.18.2.10"), 20, "client -> server")
    assert not _ping(lab, "client", INET[0])
    assert "0x1292" not in _rules(lab, "-4")
    shutil.copy(CFG / "gw-a.toml", cfg)
    cp = lab.run("gw-a", ["grebe", "reload"])
    assert "peers[gw-b].prefixes" in cp.stdout and "restart" not in cp.stdout, cp.stdout
    for addr in INET:
        lab.wait_for(lambda addr=addr: lab.run("client", ["ping", "-c", "1", "-W", "1", addr],
                                               check=False).returncode == 0, 20,
                     f"client -> {addr} through the full tunnel")
    for v in ("-4", "-6"):
        rules = _rules(lab, v)
        assert "32760:\tfrom all lookup main suppress_prefixlength 0" in rules, rules
        assert "32761:\tnot from all fwmark 0x1292 lookup 4755" in rules, rules
        assert "default dev grebe0" in lab.run("gw-a", ["ip", v, "route", "show", "table",
                                                        "4755"]).stdout
        assert "default via" in lab.run("gw-a", ["ip", v, "route", "show"]).stdout  # its own
    # TCP, byte-exact, from the internet host to the client
    size = 4 * 1024 * 1024
    server = lab.popen("inet", [sys.executable, PACED, "serve", INET[0], "5002", str(size),
                                str(64 * 1024 * 1024)])
    lab.wait_for(lambda: lab.run("inet", ["ss", "-Htln", "sport = :5002"]).stdout.strip(),
                 10, "server listening")
    got = json.loads(lab.run("client", [sys.executable, PACED, "fetch", INET[0], "5002"],
                             timeout=60).stdout)
    server.wait(timeout=10)
    sys.path.insert(0, str(HERE))
    import paced

    assert got["bytes"] == size and got["sha256"] == hashlib.sha256(paced.data(size)).hexdigest()
    st = _status(lab, "gw-a")
    peer = st["peers"][0]
    assert peer["up"] and peer["rx_packets"] > 0 and st["drops"].get("loop", 0) == 0, st
    assert st["drops"].get("ttl", 0) == 0, st   # the TUN's own MLD reports: link_local
    # the host's own traffic follows the full tunnel too (no mark), from its TUN address
    assert lab.run("gw-a", ["ping", "-c", "1", "-W", "2", INET[0]], check=False).returncode == 0
    assert _ping(lab, "client", "198.18.2.10")
    # back to the split tunnel: the rules and the table's route go, gw-b's LAN stays
    shutil.copy(CFG / "gw-a.split.toml", cfg)
    lab.run("gw-a", ["grebe", "reload"])
    assert "0x1292" not in _rules(lab, "-4") and "0x1292" not in _rules(lab, "-6")
    assert not _ping(lab, "client", INET[0]) and _ping(lab, "client", "198.18.2.10")
    shutil.copy(CFG / "gw-a.toml", cfg)   # and full again, for the exit below
    lab.run("gw-a", ["grebe", "reload"])
    lab.wait_for(lambda: _ping(lab, "client", INET[1]), 10, "full tunnel again")
    procs["gw-a"].send_signal(signal.SIGTERM)
    assert procs["gw-a"].wait(timeout=15) == 0
    for v in ("-4", "-6"):
        assert "0x1292" not in _rules(lab, v) and "4755" not in _rules(lab, v)
        assert not lab.run("gw-a", ["ip", v, "route", "show", "table", "4755"],
                           check=False).stdout.strip()
        assert "default via" in lab.run("gw-a", ["ip", v, "route", "show"]).stdout

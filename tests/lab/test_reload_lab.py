"""`grebe reload` on a running gateway (issue 13), in topologies/three-sites-reload.toml.

A paced download from h-b to h-a crosses gw-a's peer gw-b while gw-a reloads a file that
adds peer gw-d (by host name, from the file's hosts_file) and changes peer gw-c (key 42 ->
43, IPv6 prefixes added): the download is byte-exact and never waits longer than
STALL_BOUND_S between two reads; gw-b's sequence numbers never restart (gw-b counts no
sequence drop). Then h-a reaches gw-d, gw-c's new key is in force (gw-a refuses gw-c's old
key until gw-c reloads too, then both directions work, IPv6 included), and a bad file is
refused with exit code 2 while everything keeps running. Run twice: every gateway split
(bridge/io/split.py: two processes, the UDP->TUN child reloaded too) and in one process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.netlink import Lab

HERE = Path(__file__).parent
TOPO = HERE.parent.parent / "topologies" / "three-sites-reload"
PACED = str(HERE / "paced.py")
SIZE = 36 * 1024 * 1024   # bytes of the download
RATE = 3 * 1024 * 1024    # bytes/s: the download lasts ~12 s, longer than the reloads
STALL_BOUND_S = 1.0       # the longest wait between two reads the download may see
SEQ_DROPS = ("sequence", "internal_error")


def _status(lab: Lab, gw: str) -> dict[str, Any]:
    cp = lab.run(gw, ["grebe", "status", "--json"], check=False)
    return json.loads(cp.stdout) if cp.returncode == 0 and cp.stdout.strip() else {}


def _peer(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in st.get("peers", []) if p["name"] == name)


def _ping(lab: Lab, node: str, addr: str) -> bool:
    return lab.run(node, ["ping", "-c", "1", "-W", "1", addr], check=False).returncode == 0


def _start(lab: Lab, d: Path, split: bool) -> dict[str, subprocess.Popen[Any]]:
    procs = {}
    env = dict(os.environ, GREBE_SPLIT="1" if split else "0")
    for gw in ("gw-a", "gw-b", "gw-c", "gw-d"):
        procs[gw] = lab.popen(gw, ["grebe", "up", "-c", str(d / f"{gw}.toml")],
                              log=str(lab.state_dir / f"grebe-{gw}.log"), env=env)
    for gw in procs:
        lab.wait_for(lambda gw=gw: _status(lab, gw), 20, f"grebe on {gw}")
    return procs


@pytest.mark.parametrize("split", [True, False], ids=["split", "one-process"])
def test_reload_adds_and_changes_peers_while_a_download_runs(lab_factory: Any,
                                                             tmp_path: Path, split: bool) -> None:
    lab = lab_factory("three-sites-reload")
    d = tmp_path / "cfg"
    shutil.copytree(TOPO, d)
    procs = _start(lab, d, split)
    # split: the UDP->TUN child process is reloaded too (bridge/io/split.py)
    assert _status(lab, "gw-a")["io"].get("processes", 1) == (2 if split else 1)
    lab.wait_for(lambda: _ping(lab, "h-a", "198.18.2.10"), 20, "h-a -> h-b")
    lab.wait_for(lambda: _ping(lab, "h-a", "198.18.3.10"), 20, "h-a -> h-c")
    assert not _ping(lab, "h-a", "2001:db8:3::10")   # gw-c's IPv6 is not routed yet
    assert not _ping(lab, "h-a", "198.18.100.4")     # nor gw-d
    server = lab.popen("h-b", [sys.executable, PACED, "serve", "198.18.2.10", "5001",
                               str(SIZE), str(RATE)])
    lab.wait_for(lambda: lab.run("h-b", ["ss", "-Htln", "sport = :5001"]).stdout.strip(),
                 10, "server listening")
    client = lab.popen("h-a", [sys.executable, PACED, "fetch", "198.18.2.10", "5001"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tx0 = _peer(_status(lab, "gw-b"), "gw-a")["tx_bytes"]
    lab.wait_for(lambda: _peer(_status(lab, "gw-b"), "gw-a")["tx_bytes"] > tx0 + 2 * RATE,
                 20, "the download under way")
    b_before = _peer(_status(lab, "gw-a"), "gw-b")

    shutil.copy(d / "gw-a.reload.toml", d / "gw-a.toml")
    cp = lab.run("gw-a", ["grebe", "reload"], check=False)
    assert cp.returncode == 0, cp.stderr
    assert "peers[gw-d] (added)" in cp.stdout and "peers[gw-c].key_in" in cp.stdout
    assert "restart" not in cp.stdout
    assert client.poll() is None, "the download ended before the reload"
    st = _status(lab, "gw-a")
    assert [p["name"] for p in st["peers"]] == ["gw-b", "gw-c", "gw-d"]
    b_after = _peer(st, "gw-b")
    assert b_after["sequence"]["next_tx"] > b_before["sequence"]["next_tx"]  # not restarted
    # gw-d, known by name: reachable from h-a
    lab.wait_for(lambda: _ping(lab, "h-a", "198.18.100.4"), 15, "h-a -> gw-d")
    assert _peer(_status(lab, "gw-a"), "gw-d")["endpoint"] == "198.18.0.4:4754"
    assert _peer(_status(lab, "gw-a"), "gw-d")["hostname"] == "gw-d.lab"
    assert _peer(_status(lab, "gw-d"), "gw-a")["endpoint"] == "198.18.0.1:4754"  # by name
    # gw-c's new key is in force: its old-key keepalives are refused until it reloads too
    lab.wait_for(lambda: _status(lab, "gw-a")["drops"].get("wrong_key", 0) > 0, 10,
                 "gw-c's key-42 datagrams refused")
    shutil.copy(d / "gw-c.reload.toml", d / "gw-c.toml")
    assert lab.run("gw-c", ["grebe", "reload"]).returncode == 0
    lab.wait_for(lambda: _ping(lab, "h-a", "2001:db8:3::10"), 15, "h-a -> h-c over IPv6")
    assert _ping(lab, "h-c", "198.18.1.10")
    # a bad file: refused, exit 2, the running configuration stays
    (d / "gw-a.toml").write_text("[tun]\nname = 7\n")
    cp = lab.run("gw-a", ["grebe", "reload"], check=False)
    assert cp.returncode == 2 and "tun.name" in cp.stderr and "refused" in cp.stderr
    assert [p["name"] for p in _status(lab, "gw-a")["peers"]] == ["gw-b", "gw-c", "gw-d"]
    assert _ping(lab, "h-a", "198.18.100.4")

    out, err = client.communicate(timeout=60)
    server.wait(timeout=10)
    got = json.loads(out)
    print(f"download across the reloads: {got}")
    assert got["bytes"] == SIZE, err
    assert got["sha256"] == hashlib.sha256(_data(SIZE)).hexdigest()
    assert got["max_gap_s"] < STALL_BOUND_S, got
    drops_b = _status(lab, "gw-b")["drops"]
    assert all(drops_b.get(k, 0) == 0 for k in SEQ_DROPS), drops_b
    assert _status(lab, "gw-b")["events"].get("seq_resync", 0) == 0   # gw-a never restarted
    for gw, p in procs.items():
        assert p.poll() is None, f"grebe on {gw} ended"


def _data(n: int) -> bytes:
    sys.path.insert(0, str(HERE))
    try:
        import paced
    finally:
        sys.path.pop(0)
    return paced.data(n)

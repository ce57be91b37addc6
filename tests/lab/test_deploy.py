"""`grebe deploy` end to end (bridge/deploy/): from `ops` on the WAN of three-sites-plain, over
real OpenSSH servers on the three gateways (key authentication, host keys from a known_hosts
file), push grebe and the endpoint files `grebe pair` wrote, start it, and then every pair of
sites pings and downloads from each other. A second `up` changes nothing; `stop` stops all.
Every failure case gives its one clear line and a non-zero exit: unreachable host,
authentication refused, host key changed, start failed (with the remote log's tail)."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_inspect_kernel import SSHD_PRIVATE_MOUNTS

pytestmark = pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd")
                                .exists(), reason="needs OpenSSH's sshd")

ROOT = Path(__file__).resolve().parents[2]
GWS = {"gw-a": "198.18.0.1", "gw-b": "198.18.0.2", "gw-c": "198.18.0.3"}
HOSTS = {"h-a": "198.18.1.10", "h-b": "198.18.2.10", "h-c": "198.18.3.10"}
SSHD = """
Port 22
ListenAddress {addr}
HostKey {d}/host_key_{gw}
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd_{gw}.pid
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
"""


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().split()[0:2]  # type: ignore[return-value]


def _inventory(d: Path, hosts: dict[str, str], **over: str) -> Path:
    lines = ["[defaults]", 'user = "root"', f'identity = "{over.get("identity", d / "ops_key")}"',
             f'known_hosts = "{over.get("known_hosts", d / "known_hosts")}"',
             f'python = "{sys.executable}"']
    for gw, addr in hosts.items():
        lines += ["", f"[hosts.{gw}]", f'address = "{addr}"',
                  f'config = "{over.get("config", d / "sites" / f"{gw}.toml")}"',
                  f'dir = "{d}/{gw}/opt"', f'config_dir = "{d}/{gw}/etc"']
    path = d / f"inventory-{len(list(d.glob('inventory-*')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _deploy(lab: Any, inv: Path, action: str) -> subprocess.CompletedProcess[str]:
    return lab.run("ops", ["grebe", "deploy", str(inv), action], check=False, timeout=120)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from bridge.lab.netlink import Lab

    lab = Lab.up("three-sites-plain", instance=f"dep{os.getpid() % 100000}")
    try:
        d = tmp_path_factory.mktemp("deploy")  # not under /run: sshd gets a private /run
        lab.d = d
        known = []
        for gw, addr in GWS.items():
            kind, key = _keygen(d / f"host_key_{gw}")
            known.append(f"{addr} {kind} {key}")
            (d / f"sshd_{gw}_config").write_text(SSHD.format(addr=addr, d=d, gw=gw))
            lab.popen(gw, ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           SSHD_PRIVATE_MOUNTS, shutil.which("sshd") or "/usr/sbin/sshd",
                           str(d / f"sshd_{gw}_config")], log=str(d / f"sshd_{gw}.log"))
        (d / "known_hosts").write_text("\n".join(known) + "\n")
        _keygen(d / "ops_key")
        shutil.copy(d / "ops_key.pub", d / "authorized_keys")
        subprocess.run([sys.executable, "-m", "bridge", "pair",
                        str(ROOT / "topologies/three-sites/sites.toml"), "--out", str(d / "sites")],
                       check=True, capture_output=True)
        for gw in GWS:
            lab.wait_for(lambda gw=gw: lab.run(gw, ["ss", "-Htln", "sport = :22"]).stdout.strip(),
                         20, f"sshd on {gw}")
        yield lab
    finally:
        lab.destroy()


def test_deploy_up_joins_three_sites_then_changes_nothing_then_stops(lab: Any) -> None:
    d: Path = lab.d
    inv = _inventory(d, GWS)
    cp = _deploy(lab, inv, "up")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.count(": ok: ") == 3 and "started (pid" in cp.stdout
    assert "gw-a: connecting" in cp.stderr  # progress while it works
    # every pair of sites: ping, and a download checked by its sha256
    blob = os.urandom(2 << 20)
    (d / "www").mkdir()
    (d / "www" / "blob.bin").write_bytes(blob)
    for h in HOSTS:
        lab.popen(h, [sys.executable, "-m", "http.server", "8000", "--bind", HOSTS[h],
                      "--directory", str(d / "www")], log=str(d / f"http-{h}.log"))
    for h in HOSTS:
        lab.wait_for(lambda h=h: lab.run(h, ["ss", "-Htln", "sport = :8000"]).stdout.strip(),
                     20, f"HTTP server on {h}")
    for x, y in itertools.permutations(HOSTS, 2):
        lab.wait_for(lambda x=x, y=y: lab.run(x, ["ping", "-c", "1", "-W", "1", HOSTS[y]],
                                              check=False).returncode == 0, 20, f"{x} -> {y}")
        got = lab.run(x, ["curl", "-sS", "--max-time", "30", f"http://{HOSTS[y]}:8000/blob.bin"],
                      input=b"", timeout=40, check=True).stdout
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(blob).hexdigest()
    # a second `up` with nothing changed changes nothing: same processes
    cp2 = _deploy(lab, inv, "up")
    assert cp2.returncode == 0 and cp2.stdout.count("unchanged; running") == 3, cp2.stdout
    pids = [line.split("(pid ")[1].split(")")[0] for line in cp.stdout.splitlines()]
    pids2 = [line.split("(pid ")[1].split(")")[0] for line in cp2.stdout.splitlines()]
    assert pids == pids2
    st = _deploy(lab, inv, "status")
    assert st.returncode == 0 and "peers" in st.stdout and "down" not in st.stdout
    stop = _deploy(lab, inv, "stop")
    assert stop.returncode == 0 and stop.stdout.count("not running") == 3, stop.stdout
    for gw in GWS:
        assert "grebe0" not in lab.run(gw, ["ip", "-o", "link"]).stdout


@pytest.mark.parametrize("case,want", [
    ("unreachable", "unreachable: 198.18.0.99:22"),
    ("auth", "authentication refused for root@198.18.0.2:22"),
    ("host_key", "host key not verified for 198.18.0.3"),
    ("start_failed", "start failed; the remote log ends:"),
])
def test_each_failure_gives_one_clear_line(lab: Any, case: str, want: str) -> None:
    d: Path = lab.d
    if case == "unreachable":
        inv = _inventory(d, {"gw-x": "198.18.0.99"}, config=str(d / "sites" / "gw-a.toml"))
    elif case == "auth":
        if not (d / "stranger_key").exists():
            _keygen(d / "stranger_key")
        inv = _inventory(d, {"gw-b": GWS["gw-b"]}, identity=str(d / "stranger_key"))
    elif case == "host_key":
        wrong = d / "known_hosts_wrong"
        lines = (d / "known_hosts").read_text().splitlines()
        swapped = lines[0].replace(GWS["gw-a"], GWS["gw-c"])  # gw-a's key under gw-c's name
        wrong.write_text(swapped + "\n")
        inv = _inventory(d, {"gw-c": GWS["gw-c"]}, known_hosts=str(wrong))
    else:
        bad = d / "bad.toml"  # valid, but listens on an address the host does not have
        bad.write_text((d / "sites" / "gw-b.toml").read_text().replace(
            'address = "198.18.0.2"', 'address = "198.18.0.77"'))
        inv = _inventory(d, {"gw-b": GWS["gw-b"]}, config=str(bad))
    cp = _deploy(lab, inv, "up")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    (line,) = [ln for ln in cp.stdout.splitlines() if ": FAILED: " in ln]
    assert want in line, cp.stdout
    print(f"\n{case}: {line}")
    if case == "start_failed":
        assert "Traceback" not in cp.stdout or "Errno" in cp.stdout  # the log's own words
        _deploy(lab, inv, "stop")

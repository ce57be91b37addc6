"""The lab engine against the real kernel: reachability, links, processes, teardown, clean.

Runs as root inside gb-<instance>-* namespaces only (see tests/lab/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.lab import procs
from bridge.lab.netlink import (
    NETNS_DIR,
    STATE_ROOT,
    Lab,
    LabCommandError,
    LabError,
    lab_namespaces,
    wait_for,
)
from bridge.lab.topology import load
from bridge.lab.topomodel import Link, NodeKind

REPO = Path(__file__).resolve().parents[2]
LabFactory = Callable[..., Lab]


def ping(lab: Lab, node: str, dst: str, count: int = 1) -> subprocess.CompletedProcess[str]:
    return lab.run(node, ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "1", dst],
                   check=False)


def rx_packets(lab: Lab, node: str, ifname: str) -> int:
    with lab.iproute(node) as ipr:
        (link,) = ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])
    return int(link.get_attr("IFLA_STATS64")["rx_packets"])


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.lab", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, check=False)


def lab_is_gone(instance: str) -> bool:
    return not lab_namespaces(instance) and not (STATE_ROOT / instance).exists()


# ---------------------------------------------------------------- the two sites, no bridge


@pytest.mark.parametrize("dst", ["198.18.2.10", "2001:db8:2::10"])
def test_without_bridge_client_cannot_reach_server(two_sites_plain: Lab, dst: str) -> None:
    cp = ping(two_sites_plain, "client", dst)
    assert cp.returncode != 0, cp.stdout
    # gw-a answers "unreachable": the packet got to the gateway and died there, for lack of
    # a route to site B (not because the lab itself is broken).
    assert "nreachable" in cp.stdout, cp.stdout


@pytest.mark.parametrize("dst", ["198.18.1.10", "2001:db8:1::10"])
def test_without_bridge_server_cannot_reach_client(two_sites_plain: Lab, dst: str) -> None:
    assert ping(two_sites_plain, "server", dst).returncode != 0


def _probe(lab: Lab, link: Link, version: int) -> tuple[str, str, str, str]:
    """(pinging node, destination, node, ifname whose rx counter must grow) for `link`."""
    topo = lab.topology
    assert topo is not None
    a, b = (topo.node(ep.node) for ep in link.endpoints)
    if b.kind is NodeKind.BRIDGE:  # a host on the bridge pings another host on it
        others = [lk for lk in topo.links_of(b.name) if lk is not link]
        peer = topo.node(others[0].a.node)
        dst = peer.address(others[0].a.interface, version)
        return a.name, str(dst), b.name, link.b.interface
    return a.name, str(b.address(link.b.interface, version)), b.name, link.b.interface


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("link", ["lan-a", "wan-a", "wan-b", "lan-b", "wan-x"])
def test_every_link_carries_traffic(two_sites_plain: Lab, link: str, version: int) -> None:
    src, dst, node, ifname = _probe(two_sites_plain, two_sites_plain.link(link), version)
    before = rx_packets(two_sites_plain, node, ifname)
    cp = ping(two_sites_plain, src, dst, count=3)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert " 0% packet loss" in cp.stdout
    assert rx_packets(two_sites_plain, node, ifname) - before >= 3  # and over this very link


def test_nodes_are_configured_as_the_topology_says(two_sites_plain: Lab) -> None:
    lab = two_sites_plain
    assert lab.run("gw-a", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert lab.run("gw-b", ["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip() == "1"
    assert lab.run("client", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
    addrs = lab.run("client", ["ip", "-6", "addr", "show", "dev", "eth0"]).stdout
    assert "2001:db8:1::10/64" in addrs and "tentative" not in addrs  # DAD is off
    routes = lab.run("server", ["ip", "-6", "route", "show", "default"]).stdout
    assert "via 2001:db8:2::1" in routes
    ports = lab.run("wan", ["ip", "-br", "link", "show", "master", "br0"]).stdout
    assert {line.split("@")[0] for line in ports.splitlines()} == {"gw-a", "gw-b", "attacker"}
    # the WAN knows nothing of the sites and has no address at all
    assert "198.18" not in lab.run("wan", ["ip", "addr"]).stdout
    # nothing of the lab is visible in the root namespace
    root = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert f"gb-{lab.instance}" not in root and "wan0" not in root.split()


def test_run_failure_names_node_and_stderr(two_sites_plain: Lab) -> None:
    with pytest.raises(LabCommandError, match=r"\[client\] sh -c .* exited 3: oops"):
        two_sites_plain.run("client", ["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(KeyError, match="no node 'nowhere'"):
        two_sites_plain.run("nowhere", ["true"])


def test_wait_for_names_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match="waiting for the moon"):
        wait_for(lambda: False, timeout=0.05, what="the moon")
    assert wait_for(lambda: 42, timeout=1, what="x") == 42


# ---------------------------------------------------------------- processes and teardown


def _topology_with_runs(tmp_path: Path) -> Path:
    (tmp_path / "hello.sh").write_text(
        'echo "dir=$GREBE_LAB_DIR node=$GREBE_LAB_NODE cwd=$(pwd) arg=$1"\nexec sleep 300\n')
    path = tmp_path / "with-runs.toml"
    path.write_text(
        f'extends = "{REPO / "topologies" / "two-sites-plain.toml"}"\n'
        "[nodes.client]\n"
        'run = ["sh ./hello.sh {lab}/x", "sleep 301"]\n'
        "[nodes.wan]\n"
        'run = ["sleep 302"]\n'
        "[[links]]\n"
        'name = "lan-b"\n'
        "mtu = 1400\n"
        "[nodes.gw-b]\n"
        "mtu = { wan0 = 1300 }\n"
        "[nodes.gw-a]\n"
        'routes = [{ dst = "198.18.2.0/24", dev = "wan0" }, { dst = "2001:db8:2::/64", '
        'via = "2001:db8::2" }]\n')
    return path


def test_run_processes_start_in_their_node_and_die_with_destroy(
        lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(_topology_with_runs(tmp_path))
    assert len(lab.processes) == 3
    by_node = {p.node: p for p in lab.processes}
    inside = lab.pids()
    for p in lab.processes:
        assert p.alive()
        assert inside[p.pid] == str(NETNS_DIR / lab.ns(p.node))  # in its node's namespace
    log = Path(str(lab.processes[0].log))
    wait_for(lambda: log.exists() and log.read_text(), timeout=10, what="hello.sh output")
    assert log.read_text().strip() == (f"dir={lab.state_dir} node=client cwd={tmp_path} "
                                       f"arg={lab.state_dir}/x")
    state = json.loads((lab.state_dir / "state.json").read_text())
    assert {p["pid"] for p in state["processes"]} == {p.pid for p in lab.processes}
    # link mtu on both ends; a node's per-interface mtu wins over its link's
    assert "mtu 1400" in lab.run("server", ["ip", "link", "show", "eth0"]).stdout
    assert "mtu 1400" in lab.run("gw-b", ["ip", "link", "show", "lan0"]).stdout
    assert "mtu 1300" in lab.run("gw-b", ["ip", "link", "show", "wan0"]).stdout
    assert "198.18.2.0/24 dev wan0 proto static scope link" in lab.run(
        "gw-a", ["ip", "route"]).stdout
    assert "2001:db8:2::/64 via 2001:db8::2 dev wan0" in lab.run(
        "gw-a", ["ip", "-6", "route"]).stdout
    extra = lab.popen("gw-a", ["sleep", "303"])
    tracked = [*lab.processes]
    assert by_node["wan"].pid in inside
    lab.destroy()
    assert extra.poll() is not None
    for p in tracked:
        assert not p.alive()
    assert lab_is_gone(lab.instance)


def test_destroy_is_idempotent_and_leaves_nothing(lab_factory: LabFactory) -> None:
    lab = lab_factory("two-sites-plain", start=False)
    stray = lab.run("server", ["sh", "-c", "setsid sleep 304 >/dev/null 2>&1 & echo $!"])
    stray_pid = int(stray.stdout)
    assert stray_pid in lab.pids()  # untracked, but inside the lab: destroy must find it
    lab.destroy()
    lab.destroy()
    assert lab_is_gone(lab.instance)
    assert procs.start_time(stray_pid) is None or procs.is_zombie(stray_pid)
    with pytest.raises(LabError, match="no lab instance"):
        Lab.attach(lab.instance)


def test_second_up_of_a_running_instance_is_refused(lab_factory: LabFactory) -> None:
    lab = lab_factory("two-sites-plain", start=False)
    with pytest.raises(LabError, match="already up"):
        Lab.up(load("two-sites-plain"), instance=lab.instance)
    assert ping(lab, "client", "198.18.1.1").returncode == 0  # the first one is unharmed


def test_attach_finds_a_running_lab(lab_factory: LabFactory) -> None:
    lab = lab_factory("two-sites-plain", start=False)
    p = lab.popen("client", ["sleep", "305"])
    again = Lab.attach(lab.instance)
    assert again.nodes == lab.nodes and again.topology is not None
    assert [t.pid for t in again.processes] == [p.pid]
    assert again.run("gw-a", ["ping", "-c1", "-W1", "198.18.0.66"]).returncode == 0
    again.destroy()
    assert p.wait(timeout=5) is not None
    assert lab_is_gone(lab.instance)


# ---------------------------------------------------------------- the command line


def test_cli_up_exec_list_down(lab_instance_names: Callable[[], str]) -> None:
    instance = lab_instance_names()
    try:
        up = cli("up", "two-sites-plain", "--instance", instance)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "198.18.2.10/24" in up.stdout and "wan-x" in up.stdout
        ex = cli("exec", "--instance", instance, "client", "--", "sh", "-c",
                 "echo $GREBE_LAB_NODE; ip -br addr show eth0; exit 7")
        assert ex.returncode == 7
        assert ex.stdout.startswith("client\n") and "198.18.1.10/24" in ex.stdout
        assert instance in cli("list").stdout
        assert cli("exec", "--instance", instance, "nowhere", "--", "true").returncode == 2
    finally:
        down = cli("down", "--instance", instance)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_is_gone(instance)


def test_cli_rejects_bad_topology(tmp_path: Path, lab_instance_names: Callable[[], str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[nodes.a]\naddresses = { eth0 = ["10.1.1.1/24"] }\n')
    instance = lab_instance_names()
    cp = cli("up", str(bad), "--instance", instance)
    assert cp.returncode == 2
    assert f"{bad}: nodes.a.addresses.eth0: no such interface" in cp.stdout
    assert lab_is_gone(instance)


def test_clean_after_sigkilled_up(tmp_path: Path, lab_instance_names: Callable[[], str]) -> None:
    instance, bystander = lab_instance_names(), lab_instance_names()
    other = Lab.up(load("two-sites-plain"), instance=bystander, start=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.lab", "up", str(_topology_with_runs(tmp_path)),
         "--instance", instance, "--wait"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the lab is up (or the process ends)
            if line.startswith("waiting;"):
                break
        assert proc.poll() is None, "up --wait ended early"
        state = json.loads((STATE_ROOT / instance / "state.json").read_text())
        pids = {p["pid"]: p["start_time"] for p in state["processes"]}
        assert len(pids) == 3 and all(procs.start_time(p) == s for p, s in pids.items())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert len(lab_namespaces(instance)) == 6  # orphaned: nobody will tear it down
        cp = cli("clean", "--instance", instance)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "removed 6 namespace(s)" in cp.stdout
        assert lab_is_gone(instance)
        for pid, start in pids.items():  # every run process died (a zombie is dead too)
            assert procs.start_time(pid) != start or procs.is_zombie(pid)
        assert len(lab_namespaces(bystander)) == 6  # another instance is left alone
        assert ping(other, "gw-a", "198.18.0.2").returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cli("clean", "--instance", instance)
        other.destroy()
    assert lab_is_gone(bystander)


def test_up_wait_tears_down_on_sigterm(lab_instance_names: Callable[[], str]) -> None:
    instance = lab_instance_names()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.lab", "up", "two-sites-plain", "--instance", instance,
         "--wait"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("waiting;"):
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0 and "torn down" in rest
        assert lab_is_gone(instance)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cli("clean", "--instance", instance)


def test_demo_runs_and_tears_down(lab_instance_names: Callable[[], str]) -> None:
    instance = lab_instance_names()
    cp = cli("demo", "--instance", instance, "--topology", "two-sites-plain", timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "UNEXPECTED" not in cp.stdout
    assert "client   cannot reach 198.18.2.10" in cp.stdout
    assert f"lab '{instance}' torn down" in cp.stdout
    assert lab_is_gone(instance)


def test_no_lab_process_escapes_into_the_root_namespace(lab_factory: LabFactory) -> None:
    lab = lab_factory("two-sites-plain", start=False)
    p = lab.popen("attacker", ["sleep", "306"])
    root = os.stat("/proc/self/ns/net").st_ino
    assert os.stat(f"/proc/{p.pid}/ns/net").st_ino != root


def test_session_leak_check_fails_a_run_that_leaks(tmp_path: Path,
                                                   lab_instance_names: Callable[[], str]) -> None:
    prefix = f"{lab_instance_names()}l"
    (tmp_path / "test_leaky.py").write_text(
        "from bridge.lab.netlink import Lab\n"
        "def test_leaks():\n"
        f"    lab = Lab.up('two-sites-plain', instance='{prefix}0', start=False)\n"
        "    lab.popen('client', ['sleep', '307'])\n")
    cp = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
        cwd=REPO, text=True, capture_output=True, timeout=120,
        env={**os.environ, "GREBE_TEST_PREFIX": prefix})
    assert "1 passed" in cp.stdout  # the test itself passed ...
    assert cp.returncode == 1, cp.stdout + cp.stderr  # ... but the run fails
    assert f"gb-{prefix}0-client" in cp.stdout and "sleep 307" in cp.stdout
    assert lab_is_gone(f"{prefix}0")  # and the leftovers were removed


def test_link_impairment_from_the_topology_is_applied_at_up(
        lab_factory: LabFactory, tmp_path: Path) -> None:
    impair = pytest.importorskip("bridge.lab.impair", reason="bridge/lab/impair.py not there")
    path = tmp_path / "slow.toml"
    path.write_text(f'extends = "{REPO / "topologies" / "two-sites-plain.toml"}"\n'
                    '[[links]]\nname = "wan-x"\nimpair = { rate = "10mbit" }\n')
    lab = lab_factory(path, start=False)
    assert isinstance(lab.link("wan-x").impair, impair.Impairment)
    assert impair.current(lab, "wan-x")[0].rate_mbit == 10
    assert impair.current(lab, "wan-a")[0].is_off


@pytest.mark.parametrize(("extra", "message"), [
    ('[nodes.gw-a]\nsysctl = { "net.ipv4.no_such_knob" = 1 }\n',
     "gw-a: sysctl net.ipv4.no_such_knob = 1"),
    ('[nodes.attacker]\nroutes = [{ dst = "198.18.9.0/24", via = "198.18.7.1" }]\n',
     "attacker: route 198.18.9.0/24 via 198.18.7.1"),
])
def test_a_kernel_refusal_names_the_step_and_leaves_nothing(
        tmp_path: Path, lab_instance_names: Callable[[], str], extra: str, message: str) -> None:
    path = tmp_path / "refused.toml"
    path.write_text(f'extends = "{REPO / "topologies" / "two-sites-plain.toml"}"\n{extra}')
    instance = lab_instance_names()
    with pytest.raises(LabError, match=message):
        Lab.up(load(path), instance=instance)
    assert lab_is_gone(instance)


def test_nft_ruleset_loads_inside_one_node_only(lab_factory: LabFactory) -> None:
    lab = lab_factory("two-sites-plain", start=False)
    assert ping(lab, "gw-a", "198.18.0.66").returncode == 0
    lab.nft("attacker", "table inet gbtest {\n chain input {\n"
                        "  type filter hook input priority 0; policy accept;\n"
                        "  icmp type echo-request drop\n }\n}\n")
    assert ping(lab, "gw-a", "198.18.0.66").returncode != 0
    assert ping(lab, "gw-a", "2001:db8::66").returncode == 0  # only ICMPv4 was dropped
    assert "gbtest" in lab.run("attacker", ["nft", "list", "tables"]).stdout
    assert "gbtest" not in lab.run("gw-a", ["nft", "list", "tables"]).stdout
    with pytest.raises(LabCommandError, match=r"\[attacker\] nft -f -"):
        lab.nft("attacker", "this is not nft\n")

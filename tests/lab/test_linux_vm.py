"""The two-sites-linux topology as a user drives it: `up`, `exec`, `down` (bridge/lab/vm.py).

Through `python -m bridge.lab` (what ./netns-lab.sh hands over to): the client pings the
server behind the Linux gateway over grebe <-> kernel GRE-in-UDP, `exec` runs commands in the
guest (exit status and output passed through), and `down` leaves no qemu process, TAP device,
namespace or state behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

from bridge.lab import procs, vm
from bridge.lab.netlink import STATE_ROOT, Lab, lab_namespaces


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.lab", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_up_exec_down_two_sites_linux(lab_instance_names: Callable[[], str]) -> None:
    inst = lab_instance_names()
    qemu: list[dict[str, object]] = []
    up = cli("up", "two-sites-linux", "--instance", inst)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "gw-b" in up.stdout and "linux-vm" in up.stdout
        state = json.loads((STATE_ROOT / inst / "state.json").read_text())
        assert state["vms"] == ["gw-b"]
        qemu += [p for p in state["processes"] if p["node"] == "gw-b"]
        assert len(qemu) == 1 and qemu[0]["argv"][0] == "qemu-system-x86_64"
        with IPRoute(netns=f"gb-{inst}-gw-b") as ipr:  # the TAPs live in the node's namespace
            names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        assert {"tap0", "tap1", "vbr0", "vbr1", "wan0", "lan0"} <= names

        ping = cli("exec", "--instance", inst, "client", "--", "ping", "-c", "3", "-i", "0.2",
                   "-W", "2", "198.18.2.10", timeout=30)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        ping6 = cli("exec", "--instance", inst, "client", "--", "ping", "-c", "2", "-i", "0.2",
                    "-W", "2", "2001:db8:2::10", timeout=30)
        assert ping6.returncode == 0, ping6.stdout + ping6.stderr

        link = cli("exec", "--instance", inst, "gw-b", "--", "ip", "-d", "link", "show", "gre1",
                   timeout=30)
        assert link.returncode == 0 and "encap fou" in link.stdout and "ikey 0.0.0.42" in \
            link.stdout, link.stdout + link.stderr
        fails = cli("exec", "--instance", inst, "gw-b", "--", "sh", "-c", "echo out; echo err >&2;"
                    " exit 7", timeout=30)
        assert (fails.returncode, fails.stdout, fails.stderr) == (7, "out\n", "err\n")
        uname = cli("exec", "--instance", inst, "gw-b", "--", "uname", "-r", timeout=30)
        assert uname.stdout.strip() == (STATE_ROOT / inst / "gw-b.kernel").read_text().split()[0]
    finally:
        down = cli("down", "--instance", inst)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(inst) == []
    assert not (STATE_ROOT / inst).exists()
    for p in qemu:  # the very process (not a recycled pid), dead (a zombie awaits its reaper)
        pid = int(str(p["pid"]))
        assert procs.start_time(pid) != p["start_time"] or procs.is_zombie(pid), "qemu lives"


def test_a_failing_guest_run_line_fails_up_and_leaves_nothing(
        lab_instance_names: Callable[[], str], tmp_path: Path) -> None:
    topo = tmp_path / "vm-fails.toml"
    topo.write_text('[nodes.vm]\nkind = "linux-vm"\naddresses = { eth0 = ["198.18.9.2/24"] }\n'
                    'run = ["ip link show eth0", "echo broken >&2; exit 3"]\n'
                    '[nodes.h]\naddresses = { eth0 = ["198.18.9.1/24"] }\n'
                    '[[links]]\nendpoints = ["vm:eth0", "h:eth0"]\n')
    inst = lab_instance_names()
    seen: list[int] = []
    real_popen = Lab.popen

    def popen(self: Lab, node: str, argv: Any, **kw: Any) -> Any:
        p = real_popen(self, node, argv, **kw)
        seen.append(p.pid)
        return p

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Lab, "popen", popen)
        with pytest.raises(vm.GuestError, match="exited 3: broken"):
            Lab.up(topo, instance=inst)
    assert len(seen) == 1  # qemu
    assert lab_namespaces(inst) == [] and not (STATE_ROOT / inst).exists()
    assert procs.start_time(seen[0]) is None or procs.is_zombie(seen[0])

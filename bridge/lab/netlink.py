"""Lab: apply a topology to the kernel with pyroute2, run processes in nodes, tear it all down.

Rules
-----
- Every node is a network namespace `gb-<instance>-<node>`; nothing is ever added to the root
  namespace. Veth pairs are created inside the first endpoint's namespace with the peer placed
  directly in the other's (IFLA_NET_NS_FD), so no interface ever appears in the root namespace.
- Netlink goes through pyroute2 only (`IPRoute(netns=...)`); sysctls are written to /proc/sys/net
  from a thread that entered the namespace (procs.in_netns); tools run in a node through a
  preexec_fn doing setns(2) (procs.enter_netns), never through `ip netns exec`.
- No blind sleeps: IPv6 DAD is switched off before interfaces exist (accept_dad=0 and
  IFA_F_NODAD, RFC 4862 §5.4 would otherwise keep addresses tentative), and link carrier is
  awaited with pyroute2 `poll`.
- A lab leaves a JSON state file in /run/grebe-lab/<instance>/state.json (topology file,
  namespaces, tracked processes with pid + start time, logs) before it touches the kernel, so
  `down` and `clean` work after a crash or SIGKILL of the Python that built it.
- `destroy()` is idempotent; it ignores only "already gone" errors (ENOENT, ENODEV, ESRCH).
- Instances are `[a-z0-9_]{1,16}` (no '-', so the prefix `gb-<instance>-` is unambiguous).

Theory of operation
-------------------
`Lab.up(topology)`: write state -> create namespaces (lo up, DAD off) -> veth pairs -> bridges
for `kind = "bridge"` nodes -> MTU, link up -> addresses -> node sysctls -> wait for carrier ->
routes -> link impairments (bridge.lab.impair, if present) -> `run` processes. Any failure
destroys what was built and re-raises. `Lab.attach(instance)` rebuilds a Lab from the state file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from bridge.errors import GrebeError
from bridge.lab import procs
from bridge.lab.topology import load
from bridge.lab.topomodel import (
    BRIDGE_IFNAME,
    MAX_INSTANCE_NAME,
    Link,
    NodeKind,
    Route,
    Topology,
)

STATE_ROOT = Path("/run/grebe-lab")
NETNS_DIR = Path(procs.NETNS_DIR)
NS_PREFIX = "gb-"
IFA_F_NODAD = 0x02  # linux/if_addr.h
RT_SCOPE_LINK = 253  # linux/rtnetlink.h
_INSTANCE = re.compile(rf"^[a-z0-9_]{{1,{MAX_INSTANCE_NAME}}}$")
_GONE = {errno.ENOENT, errno.ENODEV, errno.ESRCH}
_VENV_BIN = str(Path(sys.executable).parent)


class LabError(GrebeError):
    """The lab cannot be built or found (misuse or a host problem, never a peer)."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run with Lab.run(check=True) failed; str() names the node and shows stderr."""

    def __init__(self, node: str, cp: subprocess.CompletedProcess[Any]) -> None:
        super().__init__(cp.returncode, cp.args, cp.stdout, cp.stderr)
        self.node = node

    def __str__(self) -> str:
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        tail = (err or "").strip()[-800:]
        return f"[{self.node}] {' '.join(map(str, self.cmd))} exited {self.returncode}: {tail}"


def ns_name(instance: str, node: str) -> str:
    return f"{NS_PREFIX}{instance}-{node}"


def check_instance(instance: str) -> str:
    """Return `instance` if it is a valid instance name; raises LabError."""
    if not _INSTANCE.match(instance):
        raise LabError(
            f"bad lab instance name {instance!r}: use 1-{MAX_INSTANCE_NAME} of a-z 0-9 _")
    return instance


def lab_namespaces(instance: str | None = None) -> list[str]:
    """Names of existing lab namespaces (all gb-*, or those of one instance)."""
    prefix = NS_PREFIX if instance is None else f"{NS_PREFIX}{instance}-"
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _ignore_gone(fn: Callable[[], object]) -> None:
    try:
        fn()
    except NetlinkError as e:
        if e.code not in _GONE:
            raise
    except OSError as e:
        if e.errno not in _GONE:
            raise


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn a kernel refusal during `what` into a LabError that names it."""
    try:
        yield
    except NetlinkError as e:
        raise LabError(f"{what}: {os.strerror(e.code) if e.code else e}") from e
    except OSError as e:  # TimeoutError (pyroute2 poll) included
        raise LabError(f"{what}: {e.strerror or e}") from e


def _write_sysctls(ns_path: str, items: Sequence[tuple[str, str]]) -> None:
    def body() -> None:
        for key, value in items:
            with _step(f"{os.path.basename(ns_path)}: sysctl {key} = {value}"), \
                    open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

    procs.in_netns(ns_path, body)


_BASE_SYSCTLS = (
    # RFC 4862 §5.4: without this every address stays "tentative" for a second or more.
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv6.conf.all.accept_ra", "0"),
    ("net.ipv6.conf.default.accept_ra", "0"),
)


class Lab:
    """A running lab instance; see the module docstring and docs/DESIGN.md."""

    def __init__(self, topology: Topology | None, instance: str, nodes: Sequence[str],
                 topology_file: str | None = None) -> None:
        self.topology = topology
        self.instance = check_instance(instance)
        self.nodes = tuple(nodes)
        self.topology_file = topology_file or (topology.file if topology else None)
        self.state_dir = STATE_ROOT / instance
        self.processes: list[procs.TrackedProcess] = []
        self._popens: list[subprocess.Popen[Any]] = []
        self.owner_pid = os.getpid()  # the process that built it (leak checks in tests)
        self.vms: list[str] = []  # linux-vm nodes (bridge/lab/vm.py): run() goes to the guest
        self.progress: Callable[[str], None] | None = None  # Lab.up's running commentary
        self._lock = threading.Lock()

    # ------------------------------------------------------------ building

    @classmethod
    def up(cls, topology: Topology | str | Path, instance: str = "lab",
           *, start: bool = True, progress: Callable[[str], None] | None = None) -> Lab:
        """Build `topology` as lab `instance`; return the Lab.

        `start=False` skips the nodes' `run` processes. `progress`, if given, is told each
        step as it begins (namespaces, links, addresses, carrier, processes) and the time
        taken. Raises LabError if the instance is already up; on any failure, destroys what
        it built and re-raises.
        """
        t0 = time.monotonic()
        topo = topology if isinstance(topology, Topology) else load(topology)
        check_instance(instance)
        if lab_namespaces(instance) or (STATE_ROOT / instance).exists():
            raise LabError(f"lab instance {instance!r} is already up (down or clean it first)")
        lab = cls(topo, instance, [n.name for n in topo.nodes])
        lab.progress = progress
        try:
            lab.state_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:  # another process won the race for this instance
            raise LabError(f"lab instance {instance!r} is already up") from None
        lab._save()
        try:
            lab._build(topo)
            if start:
                lab._start_runs(topo)
        except BaseException:
            lab._say("failed: tearing down what was built")
            lab.destroy()
            raise
        lab._say(f"up in {time.monotonic() - t0:.1f} s")
        return lab

    def _say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(f"lab {self.instance}: {msg}")

    def _build(self, topo: Topology) -> None:
        self._say(f"creating {len(topo.nodes)} namespaces: "
                  f"{', '.join(n.name for n in topo.nodes)}")
        for node in topo.nodes:
            with _step(f"{node.name}: create namespace {self.ns(node.name)}"):
                netns.create(self.ns(node.name))
            _write_sysctls(self.ns_path(node.name), _BASE_SYSCTLS)
        with self._iprs() as ipr:
            for node in topo.nodes:
                lo = ipr[node.name].link_lookup(ifname="lo")[0]
                ipr[node.name].link("set", index=lo, state="up")
            self._say(f"{len(topo.links)} links (veth pairs)")
            for link in topo.links:
                with _step(f"link {link.name}: veth {link.a} -- {link.b}"):
                    ipr[link.a.node].link("add", ifname=link.a.interface, kind="veth",
                                          peer={"ifname": link.b.interface,
                                                "net_ns_fd": self.ns(link.b.node)})
            self._say("addresses, bridges and sysctls")
            for node in topo.nodes:
                if node.kind is not NodeKind.LINUX_VM:  # the guest configures itself
                    self._configure_node(ipr[node.name], node.name, topo)
            for node in topo.nodes:
                if node.sysctl and node.kind is not NodeKind.LINUX_VM:
                    _write_sysctls(self.ns_path(node.name), node.sysctl)
            if vms := [n for n in topo.nodes if n.kind is NodeKind.LINUX_VM]:
                from bridge.lab import vm  # qemu guests: prepare, boot, configure

                self.vms = [n.name for n in vms]
                self._save()
                self._say(f"booting {len(vms)} linux-vm node(s) in qemu (this takes a while)")
                with _step("linux-vm nodes: boot"):
                    vm.start(self, vms)
            self._say("waiting for carrier on every interface")
            for node in topo.nodes:
                for ifname in node.interfaces:
                    with _step(f"{node.name}: waiting for carrier on {ifname}"):
                        ipr[node.name].poll(ipr[node.name].link, "dump", ifname=ifname,
                                            operstate="UP", timeout=10, interval=0.01)
            self._say("routes")
            for node in topo.nodes:
                for route in node.routes if node.kind is not NodeKind.LINUX_VM else ():
                    self._add_route(ipr[node.name], node.name, route)
        self._apply_impairments(topo)

    @staticmethod
    def _add_route(ipr: IPRoute, node: str, route: Route) -> None:
        spec: dict[str, Any] = {"dst": str(route.dst),
                                "family": AF_INET6 if route.dst.version == 6 else AF_INET}
        if route.via is not None:
            spec["gateway"] = str(route.via)
        else:  # on-link, as `ip route add PREFIX dev IF` does
            spec["scope"] = RT_SCOPE_LINK
        if route.dev is not None:
            spec["oif"] = ipr.link_lookup(ifname=route.dev)[0]
        via = f" via {route.via}" if route.via else ""
        with _step(f"{node}: route {route.dst}{via}{f' dev {route.dev}' if route.dev else ''}"):
            ipr.route("add", **spec)

    def _configure_node(self, ipr: IPRoute, name: str, topo: Topology) -> None:
        node = topo.node(name)
        link_mtu = {}
        for link in topo.links_of(name):
            for ep in link.endpoints:
                if ep.node == name and link.mtu is not None:
                    link_mtu[ep.interface] = link.mtu
        mtu = {**link_mtu, **dict(node.mtu)}
        ifnames = list(node.interfaces)
        if node.kind is NodeKind.BRIDGE:
            ipr.link("add", ifname=BRIDGE_IFNAME, kind="bridge", br_stp_state=0,
                     br_forward_delay=0, br_mcast_snooping=0)
            br = ipr.link_lookup(ifname=BRIDGE_IFNAME)[0]
            for port in node.interfaces:
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br)
            ifnames.append(BRIDGE_IFNAME)
        for ifname in ifnames:
            index = ipr.link_lookup(ifname=ifname)[0]
            if ifname in mtu:
                with _step(f"{name}: mtu {mtu[ifname]} on {ifname}"):
                    ipr.link("set", index=index, mtu=mtu[ifname])
            ipr.link("set", index=index, state="up")
        for addr in node.addresses:
            index = ipr.link_lookup(ifname=addr.interface)[0]
            with _step(f"{name}: address {addr.address} on {addr.interface}"):
                ipr.addr("add", index=index, address=str(addr.address.ip),
                         prefixlen=addr.address.network.prefixlen,
                         flags=IFA_F_NODAD if addr.address.version == 6 else 0)

    def _apply_impairments(self, topo: Topology) -> None:
        links = [lk for lk in topo.links if lk.impair is not None]
        if not links:
            return
        from bridge.lab import impair  # optional module (written separately)

        self._say(f"impairments on {', '.join(lk.name for lk in links)}")
        for link in links:
            impair.apply(self, link.name, link.impair)

    def _start_runs(self, topo: Topology) -> None:
        n = sum(len(node.run) for node in topo.nodes)
        if n:
            self._say(f"starting {n} node process(es)")
        for node in topo.nodes:
            if node.kind is NodeKind.LINUX_VM:
                from bridge.lab import vm

                vm.run_lines(self, node)
                continue
            for i, cmd in enumerate(node.run):
                log = self.state_dir / f"{node.name}.run{i}.log"
                self.popen(node.name, list(cmd.resolve(str(self.state_dir))), cwd=cmd.cwd,
                           log=str(log))

    @contextmanager
    def _iprs(self) -> Iterator[dict[str, IPRoute]]:
        opened: dict[str, IPRoute] = {}
        try:
            for node in self.nodes:
                opened[node] = IPRoute(netns=self.ns(node))
            yield opened
        finally:
            for ipr in opened.values():
                ipr.close()

    # ------------------------------------------------------------ using

    def ns(self, node: str) -> str:
        """Namespace name of `node`; raises KeyError for an unknown node."""
        if node not in self.nodes:
            known = ", ".join(self.nodes)
            raise KeyError(f"lab {self.instance} has no node {node!r} (has {known})")
        return ns_name(self.instance, node)

    def ns_path(self, node: str) -> str:
        return str(NETNS_DIR / self.ns(node))

    def link(self, name: str) -> Link:
        """The topology's link called `name`; raises KeyError (or LabError without topology)."""
        if self.topology is None:
            raise LabError(f"lab {self.instance}: topology {self.topology_file} not loadable")
        return self.topology.link(name)

    def iproute(self, node: str) -> IPRoute:
        """A pyroute2 IPRoute inside `node`; the caller closes it (use `with`)."""
        return IPRoute(netns=self.ns(node))

    def env(self, node: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a process in `node`: `base` (default os.environ) + the lab's."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = _VENV_BIN + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        env["GREBE_LAB_DIR"] = str(self.state_dir)
        env["GREBE_LAB_INSTANCE"] = self.instance
        env["GREBE_LAB_NODE"] = node
        return env

    def run(self, node: str, argv: Sequence[str], timeout: float | None = 30,
            check: bool = True, input: str | bytes | None = None,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run `argv` inside `node`, capture its output (text unless `input` is bytes).

        Returns the CompletedProcess; raises LabCommandError if `check` and it fails, and
        subprocess.TimeoutExpired after `timeout` seconds (the command is killed).
        """
        if node in self.vms:
            from bridge.lab import vm

            cp = vm.run(self, node, list(argv), timeout=timeout, input=input)
            if check and cp.returncode != 0:
                raise LabCommandError(node, cp)
            return cp
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", not isinstance(input, bytes))
        kw["env"] = self.env(node, kw.get("env"))
        cp = subprocess.run(list(argv), input=input, timeout=timeout, check=False,
                            preexec_fn=procs.enter_netns(self.ns_path(node)), **kw)
        if check and cp.returncode != 0:
            raise LabCommandError(node, cp)
        return cp

    def popen(self, node: str, argv: Sequence[str], *, log: str | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` in the background inside `node`; destroy() kills it.

        Output goes to `log` (a file) when given and no stdout/stderr is passed. The process
        leads its own session (its group is killed at destroy). Returns the Popen.
        """
        kw["env"] = self.env(node, kw.get("env"))
        kw.setdefault("start_new_session", True)
        logf = None
        if log is not None and "stdout" not in kw:
            logf = open(log, "ab")  # noqa: SIM115 - handed to the child, closed below
            kw["stdout"] = logf
            kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("stdin", subprocess.DEVNULL)
        try:
            p = subprocess.Popen(list(argv), preexec_fn=procs.enter_netns(self.ns_path(node)),
                                 **kw)
        finally:
            if logf is not None:
                logf.close()
        st = procs.start_time(p.pid)
        with self._lock:
            self._popens.append(p)
            self.processes.append(procs.TrackedProcess(node, p.pid, st or 0, tuple(argv), log))
            self._save()
        return p

    def sysctl(self, node: str, key: str, value: str | int) -> None:
        """Write a net.* sysctl inside `node`."""
        _write_sysctls(self.ns_path(node), [(key, str(value))])

    def nft(self, node: str, ruleset: str) -> None:
        """Load an nftables ruleset inside `node` (`nft -f -`); raises LabCommandError."""
        self.run(node, ["nft", "-f", "-"], input=ruleset)

    def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0,
                 what: str = "condition") -> Any:
        """Poll `predicate` until it returns a true value, which is returned.

        Raises TimeoutError naming `what` after `timeout` seconds.
        """
        return wait_for(predicate, timeout, what)

    def pids(self) -> dict[int, str]:
        """Every live process inside this lab's namespaces: pid -> namespace path."""
        return procs.pids_in_netns(self.ns_path(n) for n in self.nodes)

    # ------------------------------------------------------------ state and teardown

    def _save(self) -> None:
        state = {
            "instance": self.instance,
            "owner_pid": self.owner_pid,
            "topology_file": self.topology_file,
            "topology": self.topology.name if self.topology else None,
            "nodes": list(self.nodes),
            "vms": self.vms,
            "namespaces": {n: ns_name(self.instance, n) for n in self.nodes},
            "processes": [
                {"node": p.node, "pid": p.pid, "start_time": p.start_time,
                 "argv": list(p.argv), "log": p.log}
                for p in self.processes
            ],
            "created": time.time(),
        }
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_dir / "state.json")

    @classmethod
    def attach(cls, instance: str = "lab") -> Lab:
        """The running lab `instance`, from its state file; raises LabError if there is none."""
        check_instance(instance)
        path = STATE_ROOT / instance / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab instance {instance!r} is up ({path} missing)") from None
        topo: Topology | None = None
        if state.get("topology_file"):
            try:
                topo = load(state["topology_file"])
            except (GrebeError, OSError):
                topo = None
        lab = cls(topo, instance, state["nodes"], topology_file=state.get("topology_file"))
        lab.owner_pid = int(state.get("owner_pid", 0))
        lab.vms = list(state.get("vms", []))
        lab.processes = [
            procs.TrackedProcess(p["node"], p["pid"], p["start_time"], tuple(p["argv"]), p["log"])
            for p in state.get("processes", [])
        ]
        return lab

    def destroy(self) -> None:
        """Kill every process of the lab, delete its namespaces and state. Idempotent.

        Raises LabError (after doing all of that) if a process survived SIGKILL.
        """
        tracked: dict[int, int | None] = {p.pid: p.start_time for p in self.processes}
        survivors = procs.kill_pids(tracked, groups=tracked)
        survivors += procs.kill_pids(dict.fromkeys(self.pids()))
        for p in self._popens:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                survivors.append(p.pid)
        for node in self.nodes:
            _remove_netns(ns_name(self.instance, node))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if survivors:
            raise LabError(f"lab {self.instance}: processes survived SIGKILL: {survivors}")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def wait_for(predicate: Callable[[], object], timeout: float = 10.0,
             what: str = "condition") -> Any:
    """Poll `predicate` (bounded, backing off to 100 ms) until true; return its value.

    Raises TimeoutError("timed out after Ns waiting for WHAT").
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _remove_netns(name: str) -> None:
    path = NETNS_DIR / name
    if not path.exists():
        return
    _ignore_gone(lambda: netns.remove(name))


def lab_owners() -> dict[str, int]:
    """instance -> pid of the process that built it, from every lab state file."""
    owners: dict[str, int] = {}
    for state_dir in STATE_ROOT.iterdir() if STATE_ROOT.exists() else []:
        try:
            owners[state_dir.name] = int(
                json.loads((state_dir / "state.json").read_text()).get("owner_pid", 0))
        except (OSError, ValueError):
            continue
    return owners


def clean_all(instance: str | None = None) -> list[str]:
    """Kill every process inside a lab namespace and delete those namespaces and lab state.

    With `instance`, only that instance's `gb-<instance>-*`; otherwise every `gb-*`. Works
    after a SIGKILLed run (it needs only /run/netns and /proc). Returns the namespaces removed.
    """
    if instance is not None:
        check_instance(instance)
    names = lab_namespaces(instance)
    states = [STATE_ROOT / instance] if instance else (
        list(STATE_ROOT.iterdir()) if STATE_ROOT.exists() else [])
    tracked: dict[int, int | None] = {}
    for state_dir in states:
        try:
            state = json.loads((state_dir / "state.json").read_text())
        except (OSError, ValueError):
            continue
        for p in state.get("processes", []):
            tracked[int(p["pid"])] = int(p["start_time"])
    procs.kill_pids(tracked, groups=tracked)
    procs.kill_pids(dict.fromkeys(procs.pids_in_netns(str(NETNS_DIR / n) for n in names)))
    for name in names:
        _remove_netns(name)
    for state_dir in states:
        shutil.rmtree(state_dir, ignore_errors=True)
    return names

"""`python -m bridge.lab` (what ./netns-lab.sh hands over to): the lab's subcommands.

    up [TOPOLOGY] [-i I] [--no-run] [--wait]  build a topology and leave it running (--wait:
                                              in the foreground until Ctrl-C, then down)
    down [--instance I]                       tear a running lab down
    exec [--instance I] NODE [--] CMD...      run CMD (default: a shell) inside NODE
    list                                      lab namespaces, instances, topologies
    clean [--instance I]                      remove every gb-* namespace and process (or one
                                              instance's), whatever left them behind
    impair [--instance I] [LINK key=value...|LINK off]  show/change link impairment
    bench ...                                 bridge.lab.bench.main(argv)
    test [PYTEST ARGS]                        pytest from the repo root, then a leak check
    demo [--topology T]                       the two sites apart, then joined by grebe

Rules: exit status 0 on success, 2 for bad usage or configuration, otherwise the status of
the command run (exec, test). Everything lives in `gb-*` namespaces; the root namespace is
never changed. `demo()` always tears its lab down, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bridge.errors import GrebeError
from bridge.lab import procs
from bridge.lab.netlink import (
    NETNS_DIR,
    NS_PREFIX,
    STATE_ROOT,
    Lab,
    check_instance,
    clean_all,
    lab_namespaces,
    lab_owners,
    ns_name,
)
from bridge.lab.topology import TOPOLOGY_DIR
from bridge.lab.topomodel import NodeKind

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOPOLOGY = "two-sites"
DEMO_TOPOLOGY = "two-sites-plain"


def say(msg: str = "") -> None:
    print(msg, flush=True)


def describe(lab: Lab) -> str:
    """Human summary of a lab: nodes with namespaces, interfaces and addresses; links."""
    topo = lab.topology
    if topo is None:
        return "\n".join(f"  {n:10} {lab.ns(n)}" for n in lab.nodes)
    lines = [f"lab {lab.instance!r}: topology {topo.name} ({topo.file})", "nodes:"]
    for node in topo.nodes:
        kind = {NodeKind.BRIDGE: " (bridge br0)",
                NodeKind.LINUX_VM: " (linux-vm: a Linux kernel in qemu)"}.get(node.kind, "")
        lines.append(f"  {node.name:9} {lab.ns(node.name)}{kind}")
        for ifname in (*node.interfaces, "br0", "lo"):
            addrs = [str(a.address) for a in node.addresses if a.interface == ifname]
            if ifname in node.interfaces or addrs:
                lines.append(f"      {ifname:9} {' '.join(addrs) or '-'}")
        for route in node.routes:
            via = f" via {route.via}" if route.via else ""
            lines.append(f"      route {route.dst}{via}{f' dev {route.dev}' if route.dev else ''}")
        for cmd in node.run:
            lines.append(f"      run   {' '.join(cmd.argv)}")
    lines.append("links:")
    for link in topo.links:
        extra = f" mtu {link.mtu}" if link.mtu else ""
        extra += f" impair {link.impair}" if link.impair is not None else ""
        lines.append(f"  {link.name:7} {link.a} <-> {link.b}{extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------- subcommands


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab.up(args.topology, instance=args.instance, start=not args.no_run,
                 progress=lambda m: print(m, file=sys.stderr, flush=True))
    say(describe(lab))
    flag = "" if args.instance == "lab" else f" --instance {args.instance}"
    say(f"\nup. state: {lab.state_dir}   enter a node: ./netns-lab.sh exec{flag} NODE")
    if not args.wait:
        say(f"tear down: ./netns-lab.sh down{flag}")
        return 0
    return _hold(lab)


def _hold(lab: Lab) -> int:
    """Stay in the foreground until Ctrl-C or SIGTERM, then destroy `lab`. The handler is
    in place before "waiting" is said: a SIGTERM sent on reading that line (a supervisor,
    the lab tests) killed the process before it, and left the lab's namespaces behind."""
    old = _install_sigterm()
    try:
        say("waiting; Ctrl-C (or SIGTERM) tears the lab down")
        signal.pause()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        lab.destroy()
        say(f"lab {lab.instance!r} torn down")
        signal.signal(signal.SIGTERM, old)


def cmd_down(args: argparse.Namespace) -> int:
    try:
        Lab.attach(args.instance).destroy()
    except GrebeError:
        removed = clean_all(args.instance)  # no state file: whatever is left of it
        if not removed:
            say(f"no lab instance {args.instance!r} is up")
            return 0
    say(f"lab {args.instance!r} is down")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        argv = [os.environ.get("SHELL", "/bin/bash")]
    name = ns_name(check_instance(args.instance), args.node)
    path = NETNS_DIR / name
    if not path.exists():
        say(f"no node {args.node!r} in lab {args.instance!r} ({path} missing)")
        return 2
    if args.node in _vms(args.instance):
        return _exec_guest(args.instance, args.node, list(args.argv))
    procs.setns_path(str(path))  # single-threaded here: moves the whole process
    os.environ["GREBE_LAB_DIR"] = str(STATE_ROOT / args.instance)
    os.environ["GREBE_LAB_INSTANCE"] = args.instance
    os.environ["GREBE_LAB_NODE"] = args.node
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        os.execvp(argv[0], argv)  # the exit status is CMD's; terminals work as usual
    except OSError as e:
        say(f"exec {argv[0]}: {e.strerror}")
        return 127


def _vms(instance: str) -> list[str]:
    try:
        return Lab.attach(instance).vms
    except GrebeError:
        return []


def _exec_guest(instance: str, node: str, argv: list[str]) -> int:
    """exec on a linux-vm node: the command runs in the guest, through its agent."""
    from bridge.lab import vm

    argv = argv[1:] if argv and argv[0] == "--" else argv
    sock = vm.agent_path(STATE_ROOT / instance, node)
    if not argv:
        return vm.shell(sock, node)
    res = vm.Agent(sock, node).run(argv[0] if len(argv) == 1 else shlex.join(argv),
                                   timeout=None)
    os.write(1, res.stdout)
    os.write(2, res.stderr)
    return res.returncode


def cmd_list(args: argparse.Namespace) -> int:
    names = lab_namespaces()
    instances: dict[str, list[str]] = {}
    for n in names:
        instance, _, node = n[len(NS_PREFIX):].partition("-")
        instances.setdefault(instance, []).append(node)
    states = sorted(p.name for p in STATE_ROOT.iterdir()) if STATE_ROOT.exists() else []
    say("lab instances:" if instances or states else "no lab is up")
    for instance in sorted(set(instances) | set(states)):
        note = "" if instance in states else "  (no state file: ./netns-lab.sh clean)"
        say(f"  {instance:16} {' '.join(instances.get(instance, [])) or '(no namespaces)'}{note}")
    say("topologies: " + " ".join(sorted(p.stem for p in TOPOLOGY_DIR.glob("*.toml"))))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    removed = clean_all(args.instance)
    say(f"removed {len(removed)} namespace(s){': ' + ' '.join(removed) if removed else ''}")
    left = lab_namespaces(args.instance)
    return 1 if left else 0


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def cmd_impair(args: argparse.Namespace) -> int:
    try:
        from bridge.lab import impair  # written separately
    except ModuleNotFoundError:
        say("link impairment is not available (bridge/lab/impair.py is missing)")
        return 2
    lab = Lab.attach(args.instance)
    if hasattr(impair, "cli"):
        return int(impair.cli(lab, [args.link, *args.settings] if args.link else []))
    if not args.link:
        say("impair: name a link")
        return 2
    table: dict[str, Any] = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            say(f"impair: expected key=value, got {item!r}")
            return 2
        table[key] = _value(value)
    lab.link(args.link)  # KeyError names the missing link
    impair.apply(lab, args.link, impair.parse_impairment(table, f"impair {args.link}"))
    return 0


def cmd_bench(argv: list[str]) -> int:
    from bridge.lab import bench

    return int(bench.main(argv))


def cmd_test(argv: list[str]) -> int:
    """pytest from the repo root with this Python; then fail if the run leaked a lab.

    A lab belongs to the run if its instance has the run's prefix (GREBE_TEST_PREFIX, used by
    tests/conftest.py) or its state file says the pytest process built it.
    """
    prefix = f"t{os.getpid()}x"
    env = {**os.environ, "GREBE_TEST_PREFIX": prefix}
    child = subprocess.Popen([sys.executable, "-m", "pytest", *argv], cwd=REPO, env=env)
    while True:
        try:
            rc = child.wait()
            break
        except KeyboardInterrupt:  # pytest got the Ctrl-C too; let it finish its teardown
            continue
    ours = {i for i, pid in lab_owners().items() if pid == child.pid}
    leaked = [n for n in lab_namespaces() if n.startswith(f"{NS_PREFIX}{prefix}")
              or n[len(NS_PREFIX):].partition("-")[0] in ours]
    if not leaked:
        return rc
    say(f"netns-lab test: the run left namespaces behind: {' '.join(leaked)}")
    for instance in sorted({n[len(NS_PREFIX):].partition("-")[0] for n in leaked}):
        clean_all(instance)
    return rc or 1


# ---------------------------------------------------------------- demo


def _ping(lab: Lab, node: str, dst: str) -> bool:
    cp = lab.run(node, ["ping", "-n", "-c", "1", "-W", "1", dst], check=False)
    return cp.returncode == 0


def _show_ping(lab: Lab, node: str, dst: str, expect: bool, what: str) -> bool:
    ok = _ping(lab, node, dst)
    verdict = "reaches" if ok else "cannot reach"
    mark = "ok" if ok == expect else "UNEXPECTED"
    say(f"  [{mark:10}] {node:8} {verdict:12} {dst:18} {what}")
    return ok == expect


def demo_checks(lab: Lab) -> list[Callable[[], bool]]:
    """The demo's checks; the bridge engineer extends this list once grebe runs in the lab."""
    return [
        lambda: _show_ping(lab, "client", "198.18.2.10", False, "site A -> site B (no tunnel)"),
        lambda: _show_ping(lab, "client", "2001:db8:2::10", False, "site A -> site B, IPv6"),
        lambda: _show_ping(lab, "gw-a", "198.18.0.2", True, "gw-a -> gw-b over the WAN"),
        lambda: _show_ping(lab, "gw-a", "2001:db8::2", True, "gw-a -> gw-b over the WAN, IPv6"),
        lambda: _show_ping(lab, "gw-b", "198.18.0.1", True, "gw-b -> gw-a over the WAN"),
        lambda: _show_ping(lab, "gw-b", "2001:db8::66", True, "gw-b -> attacker on the WAN"),
        lambda: _show_ping(lab, "client", "198.18.1.1", True, "client -> its gateway"),
        lambda: _show_ping(lab, "server", "2001:db8:2::1", True, "server -> its gateway"),
    ]


_MAIN_PID = os.getpid()


def _install_sigterm() -> Any:
    """Make SIGTERM raise KeyboardInterrupt in this process; return the old handler."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # pyroute2 forks helper children that inherit this handler and get SIGTERM when done:
    # they must die, not unwind a copy of the demo.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def demo(topology: str = DEMO_TOPOLOGY, instance: str = "demo",
         checks: Callable[[Lab], Sequence[Callable[[], bool]]] = demo_checks) -> int:
    """Bring `topology` up, show it, run `checks`, and always tear it down.

    Returns 0 when every check gave the expected result, 1 otherwise, 130 on Ctrl-C.
    """
    old = _install_sigterm()
    lab: Lab | None = None
    try:
        say(f"== bringing up {topology} as lab {instance!r}")
        lab = Lab.up(topology, instance=instance, progress=say)
        say(describe(lab))
        say("\n== reachability")
        results = [check() for check in checks(lab)]
        good = all(results)
        say(f"\n== {sum(results)}/{len(results)} checks as expected"
            + ("" if good else "  (see UNEXPECTED above)"))
        return 0 if good else 1
    except KeyboardInterrupt:
        say("\n== interrupted")
        return 130
    finally:
        if lab is not None:
            lab.destroy()
            say(f"== lab {instance!r} torn down")
        signal.signal(signal.SIGTERM, old)


def _bridge_checks() -> Callable[[Lab], Sequence[Callable[[], bool]]] | None:
    try:
        from bridge.lab import demo_bridge  # the bridge engineer's part of the demo
    except ModuleNotFoundError:
        return None
    return demo_bridge.checks


INSPECT_TOPOLOGY = "two-sites-inspect"


def _checks_for(topology: str) -> Callable[[Lab], Sequence[Callable[[], bool]]]:
    """The demo steps that fit a topology: plain, bridged, or bridged with inspection."""
    if topology.startswith(INSPECT_TOPOLOGY):
        from bridge.lab import demo_inspect
        return demo_inspect.checks
    if topology == DEMO_TOPOLOGY:
        return demo_checks
    return _bridge_checks() or demo_checks


def full_demo(instance: str = "demo", topology: str | None = None) -> int:
    """`./netns-lab.sh demo`: the sites apart, joined by grebe, then a flow inspected.

    Part 1 is `demo(two-sites-plain)`; part 2 is `demo(two-sites)` with the checks of
    bridge/lab/demo_bridge.py; part 3 is `demo(two-sites-inspect)` with those of
    bridge/lab/demo_inspect.py (a flow terminated in grebe, `grebe flows`, the flow log).
    With `topology`, only that topology is shown, with the steps that fit it.
    Returns 0 if every check went as expected, 130 on Ctrl-C, else 1.
    """
    if topology is not None:
        return demo(topology, instance, _checks_for(topology))
    rc = 0
    for part in (DEMO_TOPOLOGY, DEFAULT_TOPOLOGY, INSPECT_TOPOLOGY):
        if part != DEMO_TOPOLOGY:
            say("")
        part_rc = demo(part, instance, _checks_for(part))
        if part_rc == 130:
            return 130
        rc = rc or part_rc
    return rc


# ---------------------------------------------------------------- argument parsing


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netns-lab.sh", description="the grebe network-namespace lab")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, helptext: str, instance: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=helptext, description=helptext)
        if instance:
            sp.add_argument("--instance", "-i", default="lab", help="lab instance (default lab)")
        return sp

    up = add("up", "bring a topology up and leave it running")
    up.add_argument("topology", nargs="?", default=DEFAULT_TOPOLOGY, help="name or path")
    up.add_argument("--no-run", action="store_true", help="do not start the nodes' run lines")
    up.add_argument("--wait", action="store_true",
                    help="stay in the foreground; Ctrl-C or SIGTERM tears the lab down")
    add("down", "tear a running lab down")
    ex = add("exec", "run a command inside a lab node (default: a shell)")
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD")
    add("list", "lab namespaces, instances and topologies", instance=False)
    cl = add("clean", "remove every gb-* namespace and lab process", instance=False)
    cl.add_argument("--instance", "-i", default=None, help="only this instance")
    im = add("impair", "change a link's impairment on a running lab")
    im.add_argument("link", nargs="?")
    im.add_argument("settings", nargs="*", metavar="key=value")
    dm = add("demo", "two sites in the lab, shown and torn down", instance=False)
    dm.add_argument("--instance", "-i", default="demo")
    dm.add_argument("--topology", default=None, help="show only this topology")
    # Listed for --help only: main() hands their arguments over untouched before parsing.
    sub.add_parser("test", help="every test (pytest args pass through), then a leak check",
                   add_help=False)
    sub.add_parser("bench", help="throughput/RTT of grebe against the anchors (--quick, --only)",
                   add_help=False)
    sub.add_parser("soak", help="minutes of mixed traffic under loss and reordering; RSS, fds "
                   "and tables must not grow (--minutes 30, --mode)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "test":  # everything after `test` belongs to pytest
        return cmd_test(argv[1:])
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the bench
        return cmd_bench(argv[1:])
    if argv and argv[0] == "soak":  # issue 12: bridge/lab/soak.py parses its own arguments
        from bridge.lab import soak

        return soak.main(argv[1:])
    args = parser().parse_args(argv)
    if os.geteuid() != 0 and args.cmd != "list":
        say("netns-lab: must run as root (network namespaces need it)")
        return 2
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "up": cmd_up, "down": cmd_down, "exec": cmd_exec, "list": cmd_list,
        "clean": cmd_clean, "impair": cmd_impair,
        "demo": lambda a: full_demo(a.instance, a.topology),
    }
    try:
        return handlers[args.cmd](args)
    except GrebeError as e:
        say(f"netns-lab {args.cmd}: {e}")
        return 2
    except KeyError as e:
        say(f"netns-lab {args.cmd}: {e.args[0] if e.args else e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

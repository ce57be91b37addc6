"""Session-wide: lab instance names unique to this pytest run, and a leak check at the end.

Lab tests name their instances `<prefix><n>` with the prefix `t<pid>x` (or GREBE_TEST_PREFIX,
set by `./netns-lab.sh test`), so concurrent runs and other people's labs never collide.
When the session finishes, any namespace of this run's instances (by prefix, or a lab whose
state file says this process built it) that is still there, or any process inside one,
FAILS the run; the leftovers are then removed so that they do not outlive it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest

PREFIX = os.environ.get("GREBE_TEST_PREFIX") or f"t{os.getpid()}x"
_numbers = itertools.count()


def new_lab_instance() -> str:
    """A lab instance name no other test (or test run) uses."""
    return f"{PREFIX}{next(_numbers)}"


@pytest.fixture(scope="session")
def lab_instance_names() -> Callable[[], str]:
    """Name: lab_instance_names / Scope: session / Depends: none.

    A callable returning a fresh lab instance name unique to this pytest run.
    """
    return new_lab_instance


def leaked_labs() -> dict[str, list[str]]:
    """Namespaces of this run's labs still present -> descriptions of processes inside."""
    try:
        from bridge.lab import netlink, procs
    except ImportError:  # no pyroute2: no lab can have been built
        return {}
    me = os.getpid()
    ours = {i for i, pid in netlink.lab_owners().items() if pid == me}
    names = [n for n in netlink.lab_namespaces()
             if n.startswith(f"{netlink.NS_PREFIX}{PREFIX}")
             or n[len(netlink.NS_PREFIX):].partition("-")[0] in ours]
    inside = procs.pids_in_netns(str(netlink.NETNS_DIR / n) for n in names)
    leaks: dict[str, list[str]] = {n: [] for n in names}
    for pid, path in inside.items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        leaks[os.path.basename(path)].append(f"pid {pid}: {cmd}")
    return leaks


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaks = leaked_labs()
    if not leaks:
        return
    from bridge.lab import netlink

    lines = ["lab leak: these namespaces of this test run were left behind:"]
    for name, proc_list in sorted(leaks.items()):
        lines.append(f"  {name}" + "".join(f"\n      {p}" for p in proc_list))
    instances = {n[len(netlink.NS_PREFIX):].partition("-")[0] for n in leaks}
    for instance in sorted(instances):
        netlink.clean_all(instance)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True, bold=True)
    else:
        print("\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

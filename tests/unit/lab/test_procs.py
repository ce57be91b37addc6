"""bridge/lab/procs.py without root: start times, killing, waiting (no namespaces needed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.lab import procs
from bridge.lab.netlink import LabError, check_instance, ns_name, wait_for


def test_start_time_identifies_a_process() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        st = procs.start_time(p.pid)
        assert st is not None and st >= (procs.start_time(os.getpid()) or 0)
        t = procs.TrackedProcess("n", p.pid, st, ("sleep", "30"))
        assert t.alive()
        assert not procs.TrackedProcess("n", p.pid, st + 1, ("sleep",)).alive()  # "recycled"
    finally:
        p.kill()
        p.wait()
    assert procs.start_time(p.pid) is None
    assert not t.alive()


def test_start_time_survives_odd_process_names(tmp_path: Path) -> None:
    odd = tmp_path / "a) b (c"  # comm, field 2 of /proc/PID/stat, may hold ") ("
    odd.symlink_to(shutil.which("sleep") or "/bin/sleep")
    p = subprocess.Popen([str(odd), "30"])
    try:
        wait_for(lambda: Path(f"/proc/{p.pid}/comm").read_text().strip() == "a) b (c", 5,
                 "the exec")
        st = procs.start_time(p.pid)
        assert st is not None and st >= (procs.start_time(os.getpid()) or 0)
        assert not procs.is_zombie(p.pid)
    finally:
        p.kill()
        p.wait()


def test_kill_pids_terms_then_kills() -> None:
    polite = subprocess.Popen(["sleep", "30"])
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    left = procs.kill_pids({polite.pid: None, stubborn.pid: procs.start_time(stubborn.pid)},
                           timeout=0.5)
    assert left == []
    assert polite.wait(timeout=5) == -signal.SIGTERM
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5


def test_kill_pids_never_signals_a_recycled_pid() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        st = procs.start_time(p.pid)
        assert st is not None
        assert procs.kill_pids({p.pid: st + 7}, timeout=0.1) == []
        assert p.poll() is None  # untouched: the start time did not match
    finally:
        p.kill()
        p.wait()


def test_kill_pids_signals_a_whole_group() -> None:
    leader = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    assert procs.kill_pids({leader.pid: None}, groups=[leader.pid], timeout=2) == []
    leader.wait(timeout=5)
    wait_for(lambda: procs.start_time(child) is None or procs.is_zombie(child), 5,
             "the group member to die")


def test_pids_in_netns_ignores_missing_namespaces() -> None:
    assert procs.pids_in_netns(["/run/netns/gb-no-such-namespace"]) == {}
    # our own namespace has processes in it (but never ourselves)
    mine = procs.pids_in_netns(["/proc/1/ns/net"]) if os.access("/proc/1/ns/net", os.R_OK) \
        else {}
    assert os.getpid() not in mine


def test_instance_names() -> None:
    assert check_instance("t123x4") == "t123x4"
    assert ns_name("lab", "gw-a") == "gb-lab-gw-a"
    for bad in ("", "a-b", "UPPER", "x" * 17, "a/b"):
        with pytest.raises(LabError, match="bad lab instance name"):
            check_instance(bad)

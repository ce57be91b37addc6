"""Processes and network namespaces for the lab: enter, find, kill (Linux /proc, no shell).

Rules
-----
- A process belongs to a lab node when the inode of /proc/PID/ns/net equals the inode of the
  node's bind mount /run/netns/gb-<instance>-<node> (what `ip netns pids` does). This is how
  `clean` finds processes after the Python that started them was SIGKILLed.
- A pid is only ours while its start time (field 22 of /proc/PID/stat, clock ticks since boot)
  is the one recorded when we started it; a recycled pid is never signalled.
- Entering a namespace: setns(2) on an fd of /run/netns/NAME. Python 3.11 has no os.setns, so
  libc's setns is called through ctypes (loaded once at import, so a preexec_fn after fork does
  no dynamic loading). In a thread, setns changes only that thread (`in_netns`).
- Killing: SIGTERM to the process group, a bounded wait, then SIGKILL; only ESRCH (already
  gone) is ignored.

Theory of operation
-------------------
`netlink.Lab` starts node processes with `preexec_fn=enter_netns(path)` and records
(pid, start_time). `destroy()` and `clean_all()` call `kill_pids()` on the recorded pids and on
`pids_in_netns()` of the lab's namespaces, so nothing that lives in a lab namespace survives.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def setns_path(path: str) -> None:
    """Move the calling thread into the network namespace bound at `path`; raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def enter_netns(path: str) -> Callable[[], None]:
    """Return a preexec_fn that enters the namespace at `path` in the child."""

    def preexec() -> None:
        setns_path(path)

    return preexec


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run `fn()` in a short-lived thread inside the namespace at `path`; return its result.

    Used for /proc/sys/net writes and ioctls, which act on the calling thread's namespace.
    Exceptions from `fn` are re-raised here.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            setns_path(path)
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            error.append(e)

    t = threading.Thread(target=body, name=f"netns:{os.path.basename(path)}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def netns_inode(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a namespace file, or None if it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(paths: Iterable[str]) -> dict[int, str]:
    """Map pid -> namespace path for every live process inside one of `paths`."""
    wanted = {ino: p for p in paths if (ino := netns_inode(p)) is not None}
    if not wanted:
        return {}
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone, a zombie, or a kernel thread
            continue
        path = wanted.get((st.st_dev, st.st_ino))
        if path is not None:
            found[int(entry)] = path
    return found


def start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3] in (b"Z", b"X")


@dataclass(frozen=True, slots=True)
class TrackedProcess:
    """A process started in a lab node, as recorded in the lab's state file."""

    node: str
    pid: int
    start_time: int
    argv: tuple[str, ...]
    log: str | None = None

    def alive(self) -> bool:
        """True while this very process (not a recycled pid) runs and is not a zombie."""
        return start_time(self.pid) == self.start_time and not is_zombie(self.pid)


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            try:
                os.killpg(pid, sig)
                return
            except (ProcessLookupError, PermissionError):
                pass
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def kill_pids(
    pids: dict[int, int | None], groups: Iterable[int] = (), timeout: float = 3.0
) -> list[int]:
    """Stop processes: SIGTERM, a bounded wait, then SIGKILL and another bounded wait.

    `pids` maps pid -> expected start time (None: no check). Pids in `groups` lead a process
    group we created (start_new_session) and are signalled as a group. Returns the pids still
    alive at the end (normally none).
    """
    leaders = set(groups)
    live = {p: s for p, s in pids.items() if s is None or start_time(p) == s}
    for pid in live:
        _signal(pid, signal.SIGTERM, group=pid in leaders and _getpgid_safe(pid) == pid)
    remaining = _wait_gone(live, time.monotonic() + timeout)
    for pid in remaining:
        _signal(pid, signal.SIGKILL, group=pid in leaders and _getpgid_safe(pid) == pid)
    return sorted(_wait_gone(remaining, time.monotonic() + timeout))


def _wait_gone(pids: dict[int, int | None], deadline: float) -> dict[int, int | None]:
    remaining = dict(pids)
    delay = 0.005
    while remaining:
        for pid in list(remaining):
            st = start_time(pid)
            recycled = remaining[pid] is not None and st != remaining[pid]
            if st is None or recycled or is_zombie(pid):  # a zombie is dead; its parent reaps
                del remaining[pid]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(delay)  # bounded poll loop: processes give no event we could wait on
        delay = min(delay * 2, 0.1)
    return remaining


def _getpgid_safe(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


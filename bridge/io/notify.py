"""systemd readiness and reload notifications (the sd_notify protocol), no dependency.

Rules of this module
- `notify(state)` sends one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a path,
  or "@name" for the abstract namespace), as systemd's sd_notify(3) does; without that
  variable it does nothing and returns False. It never raises: a service manager that went
  away must not stop the endpoint.
- `grebe up` sends "READY=1" once the TUN, routes and sockets are set up (the unit is
  Type=notify, contrib/systemd/grebe@.service), "RELOADING=1" + "MONOTONIC_USEC=" then
  "READY=1" around a reload (systemd >= 253 waits for that pair), and "STOPPING=1" on the way
  out; "STATUS=" carries the one-line summary `systemctl status` shows.
- Logs under journald: when stderr is the journal's stream ($JOURNAL_STREAM names its
  device and inode, systemd.exec(5)), each line is "<priority>logger: message" with the
  syslog priority of its level (sd-daemon(3) prefixes, which journald parses) and no
  timestamp of its own (the journal keeps one); elsewhere lines carry their time.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import IO

__all__ = ["notify", "reloading", "log_format", "JournalFormatter"]

# sd-daemon(3): <3> error, <4> warning, <6> info, <7> debug
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send `state` ("READY=1\\nSTATUS=...") to $NOTIFY_SOCKET; True if it was sent."""
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    address = "\0" + name[1:] if name.startswith("@") else name
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def reloading(environ: dict[str, str] | None = None) -> bool:
    """The start of a reload, as systemd's Type=notify-reload expects it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", environ)


class JournalFormatter(logging.Formatter):
    """"<priority>logger: message", one journal entry per line of a multi-line message."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{record.name}: {line}" for line in text.splitlines())


def _on_journal(fd: int, environ: dict[str, str]) -> bool:
    dev_ino = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in dev_ino.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def log_format(stream: int | IO[str] = 2, environ: dict[str, str] | None = None
               ) -> logging.Formatter:
    """The formatter for log lines written to `stream` (stderr, or its fd): journald's when
    it is the journal's stream, else one with the time (also for a stream with no fd)."""
    env = os.environ if environ is None else environ
    try:
        fd = stream if isinstance(stream, int) else stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        fd = -1
    if fd >= 0 and _on_journal(fd, dict(env)):
        return JournalFormatter("%(message)s")
    return logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")

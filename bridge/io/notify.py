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
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["notify", "reloading"]


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

"""Full tunnel: a peer that owns 0.0.0.0/0 or ::/0, by policy routing as wg-quick does it.

Rules:
- A default route into the TUN in the main table would collide with the host's own default
  route, and would carry the tunnel's own datagrams into the tunnel (RFC 2003 §4 loop). So,
  per family with a /0 peer prefix (all with pyroute2, in the endpoint's namespace):
  * the default route via the TUN goes into a table of its own, `tun.table`;
  * rule `not fwmark tun.fwmark lookup tun.table` (priority PRIO + 1): everything not
    marked takes the tunnel's default route;
  * rule `lookup main suppress_prefixlength 0` (priority PRIO, looked at first): every
    route of the main table but a default one still wins (the LAN, the underlay, other
    peers' prefixes);
  * the tunnel's own UDP sockets carry SO_MARK tun.fwmark (bridge/io/udp.py `set_mark`),
    so its datagrams skip the first rule and leave by the main table: the underlay.
  * net.ipv4.conf.all.src_valid_mark = 1, as wg-quick sets it, so reverse-path checks of
    replies use the mark too.
- Everything added is removed on close (rules first, then the route); a rule or route
  that exists already (another grebe, a restart after a crash) is taken over, not doubled.
- Nothing here decides what is routed: bridge/peers.py still sends each packet to the peer
  whose prefix is the longest match, and a /0 peer gets what no other prefix covers.

Theory of operation: TunDevice (bridge/io/tun.py) hands each /0 prefix to `FullTunnel.add`
instead of adding a main-table route; `remove` undoes one family (a reload that drops the
/0), `close` all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from typing import Any

log = logging.getLogger("grebe.policy")

__all__ = ["FullTunnel", "PRIO"]

PRIO = 32760  # below the main table's rule (32766), above nothing the host set up
FIB_RULE_INVERT = 0x2  # linux/fib_rules.h: "not fwmark"
MAIN = 254


def _exists(e: BaseException) -> bool:
    return getattr(e, "code", None) == errno.EEXIST


class FullTunnel:
    """The policy routing of a full tunnel through TUN `oif` (module docstring)."""

    def __init__(self, oif: int, table: int, fwmark: int) -> None:
        self.oif = oif
        self.table = table
        self.fwmark = fwmark
        self.families: set[int] = set()

    def _rules(self, family: int) -> list[dict[str, Any]]:
        return [dict(family=family, priority=PRIO, table=MAIN, suppress_prefixlen=0),
                dict(family=family, priority=PRIO + 1, table=self.table, fwmark=self.fwmark,
                     fwmask=0xFFFFFFFF, flags=FIB_RULE_INVERT)]

    def add(self, ipr: Any, net: str) -> None:
        """Route /0 `net` ("0.0.0.0/0" or "::/0") through the TUN by policy routing."""
        family = socket.AF_INET6 if ":" in net else socket.AF_INET
        if family in self.families:
            return
        try:
            ipr.route("add", dst=net, oif=self.oif, table=self.table, family=family)
        except Exception as e:  # pyroute2 NetlinkError
            if not _exists(e):
                raise
        for rule in self._rules(family):
            try:
                ipr.rule("add", **rule)
            except Exception as e:
                if not _exists(e):
                    raise
        if family == socket.AF_INET:
            with contextlib.suppress(OSError):
                with open("/proc/sys/net/ipv4/conf/all/src_valid_mark", "w") as f:
                    f.write("1")
        self.families.add(family)
        log.info("full tunnel %s: table %d, rules 'not fwmark %#x lookup %d' and 'lookup "
                 "main suppress_prefixlength 0'", net, self.table, self.fwmark, self.table)

    def remove(self, ipr: Any, net: str) -> None:
        """Undo `add` for the family of `net`."""
        family = socket.AF_INET6 if ":" in net else socket.AF_INET
        if family not in self.families:
            return
        self.families.discard(family)
        for rule in self._rules(family):
            with contextlib.suppress(Exception):
                ipr.rule("del", **rule)
        with contextlib.suppress(Exception):
            ipr.route("del", dst=net, oif=self.oif, table=self.table, family=family)

    def close(self, ipr: Any) -> None:
        for family in list(self.families):
            self.remove(ipr, "::/0" if family == socket.AF_INET6 else "0.0.0.0/0")

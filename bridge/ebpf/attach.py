"""Attach the fast path's tc program to interfaces, and remove it (also a dead owner's).

Rules:
- pyroute2 only (never `tc`): a clsact qdisc per interface (created if missing, and then
  removed again on detach if we created it), and one cls_bpf filter at its ingress
  (parent ffff:fff2) in direct-action mode, priority PRIO, named "grebe:<tun name>".
- Which interfaces: every interface of the namespace except loopback and the endpoint's TUN
  (the LAN side needs it for encapsulation, the WAN side for decapsulation; the program
  itself tells which a packet is, through the FIB). Interfaces added later are not covered.
- A tc filter outlives the process that attached it (netlink gives it no owner). So
  `remove_stale(tun)` runs before attaching: it deletes every grebe filter of this TUN name
  left by an earlier `grebe up` that could not detach (SIGKILL, a crash). Until then such a
  program does nothing: it checks a deadline its owner keeps pushing (grebe_tc.c).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("grebe.ebpf")

__all__ = ["Attachment", "PRIO", "INGRESS", "filter_name", "remove_stale", "attach", "ours"]

PRIO = 0x4742  # "GB"
INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
CLSACT_HANDLE = 0xFFFF0000


def filter_name(tun: str) -> str:
    return f"grebe:{tun}"


@dataclass
class Attachment:
    """Where our filter went: ifindex -> whether we created the clsact qdisc there."""

    name: str
    links: dict[int, bool] = field(default_factory=dict)
    ifnames: dict[int, str] = field(default_factory=dict)


def _ipr() -> Any:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    return IPRoute()


def _links(ipr: Any, tun: str) -> list[tuple[int, str]]:
    out = []
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if name in ("lo", tun) or link["flags"] & 0x8:  # IFF_LOOPBACK
            continue
        out.append((link["index"], name))
    return out


def ours(ipr: Any, ifindex: int, name: str) -> list[Any]:
    """Our filters at this interface's ingress (by name)."""
    found = []
    with contextlib.suppress(Exception):  # no clsact there: no filters
        for f in ipr.get_filters(index=ifindex, parent=INGRESS):
            opts = f.get_attr("TCA_OPTIONS")
            if f.get_attr("TCA_KIND") == "bpf" and opts is not None:
                fname = opts.get_attr("TCA_BPF_NAME") or ""
                if fname == name:
                    found.append(f)
    return found


def _delete(ipr: Any, ifindex: int, f: Any) -> None:
    info = f["info"]
    ipr.tc("del-filter", "bpf", ifindex, f["handle"], parent=INGRESS,
           prio=(info >> 16) & 0xFFFF, protocol=0x0003)


def remove_stale(tun: str) -> int:
    """Delete every filter named for `tun` in this namespace; returns how many."""
    name = filter_name(tun)
    n = 0
    with _ipr() as ipr:
        for ifindex, ifname in _links(ipr, tun):
            for f in ours(ipr, ifindex, name):
                try:
                    _delete(ipr, ifindex, f)
                    n += 1
                except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError
                    log.warning("could not remove a stale grebe filter on %s: %s", ifname, e)
    if n:
        log.info("removed %d stale eBPF filter(s) of an earlier grebe on %s", n, tun)
    return n


def attach(prog_fd: int, tun: str) -> Attachment:
    """Attach `prog_fd` at the ingress of every interface but lo and `tun`."""
    att = Attachment(filter_name(tun))
    with _ipr() as ipr:
        try:
            for ifindex, ifname in _links(ipr, tun):
                created = False
                try:
                    ipr.tc("add", "clsact", ifindex)
                    created = True
                except Exception as e:  # noqa: BLE001
                    if getattr(e, "code", None) != 17:  # EEXIST: someone's clsact is there
                        raise
                att.links[ifindex] = created
                att.ifnames[ifindex] = ifname
                ipr.tc("add-filter", "bpf", ifindex, ":1", fd=prog_fd, name=att.name,
                       parent=INGRESS, classid=1, direct_action=True, prio=PRIO,
                       protocol=0x0003)
        except BaseException:
            _detach(ipr, att)
            raise
    return att


def _detach(ipr: Any, att: Attachment) -> None:
    for ifindex, created in list(att.links.items()):
        for f in ours(ipr, ifindex, att.name):
            with contextlib.suppress(Exception):
                _delete(ipr, ifindex, f)
        if created and not _any_filters(ipr, ifindex):
            with contextlib.suppress(Exception):
                ipr.tc("del", "clsact", ifindex)
        del att.links[ifindex]


def _any_filters(ipr: Any, ifindex: int) -> bool:
    for parent in (INGRESS, 0xFFFFFFF3):
        with contextlib.suppress(Exception):
            if list(ipr.get_filters(index=ifindex, parent=parent)):
                return True
    return False


def detach(att: Attachment) -> None:
    """Remove our filters (and the clsact qdiscs we created). Never raises."""
    try:
        with _ipr() as ipr:
            _detach(ipr, att)
    except Exception as e:  # noqa: BLE001
        log.warning("removing the eBPF filters: %s", e)

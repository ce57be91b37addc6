"""The TUN device: open, configure with pyroute2, read and write batches. I/O adapter, no logic.

Rules:
- Opened with TUNSETIFF IFF_TUN|IFF_NO_PI (Linux Documentation/networking/tuntap.rst), and
  by default IFF_VNET_HDR with TUNSETVNETHDRSZ 10 and TUNSETOFFLOAD TUN_F_CSUM|TSO4|TSO6:
  the kernel then hands us TCP super-packets of up to 64 KB (split by `offload.split_frame`,
  or handed to the core whole when a `tso_frame` factory is given at construction) and
  accepts coalesced GSO writes (`offload.coalesce`). `caps` (bridge/io/adapters.py)
  declares both.
- The fd is non-blocking; reads go into one preallocated buffer until EAGAIN (or a batch
  limit), writes go out one frame per write(2) (the TUN has no batch write); a
  `TunFrameParts` (bridge/tunframe.py) is one frame too, its two pieces one writev(2).
- A second process on the same TUN gets EBUSY from TUNSETIFF; that becomes
  TunBusyError("grebe: TUN grebe0 is already in use by another process").
- Addresses, MTU, link up and the routes of the peers' prefixes are set with pyroute2 in
  the current network namespace; `close()` deletes the routes it added, then closes the fd,
  which deletes the (non-persistent) device with its addresses.
- Before the link goes up, the TUN's IPv6 address generation mode is set to none
  (IFLA_INET6_ADDR_GEN_MODE = IN6_ADDR_GEN_MODE_NONE, what the kernel's wg_open() sets on a
  WireGuard device): no link-local address, so no router solicitations (RFC 4861 §6.3.7)
  and no MLD reports from one. A router still reports the groups it joins (ff02::2) from
  :: at link up (RFC 3810 §5.2.13), IFF_MULTICAST or not; the Bridge counts such
  link-scope packets from the TUN as "link_local", not "no_route" (bridge/peers.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from bridge.io import offload
from bridge.io.adapters import TsoFrameFactory, TunCaps
from bridge.io.policy import FullTunnel
from bridge.tunframe import TunFrameParts
from stack.wire import vnet

_TSO = (vnet.GSO_TCPV4, vnet.GSO_TCPV6)

log = logging.getLogger("grebe.tun")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IN6_ADDR_GEN_MODE_NONE = 1  # linux/if_link.h
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

READ_BUF = 65536 + vnet.VNET_HDR_LEN + 64


class TunBusyError(OSError):
    """The TUN is attached to another process."""


class TunDevice:
    """One TUN queue. `read_packets`/`write_packets` are the whole data API."""

    def __init__(self, name: str, vnet_hdr: bool = True, multi_queue: bool = False,
                 tso_frame: TsoFrameFactory | None = None) -> None:
        self.name = name
        self.vnet_hdr = vnet_hdr
        # With the vnet header and a factory (bridge/gso.py SuperPacket in `grebe up`), TSO
        # frames are handed to the core whole instead of being split here.
        self._tso_frame = tso_frame if vnet_hdr else None
        self.caps = TunCaps(vnet_hdr=vnet_hdr, tso_frames=self._tso_frame is not None,
                            frame_parts=vnet_hdr)
        self.bad_frames = 0  # frames from the kernel that offload could not split
        self.write_errors: dict[str, int] = {}  # frames the kernel refused, by errno name
        self._routes: list[tuple[str, int]] = []
        self.full: FullTunnel | None = None  # the /0 prefixes' policy routing (policy.py)
        self.full_tunnel = (0, 0)  # (tun.table, tun.fwmark) for it; (0, 0): main table
        self._buf = bytearray(READ_BUF)
        self._view = memoryview(self._buf)
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        flags = IFF_TUN | IFF_NO_PI
        if vnet_hdr:
            flags |= IFF_VNET_HDR
        if multi_queue:
            flags |= IFF_MULTI_QUEUE
        ifr = struct.pack("16sH22x", name.encode(), flags)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            if vnet_hdr:
                fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", vnet.VNET_HDR_LEN))
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except OSError as e:
            os.close(self.fd)
            if e.errno == errno.EBUSY:
                raise TunBusyError(
                    errno.EBUSY, f"grebe: TUN {name} is already in use by another process"
                ) from None
            raise
        os.set_blocking(self.fd, False)
        self.index = 0
        self.mtu = 0  # set by configure/set_mtu (offload.coalesce: partial super-packets)

    def fileno(self) -> int:
        return self.fd

    # -- configuration (pyroute2) ------------------------------------------------------

    def configure(self, addresses: Sequence[str], mtu: int,
                  routes: Iterable[str] = ()) -> None:
        """Set MTU, addresses, link up, and one route per prefix into the TUN; a /0 prefix
        by policy routing in table `full_tunnel[0]` for packets without fwmark
        `full_tunnel[1]` (bridge/io/policy.py; set the attribute first)."""
        from pyroute2 import IPRoute  # type: ignore[import-untyped]

        with IPRoute() as ipr:
            self.index = ipr.link_lookup(ifname=self.name)[0]
            ipr.link("set", index=self.index, mtu=mtu)
            self.mtu = mtu
            self._quiet(ipr)
            for a in addresses:
                iface = ipaddress.ip_interface(a)
                ipr.addr("add", index=self.index, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen)
            ipr.link("set", index=self.index, state="up")
            self._add_routes(ipr, routes)
        log.info("TUN %s up: mtu %d, addresses %s, routes %s", self.name, mtu,
                 ", ".join(addresses) or "-", ", ".join(r for r, _ in self._routes) or "-")

    def _add_routes(self, ipr: Any, routes: Iterable[str]) -> None:
        for r in routes:
            net = ipaddress.ip_network(r, strict=False)
            if net.prefixlen == 0 and self.full_tunnel[0]:
                if self.full is None:
                    self.full = FullTunnel(self.index, *self.full_tunnel)
                self.full.add(ipr, str(net))
                continue
            try:
                ipr.route("add", dst=str(net), oif=self.index)
            except Exception as e:  # pyroute2 NetlinkError: an existing route is kept
                if getattr(e, "code", None) != errno.EEXIST:
                    raise
                log.warning("route %s exists already; left as it is", net)
                continue
            self._routes.append((str(net), self.index))

    def update_routes(self, add: Iterable[str], remove: Iterable[str]) -> None:
        """A reload (bridge/io/live.py): routes of prefixes added, and of prefixes gone."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for r in remove:
                net = str(ipaddress.ip_network(r, strict=False))
                if net in ("0.0.0.0/0", "::/0") and self.full is not None:
                    self.full.remove(ipr, net)
                    continue
                if (net, self.index) not in self._routes:
                    continue
                self._routes.remove((net, self.index))
                with contextlib.suppress(Exception):  # gone already: nothing to undo
                    ipr.route("del", dst=net, oif=self.index)
            self._add_routes(ipr, add)
        log.info("TUN %s routes now: %s%s", self.name,
                 ", ".join(r for r, _ in self._routes) or "-",
                 " + full tunnel" if self.full is not None and self.full.families else "")

    def _quiet(self, ipr: Any) -> None:
        """IPv6 address generation mode none: no link-local address (module docstring)."""
        try:
            ipr.link("set", index=self.index, IFLA_AF_SPEC={"attrs": [
                ("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]}),
            ]})
        except Exception as e:  # IPv6 disabled in this namespace: nothing to quieten
            log.debug("TUN %s: IPv6 address generation mode not set: %s", self.name, e)

    def set_mtu(self, mtu: int) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=self.index, mtu=mtu)
        self.mtu = mtu

    def close(self) -> None:
        """Remove our rules and routes, then close the fd (the kernel deletes the device)."""
        if self.full is not None and self.full.families:
            from pyroute2 import IPRoute

            with contextlib.suppress(Exception), IPRoute() as ipr:
                self.full.close(ipr)
        if self._routes:
            try:
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    for dst, oif in self._routes:
                        try:
                            ipr.route("del", dst=dst, oif=oif)
                        except Exception:  # already gone with the device
                            pass
            finally:
                self._routes.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- data ---------------------------------------------------------------------------

    def read_packets(self, out: list[Any], limit: int = 64) -> int:
        """Read up to `limit` frames (until EAGAIN); append the inner packets to `out`.

        Returns the number of frames read. Never raises for EAGAIN.
        """
        fd = self.fd
        view = self._view
        bufs = [self._buf]
        reads = 0
        split = offload.split_frame
        sp = self._tso_frame
        while reads < limit:
            try:
                n = os.readv(fd, bufs)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            reads += 1
            if self.vnet_hdr:
                if sp is not None and view[1] & ~vnet.GSO_ECN in _TSO and n > 64:
                    # one copy of the whole frame; the core segments it (bridge/gso.py)
                    out.append(sp(bytes(view[:n]), vnet.VNET_HDR_LEN,
                                  view[4] | view[5] << 8, split))
                elif not split(view[:n], out):
                    self.bad_frames += 1
            else:
                out.append(bytes(view[:n]))
        return reads

    def write_packets(self, packets: Sequence[bytes | bytearray | memoryview]) -> int:
        """Write inner packets (coalesced into GSO frames with the vnet header); return frames."""
        if not packets:
            return 0
        frames: Sequence[bytes | bytearray | memoryview]
        if self.vnet_hdr:
            coalesced: list[bytes] = []
            offload.coalesce(packets, coalesced, self.mtu)
            frames = coalesced
        else:
            frames = packets
        fd = self.fd
        for f in frames:
            try:
                if type(f) is TunFrameParts:  # headers and payload, one frame (tunframe.py)
                    os.writev(fd, (f, f.payload))
                else:
                    os.write(fd, f)
            except OSError as e:  # BlockingIOError is EAGAIN: the queue is full
                name = errno.errorcode.get(e.errno or 0, "error").lower()
                self.write_errors[name] = self.write_errors.get(name, 0) + 1
                log.debug("TUN write refused: %s", e)
        return len(frames)


def route_mtu(host: str) -> int | None:
    """MTU toward `host` in this namespace: the route's mtu metric, else its device's MTU."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            r = ipr.route("get", dst=host)[0]
            metrics = r.get_attr("RTA_METRICS")
            if metrics is not None:
                m = metrics.get_attr("RTAX_MTU")
                if m:
                    return int(m)
            oif = r.get_attr("RTA_OIF")
            link = ipr.link("get", index=oif)[0]
            return int(link.get_attr("IFLA_MTU"))
    except Exception:
        return None

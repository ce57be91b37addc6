"""The TUN device: open, configure with pyroute2, read and write batches. I/O adapter, no logic.

Rules:
- Opened with TUNSETIFF IFF_TUN|IFF_NO_PI (Linux Documentation/networking/tuntap.rst), and
  by default IFF_VNET_HDR with TUNSETVNETHDRSZ 10 and TUNSETOFFLOAD TUN_F_CSUM|TSO4|TSO6:
  the kernel then hands us TCP super-packets of up to 64 KB (split by `offload.split_frame`)
  and accepts coalesced GSO writes (`offload.coalesce`).
- The fd is non-blocking; reads go into one preallocated buffer until EAGAIN (or a batch
  limit), writes go out one frame per write(2) (the TUN has no batch write).
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
- TSO frames sized to one UDP GSO send (opt-in, see below): `fit_gso` sets the TUN's
  IFLA_GSO_MAX_SEGS with pyroute2 to `gso_max_segs(mtu, encap)`, the most segments whose
  GRE/IPIP-in-UDP datagrams fit one UDP_SEGMENT sendmsg by the UDP adapter's own rule
  (bridge/io/udp.py `_send_udprun`: at most GSO_MAX_SEGMENTS (64) datagrams and
  `max_payload` bytes, 65535 - 20 - 8 over IPv4, 65535 - 8 over IPv6 (RFC 8200 §3: the
  payload length leaves out the fixed header)). One datagram is at most the TUN MTU plus
  the peer's encapsulation header (GRE 4 + 4 per C/K/S option, RFC 2890 §2; IPIP 0); with
  several peers the worst one counts. `set_mtu` recomputes it. A kernel that refuses
  (EOPNOTSUPP, EINVAL) is logged once at info and left alone.

Theory of operation of the GSO cap, and why it is off by default: a TCP socket ON THIS HOST
sizes its TSO frames by the route's device (sk_gso_max_segs), so with the cap a 64 KB frame
of MSS 1408 (46 segments, 1,472-byte datagrams, 44 per GSO send) becomes 44 segments and
leaves in one sendmsg instead of two. A FORWARDED frame (the site-to-site case: the sender is
a host behind the gateway) was sized by the sender's own device; the kernel checks it against
the TUN's gso_max_segs in gso_features_check() and, when it has more segments, cuts it into
single packets in software before the TUN: measured in `two-sites` (client -> server iperf3)
that halved throughput (~770 -> ~360 Mb/s, 18x the TUN reads). So the cap only pays where the
gateway itself originates the TCP (its own traffic, a kernel-inspection relay).
GREBE_TUN_GSO_SEGS (developer knob, read when applied): unset, "" or "0" = off (the kernel's
default 65535 stays); "auto" = gso_max_segs(); an integer 1-65535 = that value.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from bridge.gso import SuperPacket
from bridge.io import offload
from bridge.io.udp import GSO_MAX_SEGMENTS

_TSO = (offload.GSO_TCPV4, offload.GSO_TCPV6)

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

READ_BUF = 65536 + offload.VNET_HDR_LEN + 64

# UdpEndpoint.max_payload per underlay family (bridge/io/udp.py): one UDP datagram, and so one
# UDP GSO send, carries at most this many payload bytes (IPv4 total length 65535 - 20 - 8;
# RFC 8200 §3 IPv6 payload length 65535, minus the UDP header 8)
UDP_MAX_PAYLOAD_V4 = 65535 - 20 - 8
UDP_MAX_PAYLOAD_V6 = 65535 - 8
KERNEL_GSO_MAX_SEGS = 65535  # linux/netdevice.h GSO_MAX_SEGS: the TUN's default
GSO_AUTO = -1


def gso_max_segs(mtu: int, encap: Iterable[tuple[int, bool]]) -> int:
    """The most TSO segments whose datagrams fit one UDP GSO send to every peer.

    `encap`: per peer (encapsulation header bytes, underlay is IPv6). A segment of a TSO
    frame is an inner packet of at most `mtu` bytes, its datagram `mtu + header` bytes; the
    UDP adapter puts min(GSO_MAX_SEGMENTS, max_payload // datagram) of them in one sendmsg.
    The worst peer counts; never below 1. Without peers there is nothing to fit: 64.
    Raises ValueError for an MTU below 68 (RFC 791 minimum) or a negative header.
    """
    if mtu < 68:
        raise ValueError(f"TUN MTU {mtu} below 68")
    segs = GSO_MAX_SEGMENTS
    for header, v6 in encap:
        if header < 0:
            raise ValueError(f"negative encapsulation header {header}")
        payload = UDP_MAX_PAYLOAD_V6 if v6 else UDP_MAX_PAYLOAD_V4
        segs = min(segs, payload // (mtu + header))
    return max(segs, 1)


def gso_knob(text: str | None) -> int | None:
    """GREBE_TUN_GSO_SEGS: None = off (unset, "", "0", anything unreadable), GSO_AUTO for
    "auto", else the integer (clamped to 1..65535)."""
    text = (text or "").strip().lower()
    if text == "auto":
        return GSO_AUTO
    try:
        n = int(text)
    except ValueError:
        if text:
            log.warning("GREBE_TUN_GSO_SEGS=%r is neither auto nor a number: off", text)
        return None
    return min(n, KERNEL_GSO_MAX_SEGS) if n > 0 else None


class TunBusyError(OSError):
    """The TUN is attached to another process."""


class TunDevice:
    """One TUN queue. `read_packets`/`write_packets` are the whole data API."""

    def __init__(self, name: str, vnet_hdr: bool = True, multi_queue: bool = False) -> None:
        self.name = name
        self.vnet_hdr = vnet_hdr
        # Set by the loop when its core takes SuperPackets: TSO frames are then handed over
        # whole (bridge/gso.py) instead of being split here.
        self.super_packets: type[SuperPacket] | None = None
        self.bad_frames = 0  # frames from the kernel that offload could not split
        self.write_errors = 0  # packets the kernel refused (EINVAL, EIO, ...)
        self._routes: list[tuple[str, int]] = []
        self.mtu = 0  # as last set by configure / set_mtu
        self.gso_segs: int | None = None  # IFLA_GSO_MAX_SEGS we set (None: left alone)
        self._encap: tuple[tuple[int, bool], ...] | None = None  # fit_gso's peers
        self._gso_refused = False
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
                fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", offload.VNET_HDR_LEN))
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

    def fileno(self) -> int:
        return self.fd

    # -- configuration (pyroute2) ------------------------------------------------------

    def configure(self, addresses: Sequence[str], mtu: int,
                  routes: Iterable[str] = ()) -> None:
        """Set MTU, addresses, link up, and one route per prefix into the TUN."""
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
            for r in routes:
                net = ipaddress.ip_network(r, strict=False)
                try:
                    ipr.route("add", dst=str(net), oif=self.index)
                except Exception as e:  # pyroute2 NetlinkError: an existing route is kept
                    if getattr(e, "code", None) != errno.EEXIST:
                        raise
                    log.warning("route %s exists already; left as it is", net)
                    continue
                self._routes.append((str(net), self.index))
        log.info("TUN %s up: mtu %d, addresses %s, routes %s", self.name, mtu,
                 ", ".join(addresses) or "-", ", ".join(r for r, _ in self._routes) or "-")

    def _quiet(self, ipr: Any) -> None:
        """IPv6 address generation mode none: no link-local address (module docstring)."""
        try:
            ipr.link("set", index=self.index, IFLA_AF_SPEC={"attrs": [
                ("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]}),
            ]})
        except Exception as e:  # IPv6 disabled in this namespace: nothing to quieten
            log.debug("TUN %s: IPv6 address generation mode not set: %s", self.name, e)

    def set_mtu(self, mtu: int) -> None:
        """Set the TUN MTU (the loop, on a path MTU change); the GSO cap follows it."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=self.index, mtu=mtu)
        self.mtu = mtu
        self._apply_gso()

    def fit_gso(self, encap: Iterable[tuple[int, bool]]) -> int | None:
        """Cap the TUN's TSO frames to one UDP GSO send each (module docstring): `encap` is
        per peer (encapsulation header bytes, underlay is IPv6). Remembered for `set_mtu`.
        Returns the gso_max_segs set, or None (knob off, no vnet header, kernel refused)."""
        self._encap = tuple(encap)
        return self._apply_gso()

    def _apply_gso(self) -> int | None:
        if not self.vnet_hdr or self._encap is None or self._gso_refused or not self.index:
            return None
        knob = gso_knob(os.environ.get("GREBE_TUN_GSO_SEGS"))
        if knob is None:
            return None
        segs = gso_max_segs(self.mtu, self._encap) if knob == GSO_AUTO else knob
        if segs == self.gso_segs:
            return segs
        from pyroute2 import IPRoute

        try:
            with IPRoute() as ipr:
                ipr.link("set", index=self.index, gso_max_segs=segs)
        except Exception as e:  # NetlinkError EOPNOTSUPP / EINVAL: an older kernel
            self._gso_refused = True
            log.info("TUN %s: gso_max_segs %d refused (%s); TSO frames stay as the kernel "
                     "sizes them", self.name, segs, e)
            return None
        self.gso_segs = segs
        log.info("TUN %s: gso_max_segs %d (mtu %d): one UDP GSO send per TSO frame",
                 self.name, segs, self.mtu)
        return segs

    def close(self) -> None:
        """Remove our routes, then close the fd (the kernel deletes the device)."""
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

    def read_packets(self, out: list[bytes], limit: int = 64) -> int:
        """Read up to `limit` frames (until EAGAIN); append the inner packets to `out`.

        Returns the number of frames read. Never raises for EAGAIN.
        """
        fd = self.fd
        view = self._view
        bufs = [self._buf]
        reads = 0
        split = offload.split_frame
        sp = self.super_packets
        while reads < limit:
            try:
                n = os.readv(fd, bufs)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            reads += 1
            if self.vnet_hdr:
                if sp is not None and view[1] & ~offload.GSO_ECN in _TSO and n > 64:
                    # one copy of the whole frame; the core segments it (bridge/gso.py)
                    out.append(sp(bytes(view[:n]), offload.VNET_HDR_LEN,  # type: ignore[arg-type]
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
            offload.coalesce(packets, coalesced)
            frames = coalesced
        else:
            frames = packets
        fd = self.fd
        for f in frames:
            try:
                os.write(fd, f)
            except BlockingIOError:
                self.write_errors += 1
            except OSError as e:
                self.write_errors += 1
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

"""The lab topology model: the validated, frozen values a topologies/*.toml file becomes.

Rules
-----
- Pure data: no file, no netlink. bridge/lab/topology.py reads and checks the files and
  builds these; bridge/lab/netlink.py (namespaces, veth pairs, bridges, addresses, routes)
  and bridge/lab/vm.py (qemu guests) apply them. Every value here has passed the checks
  there, so whoever applies a Topology checks nothing again.
- Safety facts shared by the loader and the appliers: every address and route of a lab lies
  in LAB_NETS, 198.18.0.0/15 (RFC 2544 §C.2.2 benchmarking) and 2001:db8::/32 (RFC 3849
  documentation). Interface names fit IFNAMSIZ (linux/if.h: 15 bytes and a NUL); a node's
  namespace is `gb-<instance>-<node>`, so instance and node names are bounded to keep it
  within MAX_NS_NAME.
- A node of kind "bridge" enslaves all its link ports to one Linux bridge, BRIDGE_IFNAME;
  a "linux-vm" node is a Linux kernel in a qemu guest (bridge/lab/vm.py).

Theory of operation: a Topology is nodes and links; a Link joins two Endpoints
("node:interface") with a veth pair; a Node lists its link ports in link order and its
addresses, static routes, per-namespace sysctls, MTUs and the processes it runs. Lookups by
name (`Topology.node`, `Topology.link`, `Node.address`) raise KeyError for a name the
topology does not have.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["LAB_NETS", "IFNAMSIZ", "MAX_NODE_NAME", "MAX_INSTANCE_NAME", "MAX_NS_NAME",
           "BRIDGE_IFNAME", "IpInterface", "IpNetwork", "IpAddress", "NodeKind", "Address",
           "Route", "RunCommand", "Endpoint", "Link", "Node", "Topology"]

LAB_NETS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("198.18.0.0/15"),  # RFC 2544 §C.2.2 benchmarking range
    ipaddress.ip_network("2001:db8::/32"),  # RFC 3849 documentation prefix
)
IFNAMSIZ = 16  # linux/if.h: names are at most 15 bytes plus NUL
MAX_NODE_NAME, MAX_INSTANCE_NAME = 20, 16
MAX_NS_NAME = 3 + MAX_INSTANCE_NAME + 1 + MAX_NODE_NAME  # "gb-" instance "-" node
BRIDGE_IFNAME = "br0"

IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NodeKind(Enum):
    HOST = "host"
    BRIDGE = "bridge"
    LINUX_VM = "linux-vm"  # a Linux kernel in a qemu guest (bridge/lab/vm.py)


@dataclass(frozen=True, slots=True)
class Address:
    """One address on one interface of a node."""

    interface: str
    address: IpInterface


@dataclass(frozen=True, slots=True)
class Route:
    """A static route; `dst` is 0.0.0.0/0 or ::/0 for "default"."""

    dst: IpNetwork
    via: IpAddress | None = None
    dev: str | None = None


@dataclass(frozen=True, slots=True)
class RunCommand:
    """A process started in a node at `up`, killed at `down`; `cwd`: its file's directory."""

    argv: tuple[str, ...]
    cwd: str
    line: str = ""  # as written: a linux-vm node runs it with the guest's shell

    def resolve(self, lab_dir: str) -> tuple[str, ...]:
        """Return argv with `{lab}` replaced by `lab_dir`."""
        return tuple(a.replace("{lab}", lab_dir) for a in self.argv)


@dataclass(frozen=True, slots=True)
class Endpoint:
    node: str
    interface: str

    def __str__(self) -> str:
        return f"{self.node}:{self.interface}"


@dataclass(frozen=True, slots=True)
class Link:
    """A veth pair between two node interfaces."""

    name: str
    a: Endpoint
    b: Endpoint
    mtu: int | None = None
    impair: Any = None  # bridge.lab.impair's parsed value, or the raw table without that module

    @property
    def endpoints(self) -> tuple[Endpoint, Endpoint]:
        return (self.a, self.b)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    kind: NodeKind = NodeKind.HOST
    interfaces: tuple[str, ...] = ()  # link ports, in link order
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    sysctl: tuple[tuple[str, str], ...] = ()
    mtu: tuple[tuple[str, int], ...] = ()
    run: tuple[RunCommand, ...] = ()

    def address(self, interface: str, version: int = 4) -> IpAddress:
        """Return the first address of `version` on `interface`; raises KeyError if none."""
        for a in self.addresses:
            if a.interface == interface and a.address.version == version:
                return a.address.ip
        raise KeyError(f"{self.name}:{interface} has no IPv{version} address")


@dataclass(frozen=True, slots=True)
class Topology:
    name: str
    file: str
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    description: str = ""

    def node(self, name: str) -> Node:
        """Return the node called `name`; raises KeyError."""
        found = [n for n in self.nodes if n.name == name]
        if not found:
            raise KeyError(f"topology {self.name} has no node {name!r}")
        return found[0]

    def link(self, name: str) -> Link:
        """Return the link called `name`; raises KeyError."""
        found = [lk for lk in self.links if lk.name == name]
        if not found:
            raise KeyError(f"topology {self.name} has no link {name!r}")
        return found[0]

    def links_of(self, node: str) -> tuple[Link, ...]:
        return tuple(lk for lk in self.links if node in (lk.a.node, lk.b.node))

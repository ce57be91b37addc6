"""The bench's own five-node line, used when the lab engine (`bridge.lab.netlink`) is absent.

Rules:
- Same shape and addresses as `topologies/two-sites-plain.toml` (minus the attacker):
  client 198.18.1.10/24 -- gw-a (lan0 198.18.1.1, wan0 198.18.0.1) -- wan (a Linux bridge) --
  gw-b (wan0 198.18.0.2, lan0 198.18.2.1) -- server 198.18.2.10/24, with 2001:db8:... twins.
  The wan knows no site prefix: without a tunnel or routes the sites cannot reach each other.
- Everything lives in namespaces `gb-<instance>-<node>`; nothing touches the root namespace.
  All netlink work is pyroute2; processes run through `ip netns exec` (lab code may).
- It offers the subset of the `Lab` contract the bench uses: `ns`, `run`, `popen`,
  `wait_for`, `destroy` (idempotent: kills what it started, deletes its namespaces).
"""

from __future__ import annotations

import errno
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

NODES = ("client", "gw-a", "wan", "gw-b", "server")

# (node a, ifname a, node b, ifname b)
LINKS = (
    ("client", "eth0", "gw-a", "lan0"),
    ("gw-a", "wan0", "wan", "p-gw-a"),
    ("gw-b", "wan0", "wan", "p-gw-b"),
    ("gw-b", "lan0", "server", "eth0"),
)

ADDRESSES: dict[str, dict[str, tuple[str, ...]]] = {
    "client": {"eth0": ("198.18.1.10/24", "2001:db8:1::10/64")},
    "gw-a": {"lan0": ("198.18.1.1/24", "2001:db8:1::1/64"),
             "wan0": ("198.18.0.1/24", "2001:db8::1/64")},
    "gw-b": {"wan0": ("198.18.0.2/24", "2001:db8::2/64"),
             "lan0": ("198.18.2.1/24", "2001:db8:2::1/64")},
    "server": {"eth0": ("198.18.2.10/24", "2001:db8:2::10/64")},
}

DEFAULT_ROUTES = {"client": ("198.18.1.1", "2001:db8:1::1"),
                  "server": ("198.18.2.1", "2001:db8:2::1")}


def stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 3.0) -> None:
    """SIGTERM each live process (so nginx/openvpn clean up), SIGKILL what outlives `grace`."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


class BenchLine:
    """A running line of five namespaces. Build with `BenchLine.up(instance)`."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []

    @classmethod
    def up(cls, instance: str = "bench") -> BenchLine:
        line = cls(instance)
        try:
            line._build()
        except BaseException:
            line.destroy()
            raise
        return line

    def ns(self, node: str) -> str:
        if node not in NODES:
            raise KeyError(f"no node {node!r} in the bench line")
        return f"gb-{self.instance}-{node}"

    def _build(self) -> None:
        existing = set(netns.listnetns())
        for node in NODES:
            name = self.ns(node)
            if name in existing:
                raise RuntimeError(f"namespace {name} exists: another bench run, or a leftover")
            netns.create(name)
            self._created.append(name)
        for a, ifa, b, ifb in LINKS:
            with IPRoute(netns=self.ns(a)) as ip:
                ip.link("add", ifname=ifa, kind="veth",
                        peer={"ifname": ifb, "net_ns_fd": self.ns(b)})
        with IPRoute(netns=self.ns("wan")) as ip:
            ip.link("add", ifname="br0", kind="bridge")
            br = ip.link_lookup(ifname="br0")[0]
            for port in ("p-gw-a", "p-gw-b"):
                ip.link("set", index=ip.link_lookup(ifname=port)[0], master=br, state="up")
            ip.link("set", index=br, state="up")
        for node in NODES:
            self._configure(node)
        for gw in ("gw-a", "gw-b"):
            self.run(gw, ["sysctl", "-qw", "net.ipv4.ip_forward=1",
                          "net.ipv6.conf.all.forwarding=1"])

    def _configure(self, node: str) -> None:
        with IPRoute(netns=self.ns(node)) as ip:
            ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
            for ifname, addrs in ADDRESSES.get(node, {}).items():
                idx = ip.link_lookup(ifname=ifname)[0]
                for cidr in addrs:
                    addr, plen = cidr.split("/")
                    # nodad: IPv6 addresses usable at once, no wait for DAD
                    kw: dict[str, Any] = {"flags": 0x02} if ":" in addr else {}
                    ip.addr("add", index=idx, address=addr, prefixlen=int(plen), **kw)
                ip.link("set", index=idx, state="up")
            for gw in DEFAULT_ROUTES.get(node, ()):
                fam = 10 if ":" in gw else 2
                ip.route("add", dst="default", gateway=gw, family=fam)

    def run(self, node: str, argv: Sequence[str], timeout: float = 30, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(node), *argv], input=input,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def popen(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(node), *argv], **kw)
        self._procs.append(p)
        return p

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if predicate():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def destroy(self) -> None:
        stop_processes(self._procs)
        self._procs.clear()
        for name in reversed(self._created):
            try:
                netns.remove(name)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    raise
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV):
                    raise
        self._created.clear()

"""Endpoint host names -> addresses: the resolver `grebe up`, `reload` and `check-config`
give bridge/config.py (the core only ever sees addresses).

Rules:
- `hosts_file` (a config key, hosts(5) format: "address name [alias...]", "#" comments)
  is read first: a name it lists resolves there, to its first address of the wanted family;
  this is also how a lab namespace gets names of its own, since /etc/hosts is shared by
  every namespace entered with setns(2). Then the system resolver (getaddrinfo, which
  reads /etc/hosts and DNS as nsswitch.conf says).
- The family follows `listen.address` (4 or 6; 0 for "::", which takes both: the first
  address getaddrinfo gives). An IPv4-mapped IPv6 answer counts as IPv4.
- Resolved at start and at each reload, never per packet: a name that moves is followed by
  `grebe reload` (the peer then starts afresh, bridge/reconfig.py). A name that does not
  resolve is one error line of its endpoint key, never a traceback.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["resolve", "from_hosts_file"]


def from_hosts_file(path: str, name: str, version: int) -> str | None:
    """The first address of `name` in the hosts file at `path` of IP `version` (0: any)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"hosts_file {path}: {e.strerror or e}") from None
    want = name.lower().rstrip(".")
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or want not in (x.lower().rstrip(".") for x in fields[1:]):
            continue
        try:
            addr = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        if version in (0, addr.version):
            return str(addr)
    return None


def resolve(name: str, version: int, hosts_file: str | None) -> str:
    """The address of endpoint host `name` (module docstring); ValueError when none."""
    if hosts_file:
        got = from_hosts_file(hosts_file, name, version)
        if got is not None:
            return got
    family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(version, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        where = f" (nor in hosts_file {hosts_file})" if hosts_file else ""
        raise ValueError(f"{getattr(e, 'strerror', None) or e}{where}") from None
    for _fam, _t, _p, _c, sa in infos:
        addr = ipaddress.ip_address(str(sa[0]).split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if version in (0, addr.version):
            return str(addr)
    raise ValueError(f"no IPv{version} address")

"""`grebe pair`: the matching endpoint files of every site, from one description.

Rules
- Nobody hand-mirrors prefixes and keys: one TOML description names the sites (underlay
  address, the prefixes behind each) and the tunnel settings once; every site's endpoint file
  is derived from it, so the two ends of a tunnel always agree on encapsulation, key, sequence
  policy, checksum and port (RFC 2890 §2.1: the key must match at both ends; RFC 8086 §3:
  GRE-in-UDP port 4754).
- Topology: `full-mesh` (default: every site peers with every other) or `hub` = a site name
  (hub and spoke: each spoke peers with the hub only, and its peer entry for the hub carries
  the prefixes of every other site, so spoke-to-spoke traffic crosses the hub, which forwards
  it between its peers like any router).
- Tunnel addresses: `tunnel` lists at most one IPv4 and one IPv6 prefix; site i (in file order)
  gets host i + 1 of each, with the prefix's length. A peer's prefixes include the other end's
  tunnel addresses (/32, /128), so that ICMP errors the far gateway itself sends (Time Exceeded,
  Packet Too Big) pass its inner-source check.
- Pure: text in, text out. The output is validated by loading it with bridge/config.py, so a
  description that would give a broken endpoint is refused with the endpoint's own error.
  Errors name the key path in the description ("sites.b.prefixes[0]: ...").

Theory of operation: `parse_description(text)` checks the description into a `Description`;
`endpoint_files(desc)` returns {site name: TOML text}, each checked by `loads_config`; `run`
writes them as NAME.toml into a directory (or prints them).

    grebe pair sites.toml --out /etc/grebe    # then on host "a": grebe up -c /etc/grebe/a.toml
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.config import loads_config
from bridge.errors import ConfigError, ConfigErrors

__all__ = ["Description", "Site", "parse_description", "endpoint_files", "EXAMPLE"]

EXAMPLE = """\
# grebe pair description: `grebe pair sites.toml --out DIR` writes DIR/<site>.toml for each site
encapsulation = "gre"        # "gre" | "ipip"
key = 42                     # optional GRE key (both ends of every tunnel)
sequence = "drop-late"       # "off" | "drop-late" | "reorder"
port = 4754
tunnel = ["198.18.100.0/24", "2001:db8:100::/64"]   # TUN addresses: site i gets host i+1
# hub = "a"                  # hub and spoke through site a; default: full mesh

[sites.a]
endpoint = "198.18.0.1"      # the site's underlay address (where its grebe listens)
prefixes = ["198.18.1.0/24", "2001:db8:1::/64"]

[sites.b]
endpoint = "198.18.0.2"
prefixes = ["198.18.2.0/24", "2001:db8:2::/64"]
"""

_KEYS = frozenset({"encapsulation", "key", "sequence", "port", "tunnel", "hub", "checksum",
                   "keepalive", "dead_after", "mtu", "sites"})
_SITE_KEYS = frozenset({"endpoint", "prefixes", "tun_name"})
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Site:
    """One site of the description."""

    name: str
    endpoint: str                 # underlay address (IPv4 or IPv6 literal)
    prefixes: tuple[str, ...]
    tun_name: str = "grebe0"


@dataclass(frozen=True, slots=True)
class Description:
    """A checked description: the sites in file order and the shared tunnel settings."""

    sites: tuple[Site, ...]
    encapsulation: str = "gre"
    key: int | None = None
    sequence: str = "off"
    port: int = 4754
    tunnel: tuple[Net, ...] = ()
    hub: str | None = None
    checksum: bool = False
    keepalive: int = 10
    dead_after: int = 30
    mtu: int | str = "auto"


def _err(path: str, msg: str) -> ConfigError:
    return ConfigError(path, msg)


def _site(name: str, t: Any) -> Site:
    p = f"sites.{name}"
    if not isinstance(t, dict):
        raise _err(p, "must be a table")
    for k in t:
        if k not in _SITE_KEYS:
            raise _err(f"{p}.{k}", "unknown key")
    ep = t.get("endpoint")
    if not isinstance(ep, str):
        raise _err(f"{p}.endpoint", "required: the site's underlay IP address")
    try:
        ipaddress.ip_address(ep)
    except ValueError:
        raise _err(f"{p}.endpoint", "required: the site's underlay IP address") from None
    prefixes = t.get("prefixes", [])
    if not isinstance(prefixes, list) or not prefixes:
        raise _err(f"{p}.prefixes", "required: a non-empty list of IP prefixes")
    for j, pre in enumerate(prefixes):
        try:
            ipaddress.ip_network(pre if isinstance(pre, str) else "", strict=True)
        except ValueError as e:
            raise _err(f"{p}.prefixes[{j}]", f"not an IP prefix: {e}") from None
    tun = t.get("tun_name", "grebe0")
    if not isinstance(tun, str) or not 0 < len(tun) <= 15:
        raise _err(f"{p}.tun_name", "an interface name of 1-15 characters")
    return Site(name, ep, tuple(prefixes), tun)


def parse_description(text: str) -> Description:
    """Check a description. Raises ConfigError naming the key path on the first problem."""
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise _err("(file)", f"not TOML: {e}") from None
    for k in data:
        if k not in _KEYS:
            raise _err(k, "unknown key")
    sites_raw = data.get("sites")
    if not isinstance(sites_raw, dict) or len(sites_raw) < 2:
        raise _err("sites", "at least two [sites.NAME] tables")
    sites = tuple(_site(n, t) for n, t in sites_raw.items())
    tunnel: list[Net] = []
    for j, pre in enumerate(data.get("tunnel", [])):
        try:
            net = ipaddress.ip_network(pre, strict=True)
        except (ValueError, TypeError) as e:
            raise _err(f"tunnel[{j}]", f"not an IP prefix: {e}") from None
        if any(n.version == net.version for n in tunnel):
            raise _err(f"tunnel[{j}]", "one prefix per IP version")
        if net.num_addresses < len(sites) + 2:
            raise _err(f"tunnel[{j}]", f"too small for {len(sites)} sites")
        tunnel.append(net)
    if not tunnel:
        raise _err("tunnel", "required: a prefix for the TUN addresses (IPv4 and/or IPv6)")
    hub = data.get("hub")
    fams = {ipaddress.ip_address(s.endpoint).version for s in sites}
    if len(fams) > 1:  # a socket bound to one family cannot reach the other's peers
        raise _err("sites", "every site's endpoint must be of one IP version (all IPv4 or all "
                            "IPv6 underlay addresses)")
    if hub is not None and hub not in sites_raw:
        raise _err("hub", f"{hub!r} is not a site")
    key = data.get("key")
    if key is not None and (not isinstance(key, int) or isinstance(key, bool)
                            or not 0 <= key <= 0xFFFFFFFF):
        raise _err("key", "a 32-bit unsigned integer (RFC 2890 §2.1)")
    return Description(
        sites=sites, encapsulation=data.get("encapsulation", "gre"), key=key,
        sequence=data.get("sequence", "off"), port=data.get("port", 4754),
        tunnel=tuple(tunnel), hub=hub, checksum=data.get("checksum", False),
        keepalive=data.get("keepalive", 10), dead_after=data.get("dead_after", 30),
        mtu=data.get("mtu", "auto"))


def _tun_host(net: Net, i: int) -> str:
    return f"{net.network_address + i + 1}/{net.prefixlen}"


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _q(items: list[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


def _peers_of(desc: Description, i: int) -> list[tuple[int, list[int]]]:
    """(peer site index, indexes of the sites whose prefixes that peer carries)."""
    n = len(desc.sites)
    names = [s.name for s in desc.sites]
    if desc.hub is None:
        return [(j, [j]) for j in range(n) if j != i]
    h = names.index(desc.hub)
    if i == h:
        return [(j, [j]) for j in range(n) if j != h]
    return [(h, [j for j in range(n) if j != i])]  # the hub carries every other site


def endpoint_files(desc: Description) -> dict[str, str]:
    """{site name: endpoint TOML}. Each is loaded with bridge/config.py before it is
    returned; a ConfigError names the site ("site b: peers[0].endpoint: ...")."""
    out: dict[str, str] = {}
    for i, site in enumerate(desc.sites):
        tun = [_tun_host(net, i) for net in desc.tunnel]
        lines = [f"# grebe endpoint {site.name}, written by `grebe pair` (do not edit: edit",
                 "# the description and run it again; both ends then stay in step)",
                 "mss_clamp = true", "", "[tun]", f'name = "{site.tun_name}"',
                 f"addresses = {_q(tun)}", f"mtu = {_toml(desc.mtu)}", "", "[listen]",
                 f'address = "{site.endpoint}"', f"port = {desc.port}"]
        for j, carried in _peers_of(desc, i):
            peer = desc.sites[j]
            prefixes = [p for k in carried for p in desc.sites[k].prefixes]
            # the gateways' own tunnel addresses (their ICMP errors come from them)
            prefixes += [f"{net.network_address + k + 1}/{net.max_prefixlen}"
                         for k in sorted({j, *carried}) for net in desc.tunnel]
            lines += ["", "[[peers]]", f'name = "{peer.name}"',
                      f'endpoint = "{_endpoint(peer.endpoint, desc.port)}"',
                      f"prefixes = {_q(prefixes)}",
                      f'encapsulation = "{desc.encapsulation}"']
            if desc.key is not None:
                lines.append(f"key = {desc.key}")
            lines += [f'sequence = "{desc.sequence}"', f"checksum = {_toml(desc.checksum)}",
                      f"keepalive = {desc.keepalive}", f"dead_after = {desc.dead_after}"]
        text = "\n".join(lines) + "\n"
        try:
            loads_config(text)
        except ConfigErrors as e:
            first = e.errors[0]
            raise ConfigError(f"site {site.name}: {first.path}", first.message) from None
        out[site.name] = text
    return out


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


# -- the subcommand (registered by bridge/cli.py) -------------------------------------


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("description", nargs="?", help="description TOML (see --example)")
    p.add_argument("--out", help="directory to write SITE.toml into (default: print them)")
    p.add_argument("--example", action="store_true", help="print an example description")


def run(args: argparse.Namespace) -> int:
    if args.example:
        sys.stdout.write(EXAMPLE)
        return 0
    if not args.description:
        print("grebe pair: a description file is needed (try --example)", file=sys.stderr)
        return 2
    try:
        files = endpoint_files(parse_description(Path(args.description).read_text()))
    except OSError as e:
        print(f"grebe pair: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"grebe pair: {args.description}: {e}", file=sys.stderr)
        return 1
    if args.out is None:
        for name, text in files.items():
            sys.stdout.write(f"# ---- {name}.toml\n{text}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = out / f"{name}.toml"
        changed = not path.exists() or path.read_text() != text
        if changed:
            path.write_text(text)
        print(f"{path}: {'written' if changed else 'unchanged'}")
    return 0

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
- A site's `endpoint` is what the other sites write as its endpoint: an IP literal (then also
  its listen address), or a host name other sites reach it by, with an optional ":port"
  ("gw-b.example.net:4754", RFC 1123 §2.1; bridge/config.py resolves it at `grebe up`) for a
  site behind NAT or a changing address. A host name needs `listen`, the site's own
  underlay address ("0.0.0.0" / "::": every address), which is also given to replace an IP
  literal endpoint's listen address. The site listens on `port`; the ":port" is only what the
  others send to (a NAT port forward). `grebe pair --endpoint b=HOST[:PORT]` sets a site's
  endpoint from the command line; its literal endpoint becomes its listen address.
- Full tunnel: `full_tunnel = true` on one site (or `--full-tunnel SITE`) makes it the others'
  way to everywhere: their peer entry for it also owns 0.0.0.0/0 and ::/0 (bridge/config.py:
  the tunnel's own datagrams leave by policy routing, tun.table and tun.fwmark). One site at
  most: two peers cannot own one prefix. With a hub, the spokes reach it through the hub.
- Tunnel addresses: `tunnel` lists at most one IPv4 and one IPv6 prefix; site i (in file order)
  gets host i + 1 of each, with the prefix's length. A peer's prefixes include the other end's
  tunnel addresses (/32, /128), so that ICMP errors the far gateway itself sends (Time Exceeded,
  Packet Too Big) pass its inner-source check.
- Pure: text in, text out. The output is validated by loading it with bridge/config.py, so a
  description that would give a broken endpoint is refused with the endpoint's own error.
  Errors name the key path in the description ("sites.b.prefixes[0]: ..."). No DNS here:
  for that check a host name stands for its site's listen address, or, for a wildcard
  listen, an address of 192.0.2.0/24 (RFC 5737) or 100::/64 (RFC 6666) that no prefix holds.

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

from bridge.config import parse_config
from bridge.endpoint import Resolver, host_name, parse_endpoint
from bridge.errors import ConfigError

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
endpoint = "198.18.0.2"      # or a host name: endpoint = "gw-b.example.net:4754" with
prefixes = ["198.18.2.0/24", "2001:db8:2::/64"]   # listen = "198.18.0.2" (or "0.0.0.0")
# full_tunnel = true         # the other sites send everything (0.0.0.0/0, ::/0) to b
"""

_KEYS = frozenset({"encapsulation", "key", "sequence", "port", "tunnel", "hub", "checksum",
                   "keepalive", "dead_after", "mtu", "sites"})
_SITE_KEYS = frozenset({"endpoint", "listen", "prefixes", "tun_name", "full_tunnel"})
DEFAULT_ROUTES = ("0.0.0.0/0", "::/0")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Site:
    """One site of the description."""

    name: str
    endpoint: str                 # what the others send to: an IP literal or a host name
    prefixes: tuple[str, ...]
    tun_name: str = "grebe0"
    listen: str = ""              # its own underlay address ("" = endpoint, an IP literal)
    port: int | None = None       # the port the others send to (None: the description's)
    full_tunnel: bool = False     # the others' peer entry for it owns 0.0.0.0/0 and ::/0

    @property
    def listen_address(self) -> str:
        return self.listen or self.endpoint

    def routes(self) -> tuple[str, ...]:
        """What the other sites route to it: its prefixes, and /0s for a full tunnel."""
        extra = DEFAULT_ROUTES if self.full_tunnel else ()
        return self.prefixes + tuple(r for r in extra if r not in self.prefixes)


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
    ep_text = t.get("endpoint")
    need = "required: the site's underlay IP address, or the host name[:port] others reach it by"
    if not isinstance(ep_text, str):
        raise _err(f"{p}.endpoint", need)
    ep, port, literal = _advertised(ep_text)
    if not ep:
        raise _err(f"{p}.endpoint", need)
    listen = t.get("listen", ep if literal else None)
    if listen is None:
        raise _err(f"{p}.endpoint", f"{ep_text!r} is a host name: give `listen`, the site's "
                   "own underlay IP address (\"0.0.0.0\" or \"::\" for every address)")
    try:
        ipaddress.ip_address(listen if isinstance(listen, str) else "")
    except ValueError:
        raise _err(f"{p}.listen", "an IP address (\"0.0.0.0\" or \"::\": every address)") \
            from None
    full = t.get("full_tunnel", False)
    if not isinstance(full, bool):
        raise _err(f"{p}.full_tunnel", "true or false")
    prefixes = t.get("prefixes", [])
    if not isinstance(prefixes, list) or not (prefixes or full):
        raise _err(f"{p}.prefixes", "required: a non-empty list of IP prefixes")
    for j, pre in enumerate(prefixes):
        try:
            ipaddress.ip_network(pre if isinstance(pre, str) else "", strict=True)
        except ValueError as e:
            raise _err(f"{p}.prefixes[{j}]", f"not an IP prefix: {e}") from None
    tun = t.get("tun_name", "grebe0")
    if not isinstance(tun, str) or not 0 < len(tun) <= 15:
        raise _err(f"{p}.tun_name", "an interface name of 1-15 characters")
    return Site(name, ep, tuple(prefixes), tun, listen, port, full)


def _advertised(text: str) -> tuple[str, int | None, bool]:
    """(host, port or None, is an IP literal) of a site's endpoint; host "" if it is neither
    an IP address ("198.18.0.2", "2001:db8::2", "[2001:db8::2]:4754") nor a host name."""
    try:
        return str(ipaddress.ip_address(text)), None, True
    except ValueError:
        pass
    try:
        host, port = parse_endpoint(text, -1)
        return host, None if port < 0 else port, True
    except ValueError:
        pass
    named = host_name(text, -1)
    if named is None:
        return "", None, False
    return named[0], None if named[1] < 0 else named[1], False


def parse_description(text: str, endpoints: dict[str, str] | None = None,
                      full_tunnel: str | None = None) -> Description:
    """Check a description. Raises ConfigError naming the key path on the first problem.
    `endpoints` {site: endpoint} and `full_tunnel` (a site) are the command line's
    --endpoint and --full-tunnel, applied over the file (module docstring)."""
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise _err("(file)", f"not TOML: {e}") from None
    _override(data, endpoints or {}, full_tunnel)
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
    fams = {ip.version for s in sites
            if not ((ip := ipaddress.ip_address(s.listen_address)).version == 6
                    and ip.is_unspecified)}  # "::" takes both families
    if len(fams) > 1:  # a socket bound to one family cannot reach the other's peers
        raise _err("sites", "every site's endpoint must be of one IP version (all IPv4 or all "
                            "IPv6 underlay addresses)")
    full = [s.name for s in sites if s.full_tunnel]
    if len(full) > 1:
        raise _err(f"sites.{full[1]}.full_tunnel", f"site {full[0]} is the full tunnel "
                   "already: two peers cannot both own 0.0.0.0/0 and ::/0")
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


def _override(data: dict[str, Any], endpoints: dict[str, str],
              full_tunnel: str | None) -> None:
    """Apply --endpoint SITE=ENDPOINT and --full-tunnel SITE to the description's tables."""
    sites = data.get("sites")
    sites = sites if isinstance(sites, dict) else {}
    for name, ep in endpoints.items():
        site = sites.get(name)
        if not isinstance(site, dict):
            raise _err("--endpoint", f"{name!r} is not a site of the description")
        old = site.get("endpoint")
        if "listen" not in site and isinstance(old, str) and _advertised(old)[2]:
            site["listen"] = _advertised(old)[0]  # the old literal: where it listens
        site["endpoint"] = ep
    if full_tunnel is not None:
        site = sites.get(full_tunnel)
        if not isinstance(site, dict):
            raise _err("--full-tunnel", f"{full_tunnel!r} is not a site of the description")
        site["full_tunnel"] = True


def _stand_in(desc: Description) -> Resolver:
    """The check's resolver (no DNS here, module docstring): a site's host name -> its
    listen address, or a reserved address no prefix holds for a wildcard listen."""
    index = {s.endpoint: (i, s) for i, s in enumerate(desc.sites)}

    def resolve(name: str, version: int, _hosts_file: str | None) -> str:
        i, site = index[name]
        ip = ipaddress.ip_address(site.listen_address)
        if not ip.is_unspecified and version in (0, ip.version):
            return str(ip)
        v6 = version == 6 or (version == 0 and ip.version == 6)
        return f"100::{i + 1:x}" if v6 else f"192.0.2.{i + 1}"
    return resolve


def _tun_host(net: Net, i: int) -> str:
    return f"{net.network_address + i + 1}/{net.prefixlen}"


def _endpoint(site: Site, port: int) -> str:
    """The peer entry's endpoint of `site`: its address or host name, and port."""
    port = port if site.port is None else site.port
    return f"[{site.endpoint}]:{port}" if ":" in site.endpoint else f"{site.endpoint}:{port}"


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
    resolve = _stand_in(desc)
    for i, site in enumerate(desc.sites):
        tun = [_tun_host(net, i) for net in desc.tunnel]
        lines = [f"# grebe endpoint {site.name}, written by `grebe pair` (do not edit: edit",
                 "# the description and run it again; both ends then stay in step)",
                 "mss_clamp = true", "", "[tun]", f'name = "{site.tun_name}"',
                 f"addresses = {_q(tun)}", f"mtu = {_toml(desc.mtu)}", "", "[listen]",
                 f'address = "{site.listen_address}"', f"port = {desc.port}"]
        for j, carried in _peers_of(desc, i):
            peer = desc.sites[j]
            prefixes = [p for k in carried for p in desc.sites[k].routes()]
            # the gateways' own tunnel addresses (their ICMP errors come from them)
            prefixes += [f"{net.network_address + k + 1}/{net.max_prefixlen}"
                         for k in sorted({j, *carried}) for net in desc.tunnel]
            lines += ["", "[[peers]]", f'name = "{peer.name}"',
                      f'endpoint = "{_endpoint(peer, desc.port)}"',
                      f"prefixes = {_q(prefixes)}",
                      f'encapsulation = "{desc.encapsulation}"']
            if desc.key is not None:
                lines.append(f"key = {desc.key}")
            lines += [f'sequence = "{desc.sequence}"', f"checksum = {_toml(desc.checksum)}",
                      f"keepalive = {desc.keepalive}", f"dead_after = {desc.dead_after}"]
        text = "\n".join(lines) + "\n"
        _cfg, errors = parse_config(tomllib.loads(text), None, resolve)
        if errors:
            raise ConfigError(f"site {site.name}: {errors[0].path}", errors[0].message)
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
    p.add_argument("--endpoint", action="append", default=[], metavar="SITE=HOST[:PORT]",
                   help="what the other sites send to for SITE (a host name, say), instead "
                        "of the description's endpoint, which stays SITE's listen address")
    p.add_argument("--full-tunnel", metavar="SITE",
                   help="the other sites send everything (0.0.0.0/0, ::/0) through SITE")


def run(args: argparse.Namespace) -> int:
    if args.example:
        sys.stdout.write(EXAMPLE)
        return 0
    if not args.description:
        print("grebe pair: a description file is needed (try --example)", file=sys.stderr)
        return 2
    endpoints: dict[str, str] = {}
    for item in getattr(args, "endpoint", None) or []:
        name, sep, ep = item.partition("=")
        if not sep or not name or not ep:
            print(f"grebe pair: --endpoint {item!r}: SITE=HOST[:PORT]", file=sys.stderr)
            return 2
        endpoints[name] = ep
    try:
        files = endpoint_files(parse_description(
            Path(args.description).read_text(), endpoints, getattr(args, "full_tunnel", None)))
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

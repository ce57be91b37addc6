"""Lab topologies: topologies/*.toml -> validated frozen dataclasses (pure, no netlink).

Rules
-----
- A topology is data, separate from building it (mininet `topo.py` vs `net.py`; containerlab's
  `"node:iface"` endpoint pairs). This module only reads TOML files and validates them;
  `bridge/lab/netlink.py` is the only code that applies a topology to the kernel.
- File format (containerlab-like)::

      name = "two-sites-plain"          # optional, default: the file's stem
      description = "..."               # optional, free text
      extends = "other-topology"        # optional: a name in the same directory, or a path

      [nodes.gw-a]
      kind = "host"                     # or "bridge": a Linux bridge br0 enslaves every link port
      addresses = {lan0 = ["198.18.1.1/24", "2001:db8:1::1/64"], wan0 = ["198.18.0.1/24"]}
      routes = [{dst = "default", via = "198.18.0.2"}, {dst = "198.18.4.0/24", dev = "wan0"}]
      sysctl = {"net.ipv4.ip_forward" = 1}
      mtu = {wan0 = 1400}               # per interface; overrides the link's mtu
      run = ["grebe up -c two-sites/gw-a.toml"]   # lives until `down`

      [[links]]
      endpoints = ["client:eth0", "gw-a:lan0"]
      name = "lan-a"                    # optional, default "client:eth0--gw-a:lan0"
      mtu = 1500                        # optional, both ends
      impair = {rate = "100mbit"}       # optional, parsed by bridge.lab.impair if it exists

- `extends` merges per node: in a node table the child's dict-valued keys (addresses, sysctl,
  mtu) are merged entry by entry over the parent's; other keys (run, routes, kind) replace the
  parent's. A child link whose name equals a parent link's name is merged key by key over it;
  other child links are appended. So a `run` line is added to a node by extending.
- `run` commands are split with shlex. Each keeps the directory of the file that defined it:
  the process runs there (cwd), and arguments (or `--opt=` values) starting with `./` or `../`
  are made absolute against it. `{lab}` is replaced by the lab's state directory at start time.
- Safety: every address and route (destination and gateway) must be inside the lab ranges
  198.18.0.0/15 (RFC 2544 benchmarking range) and 2001:db8::/32 (RFC 3849 documentation
  prefix), so a lab can never collide with real networks. Only `net.*` sysctls (the per
  network namespace ones) are accepted.
- Names: interface names follow the kernel's IFNAMSIZ (at most 15 bytes, no '/', ':' or
  spaces; RFC-free, see linux/if.h); node names are short enough that the namespace name
  `gb-<instance>-<node>` stays readable (MAX_NODE_NAME, MAX_INSTANCE_NAME).
- Errors never stop at the first one: every problem becomes a ConfigError(file, key path,
  message) and all are raised together as ConfigErrors.

Theory of operation
-------------------
`load(name_or_path)` reads the file chain (child -> extends -> ...), checks each file's keys
and shapes against its own file name, merges the raw tables root-first, then checks the merged
result (endpoints, duplicates, ranges) and builds the dataclasses.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError, ConfigErrors

TOPOLOGY_DIR = Path(__file__).resolve().parents[2] / "topologies"

LAB_NETS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("198.18.0.0/15"),  # RFC 2544 §C.2.2 benchmarking range
    ipaddress.ip_network("2001:db8::/32"),  # RFC 3849 documentation prefix
)
IFNAMSIZ = 16  # linux/if.h: names are at most 15 bytes plus NUL
MAX_NODE_NAME = 20
MAX_INSTANCE_NAME = 16
# "gb-" + instance + "-" + node: kept short enough to read and to type.
MAX_NS_NAME = 3 + MAX_INSTANCE_NAME + 1 + MAX_NODE_NAME
BRIDGE_IFNAME = "br0"

_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_SYSCTL = re.compile(r"^net\.[A-Za-z0-9_.-]+$")

_TOP_KEYS = frozenset({"name", "description", "extends", "nodes", "links"})
_NODE_KEYS = frozenset({"kind", "addresses", "routes", "sysctl", "run", "mtu", "description"})
_MERGED_NODE_KEYS = frozenset({"addresses", "sysctl", "mtu"})
_LINK_KEYS = frozenset({"endpoints", "name", "mtu", "impair"})
_ROUTE_KEYS = frozenset({"dst", "via", "dev", "metric"})

IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NodeKind(Enum):
    HOST = "host"
    BRIDGE = "bridge"


@dataclass(frozen=True, slots=True)
class Address:
    """One address on one interface of a node."""

    interface: str
    address: IpInterface

    @property
    def version(self) -> int:
        return self.address.version


@dataclass(frozen=True, slots=True)
class Route:
    """A static route; `dst` is 0.0.0.0/0 or ::/0 for "default"."""

    dst: IpNetwork
    via: IpAddress | None = None
    dev: str | None = None
    metric: int | None = None

    @property
    def version(self) -> int:
        return self.dst.version


@dataclass(frozen=True, slots=True)
class RunCommand:
    """A process started in a node at `up` and killed at `down`.

    `cwd` is the directory of the topology file that defined it.
    """

    argv: tuple[str, ...]
    cwd: str

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

    def addresses_of(self, interface: str) -> tuple[Address, ...]:
        return tuple(a for a in self.addresses if a.interface == interface)

    def address(self, interface: str, version: int = 4) -> IpAddress:
        """Return the first address of `version` on `interface`; raises KeyError if none."""
        for a in self.addresses:
            if a.interface == interface and a.version == version:
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
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"topology {self.name} has no node {name!r}")

    def link(self, name: str) -> Link:
        """Return the link called `name`; raises KeyError."""
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(f"topology {self.name} has no link {name!r}")

    def links_of(self, node: str) -> tuple[Link, ...]:
        return tuple(lk for lk in self.links if node in (lk.a.node, lk.b.node))


# ---------------------------------------------------------------- loading and merging


@dataclass(slots=True)
class _Errors:
    items: list[ConfigError] = field(default_factory=list)

    def add(self, file: str, path: str, message: str) -> None:
        self.items.append(ConfigError(path, message, file=file))


def resolve_path(name_or_path: str | Path, base: Path = TOPOLOGY_DIR) -> Path:
    """Return the file for a topology name ("two-sites") or path ("x/y.toml")."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in str(name_or_path):
        return p if p.is_absolute() else (Path.cwd() / p)
    return base / f"{p.name}.toml"


def available(base: Path = TOPOLOGY_DIR) -> list[str]:
    """Names of the topologies shipped in `base`."""
    return sorted(p.stem for p in base.glob("*.toml"))


def load(name_or_path: str | Path, base: Path = TOPOLOGY_DIR) -> Topology:
    """Load and validate a topology by name or path.

    Returns the Topology. Raises ConfigErrors listing every problem found.
    """
    path = resolve_path(name_or_path, base).resolve()
    errors = _Errors()
    raw = _load_chain(path, errors, [])
    if raw is None:
        raise ConfigErrors(errors.items)
    topo = _build(raw, str(path), errors)
    if errors.items:
        raise ConfigErrors(errors.items)
    assert topo is not None
    return topo


def loads(text: str, file: str = "<string>") -> Topology:
    """Validate a topology given as TOML text (no `extends`); raises ConfigErrors."""
    errors = _Errors()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigErrors([ConfigError("", f"TOML syntax: {e}", file=file)]) from None
    if "extends" in data:
        errors.add(file, "extends", "not supported for topologies given as text")
    raw = _check_file(data, file, str(Path(file).parent), errors)
    topo = _build(raw, file, errors)
    if errors.items:
        raise ConfigErrors(errors.items)
    assert topo is not None
    return topo


def _load_chain(path: Path, errors: _Errors, seen: list[Path]) -> dict[str, Any] | None:
    file = str(path)
    if path in seen:
        chain = " -> ".join(str(p) for p in [*seen, path])
        errors.add(file, "extends", f"extends cycle: {chain}")
        return None
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        where = str(seen[-1]) if seen else file
        errors.add(where, "extends" if seen else "", f"topology file not found: {file}")
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        errors.add(file, "", f"cannot read: {e}")
        return None
    raw = _check_file(data, file, str(path.parent), errors)
    parent_name = data.get("extends")
    if parent_name is None:
        return raw
    if not isinstance(parent_name, str):
        errors.add(file, "extends", "must be a topology name or path")
        return raw
    parent_path = resolve_path(parent_name, path.parent).resolve()
    parent = _load_chain(parent_path, errors, [*seen, path])
    if parent is None:
        return None
    return _merge(parent, raw)


def _check_file(data: dict[str, Any], file: str, directory: str, errors: _Errors) -> dict[str, Any]:
    """Check one file's keys and value shapes; return a normalized raw table.

    Run commands get the file's directory attached here, so merging keeps their origin.
    """
    for key in data:
        if key not in _TOP_KEYS:
            errors.add(file, key, "unknown key")
    out: dict[str, Any] = {"nodes": {}, "links": [], "file": file}
    for key in ("name", "description"):
        if key in data:
            if isinstance(data[key], str):
                out[key] = data[key]
            else:
                errors.add(file, key, "must be a string")
    nodes = data.get("nodes", {})
    if not isinstance(nodes, dict):
        errors.add(file, "nodes", "must be a table of node tables")
        nodes = {}
    for name, table in nodes.items():
        where = f"nodes.{name}"
        if not isinstance(table, dict):
            errors.add(file, where, "must be a table")
            continue
        for key in table:
            if key not in _NODE_KEYS:
                errors.add(file, f"{where}.{key}", "unknown key")
        node = {k: v for k, v in table.items() if k in _NODE_KEYS}
        if "run" in node:
            node["run"] = _check_run(node["run"], file, f"{where}.run", directory, errors)
        out["nodes"][name] = node
    links = data.get("links", [])
    if not isinstance(links, list):
        errors.add(file, "links", "must be an array of tables ([[links]])")
        links = []
    for i, table in enumerate(links):
        where = f"links[{i}]"
        if not isinstance(table, dict):
            errors.add(file, where, "must be a table")
            continue
        for key in table:
            if key not in _LINK_KEYS:
                errors.add(file, f"{where}.{key}", "unknown key")
        link = {k: v for k, v in table.items() if k in _LINK_KEYS}
        link["_where"] = (file, where)
        out["links"].append(link)
    return out


def _check_run(
    value: Any, file: str, where: str, directory: str, errors: _Errors
) -> list[RunCommand]:
    if not isinstance(value, list):
        errors.add(file, where, "must be an array of command strings")
        return []
    cmds: list[RunCommand] = []
    for i, line in enumerate(value):
        if not isinstance(line, str):
            errors.add(file, f"{where}[{i}]", "must be a command string")
            continue
        try:
            argv = shlex.split(line)
        except ValueError as e:
            errors.add(file, f"{where}[{i}]", f"cannot split command: {e}")
            continue
        if not argv:
            errors.add(file, f"{where}[{i}]", "empty command")
            continue
        cmds.append(RunCommand(tuple(_absolute(a, directory) for a in argv), directory))
    return cmds


def _absolute(arg: str, directory: str) -> str:
    """Make `./x`, `../x` and `--opt=./x` absolute against `directory`."""
    prefix, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    if value.startswith(("./", "../")):
        value = str((Path(directory) / value).resolve())
    return f"{prefix}{sep}{value}"


def _link_key(link: dict[str, Any]) -> str | None:
    if isinstance(link.get("name"), str):
        return str(link["name"])
    ends = link.get("endpoints")
    if isinstance(ends, list) and len(ends) == 2 and all(isinstance(e, str) for e in ends):
        return f"{ends[0]}--{ends[1]}"
    return None


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Merge a child's raw table over its parent's (see the module docstring)."""
    out: dict[str, Any] = {
        "nodes": {n: dict(t) for n, t in parent["nodes"].items()},
        "links": [dict(lk) for lk in parent["links"]],
        "file": child["file"],
    }
    for key in ("name", "description"):
        if key in child:
            out[key] = child[key]
        elif key == "description" and key in parent:
            out[key] = parent[key]
    for name, table in child["nodes"].items():
        node = out["nodes"].setdefault(name, {})
        for key, value in table.items():
            old = node.get(key)
            if key in _MERGED_NODE_KEYS and isinstance(old, dict) and isinstance(value, dict):
                node[key] = {**old, **value}
            else:
                node[key] = value
    index = {_link_key(lk): i for i, lk in enumerate(out["links"])}
    for link in child["links"]:
        lkey = _link_key(link)
        if lkey is not None and lkey in index:
            out["links"][index[lkey]] = {**out["links"][index[lkey]], **link}
        else:
            out["links"].append(link)
    return out


# ---------------------------------------------------------------- validation and building


def _build(raw: dict[str, Any], file: str, errors: _Errors) -> Topology | None:
    name = str(raw.get("name") or Path(file).stem)
    links, ports = _build_links(raw["links"], raw["nodes"], errors)
    seen_addr: dict[Any, str] = {}
    nodes: list[Node] = []
    for node_name, table in raw["nodes"].items():
        node = _build_node(node_name, table, ports.get(node_name, []), file, seen_addr, errors)
        if node is not None:
            nodes.append(node)
    if not nodes:
        errors.add(file, "nodes", "a topology needs at least one node")
    if errors.items:
        return None
    return Topology(name=name, file=file, nodes=tuple(nodes), links=tuple(links),
                    description=str(raw.get("description", "")))


def _build_links(
    raw_links: list[dict[str, Any]], nodes: dict[str, Any], errors: _Errors
) -> tuple[list[Link], dict[str, list[str]]]:
    links: list[Link] = []
    ports: dict[str, list[str]] = {}
    used: dict[tuple[str, str], str] = {}
    names: set[str] = set()
    for raw in raw_links:
        file, where = raw["_where"]
        ends = _parse_endpoints(raw.get("endpoints"), nodes, file, where, errors)
        if ends is None:
            continue
        a, b = ends
        name = raw.get("name", f"{a}--{b}")
        if not isinstance(name, str) or not name:
            errors.add(file, f"{where}.name", "must be a non-empty string")
            continue
        if name in names:
            errors.add(file, f"{where}.name", f"duplicate link name {name!r}")
        names.add(name)
        for i, ep in enumerate(ends):
            key = (ep.node, ep.interface)
            if key in used:
                errors.add(file, f"{where}.endpoints[{i}]",
                           f"interface {ep} is already used by link {used[key]!r}")
            else:
                used[key] = name
                ports.setdefault(ep.node, []).append(ep.interface)
        mtu = _check_mtu(raw.get("mtu"), file, f"{where}.mtu", errors)
        impair = _parse_impair(raw.get("impair"), file, f"{where}.impair", errors)
        links.append(Link(name=name, a=a, b=b, mtu=mtu, impair=impair))
    return links, ports


def _parse_endpoints(
    value: Any, nodes: dict[str, Any], file: str, where: str, errors: _Errors
) -> tuple[Endpoint, Endpoint] | None:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        errors.add(file, f"{where}.endpoints", 'must be two "node:interface" strings')
        return None
    out: list[Endpoint] = []
    for i, text in enumerate(value):
        node, sep, ifname = text.partition(":")
        path = f"{where}.endpoints[{i}]"
        if not sep or not node or not ifname:
            errors.add(file, path, f'{text!r} is not "node:interface"')
            continue
        if node not in nodes:
            errors.add(file, path, f"unknown node {node!r}")
            continue
        if _check_ifname(ifname, file, path, errors):
            out.append(Endpoint(node, ifname))
    if len(out) != 2:
        return None
    if out[0].node == out[1].node:
        errors.add(file, f"{where}.endpoints", "a link must join two different nodes")
        return None
    return out[0], out[1]


def _check_ifname(name: str, file: str, path: str, errors: _Errors) -> bool:
    if len(name.encode()) >= IFNAMSIZ:
        errors.add(file, path, f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        return False
    if not _IFNAME.match(name):
        errors.add(file, path, f"bad interface name {name!r} (letters, digits, '_', '-')")
        return False
    return True


def _check_mtu(value: Any, file: str, path: str, errors: _Errors) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 68 <= value <= 65535:
        errors.add(file, path, "mtu must be an integer in 68..65535 (RFC 791 minimum 68)")
        return None
    return value


def _parse_impair(value: Any, file: str, path: str, errors: _Errors) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.add(file, path, "must be a table")
        return None
    try:  # bridge/lab/impair.py is written separately; optional until it exists
        impair = importlib.import_module("bridge.lab.impair")
    except ImportError:
        return dict(value)
    parse = getattr(impair, "parse_impairment", None)
    if parse is None:
        return dict(value)
    try:
        return parse(value, path)
    except ConfigErrors as e:
        for err in e.errors:
            errors.add(file, err.path or path, err.message)
    except ConfigError as e:
        errors.add(file, e.path or path, e.message)
    return None


def _build_node(
    name: str, table: dict[str, Any], ports: list[str], file: str,
    seen_addr: dict[Any, str], errors: _Errors,
) -> Node | None:
    where = f"nodes.{name}"
    ok = True
    if len(name) > MAX_NODE_NAME:
        errors.add(file, where, f"node name longer than {MAX_NODE_NAME} characters: namespace "
                   f"'gb-<instance>-{name}' would exceed {MAX_NS_NAME}")
        ok = False
    elif not _NODE_NAME.match(name):
        errors.add(file, where, "node names use lowercase letters, digits, '_' and '-'")
        ok = False
    kind_text = table.get("kind", "host")
    try:
        kind = NodeKind(kind_text)
    except ValueError:
        errors.add(file, f"{where}.kind", f"must be 'host' or 'bridge', not {kind_text!r}")
        kind, ok = NodeKind.HOST, False
    if kind is NodeKind.BRIDGE and not ports:
        errors.add(file, f"{where}.kind", "a bridge node needs at least one link")
    known = {*ports, "lo"} | ({BRIDGE_IFNAME} if kind is NodeKind.BRIDGE else set())
    addresses = _build_addresses(table.get("addresses", {}), known, file, where, seen_addr, errors)
    routes = _build_routes(table.get("routes", []), known, file, f"{where}.routes", errors)
    sysctl = _build_sysctl(table.get("sysctl", {}), file, f"{where}.sysctl", errors)
    mtu = _build_mtu(table.get("mtu", {}), known, file, f"{where}.mtu", errors)
    run = table.get("run", [])
    if not ok:
        return None
    return Node(name=name, kind=kind, interfaces=tuple(ports), addresses=addresses,
                routes=routes, sysctl=sysctl, mtu=mtu, run=tuple(run))


def _in_lab(addr: IpAddress | IpNetwork) -> bool:
    for net in LAB_NETS:
        if net.version != addr.version:
            continue
        if isinstance(addr, ipaddress.IPv4Network | ipaddress.IPv6Network):
            if addr.subnet_of(net):  # type: ignore[arg-type]
                return True
        elif addr in net:
            return True
    return False


_RANGES = "198.18.0.0/15 or 2001:db8::/32"


def _build_addresses(
    value: Any, known: set[str], file: str, where: str, seen: dict[Any, str], errors: _Errors
) -> tuple[Address, ...]:
    path = f"{where}.addresses"
    if not isinstance(value, dict):
        errors.add(file, path, 'must be a table: {eth0 = ["198.18.1.10/24", ...]}')
        return ()
    out: list[Address] = []
    for ifname, addrs in value.items():
        ipath = f"{path}.{ifname}"
        if ifname not in known:
            has = ", ".join(sorted(known))
            errors.add(file, ipath, f"no such interface on this node (has: {has})")
            continue
        if isinstance(addrs, str):
            addrs = [addrs]
        if not isinstance(addrs, list):
            errors.add(file, ipath, "must be an address string or an array of them")
            continue
        for i, text in enumerate(addrs):
            apath = f"{ipath}[{i}]"
            if not isinstance(text, str) or "/" not in text:
                errors.add(file, apath, f"{text!r} is not ADDRESS/PREFIXLEN")
                continue
            try:
                iface = ipaddress.ip_interface(text)
            except ValueError as e:
                errors.add(file, apath, f"bad prefix {text!r}: {e}")
                continue
            if not _in_lab(iface.ip):
                errors.add(file, apath, f"{text} is outside the lab ranges {_RANGES}")
                continue
            if iface.ip in seen:
                errors.add(file, apath, f"duplicate address {iface.ip} (also at {seen[iface.ip]})")
                continue
            seen[iface.ip] = apath
            out.append(Address(ifname, iface))
    return tuple(out)


def _build_routes(
    value: Any, known: set[str], file: str, where: str, errors: _Errors
) -> tuple[Route, ...]:
    if not isinstance(value, list):
        errors.add(file, where, 'must be an array: [{dst = "default", via = "198.18.1.1"}]')
        return ()
    out: list[Route] = []
    for i, table in enumerate(value):
        path = f"{where}[{i}]"
        if not isinstance(table, dict):
            errors.add(file, path, "must be a table {dst = ..., via = ...}")
            continue
        bad = [k for k in table if k not in _ROUTE_KEYS]
        for k in bad:
            errors.add(file, f"{path}.{k}", "unknown key")
        route = _build_route(table, known, file, path, errors)
        if route is not None and not bad:
            out.append(route)
    return tuple(out)


def _build_route(
    table: dict[str, Any], known: set[str], file: str, path: str, errors: _Errors
) -> Route | None:
    via: IpAddress | None = None
    if "via" in table:
        try:
            via = ipaddress.ip_address(table["via"])
        except ValueError:
            errors.add(file, f"{path}.via", f"bad gateway address {table['via']!r}")
            return None
        if not _in_lab(via):
            errors.add(file, f"{path}.via", f"{via} is outside the lab ranges {_RANGES}")
            return None
    dev = table.get("dev")
    if dev is not None and dev not in known:
        errors.add(file, f"{path}.dev", f"no such interface on this node: {dev!r}")
        return None
    dst_text = table.get("dst")
    if dst_text in ("default", "default6", "default4"):
        version = via.version if via else (6 if dst_text == "default6" else 4)
        dst: IpNetwork = ipaddress.ip_network("::/0" if version == 6 else "0.0.0.0/0")
        if via is None and dev is None:
            errors.add(file, path, "a default route needs `via` or `dev`")
            return None
    else:
        if not isinstance(dst_text, str) or "/" not in dst_text:
            errors.add(file, f"{path}.dst", f"{dst_text!r} is not 'default' or NETWORK/PREFIXLEN")
            return None
        try:
            dst = ipaddress.ip_network(dst_text)
        except ValueError as e:
            errors.add(file, f"{path}.dst", f"bad prefix {dst_text!r}: {e}")
            return None
        if not _in_lab(dst):
            errors.add(file, f"{path}.dst", f"{dst} is outside the lab ranges {_RANGES}")
            return None
    if via is not None and via.version != dst.version:
        errors.add(file, f"{path}.via", f"gateway {via} is not IPv{dst.version} like {dst}")
        return None
    metric = table.get("metric")
    if metric is not None and (type(metric) is not int or metric < 0):
        errors.add(file, f"{path}.metric", "must be a non-negative integer")
        return None
    return Route(dst=dst, via=via, dev=dev, metric=metric)


def _build_sysctl(
    value: Any, file: str, where: str, errors: _Errors
) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        errors.add(file, where, 'must be a table {"net.ipv4.ip_forward" = 1}')
        return ()
    out: list[tuple[str, str]] = []
    for key, val in value.items():
        path = f'{where}."{key}"'
        if not _SYSCTL.match(key) or ".." in key:
            errors.add(file, path, "only net.* sysctls exist per network namespace")
            continue
        if isinstance(val, bool) or not isinstance(val, int | str):
            errors.add(file, path, "value must be an integer or a string")
            continue
        out.append((key, str(val)))
    return tuple(out)


def _build_mtu(
    value: Any, known: set[str], file: str, where: str, errors: _Errors
) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        errors.add(file, where, "must be a table {eth0 = 1400}")
        return ()
    out: list[tuple[str, int]] = []
    for ifname, mtu in value.items():
        if ifname not in known:
            errors.add(file, f"{where}.{ifname}", "no such interface on this node")
            continue
        checked = _check_mtu(mtu, file, f"{where}.{ifname}", errors)
        if checked is not None:
            out.append((ifname, checked))
    return tuple(out)

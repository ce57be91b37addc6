"""Lab topologies: topologies/*.toml -> validated frozen dataclasses (pure, no netlink).

The dataclasses, the lab address ranges and the name limits are bridge/lab/topomodel.py's;
this module reads, merges and checks the files and builds them (`load`).

Rules
-----
- A topology is data, separate from building it (mininet `topo.py` vs `net.py`; containerlab's
  `"node:iface"` endpoints). Only `bridge/lab/netlink.py` applies one to the kernel. Keys: top
  `name`, `description`, `extends`, `[nodes.X]`, `[[links]]`; a node has `kind` ("host";
  "bridge": a Linux bridge br0 enslaves all its link ports; "linux-vm": a Linux kernel in a
  qemu guest, bridge/lab/vm.py), `addresses = {ifname = [prefixes]}`,
  `routes = [{dst = "default" | prefix, via = addr, dev = ifname}]`, `sysctl = {"net.x" = v}`,
  `mtu = {ifname = n}` (over the link's), `run = ["cmd args"]` (processes living until `down`;
  on a linux-vm node, shell lines run in order in the guest, each to completion);
  a link has `endpoints = ["a:ifa", "b:ifb"]`, `name` (default "a:ifa--b:ifb"), `mtu`, and
  `impair = {...}` (given to bridge.lab.impair.parse_impairment(table, path) when it exists).
  topologies/two-sites-plain.toml is the worked example.
- `extends` merges per node: dict-valued keys (addresses, sysctl, mtu) merge entry by entry
  over the parent's, other keys (run, routes, kind) replace them; a child link with a parent
  link's name is merged key by key, other links are appended. So `run` is added by extending.
- `run` lines are split with shlex and remember the directory of the file that defined them:
  the process runs there, and arguments (or `--opt=` values) starting with `./` or `../` are made
  absolute against it. `{lab}` becomes the lab's state directory when the process starts.
- Safety: addresses and routes (destination and gateway) must lie in the lab ranges
  198.18.0.0/15 (RFC 2544 §C.2.2 benchmarking) and 2001:db8::/32 (RFC 3849 documentation).
  Only `net.*` sysctls (the per-namespace ones) are accepted.
- Names: interface names fit IFNAMSIZ (linux/if.h: 15 bytes) and avoid '/', ':' and spaces;
  node names stay short so `gb-<instance>-<node>` stays within MAX_NS_NAME.
- Nothing stops at the first problem: each becomes a ConfigError(file, key path, message) and
  all are raised together as ConfigErrors. Errors name the file that set the key.

Theory of operation
-------------------
`load()` reads the chain child -> extends -> ..., checks each file's keys and shapes, merges the
raw tables root first (recording which file set each node key), then checks the merged result
(endpoints, duplicates, ranges) and builds the dataclasses.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError, ConfigErrors
from bridge.lab.topomodel import (
    BRIDGE_IFNAME,
    IFNAMSIZ,
    LAB_NETS,
    MAX_NODE_NAME,
    MAX_NS_NAME,
    Address,
    Endpoint,
    IpNetwork,
    Link,
    Node,
    NodeKind,
    Route,
    RunCommand,
    Topology,
)

TOPOLOGY_DIR = Path(__file__).resolve().parents[2] / "topologies"

_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_SYSCTL = re.compile(r"^net\.[A-Za-z0-9_.-]+$")

_TOP_KEYS = frozenset({"name", "description", "extends", "nodes", "links"})
_NODE_KEYS = frozenset({"kind", "addresses", "routes", "sysctl", "run", "mtu", "description"})
_MERGED_NODE_KEYS = frozenset({"addresses", "sysctl", "mtu"})
_LINK_KEYS = frozenset({"endpoints", "name", "mtu", "impair"})
_ROUTE_KEYS = frozenset({"dst", "via", "dev"})

# ---------------------------------------------------------------- loading and merging


@dataclass(slots=True)
class _Errors:
    file: str
    items: list[ConfigError] = field(default_factory=list)

    def add(self, path: str, message: str, file: str | None = None) -> None:
        self.items.append(ConfigError(path, message, file=file or self.file))


def resolve_path(name_or_path: str | Path, base: Path = TOPOLOGY_DIR) -> Path:
    """Return the file for a topology name ("two-sites") or path ("x/y.toml")."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in str(name_or_path):
        return p if p.is_absolute() else (Path.cwd() / p)
    return base / f"{p.name}.toml"


def load(name_or_path: str | Path, base: Path = TOPOLOGY_DIR) -> Topology:
    """Load and validate a topology by name or path; raises ConfigErrors listing every problem."""
    path = resolve_path(name_or_path, base).resolve()
    errors = _Errors(str(path))
    raw = _load_chain(path, errors, [])
    topo = _build(raw, errors) if raw is not None else None
    if errors.items or topo is None:
        raise ConfigErrors(errors.items)
    return topo


def _load_chain(path: Path, errors: _Errors, seen: list[Path]) -> dict[str, Any] | None:
    file = str(path)
    if path in seen:
        chain = " -> ".join(str(p) for p in [*seen, path])
        errors.add("extends", f"extends cycle: {chain}", str(seen[-1]))
        return None
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        where = str(seen[-1]) if seen else file
        errors.add("extends" if seen else "", f"topology file not found: {file}", where)
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        errors.add("", f"cannot read: {e}", file)
        return None
    raw = _check_file(data, file, str(path.parent), errors)
    if not isinstance(parent_name := data.get("extends"), str):
        if parent_name is not None:
            errors.add("extends", "must be a topology name or path", file)
        return raw
    parent = _load_chain(resolve_path(parent_name, path.parent).resolve(), errors, [*seen, path])
    return None if parent is None else _merge(parent, raw)


def _check_keys(table: Any, allowed: frozenset[str], where: str, file: str,
                errors: _Errors) -> dict[str, Any] | None:
    if not isinstance(table, dict):
        errors.add(where, "must be a table", file)
        return None
    for key in table:
        if key not in allowed:
            errors.add(f"{where}.{key}" if where else key, "unknown key", file)
    return {k: v for k, v in table.items() if k in allowed}


def _check_file(data: dict[str, Any], file: str, directory: str, errors: _Errors) -> dict[str, Any]:
    """Check one file's keys and shapes; return its raw table (nodes record `_origin` files)."""
    out: dict[str, Any] = {"nodes": {}, "links": []}
    for key, value in (_check_keys(data, _TOP_KEYS, "", file, errors) or {}).items():
        if key in ("name", "description") and not isinstance(value, str):
            errors.add(key, "must be a string", file)
        elif key in ("name", "description"):
            out[key] = value
    nodes = data.get("nodes", {})
    if not isinstance(nodes, dict):
        errors.add("nodes", "must be a table of node tables", file)
        nodes = {}
    for name, table in nodes.items():
        if (node := _check_keys(table, _NODE_KEYS, f"nodes.{name}", file, errors)) is None:
            continue
        if "run" in node:
            node["run"] = _check_run(node["run"], file, f"nodes.{name}.run", directory, errors)
        node["_origin"] = dict.fromkeys(node, file)
        out["nodes"][name] = node
    links = data.get("links", [])
    if not isinstance(links, list):
        errors.add("links", "must be an array of tables ([[links]])", file)
        links = []
    for i, table in enumerate(links):
        if (link := _check_keys(table, _LINK_KEYS, f"links[{i}]", file, errors)) is not None:
            link["_where"] = (file, f"links[{i}]")
            out["links"].append(link)
    return out


def _check_run(
    value: Any, file: str, where: str, directory: str, errors: _Errors
) -> list[RunCommand]:
    if not isinstance(value, list):
        errors.add(where, "must be an array of command strings", file)
        return []
    cmds: list[RunCommand] = []
    for i, line in enumerate(value):
        try:
            argv = shlex.split(line) if isinstance(line, str) else None
        except ValueError as e:
            errors.add(f"{where}[{i}]", f"cannot split command: {e}", file)
            continue
        if not argv:
            errors.add(f"{where}[{i}]", "must be a non-empty command string", file)
            continue
        cmds.append(RunCommand(tuple(_absolute(a, directory) for a in argv), directory, line))
    return cmds


def _absolute(arg: str, directory: str) -> str:
    """Make `./x`, `../x` and `--opt=./x` absolute against `directory`."""
    prefix, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    if value.startswith(("./", "../")):
        value = str((Path(directory) / value).resolve())
    return f"{prefix}{sep}{value}"


def _link_key(link: dict[str, Any]) -> str:
    ends = link.get("endpoints")
    return str(link.get("name") or (f"{ends[0]}--{ends[1]}" if isinstance(ends, list)
                                     and len(ends) == 2 else repr(ends)))


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Merge a child's raw table over its parent's (see the module docstring)."""
    out: dict[str, Any] = {
        "nodes": {n: {**t, "_origin": dict(t["_origin"])} for n, t in parent["nodes"].items()},
        "links": [dict(lk) for lk in parent["links"]],
    }
    out.update({k: child[k] for k in ("name", "description") if k in child})
    out.setdefault("description", parent.get("description", ""))
    for name, table in child["nodes"].items():
        node = out["nodes"].setdefault(name, {"_origin": {}})
        for key, value in table.items():
            old = node.get(key)
            if key == "_origin":
                node[key].update(value)
            elif key in _MERGED_NODE_KEYS and isinstance(old, dict) and isinstance(value, dict):
                node[key] = {**old, **value}
            else:
                node[key] = value
    index = {_link_key(lk): i for i, lk in enumerate(out["links"])}
    for link in child["links"]:
        if _link_key(link) in index:
            i = index[_link_key(link)]
            out["links"][i] = {**out["links"][i], **link}
        else:
            out["links"].append(link)
    return out


# ---------------------------------------------------------------- validation and building


def _build(raw: dict[str, Any], errors: _Errors) -> Topology | None:
    links, ports = _build_links(raw["links"], raw["nodes"], errors)
    seen_addr: dict[Any, str] = {}
    nodes: list[Node] = []
    for name, table in raw["nodes"].items():
        node = _build_node(name, table, ports.get(name, []), seen_addr, errors)
        if node is not None:
            nodes.append(node)
    if not raw["nodes"]:
        errors.add("nodes", "a topology needs at least one node")
    if errors.items:
        return None
    return Topology(name=str(raw.get("name") or Path(errors.file).stem), file=errors.file,
                    nodes=tuple(nodes), links=tuple(links),
                    description=str(raw.get("description", "")))


def _build_links(
    raw_links: list[dict[str, Any]], nodes: dict[str, Any], errors: _Errors
) -> tuple[list[Link], dict[str, list[str]]]:
    links: list[Link] = []
    ports: dict[str, list[str]] = {}
    used: dict[tuple[str, str], str] = {}
    for raw in raw_links:
        file, where = raw["_where"]
        ends = _parse_endpoints(raw.get("endpoints"), nodes, file, where, errors)
        if ends is None:
            continue
        name = raw.get("name", f"{ends[0]}--{ends[1]}")
        if not isinstance(name, str) or not name:
            errors.add(f"{where}.name", "must be a non-empty string", file)
            continue
        if any(lk.name == name for lk in links):
            errors.add(f"{where}.name", f"duplicate link name {name!r}", file)
        for i, ep in enumerate(ends):
            key = (ep.node, ep.interface)
            if key in used:
                errors.add(f"{where}.endpoints[{i}]",
                           f"interface {ep} is already used by link {used[key]!r}", file)
            else:
                used[key] = name
                ports.setdefault(ep.node, []).append(ep.interface)
        mtu = _check_mtu(raw.get("mtu"), f"{where}.mtu", file, errors)
        impair = _parse_impair(raw.get("impair"), f"{where}.impair", file, errors)
        links.append(Link(name=name, a=ends[0], b=ends[1], mtu=mtu, impair=impair))
    return links, ports


def _parse_endpoints(
    value: Any, nodes: dict[str, Any], file: str, where: str, errors: _Errors
) -> tuple[Endpoint, Endpoint] | None:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        errors.add(f"{where}.endpoints", 'must be two "node:interface" strings', file)
        return None
    out: list[Endpoint] = []
    for i, text in enumerate(value):
        node, sep, ifname = text.partition(":")
        path = f"{where}.endpoints[{i}]"
        if not sep or not node or not ifname:
            errors.add(path, f'{text!r} is not "node:interface"', file)
        elif node not in nodes:
            errors.add(path, f"unknown node {node!r}", file)
        elif _check_ifname(ifname, path, file, errors):
            out.append(Endpoint(node, ifname))
    if len(out) != 2:
        return None
    if out[0].node == out[1].node:
        errors.add(f"{where}.endpoints", "a link must join two different nodes", file)
        return None
    return out[0], out[1]


def _check_ifname(name: str, path: str, file: str, errors: _Errors) -> bool:
    ok = len(name.encode()) < IFNAMSIZ and _IFNAME.match(name) is not None
    if not ok:
        errors.add(path, f"bad interface name {name!r}: at most {IFNAMSIZ - 1} bytes of "
                   "letters, digits, '_' and '-'", file)
    return ok


_BAD_MTU = "mtu must be an integer in 68..65535 (RFC 791: at least 68)"


def _check_mtu(value: Any, path: str, file: str, errors: _Errors) -> int | None:
    if value is not None and (type(value) is not int or not 68 <= value <= 65535):
        errors.add(path, _BAD_MTU, file)
        return None
    return value


def _parse_impair(value: Any, path: str, file: str, errors: _Errors) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.add(path, "must be a table", file)
        return None
    try:  # bridge/lab/impair.py is written separately; optional until it exists
        parse = importlib.import_module("bridge.lab.impair").parse_impairment
    except ModuleNotFoundError as e:
        if e.name != "bridge.lab.impair":
            raise
        return dict(value)
    try:
        return parse(value, path)
    except (ConfigError, ConfigErrors) as e:
        for one in e.errors if isinstance(e, ConfigErrors) else [e]:
            errors.add(one.path or path, one.message, file)
    return None


def _build_node(name: str, table: dict[str, Any], ports: list[str], seen_addr: dict[Any, str],
                errors: _Errors) -> Node | None:
    where, origin = f"nodes.{name}", table.get("_origin", {})

    def err(key: str) -> Callable[[str, str], None]:
        file = origin.get(key, next(iter(origin.values()), errors.file))
        return lambda path, msg: errors.add(path, msg, file)

    ok = True
    if len(name) > MAX_NODE_NAME:
        err("")(where, f"node name longer than {MAX_NODE_NAME} characters: namespace "
                f"'gb-<instance>-{name}' would exceed {MAX_NS_NAME}")
        ok = False
    elif not _NODE_NAME.match(name):
        err("")(where, "node names use lowercase letters, digits, '_' and '-'")
        ok = False
    kind_text = table.get("kind", "host")
    try:
        kind = NodeKind(kind_text)
    except ValueError:
        err("kind")(f"{where}.kind",
                    f"must be 'host', 'bridge' or 'linux-vm', not {kind_text!r}")
        kind, ok = NodeKind.HOST, False
    if kind is NodeKind.BRIDGE and not ports:
        err("kind")(f"{where}.kind", "a bridge node needs at least one link")
    known = {*ports, "lo"} | ({BRIDGE_IFNAME} if kind is NodeKind.BRIDGE else set())
    addresses = _build_addresses(table.get("addresses", {}), known, f"{where}.addresses",
                                 seen_addr, err("addresses"))
    routes = _build_routes(table.get("routes", []), known, f"{where}.routes", err("routes"))
    sysctl = _build_sysctl(table.get("sysctl", {}), f"{where}.sysctl", err("sysctl"))
    mtu = _build_mtu(table.get("mtu", {}), known, f"{where}.mtu", err("mtu"))
    if not ok:
        return None
    return Node(name=name, kind=kind, interfaces=tuple(ports), addresses=addresses,
                routes=routes, sysctl=sysctl, mtu=mtu, run=tuple(table.get("run", [])))


Report = Callable[[str, str], None]
_RANGES = "198.18.0.0/15 or 2001:db8::/32"


def _lab_prefix(text: Any, path: str, err: Report, network: bool) -> Any:
    """Parse "ADDR/LEN" (an interface, or a network if `network`) inside the lab ranges."""
    try:
        if not isinstance(text, str) or "/" not in text:
            raise ValueError("not ADDRESS/PREFIXLEN")
        value: Any = ipaddress.ip_network(text) if network else ipaddress.ip_interface(text)
    except ValueError as e:
        err(path, f"bad prefix {text!r}: {e}")
        return None
    net = value if network else value.network
    if not any(n.version == net.version and net.subnet_of(n) for n in LAB_NETS):
        err(path, f"{text} is outside the lab ranges {_RANGES}")
        return None
    return value


def _build_addresses(value: Any, known: set[str], path: str, seen: dict[Any, str],
                     err: Report) -> tuple[Address, ...]:
    if not isinstance(value, dict):
        err(path, 'must be a table: {eth0 = ["198.18.1.10/24", ...]}')
        return ()
    out: list[Address] = []
    for ifname, addrs in value.items():
        ipath = f"{path}.{ifname}"
        addrs = [addrs] if isinstance(addrs, str) else addrs
        if ifname not in known:
            err(ipath, f"no such interface on this node (has: {', '.join(sorted(known))})")
        elif not isinstance(addrs, list):
            err(ipath, "must be an address string or an array of them")
        for i, text in enumerate(addrs if ifname in known and isinstance(addrs, list) else []):
            iface = _lab_prefix(text, f"{ipath}[{i}]", err, network=False)
            if iface is not None and iface.ip in seen:
                err(f"{ipath}[{i}]", f"duplicate address {iface.ip} (also at {seen[iface.ip]})")
            elif iface is not None:
                seen[iface.ip] = f"{ipath}[{i}]"
                out.append(Address(ifname, iface))
    return tuple(out)


def _build_routes(value: Any, known: set[str], where: str, err: Report) -> tuple[Route, ...]:
    if not isinstance(value, list):
        err(where, 'must be an array: [{dst = "default", via = "198.18.1.1"}]')
        return ()
    routes = [_build_route(table, known, f"{where}[{i}]", err) for i, table in enumerate(value)]
    return tuple(r for r in routes if r is not None)


def _build_route(table: Any, known: set[str], path: str, err: Report) -> Route | None:
    if not isinstance(table, dict):
        err(path, "must be a table {dst = ..., via = ...}")
        return None
    for k in (bad := [k for k in table if k not in _ROUTE_KEYS]):
        err(f"{path}.{k}", "unknown key")
    try:
        via = ipaddress.ip_address(table["via"]) if "via" in table else None
    except ValueError:
        err(f"{path}.via", f"bad gateway address {table['via']!r}")
        return None
    if via is not None and _lab_prefix(f"{via}/{via.max_prefixlen}", f"{path}.via", err,
                                       network=True) is None:
        return None
    dev, dst_text = table.get("dev"), table.get("dst")
    if dev is not None and dev not in known:
        err(f"{path}.dev", f"no such interface on this node: {dev!r}")
        return None
    if dst_text in ("default", "default6"):
        if via is None and dev is None:
            err(path, "a default route needs `via` or `dev`")
            return None
        v6 = via.version == 6 if via else dst_text == "default6"
        dst: IpNetwork = ipaddress.ip_network("::/0" if v6 else "0.0.0.0/0")
    elif (dst := _lab_prefix(dst_text, f"{path}.dst", err, network=True)) is None:
        return None
    if via is not None and via.version != dst.version:
        err(f"{path}.via", f"gateway {via} is not IPv{dst.version} like {dst}")
        return None
    return None if bad else Route(dst=dst, via=via, dev=dev)


def _build_sysctl(value: Any, where: str, err: Report) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        err(where, 'must be a table {"net.ipv4.ip_forward" = 1}')
        return ()
    out: list[tuple[str, str]] = []
    for key, val in value.items():
        path = f'{where}."{key}"'
        if not _SYSCTL.match(key) or ".." in key:
            err(path, "only net.* sysctls exist per network namespace")
        elif isinstance(val, bool) or not isinstance(val, int | str):
            err(path, "value must be an integer or a string")
        else:
            out.append((key, str(val)))
    return tuple(out)


def _build_mtu(value: Any, known: set[str], where: str, err: Report) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        err(where, "must be a table {eth0 = 1400}")
        return ()
    out: list[tuple[str, int]] = []
    for ifname, mtu in value.items():
        if ifname not in known:
            err(f"{where}.{ifname}", "no such interface on this node")
        elif type(mtu) is not int or not 68 <= mtu <= 65535:
            err(f"{where}.{ifname}", _BAD_MTU)
        else:
            out.append((ifname, mtu))
    return tuple(out)

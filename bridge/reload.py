"""`grebe reload` / SIGHUP: what changed between the running configuration and the file.

Rules of this module
- A reload never stops the endpoint: SIGHUP is always handled by `grebe up` (the default
  action of SIGHUP is to terminate the process, which `systemctl reload` would then do).
- The file is read and checked in full first (`bridge.config.load_config`, the same checks as
  `check-config`); a file with any error is refused, every error is reported, and the running
  configuration stays as it was.
- A good file is compared with the running one key by key (`diff`), peers matched by name.
  What the running endpoint can take without touching other traffic is applied
  (bridge/reconfig.py for the core, bridge/io/live.py for routes, the TUN MTU and the
  UDP->TUN process): peers added, removed or changed (endpoint, keys, prefixes,
  encapsulation, sequence, liveness, security mode and keys; an unchanged peer keeps its
  sequence numbers, liveness and secure session), mss_clamp, and [[inspect]] rules
  (userspace: new flows follow the new rules; kernel backend: bridge/kernel/run.py re-reads
  them). What truly needs a restart is named,
  one key path each, as "NOT applied, restart to apply" in the log line and in the answer
  of `grebe reload`: the TUN (name, addresses, MTU), the listen sockets, the process layout
  (split_directions, keep_warm, datapath), control_socket, metrics_listen, pmtu;
  the first secure peer of an endpoint started without one (the secure socket), peers of an
  endpoint on the eBPF fast path, and the first
  userspace [[inspect]] rule of an endpoint that had none (one process, ordered TUN
  writes). The peers are applied all or none: never half a set of peers.

Theory of operation: `diff(old, new)` walks the frozen dataclasses of bridge/config.py and
returns sorted key paths ("peers[site-b].key_in", "peers[site-c] (added)", "inspect");
`plan(changes, inspect_live, peers_live)` splits them into (applied, needs_restart).
Pure: no I/O here; bridge/io/live.py `reload_config` reads the file, applies and logs.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from bridge.config import Config, PeerConfig

__all__ = ["diff", "plan", "summary"]

_TOP = ("tun", "listen", "pmtu", "mss_clamp", "keep_warm", "split_directions",
        "control_socket", "metrics_listen", "userspace", "datapath", "hosts_file", "scrub")


def _fields(prefix: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if not hasattr(old, "__dataclass_fields__"):
        return [prefix]
    return [f"{prefix}.{f.name}" for f in fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


def diff(old: Config, new: Config) -> list[str]:
    """Key paths that differ between the running configuration `old` and the file's `new`."""
    out: list[str] = []
    for name in _TOP:
        out += _fields(name, getattr(old, name), getattr(new, name))
    before: dict[str, PeerConfig] = {p.name: p for p in old.peers}
    after: dict[str, PeerConfig] = {p.name: p for p in new.peers}
    for name in sorted(before.keys() - after.keys()):
        out.append(f"peers[{name}] (removed)")
    for name in sorted(after.keys() - before.keys()):
        out.append(f"peers[{name}] (added)")
    for name in sorted(before.keys() & after.keys()):
        out += [p for p in _fields(f"peers[{name}]", before[name], after[name])
                if not p.endswith(".name")]
    if [p.name for p in old.peers if p.name in after] != \
            [p.name for p in new.peers if p.name in before]:
        out.append("peers (order)")
    if old.inspect != new.inspect:
        out.append("inspect")
    return out


LIVE_TOP = ("mss_clamp", "scrub")  # applied by bridge/reconfig.py besides peers and rules


def plan(changes: list[str], inspect_live: bool, peers_live: bool = True
         ) -> tuple[list[str], list[str]]:
    """(applied, needs_restart): `[[inspect]]` changes when `inspect_live` (the caller's
    word: the backends that run can take the new rules, module docstring), every peer
    change and mss_clamp when `peers_live` (the running Bridge takes them,
    bridge/reconfig.py), all peers or none; hosts_file always (the names were looked up
    in it as the file was read); everything else needs a restart."""
    applied = [c for c in changes if (c == "inspect" and inspect_live) or c == "hosts_file"
               or (peers_live and (c.startswith("peers") or c in LIVE_TOP))]
    return applied, [c for c in changes if c not in applied]


def summary(path: str, applied: list[str], restart: list[str]) -> str:
    """The one log line of a good reload."""
    if not applied and not restart:
        return f"reload {path}: no change"
    parts = [f"reload {path}: applied: {', '.join(applied) or 'nothing'}"]
    if restart:
        parts.append(f"NOT applied, restart to apply: {', '.join(restart)}")
    return "; ".join(parts)

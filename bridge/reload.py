"""`grebe reload` / SIGHUP: what changed between the running configuration and the file.

Rules of this module
- A reload never stops the endpoint: SIGHUP is always handled by `grebe up` (the default
  action of SIGHUP is to terminate the process, which `systemctl reload` would then do).
- The file is read and checked in full first (`bridge.config.load_config`, the same checks as
  `check-config`); a file with any error is refused, every error is reported, and the running
  configuration stays as it was.
- A good file is compared with the running one key by key (`diff`), peers matched by name.
  What the running endpoint can take without touching other traffic is applied: today the
  kernel-backend `[[inspect]]` rules (bridge/kernel/run.py re-reads them) and an existing
  peer's keepalive, dead_after and down_action (its other state kept). Every other change
  is named, one key path each, as "needs a restart" in the log line and in the answer of
  `grebe reload`; nothing is applied half-way.

Theory of operation: `diff(old, new)` walks the frozen dataclasses of bridge/config.py and
returns sorted key paths ("peers[site-b].key_in", "peers[site-c] (added)", "inspect");
`plan(changes, kernel_rules)` splits them into (applied, needs_restart). Pure: no I/O here;
bridge/cli.py reads the file, calls these, applies and logs.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from bridge.config import Config, PeerConfig

__all__ = ["diff", "plan", "summary"]

_TOP = ("tun", "listen", "pmtu", "mss_clamp", "keep_warm", "split_directions",
        "control_socket", "metrics_listen", "userspace")


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


LIVENESS = (".keepalive", ".dead_after", ".down_action")  # a peer's, applied in place


def plan(changes: list[str], kernel_rules: bool, live: bool = True
         ) -> tuple[list[str], list[str]]:
    """(applied, needs_restart): `[[inspect]]` changes are applied when `kernel_rules` (the
    caller's word: the kernel backend runs and the userspace rules are unchanged, since the
    running userspace terminator keeps its rules); an existing peer's keepalive, dead_after
    and down_action when `live` (the running Bridge takes them, `Bridge.apply_liveness`:
    timers and liveness are the parent process's alone, bridge/io/split.py); everything
    else needs a restart."""
    applied = [c for c in changes if (c == "inspect" and kernel_rules)
               or (live and c.startswith("peers[") and c.endswith(LIVENESS))]
    return applied, [c for c in changes if c not in applied]


def summary(path: str, applied: list[str], restart: list[str]) -> str:
    """The one log line of a good reload."""
    if not applied and not restart:
        return f"reload {path}: no change"
    parts = [f"reload {path}: applied: {', '.join(applied) or 'nothing'}"]
    if restart:
        parts.append(f"NOT applied, restart to apply: {', '.join(restart)}")
    return "; ".join(parts)

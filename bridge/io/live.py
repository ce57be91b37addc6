"""Applying a reload to a running endpoint (`grebe reload`, SIGHUP; `reload_config` reads
the file, bridge/reload.py decides what is applied): the core, the routes, the TUN MTU, the
sockets' mark and the UDP->TUN process, in that order.

Rules:
- The core first, under the Engine's lock (`Engine.apply`, bridge/reconfig.py): a packet
  sees the old Bridge or the new one, never half of each. Then the routes of the prefixes
  that came and went (bridge/io/tun.py `update_routes`, pyroute2; a /0 by policy routing,
  bridge/io/policy.py): a route added after the core knows its peer (packets it brings are
  routed), removed after the core forgot it (its packets were counted "no_route" in the
  meantime, never sent to the wrong peer).
- A first full-tunnel prefix marks the UDP sockets (SO_MARK `tun.fwmark`) before its
  route exists, so the tunnel's own datagrams never loop into it.
- Split endpoints (bridge/io/split.py): the child is told after the parent
  (`RxProcess.reload`); until it answers it decapsulates with the old peers, as it would
  have a moment before the reload.
- Nothing here raises for a part that fails after the core took the change: it is logged
  and returned as a line of the answer (`grebe reload` shows it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from bridge import reload as rl
from bridge.config import Config, load_config
from bridge.errors import ConfigErrors
from bridge.flows import Backend
from bridge.io.resolve import resolve
from bridge.reconfig import Reconfigured, needs_secure_socket, needs_terminator, reconfigure

log = logging.getLogger("grebe.reload")

__all__ = ["apply_reload", "full_tunnel", "prefixes", "reload_config"]


def prefixes(c: Config) -> set[str]:
    """Every peer prefix of `c`, as route destinations."""
    return {str(n) for p in c.peers for n in p.prefixes}


def full_tunnel(c: Config) -> bool:
    """Some peer owns a /0 (bridge/io/policy.py)."""
    return any(n.prefixlen == 0 for p in c.peers for n in p.prefixes)


def apply_reload(engine: Any, tun: Any, udps: list[Any], old: Config, new: Config
                 ) -> tuple[Reconfigured, list[str]]:
    """Make the running endpoint (`engine`, its `tun`, its UDP sockets `udps`) take the
    peers, [[inspect]] rules and mss_clamp of `new` (the other keys as `old`: the caller
    merged them). Returns what the core did and the problems met after it."""
    problems: list[str] = []
    if full_tunnel(new) and not full_tunnel(old):
        for u in udps:
            if u is not None and hasattr(u, "set_mark"):
                u.set_mark(new.tun.fwmark)
    rx = engine.sibling
    if rx is not None:
        rx.pause()
    now = engine.clock()
    mtu_before = engine.bridge.tun_mtu
    try:
        done: Reconfigured = engine.apply(lambda: reconfigure(engine.bridge, new, now))
    except BaseException:
        if rx is not None:
            rx.resume()
        raise
    if engine.warmer is not None:  # keep-warm's shadow Bridges follow (bridge/io/warm.py)
        engine.warmer.rebuild()
    before, after = prefixes(old), prefixes(new)
    if before != after and hasattr(tun, "update_routes"):
        try:
            tun.update_routes(sorted(after - before), sorted(before - after))
        except Exception as e:  # noqa: BLE001 - pyroute2 NetlinkError, named in the answer
            problems.append(f"routes: {e}")
    if rx is not None:
        err = rx.reload(new, now)
        if err is not None:
            problems.append(err)
    if done.tun_mtu != mtu_before and hasattr(tun, "set_mtu"):
        try:
            tun.set_mtu(done.tun_mtu)
        except OSError as e:
            problems.append(f"TUN MTU {done.tun_mtu}: {e}")
    for p in problems:
        log.error("reload: %s", p)
    log.info("reload: peers kept %s, renewed %s, added %s, removed %s (%.1f ms)",
             ",".join(done.kept) or "-", ",".join(done.renewed) or "-",
             ",".join(done.added) or "-", ",".join(done.removed) or "-",
             (time.monotonic() - now) * 1000 if engine.clock is time.monotonic else 0.0)
    return done, problems


def reload_config(path: str, running: Any, kernel: Any, engine: Any = None, tun: Any = None,
                  udps: list[Any] | None = None) -> tuple[dict[str, Any], Any]:
    """`grebe reload` / SIGHUP (bridge/reload.py): re-read `path`; refuse it with its errors
    (the running configuration stays) or apply what can be applied (bridge/io/live.py) and
    name the rest. Returns (the answer for `grebe reload`, the configuration now running)."""
    try:
        new = load_config(path, resolve)
    except ConfigErrors as e:
        for err in e.errors:
            log.error("%s", err)
        log.error("reload %s refused (%d error(s)): the running configuration stays",
                  path, len(e.errors))
        return {"ok": False, "errors": [str(x) for x in e.errors]}, running
    changes = rl.diff(running, new)

    def rules(c: Any, backend: Backend) -> list[Any]:
        return [r for r in c.inspect_rules() if r.backend is backend]

    bridge = engine.bridge if engine is not None else None
    kernel_same = rules(running, Backend.KERNEL) == rules(new, Backend.KERNEL)
    user_same = rules(running, Backend.USERSPACE) == rules(new, Backend.USERSPACE)
    user_ok = user_same or (bridge is not None and (bridge.terminator is not None
                                                    or not needs_terminator(running, new)))
    inspect_live = user_ok and (kernel_same or kernel is not None)
    sib = engine.sibling if engine is not None else None
    peers_live = (engine is not None and not (engine.bridge.secure is None
                                              and needs_secure_socket(running, new))
                  and getattr(engine, "fast_path", None) is None
                  and (sib is None or len(new.peers) <= sib.shared.capacity))
    applied, restart = rl.plan(changes, inspect_live, peers_live)
    effective = replace(running, peers=new.peers if peers_live else running.peers,
                        mss_clamp=new.mss_clamp if peers_live else running.mss_clamp,
                        inspect=new.inspect if inspect_live else running.inspect,
                        hosts_file=new.hosts_file)
    problems: list[str] = []
    if engine is not None and effective != running:
        try:
            _done, problems = apply_reload(engine, tun, udps or [], running, effective)
        except ValueError as e:  # bridge/reconfig.py refused it, touching nothing
            log.error("reload %s refused: %s; the running configuration stays", path, e)
            return {"ok": False, "errors": [str(e)]}, running
    if kernel is not None and (inspect_live or kernel_same):
        kernel.reload()     # re-reads the file's rules on the backend's own loop (as ever)
    log.info("%s", rl.summary(path, applied, restart))
    return {"ok": True, "applied": applied, "needs_restart": restart,
            **({"problems": problems} if problems else {})}, \
        running if effective == running else effective

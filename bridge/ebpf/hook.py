"""The calls `grebe up` makes for the eBPF fast path (issue 14), and the one it undoes.

`start_for_endpoint(cfg, bridge)` (before the Engine is built, which is given the result as
its `fast_path`) returns (FastPath or None, fatal error or None):
- datapath "python": (None, None), nothing loaded.
- "auto": the fast path if it starts; otherwise one INFO line naming the reason, e.g.
  "datapath auto: eBPF fast path unavailable (load ...: Operation not permitted); using the
  Python path", and (None, None).
- "ebpf": the fast path, or (None, reason) and `grebe up` exits 1.
GREBE_DATAPATH=auto|python|ebpf in the environment overrides the file's key. Endpoints with
[[inspect]] rules run the program too: it passes the inspected flows' packets (both
directions) to the Python path and forwards the rest. (Session 4 kept them on the Python
path under "auto" while their downloads stalled; the cause, TSO super-packets and partial
checksums from a local program reaching the userspace stack, is in docs/DESIGN.md.)
On success the Python path's GRE encoders share its sequence numbers; `run_with(fast,
bridge, engine)` then binds it to the engine's lock and starts its control thread, and the
engine's status and metrics include the program's counters.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from bridge.config import Config, Datapath

log = logging.getLogger("grebe.ebpf")

__all__ = ["start_for_endpoint", "run_with"]


def start_for_endpoint(cfg: Config, bridge: Any) -> tuple[Any, str | None]:
    mode = cfg.datapath
    forced = os.environ.get("GREBE_DATAPATH")  # an override for comparisons (bench, tests)
    if forced:
        try:
            mode = Datapath(forced)
        except ValueError:
            return None, f"GREBE_DATAPATH={forced!r} is not auto, python or ebpf"
        cfg = dataclasses.replace(cfg, datapath=mode)
    if mode is Datapath.PYTHON:
        log.info("datapath python: the Python data plane only")
        return None, None
    if mode is Datapath.AUTO and cfg.scrub:  # the program knows no [[scrub]] rules
        log.info("datapath auto: the Python path, since [[scrub]] rules are configured")
        return None, None
    try:
        from bridge.ebpf.datapath import start

        fast = start(cfg, bridge)
    except Exception as e:  # noqa: BLE001 - every reason is reported the same way
        why = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e)
        if mode is Datapath.EBPF:
            return None, f"datapath ebpf: the eBPF fast path cannot start ({why})"
        log.info("datapath auto: eBPF fast path unavailable (%s); using the Python path", why)
        return None, None
    fast.share_sequence_numbers(bridge)
    log.info("datapath %s: eBPF fast path attached at the ingress of %s", mode.value,
             ", ".join(sorted(fast.attachment.ifnames.values())))
    return fast, None


def run_with(fast: Any, bridge: Any, engine: Any) -> None:
    """The fast path's control thread, under the engine's lock (the Engine was built with
    it as `fast_path`, so status and metrics already merge its counters)."""
    fast.bind(bridge, engine.lock)
    fast.start_thread()

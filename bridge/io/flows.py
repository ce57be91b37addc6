"""`grebe flows` and the running endpoint's side of it (I/O adapter of bridge/userspace/).

Rules
- `attach(engine, ctl)` (called by `grebe up` when the Bridge has a Terminator) registers the
  control-socket command `flows` -> {"flows": [...], "inspect": {...}}, read under the engine's
  lock, and starts a daemon thread that flushes the inspectors' buffered output (log lines,
  pcap) every `interval` seconds, off the data path (bridge/inspect/api.py: hooks never do
  I/O). The returned `detach()` stops the thread, resets every live flow (CloseReason
  SHUTDOWN, the RSTs written through `Engine.call_core`) and closes the inspectors (final
  flush). On a TUN that declares the vnet header (`caps.vnet_hdr`: checksum and TSO
  offload) it tells the Terminator so (`use_tun_offload`): client-leg segments then go out
  as TunFrames. The Engine itself keeps the Terminator's TUN writes in core order across
  threads (`ordered_tun`, bridge/io/loop.py).
- `format_flows(answer)` is the userspace part of the `grebe flows` table (bridge/cli.py owns
  the subcommand): one line per terminated flow, 5-tuple, rule, phase, age, bytes each way,
  and both legs' state / SRTT / RTO / cwnd / retransmissions, then the inspectors attached.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from bridge.io.loop import Engine


class Commands(Protocol):
    def register(self, name: str, fn: Callable[[dict[str, Any]], Any]) -> None: ...


def attach(engine: Engine, ctl: Commands, interval: float = 1.0) -> Callable[[], None]:
    """Wire a running Engine's Terminator to the control socket; returns `detach()`."""
    term = engine.bridge.terminator
    if term is None:
        return lambda: None
    if engine.tun.caps.vnet_hdr:  # TUN_F_CSUM|TSO4|TSO6 (bridge/io/tun.py)
        with engine.lock:
            term.use_tun_offload(parts=engine.tun.caps.frame_parts)  # writev: no join

    def flows(_req: dict[str, Any]) -> dict[str, Any]:
        with engine.lock:
            now = engine.clock()
            return {"flows": term.flows(now), "inspect": term.status()}

    ctl.register("flows", flows)
    stop = threading.Event()

    def flusher() -> None:
        while not stop.wait(interval):     # a timer, not a poll for a condition
            term.flush_inspectors()

    th = threading.Thread(target=flusher, name="inspect-flush", daemon=True)
    th.start()

    def detach() -> None:
        stop.set()
        th.join(timeout=5)
        engine.call_core(term.shutdown)

    return detach


def _leg(info: dict[str, Any] | None) -> str:
    if not info:
        return "-"
    srtt = info.get("srtt")
    srtt_s = f"{srtt * 1000:.1f}ms" if isinstance(srtt, float) and srtt else "-"
    return (f"{info.get('state', '?')} srtt={srtt_s} rto={info.get('rto', 0):.2f}s"
            f" cwnd={info.get('cwnd', 0)} retx={info.get('retransmissions', 0)}"
            f" in={info.get('bytes_in', 0)} out={info.get('bytes_out', 0)}"
            + (f" ecn ce={info.get('ce_marks', 0)} cuts={info.get('ecn_cuts', 0)}"
               if info.get("ecn") else ""))


def format_flows(answer: dict[str, Any]) -> str:
    """The human table of `grebe flows` from the JSON answer."""
    flows = answer.get("flows", [])
    lines = [f"{'id':>5} {'client':<40} {'server':<40} {'rule':<12} {'phase':<10}"
             f" {'age':>8} {'c2s':>11} {'s2c':>11}"]
    for f in flows:
        def ep(addr: str, port: int) -> str:
            return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        lines.append(f"{f['id']:>5} {ep(f['src'], f['sport']):<40} {ep(f['dst'], f['dport']):<40}"
                     f" {f['rule']:<12} {f['phase']:<10} {f['age']:>7.1f}s"
                     f" {f['bytes_c2s']:>11} {f['bytes_s2c']:>11}")
        lines.append(f"      client leg: {_leg(f.get('client_leg'))}")
        lines.append(f"      server leg: {_leg(f.get('server_leg'))}")
        lines.append(f"      inspectors: {', '.join(f.get('inspectors', [])) or '-'}")
    st = answer.get("inspect", {})
    lines.append(f"{len(flows)} flow(s); ended: "
                 + (", ".join(f"{k}={v}" for k, v in sorted(st.get("ended", {}).items()))
                    or "none"))
    return "\n".join(lines)

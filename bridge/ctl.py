"""The commands that ask a running endpoint over its control socket: `grebe status`,
`grebe flows`, `grebe reload` (bridge/io/control.py serves them).

Rules:
- One request, one answer (JSON); no grebe on the socket is one line on stderr and exit 1,
  never a traceback.
- `--json` prints the answer as it came; an answer carrying "error" exits 1 (also with
  `--json`, so scripts see the failure).
- `grebe reload` exits 2 when the endpoint refused the file (every error printed; the
  running configuration stays), 1 when part of a good file could not be applied around the
  core, 0 otherwise; what needs a restart is printed, not failed.

Theory of operation: `ask` is the one client call (bridge/io/control.py `request`);
`format_status` turns the status JSON into the human table, each part where its owner
formats it (the userspace and kernel backends format their own sections).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bridge.errors import EXIT_CONFIG, EXIT_FAILED

__all__ = ["setup", "format_status", "ask", "cmd_status", "cmd_flows", "cmd_reload"]


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-i", "--interface", default="grebe0", help="TUN name (default grebe0)")
    g.add_argument("-s", "--socket", help="control socket (@abstract or path)")


def format_status(st: dict[str, Any]) -> str:
    """The human table of `grebe status` from the JSON answer."""
    tun = st.get("tun", {})
    lines = [f"tun {tun.get('name', '?')}  mtu {tun.get('mtu', '?')}"
             f"  ({tun.get('mtu_source', '')})"]
    if "datapath" in st:  # issue 14: which data path runs (bridge/ebpf/)
        fast = st.get("ebpf") or {}
        lines.append(f"datapath {st['datapath']}" + (
            f"  (program: encap {fast.get('encap', 0)}, decap {fast.get('decap', 0)},"
            f" on {', '.join(fast.get('interfaces', []))})" if fast else ""))
    lines.append(f"{'peer':<14} {'endpoint':<22} {'state':<7} {'seen':>8} {'rx pkts':>9}"
                 f" {'rx bytes':>13} {'tx pkts':>9} {'tx bytes':>13}")
    for p in st.get("peers", []):
        seen = p.get("last_seen_s")
        seen_s = "never" if seen is None else f"{seen:.1f}s"
        lines.append(f"{p.get('name', '?'):<14} {p.get('endpoint', ''):<22}"
                     f" {p.get('state', 'up' if p.get('up') else 'down'):<7} {seen_s:>8}"
                     f" {p.get('rx_packets', 0):>9} {p.get('rx_bytes', 0):>13}"
                     f" {p.get('tx_packets', 0):>9} {p.get('tx_bytes', 0):>13}")
    drops = {k: v for k, v in st.get("drops", {}).items() if v}
    lines.append("drops: " + (", ".join(f"{k}={v}" for k, v in sorted(drops.items()))
                              if drops else "none"))
    for k, r in enumerate(st.get("scrub", [])):  # issue 12: [[scrub]] rules, in order
        match = " ".join(f"{f} {','.join(r[f])}" for f in ("src", "dst") if f in r)
        rate = f" rate {r['rate']:g}/s burst {r['burst']} per {r['bucket']}" if "rate" in r \
            else ""
        lines.append(f"scrub[{k}] {r.get('direction')} {r.get('peer', 'any peer')} "
                     f"{match or 'any'} -> {r.get('action')}{rate}: matched "
                     f"{r.get('matched', 0)}, dropped {r.get('dropped', 0)}")
    events = {k: v for k, v in st.get("events", {}).items() if v}
    if events:
        lines.append("events: " + ", ".join(f"{k}={v}" for k, v in sorted(events.items())))
    sec = st.get("secure")
    if sec:  # issue 12: the secure peers' session, drops and handshake events
        for p in st.get("peers", []):
            if p.get("security", "plain") != "plain":
                ses = p.get("session") or {}
                lines.append(f"secure {p.get('name')}: {p['security']}, session "
                             f"{'up' if ses.get('session') else 'none'}, age "
                             f"{ses.get('session_age')}s, last rx {ses.get('last_rx_age')}s")
        sd = {k: v for k, v in sec.get("drops", {}).items() if v}
        lines.append("secure drops: " + (", ".join(f"{k}={v}" for k, v in sorted(sd.items()))
                                         if sd else "none"))
        se = {k: v for k, v in sec.get("events", {}).items() if v}
        if se:
            lines.append("secure events: " + ", ".join(f"{k}={v}" for k, v in sorted(se.items())))
    io = st.get("io", {})
    if io:
        lines.append("io: " + ", ".join(f"{k}={v}" for k, v in io.items()))
    if "inspect" in st:  # the userspace backend (bridge/userspace/bounds.py)
        from bridge.userspace.bounds import format_status as userspace_status

        lines.append(userspace_status(st["inspect"]))
    if "inspect_kernel" in st:
        from bridge.kernel.info import format_status

        lines.append(format_status(st["inspect_kernel"]))
    return "\n".join(lines)


def ask(args: argparse.Namespace, cmd: str) -> dict[str, Any] | None:
    """One request to the running endpoint's control socket; None (said) when none runs."""
    from bridge.io.control import request, socket_name

    name = args.socket or socket_name(args.interface)
    try:
        answer: dict[str, Any] = request(name, cmd)
    except OSError as e:
        print(f"grebe: no grebe on {name}: {e.strerror or e}", file=sys.stderr)
        return None
    return answer


def cmd_status(args: argparse.Namespace) -> int:
    st = ask(args, "status")
    if st is None:
        return 1
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 1 if "error" in st else 0
    if "error" in st:
        print(f"grebe: {st['error']}", file=sys.stderr)
        return 1
    else:
        print(format_status(st))
    return 0


def cmd_flows(args: argparse.Namespace) -> int:
    """`grebe flows`: the userspace backend's table, then the kernel backend's flows."""
    from bridge.kernel.info import format_flows

    answer = ask(args, "flows")
    if answer is None:
        return 1
    if "error" in answer:
        msg = answer["error"]
        if "unknown command" in msg:
            msg = "this endpoint has no [[inspect]] rule"
        print(f"grebe: {msg}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(format_flows(answer))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """`grebe reload`: the running endpoint re-reads its file (as SIGHUP does) and answers
    what it applied, what needs a restart, or the errors it refused the file for."""
    answer = ask(args, "reload")
    if answer is None:
        return EXIT_FAILED
    if "error" in answer:
        print(f"grebe: {answer['error']}", file=sys.stderr)
        return EXIT_FAILED
    if not answer.get("ok"):
        for err in answer.get("errors", []):
            print(err, file=sys.stderr)
        print("grebe: reload refused, the running configuration stays", file=sys.stderr)
        return EXIT_CONFIG
    print(f"applied: {', '.join(answer.get('applied', [])) or 'nothing'}")
    if answer.get("needs_restart"):
        print(f"not applied, restart to apply: {', '.join(answer['needs_restart'])}")
    for problem in answer.get("problems", []):  # applied to the core, not all around it
        print(f"grebe: reload: {problem}", file=sys.stderr)
    return EXIT_FAILED if answer.get("problems") else 0

"""Interception set-up for the kernel termination backend: nftables TPROXY and policy routing.

Rules
- Everything happens in the current network namespace (the gateway's), never elsewhere.
- nftables through `nft -f -` (nftables is not netlink routing); one table, `inet grebe_tproxy`,
  replaced atomically (one nft transaction: `table; delete table; table {...}`), deleted at exit.
- Policy routing with pyroute2: `fwmark MARK lookup TABLE` for IPv4 and IPv6, and a host-scoped
  `local default dev lo` route in TABLE (kernel Documentation/networking/tproxy.rst), so
  marked packets are delivered to local sockets. Adding what exists and deleting what is gone
  are not errors (a crashed run may have left them).
- A kernel `action = "drop"` rule answers the SYN with `reject with tcp reset` (RFC 9293
  §3.10.7.1, as a closed port would) and counts it in the named counter `rejected`.
- A rule's `iif` list limits it to those input interfaces; without one, the settings' `iifnames`
  (`--iif` of `python -m bridge.kernel`) apply; with neither, every interface.
- `nft_ruleset` is pure and keeps the first-match order of `[[inspect]]` (see relay.py).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bridge.flows import Backend, InspectRule, Verdict


@dataclass(frozen=True, slots=True)
class TproxySettings:
    """Where and how the kernel backend intercepts."""

    port: int = 15001
    mark: int = 0x4754
    table: int = 4754
    rule_priority: int = 4754
    nft_table: str = "grebe_tproxy"
    iifnames: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    flush_interval: float = 1.0
    backlog: int = 1024
    transparent: bool = True        # False only for tests on loopback without privileges


# ---------------------------------------------------------------------------------------------
# nftables ruleset (pure)
# ---------------------------------------------------------------------------------------------

def _set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


REJECTED = "rejected"       # named nft counter of the SYNs the drop rules answered with an RST

# RFC 9293 §3.5: a connection starts with a SYN without ACK. Only that packet is selected: later
# packets of our flows match `socket transparent`, and packets of connections that existed
# before the backend started are forwarded untouched (diverted, the listener would RST them).
_SYN_ONLY = "tcp flags & (fin | syn | rst | ack) == syn"


def _rule_lines(rule: InspectRule, s: TproxySettings, verdict_v4: str,
                verdict_v6: str) -> list[str]:
    lines = []
    quoted = ['"' + n + '"' for n in (rule.iif or s.iifnames)]
    iif = f"iifname {_set(quoted)} " if quoted else ""
    ports = (f"tcp dport {_set([str(a) if a == b else f'{a}-{b}' for a, b in rule.dst_ports])} "
             if rule.dst_ports else "")
    for version, fam, verdict in ((4, "ip", verdict_v4), (6, "ip6", verdict_v6)):
        src = [str(n) for n in rule.src if n.version == version]
        dst = [str(n) for n in rule.dst if n.version == version]
        if (rule.src and not src) or (rule.dst and not dst):
            continue            # the rule has prefixes, none of this family
        nfproto = "ipv4" if version == 4 else "ipv6"
        match = f"meta nfproto {nfproto} meta l4proto tcp {_SYN_ONLY} "
        if src:
            match += f"{fam} saddr {_set(src)} "
        if dst:
            match += f"{fam} daddr {_set(dst)} "
        lines.append(f"        {iif}{match}{ports}{verdict}  # rule {rule.name}")
    return lines


def nft_ruleset(rules: Sequence[InspectRule], s: TproxySettings) -> str:
    """The `nft -f -` input that installs the interception (replacing an old table)."""
    mark = f"0x{s.mark:x}"
    out = [f"table inet {s.nft_table}", f"delete table inet {s.nft_table}",
           f"table inet {s.nft_table} {{",
           f"    counter {REJECTED} {{ }}",
           "    chain prerouting {",
           "        type filter hook prerouting priority mangle; policy accept;",
           # packets of connections we already own (both legs): deliver locally
           f"        meta l4proto tcp socket transparent 1 meta mark set {mark} accept"]
    last_kernel = max((i for i, r in enumerate(rules) if r.backend is Backend.KERNEL),
                      default=-1)
    for rule in rules[:last_kernel + 1]:
        if rule.backend is Backend.KERNEL and rule.action is Verdict.INSPECT:
            v4 = f"tproxy ip to :{s.port} meta mark set {mark} accept"
            v6 = f"tproxy ip6 to :{s.port} meta mark set {mark} accept"
        elif rule.backend is Backend.KERNEL and rule.action is Verdict.DROP:
            # RFC 9293 §3.10.7.1: a SYN to a closed port is answered with <SEQ=0><ACK=SEG.SEQ+
            # SEG.LEN><CTL=RST,ACK>; `reject with tcp reset` does exactly that (a client sees
            # "connection refused" at once instead of retrying its SYN for a minute).
            v4 = v6 = f'counter name "{REJECTED}" reject with tcp reset'
        elif rule.backend is Backend.KERNEL:
            v4 = v6 = "accept"      # action = "forward": a carve-out
        else:
            v4 = v6 = "accept"
        out += _rule_lines(rule, s, v4, v6)
    out += ["    }", "}"]
    return "\n".join(out) + "\n"


def nft_rejected(s: TproxySettings) -> int | None:
    """Packets the drop rules answered with an RST (the named counter), None without a table."""
    cp = subprocess.run(["nft", "-j", "list", "counter", "inet", s.nft_table, REJECTED],
                        capture_output=True, text=True, timeout=10, check=False)
    if cp.returncode != 0:
        return None
    try:
        for item in json.loads(cp.stdout).get("nftables", []):
            if "counter" in item:
                return int(item["counter"]["packets"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def nft_table_exists(s: TproxySettings) -> bool:
    """True when this namespace already has our table (another backend instance runs here)."""
    cp = subprocess.run(["nft", "list", "table", "inet", s.nft_table], capture_output=True,
                        text=True, timeout=10, check=False)
    return cp.returncode == 0


def nft_delete(s: TproxySettings) -> str:
    return f"table inet {s.nft_table}\ndelete table inet {s.nft_table}\n"


def nft_apply(script: str) -> None:
    cp = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True,
                        timeout=30, check=False)
    if cp.returncode != 0:
        raise RuntimeError(f"nft failed: {cp.stderr.strip()}\n--- ruleset ---\n{script}")


# ---------------------------------------------------------------------------------------------
# Policy routing (pyroute2)
# ---------------------------------------------------------------------------------------------

def policy_routing(action: str, s: TproxySettings) -> None:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family, default in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            steps: list[tuple[Any, dict[str, Any]]] = [
                (ipr.rule, dict(family=family, fwmark=s.mark, table=s.table,
                                priority=s.rule_priority)),
                # RTN_LOCAL routes are host-scoped (the kernel refuses scope universe for v4)
                (ipr.route, dict(family=family, dst=default, type="local", table=s.table,
                                 oif=lo, scope=254)),
            ]
            if action == "del":
                steps.reverse()
            for fn, spec in steps:
                try:
                    fn(action, **spec)
                except NetlinkError as exc:
                    # add: EEXIST from a crashed run is fine; del: ENOENT/ESRCH is fine
                    if exc.code not in (17, 2, 3):
                        raise

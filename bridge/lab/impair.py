"""Link impairment for the lab: rate (tc tbf), loss (nftables), delay/jitter/reorder/dup (linkemu).

Rules
-----
- Every setting applies to EACH DIRECTION of a link separately: `delay=20ms` adds 20 ms one
  way, so a ping across the link sees its RTT grow by 40 ms; `loss=2%` loses 2% each way, so a
  round trip fails with probability 1 - 0.98**2 (about 3.96%); `rate=100mbit` caps each
  direction at 100 Mbit/s. Zero (or a missing key) means off.
- Meanings (linkemu.py has the exact rules): jitter draws each frame's delay uniformly from
  [delay - jitter, delay + jitter] (clamped at 0) but never reorders; `reorder=10%` holds 10%
  of frames back until the next frame has passed them (at most 50 ms beyond their due time),
  so a receiver sees about 10% arrive late; `duplicate=1%` sends 1% of frames twice, back to
  back; `seed` makes jitter/reorder/duplicate reproducible (loss uses the kernel's numgen).
- `apply()` replaces whatever impairment the link had (it clears first); `clear()` is
  idempotent and also works from another process (it reads the state file the lab keeps in
  `<lab state dir>/impair/<link>.json` and removes our objects by their fixed names).
- Only the link's own interfaces and objects we create are touched, all inside the lab's
  namespaces: a root qdisc with our handle 6762: (deleted only with that handle), nftables
  tables named `gb_imp_*` / `gb_emu_*`, a clsact qdisc on the emulated interface, a veth pair
  `gbi<hash>a/b`, and one linkemu process started with `lab.popen` (so `destroy()` kills it).
- The unit of every impairment is the kernel's packet (skb), exactly as with netem: on veths
  with TSO/GSO on, a GSO super-frame is lost, delayed or duplicated as one. We leave the
  interfaces' offloads alone (switching tx checksumming off would make UDP_SEGMENT fail).

How each impairment is done (this kernel has no netem)
------------------------------------------------------
- rate: `tc qdisc replace dev IF root handle 6762: tbf` on the egress of both ends; burst is
  4 ms at the rate (at least two frames), the queue holds 100 ms at the rate (tail drop).
- loss: in each end's namespace, a `netdev` table with an ingress chain on the end's interface
  and `numgen random mod 100000 < N drop` (resolution 0.001 %), so both directions lose.
- delay, jitter, reordering, duplication: `bridge/lab/linkemu.py` interposed on ONE end,
  preferring the end on a bridge node (else the second endpoint), both directions:
  egress of IF is redirected (tc clsact + mirred, classic-BPF match "mark != MARK") to a private
  veth A whose peer TAP the emulator reads; the emulator writes delayed frames to IF with MARK.
  Arriving frames are read from IF by the emulator (AF_PACKET sees them before ingress hooks),
  the original is dropped by nftables ("mark != MARK"), and the delayed copy is written to TAP,
  comes up on A and is put into IF's receive path by `mirred ingress redirect`; A has IF's MAC
  so the packet type (host/other host) stays right. The mark is reset to 0 after that check.
  Order per direction: sender's tbf -> emulator delay -> receiver's loss.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError, ConfigErrors
from bridge.lab import procs
from bridge.lab.linkemu import MARK

TBF_HANDLE = "6762:"
KEYS = ("rate", "loss", "delay", "jitter", "reorder", "duplicate", "seed")
_NUM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z%/]*)\s*$")
_RATE_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}  # in Mbit/s (tc's units)
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}  # in ms
# tc: bpf filter "mark != MARK" (ld skb->mark; jeq MARK -> no match; else match).
_NOT_MARKED = f"4,32 0 0 4294963220,21 1 0 {MARK},6 0 0 4294967295,6 0 0 0"
_ANY = "1,6 0 0 4294967295"


@dataclass(frozen=True, slots=True)
class Impairment:
    """One link's impairment, per direction; zero / None means off."""

    rate_mbit: float | None = None
    loss_pct: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder_pct: float = 0.0
    duplicate_pct: float = 0.0
    seed: int = 0

    @property
    def is_off(self) -> bool:
        return not (self.rate_mbit or self.loss_pct or self.needs_emulator)

    @property
    def needs_emulator(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.reorder_pct or self.duplicate_pct)

    def to_table(self) -> dict[str, Any]:
        """The TOML-style table that parse_impairment() turns back into this value."""
        t: dict[str, Any] = {}
        if self.rate_mbit:
            t["rate"] = f"{self.rate_mbit:g}mbit"
        for key, value, unit in (("loss", self.loss_pct, "%"), ("delay", self.delay_ms, "ms"),
                                 ("jitter", self.jitter_ms, "ms"),
                                 ("reorder", self.reorder_pct, "%"),
                                 ("duplicate", self.duplicate_pct, "%")):
            if value:
                t[key] = f"{value:g}{unit}"
        if self.seed:
            t["seed"] = self.seed
        return t

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """Human-readable summary, e.g. "delay 20 ms ± 5 ms, loss 2% (each direction)"."""
        if self.is_off:
            return "off"
        parts = []
        if self.rate_mbit:
            parts.append(f"rate {self.rate_mbit:g} Mbit/s")
        if self.delay_ms or self.jitter_ms:
            jitter = f" ± {self.jitter_ms:g} ms" if self.jitter_ms else ""
            parts.append(f"delay {self.delay_ms:g} ms{jitter}")
        for name, value in (("loss", self.loss_pct), ("reorder", self.reorder_pct),
                            ("duplicate", self.duplicate_pct)):
            if value:
                parts.append(f"{name} {value:g}%")
        if self.needs_emulator:
            parts.append(f"seed {self.seed}")
        return ", ".join(parts) + " (each direction)"


# ---------------------------------------------------------------- parsing


def _split(value: Any, where: str) -> tuple[float, str]:
    if isinstance(value, bool):
        raise ConfigError(where, "must be a number or a string like '20ms', not a boolean")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _NUM.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ConfigError(where, f"cannot read {value!r} as a number with a unit")
    if not math.isfinite(number):
        raise ConfigError(where, f"{value!r} is not a finite number")
    return number, unit


def _rate(value: Any, where: str) -> float | None:
    number, unit = _split(value, where)
    unit = unit.removesuffix("/s")
    if unit.endswith("bps"):
        raise ConfigError(where, f"{value!r}: tc reads 'bps' as BYTES per second; "
                                 "write bits, e.g. '100mbit'")
    if unit == "":
        unit = "mbit"
    if unit not in _RATE_UNITS:
        raise ConfigError(where, f"{value!r}: unknown rate unit (use bit, kbit, mbit, gbit)")
    mbit = number * _RATE_UNITS[unit]
    if mbit == 0:
        return None
    if not 0.008 <= mbit <= 100_000:
        raise ConfigError(where, f"{value!r}: rate must be within 8kbit..100gbit (or 0: off)")
    return mbit


def _time_ms(value: Any, where: str) -> float:
    number, unit = _split(value, where)
    if unit == "":
        unit = "ms"
    if unit not in _TIME_UNITS:
        raise ConfigError(where, f"{value!r}: unknown time unit (use us, ms, s)")
    ms = number * _TIME_UNITS[unit]
    if ms > 10_000:
        raise ConfigError(where, f"{value!r}: at most 10s")
    return ms


def _percent(value: Any, where: str) -> float:
    number, unit = _split(value, where)
    if unit not in ("", "%"):
        raise ConfigError(where, f"{value!r}: write a percentage like '2%'")
    if number > 100:
        raise ConfigError(where, f"{value!r}: a percentage is at most 100%")
    return number


def _seed(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ConfigError(where, f"{value!r}: the seed is an integer in [0, 2**32)")
    return value


def parse_impairment(table: Mapping[str, Any], path: str) -> Impairment:
    """Read an impairment table, e.g. {"rate": "100mbit", "loss": "2%", "delay": "20ms"}.

    Keys: rate (bit/kbit/mbit/gbit, bare number = mbit), loss/reorder/duplicate (percent,
    "2%" or 2), delay/jitter (us/ms/s, bare number = ms), seed (int). Returns an Impairment.
    Raises ConfigError(path.key, problem), or ConfigErrors when several keys are wrong.
    """
    errors: list[ConfigError] = []
    values: dict[str, Any] = {}
    readers = {"rate": ("rate_mbit", _rate), "loss": ("loss_pct", _percent),
               "delay": ("delay_ms", _time_ms), "jitter": ("jitter_ms", _time_ms),
               "reorder": ("reorder_pct", _percent), "duplicate": ("duplicate_pct", _percent),
               "seed": ("seed", _seed)}
    for key, raw in table.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in readers:
            errors.append(ConfigError(where, f"unknown impairment key (use {', '.join(KEYS)})"))
            continue
        attr, reader = readers[key]
        try:
            values[attr] = reader(raw, where)
        except ConfigError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
    return Impairment(**values)


# ---------------------------------------------------------------- applying


@dataclass(frozen=True, slots=True)
class _End:
    node: str
    ifname: str


def _ends(lab: Any, link_name: str) -> tuple[_End, _End, int]:
    """The link's two ends and the index of the end that hosts the emulator."""
    try:
        link = lab.link(link_name)
    except KeyError:
        known = ", ".join(lk.name for lk in lab.topology.links) if lab.topology else "?"
        raise ConfigError("impair", f"no link named {link_name!r} (links: {known})") from None
    ends = (_End(link.a.node, link.a.interface), _End(link.b.node, link.b.interface))
    emu = 1
    if lab.topology is not None:
        kinds = [lab.topology.node(e.node).kind.value for e in ends]
        emu = 0 if kinds[0] == "bridge" and kinds[1] != "bridge" else 1
    return ends[0], ends[1], emu


def _ident(link_name: str) -> str:
    return f"{zlib.crc32(link_name.encode()):08x}"


def _table(prefix: str, link_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_]", "_", link_name)[:40]
    return f"{prefix}_{safe}_{_ident(link_name)}"


def _veth_names(link_name: str) -> tuple[str, str]:
    h = _ident(link_name)[:8]
    return f"gbi{h}a", f"gbi{h}b"


def _state_path(lab: Any, link_name: str) -> Path:
    return Path(lab.state_dir) / "impair" / f"{_table('link', link_name)}.json"


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def _tc(lab: Any, node: str, *args: str, check: bool = True) -> None:
    lab.run(node, ["tc", *args], check=check)


def _mtu(lab: Any, end: _End) -> tuple[int, str]:
    with lab.iproute(end.node) as ipr:
        link = ipr.link("get", ifname=end.ifname)[0]
        return int(link.get_attr("IFLA_MTU")), str(link.get_attr("IFLA_ADDRESS"))


def _apply_rate(lab: Any, end: _End, mbit: float) -> None:
    mtu, _ = _mtu(lab, end)
    rate_bytes = mbit * 1e6 / 8
    burst = max(2 * (mtu + 64), int(rate_bytes * 0.004))
    limit = max(int(rate_bytes * 0.1), 2 * burst)
    _tc(lab, end.node, "qdisc", "replace", "dev", end.ifname, "root", "handle", TBF_HANDLE,
        "tbf", "rate", f"{round(mbit * 1e6)}bit", "burst", str(burst), "limit", str(limit))


def _apply_loss(lab: Any, link_name: str, end: _End, pct: float) -> None:
    threshold = round(pct * 1000)  # numgen mod 100000: 0.001 % steps
    table = _table("gb_imp", link_name)
    lab.nft(end.node, f"""table netdev {table} {{
    chain loss_in {{
        type filter hook ingress device "{end.ifname}" priority -400; policy accept;
        numgen random mod 100000 < {threshold} counter drop
    }}
}}
""")


def _start_emulator(lab: Any, link_name: str, end: _End, imp: Impairment,
                    state: dict[str, Any], path: Path) -> None:
    """Interpose linkemu on `end` (see the module docstring); records itself in `state`."""
    vea, veb = _veth_names(link_name)
    mtu, mac = _mtu(lab, end)
    emu: dict[str, Any] = {"node": end.node, "dev": end.ifname, "veth": [vea, veb]}
    state["emulator"] = emu
    _save(path, state)
    with lab.iproute(end.node) as ipr:
        ipr.link("add", ifname=vea, kind="veth", peer={"ifname": veb})
        for name in (vea, veb):
            lab.sysctl(end.node, f"net.ipv6.conf.{name}.disable_ipv6", 1)
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx, mtu=mtu, **({"address": mac} if name == vea else {}))
            ipr.link("set", index=idx, state="up")
        for name in (vea, veb):
            ipr.poll(ipr.link, "dump", ifname=name, operstate="UP", timeout=10, interval=0.01)
    _tc(lab, end.node, "qdisc", "add", "dev", vea, "clsact")
    _tc(lab, end.node, "filter", "add", "dev", vea, "ingress", "prio", "1", "bpf", "bytecode",
        _ANY, "action", "mirred", "ingress", "redirect", "dev", end.ifname)
    ready = path.with_suffix(".ready")
    stats = path.with_suffix(".stats")
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "bridge.lab.linkemu", "--dev", end.ifname, "--tap", veb,
            "--delay-ms", f"{imp.delay_ms:g}", "--jitter-ms", f"{imp.jitter_ms:g}",
            "--reorder-pct", f"{imp.reorder_pct:g}", "--duplicate-pct",
            f"{imp.duplicate_pct:g}", "--seed", str(imp.seed), "--ready", str(ready),
            "--stats", str(stats)]
    proc = lab.popen(end.node, argv, log=str(path.with_suffix(".log")))
    emu.update(pid=proc.pid, start_time=procs.start_time(proc.pid), stats=str(stats),
               log=str(path.with_suffix(".log")))
    _save(path, state)

    def started() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"linkemu for {link_name} exited with {proc.returncode}; "
                               f"see {path.with_suffix('.log')}")
        return ready.exists()

    lab.wait_for(started, timeout=10, what=f"linkemu of link {link_name} to start")
    # Only now steer traffic through it: no frame is lost while it starts.
    lab.nft(end.node, f"""table netdev {_table('gb_emu', link_name)} {{
    chain dev_in {{
        type filter hook ingress device "{end.ifname}" priority -500; policy accept;
        meta mark != {MARK} drop
        meta mark set 0
    }}
    chain tap_in {{
        type filter hook ingress device "{veb}" priority -500; policy drop;
    }}
}}
""")
    _tc(lab, end.node, "qdisc", "add", "dev", end.ifname, "clsact")
    emu["clsact"] = True  # ours now: clear() may delete it
    _save(path, state)
    _tc(lab, end.node, "filter", "add", "dev", end.ifname, "egress", "prio", "1", "bpf",
        "bytecode", _NOT_MARKED, "action", "mirred", "egress", "redirect", "dev", vea)


def apply(lab: Any, link_name: str, imp: Impairment) -> None:
    """Give `link_name` exactly the impairment `imp` (replacing any it had).

    Raises ConfigError for an unknown link, LabCommandError/OSError if the kernel refuses
    (after removing whatever was half set up).
    """
    a, b, emu_index = _ends(lab, link_name)
    clear(lab, link_name)
    if imp.is_off:
        return
    path = _state_path(lab, link_name)
    state: dict[str, Any] = {"link": link_name, "impairment": imp.to_table(),
                             "ends": [[a.node, a.ifname], [b.node, b.ifname]]}
    _save(path, state)
    try:
        for end in (a, b):
            if imp.rate_mbit:
                _apply_rate(lab, end, imp.rate_mbit)
            if imp.loss_pct:
                _apply_loss(lab, link_name, end, imp.loss_pct)
        if imp.needs_emulator:
            _start_emulator(lab, link_name, (a, b)[emu_index], imp, state, path)
    except BaseException:
        clear(lab, link_name)
        raise


def clear(lab: Any, link_name: str) -> None:
    """Remove every impairment of `link_name`; idempotent. Raises ConfigError if unknown."""
    path = _state_path(lab, link_name)
    state = _load(path) or {}
    if lab.topology is not None:
        a, b, _ = _ends(lab, link_name)
        ends = [a, b]
    else:
        ends = [_End(n, i) for n, i in state.get("ends", [])]
    emu = state.get("emulator")
    if emu:
        node = emu["node"]
        if emu.get("clsact"):
            _tc(lab, node, "qdisc", "del", "dev", emu["dev"], "clsact", check=False)
        lab.run(node, ["nft", "delete", "table", "netdev", _table("gb_emu", link_name)],
                check=False)
        if emu.get("pid"):
            procs.kill_pids({int(emu["pid"]): emu.get("start_time")}, groups=[int(emu["pid"])])
        with lab.iproute(node) as ipr:
            if idx := ipr.link_lookup(ifname=emu["veth"][0]):
                ipr.link("del", index=idx[0])
    for end in ends:
        _tc(lab, end.node, "qdisc", "del", "dev", end.ifname, "root", "handle", TBF_HANDLE,
            check=False)
        lab.run(end.node, ["nft", "delete", "table", "netdev", _table("gb_imp", link_name)],
                check=False)
    for suffix in (".json", ".ready", ".stats"):
        path.with_suffix(suffix).unlink(missing_ok=True)


def current(lab: Any, link_name: str) -> tuple[Impairment, dict[str, Any]]:
    """The impairment in force on `link_name` (from the state file) and its emulator's counters."""
    state = _load(_state_path(lab, link_name)) or {}
    imp = parse_impairment(state.get("impairment", {}), link_name)
    stats: dict[str, Any] = {}
    emu = state.get("emulator") or {}
    if emu.get("stats"):
        stats = _load(Path(emu["stats"])) or {}
    return imp, stats


# ---------------------------------------------------------------- command line

USAGE = """usage: impair LINK [rate=100mbit] [loss=2%] [delay=20ms] [jitter=5ms] [reorder=10%]
                   [duplicate=1%] [seed=7]     set LINK's impairment (keys not given are off)
       impair LINK off                         remove it
       impair [LINK]                           show what is in force
Every setting applies to each direction of the link (delay=20ms adds 40 ms to an RTT)."""


def _show(lab: Any, link_name: str) -> str:
    a, b, emu_index = _ends(lab, link_name)
    imp, stats = current(lab, link_name)
    line = f"{link_name} ({a.node}:{a.ifname} <-> {b.node}:{b.ifname}): {imp.describe()}"
    if not imp.needs_emulator:
        return line
    here, there = (a, b)[emu_index].node, (a, b)[1 - emu_index].node
    emu = (_load(_state_path(lab, link_name)) or {}).get("emulator") or {}
    pid, started = emu.get("pid"), emu.get("start_time")
    if pid is None or procs.start_time(pid) != started or procs.is_zombie(pid):
        return line + f"; emulator in {here} NOT RUNNING (log: {emu.get('log', '?')})"
    line += f"; emulator pid {pid} in {here}"
    for direction, label in (("in", f"{there}->{here}"), ("out", f"{here}->{there}")):
        c = stats.get(direction, {})
        line += (f"; {label}: {c.get('released', 0)} frames, {c.get('reordered', 0)} "
                 f"reordered, {c.get('duplicated', 0)} duplicated, "
                 f"{c.get('dropped_full', 0)} dropped")
    return line


def cli(lab: Any, argv: list[str]) -> int:
    """`netns-lab.sh impair ...` (see USAGE); prints what is in force. Returns an exit status."""
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    try:
        if not argv:
            links = [lk.name for lk in lab.topology.links] if lab.topology else []
            for name in links:
                print(_show(lab, name))
            return 0
        link_name, rest = argv[0], argv[1:]
        if rest == ["off"]:
            clear(lab, link_name)
        elif rest:
            table: dict[str, str] = {}
            for word in rest:
                key, sep, value = word.partition("=")
                if not sep or not key:
                    raise ConfigError(f"impair {link_name}", f"{word!r} is not KEY=VALUE "
                                                             "(or 'off')")
                table[key] = value
            apply(lab, link_name, parse_impairment(table, f"impair {link_name}"))
        print(_show(lab, link_name))
        return 0
    except (ConfigError, ConfigErrors) as e:
        print(f"impair: {e}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2


__all__ = ["Impairment", "apply", "clear", "cli", "current", "parse_impairment"]

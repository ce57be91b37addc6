"""Soak: `./netns-lab.sh soak [--minutes 30] [--mode encrypted] [--instance soak]`.

Rules:
- Two sites (topology two-sites-plain, the two-sites grebe configs with `security = MODE`
  and `sequence = "reorder"`) under a WAN with loss and reordering (bridge/lab/impair.py:
  `--loss`, `--reorder`, `--delay`), mixed traffic for `--minutes`: TCP downloads (curl
  from an http.server), ping v4 and v6, bursts of UDP datagrams to changing ports (new
  flows all the time), and in the secure modes an attacker replaying traffic recorded
  after the warm-up, at once and then once a minute (so also after real rekeys:
  rekey_after_time is 120 s).
  Everything bounded: one transfer at a time, at most --mb MB each.
- Measured per gateway after `--warmup` seconds and at the end: RSS (kB, VmRSS summed
  over grebe and its children, the split receive process included), open fds (the same
  processes), and the table sizes of `grebe status` (secure: key indices, handshake
  rate-limit entries, staged datagrams; per peer: packets held for reordering).
- Fails (exit 1) when RSS or fds grew more than 5 % between the two samples, a table grew
  more than 5 % and more than 4 entries (tables of a few entries move by one or two with
  each rekey), a gateway exited, a round of traffic got nothing through, or a replayed
  marker reached site B (markers sent once each, counted on gw-b's LAN side: more there
  than sent is a replay delivered; fewer, one lost to the WAN's loss).
- Not in CI; tests/lab/test_soak.py runs a short one (about a minute) so the command stays
  exercised. Lab safety: everything inside the lab's namespaces, torn down on exit.

Theory of operation: `run()` brings the lab up, writes keys and configs into its state
dir, starts `grebe up` on both gateways, impairs link wan-a, runs the traffic loop in this
process (each step a bounded `lab.run`), samples at the end of the warm-up and at the end,
prints a table (start, end, growth) and returns the verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from bridge.lab import impair
from bridge.lab.netlink import Lab
from bridge.lab.topology import load

__all__ = ["main", "run", "sample", "grew"]

REPO = Path(__file__).resolve().parents[2]
TOPO = REPO / "topologies"
SERVER4, SERVER6 = "198.18.2.10", "2001:db8:2::10"
HTTP_PORT = 8080
MARKER_PORT = 9999
GROWTH = 0.05  # 5 %
TABLE_SLACK = 4  # entries a table may move by whatever its size

REPLAY = r"""
import socket, struct, sys
data = open(sys.argv[1], "rb").read()
linktype = struct.unpack_from("<I", data, 20)[0]
skip = 14 if linktype == 1 else 16 if linktype == 113 else 0
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
pos, n = 24, 0
while pos + 16 <= len(data):
    incl = struct.unpack_from("<I", data, pos + 8)[0]
    frame = data[pos + 16:pos + 16 + incl]
    pos += 16 + incl
    ip = bytearray(frame[skip:])
    if len(ip) >= 28 and ip[0] >> 4 == 4 and ip[9] == 17:
        ihl = (ip[0] & 15) * 4  # recorded before the NIC's checksum offload filled it in:
        ip[ihl + 6:ihl + 8] = bytes(2)  # no UDP checksum (RFC 768: zero, allowed over IPv4)
        try:  # a UDP GSO burst is recorded unsegmented: too long to send, skipped
            s.sendto(ip, (socket.inet_ntoa(ip[16:20]), 0))
            n += 1
        except OSError:
            pass
print(n)
"""


def _grebe() -> str:
    beside = Path(sys.executable).parent / "grebe"
    return str(beside) if beside.exists() else "grebe"


def configs(lab: Lab, mode: str) -> dict[str, Path]:
    """The two-sites configs with `security = mode` (keys written here) and reordering."""
    from bridge.secure.keys import write_private_key

    d = lab.state_dir
    pubs: dict[str, str] = {}
    if mode != "plain":
        for node in ("gw-a", "gw-b"):
            key = d / f"soak-{node}.key"
            key.unlink(missing_ok=True)
            pubs[node] = write_private_key(str(key))
    out: dict[str, Path] = {}
    for node, other, ep in (("gw-a", "gw-b", "198.18.0.2"), ("gw-b", "gw-a", "198.18.0.1")):
        text = (TOPO / "two-sites" / f"{node}.toml").read_text()
        text = text.replace('sequence = "drop-late"', 'sequence = "reorder"')
        if mode != "plain":
            text = text.replace(f'endpoint = "{ep}:4754"', f'endpoint = "{ep}"')
            text += (f'security = "{mode}"\nprivate_key_file = "{d / f"soak-{node}.key"}"\n'
                     f'public_key = "{pubs[other]}"\n')
        p = d / f"soak-{node}.toml"
        p.write_text(text)
        out[node] = p
    return out


def status(lab: Lab, node: str) -> dict[str, Any] | None:
    cp = lab.run(node, [_grebe(), "status", "--json"], check=False, timeout=20)
    try:
        return json.loads(cp.stdout) if cp.returncode == 0 else None
    except ValueError:
        return None


def _tree(root: int) -> list[int]:
    """`root` and its descendants (the split receive process is a child)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def sample(lab: Lab, node: str, pid: int) -> dict[str, int]:
    """RSS (kB), open fds and table sizes of the grebe process tree `pid` on `node`."""
    rss = fds = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                m = re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M)
            rss += int(m.group(1)) if m else 0
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    s: dict[str, int] = {"rss_kb": rss, "fds": fds}
    st = status(lab, node) or {}
    for k, v in ((st.get("secure") or {}).get("tables") or {}).items():
        s[f"secure.{k}"] = int(v)
    s["reorder_held"] = sum(int(p.get("sequence", {}).get("held", 0))
                            for p in st.get("peers", []))
    if "inspect" in st:
        s["flows"] = len(st["inspect"].get("flows", []) or [])
    return s


def grew(name: str, start: int, end: int) -> bool:
    """True if `end` is too much more than `start` (module docstring)."""
    if name in ("rss_kb", "fds"):
        return end > start * (1 + GROWTH)
    return end > start * (1 + GROWTH) and end - start > TABLE_SLACK


def _send_marker(lab: Lab) -> None:
    lab.run("client", ["python3", "-c", "import socket; s=socket.socket(2, 2); "
                       f"s.sendto(b'SOAKMARKER', ('{SERVER4}', {MARKER_PORT}))"])


def _markers(path: Path) -> int:
    try:
        return path.read_bytes().count(b"SOAKMARKER")
    except OSError:
        return 0


def _traffic_step(lab: Lab, i: int, mb: int) -> bool:
    """One round of mixed traffic; True if the tunnel carried it."""
    ok = True
    if i % 3 == 0:
        cp = lab.run("client", ["curl", "-sf", "--max-time", "60", "-o", "/dev/null",
                                "-w", "%{size_download}",
                                f"http://{SERVER4}:{HTTP_PORT}/blob{mb}"],
                     check=False, timeout=90)
        ok = cp.returncode == 0
    dst = SERVER6 if i % 2 else SERVER4
    cp = lab.run("client", ["ping", "-c", "10", "-i", "0.05", "-W", "1", "-q", dst],
                 check=False, timeout=30)
    ok = ok and (cp.returncode == 0)  # some replies lost under loss is fine; none is not
    base = 20000 + (i * 97) % 30000
    lab.run("client", ["python3", "-c",
                       "import socket; s=socket.socket(2, 2)\n"
                       f"for p in range({base}, {base + 50}):\n"
                       f"    s.sendto(b'u' * 200, ('{SERVER4}', p))"], check=False)
    return ok


def run(minutes: float, mode: str, instance: str, warmup: float, loss: str, reorder: str,
        delay: str, mb: int = 2, out: Any = sys.stdout) -> int:
    """The soak; 0 if nothing grew (module docstring), 1 otherwise."""
    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    lab = Lab.up(load("two-sites-plain"), instance=instance, start=False)
    procs: dict[str, subprocess.Popen[Any]] = {}
    try:
        d = lab.state_dir
        www = d / "www"
        www.mkdir(exist_ok=True)
        (www / f"blob{mb}").write_bytes(hashlib.sha256(b"soak").digest() * (mb << 15))
        lab.popen("server", ["python3", "-m", "http.server", str(HTTP_PORT), "--bind", "::",
                             "--directory", str(www)], log=str(d / "http.log"))
        cfgs = configs(lab, mode)
        for node, cfg in cfgs.items():
            procs[node] = lab.popen(node, [_grebe(), "up", "-c", str(cfg)],
                                    log=str(d / f"soak-grebe-{node}.log"))
        for node in procs:
            lab.wait_for(partial(status, lab, node), 20, f"grebe on {node}")
        lab.wait_for(lambda: lab.run("client", ["ping", "-c", "1", "-W", "1", SERVER4],
                                     check=False).returncode == 0, 20, "the tunnel")
        impair.apply(lab, "wan-a", impair.parse_impairment(
            {"loss": loss, "reorder": reorder, "delay": delay, "seed": 7}, "soak wan-a"))
        say(f"soak: {mode}, {minutes:g} min after {warmup:g} s warm-up, wan-a loss {loss} "
            f"reorder {reorder} delay {delay}")
        lan = d / "soak-lan-b.pcap"
        lan_cap = lab.popen("gw-b", ["tcpdump", "-i", "lan0", "-n", "-U", "--immediate-mode",
                                     "-w", str(lan),
                                     f"udp port {MARKER_PORT}"], log=str(d / "tcpdump-lan.log"))
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < warmup:
            _traffic_step(lab, i, mb)
            i += 1
        start = {n: sample(lab, n, p.pid) for n, p in procs.items()}
        # record what the attacker replays later: markers sealed after the warm-up
        wan = d / "soak-wan-b.pcap"
        secure = mode != "plain"
        markers_sent = 0
        if secure:
            cap = lab.popen("gw-b", ["tcpdump", "-i", "wan0", "-n", "-U", "--immediate-mode",
                                     "-w", str(wan),
                                     "udp and src host 198.18.0.1"],
                            log=str(d / "tcpdump-wan.log"))
            lab.wait_for(lambda: "listening on" in (d / "tcpdump-wan.log").read_text(), 10,
                         "tcpdump on gw-b wan0")
            for _ in range(3):
                _send_marker(lab)
                markers_sent += 1
                _traffic_step(lab, 1, mb)
            cap.send_signal(signal.SIGINT)
            cap.wait(timeout=10)
            (d / "replay.py").write_text(REPLAY)
        t1 = time.monotonic()
        failures: list[str] = []
        replays = replayed = 0
        last_replay = t1 - 60  # the first replay at once, then one a minute
        last_print = t1
        while time.monotonic() - t1 < minutes * 60:
            if not _traffic_step(lab, i, mb):
                failures.append(f"traffic step {i} failed at {time.monotonic() - t1:.0f} s")
            i += 1
            for n, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"grebe on {n} exited {p.returncode}")
            now = time.monotonic()
            if secure and now - last_replay >= 60:
                cp = lab.run("attacker", ["python3", str(d / "replay.py"), str(wan)],
                             timeout=60)
                replayed += int(cp.stdout.strip() or 0)
                replays += 1
                last_replay = now
            if now - last_print >= 300:
                last_print = now
                s = sample(lab, "gw-b", procs["gw-b"].pid)
                say(f"  {(now - t1) / 60:5.1f} min: gw-b {s}")
        end = {n: sample(lab, n, p.pid) for n, p in procs.items()}
        time.sleep(1)  # the last marker capture flushes (-U: per packet)
        lan_cap.send_signal(signal.SIGINT)
        lan_cap.wait(timeout=10)
        delivered = _markers(lan)
        say(f"{'gateway':8} {'measure':22} {'start':>10} {'end':>10} {'growth':>8}")
        for n in procs:
            for k in sorted(set(start[n]) | set(end[n])):
                a, b = start[n].get(k, 0), end[n].get(k, 0)
                g = f"{(b - a) / a * 100:+.1f}%" if a else ("0" if a == b else f"+{b}")
                bad = grew(k, a, b)
                say(f"{n:8} {k:22} {a:>10} {b:>10} {g:>8}{'  GREW' if bad else ''}")
                if bad:
                    failures.append(f"{n} {k} grew {a} -> {b}")
        st = status(lab, "gw-b") or {}
        sd = (st.get("secure") or {}).get("drops") or {}
        if secure and replays and not sum(sd.values()):
            failures.append("the replays were not counted by gw-b: did they arrive?")
        say(f"traffic rounds {i}; replays of the recorded capture {replays} ({replayed} "
            f"datagrams); markers sent "
            f"{markers_sent}, seen on gw-b lan0 {delivered}; gw-b secure drops "
            f"{ {k: v for k, v in sd.items() if v} }; rekeys "
            f"{(st.get('secure') or {}).get('events', {}).get('rekey', 0)}")
        if secure and delivered > markers_sent:  # fewer: one lost to the WAN's loss
            failures.append(f"{delivered} markers on site B for {markers_sent} sent: "
                            "a replay was delivered")
        for f in failures:
            say(f"FAIL: {f}")
        say("soak: " + ("FAILED" if failures else "passed"))
        return 1 if failures else 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
        lab.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netns-lab.sh soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the first sample")
    ap.add_argument("--mode", choices=("plain", "authenticated", "encrypted"),
                    default="encrypted")
    ap.add_argument("--instance", "-i", default="soak")
    ap.add_argument("--loss", default="1%")
    ap.add_argument("--reorder", default="5%")
    ap.add_argument("--delay", default="2ms")
    ap.add_argument("--mb", type=int, default=2, help="size of each download (MB)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("netns-lab soak: must run as root (network namespaces need it)")
        return 2
    return run(a.minutes, a.mode, a.instance, a.warmup, a.loss, a.reorder, a.delay, a.mb)


if __name__ == "__main__":
    sys.exit(main())

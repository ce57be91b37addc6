"""The inspection part of `./netns-lab.sh demo`: a TCP flow terminated inside grebe, shown live.

`checks(lab)` expects a lab of topology `two-sites-inspect` (or `two-sites-inspect-kernel`):
grebe on both gateways, gw-a terminating TCP to the server's ports 80 and 22 with the `log` and
`http` inspectors, and `python -m http.server 80` on the server serving the lab's state dir.
The steps: wait for grebe; start a rate-limited download so that a flow is live, and show it in
`grebe flows` with both legs' TCP internals (userspace backend only: the kernel backend's flows
belong to the kernel); download a file at full speed with its sha256 checked; show the flow log
(one JSON line per flow, with the HTTP request line the `http` inspector saw).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from bridge.lab.demo_bridge import grebe_ready, say
from bridge.lab.netlink import Lab

SERVER = "198.18.2.10"
SIZE_MB = 20
LOG_NAME = "inspect-gw-a.jsonl"


def _blob(lab: Lab) -> str:
    """Write the file the server serves; return its sha256."""
    h = hashlib.sha256()
    with open(Path(lab.state_dir) / "inspect-blob", "wb") as f:
        for _ in range(SIZE_MB):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def _flows(lab: Lab) -> list[dict[str, object]]:
    cp = lab.run("gw-a", ["grebe", "flows", "--json"], check=False)
    if cp.returncode != 0:
        return []
    flows = json.loads(cp.stdout).get("flows", [])
    return flows if isinstance(flows, list) else []


def _live_flow(lab: Lab, userspace: bool) -> bool:
    """A slow download keeps one inspected flow open while `grebe flows` shows it."""
    if not userspace:
        say("  [ok        ] kernel backend: its flows are kernel sockets (see the log below)")
        return True
    slow = lab.popen("client", ["curl", "-s", "-o", "/dev/null", "--limit-rate", "4M",
                                f"http://{SERVER}/inspect-blob"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lab.wait_for(lambda: any(f.get("bytes_s2c", 0) for f in _flows(lab)), 15,
                     "a live inspected flow in `grebe flows`")
        table = lab.run("gw-a", ["grebe", "flows"], check=False).stdout
        say("  [ok        ] a rate-limited download, live in `grebe flows` on gw-a:")
        for line in table.rstrip().splitlines():
            say(f"      {line}")
        return True
    except TimeoutError as e:
        say(f"  [UNEXPECTED] {e}")
        return False
    finally:
        slow.kill()
        slow.wait()


def _download(lab: Lab, digest: str) -> bool:
    out = Path(lab.state_dir) / "inspect-download"
    cp = lab.run("client", ["curl", "-s", "-o", str(out), "-w", "%{speed_download}",
                            f"http://{SERVER}/inspect-blob"], check=False, timeout=120)
    got = hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else "-"
    ok = cp.returncode == 0 and got == digest
    speed = float(cp.stdout or 0) / 1e6
    say(f"  [{'ok' if ok else 'UNEXPECTED':10}] client <- http://{SERVER}/inspect-blob through "
        f"the inspected flow: {SIZE_MB} MB at {speed:.0f} MB/s, sha256 "
        + ("matches" if got == digest else "DIFFERS"))
    out.unlink(missing_ok=True)
    return ok


def _flow_log(lab: Lab) -> bool:
    path = Path(lab.state_dir) / LOG_NAME

    def lines() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    try:  # the log inspector writes a line when a flow ends; grebe flushes on a timer
        lab.wait_for(lambda: any("/inspect-blob" in ln and '"closed"' in ln for ln in lines()),
                     15, f"the flow log {path}")
    except TimeoutError as e:
        say(f"  [UNEXPECTED] {e}")
        return False
    say(f"  [ok        ] flow log {path} (one JSON line per flow):")
    for line in lines()[-3:]:
        rec = json.loads(line)
        req = (rec.get("http") or [{}])[0]
        say(f"      {rec['src']}:{rec['sport']} -> {rec['dst']}:{rec['dport']}  "
            f"{rec['close']:8} {rec['bytes_c2s']}/{rec['bytes_s2c']} B  {rec['duration']:.2f}s  "
            f"\"{req.get('method', '?')} {req.get('target', '?')}\" -> {req.get('status', '?')}")
    return True


def checks(lab: Lab) -> list[Callable[[], bool]]:
    """The demo's inspection steps, for `demo(topology, instance, checks)`."""
    userspace = "kernel" not in (lab.topology.name if lab.topology else "")
    digest: list[str] = []
    return [
        lambda: grebe_ready(lab),
        lambda: digest.append(_blob(lab)) is None,
        lambda: _live_flow(lab, userspace),
        lambda: _download(lab, digest[0]),
        lambda: _flow_log(lab),
    ]

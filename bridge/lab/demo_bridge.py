"""The bridge part of `./netns-lab.sh demo`: grebe joining the two sites, shown step by step.

`run(lab)` expects a lab of topology `two-sites` (or `two-sites-ipip`), whose gateways start
`grebe up` from their `run` lines. It waits for both control sockets, pings site B from site A
over IPv4 and IPv6, downloads a file from the server to the client (sha256 checked, MB/s
shown), and prints `grebe status` from both ends. Returns True when everything worked.
`checks(lab)` gives the same steps as the demo's check list (`demo(checks=...)`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

from bridge.lab.netlink import Lab

SERVER4, SERVER6 = "198.18.2.10", "2001:db8:2::10"
PORT = 8080
SIZE_MB = 50


def say(msg: str = "") -> None:
    print(msg, flush=True)


def grebe_ready(lab: Lab) -> bool:
    try:
        for node in ("gw-a", "gw-b"):
            def answers(n: str = node) -> bool:
                return lab.run(n, ["grebe", "status", "--json"], check=False).returncode == 0

            lab.wait_for(answers, timeout=20, what=f"grebe on {node}")
    except TimeoutError as e:
        say(f"  [UNEXPECTED] {e}")
        return False
    say("  [ok        ] grebe is up on gw-a and gw-b")
    return True


def _ping(lab: Lab, dst: str, what: str) -> bool:
    cp = lab.run("client", ["ping", "-c", "3", "-i", "0.2", "-W", "2", dst], check=False)
    rtt = cp.stdout.strip().splitlines()[-1] if cp.returncode == 0 else "no reply"
    say(f"  [{'ok' if cp.returncode == 0 else 'UNEXPECTED':10}] client -> {dst:16} {what}: {rtt}")
    return cp.returncode == 0


def _download(lab: Lab, host: str) -> bool:
    d = lab.state_dir / "demo-www"
    blob = d / "blob"
    if not blob.exists():
        d.mkdir(exist_ok=True)
        h = hashlib.sha256()
        with open(blob, "wb") as f:
            for _ in range(SIZE_MB):
                chunk = os.urandom(1 << 20)
                h.update(chunk)
                f.write(chunk)
        (d / "blob.sha256").write_text(h.hexdigest())
        lab.popen("server", ["python", "-m", "http.server", str(PORT), "--bind", "::",
                             "--directory", str(d)], log=str(lab.state_dir / "demo-http.log"))
        lab.wait_for(lambda: lab.run("server", ["curl", "-sfI", f"http://127.0.0.1:{PORT}/"],
                                     check=False).returncode == 0, timeout=15,
                     what="http server on server")
    want = (d / "blob.sha256").read_text()
    url = f"http://[{host}]:{PORT}/blob" if ":" in host else f"http://{host}:{PORT}/blob"
    t0 = time.monotonic()
    cp = lab.run("client", ["sh", "-c", f"curl -gsf --max-time 120 {url} | sha256sum"],
                 check=False, timeout=130)
    dt = time.monotonic() - t0
    ok = cp.returncode == 0 and cp.stdout.split()[:1] == [want]
    say(f"  [{'ok' if ok else 'UNEXPECTED':10}] client <- {url}: {SIZE_MB} MB in {dt:.1f} s"
        f" ({SIZE_MB / dt:.0f} MB/s), sha256 {'matches' if ok else 'DIFFERS'}")
    return ok


def _status(lab: Lab, node: str) -> bool:
    cp = lab.run(node, ["grebe", "status"], check=False)
    say(f"\n  grebe status on {node}:")
    for line in (cp.stdout or cp.stderr).splitlines():
        say(f"    {line}")
    return cp.returncode == 0


def checks(lab: Lab) -> list[Callable[[], bool]]:
    """The steps of the bridge demo, each returning True when it went as expected."""
    return [
        lambda: grebe_ready(lab),
        lambda: _ping(lab, SERVER4, "IPv4 through grebe"),
        lambda: _ping(lab, SERVER6, "IPv6 through grebe"),
        lambda: _download(lab, SERVER4),
        lambda: _download(lab, SERVER6),
        lambda: _status(lab, "gw-a"),
        lambda: _status(lab, "gw-b"),
    ]


def run(lab: Lab) -> bool:
    """Run every step (even after a failure, to show as much as possible); True if all passed."""
    say("\n== grebe: site A <-> site B through the bridge")
    results = [step() for step in checks(lab)]
    return all(results)

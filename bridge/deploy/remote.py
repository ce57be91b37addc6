"""`grebe deploy INVENTORY ACTION`: push, start, stop, restart and show grebe on N hosts over SSH.

Rules
- asyncssh, all hosts concurrently, key authentication only, host keys checked against the
  inventory's `known_hosts` (an unknown or changed key is refused, never learned). Each host
  ends with one line: what changed and what runs, or one clear reason it failed
  (unreachable, authentication refused, host key not verified, start failed with the tail of
  the remote log). The exit status is 0 only when every host succeeded.
- Idempotent: the release is pushed only when `<dir>/releases/<sha256>` is missing, the
  endpoint file only when its SHA-256 differs, and `up` restarts a running endpoint only when
  its release or its file changed. A second `up` with nothing changed changes nothing.
- Remote layout: `<dir>/releases/<sha>/{bridge,stack}`, `<dir>/current` -> that release,
  `<dir>/run/<name>.pid`, `<dir>/log/<name>.log`, `<config_dir>/<name>.toml`. The endpoint runs
  detached (setsid) as `PYTHONPATH=<dir>/current <python> -m bridge up -c <file>`; `stop`
  sends SIGTERM (grebe removes its routes and TUN) and waits for the exit.
- Progress goes to `say` (stderr) as each step happens; nothing here prints the tables.

Theory of operation: `run_deploy(inventory, action, say)` packs the release once
(bridge/deploy/inventory.py `release`), then `asyncio.gather`s one `_Host.run` per host; each
opens one SSH connection and issues shell commands (`test`, `tar`, `sha256sum`, `kill`, `tail`)
whose arguments are quoted with `shlex.quote`.
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.deploy.inventory import Host, Inventory, release

with warnings.catch_warnings():  # asyncssh still names DSA, which `cryptography` deprecates
    warnings.simplefilter("ignore")
    import asyncssh

__all__ = ["ACTIONS", "HostResult", "run_deploy"]

ACTIONS = ("up", "push", "start", "stop", "restart", "status")
START_WAIT = 20.0   # seconds for a started endpoint to answer `grebe status`
STOP_WAIT = 10.0
Say = Callable[[str], None]


@dataclass(slots=True)
class HostResult:
    """What happened on one host: `ok`, the changes made, and a one-line summary or error."""

    name: str
    ok: bool = True
    changes: list[str] = field(default_factory=list)
    summary: str = ""
    status: dict[str, Any] | None = None


class _Failed(Exception):
    """A step on one host failed; the message is that host's one line."""


class _Host:
    def __init__(self, host: Host, sha: str, blob: bytes, say: Say) -> None:
        self.h = host
        self.sha = sha
        self.blob = blob
        self.say = say
        self.res = HostResult(host.name)
        self.conn: Any = None
        d = host.dir
        self.pidfile = f"{d}/run/{host.name}.pid"
        self.logfile = f"{d}/log/{host.name}.log"
        self.env = f"PYTHONPATH={shlex.quote(d + '/current')}"

    async def sh(self, cmd: str, data: bytes | None = None, check: bool = True) -> Any:
        r = await self.conn.run(cmd, input=data, encoding=None if data is not None else "utf-8",
                                check=False)
        if check and r.exit_status != 0:
            err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
            raise _Failed(f"`{cmd.split()[0]}` failed on the host: {(err or '').strip()[:200]}")
        return r

    # -- steps ------------------------------------------------------------------------

    async def push(self) -> bool:
        """Release and endpoint file; True when either changed."""
        h, q = self.h, shlex.quote
        rel = f"{h.dir}/releases/{self.sha}"
        changed = False
        if (await self.sh(f"test -d {q(rel)}", check=False)).exit_status != 0:
            tmp = f"{rel}.tmp"
            await self.sh(f"rm -rf {q(tmp)} && mkdir -p {q(tmp)} && tar -x -C {q(tmp)}",
                          data=self.blob)
            await self.sh(f"mv {q(tmp)} {q(rel)}")
            self.res.changes.append(f"release {self.sha[:12]} pushed")
            changed = True
        cur = (await self.sh(f"readlink {q(h.dir + '/current')}", check=False)).stdout.strip()
        if cur != rel:
            link = f"{h.dir}/current.tmp"
            await self.sh(f"ln -sfn {q(rel)} {q(link)} && mv -T {q(link)} {q(h.dir + '/current')}")
            if not changed:
                self.res.changes.append(f"release {self.sha[:12]} made current")
            changed = True
        text = h.config.read_bytes()
        want = hashlib.sha256(text).hexdigest()
        got = (await self.sh(f"sha256sum {q(h.remote_config)}", check=False)).stdout.split()
        if not got or got[0] != want:
            tmp = h.remote_config + ".tmp"
            await self.sh(f"mkdir -p {q(h.config_dir)} && cat > {q(tmp)} && "
                          f"mv {q(tmp)} {q(h.remote_config)}", data=text)
            self.res.changes.append(f"{h.remote_config} written")
            changed = True
        self.say(f"{h.name}: pushed ({', '.join(self.res.changes) or 'nothing changed'})")
        return changed

    async def pid(self) -> int | None:
        """The endpoint's pid when it runs (its pid file names a live `-m bridge up`)."""
        r = await self.sh(f"p=$(cat {shlex.quote(self.pidfile)} 2>/dev/null) && "
                          "tr '\\0' ' ' < /proc/$p/cmdline && echo \" $p\"", check=False)
        out = r.stdout.split()
        if r.exit_status != 0 or "bridge" not in out or "up" not in out:
            return None
        return int(out[-1])

    async def start(self) -> None:
        h, q = self.h, shlex.quote
        if await self.pid() is not None:
            return
        inner = (f"echo $$ > {q(self.pidfile)}; {self.env} exec {q(h.python)} -m bridge up "
                 f"-c {q(h.remote_config)}")
        await self.sh(f"mkdir -p {q(h.dir + '/run')} {q(h.dir + '/log')} && "
                      f"cd {q(h.dir + '/current')} && setsid -f sh -c {q(inner)} "
                      f">> {q(self.logfile)} 2>&1 < /dev/null")
        self.say(f"{h.name}: starting")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT
        while loop.time() < deadline:
            if await self.status_json() is not None:
                pid = await self.pid()
                self.res.changes.append(f"started (pid {pid})")
                return
            if await self.pid() is None:
                break  # it died
            await asyncio.sleep(0.2)
        tail = (await self.sh(f"tail -n 8 {q(self.logfile)}", check=False)).stdout.strip()
        raise _Failed("start failed; the remote log ends:\n    "
                      + "\n    ".join(tail.splitlines() or ["(empty)"]))

    async def stop(self) -> None:
        pid = await self.pid()
        if pid is None:
            return
        await self.sh(f"kill -TERM {pid}", check=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_WAIT
        while await self.pid() is not None:
            if loop.time() > deadline:
                raise _Failed(f"pid {pid} did not stop within {STOP_WAIT:g} s")
            await asyncio.sleep(0.1)
        await self.sh(f"rm -f {shlex.quote(self.pidfile)}", check=False)
        self.res.changes.append(f"stopped (pid {pid})")

    async def status_json(self) -> dict[str, Any] | None:
        import json

        h, q = self.h, shlex.quote
        r = await self.sh(f"cd {q(h.dir + '/current')} 2>/dev/null && {self.env} "
                          f"{q(h.python)} -m bridge status --json -i {q(h.tun)}", check=False)
        if r.exit_status != 0:
            return None
        try:
            st = json.loads(r.stdout)
        except ValueError:
            return None
        return st if isinstance(st, dict) and "error" not in st else None

    # -- one action -------------------------------------------------------------------

    async def run(self, action: str) -> HostResult:
        h = self.h
        try:
            self.say(f"{h.name}: connecting to {h.user}@{h.address}:{h.port}")
            async with asyncssh.connect(
                    h.address, port=h.port, username=h.user,
                    client_keys=[str(h.identity)], known_hosts=str(h.known_hosts),
                    connect_timeout=10, agent_path=None, config=None) as conn:
                self.conn = conn
                await self._act(action)
        except _Failed as e:
            self.res.ok, self.res.summary = False, str(e)
        except asyncssh.HostKeyNotVerifiable as e:
            self.res.ok = False
            self.res.summary = (f"host key not verified for {h.address} (unknown or changed; "
                                f"check {h.known_hosts}): {e.reason}")
        except asyncssh.PermissionDenied:
            self.res.ok = False
            self.res.summary = (f"authentication refused for {h.user}@{h.address}:{h.port} "
                                f"(key {h.identity})")
        except (TimeoutError, OSError) as e:
            self.res.ok = False
            what = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            self.res.summary = f"unreachable: {h.address}:{h.port}: {what}"
        except (asyncssh.Error, ValueError) as e:  # ValueError: an unreadable key file
            self.res.ok, self.res.summary = False, f"ssh: {e}"
        self.say(f"{h.name}: {'done' if self.res.ok else 'FAILED'}")
        return self.res

    async def _act(self, action: str) -> None:
        if action in ("up", "push"):
            changed = await self.push()
            if action == "up":
                if changed:
                    await self.stop()
                await self.start()
        elif action == "start":
            await self.start()
        elif action == "stop":
            await self.stop()
        elif action == "restart":
            await self.stop()
            await self.start()
        pid = await self.pid()
        self.res.status = await self.status_json() if pid is not None else None
        state = f"running (pid {pid})" if pid is not None else "not running"
        peers = (self.res.status or {}).get("peers", [])
        if peers:
            state += "; peers " + ", ".join(
                f"{p.get('name')} {p.get('state', 'up' if p.get('up') else 'down')}"
                for p in peers)
        self.res.summary = f"{'; '.join(self.res.changes) or 'unchanged'}; {state}"


def run_deploy(inv: Inventory, action: str, say: Say) -> list[HostResult]:
    """Carry out `action` on every host of `inv` concurrently; one result per host, in
    inventory order. Raises ValueError for an unknown action (our caller's misuse)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    sha, blob = release()

    async def all_hosts() -> list[HostResult]:
        return list(await asyncio.gather(*(_Host(h, sha, blob, say).run(action)
                                           for h in inv.hosts)))

    return asyncio.run(all_hosts())

"""`kind = "linux-vm"` lab nodes: a Linux kernel (Debian's) in a qemu guest, driven by an agent.

Rules
-----
- The guest is the node: its links, addresses, routes, sysctls and `run` lines go into the
  guest kernel, not into the node's namespace. The namespace `gb-<instance>-<node>` exists as
  for any node and holds, per link, the veth end the lab made, a TAP device (created with
  pyroute2 from a thread inside the namespace, so it never exists in the root namespace) and
  a bridge `vbrN` joining the two; qemu runs inside the namespace (Lab.popen, so `down`
  kills it with the lab and the namespace takes TAPs and bridges with it). IPv6 is off in
  that namespace: only the guest speaks on the link.
- Software emulation (TCG): `-enable-kvm` hung on the machine this was written on. One vCPU,
  256 MB, `-nographic`, the console (ttyS0) to `<state>/<node>.console.log`.
- Each guest NIC is virtio-net with a MAC derived from (instance, node, port index); the guest
  renames the NIC with that MAC to the topology's interface name.
- The agent (bridge/lab/vmimage.py AGENT) listens on a virtio serial port, exposed on the host
  as the unix socket `<state>/<node>.agent` (a qemu chardev server). Protocol, one line each:
  `SYNC <id>` -> `SYNCED <id>`; `RUN <id> <timeout s> <base64 script> <base64 stdin | ->` ->
  `OUT <id>`, base64 lines, `ERR <id>`, base64 lines, `RC <id> <status>`. The host sends
  SYNC until answered (the guest discards bytes that arrive before it opens the port) and
  ignores lines with other ids (a previous client's leftovers). One client at a time:
  qemu accepts one connection, and clients take an flock on `<socket>.lock`.
- `run` lines of a linux-vm node are shell lines run in order in the guest, each to
  completion (a daemon forks itself or ends in `&`); a failing line fails `up`. Lab.run on
  the node goes to the guest (`vm.run`); Lab.popen stays on the host side, in the node's
  namespace (that is how qemu starts).
- Busybox's `ip` applet would shadow iproute2's in the guest shell: see vmimage.PRELUDE.

Theory of operation
-------------------
netlink.Lab builds the veths as usual, then `prepare(lab, node)` adds TAPs and bridges,
`boot(lab, node)` starts qemu, `configure(lab, node)` waits for the agent and sends one
script (rename NICs, MTU, up, sysctls, addresses, routes), and `run_lines` runs `run`.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import secrets
import select
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from bridge.errors import GrebeError
from bridge.lab import procs, vmimage
from bridge.lab.topomodel import Node, Topology


class Lab(Protocol):
    """What this module uses of a bridge/lab/netlink.py Lab (which imports this module, so
    it names the interface rather than the class)."""

    instance: str
    state_dir: Path
    topology: Topology

    def ns_path(self, node: str) -> str: ...

    def popen(self, node: str, argv: Any, **kw: Any) -> subprocess.Popen[Any]: ...

BOOT_TIMEOUT = 120.0  # seconds: a TCG boot takes ~4 s alone, far longer on a busy machine
MEMORY_MB = 256


class GuestError(GrebeError):
    """A guest did not boot, its agent did not answer, or a command could not be sent."""


def agent_path(state_dir: Path, node: str) -> Path:
    return state_dir / f"{node}.agent"


def mac(instance: str, node: str, index: int) -> str:
    """A locally administered unicast MAC, stable for (instance, node, port index)."""
    d = hashlib.sha256(f"{instance}/{node}/{index}".encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in d[:4])


def tap_name(index: int) -> str:
    return f"tap{index}"


def bridge_name(index: int) -> str:
    return f"vbr{index}"


def qemu_argv(image: vmimage.Image, taps: list[tuple[str, str]], agent: Path) -> list[str]:
    """The qemu command line: kernel + initramfs, one virtio NIC per (tap, mac), the agent."""
    argv = [vmimage.QEMU, "-nographic", "-no-reboot", "-m", str(MEMORY_MB), "-smp", "1",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "console=ttyS0 panic=-1 quiet", "-monitor", "none", "-nic", "none"]
    for i, (tap, hw) in enumerate(taps):
        argv += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=n{i},mac={hw}"]
    argv += ["-chardev", f"socket,id=agent,path={agent},server=on,wait=off",
             "-device", "virtio-serial-pci",
             "-device", "virtserialport,chardev=agent,name=grebe.agent"]
    return argv


def link_mtus(topo: Topology, node: Node) -> dict[str, int]:
    """Interface -> MTU for `node`: its links' `mtu`, overridden by the node's own."""
    out: dict[str, int] = {}
    for link in topo.links_of(node.name):
        for ep in link.endpoints:
            if ep.node == node.name and link.mtu is not None:
                out[ep.interface] = link.mtu
    return {**out, **dict(node.mtu)}


def netconfig_script(topo: Topology, node: Node, macs: dict[str, str]) -> str:
    """The guest script that gives `node` its interfaces, sysctls, addresses and routes."""
    lines = ["set -e"]
    for i, hw in enumerate(macs.values()):  # by MAC, via temporary names
        lines.append(f'for d in /sys/class/net/*; do [ "$(cat $d/address)" = "{hw}" ] && '
                     f'ip link set dev "${{d##*/}}" name gbtmp{i}; done; true')
    for i, ifname in enumerate(macs):
        lines.append(f"ip link set dev gbtmp{i} name {shlex.quote(ifname)}")
    for key, value in node.sysctl:
        lines.append(f"echo {shlex.quote(value)} > /proc/sys/{key.replace('.', '/')}")
    mtus = link_mtus(topo, node)
    for ifname in macs:
        if ifname in mtus:
            lines.append(f"ip link set dev {ifname} mtu {mtus[ifname]}")
        lines.append(f"ip link set dev {ifname} up")
    for a in node.addresses:
        nodad = " nodad" if a.address.version == 6 else ""
        lines.append(f"ip addr add {a.address} dev {a.interface}{nodad}")
    for r in node.routes:
        fam = "-6" if r.dst.version == 6 else "-4"
        spec = f"ip {fam} route add {r.dst}"
        spec += f" via {r.via}" if r.via is not None else ""
        spec += f" dev {r.dev}" if r.dev is not None else ""
        lines.append(spec)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes


class Agent:
    """A client of one guest's agent socket (see the module docstring for the protocol)."""

    def __init__(self, path: Path | str, node: str = "guest") -> None:
        self.path = str(path)
        self.node = node
        self.alive: Callable[[], bool] | None = None

    def _check_alive(self) -> None:
        if self.alive is not None and not self.alive():
            raise GuestError(f"{self.node}: qemu exited before its agent answered")

    def run(self, script: str, timeout: float | None = 30, input: bytes | None = None,
            connect_timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> Result:
        """Run a shell `script` in the guest; return its status and output.

        Raises subprocess.TimeoutExpired after `timeout` (the guest kills the command),
        GuestError if the agent cannot be reached within `connect_timeout` or `alive()`
        (qemu still running, while booting) turns false.
        """
        self.alive = alive
        limit = 3600 if timeout is None else max(1, int(timeout + 0.999))
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with self._connect(connect_timeout) as sock:
                buf = _LineReader(sock)
                tag = self._sync(sock, buf, connect_timeout)
                stdin = base64.b64encode(input).decode() if input else "-"
                cmd = base64.b64encode(script.encode()).decode()
                sock.setblocking(True)
                sock.sendall(f"RUN {tag} {limit} {cmd} {stdin}\n".encode())
                return self._reply(buf, tag, time.monotonic() + limit + 15, script, timeout)

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except OSError as e:
                sock.close()
                self._check_alive()
                if time.monotonic() >= deadline:
                    raise GuestError(f"{self.node}: agent socket {self.path}: {e}") from e
                time.sleep(0.05)  # bounded retry: qemu creates the socket as it starts

    def _sync(self, sock: socket.socket, buf: _LineReader, timeout: float) -> str:
        tag = secrets.token_hex(6)
        deadline = time.monotonic() + timeout
        sock.setblocking(False)
        n = 0
        while time.monotonic() < deadline:
            self._check_alive()
            n += 1
            try:
                sock.send(f"SYNC {tag}.{n}\n".encode())
            except BlockingIOError:  # the guest has not opened the port yet
                pass
            line_end = time.monotonic() + 0.3
            while (line := buf.line(line_end)) is not None:
                if line.startswith(f"SYNCED {tag}."):
                    return tag
        raise GuestError(f"{self.node}: the agent did not answer within {timeout:g}s")

    def _reply(self, buf: _LineReader, tag: str, deadline: float, script: str,
               timeout: float | None) -> Result:
        parts: dict[str, list[str]] = {"OUT": [], "ERR": []}
        into: list[str] | None = None
        while True:
            line = buf.line(deadline)
            if line is None:
                if time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(script, timeout or 0)
                raise GuestError(f"{self.node}: the agent closed the connection")
            verb, _, rest = line.partition(" ")
            if verb in parts and rest == tag:
                into = parts[verb]
            elif verb == "RC" and rest.startswith(tag + " "):
                rc = int(rest.split()[1])
                out, err = (base64.b64decode("".join(parts[k])) for k in ("OUT", "ERR"))
                if rc == 137 and timeout is not None:  # `timeout -s KILL` fired in the guest
                    raise subprocess.TimeoutExpired(script, timeout, out, err)
                return Result(rc, out, err)
            elif into is not None and " " not in line:
                into.append(line)


class _LineReader:
    """Lines from a socket, waiting at most until a deadline (monotonic) for each."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self, deadline: float) -> str | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace").strip()


# ---------------------------------------------------------------- lab integration


def prepare(lab: Lab, node: Node) -> list[tuple[str, str]]:
    """In the node's namespace: per port a TAP and a bridge with the veth; returns (tap, mac)."""
    path = lab.ns_path(node.name)
    ports = list(node.interfaces)
    sysctls = [("net.ipv6.conf.all.disable_ipv6", "1"), ("net.ipv6.conf.default.disable_ipv6",
                                                         "1")]
    taps = [(tap_name(i), mac(lab.instance, node.name, i)) for i in range(len(ports))]
    mtus = link_mtus(lab.topology, node) if lab.topology else {}

    def body() -> None:
        for key, value in sysctls:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        with IPRoute() as ipr:  # this thread is inside the namespace: so is the TAP
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            for i, port in enumerate(ports):
                tap, br = tap_name(i), bridge_name(i)
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
                ipr.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0,
                         br_mcast_snooping=0)
                bri = ipr.link_lookup(ifname=br)[0]
                for dev in (port, tap):
                    idx = ipr.link_lookup(ifname=dev)[0]
                    if port in mtus:
                        ipr.link("set", index=idx, mtu=mtus[port])
                    ipr.link("set", index=idx, master=bri, state="up")
                ipr.link("set", index=bri, state="up")

    procs.in_netns(path, body)
    return taps


def boot(lab: Lab, node: Node, taps: list[tuple[str, str]]) -> subprocess.Popen[Any]:
    """Start qemu in the node's namespace; return its Popen (the agent is not up yet)."""
    image = vmimage.ensure_image()
    sock = agent_path(lab.state_dir, node.name)
    log = lab.state_dir / f"{node.name}.console.log"
    qemu = lab.popen(node.name, qemu_argv(image, taps, sock), log=str(log))
    (lab.state_dir / f"{node.name}.kernel").write_text(f"{image.version} ({image.package})\n")
    return qemu


def configure(lab: Lab, node: Node, qemu: subprocess.Popen[Any], macs: dict[str, str]) -> None:
    """Wait for the agent, then give the guest its interfaces, addresses, routes, sysctls."""
    assert lab.topology is not None
    agent = Agent(agent_path(lab.state_dir, node.name), node.name)
    try:
        res = agent.run(netconfig_script(lab.topology, node, macs), timeout=60,
                        connect_timeout=BOOT_TIMEOUT, alive=lambda: qemu.poll() is None)
    except GuestError as e:
        raise GuestError(f"{e}; console: {console_tail(lab, node.name)}") from e
    if res.returncode != 0:
        raise GuestError(f"{node.name}: guest network setup failed: "
                         f"{res.stderr.decode(errors='replace').strip()}")


def run_lines(lab: Lab, node: Node) -> None:
    """Run the node's `run` lines in the guest, in order, each to completion; GuestError."""
    agent = Agent(agent_path(lab.state_dir, node.name), node.name)
    for cmd in node.run:
        line = cmd.line or shlex.join(cmd.argv)
        res = agent.run(line, timeout=120)
        with open(lab.state_dir / f"{node.name}.run.log", "ab") as f:
            f.write(f"$ {line}\n".encode() + res.stdout + res.stderr)
        if res.returncode != 0:
            raise GuestError(f"{node.name}: run line {line!r} exited {res.returncode}: "
                             f"{res.stderr.decode(errors='replace').strip()}")


def console_tail(lab: Lab, node: str, n: int = 600) -> str:
    try:
        return (lab.state_dir / f"{node}.console.log").read_text(errors="replace")[-n:]
    except OSError:
        return "(no console log)"


def start(lab: Lab, nodes: list[Node]) -> None:
    """prepare + boot every linux-vm node (they boot in parallel), then configure each."""
    booted = []
    for node in nodes:
        taps = prepare(lab, node)
        qemu = boot(lab, node, taps)
        booted.append((node, qemu, dict(zip(node.interfaces, (m for _, m in taps),
                                            strict=True))))
    for node, qemu, macs in booted:
        configure(lab, node, qemu, macs)


def run(lab: Lab, node: str, argv: list[str] | str, timeout: float | None = 30,
        input: bytes | str | None = None) -> subprocess.CompletedProcess[Any]:
    """Lab.run for a linux-vm node: argv (or a shell line) in the guest, text unless bytes in.

    `["sh", "-c", SCRIPT]` runs SCRIPT in the agent's own shell: a nested busybox shell
    would run busybox's `ip` applet instead of iproute2's (see vmimage.PRELUDE).
    """
    line = argv if isinstance(argv, str) else shlex.join(argv)
    if not isinstance(argv, str) and len(argv) == 3 and argv[:2] == ["sh", "-c"]:
        line = argv[2]
    data = input.encode() if isinstance(input, str) else input
    res = Agent(agent_path(lab.state_dir, node), node).run(line, timeout=timeout, input=data)
    if isinstance(input, bytes):
        return subprocess.CompletedProcess(argv, res.returncode, res.stdout, res.stderr)
    return subprocess.CompletedProcess(argv, res.returncode, res.stdout.decode(errors="replace"),
                                       res.stderr.decode(errors="replace"))


def shell(path: Path, node: str) -> int:
    """`exec NODE` without a command on a linux-vm node: a line-by-line prompt to the guest."""
    agent = Agent(path, node)
    print(f"{node}: Linux guest; each line runs in the guest's shell (Ctrl-D ends)", flush=True)
    rc = 0
    while True:
        try:
            line = input(f"{node}# ")
        except EOFError:
            print()
            return rc
        if line.strip():
            res = agent.run(line, timeout=None)
            os.write(1, res.stdout)
            os.write(2, res.stderr)
            rc = res.returncode

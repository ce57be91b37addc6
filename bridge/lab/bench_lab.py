"""The bench's toolbox: the lab it runs in, and undoable changes inside its namespaces.

Rules:
- `open_lab()` brings up `topologies/two-sites-plain.toml` with the lab engine
  (`Lab.up(topology, instance=...)`, bridge/lab/netlink.py): namespaces gb-<instance>-*.
- Netlink work is pyroute2 (`IPRoute(netns=...)`) inside the lab's namespaces only. Each
  change a variant makes is registered with its undo; `undo_all()` stops the variant's
  processes first (their devices vanish with them) and then undoes in reverse order,
  ignoring only "already gone" (ENOENT, ESRCH, ENODEV).
- Processes go through `spawn()`: argv inside a node, output to `<tmp>/<name>.log`, stdin
  closed. While waiting for a condition, a spawned process that died turns the wait into a
  RuntimeError quoting the end of its log, instead of a long timeout.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bridge.lab import netlink, topology
from bridge.lab.bench_report import BenchParseError, parse_ping, parse_proc_stat
from stack.wire.checksum import checksum

TOPOLOGY = "two-sites-plain"
ECHO = struct.Struct("!BBHHH")  # ICMP echo: type, code, checksum, identifier, sequence (RFC 792)
RTM_F_CLONED = 0x200  # linux/rtnetlink.h: a cached clone (e.g. a PMTU exception), not config
GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)


class LabLike(Protocol):
    def ns(self, node: str) -> str: ...
    def run(self, node: str, argv: Sequence[str], timeout: float = ..., check: bool = ...,
            input: str | None = ...) -> subprocess.CompletedProcess[str]: ...
    def popen(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]: ...
    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> None: ...
    def destroy(self) -> None: ...


def open_lab(instance: str, progress: Callable[[str], None] | None = None) -> LabLike:
    """The lab engine's Lab on two-sites-plain (raises the engine's LabError/ConfigErrors);
    `progress` is told each step of the bring-up."""
    lab: LabLike = netlink.Lab.up(topology.load(TOPOLOGY), instance=instance, start=False,
                                  progress=progress)
    return lab


def stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 3.0) -> None:
    """SIGTERM each live process (so nginx/openvpn clean up), SIGKILL what outlives `grace`."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


class Bench:
    """What variants may do to the lab: undoable netlink changes and logged processes."""

    def __init__(self, lab: LabLike, tmp: Path, repo: Path) -> None:
        self.lab, self.tmp, self.repo = lab, tmp, repo
        self.mitmdump = repo / ".bench" / "mitmproxy-venv" / "bin" / "mitmdump"
        self.keep_tmp = False
        self.log: Callable[[str], None] = lambda msg: None
        self._undo: list[Callable[[], None]] = []
        self._procs: list[tuple[subprocess.Popen[Any], Path]] = []
        self._persistent: list[tuple[subprocess.Popen[Any], Path]] = []
        self._keys: dict[str, tuple[Path, str]] = {}
        self._certs: dict[str, tuple[Path, Path, str]] = {}

    # ---- processes

    def run(self, node: str, argv: Sequence[str], timeout: float = 30,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        cp = self.lab.run(node, list(argv), timeout=timeout, check=False)
        if check and cp.returncode != 0:
            raise RuntimeError(f"{node}: {' '.join(argv)} -> exit {cp.returncode}: "
                               f"{(cp.stderr or cp.stdout).strip()[-300:]}")
        return cp

    def spawn(self, node: str, argv: Sequence[str], name: str,
              env: dict[str, str] | None = None, persistent: bool = False) -> subprocess.Popen[Any]:
        path = self.tmp / f"{name}.log"
        kw: dict[str, Any] = {}
        if env:
            lab_env = getattr(self.lab, "env", None)
            kw["env"] = {**(lab_env(node) if lab_env else os.environ), **env}
        with open(path, "ab") as out:
            p = self.lab.popen(node, list(argv), stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, **kw)
        (self._persistent if persistent else self._procs).append((p, path))
        return p

    def stop_persistent(self, name: str) -> None:
        """Stop the long-lived process spawned as `name` (if any), e.g. to restart it."""
        mine = [(p, path) for p, path in self._persistent if path.stem == name]
        stop_processes([p for p, _ in mine])
        self._persistent = [e for e in self._persistent if e not in mine]

    def _check_alive(self) -> None:
        for p, path in (*self._procs, *self._persistent):
            if p.poll() is not None:
                tail = path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"{path.stem} exited with {p.returncode}: "
                                   + " | ".join(tail))

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        def check() -> object:
            self._check_alive()
            return predicate()
        self.lab.wait_for(check, timeout, what)

    # ---- netlink, undoable

    def ipr(self, node: str) -> IPRoute:
        # flags=0: never create a missing namespace (pyroute2 defaults to O_CREAT)
        return IPRoute(netns=self.lab.ns(node), flags=0)

    def ifindex(self, node: str, ifname: str) -> int:
        with self.ipr(node) as ip:
            found = ip.link_lookup(ifname=ifname)
        if not found:
            raise RuntimeError(f"{node}: no interface {ifname}")
        return int(found[0])

    def link_add(self, node: str, ifname: str, **kw: Any) -> None:
        with self.ipr(node) as ip:
            ip.link("add", ifname=ifname, **kw)

        def undo() -> None:
            with self.ipr(node) as ip:
                for idx in ip.link_lookup(ifname=ifname):
                    ip.link("del", index=idx)
        self._undo.append(undo)

    def addr(self, node: str, ifname: str, *cidrs: str) -> None:
        """Add addresses (IPv6 without DAD) to a device this variant owns, and set it up."""
        with self.ipr(node) as ip:
            idx = ip.link_lookup(ifname=ifname)[0]
            for cidr in cidrs:
                a, plen = cidr.split("/")
                kw: dict[str, Any] = {"flags": 0x02} if ":" in a else {}  # IFA_F_NODAD
                ip.addr("add", index=idx, address=a, prefixlen=int(plen), **kw)
            ip.link("set", index=idx, state="up")

    def route(self, node: str, dst: str, gateway: str | None = None,
              oif: str | None = None) -> None:
        spec: dict[str, Any] = {"dst": dst, "family": 10 if ":" in dst else 2}
        if gateway:
            spec["gateway"] = gateway
        if oif:
            spec["oif"] = self.ifindex(node, oif)
        with self.ipr(node) as ip:
            ip.route("add", **spec)

        def undo() -> None:
            with self.ipr(node) as ip:
                ip.route("del", **spec)
        self._undo.append(undo)

    def on_undo(self, undo: Callable[[], None]) -> None:
        """Run `undo` at the variant's teardown (last registered, first run)."""
        self._undo.append(undo)

    def undo_all(self) -> None:
        stop_processes([p for p, _ in self._procs])
        self._procs.clear()
        while self._undo:
            try:
                self._undo.pop()()
            except NetlinkError as e:
                if e.code not in GONE:
                    raise
            except IndexError:
                pass

    def close(self) -> None:
        try:
            self.undo_all()
        finally:
            stop_processes([p for p, _ in self._persistent])
            self._persistent.clear()
            self.lab.destroy()

    # ---- probes

    def cpu_ticks(self) -> int:
        """CPU clock ticks used so far by this variant's processes and their descendants."""
        stats: dict[int, tuple[int, int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stats[int(entry.name)] = parse_proc_stat((entry / "stat").read_text())
                except (OSError, BenchParseError):
                    continue  # exited meanwhile
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        todo = [p.pid for p, _ in self._procs]
        total, seen = 0, set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in stats:
                continue
            seen.add(pid)
            total += stats[pid][1]
            todo += children.get(pid, [])
        return total

    @property
    def has_processes(self) -> bool:
        return bool(self._procs)

    def footprint(self, nodes: Sequence[str] = ("client", "gw-a", "gw-b", "server")
                  ) -> dict[str, frozenset[str]]:
        """Links and routes of `nodes`, to check that a teardown left nothing behind."""
        out: dict[str, frozenset[str]] = {}
        for node in nodes:
            with self.ipr(node) as ip:
                items = {f"link {ln.get('ifname')}" for ln in ip.get_links()}
                for fam in (2, 10):
                    items |= {f"route {r.get('dst')}/{r['dst_len']}"
                              for r in ip.route("dump", family=fam)
                              if r.get("table") == 254 and r.get("dst")
                              and not r["flags"] & RTM_F_CLONED}
            out[node] = frozenset(items)
        return out

    def has_route(self, node: str, dst: str) -> bool:
        net, plen = dst.split("/")
        with self.ipr(node) as ip:
            routes = ip.route("dump", family=10 if ":" in net else 2)
            return any(r.get("dst") == net and r["dst_len"] == int(plen) for r in routes)

    def has_address(self, node: str, ifname: str) -> bool:
        with self.ipr(node) as ip:
            idx = ip.link_lookup(ifname=ifname)
            return bool(idx) and bool(list(ip.addr("dump", index=idx[0])))

    def link_up(self, node: str, ifname: str) -> bool:
        with self.ipr(node) as ip:
            idx = ip.link_lookup(ifname=ifname)
            if not idx:
                return False
            return bool(ip.link("get", index=idx[0])[0]["flags"] & 1)  # IFF_UP

    def pings(self, node: str, dst: str) -> bool:
        cp = self.run(node, ping_command(dst, 1, 0), check=False)
        try:
            return parse_ping(cp.stdout).received > 0
        except BenchParseError:
            return False

    def _listening(self, node: str, proto: str, port: int) -> bool:
        cp = self.run(node, ["ss", "-Hn", f"-l{proto}", f"sport = :{port}"], check=False)
        return bool(cp.stdout.strip())

    def tcp_listening(self, node: str, port: int) -> bool:
        return self._listening(node, "t", port)

    def udp_listening(self, node: str, port: int) -> bool:
        return self._listening(node, "u", port)

    def flush_route_caches(self, nodes: Sequence[str] = ("client", "gw-a", "gw-b", "server")
                           ) -> None:
        """Forget learned PMTUs and redirects, so that one variant's ICMP "fragmentation
        needed" (VXLAN's 1450, WireGuard's 1420) does not shape the next variant's packets.
        Writing net.ipv4.route.flush also invalidates the nexthop exceptions."""
        for node in nodes:
            self.run(node, ["sysctl", "-qw", "net.ipv4.route.flush=1",
                            "net.ipv6.route.flush=1"], check=False)

    def ensure_mitmproxy(self) -> str | None:
        """Install mitmproxy into its own venv on first use. Returns why it can't, or None."""
        if self.mitmdump.exists():
            return None
        venv = self.mitmdump.parents[1]
        self.log(f"installing mitmproxy into {venv} (first use only; needs PyPI)")
        base = getattr(sys, "_base_executable", sys.executable)
        try:
            subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True,
                           timeout=300)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                            "--disable-pip-version-check", "mitmproxy"],
                           check=True, capture_output=True, text=True, timeout=900)
        except subprocess.CalledProcessError as e:
            return f"pip install mitmproxy failed: {str(e.stderr).strip()[-200:]}"
        except (OSError, subprocess.SubprocessError) as e:
            return f"could not install mitmproxy into {venv}: {e}"
        return None if self.mitmdump.exists() else f"{self.mitmdump} missing after install"

    # ---- keys and certificates (files in the scratch dir; no network involved)

    def wg_name(self, suffix: str) -> str:
        """A WireGuard interface name unique to this lab instance ("gbw" + 4 hex + suffix):
        wireguard-go's UAPI socket /var/run/wireguard/<name>.sock is shared by all netns."""
        tag = zlib.crc32(self.lab.ns("client").encode()) & 0xFFFF
        return f"gbw{tag:04x}{suffix}"

    def wg_keypair(self, node: str, name: str | None = None) -> tuple[Path, str]:
        """(private key file, public key) for a WireGuard peer, made with `wg genkey`."""
        name = name or node
        if name not in self._keys:
            priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                  check=True).stdout.strip()
            pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                                 check=True).stdout.strip()
            path = self.tmp / f"wg-{name}.key"
            path.write_text(priv + "\n")
            path.chmod(0o600)
            self._keys[name] = (path, pub)
        return self._keys[name]

    def start_wireguard_go(self, node: str, ifname: str) -> None:
        self.spawn(node, ["wireguard-go", ifname], f"wireguard-go-{ifname}",
                   env={"WG_PROCESS_FOREGROUND": "1"})
        self.wait_for(lambda: self.ifindex_or_none(node, ifname) is not None, 10,
                      f"wireguard-go device {ifname} on {node}")

    def ifindex_or_none(self, node: str, ifname: str) -> int | None:
        with self.ipr(node) as ip:
            found = ip.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    def self_signed(self, name: str) -> tuple[Path, Path, str]:
        """(cert, key, SHA-256 fingerprint "AB:CD:...") of a throwaway P-256 certificate."""
        if name not in self._certs:
            cert, key = self.tmp / f"{name}.crt", self.tmp / f"{name}.key"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                            "-subj", f"/CN=grebe-bench-{name}", "-keyout", str(key),
                            "-out", str(cert)], capture_output=True, check=True)
            out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256",
                                  "-in", str(cert)], capture_output=True, text=True,
                                 check=True).stdout
            self._certs[name] = (cert, key, out.strip().split("=", 1)[1])
        return self._certs[name]


# ---- a stand-in for iputils ping, for machines without it


def ping_command(dst: str, count: int, interval: float) -> list[str]:
    """argv measuring RTT to `dst`: iputils `ping -q` if installed, else `ping_main` below.
    Both print the iputils summary that bench_report.parse_ping reads."""
    if shutil.which("ping"):
        return ["ping", "-q", "-c", str(count), "-i", str(interval), "-W", "2", dst]
    return [sys.executable, "-c", "from bridge.lab.bench_lab import ping_main; ping_main()",
            dst, str(count), str(interval)]


def ping_main() -> None:
    """ICMP echo over a raw socket (the bench runs as root), argv: DST COUNT INTERVAL.

    Prints "N packets transmitted, M received" and "rtt min/avg/max/mdev = ... ms" like
    iputils. Python adds a few microseconds to each RTT compared with iputils.
    """
    dst, count, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ident = os.getpid() & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    rtts: list[float] = []
    for seq in range(count):
        body = ECHO.pack(8, 0, 0, ident, seq) + b"grebe-bench-ping"
        pkt = ECHO.pack(8, 0, checksum(body), ident, seq) + body[ECHO.size:]
        t0 = time.perf_counter()
        sock.sendto(pkt, (dst, 0))
        deadline = t0 + 2.0
        while (left := deadline - time.perf_counter()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            ihl = (data[0] & 0x0F) * 4  # raw IPv4 sockets deliver the IP header too
            typ, _, _, rid, rseq = ECHO.unpack_from(data, ihl)
            if typ == 0 and rid == ident and rseq == seq:
                rtts.append((time.perf_counter() - t0) * 1000)
                break
        time.sleep(interval)
    print(f"{count} packets transmitted, {len(rtts)} received")
    if rtts:
        avg = sum(rtts) / len(rtts)
        mdev = (sum((r - avg) ** 2 for r in rtts) / len(rtts)) ** 0.5
        print(f"rtt min/avg/max/mdev = {min(rtts):.3f}/{avg:.3f}/{max(rtts):.3f}/{mdev:.3f} ms")

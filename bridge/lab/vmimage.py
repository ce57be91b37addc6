"""The guest image of `kind = "linux-vm"` lab nodes: a Debian kernel and a busybox initramfs.

Rules
-----
- Nothing binary is committed. The image is built on first use from Debian packages the
  bootstrap provides (`./netns-lab.sh bootstrap-vm`): the kernel package's .deb (fetched with
  `apt-get download`, never installed as the host's kernel), busybox-static, and the host's
  iproute2 `ip` with the shared libraries `ldd` names.
- The kernel's `vmlinuz` and the modules the interop matrix needs (virtio NIC and serial port,
  fou/fou6, ip_gre/ip6_gre, ipip, sit; their `depends=` from each module's .modinfo section,
  since the package carries no modules.dep) are read out of `dpkg-deb --fsys-tarfile` with
  tarfile: no files land outside the cache.
- The initramfs is an uncompressed cpio "newc" archive (Linux
  Documentation/driver-api/early-userspace/buffer-format.rst) written here: under software
  emulation an uncompressed image boots faster than a gzip one the guest must inflate.
- Cache: `<venv>/grebe-vm/` (or $GREBE_VM_CACHE), outside git. The image is rebuilt only when
  a stamp over its inputs (package file names and sizes, busybox and `ip` hashes, the init
  and agent scripts, the module list) changes; images of older stamps are then removed.
  Builds write to a temp directory and rename, under a lock, so concurrent labs share one
  image.

Theory of operation
-------------------
`ensure_image()` -> bootstrap if a package is missing -> stamp -> cached (vmlinuz, initrd),
or build: modules (dependency order) + busybox (applet links) + ip and its libraries + /init
(mount, insmod, then the agent on the virtio serial port, see bridge/lab/vm.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNEL_GLOB = "linux-image-*-cloud-amd64_*.deb"
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
# What the guest loads, in this order after dependencies: NIC and agent port first.
MODULES = ("virtio_pci", "virtio_net", "virtio_console", "fou", "fou6", "ip_gre", "ip6_gre",
           "ipip", "sit")
_DEPENDS = re.compile(rb"(?:^|\x00)depends=([A-Za-z0-9_,-]*)\x00")

# /init: PID 1 of the guest. It never exits (the kernel would panic); the agent loop runs
# commands the host sends over the virtio serial port (protocol in bridge/lab/vm.py).
INIT = r"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /var/log /run
for m in $(cat /etc/grebe/modules); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad
echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad
ip link set lo up
echo "grebe-guest: $(uname -r) ready for the agent"
while true; do
    port=$(ls /dev/vport*p1 2>/dev/null | head -n 1)
    [ -n "$port" ] && sh /etc/grebe/agent 3<>"$port"
    sleep 0.1
done
"""

# The agent: one request per line, one reply per request (see bridge/lab/vm.py). fd 3 is the
# port; commands get it closed so that a daemon they start never holds it.
AGENT = r"""cd /tmp
while read -r verb id tmo cmd inp <&3; do
    case "$verb" in
    SYNC) echo "SYNCED $id" >&3 ;;
    RUN)
        { cat /etc/grebe/prelude; echo "$cmd" | base64 -d; } > .agent.cmd
        : > .agent.in
        [ "$inp" = "-" ] || echo "$inp" | base64 -d > .agent.in
        timeout -s KILL "$tmo" sh .agent.cmd < .agent.in > .agent.out 2> .agent.err 3>&-
        rc=$?
        { echo "OUT $id"; base64 .agent.out; echo "ERR $id"; base64 .agent.err
          echo "RC $id $rc"; } >&3 ;;
    esac
done
"""


# Busybox's shell runs its own applets before $PATH ("standalone shell"): a function is the
# one thing that comes first, so `ip` is iproute2's (fou, gre, sit), not busybox's, in every
# script the agent runs. A nested `sh -c` does not inherit functions: use /sbin/ip there.
PRELUDE = 'ip() { /sbin/ip "$@"; }\n'


class ImageError(RuntimeError):
    """The guest image cannot be built (a package is missing or unreadable)."""


@dataclass(frozen=True, slots=True)
class Image:
    kernel: Path
    initrd: Path
    version: str  # the package's kernel release, e.g. "6.1.0-57-cloud-amd64"
    package: str  # the .deb file name, e.g. "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb"


def cache_dir() -> Path:
    return Path(os.environ.get("GREBE_VM_CACHE") or Path(sys.prefix) / "grebe-vm")


def kernel_deb(cache: Path) -> Path | None:
    """The newest downloaded kernel package in `cache`, or None."""
    debs = sorted(cache.glob(KERNEL_GLOB), key=lambda p: p.stat().st_mtime)
    return debs[-1] if debs else None


def bootstrap(cache: Path) -> None:
    """Install qemu and busybox and download the kernel package (netns-lab.sh bootstrap-vm)."""
    env = {**os.environ, "GREBE_VM_CACHE": str(cache)}
    cp = subprocess.run([str(REPO / "netns-lab.sh"), "bootstrap-vm"], env=env, check=False)
    if cp.returncode != 0:
        raise ImageError(f"netns-lab.sh bootstrap-vm failed (exit {cp.returncode})")


def host_libraries(binary: str) -> list[str]:
    """Absolute paths of the shared libraries (and loader) `binary` needs, from ldd."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
        if path.startswith("/"):
            libs.append(path)
    return libs


def module_depends(ko: bytes) -> list[str]:
    """The `depends=` list of a kernel module's .modinfo section (empty if none)."""
    m = _DEPENDS.search(ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def load_order(wanted: tuple[str, ...], depends: dict[str, list[str]]) -> list[str]:
    """Modules in an order where each comes after its dependencies (depth first)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ImageError(f"module dependency cycle: {' -> '.join((*path, name))}")
        for dep in depends.get(name, []):
            visit(dep, (*path, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


class Cpio:
    """A cpio "newc" archive writer (buffer-format.rst): directories, files, symlinks."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.out.write(name.encode() + b"\0")
        self.out.write(b"\0" * (-(110 + len(name) + 1) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))
        self.ino += 1

    def mkdir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.mkdir(os.path.dirname(name))
        self.dirs.add(name)
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.mkdir(os.path.dirname(name))
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.mkdir(os.path.dirname(name))
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.out.write(b"\0" * (-self.out.tell() % 512))
        return self.out.getvalue()


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stamp(deb: Path, ip: str) -> str:
    """A digest of every input of the image: a change rebuilds it."""
    h = hashlib.sha256()
    for part in (deb.name, str(deb.stat().st_size), _sha(BUSYBOX), _sha(ip),
                 *(f"{lib}:{_sha(lib)}" for lib in host_libraries(ip)), INIT, AGENT, PRELUDE,
                 ",".join(MODULES)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _read_package(deb: Path) -> tuple[str, bytes, dict[str, bytes]]:
    """(kernel release, vmlinuz, {module name: .ko}) out of the kernel package."""
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                               check=True).stdout
    vmlinuz, release, modules = b"", "", {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            name = member.name
            if not member.isfile():
                continue
            if re.search(r"/boot/vmlinuz-", name):
                release = name.rsplit("vmlinuz-", 1)[1]
                vmlinuz = tar.extractfile(member).read()  # type: ignore[union-attr]
            elif name.endswith(".ko") and "/lib/modules/" in name:
                modules[Path(name).stem] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if not vmlinuz:
        raise ImageError(f"{deb.name}: no /boot/vmlinuz-* inside")
    return release, vmlinuz, modules


def build_initrd(modules: dict[str, bytes], ip: str) -> bytes:
    """The initramfs: /init, the agent, modules in load order, busybox, ip and its libraries."""
    depends = {name: module_depends(ko) for name, ko in modules.items()}
    order = load_order(MODULES, depends)
    missing = [m for m in order if m not in modules]
    if missing:
        raise ImageError(f"kernel package lacks modules: {', '.join(missing)}")
    cpio = Cpio()
    for d in ("proc", "sys", "dev", "tmp", "etc/grebe", "lib/modules", "bin", "sbin",
              "usr/bin", "usr/sbin"):
        cpio.mkdir(d)
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file("etc/grebe/agent", AGENT.encode(), 0o644)
    cpio.file("etc/grebe/prelude", PRELUDE.encode(), 0o644)
    cpio.file("etc/grebe/modules", ("\n".join(order) + "\n").encode())
    for name in order:
        cpio.file(f"lib/modules/{name}.ko", modules[name])
    cpio.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet not in ("busybox", "ip"):
            cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("sbin/ip", Path(ip).read_bytes(), 0o755)
    for lib in host_libraries(ip):
        cpio.file(lib, Path(lib).read_bytes(), 0o755)
    return cpio.finish()


def ensure_image(cache: Path | None = None) -> Image:
    """The guest image, built (or bootstrapped and built) if needed; raises ImageError."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if (kernel_deb(cache) is None or shutil.which(QEMU) is None
            or not os.access(BUSYBOX, os.X_OK)):
        bootstrap(cache)
    deb = kernel_deb(cache)
    ip = shutil.which("ip") or "/sbin/ip"
    if deb is None or shutil.which(QEMU) is None:
        raise ImageError(f"no kernel package in {cache} or no {QEMU} after bootstrap-vm")
    key = stamp(deb, ip)
    out = cache / key
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "release").exists():
            release, vmlinuz, modules = _read_package(deb)
            tmp = cache / f".{key}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / "vmlinuz").write_bytes(vmlinuz)
            (tmp / "initrd").write_bytes(build_initrd(modules, ip))
            (tmp / "release").write_text(release)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            for old in cache.iterdir():  # images of earlier inputs (qemu loads its copy at boot)
                if old != out and re.fullmatch(r"[0-9a-f]{16}", old.name):
                    shutil.rmtree(old, ignore_errors=True)
    return Image(kernel=out / "vmlinuz", initrd=out / "initrd",
                 version=(out / "release").read_text().strip(), package=deb.name)

"""Build the fast path's object from bridge/ebpf/grebe_tc.c with the distribution's clang.

Rules:
- No compiled object is committed: the bootstrap (netns-lab.sh) runs `python -m
  bridge.ebpf.build`, and `object_path()` builds at first use when the object is missing or
  older than the source. The toolchain is Debian's clang (-target bpf) with libbpf's headers
  (libbpf-dev); nothing is downloaded.
- The object goes to build/ebpf/ in the repository (git-ignored), or, when that is not
  writable, to $XDG_CACHE_HOME/grebe (~/.cache/grebe). GREBE_EBPF_OBJECT names a prebuilt one.
- A build failure raises BuildError with clang's message; `grebe up` with datapath "auto"
  then logs it and stays on the Python path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["SOURCE", "BuildError", "object_path", "build", "CLANG_FLAGS"]

SOURCE = Path(__file__).resolve().with_name("grebe_tc.c")
CLANG_FLAGS = ["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"]


class BuildError(RuntimeError):
    """The object could not be built (no clang, no headers, a compile error)."""


def _candidates() -> list[Path]:
    repo = SOURCE.parents[2]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grebe"
    return [repo / "build" / "ebpf" / "grebe_tc.o", cache / "grebe_tc.o"]


def _fresh(obj: Path) -> bool:
    try:
        return obj.stat().st_mtime >= SOURCE.stat().st_mtime and obj.stat().st_size > 0
    except OSError:
        return False


def build(out: Path) -> Path:
    """Compile SOURCE to `out` (atomically: a temp file renamed). Raises BuildError."""
    clang = shutil.which("clang")
    if clang is None:
        raise BuildError("clang not found (Debian: apt-get install clang llvm libbpf-dev)")
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        raise BuildError("libbpf headers not found (Debian: apt-get install libbpf-dev)")
    include = []
    for arch in ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu"):
        if Path(arch, "asm").is_dir():
            include = ["-I", arch]
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [clang, *CLANG_FLAGS, *include, "-c", str(SOURCE), "-o", str(tmp)]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if cp.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"clang failed: {cp.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def object_path() -> Path:
    """A fresh object: GREBE_EBPF_OBJECT, or a built one (building it if needed)."""
    given = os.environ.get("GREBE_EBPF_OBJECT")
    if given:
        return Path(given)
    cands = _candidates()
    for obj in cands:
        if _fresh(obj):
            return obj
    errors = []
    for obj in cands:
        try:
            return build(obj)
        except OSError as e:  # not writable: the next place
            errors.append(f"{obj}: {e}")
    raise BuildError("cannot write the object: " + "; ".join(errors))


def main() -> int:
    try:
        print(object_path())
    except BuildError as e:
        print(f"grebe ebpf build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

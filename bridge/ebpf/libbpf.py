"""ctypes bindings to the distribution's libbpf (libbpf.so.1): open and load an ELF object,
find its programs and maps, read and write map elements, run a program once.

Rules:
- Only the stable libbpf 1.x API is used (bpf_object__open_file, bpf_object__load,
  bpf_object__find_program_by_name, bpf_program__fd, bpf_object__find_map_by_name,
  bpf_map__fd, bpf_map_update_elem, bpf_map_lookup_elem, bpf_map_delete_elem,
  bpf_prog_test_run_opts, bpf_object__close). libbpf 1.x returns NULL / a negative errno
  and sets errno; every failure raises OSError with that errno, so callers tell "no
  permission" (EPERM) from "verifier rejected it" (EINVAL, EACCES).
- No libbpf object outlives `BpfObject.close()`; the kernel objects (programs, maps) live as
  long as a file descriptor or an attached tc filter refers to them.

Theory of operation: `BpfObject(path)` opens and loads the object (maps created, programs
verified and JIT-compiled). `prog_fd(name)` / `map_fd(name)` give file descriptors to hand
to netlink (pyroute2) and to `Map`, a thin typed view over one map fd: keys and values are
bytes of the C struct layout (bridge/ebpf/maps.py builds them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["BpfObject", "Map", "libbpf_available", "LIBBPF"]

LIBBPF = "libbpf.so.1"
BPF_ANY = 0

_lib: ctypes.CDLL | None = None


def load_library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(LIBBPF, use_errno=True)
        vp, cp, ci, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint64
        for name, res, args in (
            ("bpf_object__open_file", vp, [cp, vp]),
            ("bpf_object__load", ci, [vp]),
            ("bpf_object__close", None, [vp]),
            ("bpf_object__find_program_by_name", vp, [vp, cp]),
            ("bpf_program__fd", ci, [vp]),
            ("bpf_object__find_map_by_name", vp, [vp, cp]),
            ("bpf_map__fd", ci, [vp]),
            ("bpf_map_update_elem", ci, [ci, vp, vp, u64]),
            ("bpf_map_lookup_elem", ci, [ci, vp, vp]),
            ("bpf_map_delete_elem", ci, [ci, vp]),
            ("bpf_prog_test_run_opts", ci, [ci, vp]),
            ("libbpf_set_print", vp, [vp]),
        ):
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        _lib = lib
    return _lib


def libbpf_available() -> str | None:
    """None if libbpf.so.1 loads, else why not."""
    try:
        load_library()
    except OSError as e:
        return f"{LIBBPF} not loadable: {e}"
    return None


def _err(what: str, rc: int | None = None) -> OSError:
    code = ctypes.get_errno() or (-rc if rc is not None and rc < 0 else 0) or 1
    return OSError(code, f"{what}: {os.strerror(code)}")


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class Map:
    """One BPF map by fd: fixed-size keys and values as bytes."""

    __slots__ = ("name", "fd", "key_size", "value_size", "ncpus")

    def __init__(self, name: str, fd: int, key_size: int, value_size: int,
                 ncpus: int = 1) -> None:
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.ncpus = ncpus  # per-CPU maps: a lookup returns value_size (8-aligned) per CPU

    def update(self, key: bytes, value: bytes) -> None:
        if len(key) != self.key_size or len(value) != self.value_size:
            raise ValueError(f"{self.name}: key/value of {len(key)}/{len(value)} bytes, "
                             f"want {self.key_size}/{self.value_size}")
        lib = load_library()
        ctypes.set_errno(0)
        rc = lib.bpf_map_update_elem(self.fd, ctypes.c_char_p(key), ctypes.c_char_p(value),
                                     BPF_ANY)
        if rc != 0:
            raise _err(f"update {self.name}", rc)

    def lookup(self, key: bytes) -> bytes | None:
        """The value (per-CPU maps: all CPUs' values back to back), or None if absent."""
        lib = load_library()
        per = (self.value_size + 7) & ~7 if self.ncpus > 1 else self.value_size
        buf = ctypes.create_string_buffer(per * self.ncpus)
        ctypes.set_errno(0)
        rc = lib.bpf_map_lookup_elem(self.fd, ctypes.c_char_p(key), buf)
        if rc != 0:
            if ctypes.get_errno() == 2:  # ENOENT
                return None
            raise _err(f"lookup {self.name}", rc)
        return buf.raw

    def delete(self, key: bytes) -> bool:
        lib = load_library()
        ctypes.set_errno(0)
        return bool(lib.bpf_map_delete_elem(self.fd, ctypes.c_char_p(key)) == 0)


class BpfObject:
    """A loaded ELF object: its programs and maps exist in the kernel until close()."""

    def __init__(self, path: str, quiet: bool = False) -> None:
        lib = load_library()
        if quiet:
            lib.libbpf_set_print(None)
        ctypes.set_errno(0)
        obj = lib.bpf_object__open_file(path.encode(), None)
        if not obj:
            raise _err(f"open {path}")
        self._obj: int | None = obj
        ctypes.set_errno(0)
        rc = lib.bpf_object__load(obj)
        if rc != 0:
            err = _err(f"load {path}", rc)
            self.close()
            raise err

    def prog_fd(self, name: str) -> int:
        lib = load_library()
        prog = lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise KeyError(name)
        fd: int = lib.bpf_program__fd(prog)
        if fd < 0:
            raise _err(f"program {name}", fd)
        return fd

    def map_fd(self, name: str) -> int:
        lib = load_library()
        m = lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise KeyError(name)
        fd: int = lib.bpf_map__fd(m)
        if fd < 0:
            raise _err(f"map {name}", fd)
        return fd

    def test_run(self, prog_fd: int, data: bytes) -> int:
        """Run a tc program once over `data` (BPF_PROG_TEST_RUN); its return value."""
        lib = load_library()
        buf = ctypes.create_string_buffer(data, len(data))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(buf),
                            data_size_in=len(data), repeat=1)
        ctypes.set_errno(0)
        rc = lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
        if rc != 0:
            raise _err("test run", rc)
        return int(opts.retval)

    def close(self) -> None:
        if self._obj:
            load_library().bpf_object__close(self._obj)
            self._obj = None

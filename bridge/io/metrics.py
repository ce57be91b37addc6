"""The I/O layer's Prometheus metrics: system calls, packets, errors, listeners, build info.

Rules (Prometheus naming, https://prometheus.io/docs/practices/naming/):
- One meaning per metric; a label only tells apart parts of that meaning whose sum means
  something (`op` of `grebe_io_syscalls_total`: summed, every system call of the data path).
- Counters end in `_total`; units are in the name, base units (`_bytes`, `_seconds`);
  gauges never end in `_total`. Every metric has one HELP and one TYPE line before its samples.
- Label values come from bounded sets: `op` from `IO_OPS`, `errno_name` from the kernel's
  errno names (`errno.errorcode`, upper case as in errno(3)), anything else is "OTHER".
- The status dict (`Engine.status()["io"]`, what `grebe status` prints) is the source:
  `IO_COUNTERS` maps each of its keys to a metric; a key not in the map is still exported,
  as `grebe_io_<key>_total` (a counter must never vanish from the metrics), and
  tests/unit/io/test_metrics_names.py fails on it so that it gets a proper name.
- Rendering happens at scrape time from plain ints; nothing here runs per packet.

Theory of operation: `io_prometheus(status, version)` walks the status dict once, groups
samples by metric (`_Families`), and writes each family's HELP, TYPE and samples together.
"""

from __future__ import annotations

import errno
import platform
from typing import Any

__all__ = ["io_prometheus", "IO_COUNTERS", "IO_OPS", "errno_label"]

IO_OPS = ("tun_read", "tun_write", "udp_recv", "udp_send")

# status["io"] key -> (metric, labels, type, help)
IO_COUNTERS: dict[str, tuple[str, str, str, str]] = {
    "tun_reads": ("grebe_io_syscalls_total", 'op="tun_read"', "counter",
                  "System calls of the data path's I/O, by operation."),
    "tun_writes": ("grebe_io_syscalls_total", 'op="tun_write"', "counter", ""),
    "udp_recvs": ("grebe_io_syscalls_total", 'op="udp_recv"', "counter", ""),
    "udp_sends": ("grebe_io_syscalls_total", 'op="udp_send"', "counter", ""),
    "tun_packets": ("grebe_io_packets_total", 'op="tun_read"', "counter",
                    "Packets read from the TUN and datagrams received from the UDP socket."),
    "udp_datagrams": ("grebe_io_packets_total", 'op="udp_recv"', "counter", ""),
    "tun_bad_frames": ("grebe_tun_bad_frames_total", "", "counter",
                       "TUN frames with a virtio-net header that could not be split."),
    "pmtu_updates": ("grebe_pmtu_updates_total", "", "counter",
                     "Path MTU changes learned from the kernel (RFC 1191, RFC 8201)."),
    "internal_errors": ("grebe_internal_errors_total", "", "counter",
                        "Batches in which the core raised (a bug; the endpoint goes on)."),
    "keep_warm_ticks": ("grebe_keep_warm_ticks_total", "", "counter",
                        "Shadow calls that keep the packet path warm (keep_warm)."),
    "processes": ("grebe_data_plane_processes", "", "gauge",
                  "Processes running the Python data plane (2 with split_directions)."),
}
_ERRORS = {"udp_send_errors": "udp_send", "tun_write_errors": "tun_write"}
_LISTENERS = {"control": "control", "metrics": "metrics"}
_LISTENER_COUNTERS = {
    "clients": "Clients accepted by the control socket and the metrics listener.",
    "timeouts": "Clients cut at the per-client deadline.",
    "rejected": "Control socket clients refused (not root nor the endpoint's uid).",
}
_ERRNO_NAMES = frozenset(errno.errorcode.values())


def errno_label(name: str) -> str:
    """An errno name as a label value from a bounded set ("emsgsize" -> "EMSGSIZE")."""
    up = name.upper()
    return up if up in _ERRNO_NAMES else "OTHER"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Families:
    """Samples grouped by metric, in first-seen order, each with its HELP and TYPE."""

    __slots__ = ("order",)

    def __init__(self) -> None:
        self.order: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, metric: str, kind: str, help_text: str, labels: str, value: float) -> None:
        fam = self.order.get(metric)
        if fam is None:
            fam = self.order[metric] = (kind, help_text, [])
        elif help_text and not fam[1]:
            self.order[metric] = fam = (kind, help_text, fam[2])
        fam[2].append(f"{metric}{{{labels}}} {value}" if labels else f"{metric} {value}")

    def render(self) -> list[str]:
        lines: list[str] = []
        for metric, (kind, help_text, samples) in self.order.items():
            lines += [f"# HELP {metric} {help_text or metric}", f"# TYPE {metric} {kind}",
                      *samples]
        return lines


def io_prometheus(status: dict[str, Any], version: str | None = None) -> str:
    """Prometheus lines for the I/O layer's counters (from Engine.status()["io"]), the TUN
    MTU, and `grebe_build_info` when `version` is given."""
    fams = _Families()
    io = status.get("io", {})
    for k in sorted(io, key=lambda k: (k not in IO_COUNTERS, k)):
        v = io[k]
        if k in IO_COUNTERS and isinstance(v, int) and not isinstance(v, bool):
            metric, labels, kind, help_text = IO_COUNTERS[k]
            if not help_text:  # the family's HELP is on its first key
                help_text = next(h for m, _, _, h in IO_COUNTERS.values() if m == metric and h)
            fams.add(metric, kind, help_text, labels, v)
        elif k in _ERRORS:
            op = _ERRORS[k]
            errs = v if isinstance(v, dict) else {"other": v} if isinstance(v, int) else {}
            for name, n in sorted(errs.items()):
                fams.add("grebe_io_errors_total", "counter",
                         "Failed system calls of the data path's I/O, by operation and errno.",
                         f'op="{op}",errno_name="{errno_label(name)}"', n)
        elif k in ("udp_gso", "udp_gro") and isinstance(v, bool):
            fams.add("grebe_udp_offload_enabled", "gauge",
                     "1 if the UDP segmentation offload (gso) or receive offload (gro) is in use.",
                     f'feature="{k[4:]}"', int(v))
        elif k in _LISTENERS and isinstance(v, dict):
            for kk, vv in sorted(v.items()):
                if kk in _LISTENER_COUNTERS and isinstance(vv, int):
                    fams.add(f"grebe_listener_{kk}_total", "counter", _LISTENER_COUNTERS[kk],
                             f'listener="{_LISTENERS[k]}"', vv)
        elif isinstance(v, int) and not isinstance(v, bool):  # not named yet: still exported
            fams.add(f"grebe_io_{k}_total", "counter", f"I/O counter {k} (no metric name yet).",
                     "", v)
    mtu = status.get("tun", {}).get("mtu")
    if isinstance(mtu, int):
        fams.add("grebe_tun_mtu_bytes", "gauge", "MTU of the TUN device.", "", mtu)
    if version is not None:
        fams.add("grebe_build_info", "gauge", "Always 1; the labels say which grebe runs.",
                 f'version="{_esc(version)}",python="{platform.python_version()}"', 1)
    lines = fams.render()
    return "\n".join(lines) + "\n" if lines else ""

"""Keep-warm: hold the per-packet code in the CPU caches between sparse packets (issue 3 RTT).

Rules:
- Only while traffic flowed in the last `WARM_FOR` seconds: an idle tunnel ticks nothing.
  And only when neither direction moved during the tick's wait: under load nothing ticks.
- A tick runs the last small packet of one direction through a *shadow* Bridge (the same
  config without `[[inspect]]` rules, sequence policies off, the real peers' MTUs) and throws
  the output away. The real Bridge, its counters, sequence numbers and timers are untouched;
  the shadow is never reported. One shadow per direction, since each data thread ticks its own.
- A shadow that raises is a bug of ours: it is logged once and keep-warm turns itself off.
- With `[[inspect]]` rules of the userspace backend, the TUN thread's tick also moves one hop
  of a throw-away connection through the Terminator's private shadow (`Terminator.warm`,
  bridge/userspace/warm.py): a new inspected connection crosses that code four times.
- `keep_warm = false` in the endpoint's TOML turns it off (GREBE_WARM_TERMINATOR=0 only the
  Terminator's part, for measurements).
- The heap stays warm too (`keep_heap`, called once by `grebe up` before anything else, so
  the forked UDP->TUN process inherits it): glibc gives the top of its heap back to the
  kernel whenever more than M_TRIM_THRESHOLD (128 KiB) is free there, and a bulk stream
  frees two 64 KB batch buffers (a TSO frame's UdpRun, its sealed copy) per batch, so every
  batch page-faulted its buffers in again: 0.35 minor faults and 0.5-0.7 µs per
  datagram on the send path, plain and secure alike (tests/sim/bench_secure_core.py
  --bulk). An 8 MiB trim threshold keeps them mapped (0.00-0.03 faults per datagram); the
  memory stays counted in RSS, steady after warm-up. Setting it turns off glibc's
  dynamic mmap threshold (which rises after big buffers are freed), so that is set too,
  to 1 MiB: a joined GRO batch (up to 256 KB, bridge/io/udp.py JOIN_MAX) that does not
  fit the heap's top is taken from the heap, not from a fresh mmap faulted in each time.
  GREBE_KEEP_HEAP=0 turns it off (for measurements).

Theory of operation. Measured on this lab's machine (a 2-vCPU VM, `tests` and bench lab):
`Bridge.from_tun` on one ping costs 4.5 µs in a tight loop and 13-16 µs run twice in a row, but
120-130 µs as the first thing a thread does after a 10 ms idle wait, 50 µs after 2 ms and 30 µs
after 1 ms (tests/unit/io/bench_cold.py): while a vCPU sleeps, the host runs other work on the
core, and the interpreter's working set (bytecode, objects, dicts) leaves the caches. C tunnels
touch far less memory per packet and pay far less for it. A ping through two gateways crosses
four of these cold starts, which is most of grebe's added RTT at `ping -i 0.01`. So while a
flow is live, an idle data thread wakes every `WARM_TICK_MS` (0.5 ms) and runs its direction's
hot path once. Cost: one shadow call (10-30 µs) per tick per data thread, only in the second
after traffic: 30 % of a core for both lab gateways under `ping -i 0.01` against 11 % without
(tests/lab/keepwarm_cost.sh); the bench prints the RTT with and without it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from bridge.config import Config
from bridge.pipeline import Bridge, Output

log = logging.getLogger("grebe.warm")

WARM_TICK_MS = float(os.environ.get("GREBE_WARM_TICK_MS", "0.5"))  # poll timeout while warm
WARM_FOR = float(os.environ.get("GREBE_WARM_FOR", "1.0"))  # seconds after the last packet
WARM_TERMINATOR = os.environ.get("GREBE_WARM_TERMINATOR", "1") == "1"
MIN_INNER = 20  # shorter datagrams carry no inner packet: keepalives
SMALL = 512  # only packets up to this size are kept as the warm-up sample (pings, ACKs)
KEEP_HEAP = 8 << 20  # bytes free at the heap's top before glibc trims it (module docstring)
MMAP_FROM = 1 << 20  # allocations from this size on are mmapped (module docstring)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters (glibc malloc.h)


def keep_heap(threshold: int = KEEP_HEAP, mmap_from: int = MMAP_FROM) -> bool:
    """Raise glibc's trim and mmap thresholds for this process (and children forked
    later); False if this libc has no mallopt (not glibc) or refused, or
    GREBE_KEEP_HEAP=0."""
    if os.environ.get("GREBE_KEEP_HEAP", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_from)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, threshold))


def _shadow_config(cfg: Config) -> Config:
    from bridge.config import DownAction, SeqPolicy

    peers = tuple(dataclasses.replace(p, sequence=SeqPolicy.OFF, down_action=DownAction.NONE)
                  for p in cfg.peers)
    return dataclasses.replace(cfg, peers=peers, inspect=(), metrics_listen=None,
                               control_socket=None)


class Warmer:
    """Shadow Bridges fed the last small packet of each direction. `tun()` and `udp()` are
    called by that direction's data thread only; `note_*` by the pumps (cheap)."""

    def __init__(self, real: Bridge, clock: Callable[[], float] = time.monotonic) -> None:
        self._real = real
        self._clock = clock
        self.rebuild()
        self.enabled = True
        self.ticks = 0
        self.traffic = 0  # batches of real traffic seen (the Runner watches it move)
        self._sync_mtu()

    def rebuild(self) -> None:
        """Shadows of the real Bridge's configuration (at start, and after a reload,
        bridge/io/live.py: the peers changed)."""
        cfg = _shadow_config(self._real.config)
        self._t = Bridge(cfg, 0.0)
        self._u = Bridge(cfg, 0.0)
        self.pkt: Any = None  # last small inner packet from the TUN (bytes)
        self.dgram: Any = None  # last small (payload, addr) from the UDP socket

    def _sync_mtu(self) -> None:
        for sh in (self._t, self._u):
            for sp, rp in zip(sh.peers, self._real.peers, strict=False):
                sp.mtu = rp.mtu

    def note_tun(self, pkts: list[Any]) -> None:
        """A batch read from the TUN (called by the pump before the core sees it)."""
        self.traffic += 1
        p = pkts[0]
        if len(pkts) == 1 and type(p) is bytes and len(p) <= SMALL:
            self.pkt = p

    def note_udp(self, dgs: list[tuple[Any, Any]]) -> None:
        """A batch read from the UDP socket. A lone keepalive (a bare GRE header, or IPIP's
        empty datagram) is not traffic: it must not keep an idle tunnel ticking."""
        p = dgs[0][0]
        if len(dgs) == 1 and type(p) is bytes:
            if len(p) < MIN_INNER:
                return
            if len(p) <= SMALL:
                self.dgram = dgs[0]
        self.traffic += 1

    def tun(self) -> None:
        """One warm-up of the TUN -> peers path, and one hop of the Terminator's own
        throw-away connection when flows are terminated here (bridge/userspace/warm.py)."""
        if not self.enabled:
            return
        if self.pkt is not None:
            self._run(self._t.from_tun, [self.pkt])
        term = self._real.terminator
        if term is not None and WARM_TERMINATOR:
            try:
                term.warm(self._clock(), 0)
            except Exception:  # a bug of ours; the data plane must not notice
                self.enabled = False
                log.exception("keep-warm of the Terminator raised; keep-warm is off from now on")

    def udp(self) -> None:
        """One warm-up of the peers -> TUN path."""
        if self.dgram is None or not self.enabled:
            return
        self._run(self._u.from_udp, [self.dgram])

    def _run(self, fn: Any, batch: list[Any]) -> None:
        self.ticks += 1
        if self.ticks & 1023 == 0:
            self._sync_mtu()  # the real MTUs may have moved (PMTU)
        try:
            fn(batch, 1.0, Output())
        except Exception:  # a bug of ours; the data plane must not notice
            self.enabled = False
            log.exception("keep-warm shadow raised; keep-warm is off from now on")

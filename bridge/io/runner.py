"""The Runner: one thread per direction around an Engine (bridge/io/loop.py); the caller's
thread runs the timers, the control socket, the metrics listener and signals.

Rules:
- Each data thread blocks in poll(2) on its fd plus a stop eventfd, then drains its fd in
  batches of BATCH reads (`Engine.pump_*`); an exception in a data thread is counted in
  `internal_errors` and logged once per kind, never ends the thread.
- The main thread sleeps until the Bridge's earliest timer (`Engine.pump_timer`), a wake-up
  from a data thread that moved it earlier (`Engine.wakeup`), or one of the `extra` fds.
- With the Engine's `sibling` (bridge/io/split.py) the UDP->TUN direction runs in that
  child process instead, forked before any thread starts; the main thread wakes at least
  every `sync_interval` to fold its liveness in, and stops (failed) if it ended.
- `stop()` is safe from a signal handler; `run()` joins every thread, stops the writers and
  the sibling before it returns.

Theory of operation (why threads): ANCHORS.md measured the per-packet kernel work (TUN read,
UDP send, UDP receive, TUN write) as the bottleneck, and one thread per direction as +60 %
over one select loop: while one thread sits in a system call (which releases the GIL),
the other runs Python. So `Runner` runs three threads: TUN->UDP, UDP->TUN, and the main
thread for timers, the control socket, the metrics listener and signals. Each direction
also hands its output to a `Writer` thread: a TUN write of a 64 KB GSO frame, or a GSO
sendmsg, runs the downstream kernel path (forwarding, the receiving namespace's TCP) in the
caller, GIL released, for ~0.2-0.5 ms; overlapped with the next batch's Python it gave
+21 to +43 % single-stream throughput in paired iperf3 runs (GREBE_WRITER_THREADS=0 turns
it off). The I/O counters in `stats` are updated from several threads without a lock, so
they may lose an increment now and then; the Bridge's own counters are exact. Each data thread
blocks in poll(2) on its fd plus a stop eventfd, then drains its fd in batches. `Engine`
holds the pumps and no threads, so tests can drive two Engines deterministically over the
in-memory fakes (`bridge/io/fake.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from bridge.io.loop import BATCH, Engine
from bridge.io.warm import WARM_FOR, WARM_TICK_MS

log = logging.getLogger("grebe.loop")

SWITCH_INTERVAL = "0.005"
WRITER_THREADS = os.environ.get("GREBE_WRITER_THREADS", "1") == "1"


class Runner:
    """Runs an Engine with one thread per direction; the caller's thread does the rest.

    `extra` are (fd, callback) pairs the main thread polls too (control socket, metrics).
    With the engine's `sibling` the UDP->TUN direction runs in that child process instead.
    """

    def __init__(self, engine: Engine,
                 extra: list[tuple[int, Callable[[], None]]] | None = None,
                 writer_threads: bool = WRITER_THREADS) -> None:
        self.engine = engine
        self.writer_threads = writer_threads
        self.extra = extra or []
        self._stop = threading.Event()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self.failed = False  # run() ended because a part of the endpoint died

    def stop(self) -> None:
        """Ask every thread to finish (safe from a signal handler)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.eventfd_write(self._stop_fd, 1)

    def data(self, engine: Engine, fd: int, pump: Callable[[int], int], name: str,
             warm: Callable[[], None] | None = None, stop_fd: int | None = None) -> None:
        """One data thread's body: drain `fd` with `pump` until stop; errors are counted in
        `engine`, and keep-warm follows its warmer (also the body of the UDP->TUN process's
        thread, bridge/io/split.py, with that process's own Engine)."""
        prof_dir = os.environ.get("GREBE_PROFILE")  # developer aid: cProfile per data thread
        if prof_dir:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            try:
                self._data_loop(engine, fd, pump, name, warm, stop_fd)
            finally:
                prof.disable()
                tag = f"{os.getpid()}-{name.replace('>', '')}"
                prof.dump_stats(os.path.join(prof_dir, f"{tag}.prof"))
        else:
            self._data_loop(engine, fd, pump, name, warm, stop_fd)

    def _data_loop(self, engine: Engine, fd: int, pump: Callable[[int], int], name: str,
                   warm: Callable[[], None] | None = None, stop_fd: int | None = None) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._stop_fd if stop_fd is None else stop_fd, select.POLLIN)
        errors: set[str] = set()
        clock = time.monotonic
        wm = engine.warmer
        seen = 0  # wm.traffic when this thread last looked
        last = -WARM_FOR  # when traffic (either direction) was last seen
        while not self._stop.is_set():
            try:
                if pump(BATCH) >= BATCH:
                    continue  # more is waiting: do not sleep
                if warm is None or wm is None:
                    poller.poll()
                    continue
                if wm.traffic != seen:
                    seen = wm.traffic
                    last = clock()
                if clock() - last < WARM_FOR:  # keep-warm (bridge/io/warm.py)
                    # a tick only when neither direction moved during the wait: under load
                    # the other thread keeps the code hot, and a tick would only cost CPU
                    if not poller.poll(WARM_TICK_MS) and wm.traffic == seen:
                        warm()
                else:
                    poller.poll()
            except Exception as e:  # never let a data thread die silently, nor log a flood
                engine.internal_errors += 1
                if type(e).__name__ not in errors:
                    errors.add(type(e).__name__)
                    log.exception("%s thread error (logged once per kind; counted in "
                                  "internal_errors)", name)
                self._stop.wait(0.01)  # back off; a stop still ends the thread at once

    def run(self) -> None:
        """Block until stop(): data threads plus timers and `extra` fds on this thread."""
        import sys

        # A thread that wants the GIL waits up to one switch interval (default 5 ms); ACKs
        # queued behind a busy opposite direction would add that to every RTT.
        sys.setswitchinterval(float(os.environ.get("GREBE_SWITCH_INTERVAL", SWITCH_INTERVAL)))
        e = self.engine
        wm = e.warmer
        dirs = [(e.tun.fileno(), e.pump_tun, "tun->udp", wm.tun if wm else None),
                (e.udp.fileno(), e.pump_udp, "udp->tun", wm.udp if wm else None)]
        if e.secure_udp is not None:
            dirs.append((e.secure_udp.fileno(), e.pump_secure, "secure->tun",
                         wm.udp if wm else None))
        rx = e.sibling
        if rx is not None:  # before any thread starts: the child runs UDP->TUN
            rx.start(e, self.data, self.writer_threads)
            dirs = dirs[:1]
        cap = rx.sync_interval * 1000 if rx is not None else None  # liveness from the child
        wake = e.wakeup.fileno()  # before the data threads: none of their wake-ups is lost
        if self.writer_threads:
            e.start_writers()
        for fd, pump, name, warm in dirs:
            th = threading.Thread(target=self.data, args=(e, fd, pump, name, warm), name=name,
                                  daemon=True)
            th.start()
            self._threads.append(th)
        poller = select.poll()
        handlers: dict[int, Callable[[], None]] = {}
        extra = list(self.extra) + (rx.handlers(e) if rx is not None else [])
        for fd, cb in extra:
            poller.register(fd, select.POLLIN)
            handlers[fd] = cb
        poller.register(wake, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            while not self._stop.is_set():
                t = e.pump_timer()
                e.wakeup.arm(t)
                timeout = None if t is None else max(0.0, t - e.clock()) * 1000
                if cap is not None:
                    timeout = cap if timeout is None else min(timeout, cap)
                    if rx is not None and rx.exited():
                        log.error("the UDP->TUN process ended; stopping")
                        self.failed = True
                        break
                for fd, _ev in poller.poll(timeout):
                    if fd == wake:
                        e.wakeup.clear()
                    elif fd in handlers:
                        try:
                            handlers[fd]()
                        except Exception:
                            log.exception("control handler error")
        finally:
            self._stop.set()
            with contextlib.suppress(OSError):
                os.eventfd_write(self._stop_fd, 1)
            for th in self._threads:
                th.join(timeout=5)
            e.stop_writers()
            if rx is not None:
                rx.stop()
            e.wakeup.close()
            os.close(self._stop_fd)

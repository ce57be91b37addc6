"""The engine's two thread helpers: a Writer thread per direction and the timer's Wakeup.

Rules:
- A `Writer` runs output batches in the order they were put, one at a time, from a bounded
  queue (the producer waits when `depth` are pending); an exception in one is logged and
  the next runs. `idle()` (nothing queued, nothing running) lets the single producer run a
  small batch itself without reordering anything (bridge/io/loop.py `_small`).
- A `Wakeup` is one eventfd: a data thread writes it only when its core call moved the
  deadline earlier than the one the timer thread sleeps toward (`armed`), so a busy data
  path does not wake the timer thread per batch.

Theory of operation: a TUN write of a 64 KB GSO frame, or a GSO sendmsg, runs the downstream
kernel path in the calling thread with the GIL released; done on a Writer it overlaps the
Python work on the next batch (bridge/io/loop.py's docstring has the measurements). Both
live here, apart from the Engine, because they know nothing of the Bridge: threads,
a queue and an eventfd.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("grebe.loop")


class Writer:
    """A thread that runs output batches in order (bounded queue: the producer waits when
    `depth` batches are pending). A TUN write or a GSO sendmsg does the downstream kernel work
    (forwarding, the peer namespace's receive path) synchronously in the calling thread, with
    the GIL released; done here, it overlaps the Python work on the next batch."""

    def __init__(self, name: str, depth: int = 8) -> None:
        self._q: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = \
            collections.deque()
        self._cv = threading.Condition()
        self._depth = depth
        self._stopping = False
        self._busy = False  # an item is running (set and cleared under _cv)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._cv:
            while len(self._q) >= self._depth and not self._stopping:
                self._cv.wait()
            self._q.append((fn, args))
            self._cv.notify_all()

    def idle(self) -> bool:
        """Nothing queued and nothing running: a producer may then run a batch itself
        without reordering anything of its own (no lock: a stale True only means another
        producer added work since, which is not ordered against this one's; the udp->tun
        writer has two, the plain and the secure port's receive directions)."""
        return not self._q and not self._busy

    def _run(self) -> None:
        while True:
            with self._cv:
                self._busy = False
                while not self._q and not self._stopping:
                    self._cv.wait()
                if not self._q:
                    return
                fn, args = self._q.popleft()
                self._busy = True
                self._cv.notify_all()
            try:
                fn(*args)
            except Exception:
                log.exception("writer %s", self._thread.name)

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=5)


class Wakeup:
    """The timer thread sleeps in poll(2) toward the core's earliest deadline (`armed`); a data
    thread whose core call moved that deadline earlier writes this eventfd. The fd is made on
    the first `fileno()` (the Runner's): an Engine that no Runner runs, as in the tests, has
    none and `moved` does nothing."""

    def __init__(self) -> None:
        self.fd = -1
        self.armed = float("inf")

    def fileno(self) -> int:
        if self.fd < 0:
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self.fd

    def arm(self, t: float | None) -> None:
        """The timer thread is about to sleep toward `t` (None: no deadline)."""
        self.armed = float("inf") if t is None else t

    def moved(self, t: float) -> None:
        if t < self.armed and self.fd >= 0:
            self.armed = t
            with contextlib.suppress(OSError):
                os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

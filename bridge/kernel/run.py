"""The kernel termination backend inside `grebe up`: one asyncio loop in its own thread.

Rules
- `grebe up` starts it when the endpoint's `[[inspect]]` rules include a kernel-backend rule
  that is not a plain `forward` carve-out (`needs_kernel_backend`), after the TUN is up, and
  stops it before the TUN goes: the nft table, the policy rules and the `local` routes of
  bridge/kernel/setup.py are removed on every exit path (SIGTERM, SIGINT, an error).
- A thread, not a child process: the backend's counters and live flows are read directly by
  the control socket (`grebe status`, `grebe flows`) and the metrics endpoint, there is one
  process to signal and supervise, and its cleanup shares `grebe up`'s lifetime (a crashed
  child would leave interception behind that nobody removes). The cost is one GIL for the
  data plane and the relay: the relay is I/O-bound (the kernel does TCP) and asyncio's
  callbacks are short, measured in tests/lab/test_inspect_grebe.py's benchmark.
- Every call from other threads goes through the loop (`run_coroutine_threadsafe`,
  `call_soon_threadsafe`): the backend's state is only touched on its own loop.
- SIGHUP (`reload()`, safe from a signal handler) re-reads the `[[inspect]]` rules of the
  endpoint file as `python -m bridge.kernel` does: new flows follow the new rules, live flows
  keep theirs, a bad file is refused and logged and the old rules stay.

Theory of operation
`start()` creates a new event loop, runs it in a daemon thread and waits for
`TproxyBackend.start()` on it (a failure there is re-raised in the caller, with the loop
torn down). `status()` asks the loop for the backend's state and adds the nft `rejected`
counter (read with `nft -j` in the caller's thread, never on the loop). `stop()` waits for
`TproxyBackend.stop()` on the loop, then stops and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bridge.flows import Backend, InspectRule, Verdict
from bridge.kernel.relay import TproxyBackend, reload_rules
from bridge.kernel.setup import TproxySettings, nft_rejected

log = logging.getLogger("grebe.tproxy")
T = TypeVar("T")


def needs_kernel_backend(rules: Sequence[InspectRule]) -> bool:
    """True when a kernel-backend rule inspects or drops (a forward carve-out alone does not)."""
    return any(r.backend is Backend.KERNEL and r.action is not Verdict.FORWARD for r in rules)


class KernelBackendThread:
    """A TproxyBackend on its own asyncio loop, driven from `grebe up`'s threads."""

    def __init__(self, rules: Sequence[InspectRule], settings: TproxySettings | None = None,
                 config_path: str | None = None, *, install: bool = True,
                 backend: TproxyBackend | None = None) -> None:
        self.settings = settings or TproxySettings()
        self.config_path = config_path
        self.backend = backend or TproxyBackend(rules, self.settings, install=install)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()     # a second SIGTERM waits for the first stop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> None:
        """Install the interception and listen; raises what TproxyBackend.start raised."""
        if self._loop is not None:
            raise RuntimeError("kernel backend already started")
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tproxy", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.backend.start(), loop).result(timeout)
        except BaseException:
            self._end_loop()
            raise

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def call(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """Run `fn()` on the backend's loop and return its result."""
        if self._loop is None or not self.running:
            raise RuntimeError("kernel backend not running")

        async def on_loop() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(timeout)

    def status(self, with_flows: bool = True) -> dict[str, Any]:
        """The backend's summary, counters, rules and (optionally) live flows with TCP_INFO."""
        rejected = nft_rejected(self.settings) if self.backend.install else None
        st = self.call(lambda: self.backend.status(rejected))
        if not with_flows:
            st.pop("flows", None)
        return st

    def flows(self) -> list[dict[str, Any]]:
        flows: list[dict[str, Any]] = self.status()["flows"]
        return flows

    def reload(self) -> None:
        """SIGHUP: re-read the rules from the endpoint file (safe from a signal handler)."""
        if self._loop is None or self.config_path is None:
            return
        self._loop.call_soon_threadsafe(reload_rules, self.backend, self.config_path)

    def stop(self, timeout: float = 30.0) -> None:
        """End every relay, remove the interception, stop the thread. Idempotent and safe
        from two threads at once (the second returns when the first is done)."""
        with self._stop_lock:
            loop = self._loop
            if loop is None:
                return
            try:
                if self.running:
                    asyncio.run_coroutine_threadsafe(self.backend.stop(), loop).result(timeout)
            except Exception:  # noqa: BLE001 - report, then still stop the thread
                log.exception("tproxy: stopping the kernel backend failed")
            finally:
                self._end_loop()

    def _end_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        if thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()


def start_for_config(cfg: Any, ctl: Any, settings: TproxySettings | None = None, *,
                     install: bool = True) -> KernelBackendThread | None:
    """`grebe up`: start the kernel backend if `cfg` has kernel rules; wire it to `ctl`.

    Adds `"inspect_kernel"` (summary, counters, rules) to the `status` command and appends the
    kernel flows (`"backend": "kernel"`, TCP_INFO legs) to the `flows` command, keeping the
    userspace answer (`"backend": "userspace"`). Returns None when there is nothing to run.
    Raises ConfigError for bad rules and what TproxyBackend.start raises (nft, netlink).
    """
    rules = cfg.inspect_rules()
    if not needs_kernel_backend(rules):
        return None
    kb = KernelBackendThread(rules, settings, cfg.path, install=install)
    kb.start()
    status_cmd = ctl.commands.get("status")
    flows_cmd = ctl.commands.get("flows")

    def status(req: dict[str, Any]) -> dict[str, Any]:
        st: dict[str, Any] = status_cmd(req) if status_cmd is not None else {}
        st["inspect_kernel"] = kb.status(with_flows=False)
        return st

    def flows(req: dict[str, Any]) -> dict[str, Any]:
        ans: dict[str, Any] = (flows_cmd(req) if flows_cmd is not None
                               else {"flows": [], "inspect": {}})
        for f in ans.get("flows", []):
            f.setdefault("backend", "userspace")
        k = kb.status()
        ans["flows"] = list(ans.get("flows", [])) + k.pop("flows")
        ans["inspect_kernel"] = k
        return ans

    ctl.register("status", status)
    ctl.register("flows", flows)
    return kb

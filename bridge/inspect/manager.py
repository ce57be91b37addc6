"""Running inspectors: loading them from the rules, and the per-rule chain every backend calls.

Rules of this module
- `InspectorManager(rules)` instantiates each rule's inspectors once, in the order the rule lists
  them: built-in names ("log", "http", ...) or "package.module:Class" (bridge/inspect/rules.py
  `load_inspector`). A name that does not import is a ConfigError at start-up
  ("inspect[0].inspectors[2]: ..."), never a data-path error; so is a bad declared option.
- `InspectorChain` calls the hooks in order and owns the error policy (mitmproxy's `safecall`):
  an exception in a hook is logged once with a short traceback, counted, and recorded in
  `flow.metadata["errors"]`; then `fail_open = true` keeps the flow going with the data
  unchanged and that inspector switched off for the rest of the flow (its state may be half
  updated), while `fail_open = false` resets the flow (CloseReason.INSPECTOR_ERROR).
- The chain never raises on account of an inspector and never does I/O; `flush()` does (called
  by the adapter on a timer, off the data path).
- `observe_only`: every inspector of the rule declares `observer = True` (bridge/inspect/api.py)
  and `fail_open` is true, so `data()` returns its input unchanged whatever happens: a backend
  may then forward a chunk first and inspect it just after (the userspace splice does, for
  small chunks, to keep h11 parsing off the time to first byte).

Theory of operation
For each chunk a backend read, `data()` passes the bytes through the inspectors in order, each
seeing the previous one's output; a RESET stops the chain and is returned, a DROP/b"" returns
b"" (nothing to deliver). When one side half-closes, `eof()` collects what stream rewriters still
hold back: the tail an inspector releases passes through the inspectors after it, so the result
is exactly what must be written before the FIN. `end()` calls flow_end on all inspectors, those
with `runs_last` (the log writer) after the others so they see the complete metadata.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable
from typing import Any

from bridge.errors import ConfigError
from bridge.flows import InspectRule, Verdict
from bridge.inspect.api import (
    ALLOW,
    RESET,
    Allow,
    CloseReason,
    DataResult,
    Deny,
    Direction,
    Flow,
    Inspector,
    Marker,
)
from bridge.inspect.rules import load_inspector

log = logging.getLogger("grebe.inspect")

class InspectorChain:
    """The inspectors of one rule, with its fail_open policy. Shared by all flows of the rule."""

    __slots__ = ("rule", "inspectors", "names", "fail_open", "counters", "_end_order",
                 "observe_only")

    def __init__(self, rule: InspectRule, inspectors: list[Any]) -> None:
        self.rule = rule
        self.inspectors = inspectors
        self.names = [type(i).__name__ for i in inspectors]
        self.fail_open = rule.fail_open
        self.counters = {"flows": 0, "denied": 0, "errors": 0, "resets": 0}
        order = [i for i, x in enumerate(inspectors) if not getattr(x, "runs_last", False)]
        self._end_order = order + [i for i in range(len(inspectors)) if i not in order]
        # every inspector only watches, and an error cannot reset the flow: a backend may
        # forward a chunk before the chain sees it (bridge/userspace/splice.py "observer chains")
        self.observe_only = bool(inspectors) and rule.fail_open and all(
            getattr(i, "observer", False) is True for i in inspectors)

    def _disabled(self, flow: Flow) -> set[int]:
        off: set[int] | None = flow.state.get(self)
        if off is None:
            off = flow.state[self] = set()
        return off

    def _failed(self, flow: Flow, index: int, hook: str, exc: BaseException) -> bool:
        """Record an inspector exception. Returns True when the flow may go on (fail open)."""
        name = self.names[index]
        self.counters["errors"] += 1
        short = "".join(traceback.format_exception(exc, limit=-3)).rstrip()
        log.warning("inspector %s.%s raised on flow %s (rule %s, fail_open=%s):\n%s",
                    name, hook, flow.id, self.rule.name, self.fail_open, short)
        flow.metadata.setdefault("errors", []).append(f"{name}.{hook}: {exc!r}")
        if self.fail_open:
            self._disabled(flow).add(index)
            return True
        flow.close_reason = CloseReason.INSPECTOR_ERROR
        self.counters["resets"] += 1
        return False

    def start(self, flow: Flow) -> Allow | Deny:
        """Run flow_start hooks. Returns the first Deny, or Deny on an error when fail-closed."""
        self.counters["flows"] += 1
        for i, insp in enumerate(self.inspectors):
            try:
                res = insp.flow_start(flow)
            except Exception as exc:  # noqa: BLE001 - the policy of this class
                if self._failed(flow, i, "flow_start", exc):
                    continue
                return Deny(f"{self.names[i]} failed")
            if isinstance(res, Deny):
                self.counters["denied"] += 1
                flow.close_reason = CloseReason.DENIED
                flow.metadata.setdefault("denied", res.reason)
                return res
        return ALLOW

    def data(self, flow: Flow, direction: Direction, data: bytes,
             first: int = 0) -> bytes | Marker:
        """Pass one chunk through the inspectors from index `first`. Returns bytes or RESET."""
        off = flow.state.get(self)
        inspectors = self.inspectors
        for i in range(first, len(inspectors)):
            if off and i in off:
                continue
            try:
                res: DataResult = inspectors[i].data(flow, direction, data)
            except Exception as exc:  # noqa: BLE001
                if self._failed(flow, i, "data", exc):
                    continue
                return RESET
            if res is None:
                continue
            if res is RESET:
                flow.close_reason = CloseReason.INSPECTOR_RESET
                self.counters["resets"] += 1
                return RESET
            if isinstance(res, Marker) or not res:
                return b""     # DROP or b"": nothing to deliver
            data = bytes(res)
        return data

    def eof(self, flow: Flow, direction: Direction) -> bytes | Marker:
        """The sender half-closed: bytes still to deliver before the FIN (maybe b""), or RESET."""
        out = b""
        for i, insp in enumerate(self.inspectors):
            off = flow.state.get(self)
            if off and i in off:
                continue
            try:
                tail = insp.eof(flow, direction)
            except Exception as exc:  # noqa: BLE001
                if self._failed(flow, i, "eof", exc):
                    continue
                return RESET
            if tail:
                passed = self.data(flow, direction, bytes(tail), first=i + 1)
                if passed is RESET:
                    return RESET
                out += passed  # type: ignore[operator]
        return out

    def end(self, flow: Flow, reason: CloseReason) -> None:
        """Run flow_end hooks (never raises)."""
        flow.close_reason = reason
        for i in self._end_order:
            try:
                self.inspectors[i].flow_end(flow, reason)
            except Exception as exc:  # noqa: BLE001
                self._failed(flow, i, "flow_end", exc)
        flow.state.clear()


class InspectorManager:
    """Builds one InspectorChain per INSPECT rule and flushes/closes all inspectors."""

    def __init__(self, rules: Iterable[InspectRule], path: str = "inspect") -> None:
        self.chains: dict[str, InspectorChain] = {}
        for r, rule in enumerate(rules):
            if rule.action is not Verdict.INSPECT:
                continue
            made = []
            for j, ref in enumerate(rule.inspectors):
                try:
                    made.append(load_inspector(ref, rule, f"{path}[{r}]"))
                except ConfigError:
                    raise
                except Exception as exc:  # noqa: BLE001 - reported as a config error
                    raise ConfigError(f"{path}[{r}].inspectors[{j}]",
                                      f"cannot load {ref!r}: {exc!r}") from exc
            self.chains[rule.name] = InspectorChain(rule, made)

    def chain(self, rule_name: str) -> InspectorChain:
        """The chain of a rule (KeyError for a rule that is not an inspect rule)."""
        return self.chains[rule_name]

    def _each(self) -> Iterable[Any]:
        for chain in self.chains.values():
            yield from chain.inspectors

    def flush(self) -> None:
        """Write what the inspectors buffered. Errors are logged, not raised."""
        for insp in self._each():
            try:
                insp.flush()
            except Exception:  # noqa: BLE001
                log.exception("flush of %s failed", type(insp).__name__)

    def close(self) -> None:
        """Final flush and close of every inspector."""
        for insp in self._each():
            try:
                insp.close()
            except Exception:  # noqa: BLE001
                log.exception("close of %s failed", type(insp).__name__)

    def counters(self) -> dict[str, dict[str, int]]:
        return {name: dict(c.counters) for name, c in self.chains.items()}


__all__ = ["InspectorChain", "InspectorManager", "Inspector"]

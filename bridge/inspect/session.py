"""InspectSession: the byte-stream life of one inspected flow, shared by both termination backends.

Rules of this module
- Sans-I/O: bytes, end-of-stream and resets go in with `now`; actions come out. The kernel
  backend (bridge/kernel/relay.py) executes them on sockets, the userspace splice executes them on
  two TcpConnections (`conn.send`, `conn.close`, `conn.abort`). No clock, no sockets, no logging.
- Each direction is a byte stream through the rule's InspectorChain (bridge/inspect/manager.py).
  Bytes are counted as received, before any rewrite (`flow.bytes_c2s` / `flow.bytes_s2c`).
- Half-close is propagated (RFC 9293 §3.6: a FIN closes one direction only): the end of one
  direction releases what the chain still holds for it, then a HalfClose for the other side.
  Both directions finished = the flow is CLOSED.
- An abort is propagated as an abort: a peer's RST, an inspector RESET, an inspector error with
  fail_open = false, a Deny at flow start, a failed upstream connect, or shutdown all end in one
  `Abort(reason)` for the adapter (RST both ways, RFC 9293 §3.10.7.4 style).
- `flow_end` runs exactly once, whichever way the flow ends; after that every input is ignored
  (a late segment or callback cannot resurrect a finished flow).

Theory of operation
The adapter calls `start(now)` before it opens the upstream leg (False: abort the client), then
feeds `received(direction, data, now)`, `eof(direction, now)`, `reset(direction, now)` or
`abort(reason, now)`, and performs the returned actions in order:
    Deliver(direction, data)   write `data` to the receiver of `direction`
    HalfClose(direction)       send FIN to the receiver of `direction` (shutdown(SHUT_WR))
    Abort(reason)              reset both legs
    Closed()                   close both legs normally (both FINs were exchanged)
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.inspect.api import C2S, RESET, CloseReason, Deny, Direction, Flow
from bridge.inspect.manager import InspectorChain


@dataclass(frozen=True, slots=True)
class Deliver:
    direction: Direction
    data: bytes


@dataclass(frozen=True, slots=True)
class HalfClose:
    direction: Direction


@dataclass(frozen=True, slots=True)
class Abort:
    reason: CloseReason


@dataclass(frozen=True, slots=True)
class Closed:
    pass


Action = Deliver | HalfClose | Abort | Closed
_NOTHING: list[Action] = []


class InspectSession:
    """One inspected flow's streams; see the module docstring. `chain=None` relays untouched."""

    __slots__ = ("flow", "chain", "finished", "reason", "_eof")

    def __init__(self, flow: Flow, chain: InspectorChain | None) -> None:
        self.flow = flow
        self.chain = chain
        self.finished = False
        self.reason: CloseReason | None = None
        self._eof: set[Direction] = set()

    def start(self, now: float) -> bool:
        """Run flow_start. True: open the upstream leg. False: the flow is denied (finished)."""
        self.flow.start = self.flow.last_seen = now
        if self.chain is None:
            return True
        if isinstance(self.chain.start(self.flow), Deny):
            self._finish(CloseReason.DENIED, now)
            return False
        return True

    def received(self, direction: Direction, data: bytes, now: float) -> list[Action]:
        """Bytes arrived from the sender of `direction`."""
        if self.finished or direction in self._eof:
            return _NOTHING
        flow = self.flow
        flow.last_seen = now
        if direction is C2S:
            flow.bytes_c2s += len(data)
        else:
            flow.bytes_s2c += len(data)
        if self.chain is None:
            return [Deliver(direction, data)]
        out = self.chain.data(flow, direction, data)
        if out is RESET:
            return self.abort(flow.close_reason or CloseReason.INSPECTOR_RESET, now)
        return [Deliver(direction, out)] if out else _NOTHING  # type: ignore[arg-type]

    def eof(self, direction: Direction, now: float) -> list[Action]:
        """The sender of `direction` half-closed (FIN)."""
        if self.finished or direction in self._eof:
            return _NOTHING
        self._eof.add(direction)
        self.flow.last_seen = now
        actions: list[Action] = []
        if self.chain is not None:
            tail = self.chain.eof(self.flow, direction)
            if tail is RESET:
                return self.abort(self.flow.close_reason or CloseReason.INSPECTOR_RESET, now)
            if tail:
                actions.append(Deliver(direction, tail))  # type: ignore[arg-type]
        actions.append(HalfClose(direction))
        if len(self._eof) == 2:
            self._finish(CloseReason.CLOSED, now)
            actions.append(Closed())
        return actions

    def reset(self, direction: Direction, now: float) -> list[Action]:
        """The sender of `direction` aborted (RST): reset the other side too."""
        return self.abort(CloseReason.CLIENT_RESET if direction is C2S
                          else CloseReason.SERVER_RESET, now)

    def abort(self, reason: CloseReason, now: float) -> list[Action]:
        """End the flow with resets for `reason` (connect failure, shutdown, timeout...)."""
        if self.finished:
            return _NOTHING
        self._finish(reason, now)
        return [Abort(reason)]

    def _finish(self, reason: CloseReason, now: float) -> None:
        self.finished = True
        self.reason = reason
        self.flow.end = now
        if self.chain is not None:
            self.chain.end(self.flow, reason)
        else:
            self.flow.close_reason = reason

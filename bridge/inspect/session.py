"""InspectSession: the life of one inspected flow, the same for both termination backends.

Rules of this module
- Sans-I/O: bytes, end-of-stream and resets go in with `now`; what the transport must do comes
  out as return values. The kernel backend (bridge/kernel/relay.py) does it on two sockets,
  the userspace splice (bridge/userspace/splice.py) on two TcpConnections. No clock, no
  sockets, no logging here; the chain (bridge/inspect/manager.py) owns the inspectors' errors.
- Each direction is a byte stream through the rule's InspectorChain. Bytes are counted as
  received, before any rewrite (`flow.bytes_c2s` / `flow.bytes_s2c`), even after the flow
  ended (what the legs still deliver then is counted, not inspected).
- Half-close is propagated (RFC 9293 §3.6: a FIN closes one direction only): the end of one
  direction releases what the chain still holds for it, delivered before the FIN. When both
  directions ended, the transport closes normally once it delivered everything and says so
  with `close(now)` (CloseReason.CLOSED).
- An abort is propagated as an abort: a peer's RST, an inspector RESET, an inspector error with
  fail_open = false, a failed upstream connect, an idle flow or shutdown all end in one
  `Abort(reason)` for the transport (RST both ways, RFC 9293 §3.10.7.4 style). A Deny at flow
  start ends the flow before the upstream is opened (CloseReason.DENIED).
- `flow_end` runs exactly once, whichever way the flow ends, after the inspectors saw every
  byte that moved; after that every input is ignored (a late segment or callback cannot
  resurrect a finished flow).
- Observer tap (`tap=True`, the userspace splice): when every inspector of the rule only
  watches (`InspectorChain.observe_only`), `received` hands the chunk back at once and the
  chain sees it later, in `drain(now)`: the transport forwards it in the call that received
  it. The tap holds at most TAP_MAX bytes, in arrival order; a chunk that would overflow it
  drains the tap and is inspected inline. It is due TAP_DELAY after its first chunk
  (`tap_due`; the owner's timer calls `drain`). An end of stream passes at once too (an
  observer holds back no tail) and `chain.eof` joins the tap behind the chunks before it.
  The tap is drained before `flow_end`, each chunk with `flow.last_seen` at its arrival.

Theory of operation
The transport calls `start(now)` before it opens the upstream leg (False: refuse the client),
`opened()` once both legs exist, then feeds what its legs report and acts on the answer:
    received(d, data, now) -> bytes | Abort | None
        bytes: hand them to the receiver of `d` now (b"": the chain swallowed the chunk)
    eof(d, now) -> bytes | Abort | None
        bytes: hand them to the receiver of `d`, then half-close it (FIN after them)
    reset(d, now) / abort(reason, now) / close(now) / drain(now) -> Abort | None
Abort(reason): reset both legs; None: nothing to do (or the flow had already ended). After
an Abort the flow is finished: `finished`, `flow.close_reason`, `flow.end` are set.
`both_ended` says that both directions reached their end of stream. `info(now, ...)` is the
flow's part of the `grebe flows` record both backends show.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from bridge.inspect.api import C2S, RESET, CloseReason, Deny, Direction, Flow
from bridge.inspect.manager import InspectorChain

__all__ = ["Abort", "InspectSession", "Phase", "TAP_DELAY", "TAP_MAX"]

TAP_MAX = 16 * 1024  # bytes an observer chain may be behind the forwarded stream (per flow)
TAP_DELAY = 0.005  # seconds from a tap's first chunk to its inspection (drain)


@dataclass(frozen=True, slots=True)
class Abort:
    """Reset both legs: the flow ended with `reason`."""

    reason: CloseReason


class Phase:
    """Where a flow is in its life (plain strings for `grebe flows`)."""

    CONNECTING = "connecting"       # flow_start ran, the upstream leg is opening
    OPEN = "open"                   # both legs exist
    ENDED = "ended"                 # flow_end called; the legs may still be finishing


class InspectSession:
    """One inspected flow's streams; see the module docstring. `chain=None` relays untouched."""

    __slots__ = ("flow", "chain", "finished", "phase", "tap_due", "_eof", "_observe", "_tap",
                 "_tap_bytes")

    def __init__(self, flow: Flow, chain: InspectorChain | None, *, tap: bool = False) -> None:
        self.flow = flow
        self.chain = chain
        self.finished = False
        self.phase = Phase.CONNECTING
        self._eof: set[Direction] = set()
        self._observe = tap and chain is not None and chain.observe_only
        # chunks forwarded before the chain saw them: (arrival, direction, bytes or None = EOF)
        self._tap: deque[tuple[float, Direction, bytes | None]] = deque()
        self._tap_bytes = 0
        self.tap_due: float | None = None   # when the tap's inspection is due (None: empty)

    # ------------------------------------------------------------------ the life

    def start(self, now: float) -> bool:
        """Run flow_start. True: open the upstream leg. False: the flow is denied (finished)."""
        self.flow.start = self.flow.last_seen = now
        if self.chain is not None and isinstance(self.chain.start(self.flow), Deny):
            self._finish(CloseReason.DENIED, now)
            return False
        return True

    def opened(self) -> None:
        """The transport has both legs (upstream connected, client leg up)."""
        if not self.finished:
            self.phase = Phase.OPEN

    def received(self, d: Direction, data: bytes, now: float) -> bytes | Abort | None:
        """Bytes arrived from the sender of `d`: what to hand to its receiver now."""
        flow = self.flow
        flow.last_seen = now
        n = len(data)
        if d is C2S:
            flow.bytes_c2s += n
        else:
            flow.bytes_s2c += n
        if self.finished or d in self._eof:
            return None
        chain = self.chain
        if chain is None:
            return data
        if self._observe:
            if self._tap_bytes + n <= TAP_MAX:  # forward now, inspect in drain()
                if not self._tap:
                    self.tap_due = now + TAP_DELAY
                self._tap.append((now, d, data))
                self._tap_bytes += n
                return data
            stop = self.drain(now)  # order: the tapped chunks first
            if stop is not None:
                return stop
        out = chain.data(flow, d, data)
        if out is RESET:
            return self.abort(flow.close_reason or CloseReason.INSPECTOR_RESET, now)
        return out  # type: ignore[return-value]

    def eof(self, d: Direction, now: float) -> bytes | Abort | None:
        """The sender of `d` half-closed (FIN): the bytes to deliver before passing it on."""
        if self.finished or d in self._eof:
            return None
        self._eof.add(d)
        self.flow.last_seen = now
        chain = self.chain
        if chain is None:
            return b""
        if self._observe:
            # an observer holds nothing back (bridge/inspect/api.py), so its eof() cannot add
            # bytes before the FIN: the FIN goes on now and chain.eof runs in drain(), after
            # the tapped chunks (a response that carries the FIN is not held up by parsing)
            if not self._tap:
                self.tap_due = now + TAP_DELAY
            self._tap.append((now, d, None))
            return b""
        tail = chain.eof(self.flow, d)
        if tail is RESET:
            return self.abort(self.flow.close_reason or CloseReason.INSPECTOR_RESET, now)
        return tail  # type: ignore[return-value]

    @property
    def both_ended(self) -> bool:
        """Both senders half-closed: once it delivered everything, the transport may close."""
        return len(self._eof) == 2

    def close(self, now: float) -> Abort | None:
        """The transport closed both directions normally: the flow ends (CLOSED)."""
        if self.finished:
            return None
        return self._finish(CloseReason.CLOSED, now)

    def reset(self, d: Direction, now: float) -> Abort | None:
        """The sender of `d` aborted (RST): reset the other side too."""
        return self.abort(CloseReason.CLIENT_RESET if d is C2S else CloseReason.SERVER_RESET,
                          now)

    def abort(self, reason: CloseReason, now: float) -> Abort | None:
        """End the flow with resets for `reason` (connect failure, idle, shutdown...)."""
        if self.finished:
            return None
        stop = self._finish(reason, now)
        return stop if stop is not None else Abort(self.flow.close_reason or reason)

    # ------------------------------------------------------------------ the observer tap

    @property
    def tapped(self) -> int:
        """Bytes forwarded that the chain has not seen yet."""
        return self._tap_bytes

    def drain(self, now: float) -> Abort | None:
        """Run the chain on the tapped chunks (and ends of stream), in arrival order. A RESET
        (an observer that broke its word) aborts the flow."""
        tap = self._tap
        chain = self.chain
        if not tap or chain is None:
            return None
        flow = self.flow
        last = flow.last_seen
        self.tap_due = None
        while tap:
            t, d, data = tap.popleft()
            flow.last_seen = t
            if data is None:  # the sender's FIN; an observer's tail is ignored
                res: Any = chain.eof(flow, d)
            else:
                self._tap_bytes -= len(data)
                res = chain.data(flow, d, data)
            if res is RESET and not self.finished:
                tap.clear()
                self._tap_bytes = 0
                flow.last_seen = last
                return self.abort(flow.close_reason or CloseReason.INSPECTOR_RESET, now)
        flow.last_seen = last
        return None

    # ------------------------------------------------------------------ the end

    def _finish(self, reason: CloseReason, now: float) -> Abort | None:
        """flow_end, once, after the chain saw every byte that moved. Returns the Abort when
        draining the tap reset the flow instead (then it ended with that reason)."""
        if self._tap:
            stop = self.drain(now)
            if stop is not None:
                return stop
        self.finished = True
        self.phase = Phase.ENDED
        flow = self.flow
        flow.end = now
        if self.chain is not None:
            if reason in (CloseReason.INSPECTOR_RESET, CloseReason.INSPECTOR_ERROR):
                reason = flow.close_reason or reason
            self.chain.end(flow, reason)
        else:
            flow.close_reason = reason
        return None

    # ------------------------------------------------------------------ introspection

    def info(self, now: float, created: float, idle_since: float) -> dict[str, Any]:
        """The flow's part of a `grebe flows` record (the backend adds its legs)."""
        flow = self.flow
        return {
            "id": flow.id, "src": flow.src, "sport": flow.sport, "dst": flow.dst,
            "dport": flow.dport, "ip": flow.version, "proto": "tcp", "rule": flow.rule,
            "phase": self.phase, "age": round(now - created, 3),
            "idle": round(now - idle_since, 3),
            "inspectors": list(self.chain.names) if self.chain is not None else [],
            "bytes_c2s": flow.bytes_c2s, "bytes_s2c": flow.bytes_s2c,
            "close": flow.close_reason.value if flow.close_reason is not None else None,
        }

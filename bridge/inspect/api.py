"""The inspector API: what a class named in `inspectors = [...]` implements.

Rules of this module
- Inspectors are plain Python objects with synchronous hooks (mitmproxy's addon model). One
  instance is created per `[[inspect]]` rule and shared by all flows of that rule; per-flow state
  lives in `flow.state[self]` (dropped with the flow) or `flow.metadata` (published to others and
  to the `log` inspector's JSON line).
- Hooks run on the data path of every termination backend (kernel TPROXY relay and the userspace
  stack's splice). They must not block: no socket or disk I/O, no sleeping. An inspector that
  writes (log, pcap) appends to an in-memory buffer and writes it out in `flush()`, which the
  adapter calls off the data path (on a timer and at exit).
- The clock is not read by hooks: the adapter stamps `flow.start`, `flow.last_seen` and
  `flow.end` with its `now` before calling them.
- A hook that raises is caught by the chain (`bridge.inspect.manager.InspectorChain`), logged with
  a short traceback and counted; the rule's `fail_open` then decides: continue with the data
  unchanged (and that inspector disabled for the flow) or reset the flow.

Hooks (all optional; the `Inspector` base class provides pass-through defaults)
    flow_start(flow) -> Allow | Deny        before any byte moves (the upstream is not yet open
                                            for the kernel backend)
    data(flow, direction, data) -> bytes | None | DROP | RESET
                                            None: pass unchanged; bytes: the replacement;
                                            b"" or DROP: swallow this chunk; RESET: abort the flow
    eof(flow, direction) -> bytes | None    the sender half-closed: bytes still held back by a
                                            stream rewriter, delivered before the FIN
    flow_end(flow, reason)                  once per flow; reason is a `CloseReason` value
    flush()                                 write buffered output (called off the data path)
    close()                                 final flush at shutdown

Class attributes: `runs_last` (flow_end after the others: the log writer), `observer` (the
inspector never changes, holds back or stops a byte; a backend may then run data() just after
the chunk moved on instead of before: http, tls, pcap and log are observers).

Options (bridge/inspect/options.py): a class declares the settings it reads in
`options = (Option(name, parser, default, help), ...)`, as a mitmproxy addon adds its options
in `load`, and may check them together in the classmethod `check_options(values)` (raise
`OptionError(name, problem)`). They are validated with the configuration, errors naming the
key path, and the inspector reads the values in `rule.options[name]`.

Built-ins: a class with its own `name` ("log", "block", ...) in a module of this package is a
built-in, found by bridge/inspect/rules.py: adding one is adding its module (and its test).
Its options may be keys of the `[[inspect]]` table itself (`table=True`: `log_path`, `block`).

Constructor: `cls(rule)` where `rule` is the `bridge.flows.InspectRule` (settings in
`rule.options`); a class whose __init__ takes no argument is called as `cls()`.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Final

from bridge.flows import FlowKey
from bridge.inspect.options import Option, OptionError

__all__ = ["ALLOW", "C2S", "DROP", "RESET", "S2C", "Allow", "CloseReason", "DataResult", "Deny",
           "Direction", "Flow", "Inspector", "Marker", "Option", "OptionError"]

_ids = itertools.count(1)


class Direction(Enum):
    """Which way bytes move."""

    CLIENT_TO_SERVER = "c2s"
    SERVER_TO_CLIENT = "s2c"

    # Members are singletons compared by identity: hash them so too, in C (Enum.__hash__ is
    # Python code; a splice keys its per-direction state by Direction on every segment).
    __hash__ = object.__hash__

    @property
    def other(self) -> Direction:
        return (Direction.SERVER_TO_CLIENT if self is Direction.CLIENT_TO_SERVER
                else Direction.CLIENT_TO_SERVER)


C2S: Final = Direction.CLIENT_TO_SERVER
S2C: Final = Direction.SERVER_TO_CLIENT


class CloseReason(Enum):
    """Why a flow ended (the `reason` of flow_end, and the log's "close" field)."""

    CLOSED = "closed"                    # both sides finished normally (FIN both ways)
    CLIENT_RESET = "client_reset"        # the client aborted (RST)
    SERVER_RESET = "server_reset"        # the server aborted (RST)
    CONNECT_FAILED = "connect_failed"    # the upstream connection was refused or timed out
    DENIED = "denied"                    # an inspector's flow_start said Deny
    INSPECTOR_RESET = "inspector_reset"  # an inspector returned RESET (e.g. block matched)
    INSPECTOR_ERROR = "inspector_error"  # an inspector raised and fail_open is false
    IDLE = "idle"                        # no byte either way for the rule's idle_timeout
    SHUTDOWN = "shutdown"                # grebe stopped


@dataclass(frozen=True, slots=True)
class Allow:
    """flow_start result: let the flow go on."""


@dataclass(frozen=True, slots=True)
class Deny:
    """flow_start result: refuse the flow (the client gets an RST)."""

    reason: str = "denied"


ALLOW: Final = Allow()


class Marker:
    """DROP and RESET: the data() results that are not bytes."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


DROP: Final = Marker("DROP")     # data(): swallow this chunk, the flow goes on
RESET: Final = Marker("RESET")   # data(): abort the flow both ways (RST)

DataResult = bytes | None | Marker


class Flow:
    """One inspected TCP connection as the inspectors see it (mutable, one per connection)."""

    __slots__ = ("id", "key", "_src", "sport", "_dst", "dport", "rule", "backend", "start",
                 "last_seen", "end", "bytes_c2s", "bytes_s2c", "metadata", "state",
                 "close_reason")

    def __init__(self, key: FlowKey, rule: str, backend: str, start: float) -> None:
        self.id = next(_ids)
        self.key = key
        self.sport = key[3]
        self.dport = key[4]
        self._src: str | None = None  # the text forms, made when first read (ipaddress
        self._dst: str | None = None  # costs ~3 µs each, on a new connection's SYN)
        self.rule = rule
        self.backend = backend
        self.start = start
        self.last_seen = start
        self.end: float | None = None
        self.bytes_c2s = 0      # bytes received from the client (before any rewrite)
        self.bytes_s2c = 0      # bytes received from the server (before any rewrite)
        self.metadata: dict[str, Any] = {}
        self.state: dict[object, Any] = {}
        self.close_reason: CloseReason | None = None

    @property
    def src(self) -> str:
        """The client's address as text ("198.18.1.10", "2001:db8:1::10")."""
        if self._src is None:
            self._src = str(ipaddress.ip_address(self.key[1]))
        return self._src

    @property
    def dst(self) -> str:
        """The server's address as text."""
        if self._dst is None:
            self._dst = str(ipaddress.ip_address(self.key[2]))
        return self._dst

    @property
    def version(self) -> int:
        return self.key[0]

    def __repr__(self) -> str:
        return f"<Flow {self.id} {self.src}:{self.sport} -> {self.dst}:{self.dport} {self.rule}>"


class Inspector:
    """Base class with pass-through hooks; subclass and override what you need."""

    #: a built-in's name in `inspectors = [...]` (set only by the built-ins of this package)
    name: ClassVar[str] = ""
    #: the settings this inspector reads from its rule (bridge/inspect/options.py)
    options: ClassVar[tuple[Option, ...]] = ()

    #: run flow_end after every other inspector of the chain (the log writer sets this)
    runs_last = False
    #: only watches: data() always returns None and eof() returns nothing (no rewrite, drop,
    #: RESET, nor held-back bytes), so a backend may pass a chunk on first and run the hook on
    #: it afterwards, off the latency path (bridge/userspace/splice.py "observer chains")
    observer = False

    @classmethod
    def check_options(cls, values: Mapping[str, Any]) -> None:
        """Check the options together (each alone is checked by its parser); raise
        OptionError(option name, problem). Runs when the inspector is in a rule."""
        return None

    def flow_start(self, flow: Flow) -> Allow | Deny:
        return ALLOW

    def data(self, flow: Flow, direction: Direction, data: bytes) -> DataResult:
        return None

    def eof(self, flow: Flow, direction: Direction) -> bytes | None:
        return None

    def flow_end(self, flow: Flow, reason: CloseReason) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.flush()

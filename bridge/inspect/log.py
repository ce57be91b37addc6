"""Built-in `log` inspector: one JSON line per flow, written when the flow ends.

Rules
- The line holds the 5-tuple, bytes each way (as received, before any rewrite), duration, close
  reason, rule and backend, plus whatever the other inspectors left in `flow.metadata` (the
  `http` inspector's requests, the `tls` inspector's SNI/ALPN, `errors`, `blocked`...).
- `runs_last`: the chain calls this flow_end after the other inspectors'.
- No I/O on the data path: lines go to an in-memory buffer; `flush()` (called by the adapter on a
  timer and at exit) appends them to `log_path`. Without `log_path` the lines go to the Python
  logger "grebe.inspect.flows" at INFO. `$VARS` in the path are expanded once at start
  (e.g. "${GREBE_LAB_DIR}/flows.jsonl" in the lab).
- `start` and `duration` are on the endpoint's monotonic clock (the `now` both backends pass);
  `flush()`, which is I/O and may read clocks, adds `start_utc`, the wall-clock start in ISO 8601.
- Metadata values that JSON cannot encode are written with repr(); the writer never raises on
  account of what another inspector stored.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from bridge.flows import InspectRule
from bridge.inspect.api import CloseReason, Flow, Inspector
from bridge.inspect.options import Option, OptionError, text

flow_log = logging.getLogger("grebe.inspect.flows")


def flow_record(flow: Flow, reason: CloseReason) -> dict[str, Any]:
    """The JSON-able summary of a finished flow."""
    end = flow.end if flow.end is not None else flow.last_seen
    rec: dict[str, Any] = {
        "id": flow.id, "rule": flow.rule, "backend": flow.backend,
        "src": flow.src, "sport": flow.sport, "dst": flow.dst, "dport": flow.dport,
        "start": round(flow.start, 6), "duration": round(max(0.0, end - flow.start), 6),
        "bytes_c2s": flow.bytes_c2s, "bytes_s2c": flow.bytes_s2c, "close": reason.value,
    }
    for k, v in flow.metadata.items():
        rec.setdefault(k, v)
    return rec


class LogInspector(Inspector):
    """Buffers one JSON line per finished flow; see the module docstring."""

    name = "log"
    options = (
        Option("log_path", text, None, "append the JSON lines to this file ($VARS expanded); "
               "without it they go to the logger grebe.inspect.flows", table=True),
    )
    observer = True  # only watches (bridge/inspect/api.py)

    runs_last = True

    @classmethod
    def check_options(cls, values: Mapping[str, Any]) -> None:
        """A log_path that can never be a file is refused (check-config and up): a directory,
        or under something that is not one. A missing directory is created at start."""
        path = os.path.expandvars(values.get("log_path") or "")
        if not path or "$" in path:     # an unset $VAR: only `up`'s environment can tell
            return
        path = os.path.abspath(path)
        if os.path.isdir(path):
            raise OptionError("log_path", f"{path} is a directory (name a file in it)")
        folder = os.path.dirname(path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise OptionError("log_path", f"{folder} is not a directory (the flow records "
                              "could not be written)")

    def __init__(self, rule: InspectRule, max_buffered: int = 1 << 20) -> None:
        path = rule.options["log_path"]
        self.path = os.path.expandvars(path) if path else None
        if self.path:   # created now: a missing directory would lose every flush's records
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o750, exist_ok=True)
        self.max_buffered = max_buffered
        self._records: list[dict[str, Any]] = []
        self._size = 0
        self.dropped_lines = 0

    def flow_end(self, flow: Flow, reason: CloseReason) -> None:
        rec = flow_record(flow, reason)
        size = len(json.dumps(rec, default=repr, separators=(",", ":"))) + 1
        if self._size + size > self.max_buffered:
            self.dropped_lines += 1     # the disk is not keeping up: bounded memory wins
            return
        self._records.append(rec)
        self._size += size

    def pending(self) -> list[str]:
        """Lines not yet flushed (for tests and for the userspace backend's status)."""
        return [json.dumps(r, default=repr, separators=(",", ":")) for r in self._records]

    def flush(self) -> None:
        if not self._records:
            return
        records, self._records, self._size = self._records, [], 0
        offset = time.time() - time.monotonic()  # monotonic `now` -> wall clock
        lines = []
        for rec in records:
            start = dt.datetime.fromtimestamp(rec["start"] + offset, dt.UTC)
            rec["start_utc"] = start.isoformat(timespec="milliseconds")
            lines.append(json.dumps(rec, default=repr, separators=(",", ":")))
        if self.path is None:
            for line in lines:
                flow_log.info("%s", line)
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

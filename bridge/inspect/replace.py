"""Built-in `replace` inspector: rewrite literal byte strings in both directions.

Rules
- `replace = [[pattern, replacement], ...]`: literal byte strings (UTF-8 in the TOML). All
  patterns are searched in one pass, leftmost match first; at one position the pattern listed
  first wins. Replaced text is not searched again.
- Stream-safe across chunk boundaries: patterns are bounded (their length), so each direction
  holds back at most `max(len(pattern)) - 1` bytes, and only when the end of what it has read
  could be the start of a pattern. The result equals replacing in the whole stream at once,
  except when one pattern is a prefix of another (then a shorter match at a chunk's very end may
  win over a longer one that a later chunk would have completed).
- Held-back bytes are released by the next chunk or, when the sender half-closes, by `eof()`
  before the FIN. A tail that looks like a pattern's start waits for the next chunk: with a
  request/response protocol that can delay the last bytes of a message until more data or EOF.
- Changing the length of data changes framing (HTTP Content-Length): use replacements of the
  same length for framed protocols. The count of replacements is in `flow.metadata["replaced"]`.
"""

from __future__ import annotations

import re
from typing import Any

from bridge.errors import ConfigError
from bridge.flows import InspectRule
from bridge.inspect.api import Direction, Flow, Inspector
from bridge.inspect.options import Option


def pairs(value: Any, p: str) -> tuple[tuple[bytes, bytes], ...]:
    """A list of [pattern, replacement] string pairs (UTF-8), patterns not empty."""
    if not isinstance(value, list):
        raise ConfigError(p, "must be a list of [pattern, replacement] pairs")
    out: list[tuple[bytes, bytes]] = []
    for j, item in enumerate(value):
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(s, str) for s in item)):
            raise ConfigError(f"{p}[{j}]", "must be a [pattern, replacement] pair of strings")
        if not item[0]:
            raise ConfigError(f"{p}[{j}][0]", "the pattern must not be empty")
        out.append((item[0].encode(), item[1].encode()))
    return tuple(out)


class ReplaceInspector(Inspector):
    """See the module docstring."""

    name = "replace"
    options = (
        Option("replace", pairs, (), "[pattern, replacement] literal byte strings",
               table=True, required=True),
    )

    def __init__(self, rule: InspectRule) -> None:
        table: tuple[tuple[bytes, bytes], ...] = rule.options["replace"]
        if not table:
            raise ValueError("the replace inspector needs replace pairs")
        self.table: dict[bytes, bytes] = {}
        for pat, rep in table:
            self.table.setdefault(pat, rep)
        self.regex = re.compile(b"|".join(re.escape(p) for p, _ in table))
        self.prefixes = {p[:i] for p, _ in table for i in range(1, len(p))}
        self.hold = max(len(p) for p, _ in table) - 1

    def _held(self, flow: Flow) -> dict[Direction, bytes]:
        held: dict[Direction, bytes] | None = flow.state.get(self)
        if held is None:
            held = flow.state[self] = {}
        return held

    def data(self, flow: Flow, direction: Direction, data: bytes) -> bytes:
        held = self._held(flow)
        buf = held.pop(direction, b"") + data
        out: list[bytes] = []
        pos = 0
        count = 0
        table = self.table
        for m in self.regex.finditer(buf):
            out.append(buf[pos:m.start()])
            out.append(table[m.group()])
            pos = m.end()
            count += 1
        if count:
            flow.metadata["replaced"] = flow.metadata.get("replaced", 0) + count
        cut = self._cut(buf, pos)
        out.append(buf[pos:cut])
        if cut < len(buf):
            held[direction] = buf[cut:]
        return b"".join(out)

    def _cut(self, buf: bytes, start: int) -> int:
        """Index from which buf's tail (after `start`) might begin a pattern."""
        n = len(buf)
        for length in range(min(self.hold, n - start), 0, -1):
            if buf[n - length:] in self.prefixes:
                return n - length
        return n

    def eof(self, flow: Flow, direction: Direction) -> bytes | None:
        return self._held(flow).pop(direction, None)

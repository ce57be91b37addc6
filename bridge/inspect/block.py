"""Built-in `block` inspector: deny flows by destination, reset flows by byte pattern.

Rules
- `block_dst = [prefixes]`: flow_start returns Deny for a destination inside one of them (the
  client gets an RST and no upstream connection is opened).
- `block = [byte regexes]`: a match in either direction returns RESET: the flow is aborted both
  ways (RST to client and server) before the chunk that completed the match is delivered.
- Stream-safe: each direction keeps the last `options.block_window` bytes (default 4096) and
  searches them together with the new chunk, so a match split across reads is found as long as
  it is no longer than the window. Memory is bounded by the window per direction.
- What matched is recorded in `flow.metadata["blocked"]`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from bridge.errors import ConfigError
from bridge.flows import InspectRule
from bridge.inspect.api import RESET, Allow, Deny, Direction, Flow, Inspector, Marker
from bridge.inspect.options import Option, OptionError, integer, prefixes, str_list


def patterns(value: Any, p: str) -> tuple[bytes, ...]:
    """A list of regular expressions, as bytes patterns (UTF-8, surrogates kept)."""
    out: list[bytes] = []
    for j, item in enumerate(str_list(value, p)):
        pat = item.encode("utf-8", "surrogateescape")
        try:
            re.compile(pat)
        except re.error as exc:
            raise ConfigError(f"{p}[{j}]", f"bad regular expression: {exc}") from None
        out.append(pat)
    return tuple(out)


class BlockInspector(Inspector):
    """See the module docstring."""

    name = "block"
    options = (
        Option("block", patterns, (), "byte regexes: a match either way resets the flow",
               table=True),
        Option("block_dst", prefixes, (), "destination prefixes denied at flow start",
               table=True),
        Option("block_window", integer(1, 1 << 30), 4096,
               "bytes kept per direction to find a match split across reads"),
    )

    @classmethod
    def check_options(cls, values: Mapping[str, Any]) -> None:
        if not (values["block"] or values["block_dst"]):
            raise OptionError("block", "the block inspector needs block patterns or block_dst")

    def __init__(self, rule: InspectRule) -> None:
        o = rule.options
        self.dst = o["block_dst"]
        self.patterns = [re.compile(p, re.DOTALL) for p in o["block"]]
        self.window = o["block_window"]

    def flow_start(self, flow: Flow) -> Allow | Deny:
        addr = ipaddress.ip_address(flow.dst)
        for net in self.dst:
            if addr.version == net.version and addr in net:
                flow.metadata["blocked"] = {"dst": str(net)}
                return Deny(f"destination {flow.dst} in {net}")
        return Allow()

    def data(self, flow: Flow, direction: Direction, data: bytes) -> Marker | None:
        if not self.patterns:
            return None
        tails: dict[Direction, bytes] | None = flow.state.get(self)
        if tails is None:
            tails = flow.state[self] = {}
        buf = tails.get(direction, b"") + data
        for pat in self.patterns:
            m = pat.search(buf)
            if m is not None:
                flow.metadata["blocked"] = {"pattern": pat.pattern.decode("latin-1"),
                                            "direction": direction.value}
                return RESET
        tails[direction] = buf[-self.window:]
        return None

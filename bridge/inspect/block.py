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

from bridge.flows import InspectRule
from bridge.inspect.api import RESET, Allow, Deny, Direction, Flow, Inspector, _Marker


class BlockInspector(Inspector):
    """See the module docstring."""

    def __init__(self, rule: InspectRule) -> None:
        self.dst = rule.block_dst
        self.patterns = [re.compile(p, re.DOTALL) for p in rule.block]
        self.window = int(rule.options.get("block_window", 4096))
        if self.window < 1:
            raise ValueError("options.block_window must be positive")

    def flow_start(self, flow: Flow) -> Allow | Deny:
        addr = ipaddress.ip_address(flow.dst)
        for net in self.dst:
            if addr.version == net.version and addr in net:
                flow.metadata["blocked"] = {"dst": str(net)}
                return Deny(f"destination {flow.dst} in {net}")
        return Allow()

    def data(self, flow: Flow, direction: Direction, data: bytes) -> _Marker | None:
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

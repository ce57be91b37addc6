"""Custom inspectors loaded by "module:Class" in the chain tests."""

from __future__ import annotations

from bridge.inspect.api import Direction, Flow, Inspector, Option, OptionError
from bridge.inspect.options import integer, text


class Boom(Inspector):
    """Raises in the hook named by rule.options["boom"]."""

    def __init__(self, rule) -> None:  # type: ignore[no-untyped-def]
        self.where = rule.options.get("boom", "data")
        self.calls = 0

    def flow_start(self, flow: Flow):  # type: ignore[no-untyped-def]
        if self.where == "flow_start":
            raise RuntimeError("boom at start")
        return super().flow_start(flow)

    def data(self, flow: Flow, direction: Direction, data: bytes):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.where == "data":
            raise RuntimeError("boom in data")
        return None

    def flow_end(self, flow, reason):  # type: ignore[no-untyped-def]
        if self.where == "flow_end":
            raise RuntimeError("boom at end")


class Upper:
    """No base class, no constructor argument: duck typing is enough."""

    def flow_start(self, flow):  # type: ignore[no-untyped-def]
        from bridge.inspect.api import ALLOW
        return ALLOW

    def data(self, flow, direction, data):  # type: ignore[no-untyped-def]
        flow.metadata["upper"] = True
        return data.upper()

    def eof(self, flow, direction):  # type: ignore[no-untyped-def]
        return None

    def flow_end(self, flow, reason):  # type: ignore[no-untyped-def]
        return None

    def flush(self):  # type: ignore[no-untyped-def]
        return None

    def close(self):  # type: ignore[no-untyped-def]
        return None


class Dropper:
    def __init__(self) -> None:
        pass

    def flow_start(self, flow):  # type: ignore[no-untyped-def]
        from bridge.inspect.api import ALLOW
        return ALLOW

    def data(self, flow, direction, data):  # type: ignore[no-untyped-def]
        from bridge.inspect.api import DROP
        return DROP if b"drop" in data else None

    def eof(self, flow, direction):  # type: ignore[no-untyped-def]
        return None

    def flow_end(self, flow, reason):  # type: ignore[no-untyped-def]
        return None


class EndNote(Inspector):
    """Adds metadata only in flow_end: the log (runs_last) must still see it."""

    def flow_end(self, flow, reason):  # type: ignore[no-untyped-def]
        flow.metadata["end_note"] = reason.value


class Greeter(Inspector):
    """A custom inspector that declares options (read from the rule's `options` table)."""

    options = (
        Option("greeting", text, "hello", "what to say"),
        Option("times", integer(1, 3), 1, "how often", required=True),
    )

    @classmethod
    def check_options(cls, values):  # type: ignore[no-untyped-def]
        if values["greeting"] == "boo" and values["times"] > 1:
            raise OptionError("times", "one boo is enough")

    def __init__(self, rule) -> None:  # type: ignore[no-untyped-def]
        self.said = rule.options["greeting"] * rule.options["times"]


class Thief(Inspector):
    """Declares an option name a built-in owns: refused at load."""

    options = (Option("block_window", integer(1, 9), 1),)

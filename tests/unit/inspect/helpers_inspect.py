"""Shared helpers for the inspector tests."""

from __future__ import annotations

import tomllib

from bridge.flows import InspectRule, flow_key
from bridge.inspect.api import Flow
from bridge.inspect.rules import parse_rules


def rule(toml_body: str) -> InspectRule:
    """One rule from the body of an [[inspect]] table (name defaults to "r")."""
    text = "[[inspect]]\n" + ("" if "name" in toml_body else 'name = "r"\n') + toml_body
    return parse_rules(tomllib.loads(text)["inspect"])[0]


def flow(dport: int = 80, src: str = "198.18.1.10", dst: str = "198.18.2.10") -> Flow:
    return Flow(flow_key(src, dst, 40000, dport), "r", "kernel", 100.0)


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]

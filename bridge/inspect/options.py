"""Inspector options: what an inspector declares it reads from its `[[inspect]]` rule.

Rules of this module
- An inspector class lists its settings in `options = (Option(...), ...)` (as a mitmproxy
  addon adds its options in `load`): name, parser (the type and its validation), default,
  one line of help, and where the key lives in the rule's table: `table=True` directly in
  `[[inspect]]` (the built-ins' long-standing keys: `log_path`, `block`, `replace`...),
  otherwise in the rule's `options` table (`options = {block_window = 8192}`).
- `required=True`: when the inspector is in the rule's `inspectors`, the option must be given
  and not empty. A class may also check its options together in the classmethod
  `check_options(values)`, raising `OptionError(option name, problem)`.
- A parser takes the TOML value and its key path and returns the value the inspector reads
  (`rule.options[name]`), or raises ConfigError naming the key path ("inspect[1].block[0]").
  Parsers are pure; the common ones are here, an inspector's own ones live beside it.
- Names are unique among the built-ins (bridge/inspect/rules.py checks it): a key means
  one thing in every rule.

Theory of operation
`resolve(options, table, raw_options, path, needed)` reads each declared option from the rule's
table or its `options` table, parses it, fills in defaults, checks `required` for the
inspectors in use (`needed`), and returns {name: value}. bridge/inspect/rules.py calls it for
the built-ins when it parses the rules (errors at configuration time), and for a
`module:Class` inspector when it loads it (`load_inspector`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.errors import ConfigError
from bridge.flows import Network

__all__ = ["Option", "OptionError", "check", "integer", "prefixes", "resolve", "str_list",
           "text", "where"]

Parser = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class Option:
    """One setting an inspector reads from its rule (see the module docstring)."""

    name: str
    parse: Parser
    default: Any = None
    help: str = ""
    table: bool = False         # a key of the [[inspect]] table itself, not of its `options`
    required: bool = False      # must be given (not empty) when the inspector is in the rule


class OptionError(ValueError):
    """Raised by `check_options`: `option` is the name of the option at fault."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


def where(option: Option, path: str) -> str:
    """The key path of an option in rule `path` ("inspect[1].block", "inspect[1].options.x")."""
    return f"{path}.{option.name}" if option.table else f"{path}.options.{option.name}"


def resolve(options: Iterable[Option], table: Mapping[str, Any], raw_options: Mapping[str, Any],
            path: str, needed: bool) -> dict[str, Any]:
    """Parse the declared `options` of one inspector from rule `path`; see the module doc."""
    values: dict[str, Any] = {}
    for opt in options:
        source = table if opt.table else raw_options
        p = where(opt, path)
        if opt.name in source:
            values[opt.name] = opt.parse(source[opt.name], p)
        else:
            values[opt.name] = opt.default
        if needed and opt.required and not values[opt.name]:
            raise ConfigError(p, "required by the inspector (and not empty)")
    return values


def check(cls: Any, values: Mapping[str, Any], declared: Iterable[Option], path: str) -> None:
    """Run `cls.check_options(values)`, turning an OptionError into a ConfigError."""
    fn = getattr(cls, "check_options", None)
    if fn is None:
        return
    try:
        fn(values)
    except OptionError as exc:
        opt = next((o for o in declared if o.name == exc.option), None)
        p = where(opt, path) if opt is not None else f"{path}.options.{exc.option}"
        raise ConfigError(p, exc.message) from None


# ---------------------------------------------------------------------------------------------
# Parsers: (TOML value, key path) -> value, or ConfigError naming the key path
# ---------------------------------------------------------------------------------------------

def text(value: Any, p: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(p, "must be a str")
    return value


def integer(lo: int, hi: int) -> Parser:
    """An int in [lo, hi] (TOML true/false is not a number)."""
    def parse(value: Any, p: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(p, "must be an int")
        if not lo <= value <= hi:
            raise ConfigError(p, f"must be between {lo} and {hi}")
        return value
    return parse


def str_list(value: Any, p: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(p, "must be a list of strings")
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{p}[{j}]", "must be a string")
    return value


def prefixes(value: Any, p: str) -> tuple[Network, ...]:
    """A list of IP prefixes ("198.18.2.0/24", "2001:db8::/32"), host bits zero."""
    nets: list[Network] = []
    for j, item in enumerate(str_list(value, p)):
        try:
            nets.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ConfigError(f"{p}[{j}]", f"not an IP prefix: {exc}") from None
    return tuple(nets)

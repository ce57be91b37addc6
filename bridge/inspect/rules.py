"""The `[[inspect]]` tables and the inspectors they name: rules, built-ins, loading.

Rules of this module
- Pure; only a bad configuration raises: ConfigError (ConfigErrors when several) naming the
  key path of each problem ("inspect[2].dst_ports[1]", "inspect[1].block[0]",
  "inspect[0].options.block_window"); every rule and every independent key is checked.
- `iif` (the incoming interface) is matched by the kernel backend's nft rules only: on a
  userspace rule it is an error, not a silently ignored key.
- `check_imports(rules)` imports the `module:Class` inspectors and checks their declared
  options without instantiating them, so `check-config` finds what `up` would fail on.
- A rule's own keys are fixed here: name, src, dst, dst_ports, inspectors, fail_open, backend,
  action, max_buffer, iif, idle_timeout, connect_first, congestion, options. `congestion`
  ("cubic", the default, or "newreno") is the congestion control of the userspace backend's
  legs (stack/cubic.py). Every other key of the table belongs to an
  inspector: the built-ins declare theirs (`Inspector.options`, bridge/inspect/options.py) and
  are found by `builtins()` below; an unknown key is an error (a typo must not fall back to a
  default). Settings of `module:Class` inspectors go in the `options` table; their declared
  options are checked when the class is loaded (`load_inspector`).
- A built-in's options are parsed wherever they are given, and when the inspector is in the
  rule's `inspectors`, defaults are filled in, `required` ones checked and the class's
  `check_options` run. The values land in `rule.options` under the option's name.
- Rules are first-match in file order (bridge/flows.py); names are unique.
- A built-in inspector is an `Inspector` subclass defined in a module of this package with a
  `name` of its own ("log", "http", ...). `builtins()` finds them by importing the package's
  modules: adding a built-in is adding its module (and its test), no list to extend.
  Two built-ins with one name, or two declaring one option name, are a programming error
  (RuntimeError at the first use), since a key must mean one thing in every rule.
- `load_inspector(ref, rule, path)` instantiates a built-in by name or "package.module:Class":
  `cls(rule)`, or `cls()` when its __init__ takes no argument. A `module:Class` that declares
  `options` gets them resolved from the rule's `options` table first (ConfigError naming
  "inspect[0].options.<name>"), and may not reuse a built-in's option name. Import errors
  are the caller's to report (bridge/inspect/manager.py names the rule and position).

Theory of operation
`parse_rules(raw, path)` walks the list of tables; `_parse_rule` checks the rule's own keys,
then asks each built-in inspector class to resolve its options from the table, and returns
the frozen `InspectRule` with `options` = the `options` table as written, updated with the
built-ins' parsed values. `builtins()` lists the modules next to this file with pkgutil,
imports each (Python caches them) and keeps the classes whose own `name` is set; the manager
asks `load_inspector` for the inspector objects.
"""

from __future__ import annotations

import importlib
import inspect as pyinspect
import pkgutil
import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bridge.configkeys import section_keys
from bridge.errors import ConfigError, ConfigErrors
from bridge.flows import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BUFFER,
    KERNEL_MAX_BUFFER,
    Backend,
    InspectRule,
    Verdict,
)
from bridge.inspect.api import Inspector
from bridge.inspect.options import check, prefixes, resolve, str_list
from stack.cubic import ALGORITHMS

__all__ = ["builtins", "check_imports", "load_inspector", "parse_rules"]

CLASS_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

# The rule's own keys, documented in bridge/configkeys.py (docs/config/inspect.*.md).
_RULE_KEYS = section_keys("inspect")
# Interface names go into nft rule text: Linux IFNAMSIZ (15 chars), no quotes or blanks.
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def parse_rules(raw: list[dict[str, Any]], path: str = "inspect") -> tuple[InspectRule, ...]:
    """Validate the `[[inspect]]` tables.

    Returns the rules in file order. Raises ConfigError, or ConfigErrors when there are several,
    naming each problem's key path ("inspect[1].src[0]"): unknown key, wrong type, bad prefix,
    port or range, an inspector option its inspector rejects, unknown backend/action, an
    inspector name that is neither built in nor `module:Class`, `iif` on a userspace rule,
    duplicate names. Every rule is checked, and every independent key of a rule.
    """
    if not isinstance(raw, list):
        raise ConfigError(path, "must be an array of tables ([[inspect]])")
    if not raw:
        return ()
    known = builtins()
    table_keys = _RULE_KEYS | {o.name for cls in known.values() for o in cls.options if o.table}
    rules: list[InspectRule] = []
    errors: list[ConfigError] = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        rule = _parse_rule(table, f"{path}[{i}]", known, table_keys, errors)
        if rule is None:
            continue
        if rule.name in seen:
            errors.append(ConfigError(f"{path}[{i}].name", f"duplicate rule name {rule.name!r}"))
        seen.add(rule.name)
        rules.append(rule)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
    return tuple(rules)


class _Grab:
    """`with grab:` records a ConfigError raised in the block and goes on (one pass, every
    error); `ConfigErrors` are unpacked."""

    __slots__ = ("errors",)

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, _tb: Any) -> bool:
        if isinstance(exc, ConfigErrors):
            self.errors.extend(exc.errors)
            return True
        if isinstance(exc, ConfigError):
            self.errors.append(exc)
            return True
        return False


def _parse_rule(t: Any, p: str, known: dict[str, Any], table_keys: frozenset[str],
                errors: list[ConfigError]) -> InspectRule | None:
    if not isinstance(t, dict):
        errors.append(ConfigError(p, "must be a table"))
        return None
    before = len(errors)
    grab = _Grab(errors)
    for k in t:
        if k not in table_keys:
            errors.append(ConfigError(f"{p}.{k}",
                                      "unknown key (custom inspector settings go in options)"))
    name = t.get("name")
    if not isinstance(name, str) or not name:
        errors.append(ConfigError(f"{p}.name", "required, a non-empty string"))
    inspectors: tuple[str, ...] = ()
    with grab:
        inspectors = tuple(str_list(t.get("inspectors", []), f"{p}.inspectors"))
        for j, ref in enumerate(inspectors):
            if ref not in known and not CLASS_REF.match(ref):
                errors.append(ConfigError(f"{p}.inspectors[{j}]",
                                          f"{ref!r} is not a built-in ({', '.join(sorted(known))})"
                                          " nor module:Class"))
        if len(set(inspectors)) != len(inspectors):
            raise ConfigError(f"{p}.inspectors", "an inspector is listed twice")
    backend = Backend.USERSPACE
    with grab:
        try:
            backend = Backend(_typed(t, "backend", str, p, "userspace"))
        except ValueError:
            raise ConfigError(f"{p}.backend", "must be \"userspace\" or \"kernel\"") from None
    action = Verdict.INSPECT
    with grab:
        try:
            action = Verdict(_typed(t, "action", str, p, "inspect"))
        except ValueError:
            raise ConfigError(f"{p}.action",
                              "must be \"inspect\", \"forward\" or \"drop\"") from None
    default_buffer = KERNEL_MAX_BUFFER if backend is Backend.KERNEL else DEFAULT_MAX_BUFFER
    max_buffer = default_buffer
    with grab:
        max_buffer = _typed(t, "max_buffer", int, p, default_buffer)
        if not 4096 <= max_buffer <= 1 << 30:
            raise ConfigError(f"{p}.max_buffer", "must be between 4096 and 2**30 bytes")
    congestion = "cubic"
    with grab:
        congestion = _typed(t, "congestion", str, p, "cubic")
        if congestion not in ALGORITHMS:
            raise ConfigError(f"{p}.congestion", f"must be one of {', '.join(ALGORITHMS)}")
    idle = t.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
    if (not isinstance(idle, int | float) or isinstance(idle, bool)
            or not 0 < idle <= 7 * 86400):
        errors.append(ConfigError(f"{p}.idle_timeout",
                                  "must be a number of seconds, 0 < t <= 604800"))
    iif: tuple[str, ...] = ()
    with grab:
        iif = tuple(str_list(t.get("iif", []), f"{p}.iif"))
        for j, name_ in enumerate(iif):
            if not _IFNAME.match(name_):
                errors.append(ConfigError(f"{p}.iif[{j}]", f"{name_!r} is not an interface name"))
        if iif and backend is Backend.USERSPACE:
            raise ConfigError(f"{p}.iif", "only backend = \"kernel\" rules match the incoming "
                              "interface; this rule is userspace (the default)")
    raw_options = t.get("options", {})
    if not isinstance(raw_options, dict):
        errors.append(ConfigError(f"{p}.options", "must be a table"))
        raw_options = {}
    fail_open = True
    with grab:
        fail_open = _typed(t, "fail_open", bool, p, True)
    connect_first = False
    with grab:
        connect_first = _typed(t, "connect_first", bool, p, False)
        if connect_first and backend is Backend.KERNEL:
            raise ConfigError(f"{p}.connect_first", "only backend = \"userspace\" rules choose "
                              "when the server leg opens; the kernel backend accepts first")
    src: Any = ()
    dst: Any = ()
    dst_ports: tuple[tuple[int, int], ...] = ()
    with grab:
        src = prefixes(t.get("src", []), f"{p}.src")
    with grab:
        dst = prefixes(t.get("dst", []), f"{p}.dst")
    with grab:
        dst_ports = _ports(t.get("dst_ports", []), f"{p}.dst_ports")
    settings = dict(raw_options)
    for ref, cls in known.items():
        with grab:
            used = ref in inspectors
            values = resolve(cls.options, t, raw_options, p, used)
            if used:
                check(cls, values, cls.options, p)
                settings.update(values)
            else:   # given for an inspector the rule does not use: checked, kept, no defaults
                settings.update((o.name, values[o.name]) for o in cls.options
                                if o.name in (t if o.table else raw_options))
    if action is Verdict.INSPECT and not inspectors and not any(
            e.path.startswith(f"{p}.inspectors") for e in errors[before:]):
        errors.append(ConfigError(f"{p}.inspectors",
                                  "an inspect rule needs at least one inspector"))
    if len(errors) != before:
        return None
    return InspectRule(
        name=str(name), src=src, dst=dst, dst_ports=dst_ports, inspectors=inspectors,
        fail_open=fail_open, backend=backend, action=action, max_buffer=max_buffer, iif=iif,
        idle_timeout=float(idle), connect_first=connect_first, congestion=congestion,
        options=MappingProxyType(settings),
    )


def _typed(t: dict[str, Any], key: str, kind: type, p: str, default: Any) -> Any:
    value = t.get(key, default)
    # bool is a subclass of int: reject true/false where a number is wanted, and vice versa.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{p}.{key}", f"must be a {kind.__name__}")
    return value


def _ports(value: Any, p: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list):
        raise ConfigError(p, "must be a list of ports and \"lo-hi\" ranges")
    out: list[tuple[int, int]] = []
    for j, item in enumerate(value):
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"\d{1,5}-\d{1,5}", item):
            lo, hi = (int(x) for x in item.split("-"))
        else:
            raise ConfigError(f"{p}[{j}]", f"{item!r} is not a port or \"lo-hi\" range")
        if not (1 <= lo <= hi <= 65535):
            raise ConfigError(f"{p}[{j}]", f"{item!r}: ports are 1-65535 and lo <= hi")
        out.append((lo, hi))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The inspectors: built-ins by name, module:Class by import
# ---------------------------------------------------------------------------------------------

def builtins() -> dict[str, type[Inspector]]:
    """name -> class of every built-in inspector (see the module docstring)."""
    found: dict[str, type[Inspector]] = {}
    owner: dict[str, str] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        module = importlib.import_module(f"{__package__}.{info.name}")
        for obj in vars(module).values():
            if (not isinstance(obj, type) or not issubclass(obj, Inspector)
                    or obj.__module__ != module.__name__ or not obj.__dict__.get("name")):
                continue
            if obj.name in found:
                raise RuntimeError(f"two built-in inspectors named {obj.name!r}")
            found[obj.name] = obj
            for opt in obj.options:
                if opt.name in owner:
                    raise RuntimeError(f"option {opt.name!r} of {obj.name!r} is also "
                                       f"{owner[opt.name]!r}'s")
                owner[opt.name] = obj.name
    return dict(sorted(found.items()))


def _custom_class(ref: str, rule: InspectRule, path: str, known: dict[str, type[Inspector]]
                  ) -> tuple[Any, InspectRule]:
    """Import `module:Class` and resolve its declared options from the rule's `options`
    table: (class, rule with the values). Raises like `load_inspector`."""
    module_name, _, class_name = ref.partition(":")
    cls: Any = getattr(importlib.import_module(module_name), class_name)
    if not callable(cls):
        raise TypeError(f"{ref} is not a class")
    # read from the rule's `options` table (the table's own keys are the built-ins')
    declared = tuple(replace(o, table=False) for o in getattr(cls, "options", ()))
    if declared:
        taken = {o.name for b in known.values() for o in b.options}
        for opt in declared:
            if opt.name in taken:
                raise TypeError(f"option {opt.name!r} is a built-in inspector's option")
        values = resolve(declared, {}, rule.options, path, True)
        check(cls, values, declared, path)
        rule = replace(rule, options=MappingProxyType({**rule.options, **values}))
    return cls, rule


def check_imports(rules: tuple[InspectRule, ...], path: str = "inspect") -> list[ConfigError]:
    """Import every `module:Class` inspector of `rules` and check its declared options, without
    instantiating it: the errors `grebe up` would meet, each naming its key path."""
    known = builtins()
    errors: list[ConfigError] = []
    for i, rule in enumerate(rules):
        for j, ref in enumerate(rule.inspectors):
            if ref in known:
                continue
            try:
                _custom_class(ref, rule, f"{path}[{i}]", known)
            except ConfigError as e:
                errors.append(e)
            except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
                errors.append(ConfigError(f"{path}[{i}].inspectors[{j}]",
                                          f"cannot load {ref!r}: {type(e).__name__}: {e}"))
    return errors


def load_inspector(ref: str, rule: InspectRule, path: str = "inspect[?]") -> Any:
    """Instantiate the inspector named `ref` for `rule` (`path`: the rule's key path).

    Raises ImportError, AttributeError or TypeError when `ref` cannot be loaded, ConfigError
    when its declared options are wrong.
    """
    known = builtins()
    cls: Any = known.get(ref)
    if cls is None:
        cls, rule = _custom_class(ref, rule, path, known)
    try:
        params = pyinspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}     # type: ignore[assignment]
    return cls(rule) if params else cls()

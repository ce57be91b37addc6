"""Where inspectors are found: the built-ins by name, `module:Class` by import.

Rules of this module
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
`builtins()` lists the modules next to this file with pkgutil, imports each (Python caches
them) and keeps the classes whose own `name` is set. The rule parser (bridge/inspect/rules.py)
asks it for the built-ins' names and options; the manager asks `load_inspector` for objects.
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

from bridge.flows import InspectRule
from bridge.inspect.api import Inspector
from bridge.inspect.options import check, resolve

__all__ = ["CLASS_REF", "builtins", "load_inspector"]

CLASS_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


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


def load_inspector(ref: str, rule: InspectRule, path: str = "inspect[?]") -> Any:
    """Instantiate the inspector named `ref` for `rule` (`path`: the rule's key path).

    Raises ImportError, AttributeError or TypeError when `ref` cannot be loaded, ConfigError
    when its declared options are wrong.
    """
    known = builtins()
    cls: Any = known.get(ref)
    if cls is None:
        module_name, _, class_name = ref.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
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
    try:
        params = pyinspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}     # type: ignore[assignment]
    return cls(rule) if params else cls()

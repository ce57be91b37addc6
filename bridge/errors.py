"""Errors grebe raises for misuse of its own API and for bad configuration.

A misbehaving peer never raises (it is dropped and counted); only our own callers and our
own configuration files can make grebe raise, and then with the exact place named.
"""

from __future__ import annotations


class GrebeError(Exception):
    """Base class of grebe's own errors."""


class ConfigError(GrebeError):
    """A configuration or topology file is wrong.

    `path` is the key path inside the file ("peers[1].endpoint"), `file` the file name if known.
    str() gives "FILE: KEY.PATH: problem".
    """

    def __init__(self, path: str, message: str, file: str | None = None) -> None:
        self.path = path
        self.message = message
        self.file = file
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.path) if p]
        return ": ".join([*parts, self.message])


class ConfigErrors(GrebeError):
    """Several ConfigErrors found in one file, reported together."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


EXIT_FAILED = 1  # `grebe`: could not run (permissions, a busy port, a missing address...)
EXIT_CONFIG = 2  # `grebe`: the configuration file is wrong (`check-config`, `up`, `reload`)

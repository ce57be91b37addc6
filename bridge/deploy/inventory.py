"""`grebe deploy`: the inventory file and the release to push (pure: no SSH, no clock).

Rules
- An inventory names the hosts a deployment manages and how to reach them: address, SSH user,
  port, the private key (`identity`) and the `known_hosts` file their host keys are checked
  against (there is no "accept new keys" mode: a host whose key is unknown or changed is an
  error, as `ssh -o StrictHostKeyChecking=yes` makes it), plus where grebe lives there.
- Every host entry gets the `[defaults]` table first, then its own keys. Paths in the inventory
  are relative to the inventory file. Errors name the key ("hosts.b.config: ...").
- The release is the grebe source itself (the `bridge` and `stack` packages of the running
  grebe, *.py only), packed as a deterministic tar (sorted names, zero times, no owners), and
  named by its SHA-256: pushing the same release twice changes nothing. The remote runs it
  with its own `python` (which must have grebe's dependencies: pyroute2, numpy, h11; see the
  README's "Two real hosts") and `PYTHONPATH=<dir>/current`.
- The endpoint file of each host (`config`, e.g. written by `grebe pair`) goes to
  `<config_dir>/<name>.toml`; it is pushed only when its content differs.

Theory of operation: `load_inventory(path)` -> `Inventory` (frozen `Host`s); `release()` ->
(sha256 hex, tar bytes); bridge/deploy/remote.py acts on each host over SSH.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError

__all__ = ["Host", "Inventory", "load_inventory", "parse_inventory", "release", "EXAMPLE"]

EXAMPLE = """\
# grebe deploy inventory: `grebe deploy inventory.toml up`
[defaults]
user = "root"
port = 22
identity = "~/.ssh/id_ed25519"          # the SSH private key (key authentication only)
known_hosts = "~/.ssh/known_hosts"      # host keys are checked against this file
python = "/usr/bin/python3"             # with pyroute2, numpy, h11 installed
dir = "/opt/grebe"                      # releases, pid and log files
config_dir = "/etc/grebe"

[hosts.a]
address = "203.0.113.1"
config = "sites/a.toml"                 # this host's endpoint file (grebe pair writes them)

[hosts.b]
address = "203.0.113.2"
config = "sites/b.toml"
"""

_HOST_KEYS = frozenset({"address", "user", "port", "identity", "known_hosts", "python", "dir",
                        "config_dir", "config", "tun"})
_DEFAULTS: dict[str, Any] = {"user": "root", "port": 22, "identity": "~/.ssh/id_ed25519",
                             "known_hosts": "~/.ssh/known_hosts", "python": "python3",
                             "dir": "/opt/grebe", "config_dir": "/etc/grebe", "tun": "grebe0"}


@dataclass(frozen=True, slots=True)
class Host:
    """One managed host."""

    name: str
    address: str
    config: Path                 # the local endpoint file pushed to config_dir/NAME.toml
    user: str = "root"
    port: int = 22
    identity: Path = Path("~/.ssh/id_ed25519")
    known_hosts: Path = Path("~/.ssh/known_hosts")
    python: str = "python3"
    dir: str = "/opt/grebe"
    config_dir: str = "/etc/grebe"
    tun: str = "grebe0"

    @property
    def remote_config(self) -> str:
        return f"{self.config_dir}/{self.name}.toml"


@dataclass(frozen=True, slots=True)
class Inventory:
    hosts: tuple[Host, ...]


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def parse_inventory(text: str, base: Path) -> Inventory:
    """Check an inventory. Raises ConfigError naming the key path on the first problem."""
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(file)", f"not TOML: {e}") from None
    for k in data:
        if k not in ("defaults", "hosts"):
            raise ConfigError(k, "unknown key (defaults, hosts)")
    defaults = dict(_DEFAULTS)
    for k, v in data.get("defaults", {}).items():
        if k not in _HOST_KEYS - {"address", "config"}:
            raise ConfigError(f"defaults.{k}", "unknown key")
        defaults[k] = v
    raw = data.get("hosts")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("hosts", "at least one [hosts.NAME] table")
    hosts = []
    for name, t in raw.items():
        p = f"hosts.{name}"
        if not isinstance(t, dict):
            raise ConfigError(p, "must be a table")
        for k in t:
            if k not in _HOST_KEYS:
                raise ConfigError(f"{p}.{k}", "unknown key")
        v = {**defaults, **t}
        for k in ("address", "config"):
            if not isinstance(v.get(k), str) or not v[k]:
                raise ConfigError(f"{p}.{k}", "required, a string")
        if not isinstance(v["port"], int) or isinstance(v["port"], bool) \
                or not 0 < v["port"] < 65536:
            raise ConfigError(f"{p}.port", "a TCP port")
        for k in ("user", "python", "dir", "config_dir", "tun", "identity", "known_hosts"):
            if not isinstance(v[k], str) or not v[k]:
                raise ConfigError(f"{p}.{k}", "must be a non-empty string")
        for k in ("dir", "config_dir"):
            if not v[k].startswith("/") or "'" in v[k]:
                raise ConfigError(f"{p}.{k}", "an absolute path without quotes")
        hosts.append(Host(name=name, address=v["address"], config=_path(base, v["config"]),
                          user=v["user"], port=v["port"], identity=_path(base, v["identity"]),
                          known_hosts=_path(base, v["known_hosts"]), python=v["python"],
                          dir=v["dir"], config_dir=v["config_dir"], tun=v["tun"]))
    return Inventory(tuple(hosts))


def load_inventory(path: str | Path) -> Inventory:
    p = Path(path)
    return parse_inventory(p.read_text(), p.resolve().parent)


def release(root: Path | None = None) -> tuple[str, bytes]:
    """(sha256 hex, tar bytes) of the grebe source: bridge/ and stack/ *.py under `root`
    (default: where this grebe was imported from). Deterministic for the same files."""
    if root is None:
        root = Path(__file__).resolve().parents[2]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for pkg in ("bridge", "stack"):
            for f in sorted((root / pkg).rglob("*.py")):
                data = f.read_bytes()
                info = tarfile.TarInfo(str(f.relative_to(root)))
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    return hashlib.sha256(blob).hexdigest(), blob

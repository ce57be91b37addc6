"""grebe as a bench variant: is it runnable yet, and the two endpoint configs the bench uses.

Rules:
- grebe is being built in parallel. A part that is missing (bridge.cli, the I/O loop) or a
  config the current `bridge.config` rejects makes the variant "unavailable: <reason>", never a
  failed run. The reason names the missing module or the config error.
- The configs follow `bridge/config.py` (EXAMPLE there): one `[tun]`, a `[listen]` on the
  gateway's WAN address, one `[[peers]]` per remote site, encapsulation "gre" or "ipip",
  GRE-in-UDP port 4754 (RFC 8086 §3.3).
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

REQUIRED_MODULES = ("bridge.cli", "bridge.io.loop", "bridge.io.tun", "bridge.io.udp",
                    "bridge.pipeline", "bridge.encap")

# gateway: (tun name, tun address, listen address, peer endpoint, peer prefixes)
ENDPOINTS = {
    "gw-a": ("gbb-gr-a", "198.19.5.1/30", "198.18.0.1", "198.18.0.2:4754",
             ("198.18.2.0/24", "2001:db8:2::/64")),
    "gw-b": ("gbb-gr-b", "198.19.5.2/30", "198.18.0.2", "198.18.0.1:4754",
             ("198.18.1.0/24", "2001:db8:1::/64")),
}


def grebe_command() -> list[str] | None:
    """argv prefix that runs the `grebe` console script of this venv, or None."""
    beside = Path(sys.executable).parent / "grebe"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("grebe")
    return [found] if found else None


def config_text(gw: str, mode: str) -> str:
    """The TOML endpoint config of one gateway, encapsulation `mode` ("gre" or "ipip")."""
    tun, tun_addr, listen, endpoint, prefixes = ENDPOINTS[gw]
    peer = "site-b" if gw == "gw-a" else "site-a"
    plist = ", ".join(f'"{p}"' for p in prefixes)
    return (
        "mss_clamp = true\n\n"
        f'[tun]\nname = "{tun}"\naddresses = ["{tun_addr}"]\nmtu = "auto"\n\n'
        f'[listen]\naddress = "{listen}"\nport = 4754\n\n'
        f'[[peers]]\nname = "{peer}"\nendpoint = "{endpoint}"\nprefixes = [{plist}]\n'
        f'encapsulation = "{mode}"\n'
    )


def grebe_unavailable(mode: str = "gre") -> str | None:
    """Why grebe cannot be benchmarked yet, or None when it can."""
    for mod in REQUIRED_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return f"grebe not runnable yet: {mod} missing ({e})"
        except Exception as e:  # a half-written module must not stop the bench
            return f"grebe not runnable yet: importing {mod} fails: {e!r}"
    cli = importlib.import_module("bridge.cli")
    if not callable(getattr(cli, "main", None)):
        return "grebe not runnable yet: bridge.cli has no main()"
    if grebe_command() is None:
        return "no `grebe` console script in this venv (pip install -e .)"
    try:
        config = importlib.import_module("bridge.config")
        for gw in ENDPOINTS:
            config.loads_config(config_text(gw, mode), file=f"bench-{gw}.toml")
    except Exception as e:
        return f"bench config rejected by bridge.config: {e}"
    return None


def write_grebe_configs(directory: Path, mode: str) -> dict[str, tuple[Path, str]]:
    """Write both gateways' configs; returns {gateway: (config path, tun name)}."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}
    for gw in ENDPOINTS:
        path = directory / f"{gw}.toml"
        path.write_text(config_text(gw, mode))
        out[gw] = (path, ENDPOINTS[gw][0])
    return out

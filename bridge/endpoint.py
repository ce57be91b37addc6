"""Endpoint text: "host:port", "[v6]:port", host names, and the seam by which names resolve.

Rules:
- RFC 8086 §3.3: the default port is GRE-in-UDP's 4754 (the caller passes 24754 for the
  secure modes, bridge/secure/wire.py).
- A bare IPv6 address is refused: in "2001:db8::2:4754" the last group could be a port, so
  the error offers both readings (RFC 3986 §3.2.2 brackets an IPv6 literal beside a port).
- A host name is a DNS name by RFC 1123 §2.1 (letters, digits, hyphens, dots; the last
  label not all digits); anything else that is not an address literal is an error.
- Names are resolved by the caller's `Resolver` (bridge/io/resolve.py: a hosts file first,
  then the system resolver), never here: parsing stays pure, so unit tests and `pair` parse
  without a network; `ResolvingReader.resolve_host` records an unresolvable name as a config
  error on its key path instead of raising.

Theory of operation: bridge/config.py calls `parse_endpoint` for every endpoint; when that
fails and `host_name` sees a name, the parser's `ResolvingReader` (the key table's Reader,
bridge/configkeys.py, plus the resolver, the listen address's family and the hosts file)
turns it into an address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from bridge.configkeys import GRE_IN_UDP_PORT, Reader

__all__ = ["host_name", "parse_endpoint", "Resolver", "ResolvingReader"]

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# (name, IP version or 0 for either, hosts_file) -> the address; ValueError if none
Resolver = Callable[[str, int, "str | None"], str]


def host_name(text: str, default_port: int = GRE_IN_UDP_PORT) -> tuple[str, int] | None:
    """("name", port) when `text` is "name" or "name:port" with a DNS host name (RFC 1123
    §2.1: letters, digits, hyphens, dots; not all digits), else None."""
    name, _, p = text.strip().partition(":")
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(x) for x in labels) \
            or labels[-1].isdigit():
        return None
    try:
        return name, _port(p) if p else default_port
    except ValueError:
        return None


def parse_endpoint(text: str, default_port: int = GRE_IN_UDP_PORT) -> tuple[str, int]:
    """Parse "host:port", "[v6]:port", "host" or "[v6]" into (canonical host, port).

    Raises ValueError naming the problem; a bare IPv6 address is one (is "2001:db8::2:4754"
    an address or an address and a port?).
    """
    text = text.strip()
    host: str
    port = default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' in bracketed IPv6 endpoint")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected ':port' after ']'")
            port = _port(rest[1:])
        addr = ipaddress.ip_address(host)
        if addr.version != 6:
            raise ValueError("brackets are for IPv6 addresses")
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p)
        addr = ipaddress.ip_address(host)
    else:
        addr = ipaddress.ip_address(text)  # bare v4; a bare v6 is refused below
        if addr.version == 6:
            # "2001:db8::2:4754" is a valid address too: the port would be silently lost
            raise ValueError("an IPv6 endpoint needs brackets: " + _bracket_hint(text, addr))
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError("endpoint must be a unicast address")
    return str(addr), port


def _bracket_hint(text: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What a bare IPv6 endpoint may have meant, both readings when the last group could be
    a port ("2001:db8::2:4754": address 2001:db8::2 and port 4754, or one address)."""
    alone = f"\"[{addr}]\" (one address, port {GRE_IN_UDP_PORT})"
    head, _, tail = text.rpartition(":")
    if tail.isdigit() and 1 <= int(tail) <= 65535:
        try:
            host = ipaddress.IPv6Address(head)
        except ValueError:
            return alone
        return f"\"[{host}]:{int(tail)}\" (address and port) or {alone}"
    return alone


def _port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1..65535")
    return port


class ResolvingReader(Reader):
    """The table's Reader, plus how endpoint host names resolve (bridge/io/resolve.py)."""

    __slots__ = ("resolve", "family", "hosts_file")

    def __init__(self, file: str | None, resolve: Resolver | None = None) -> None:
        super().__init__(file)
        self.resolve = resolve
        self.family = 0  # the listen address's IP version (0: "::", either)
        self.hosts_file: str | None = None

    def resolve_host(self, path: str, name: str) -> str:
        """The address an endpoint's host name resolves to (the caller's resolver: names
        are the I/O layer's, bridge/io/resolve.py), or "0.0.0.0" and an error."""
        if self.resolve is None:
            self.error(path, f"{name!r} is a host name: only `grebe up`, `grebe reload` and "
                       "`grebe check-config` resolve names")
            return "0.0.0.0"
        try:
            return self.resolve(name, self.family, self.hosts_file)
        except ValueError as e:
            self.error(path, f"{name!r}: cannot resolve the host name: {e}")
            return "0.0.0.0"

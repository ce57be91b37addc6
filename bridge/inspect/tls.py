"""Built-in `tls` inspector: SNI and ALPN from the client's ClientHello, parsed by hand.

Rules
- Read-only: never changes a byte. Looks only at the client's first bytes.
- Record layer (RFC 8446 §5.1): type 22 (handshake), legacy version 0x03xx, 2-byte length
  <= 2**14 + 256. Handshake messages may be fragmented across records and records across reads
  (§5.1: "handshake messages MAY be fragmented across multiple TLSPlaintext records"); the
  inspector reassembles the handshake bytes until the whole ClientHello (type 1, 3-byte length,
  §4.1.2) is in, up to MAX_HELLO bytes.
- Extensions (§4.2): server_name = 0 (RFC 6066 §3, host_name type 0), ALPN = 16 (RFC 7301 §3.1),
  supported_versions = 43 (RFC 8446 §4.2.1). Lengths are checked before every read: garbage,
  a truncated hello or a non-TLS stream end in `flow.metadata["tls"] = {"error": ...}` and the
  inspector stops looking; it never raises.
- Result: `flow.metadata["tls"] = {"sni": str|None, "alpn": [..], "versions": [..],
  "legacy_version": "0x0303"}`.
"""

from __future__ import annotations

import struct
from typing import Any

from bridge.inspect.api import Direction, Flow, Inspector

MAX_HELLO = 64 * 1024
_REC = struct.Struct("!BHH")
_U16 = struct.Struct("!H")


class _Bad(Exception):
    pass


class _Reader:
    """Bounds-checked cursor over the ClientHello body."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf, self.pos = buf, pos
        self.end = len(buf) if end is None else end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise _Bad("truncated ClientHello")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def vec(self, lenbytes: int) -> _Reader:
        n = int.from_bytes(self.take(lenbytes), "big")
        sub = _Reader(self.buf, self.pos, self.pos + n)
        if sub.end > self.end:
            raise _Bad("vector longer than its container")
        self.pos += n
        return sub

    def left(self) -> int:
        return self.end - self.pos


def parse_client_hello(body: bytes) -> dict[str, Any]:
    """Parse a ClientHello handshake body (after the 4-byte handshake header). Raises _Bad."""
    r = _Reader(body)
    legacy = r.u16()
    r.take(32)                      # random
    r.vec(1)                        # legacy_session_id
    suites = r.vec(2)
    if suites.end - suites.pos < 2 or (suites.end - suites.pos) % 2:
        raise _Bad("bad cipher_suites length")
    r.vec(1)                        # legacy_compression_methods
    out: dict[str, Any] = {"sni": None, "alpn": [], "versions": [],
                           "legacy_version": f"0x{legacy:04x}"}
    if r.left() == 0:
        return out                  # no extensions (SSL 3.0 style hello)
    exts = r.vec(2)
    while exts.left():
        etype = exts.u16()
        ext = exts.vec(2)
        if etype == 0:              # RFC 6066 §3 server_name
            names = ext.vec(2)
            while names.left():
                kind = names.u8()
                name = names.vec(2)
                if kind == 0:
                    out["sni"] = name.take(name.left()).decode("ascii", "replace")
        elif etype == 16:           # RFC 7301 §3.1 application_layer_protocol_negotiation
            protos = ext.vec(2)
            while protos.left():
                p = protos.vec(1)
                out["alpn"].append(p.take(p.left()).decode("ascii", "replace"))
        elif etype == 43:           # RFC 8446 §4.2.1 supported_versions
            vers = ext.vec(1)
            while vers.left() >= 2:
                out["versions"].append(f"0x{vers.u16():04x}")
    return out


class _TlsFlow:
    __slots__ = ("records", "hs", "done")

    def __init__(self) -> None:
        self.records = bytearray()      # raw client bytes not yet cut into records
        self.hs = bytearray()           # handshake bytes reassembled from records
        self.done = False


class TlsInspector(Inspector):
    """See the module docstring."""

    name = "tls"

    observer = True  # only watches (bridge/inspect/api.py)

    def __init__(self, rule: object = None) -> None:
        self.rule = rule

    def data(self, flow: Flow, direction: Direction, data: bytes) -> None:
        if direction is not Direction.CLIENT_TO_SERVER:
            return None
        st: _TlsFlow | None = flow.state.get(self)
        if st is None:
            st = flow.state[self] = _TlsFlow()
        if st.done:
            return None
        st.records += data
        try:
            result = self._feed(st)
        except _Bad as exc:
            result = {"error": str(exc)}
        if result is not None:
            st.done = True
            st.records.clear()
            st.hs.clear()
            flow.metadata["tls"] = result
        return None

    def _feed(self, st: _TlsFlow) -> dict[str, Any] | None:
        buf = st.records
        while len(buf) >= 5:
            ctype, version, length = _REC.unpack_from(buf, 0)
            if ctype != 22 or version >> 8 != 3:
                raise _Bad("not a TLS handshake record")
            if length == 0 or length > (1 << 14) + 256:
                raise _Bad("bad TLS record length")
            if len(buf) < 5 + length:
                break
            st.hs += buf[5:5 + length]
            del buf[:5 + length]
        if len(st.hs) + len(buf) > MAX_HELLO:
            raise _Bad("ClientHello too long")
        if len(st.hs) >= 4:
            if st.hs[0] != 1:
                raise _Bad("first handshake message is not a ClientHello")
            need = int.from_bytes(st.hs[1:4], "big")
            if need > MAX_HELLO:
                raise _Bad("ClientHello too long")
            if len(st.hs) >= 4 + need:
                return parse_client_hello(bytes(st.hs[4:4 + need]))
        return None

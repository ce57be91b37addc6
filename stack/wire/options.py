"""TCP options: parse any bytes without raising, and build the option block of a segment.

Rules:
- RFC 9293 §3.1 and MUST-4: EOL (kind 0), NOP (kind 1) and MSS (kind 2, length 4) are
  understood; MUST-5: options are accepted in any segment; MUST-6: unknown kinds are
  skipped by their length; MUST-7: an illegal length (0, 1, or past the end of the header)
  ends option parsing without raising, the options read so far are kept; MUST-64: nothing
  assumes alignment; MUST-68: every option except EOL and NOP has a length byte; MUST-69:
  the block is padded with zeros (EOL) to a multiple of four.
- A known kind with the wrong length is ignored (RFC 7323 §2.2, §3.2: "a TSopt with a
  wrong length is ignored"; the same rule is applied to MSS, WSopt and SACK).
- RFC 7323 §2.3: a window shift above 14 is used as 14 (the caller applies that).
- RFC 2018 §3: SACK blocks are pairs of 32-bit edges, length 8n + 2; at most 4 blocks fit
  in the 40 option bytes, 3 next to a timestamp.

Theory of operation: `parse_options` walks the bytes once with `unpack_from` and returns
a plain tuple; the common data segment (NOP, NOP, TSopt) is recognised by the caller in
wire/tcp.py before coming here. `build_options` produces the block in the order Linux
uses for a SYN (MSS, SACK-permitted, TSopt, NOP, WSopt) and, for other segments, the
12-byte NOP NOP TSopt followed by NOP NOP SACK.
"""

from __future__ import annotations

import struct

__all__ = [
    "EOL",
    "NOP",
    "KIND_MSS",
    "KIND_WSCALE",
    "KIND_SACK_PERM",
    "KIND_SACK",
    "KIND_TS",
    "ParsedOptions",
    "NO_OPTIONS",
    "parse_options",
    "build_options",
    "options_length",
]

EOL = 0
NOP = 1
KIND_MSS = 2
KIND_WSCALE = 3
KIND_SACK_PERM = 4
KIND_SACK = 5
KIND_TS = 8

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TS = struct.Struct("!II")
_MSS_OPT = struct.Struct("!BBH")
_TS_OPT = struct.Struct("!BBBBII")  # NOP NOP kind len TSval TSecr
_SACKPERM_TS_OPT = struct.Struct("!BBBBII")  # SACKPERM(4,2) kind len TSval TSecr
_WS_OPT = struct.Struct("!BBBB")  # NOP kind len shift
_EDGE_PAIR = struct.Struct("!II")

# (mss, wscale, sack_perm, ts, sack_blocks)
ParsedOptions = tuple[
    int | None, int | None, bool, tuple[int, int] | None, tuple[tuple[int, int], ...]
]
NO_OPTIONS: ParsedOptions = (None, None, False, None, ())


def parse_options(buf: bytes | memoryview, start: int, end: int) -> ParsedOptions:
    """Parse buf[start:end] as TCP options; never raises (RFC 9293 MUST-4..7, MUST-64/68).

    Returns (mss, wscale, sack_permitted, (tsval, tsecr) or None, sack blocks).
    """
    mss: int | None = None
    wscale: int | None = None
    sack_perm = False
    ts: tuple[int, int] | None = None
    sack: tuple[tuple[int, int], ...] = ()
    i = start
    while i < end:
        kind = buf[i]
        if kind == EOL:
            break
        if kind == NOP:
            i += 1
            continue
        if i + 1 >= end:
            break  # MUST-7: a kind without its length byte ends parsing
        length = buf[i + 1]
        if length < 2 or i + length > end:
            break  # MUST-7: illegal length
        if kind == KIND_MSS:
            if length == 4:
                mss = _U16.unpack_from(buf, i + 2)[0]
        elif kind == KIND_WSCALE:
            if length == 3:
                wscale = buf[i + 2]
        elif kind == KIND_SACK_PERM:
            if length == 2:
                sack_perm = True
        elif kind == KIND_TS:
            if length == 10:
                ts = _TS.unpack_from(buf, i + 2)
        elif kind == KIND_SACK:
            if (length - 2) % 8 == 0 and length > 2:
                sack = tuple(
                    _EDGE_PAIR.unpack_from(buf, j) for j in range(i + 2, i + length, 8)
                )
        i += length  # MUST-6: unknown kinds are skipped by length
    return mss, wscale, sack_perm, ts, sack


def options_length(
    mss: int | None,
    wscale: int | None,
    sack_perm: bool,
    ts: tuple[int, int] | None,
    sack: tuple[tuple[int, int], ...],
) -> int:
    """Bytes `build_options` will produce for these fields (a multiple of 4)."""
    n = 0
    if mss is not None:
        n += 4
    if ts is not None or sack_perm:
        n += 12 if ts is not None else 4
    if wscale is not None:
        n += 4
    if sack:
        n += 4 + 8 * len(sack)
    return n


def build_options(
    mss: int | None,
    wscale: int | None,
    sack_perm: bool,
    ts: tuple[int, int] | None,
    sack: tuple[tuple[int, int], ...],
) -> bytes:
    """Return the option block for these fields, zero-padded to a multiple of 4 (MUST-69).

    Raises ValueError if the block would exceed 40 bytes (our own misuse: too many SACK
    blocks).
    """
    parts: list[bytes] = []
    if mss is not None:
        parts.append(_MSS_OPT.pack(KIND_MSS, 4, mss))
    if ts is not None:
        if sack_perm:
            parts.append(_SACKPERM_TS_OPT.pack(KIND_SACK_PERM, 2, KIND_TS, 10, ts[0], ts[1]))
        else:
            parts.append(_TS_OPT.pack(NOP, NOP, KIND_TS, 10, ts[0], ts[1]))
    elif sack_perm:
        parts.append(bytes((NOP, NOP, KIND_SACK_PERM, 2)))
    if wscale is not None:
        parts.append(_WS_OPT.pack(NOP, KIND_WSCALE, 3, wscale))
    if sack:
        parts.append(bytes((NOP, NOP, KIND_SACK, 2 + 8 * len(sack))))
        for left, right in sack:
            parts.append(_EDGE_PAIR.pack(left, right))
    block = b"".join(parts)
    if len(block) > 40:
        raise ValueError(f"TCP options of {len(block)} bytes exceed 40")
    return block

"""The SACK scoreboard arithmetic of RFC 6675 (conservative SACK-based loss recovery).

Rules:
- RFC 6675 §4 IsLost(SeqNum): an octet not yet SACKed is lost when more than
  (DupThresh - 1) * SMSS bytes above it are SACKed (the byte form of "DupThresh
  discontiguous SACKed sequences"), DupThresh = 3.
- RFC 6675 §4 SetPipe(): pipe counts every unSACKed octet in [SND.UNA, HighData) that is
  not lost (still in the network) plus every unSACKed octet retransmitted (below HighRxt),
  so a retransmitted octet that is not yet lost counts twice, as the RFC says.
- RFC 6675 §4 NextSeg(): rule 1, the first unSACKed octet at or above HighRxt that is
  lost; rule 2, new data; rule 3, the first unSACKed octet at or above HighRxt below the
  highest SACKed octet. (Rule 4, the rescue retransmission, is not done.)
- RFC 2018 §8: SACKed data stays in the send buffer until cumulatively acknowledged; the
  scoreboard only steers what is retransmitted.

Theory of operation: the scoreboard is the connection's sorted list of disjoint SACKed
[start, end) ranges in absolute positions (stack/seq.py). Because "bytes SACKed above an
octet" only shrinks as the octet moves up, IsLost splits the space at one position, the
lost edge: unSACKed octets below it are lost, those above are in flight. Every function
here is pure and walks at most the 32 ranges the connection keeps.
"""

from __future__ import annotations

__all__ = ["DUPTHRESH", "sacked_between", "lost_edge", "pipe", "next_hole"]

DUPTHRESH = 3

Ranges = list[tuple[int, int]]


def sacked_between(sacked: Ranges, a: int, b: int) -> int:
    """Bytes of [a, b) covered by the SACKed ranges."""
    n = 0
    for s, e in sacked:
        lo = s if s > a else a
        hi = e if e < b else b
        if hi > lo:
            n += hi - lo
    return n


def lost_edge(una: int, sacked: Ranges, smss: int) -> int:
    """The position below which unSACKed octets are lost (RFC 6675 §4 IsLost)."""
    need = (DUPTHRESH - 1) * smss
    acc = 0
    for s, e in reversed(sacked):
        if acc + (e - s) > need:
            return e - (need - acc)
        acc += e - s
    return una


def pipe(una: int, high: int, high_rxt: int, sacked: Ranges, edge: int) -> int:
    """RFC 6675 §4 SetPipe() in bytes: the data the sender believes is in the network."""
    lo = edge if edge > una else una
    p = (high - lo) - sacked_between(sacked, lo, high) if high > lo else 0
    rx = high_rxt if high_rxt < high else high
    if rx > una:
        p += (rx - una) - sacked_between(sacked, una, rx)
    return p


def next_hole(start: int, limit: int, sacked: Ranges) -> int | None:
    """The first unSACKed position >= `start` and < `limit`, or None."""
    pos = start
    for s, e in sacked:
        if e <= pos:
            continue
        if pos < s:
            break
        pos = e
    return pos if pos < limit else None

"""Issue 11 #7: the out-of-order queue costs about its payload and O(1) amortised per
insert at either end of a range (RFC 9293 SHLD-31 queueing, bounded)."""

from __future__ import annotations

import os
import sys

import pytest

from stack.buffers import ReassemblyBuffer


def _footprint(buf: ReassemblyBuffer) -> int:
    """Bytes of the Python objects holding the queued data (lists and chunks)."""
    def size(obj: object) -> int:
        if isinstance(obj, (list, tuple)):
            return sys.getsizeof(obj) + sum(size(o) for o in obj)
        return sys.getsizeof(obj)
    return size(buf._data)


def _chunks(obj: object) -> int:
    if isinstance(obj, (list, tuple)):
        return sum(_chunks(o) for o in obj)
    return 1


@pytest.mark.parametrize("descending", [False, True])
def test_tiny_segments_cost_about_their_payload(descending: bool) -> None:
    """20,000 one-byte segments after one hole, in arrival order or backwards (every
    insert a prepend): one range, a few coalesced chunks, memory within 2x the payload
    (one bytes object per segment cost ~22x), and byte-exact delivery."""
    n = 20_000
    data = os.urandom(n)
    buf = ReassemblyBuffer(1 << 20)
    order = range(n - 1, -1, -1) if descending else range(n)
    for i in order:
        assert buf.insert(100 + i, data[i : i + 1]) == 1
    assert len(buf) == 1 and buf.nbytes == n
    assert _footprint(buf) < 2 * n
    assert _chunks(buf._data) <= n // 512 + 2   # each chunk object holds hundreds of segments
    nxt, pieces = buf.pop_ready(100)
    assert nxt == 100 + n and b"".join(pieces) == data and not buf


def test_full_segments_are_kept_whole_and_merge_both_ways() -> None:
    seg = 1448
    data = os.urandom(40 * seg)
    buf = ReassemblyBuffer(1 << 20)
    # Odd segments first (20 ranges), then the even ones join them pairwise: merges.
    for i in list(range(1, 40, 2)) + list(range(38, -1, -2)):
        buf.insert(1 + i * seg, data[i * seg : (i + 1) * seg])
    assert len(buf) == 1
    nxt, pieces = buf.pop_ready(1)
    assert nxt == 1 + len(data) and b"".join(pieces) == data
    assert all(type(p) is bytes for p in pieces)

"""Send buffer, in-order receive queue and the out-of-order reassembly buffer.

Rules:
- RFC 9293 §3.8.6 / §3.10.2: the send buffer is bounded (`capacity`); `append` accepts
  what fits and returns the count, like a non-blocking socket. Bytes stay until they are
  acknowledged cumulatively; SACKed bytes are not freed (RFC 2018 §8: the receiver may
  renege).
- RFC 9293 §3.10.7.4 (SHLD-31): out-of-order segments inside the window are queued for
  later delivery; memory is bounded per connection by a byte cap and a range count, and
  data that does not fit is dropped (and counted by the caller), never raising.
- RFC 2018 §4: the first SACK block names the range holding the most recently received
  segment; the others follow, newest first, up to the number of blocks that fit.

Theory of operation: all positions are absolute stream positions (Python ints that never
wrap; stack/seq.py). `SendBuffer` keeps the chunks the application gave (bytes, never
concatenated into one bytearray) with their start offsets, so that `peek(offset, n)`
finds a chunk with `bisect` and usually returns a zero-copy memoryview slice; releasing
acknowledged data advances a head index and compacts lazily. `ReassemblyBuffer` keeps a
sorted list of disjoint [start, end) ranges with their bytes; an insert trims the new data
against the ranges it overlaps, so duplicates cost nothing, and `pop_ready` hands back
the pieces that became contiguous with RCV.NXT. Adjacent ranges merge, so a long run of
segments after one hole is one range, one SACK block. Each range keeps its bytes as two
chunk lists, `front` (prepended chunks, newest last) and `back` (appended chunks): adding
at either end is amortised O(1), never a shift of the whole list (segments that arrive in
descending order, as holes are refilled backwards, cost no more than ascending ones).
Small chunks (< `_TINY` bytes) are coalesced into a bytearray of at most `_COALESCE` bytes
at the end they join, so a stream of tiny segments costs about its payload, not one
Python object of ~40 bytes of overhead per segment. The range lists are bounded by
`cap_ranges`; inserts find their place by bisection.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["SendBuffer", "ReassemblyBuffer"]

Chunk = bytes | bytearray

_SMALL = 2048
_TINY = 512  # reassembly chunks below this size are coalesced
_COALESCE = 4096  # ... into bytearrays of at most this size


class SendBuffer:
    """Bytes from the application from SND.UNA onward, addressed by stream offset."""

    __slots__ = ("capacity", "base", "end", "_chunks", "_starts", "_head")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.base = 0  # stream offset of the first byte still held
        self.end = 0  # stream offset one past the last byte appended
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._head = 0

    def __len__(self) -> int:
        return self.end - self.base

    @property
    def free(self) -> int:
        """Bytes `append` would accept now."""
        return self.capacity - (self.end - self.base)

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of `data` as fits; return the number of bytes accepted."""
        n = min(len(data), self.capacity - (self.end - self.base))
        if n <= 0:
            return 0
        chunk = bytes(data[:n]) if n < len(data) else bytes(data)
        chunks = self._chunks
        if n < _SMALL and len(chunks) > self._head and len(chunks[-1]) < _SMALL:
            chunks[-1] = chunks[-1] + chunk  # keep tiny writes from making tiny chunks
        else:
            chunks.append(chunk)
            self._starts.append(self.end)
        self.end += n
        return n

    def peek(self, offset: int, n: int) -> bytes | memoryview:
        """Return bytes [offset, offset + n): a memoryview slice when one chunk holds them.

        Raises ValueError if the range is not held (our own misuse).
        """
        if offset < self.base or offset + n > self.end or n < 0:
            raise ValueError(f"range {offset}+{n} outside [{self.base}, {self.end})")
        i = bisect_right(self._starts, offset, self._head) - 1
        chunk = self._chunks[i]
        o = offset - self._starts[i]
        if o + n <= len(chunk):
            if o == 0 and n == len(chunk):
                return chunk
            return memoryview(chunk)[o : o + n]
        parts: list[bytes | memoryview] = [memoryview(chunk)[o:]]
        need = n - (len(chunk) - o)
        while need > 0:
            i += 1
            chunk = self._chunks[i]
            take = min(need, len(chunk))
            parts.append(memoryview(chunk)[:take] if take < len(chunk) else chunk)
            need -= take
        return b"".join(parts)

    def release(self, upto: int) -> None:
        """Forget every byte before stream offset `upto` (acknowledged)."""
        if upto <= self.base:
            return
        upto = min(upto, self.end)
        self.base = upto
        chunks, starts = self._chunks, self._starts
        h = self._head
        while h < len(chunks) and starts[h] + len(chunks[h]) <= upto:
            h += 1
        if h > 32 and 2 * h > len(chunks):
            del chunks[:h]
            del starts[:h]
            h = 0
        self._head = h


class ReassemblyBuffer:
    """Out-of-order data: disjoint [start, end) ranges, bounded in bytes and ranges."""

    __slots__ = ("cap_bytes", "cap_ranges", "nbytes", "_starts", "_ends", "_data", "_recent")

    def __init__(self, cap_bytes: int, cap_ranges: int = 64) -> None:
        self.cap_bytes = cap_bytes
        self.cap_ranges = cap_ranges
        self.nbytes = 0
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._data: list[tuple[list[Chunk], list[Chunk]]] = []  # per range: (front, back)
        self._recent: list[int] = []  # starts of recently touched blocks, newest last

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def tail(self) -> int | None:
        """The end of the highest range held (where the next segment of a run goes)."""
        return self._ends[-1] if self._ends else None

    def insert(self, start: int, data: bytes | memoryview) -> int:
        """Store `data` at absolute position `start`; return the count of new bytes kept.

        Overlaps with held ranges are trimmed and adjacent ranges merge (their chunk lists
        are joined, no bytes are copied twice). Returns -1 when the caps refuse the data
        (nothing stored); 0 when it was all duplicate.
        """
        end = start + len(data)
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, start)  # first range ending after start
        pieces: list[tuple[int, int]] = []
        pos = start
        j = i
        while j < len(starts) and starts[j] < end:
            if starts[j] > pos:
                pieces.append((pos, starts[j]))
            pos = max(pos, ends[j])
            j += 1
        if pos < end:
            pieces.append((pos, end))
        new = sum(e - s for s, e in pieces)
        if new == 0:
            self._touch(start)
            return 0
        ranges = len(starts)
        for s, e in pieces:
            k = bisect_left(ends, s)
            ranges += 1 - (k < len(ends) and ends[k] == s)
            k = bisect_left(starts, e)
            ranges -= k < len(starts) and starts[k] == e
        if self.nbytes + new > self.cap_bytes or ranges > self.cap_ranges:
            return -1
        blobs = self._data
        for s, e in pieces:
            piece = data[s - start : e - start]
            k = bisect_right(starts, s)
            left = k > 0 and ends[k - 1] == s
            right = k < len(starts) and starts[k] == e
            if left and right:
                ends[k - 1] = ends[k]
                _append(blobs[k - 1][1], piece)
                front, back = blobs[k]
                lb = blobs[k - 1][1]
                lb.extend(reversed(front))
                lb.extend(back)
                del starts[k], ends[k], blobs[k]
            elif left:
                ends[k - 1] = e
                _append(blobs[k - 1][1], piece)
            elif right:
                starts[k] = s
                _prepend(blobs[k][0], piece)
            else:
                starts.insert(k, s)
                ends.insert(k, e)
                blobs.insert(k, ([], [bytes(piece)]))
        self.nbytes += new
        self._touch(start)
        return new

    def _touch(self, pos: int) -> None:
        recent = self._recent
        if pos in recent:
            recent.remove(pos)
        recent.append(pos)
        if len(recent) > 8:
            del recent[0]

    def pop_ready(self, rcv_nxt: int) -> tuple[int, list[bytes]]:
        """Remove the ranges now contiguous with `rcv_nxt`; return (new rcv_nxt, pieces)."""
        out: list[bytes] = []
        starts, ends, data = self._starts, self._ends, self._data
        n = 0
        while n < len(starts) and starts[n] <= rcv_nxt:
            s, e, (front, back) = starts[n], ends[n], data[n]
            n += 1
            self.nbytes -= e - s
            if e <= rcv_nxt:
                continue
            skip = rcv_nxt - s
            front.reverse()
            for chunks in (front, back):
                for chunk in chunks:
                    if skip >= len(chunk):
                        skip -= len(chunk)
                        continue
                    out.append(bytes(chunk[skip:]) if skip or type(chunk) is not bytes
                               else chunk)
                    skip = 0
            rcv_nxt = e
        if n:
            del starts[:n], ends[:n], data[:n]
        return rcv_nxt, out

    def blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` SACK blocks (start, end), most recently received first (RFC 2018 §4)."""
        merged: list[list[int]] = []
        for s, e in zip(self._starts, self._ends, strict=True):
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        out: list[tuple[int, int]] = []
        for pos in reversed(self._recent):
            for blk in merged:
                if blk[0] <= pos < blk[1] and (blk[0], blk[1]) not in out:
                    out.append((blk[0], blk[1]))
                    break
            if len(out) >= limit:
                return out
        for blk in reversed(merged):
            if (blk[0], blk[1]) not in out:
                out.append((blk[0], blk[1]))
                if len(out) >= limit:
                    break
        return out

    def clear(self) -> None:
        """Drop everything (reneging, or the connection ended)."""
        self._starts.clear()
        self._ends.clear()
        self._data.clear()
        self._recent.clear()
        self.nbytes = 0


def _append(back: list[Chunk], piece: bytes | memoryview) -> None:
    """Add `piece` at the end of a range (tiny pieces coalesce into a bytearray)."""
    if len(piece) < _TINY and back:
        last = back[-1]
        if len(last) + len(piece) <= _COALESCE:
            grown = last if isinstance(last, bytearray) else bytearray(last)
            grown += piece
            back[-1] = grown
            return
    back.append(bytes(piece))


def _prepend(front: list[Chunk], piece: bytes | memoryview) -> None:
    """Add `piece` at the start of a range: `front` holds such chunks newest last, so this
    is an append; a tiny piece joins the newest one (a shift of at most _COALESCE bytes)."""
    if len(piece) < _TINY and front:
        first = front[-1]
        if len(first) + len(piece) <= _COALESCE:
            grown = first if isinstance(first, bytearray) else bytearray(first)
            grown[0:0] = piece
            front[-1] = grown
            return
    front.append(bytes(piece))

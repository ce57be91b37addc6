"""Deadlines: the next timer of every splice, in a binary heap with lazy deletion.

Rules of this module (pure: keys, times and `now` in; due keys out)
- One deadline per key; `set(key, t)` replaces it (None removes it). The cost of `set`,
  `earliest` and `pop_due` is O(log n) per changed or due entry, never O(n) per call: the
  Terminator asks for its next timer after every batch, with 10,000 flows live.
- Lazy deletion: a replaced deadline stays in the heap until it reaches the top, where it is
  recognised (it no longer equals the key's current deadline) and discarded. The heap is
  rebuilt from the current deadlines when stale entries outnumber live ones (amortised O(1)
  per `set`), so memory stays proportional to the number of keys.

Theory of operation
`_at[key]` is the truth; `_heap` holds (time, tie, key) tuples, some stale. `earliest()`
discards stale tops and returns the first live time; `pop_due(now)` pops every live entry
at or before `now` and forgets those keys (the caller sets their next deadline after running
them).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Any

__all__ = ["Deadlines"]


class Deadlines:
    """key -> deadline, with the earliest found in O(log n)."""

    __slots__ = ("_at", "_heap", "_tie")

    def __init__(self) -> None:
        self._at: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Any]] = []
        self._tie = 0

    def __len__(self) -> int:
        return len(self._at)

    def get(self, key: Hashable) -> float | None:
        return self._at.get(key)

    def set(self, key: Hashable, t: float | None) -> None:
        """Replace `key`'s deadline (None: remove it)."""
        at = self._at
        if t is None:
            at.pop(key, None)
            return
        if at.get(key) == t:
            return
        at[key] = t
        self._tie += 1
        heap = self._heap
        heapq.heappush(heap, (t, self._tie, key))
        if len(heap) > 2 * len(at) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(t, i, k) for i, (k, t) in enumerate(self._at.items())]
        self._tie = len(self._heap)
        heapq.heapify(self._heap)

    def earliest(self) -> float | None:
        heap, at = self._heap, self._at
        while heap:
            t, _i, key = heap[0]
            if at.get(key) == t:
                return t
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[Any]:
        """The keys whose deadline is at or before `now`, earliest first (now forgotten)."""
        heap, at = self._heap, self._at
        out: list[Any] = []
        while heap and heap[0][0] <= now:
            t, _i, key = heapq.heappop(heap)
            if at.get(key) == t:
                del at[key]
                out.append(key)
        return out

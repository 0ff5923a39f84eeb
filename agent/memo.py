"""A cache that only saves work: a dict that forgets everything at a bound.

``memo = BoundedMemo(2)``; ``memo.keep("a", 1)`` -> ``1``; after ``memo.keep("b", 2)`` and
``memo.keep("c", 3)`` it holds only ``{"c": 3}``. Starting over is cheaper than tracking
recency, and for a cache whose misses are only slower (address texts, evaluated series,
identities) it bounds memory without changing any answer.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(dict[K, V]):
    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` (clearing first if full) and return it."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value

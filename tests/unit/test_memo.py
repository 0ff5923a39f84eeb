"""agent/memo.py: a dict that starts over at its bound."""

from __future__ import annotations

from agent.memo import BoundedMemo


def test_keep_returns_the_value_and_starts_over_when_full() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(2)
    assert memo.keep("a", 1) == 1
    memo.keep("b", 2)
    assert dict(memo) == {"a": 1, "b": 2}
    memo.keep("c", 3)
    assert dict(memo) == {"c": 3}
    assert memo.get("a") is None

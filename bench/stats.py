"""Summaries of benchmark rounds: median and spread, paired on/off comparisons.

>>> summarise([3.0, 1.0, 2.0]).median
2.0
>>> paired_ratio([110.0, 90.0], [100.0, 100.0]).rounds
(1.1, 0.9)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Spread:
    """Median, extremes and quartiles of a figure's rounds (rounds kept in run order)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    rounds: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        """``{"median": 2.0, "min": 1.0, "max": 3.0, "q1": 1.5, "q3": 2.5, "rounds": [...]}``."""
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "q1": self.q1,
            "q3": self.q3,
            "rounds": list(self.rounds),
        }


def summarise(values: Sequence[float]) -> Spread:
    """``[1, 2, 3, 4]`` -> median 2.5, min 1, max 4, q1 1.75, q3 3.25 (inclusive quartiles)."""
    if not values:
        raise ValueError("no rounds to summarise")
    data = [float(v) for v in values]
    if len(data) == 1:
        q1 = q3 = data[0]
    else:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return Spread(statistics.median(data), min(data), max(data), q1, q3, tuple(data))


def paired_ratio(on: Sequence[float], off: Sequence[float]) -> Spread:
    """Per-round on/off ratios of rounds taken side by side: ``[110], [100]`` -> ``1.1``."""
    if len(on) != len(off):
        raise ValueError(f"{len(on)} on-rounds but {len(off)} off-rounds")
    return summarise([round(a / b, 6) if b else float("nan") for a, b in zip(on, off, strict=True)])


def paired_difference(on: Sequence[float], off: Sequence[float]) -> Spread:
    """Per-round on-off differences: ``[180, 175], [60, 58]`` -> rounds ``(120, 117)``."""
    if len(on) != len(off):
        raise ValueError(f"{len(on)} on-rounds but {len(off)} off-rounds")
    return summarise([a - b for a, b in zip(on, off, strict=True)])


@dataclass(frozen=True, slots=True)
class RatioInterval:
    """The geometric mean of paired on/off ratios and its ~95 % interval (mean of the log
    ratios +- 2 standard errors)."""

    mean: float
    low: float
    high: float
    pairs: int

    def as_dict(self) -> dict[str, object]:
        """``{"mean": 0.93, "low": 0.91, "high": 0.95, "pairs": 192}``."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "pairs": self.pairs}


def ratio_interval(on: Sequence[float], off: Sequence[float]) -> RatioInterval:
    """Pairs ``[110, 90, 100], [100, 100, 100]`` -> mean 0.997, interval 0.888-1.119.

    >>> r = ratio_interval([110.0, 90.0, 100.0], [100.0, 100.0, 100.0])
    >>> round(r.mean, 3), round(r.low, 3), round(r.high, 3)
    (0.997, 0.888, 1.119)
    """
    if len(on) != len(off) or len(on) < 2:
        raise ValueError(f"{len(on)} on-rounds and {len(off)} off-rounds: need 2+ pairs")
    logs = [math.log(a / b) for a, b in zip(on, off, strict=True)]
    mean = statistics.fmean(logs)
    error = statistics.stdev(logs) / math.sqrt(len(logs))
    return RatioInterval(
        math.exp(mean), math.exp(mean - 2 * error), math.exp(mean + 2 * error), len(logs)
    )

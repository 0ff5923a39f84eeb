"""What a benchmark produces: figures with their rounds, targets and how they were taken.

A figure is one number a reader looks up by a stable key, e.g.
``datapath.send_recv_ns_per_call.tracepoint``: agent-on and agent-off rounds, their per-round
ratio or difference, or a single measured value; plus the target from issue 8 it is held to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.stats import Spread


@dataclass(frozen=True, slots=True)
class Target:
    """A bound on one part of a figure: ``Target("ratio", ">=", 0.95)`` — on/off ≥ 0.95."""

    of: str  # "ratio", "added" or "value"
    op: str  # ">=" or "<="
    bound: float
    text: str = ""
    every_round: bool = False  # judged on the worst round, not the median ("in every run")

    def point(self, spread: Spread) -> float:
        """The number of ``spread`` the bound is held to: its median, or with
        ``every_round`` its worst round (rounds 1, 1, 0, 1 against ``>= 1`` -> 0)."""
        if not self.every_round:
            return spread.median
        return spread.min if self.op == ">=" else spread.max

    def verdict(self, value: float) -> tuple[bool, float]:
        """(met, by how much it is missed; 0 when met).

        ``Target("added", "<=", 120).verdict(165.0)`` -> ``(False, 45.0)``;
        ``Target("ratio", ">=", 0.95).verdict(0.97)`` -> ``(True, 0.0)``.
        """
        if math.isnan(value):
            return False, math.nan
        if self.op == ">=":
            return value >= self.bound, max(0.0, self.bound - value)
        if self.op == "<=":
            return value <= self.bound, max(0.0, value - self.bound)
        raise ValueError(f"unknown target operator {self.op!r}")


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure. ``on``/``off`` for side-by-side rounds, ``value`` otherwise."""

    key: str
    title: str
    unit: str
    method: str
    on: Spread | None = None
    off: Spread | None = None
    ratio: Spread | None = None  # per-round on/off
    added: Spread | None = None  # per-round on-off
    value: Spread | None = None
    target: Target | None = None
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def group(self) -> str:
        """``"datapath.iperf3_1k_gbps.tracepoint"`` -> ``"datapath"``."""
        return self.key.split(".", 1)[0]

    def judged(self) -> Spread | None:
        """The part of the figure its target is about."""
        if self.target is None:
            return None
        return {"ratio": self.ratio, "added": self.added, "value": self.value}[self.target.of]

    def verdict(self) -> tuple[bool, float] | None:
        judged = self.judged()
        if self.target is None or judged is None:
            return None
        return self.target.verdict(self.target.point(judged))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"title": self.title, "unit": self.unit}
        for name in ("on", "off", "ratio", "added", "value"):
            spread = getattr(self, name)
            if spread is not None:
                out[name] = spread.as_dict()
        if self.target is not None:
            verdict = self.verdict()
            out["target"] = {
                "of": self.target.of,
                "op": self.target.op,
                "bound": self.target.bound,
                "text": self.target.text,
                "every_round": self.target.every_round,
                "met": None if verdict is None else verdict[0],
                "missed_by": None if verdict is None else verdict[1],
            }
        out["method"] = self.method
        if self.details:
            out["details"] = self.details
        if self.note:
            out["note"] = self.note
        return out


def figure_from_dict(key: str, data: dict[str, Any]) -> Figure:
    """Inverse of :meth:`Figure.as_dict` (to re-render results.md from results.json)."""

    def spread(name: str) -> Spread | None:
        part = data.get(name)
        if part is None:
            return None
        return Spread(
            part["median"], part["min"], part["max"], part["q1"], part["q3"],
            tuple(part["rounds"]),
        )  # fmt: skip

    target = data.get("target")
    return Figure(
        key=key,
        title=data["title"],
        unit=data["unit"],
        method=data["method"],
        on=spread("on"),
        off=spread("off"),
        ratio=spread("ratio"),
        added=spread("added"),
        value=spread("value"),
        target=Target(
            target["of"],
            target["op"],
            target["bound"],
            target["text"],
            target.get("every_round", False),
        )
        if target
        else None,
        details=data.get("details", {}),
        note=data.get("note", ""),
    )


@dataclass(frozen=True, slots=True)
class Omitted:
    """A figure that could not be taken in this run, and why (reported, never hidden)."""

    key: str
    title: str
    reason: str

"""A compiled metric definition: what it counts and how a connection maps to label values.

Built from either configuration format; implements ``agent.model.MetricDefinition``.
Evaluating it is a reporter test, one match closure and one closure per label::

    mongo = CompiledMetric(name="istio_mongo_received_bytes", value=RECEIVED_BYTES,
                           label_names=("source_service", "source_version",
                                        "destination_version"), ...)
    mongo.evaluate(ratings_v2_to_mongodb_at_destination) -> ("ratings-v2", "v2", "v1")
    mongo.evaluate(ratings_v2_to_mongodb_at_source)      -> None   (destination only)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.model import UNKNOWN, ConnectionAttributes, Reporter, ValueSource

from .expressions import CompiledExpression, ValueType

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_PREFIX = "tcpacct_"  # the agent's own self-metrics
ALL_REPORTERS = frozenset(Reporter)


def label_text(value: Any) -> str:
    """A dimension's value as a Prometheus label value.

    ``"v1"`` -> ``"v1"``; ``27017`` -> ``"27017"``; ``True`` -> ``"true"``; ``None`` (absent)
    -> ``"unknown"``.
    """
    if value is None:
        return UNKNOWN
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def label_name_problem(name: object) -> str | None:
    """Why Prometheus would reject ``name`` as a label name, or None if it would not."""
    if not isinstance(name, str) or not LABEL_NAME.match(name):
        return f"{name!r} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
    if name.startswith("__"):
        return f"label name {name!r} is reserved (names starting with __ are Prometheus')"
    return None


def metric_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be an exposed metric name, or None if it can."""
    if not isinstance(name, str) or not METRIC_NAME.match(name):
        return f"{name!r} is not a valid Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
    if name.startswith(RESERVED_PREFIX):
        return f"metric names starting with {RESERVED_PREFIX!r} are reserved for tcpacct itself"
    return None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a definition was written: ``Origin("tcp.yaml", 12, "metric istio_mongo_x")``."""

    file: str
    line: int
    object: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.object})"


def _label_reader(expression: CompiledExpression) -> Callable[[ConnectionAttributes], str]:
    """The expression as a function giving label text (one call for text expressions)."""
    evaluate = expression.evaluate
    if expression.type is ValueType.STRING:
        return lambda a: UNKNOWN if (value := evaluate(a)) is None else value
    return lambda a: label_text(evaluate(a))


def _always(_attributes: ConnectionAttributes) -> bool:
    return True


@dataclass(frozen=True, eq=False)
class CompiledMetric:
    """One metric ready for the pipeline (``agent.model.MetricDefinition`` plus reporters)."""

    name: str
    help: str
    value: ValueSource
    dimensions: Mapping[str, CompiledExpression]  # label name -> expression, in label order
    match: CompiledExpression | None
    reporters: frozenset[Reporter]
    origin: Origin
    label_names: tuple[str, ...] = field(init=False)
    _match: Callable[[ConnectionAttributes], Any] = field(init=False, repr=False)
    _labels: tuple[Callable[[ConnectionAttributes], Any], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "label_names", tuple(self.dimensions))
        set_(self, "_match", self.match.evaluate if self.match is not None else _always)
        set_(
            self,
            "_labels",
            tuple(_label_reader(expression) for expression in self.dimensions.values()),
        )

    def evaluate(self, attributes: ConnectionAttributes) -> tuple[str, ...] | None:
        """Label values in ``label_names`` order, or None when this metric does not apply."""
        if attributes.reporter not in self.reporters or not self._match(attributes):
            return None
        return tuple([read(attributes) for read in self._labels])

    def without_labels(self, removed: frozenset[str]) -> CompiledMetric:
        """The same metric with some labels dropped (Istio's tagOverrides REMOVE)."""
        kept = {name: expr for name, expr in self.dimensions.items() if name not in removed}
        return CompiledMetric(
            self.name, self.help, self.value, kept, self.match, self.reporters, self.origin
        )

    def describe(self) -> dict[str, Any]:
        """A stable, plain form for ``tcpacct config show`` (keys always in this order)."""
        return {
            "name": self.name,
            "help": self.help,
            "kind": "counter",
            "value": self.value.value,
            "reporters": sorted(reporter.value for reporter in self.reporters),
            "match": self.match.text if self.match is not None else None,
            "dimensions": {name: expr.text for name, expr in self.dimensions.items()},
            "origin": str(self.origin),
        }

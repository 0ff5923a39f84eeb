"""tcpacct's own metric configuration format (see docs/metrics-config.md).

One YAML document holds ``metrics`` (a list of definitions) and/or ``builtins`` (switches for
the four standard ``istio_tcp_*`` metrics)::

    metrics:
      - name: istio_mongo_received_bytes
        help: Bytes from clients to MongoDB
        value: connection.received.bytes
        reporters: [destination]
        match: destination.service.host == "mongodb.default.svc.cluster.local"
        dimensions:
          source_service: source.workload.name | "unknown"
    builtins:
      removeLabels: [source_principal, destination_principal]
      metrics:
        istio_tcp_connections_closed_total: {enabled: false}

-> one ``CompiledMetric`` and a :class:`BuiltinSwitches` that drops two labels from all
built-ins and the closed-connections metric altogether.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.model import Reporter

from .checking import FileChecker
from .definitions import (
    ALL_REPORTERS,
    CompiledMetric,
    Origin,
    label_name_problem,
    metric_name_problem,
)
from .documents import Located
from .expressions import CompiledExpression, ValueType

NATIVE_KEYS = {"metrics", "builtins"}
METRIC_KEYS = {"name", "help", "kind", "value", "dimensions", "match", "reporters"}
BUILTIN_KEYS = {"enabled", "removeLabels", "metrics"}
BUILTIN_METRIC_KEYS = {"enabled", "removeLabels"}


@dataclass
class BuiltinSwitches:
    """What the configuration files say about the built-in metrics (merged over all files).

    ``disabled`` holds names of built-ins switched off (``"*"`` for all of them);
    ``removed`` maps a built-in's name (``"*"`` for all) to labels to drop.
    """

    disabled: set[str] = field(default_factory=set)
    removed: dict[str, set[str]] = field(default_factory=dict)

    def apply(self, builtins: list[CompiledMetric]) -> list[CompiledMetric]:
        """The built-ins that stay enabled, each without its removed labels."""
        if "*" in self.disabled:
            return []
        kept = []
        for metric in builtins:
            if metric.name in self.disabled:
                continue
            removed = self.removed.get("*", set()) | self.removed.get(metric.name, set())
            kept.append(metric.without_labels(frozenset(removed)) if removed else metric)
        return kept


def reporters_from(
    checker: FileChecker, fields: dict[Any, Located], obj: str
) -> frozenset[Reporter]:
    """``reporters: [destination]`` -> {DESTINATION}; absent -> both."""
    located = fields.get("reporters")
    if located is None:
        return ALL_REPORTERS
    items = checker.text_list(located, fields, "reporters", obj)
    if items is None:
        return ALL_REPORTERS
    if not located.value:
        checker.problem(located, obj, "reporters must name at least one reporter")
    valid = {reporter.value: reporter for reporter in Reporter}
    chosen = set()
    for text, item in items:
        if text not in valid:
            checker.problem(
                item, obj, f"unknown reporter {text!r} (expected source or destination)"
            )
        else:
            chosen.add(valid[text])
    return frozenset(chosen) if chosen else ALL_REPORTERS


def compile_dimensions(
    checker: FileChecker, located: Located | None, obj: str
) -> dict[str, CompiledExpression] | None:
    """``{source_service: 'source.workload.name | "unknown"'}`` -> label -> compiled."""
    if located is None:
        return {}
    fields = checker.mapping(located, obj, "dimensions")
    if fields is None:
        return None
    compiled: dict[str, CompiledExpression] = {}
    ok = True
    for label, expression in fields.items():
        problem = label_name_problem(label)
        if problem is not None:
            line, column = located.key_position(label)
            checker.problem(expression, obj, problem, line=line, column=column)
            ok = False
            continue
        result = checker.expression(expression, obj, f"dimension {label}")
        if result is None:
            ok = False
        else:
            compiled[label] = result
    return compiled if ok else None


def _metric(checker: FileChecker, located: Located, index: int) -> CompiledMetric | None:
    obj = f"metrics[{index}]"
    fields = checker.mapping(located, obj, "a metric")
    if fields is None:
        return None
    name = checker.text(located, fields, "name", obj, required=True)
    if name is not None:
        obj = f"metric {name}"
        problem = metric_name_problem(name)
        if problem is not None:
            checker.problem(fields["name"], obj, problem)
            name = None
    checker.unknown_keys(located, fields, METRIC_KEYS, obj)
    help_text = checker.text(located, fields, "help", obj) or f"{name} (tcpacct configuration)"
    kind = checker.text(located, fields, "kind", obj)
    if kind is not None and kind.lower() != "counter":
        checker.problem(fields["kind"], obj, f"kind {kind!r} is not supported (only counter)")
    value_at = checker.field(located, fields, "value", obj, required=True)
    value = checker.value_source(value_at, obj) if value_at is not None else None
    match = None
    if "match" in fields:
        match = checker.expression(fields["match"], obj, "match", ValueType.BOOL)
        if match is None:
            return None
    dimensions = compile_dimensions(checker, fields.get("dimensions"), obj)
    reporters = reporters_from(checker, fields, obj)
    if name is None or value is None or dimensions is None:
        return None
    return CompiledMetric(
        name,
        help_text,
        value,
        dimensions,
        match,
        reporters,
        Origin(checker.file, located.line, obj),
    )


def _label_list(
    checker: FileChecker, parent: Located, fields: dict[Any, Located], obj: str, known: set[str]
) -> set[str]:
    removed = set()
    for label, located in checker.text_list(parent, fields, "removeLabels", obj) or []:
        if label not in known:
            checker.problem(
                located,
                obj,
                f"cannot remove label {label!r}: the built-in metrics have no such label",
            )
        else:
            removed.add(label)
    return removed


def _builtins(
    checker: FileChecker,
    located: Located,
    switches: BuiltinSwitches,
    builtin_labels: Mapping[str, tuple[str, ...]],
) -> None:
    obj = "builtins"
    fields = checker.mapping(located, obj, "builtins")
    if fields is None:
        return
    checker.unknown_keys(located, fields, BUILTIN_KEYS, obj)
    all_labels = {label for labels in builtin_labels.values() for label in labels}
    if not checker.boolean(located, fields, "enabled", obj, default=True):
        switches.disabled.add("*")
    switches.removed.setdefault("*", set()).update(
        _label_list(checker, located, fields, obj, all_labels)
    )
    per_metric = checker.mapping(fields.get("metrics"), obj, "builtins.metrics") or {}
    for name, settings in per_metric.items():
        metric_obj = f"builtins.metrics.{name}"
        if name not in builtin_labels:
            known = ", ".join(builtin_labels)
            checker.problem(
                settings, metric_obj, f"no built-in metric {name!r} (built-ins: {known})"
            )
            continue
        metric_fields = checker.mapping(settings, metric_obj, "a built-in metric's settings")
        if metric_fields is None:
            continue
        checker.unknown_keys(settings, metric_fields, BUILTIN_METRIC_KEYS, metric_obj)
        if not checker.boolean(settings, metric_fields, "enabled", metric_obj, default=True):
            switches.disabled.add(name)
        switches.removed.setdefault(name, set()).update(
            _label_list(checker, settings, metric_fields, metric_obj, set(builtin_labels[name]))
        )


def read_native(
    checker: FileChecker,
    document: Located,
    switches: BuiltinSwitches,
    builtin_labels: Mapping[str, tuple[str, ...]],
) -> list[CompiledMetric]:
    """The metrics of one native document; built-in switches are merged into ``switches``."""
    fields = checker.mapping(document, "", "a tcpacct configuration document")
    if fields is None:
        return []
    checker.unknown_keys(document, fields, NATIVE_KEYS, "")
    metrics: list[CompiledMetric] = []
    listed = fields.get("metrics")
    if listed is not None:
        if not isinstance(listed.value, list):
            checker.problem(listed, "", "metrics must be a list of metric definitions")
        else:
            for index, item in enumerate(listed.value):
                metric = _metric(checker, item, index)
                if metric is not None:
                    metrics.append(metric)
    if "builtins" in fields:
        _builtins(checker, fields["builtins"], switches, builtin_labels)
    return metrics

"""Prometheus exposition: a Collector over the accountant's totals plus self-metrics.

``collect()`` builds fresh families from a snapshot on every scrape (no global Counter objects
keeping stale series); ``describe()`` answers from the metric definitions, so registering the
collector never reads a BPF map (client_python ``docs/content/collector/custom.md``).

Names are exposed exactly as defined: ``istio_tcp_sent_bytes_total`` for the built-ins and,
as Mixer's Prometheus adapter did, ``istio_mongo_received_bytes`` (no ``_total``) for metrics
read from Istio Mixer YAML. client_python's own text encoder would rename both in its HELP and
TYPE lines, so :func:`encode_text` writes the 0.0.4 text format itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from agent.accounting import FamilySnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SeriesSource(Protocol):
    def families(self) -> list[FamilySnapshot]: ...


@dataclass(frozen=True, slots=True)
class SelfMetric:
    """One of tcpacct's own metrics, e.g. ``tcpacct_backend_info{backend="tracepoint"} 1``."""

    name: str
    help: str
    kind: str  # "gauge" or "counter"
    samples: Sequence[tuple[dict[str, str], float]] = field(default_factory=tuple)


class _ExactMetric(Metric):
    """A family whose HELP/TYPE lines name it exactly as its samples are named."""

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        super().__init__(name, documentation, typ)
        self.name = name  # Metric strips "_total" from counters; keep it as given
        self.exposed_name = name


class TcpacctCollector(Collector):
    """Connection metrics from the accountant and self-metrics, read at scrape time."""

    def __init__(
        self,
        series: SeriesSource,
        self_metrics: Callable[[], Iterable[SelfMetric]] = lambda: (),
    ) -> None:
        self._series = series
        self._self_metrics = self_metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names change on config reload; nothing is read to register

    def collect(self) -> Iterator[Metric]:
        for family in self._series.families():
            metric = _ExactMetric(family.name, family.help, "counter")
            names = family.label_names
            for labels, value in family.samples.items():
                metric.samples.append(
                    Sample(family.name, dict(zip(names, labels, strict=True)), value)
                )
            yield metric
        for own in self._self_metrics():
            metric = _ExactMetric(own.name, own.help, own.kind)
            for labels, value in own.samples:
                metric.samples.append(Sample(own.name, labels, value))
            yield metric


def escape_label_value(value: str) -> str:
    r"""Text-format escaping: ``'a"b\c' + "\n"`` -> ``a\"b\\c\n``."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    r"""HELP-line escaping: backslash and newline only."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """``5`` -> ``"5"``; ``0.25`` -> ``"0.25"``; ``inf`` -> ``"+Inf"``; ints stay exact."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def encode_text(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format 0.0.4 for every collector in ``registry``."""
    lines: list[str] = []
    for metric in registry.collect():
        name = getattr(metric, "exposed_name", None)
        if name is None:  # a standard client_python family (process/platform collectors)
            name = metric.name + ("_total" if metric.type == "counter" else "")
        kind = (
            metric.type
            if metric.type in ("counter", "gauge", "histogram", "summary")
            else "untyped"
        )
        lines.append(f"# HELP {name} {escape_help(metric.documentation)}")
        lines.append(f"# TYPE {name} {kind}")
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            if sample.labels:
                labels = ",".join(
                    f'{key}="{escape_label_value(str(val))}"' for key, val in sample.labels.items()
                )
                lines.append(f"{sample.name}{{{labels}}} {format_value(sample.value)}")
            else:
                lines.append(f"{sample.name} {format_value(sample.value)}")
    return ("\n".join(lines) + "\n").encode()

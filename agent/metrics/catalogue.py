"""The effective set of metric definitions: the built-ins plus every configuration file.

    catalogue = load_catalogue([Path("tcp-metrics.yaml")])
    [d.name for d in catalogue.definitions()]
    -> ["istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total",
        "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
        "istio_mongo_sent_bytes", "istio_mongo_received_bytes"]   (built-ins, then file order)

A file may hold tcpacct's native documents and Istio ``config.istio.io/v1alpha2`` objects
side by side; Istio references are resolved across all files. Anything wrong anywhere makes
``load_catalogue`` raise :class:`ConfigError` listing every problem (a reload then keeps
the old catalogue); ``validate_files`` returns the problems instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from agent.model import ConnectionAttributes, PeerIdentity

from .checking import FileChecker
from .definitions import CompiledMetric
from .documents import DocumentError, Located, read_documents
from .expressions import AttributeRef
from .mixer import MixerObjects, collect, is_mixer_document, resolve
from .native import BuiltinSwitches, read_native
from .problems import ConfigError, ConfigProblem

log = logging.getLogger(__name__)

BUILTIN_FILE = "builtin.yaml"


@dataclass(frozen=True, eq=False)
class Catalogue:
    """The metric definitions in effect (``agent.model.MetricCatalogue``)."""

    metrics: tuple[CompiledMetric, ...]
    files: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def definitions(self) -> tuple[CompiledMetric, ...]:
        return self.metrics

    def __iter__(self) -> Iterator[CompiledMetric]:
        return iter(self.metrics)

    def get(self, name: str) -> CompiledMetric | None:
        return next((metric for metric in self.metrics if metric.name == name), None)

    def describe(self) -> list[dict[str, Any]]:
        return [metric.describe() for metric in self.metrics]

    def evaluation_key(self, attributes: ConnectionAttributes) -> Hashable:
        """Attributes that every definition here evaluates alike share a key.

        No built-in reads an end's ip or port, so unless a configured metric does, two
        connections between the same workloads (different ephemeral ports) share a key and
        the accountant evaluates the definitions once for both:
        ``10.0.0.5:41000 -> db`` and ``10.0.0.5:41002 -> db`` -> one key.
        """
        if self.reads_addresses:
            return attributes
        return (
            attributes.reporter,
            _without_address(attributes.source),
            _without_address(attributes.destination),
            attributes.service,
            attributes.protocol,
        )

    @functools.cached_property
    def reads_addresses(self) -> bool:
        """Whether any definition reads an end's ip or port (``source.ip``,
        ``destination.port``, ...)."""
        names = referenced_attributes(self.metrics)
        return any(name.endswith((".ip", ".port")) for name in names)


def _without_address(peer: PeerIdentity) -> tuple[object, ...]:
    """Everything of a peer but its ip and port, hashable."""
    labels = peer.labels
    return (
        peer.workload,
        peer.namespace,
        peer.principal,
        peer.app,
        peer.version,
        peer.canonical_service,
        peer.canonical_revision,
        peer.cluster,
        peer.uid,
        peer.pod_name,
        frozenset(labels.items()) if labels else None,
    )


def referenced_attributes(metrics: Sequence[CompiledMetric]) -> frozenset[str]:
    """Every attribute name the metrics' expressions read: ``{"source.workload.name", …}``."""
    names: set[str] = set()
    stack: list[Any] = []
    for metric in metrics:
        stack.extend(expr.tree for expr in metric.dimensions.values())
        if metric.match is not None:
            stack.append(metric.match.tree)
    while stack:
        node = stack.pop()
        if isinstance(node, AttributeRef):
            names.add(node.name)
        for child in ("target", "key", "operand", "left", "right"):
            if hasattr(node, child):
                stack.append(getattr(node, child))
        stack.extend(getattr(node, "args", ()))
    return frozenset(names)


def _load_builtins() -> list[CompiledMetric]:
    text = resources.files(__package__).joinpath(BUILTIN_FILE).read_text(encoding="utf-8")
    checker = FileChecker(f"<built-in {BUILTIN_FILE}>")
    documents = read_documents(Path(checker.file), text)
    metrics: list[CompiledMetric] = []
    for document in documents:
        if document is not None:
            metrics += read_native(checker, document, BuiltinSwitches(), {})
    if checker.problems:  # a defect of the package itself, not of the user's configuration
        raise ConfigError(checker.problems)
    return metrics


_BUILTINS: list[CompiledMetric] | None = None


def builtin_metrics() -> list[CompiledMetric]:
    """The four standard ``istio_tcp_*`` metrics, compiled once per process."""
    global _BUILTINS
    if _BUILTINS is None:
        _BUILTINS = _load_builtins()
    return list(_BUILTINS)


def _read_files(
    paths: Sequence[Path],
) -> tuple[list[CompiledMetric], list[ConfigProblem], list[str]]:
    builtins = builtin_metrics()
    builtin_labels = {metric.name: metric.label_names for metric in builtins}
    switches = BuiltinSwitches()
    mixer = MixerObjects()
    checkers: list[FileChecker] = []
    problems: list[ConfigProblem] = []
    native: list[CompiledMetric] = []
    for path in paths:
        checker = FileChecker(str(path))
        checkers.append(checker)
        try:
            documents = read_documents(Path(path))
        except DocumentError as error:
            problems.append(error.problem)
            continue
        if all(document is None or document.value is None for document in documents):
            checker.problem(None, "", "empty file: no metric definitions or Istio objects")
            continue
        for document in documents:
            if document is None or document.value is None:
                continue
            _read_document(checker, document, switches, builtin_labels, mixer, native)
    from_mixer = resolve(mixer)
    for checker in checkers:
        problems += checker.problems
    order = {checker.file: index for index, checker in enumerate(checkers)}
    configured = sorted(
        native + from_mixer, key=lambda m: (order.get(m.origin.file, len(order)), m.origin.line)
    )
    metrics = switches.apply(builtins) + configured
    problems += _duplicates(metrics)
    return metrics, problems, mixer.warnings


def _read_document(
    checker: FileChecker,
    document: Located,
    switches: BuiltinSwitches,
    builtin_labels: dict[str, tuple[str, ...]],
    mixer: MixerObjects,
    native: list[CompiledMetric],
) -> None:
    fields = checker.mapping(document, "", "a YAML document")
    if fields is None:
        return
    if is_mixer_document(fields):
        collect(mixer, checker, document, fields)
    elif "apiVersion" in fields or "kind" in fields:
        api = fields.get("apiVersion")
        kind = fields.get("kind")
        mixer.warn(
            checker,
            document,
            f"ignoring {kind.value if kind else '?'} "
            f"({api.value if api else 'no apiVersion'}): neither a tcpacct "
            "configuration nor a config.istio.io object",
        )
    else:
        native.extend(read_native(checker, document, switches, builtin_labels))


def _duplicates(metrics: list[CompiledMetric]) -> list[ConfigProblem]:
    """One problem per metric whose name an earlier one took already."""
    seen: dict[str, CompiledMetric] = {}
    problems = []
    for metric in metrics:
        first = seen.setdefault(metric.name, metric)
        if first is not metric:
            problems.append(
                ConfigProblem(
                    metric.origin.file,
                    metric.origin.object,
                    metric.origin.line,
                    0,
                    f"two metrics named {metric.name!r}: this one and the one at {first.origin}",
                )
            )
    return problems


def validate_files(paths: Sequence[Path]) -> list[ConfigProblem]:
    """Every problem of these files taken together (empty when they load)."""
    return _read_files(paths)[1]


def load_catalogue(paths: Sequence[Path]) -> Catalogue:
    """Built-ins plus ``paths``; :class:`ConfigError` with every problem if any."""
    metrics, problems, warnings = _read_files(paths)
    if problems:
        raise ConfigError(problems)
    return Catalogue(tuple(metrics), tuple(str(path) for path in paths), tuple(warnings))


def render(catalogue: Catalogue) -> str:
    """YAML of the effective definitions, stable for ``tcpacct config show``::

    metrics:
    - name: istio_mongo_received_bytes
      help: ...
      kind: counter
      value: connection.received.bytes
      reporters: [destination]
      match: (context.protocol == "tcp" && ...) && (...) == "default"
      dimensions: {source_service: source.workload.name | "unknown", ...}
      origin: tcp-metrics.yaml:40 (handler default/mongohandler via rule default/mongoprom)
    """
    return yaml.safe_dump(
        {"metrics": catalogue.describe()},
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )

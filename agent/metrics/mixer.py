"""Istio Mixer ``config.istio.io/v1alpha2`` objects, read as is.

Mixer made a metric out of three objects: an *instance* (template ``metric``: value and
dimensions), a Prometheus *handler* (metric name, instance, label names) and a *rule*
(match, and which instances go to which handler). Two spellings exist and both are read:

    Istio >= 1.1:  kind instance (compiledTemplate: metric) + kind handler
                   (compiledAdapter: prometheus) + kind rule
    Istio <= 1.1:  kind metric + kind prometheus + kind rule

References are resolved as Mixer did: ``mongosentbytes`` (same namespace),
``mongosentbytes.metric`` / ``mongosentbytes.instance`` (name.kind), and the fully
qualified ``mongosentbytes.instance.default`` or ``mongosentbytes.metric.default``;
handlers likewise (``mongohandler``, ``mongohandler.prometheus``,
``mongohandler.handler.default``). Handler metric names get the Prometheus adapter's
namespace, ``istio`` unless set, as prefix: ``mongo_received_bytes`` ->
``istio_mongo_received_bytes``. Mixer's TCP attributes came from the server-side proxy, so
these metrics count each connection once, from the destination reporter.

A rule outside ``istio-system`` applied, in Mixer, only to traffic into its own namespace;
that scope is added to the match: ``(<match>) && (destination.service.namespace |
destination.namespace | "") == "<namespace>"``.

Objects of other kinds (logentry instances, stdio handlers, attribute manifests ...) are
ignored with a warning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from agent.model import Reporter, ValueSource

from .attributes import EVENT_ATTRIBUTE, VOCABULARY
from .checking import FileChecker
from .definitions import CompiledMetric, Origin, label_name_problem, metric_name_problem
from .documents import Located
from .expressions import (
    AttributeRef,
    Binary,
    CompiledExpression,
    Literal,
    Node,
    ValueType,
    compile_expression,
)
from .native import compile_dimensions
from .problems import ExpressionError

log = logging.getLogger(__name__)

API_GROUP = "config.istio.io/"
DEFAULT_CONFIG_NAMESPACE = "istio-system"
INSTANCE_KINDS = ("instance", "metric")
HANDLER_KINDS = ("handler", "prometheus")
DESTINATION_ONLY = frozenset({Reporter.DESTINATION})
COUNTS_EVENTS = "1"
EVENTS = {"open": ValueSource.CONNECTIONS_OPENED, "close": ValueSource.CONNECTIONS_CLOSED}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass
class _Object:
    kind: str
    name: str
    namespace: str
    document: Located
    spec: dict[Any, Located]
    spec_at: Located
    checker: FileChecker

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass
class _Instance:
    source: _Object
    value: ValueSource | str | None  # COUNTS_EVENTS: value 1, counted per rule's event
    dimensions: dict[str, CompiledExpression] | None


@dataclass
class _HandlerMetric:
    exposed_name: str
    help: str
    instance: tuple[str, str]  # (name, namespace)
    label_names: list[str] | None  # None: the instance's dimensions, in their order
    located: Located
    handler: _Object


@dataclass
class MixerObjects:
    """The Istio objects of all files, collected before references are resolved."""

    instances: dict[tuple[str, str], _Instance | None] = field(default_factory=dict)
    handlers: dict[tuple[str, str], list[_HandlerMetric] | None] = field(default_factory=dict)
    rules: list[_Object] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, checker: FileChecker, where: Located, message: str) -> None:
        text = f"{checker.file}:{where.line}: {message}"
        self.warnings.append(text)
        log.warning("%s", text)


def is_mixer_document(fields: dict[Any, Located]) -> bool:
    api = fields.get("apiVersion")
    return api is not None and isinstance(api.value, str) and api.value.startswith(API_GROUP)


def _split_reference(
    reference: str, kinds: tuple[str, ...], namespace: str
) -> tuple[str, str] | str:
    """``"x"`` / ``"x.metric"`` / ``"x.instance.ns"`` -> ``(name, namespace)``; error text."""
    parts = reference.split(".")
    if len(parts) == 1:
        return parts[0], namespace
    if len(parts) == 2:
        return (parts[0], namespace) if parts[1] in kinds else (parts[0], parts[1])
    if len(parts) == 3 and parts[1] in kinds:
        return parts[0], parts[2]
    expected = " or ".join(kinds)
    return (
        f"cannot read reference {reference!r}: expected name, name.kind or "
        f"name.kind.namespace with kind {expected}"
    )


def collect(
    objects: MixerObjects, checker: FileChecker, document: Located, fields: dict[Any, Located]
) -> None:
    """Record one ``config.istio.io`` document (phase one: nothing is resolved yet)."""
    kind = fields.get("kind")
    kind_text = kind.value if kind is not None and isinstance(kind.value, str) else None
    metadata = checker.mapping(fields.get("metadata"), kind_text or "", "metadata") or {}
    name = metadata.get("name")
    name_text = name.value if name is not None and isinstance(name.value, str) else None
    namespace = metadata.get("namespace")
    namespace_text = (
        namespace.value if namespace is not None and isinstance(namespace.value, str) else "default"
    )
    if kind_text is None or name_text is None:
        checker.problem(document, kind_text or "", "an Istio object needs kind and metadata.name")
        return
    for what, text, located in (
        ("name", name_text, name),
        ("namespace", namespace_text, namespace),
    ):
        if not DNS_LABEL.match(text):
            checker.problem(
                located or document,
                f"{kind_text} {name_text}",
                f"metadata.{what} {text!r} is not a Kubernetes name "
                "(lower case letters, digits and '-')",
            )
            return
    if kind_text not in ("rule", *INSTANCE_KINDS, *HANDLER_KINDS):
        objects.warn(
            checker,
            document,
            f"ignoring {kind_text} {namespace_text}/{name_text}: "
            "tcpacct reads Istio instance, handler, metric, prometheus and rule "
            "objects only",
        )
        return
    spec_at = fields.get("spec")
    label = f"{kind_text} {namespace_text}/{name_text}"
    if spec_at is None:
        checker.problem(document, label, "'spec' is required")
        return
    spec = checker.mapping(spec_at, label, "spec")
    if spec is None:
        return
    item = _Object(kind_text, name_text, namespace_text, document, spec, spec_at, checker)
    if kind_text == "rule":
        objects.rules.append(item)
    elif kind_text in INSTANCE_KINDS:
        _collect_instance(objects, item)
    else:
        _collect_handler(objects, item)


def _duplicate(table: dict[tuple[str, str], Any], item: _Object, family: str) -> bool:
    if (item.name, item.namespace) in table:
        item.checker.problem(
            item.document,
            item.label,
            f"{item.namespace}/{item.name} is "
            f"defined twice ({family} objects share one set of names)",
        )
        return True
    return False


def _params(
    objects: MixerObjects,
    item: _Object,
    table: dict[tuple[str, str], Any],
    *,
    generic: str,
    names: str,
    wanted: str,
    reads: str,
    broken: object,
) -> tuple[Located, dict[Any, Located]] | None:
    """An object's params, whichever Istio spelling it uses.

    A specific kind (``metric``, ``prometheus``) is its params. A generic one (``instance``,
    ``handler``) names what it is in ``compiledTemplate``/``template``
    (``compiledAdapter``/``adapter``) and wraps its params in ``params``. Returns None when
    the object is settled here: recorded in ``table`` as ignored (another template or
    adapter, with a warning) or as ``broken`` (no usable params, with a problem).
    """
    if item.kind != generic:
        return item.spec_at, item.spec
    named_at = item.spec.get(f"compiled{names.capitalize()}") or item.spec.get(names)
    named = named_at.value if named_at is not None else None
    if named != wanted:
        objects.warn(
            item.checker,
            item.document,
            f"ignoring {item.label}: {names} {named!r} (tcpacct reads {reads} only)",
        )
        table[(item.name, item.namespace)] = None
        return None
    params_at = item.spec.get("params")
    params = item.checker.mapping(params_at, item.label, "params") if params_at else None
    if params is None or params_at is None:
        if params_at is None:
            item.checker.problem(item.spec_at, item.label, "'params' is required")
        table[(item.name, item.namespace)] = broken
        return None
    return params_at, params


def _collect_instance(objects: MixerObjects, item: _Object) -> None:
    if _duplicate(objects.instances, item, "instance and metric"):
        return
    unwrapped = _params(
        objects,
        item,
        objects.instances,
        generic="instance",
        names="template",
        wanted="metric",
        reads="metric instances",
        broken=_Instance(item, None, None),
    )
    if unwrapped is None:
        return
    params_at, params = unwrapped
    value_at = item.checker.field(params_at, params, "value", item.label, required=True)
    value: ValueSource | str | None = None
    if value_at is not None:
        if value_at.value in (1, "1") and value_at.value is not True:
            value = COUNTS_EVENTS  # Istio's tcpconnectionsopened/closed: 1 per event
        else:
            value = item.checker.value_source(value_at, item.label)
    dimensions = compile_dimensions(item.checker, params.get("dimensions"), item.label)
    objects.instances[(item.name, item.namespace)] = _Instance(item, value, dimensions)


def _collect_handler(objects: MixerObjects, item: _Object) -> None:
    if _duplicate(objects.handlers, item, "handler and prometheus"):
        return
    unwrapped = _params(
        objects,
        item,
        objects.handlers,
        generic="handler",
        names="adapter",
        wanted="prometheus",
        reads="prometheus handlers",
        broken=[],
    )
    if unwrapped is None:
        return
    params_at, params = unwrapped
    metrics_at = item.checker.field(params_at, params, "metrics", item.label, required=True)
    handler_metrics: list[_HandlerMetric] = []
    if metrics_at is not None and not isinstance(metrics_at.value, list):
        item.checker.problem(metrics_at, item.label, "metrics must be a list")
    elif metrics_at is not None:
        for entry in metrics_at.value:
            metric = _handler_metric(item, entry)
            if metric is not None:
                handler_metrics.append(metric)
    objects.handlers[(item.name, item.namespace)] = handler_metrics


def _handler_metric(handler: _Object, entry: Located) -> _HandlerMetric | None:
    checker = handler.checker
    fields = checker.mapping(entry, handler.label, "a handler metric")
    if fields is None:
        return None
    name = checker.text(entry, fields, "name", handler.label, required=True)
    prefix = checker.text(entry, fields, "namespace", handler.label) or "istio"
    obj = f"{handler.label} metric {name}" if name else handler.label
    exposed = f"{prefix}_{name}" if name else None
    if exposed is not None and (problem := metric_name_problem(exposed)) is not None:
        checker.problem(fields["name"], obj, problem)
        exposed = None
    kind = checker.text(entry, fields, "kind", obj)
    if kind is not None and kind.upper() != "COUNTER":
        checker.problem(
            fields["kind"],
            obj,
            f"kind {kind} is not supported: tcpacct exports counters (COUNTER) only",
        )
        exposed = None
    instance_name = checker.text(entry, fields, "instance_name", obj, required=True)
    instance: tuple[str, str] | None = None
    if instance_name is not None:
        resolved = _split_reference(instance_name, INSTANCE_KINDS, handler.namespace)
        if isinstance(resolved, str):
            checker.problem(fields["instance_name"], obj, resolved)
        else:
            instance = resolved
    label_names: list[str] | None = None
    listed = checker.text_list(entry, fields, "label_names", obj)
    if listed is not None:
        label_names = []
        for label, located in listed:
            problem = label_name_problem(label)
            if problem is not None:
                checker.problem(located, obj, problem)
                exposed = None
            elif label in label_names:
                checker.problem(located, obj, f"label {label!r} is listed twice")
                exposed = None
            else:
                label_names.append(label)
    if exposed is None or instance is None:
        return None
    description = checker.text(entry, fields, "description", obj)
    help_text = description or f"{exposed} (Istio Mixer configuration {handler.label})"
    return _HandlerMetric(exposed, help_text, instance, label_names, entry, handler)


def _event_term(node: Node) -> str | None:
    """``connection.event == "open"`` or ``(connection.event | "na") == "open"`` -> "open"."""
    if not (isinstance(node, Binary) and node.operator == "=="):
        return None
    for attribute, literal in ((node.left, node.right), (node.right, node.left)):
        if (
            isinstance(attribute, Binary)
            and attribute.operator == "|"
            and isinstance(attribute.right, Literal)
        ):
            attribute = attribute.left
        if (
            isinstance(attribute, AttributeRef)
            and attribute.name == EVENT_ATTRIBUTE
            and isinstance(literal, Literal)
            and literal.type is ValueType.STRING
        ):
            return literal.value
    return None


def _conjuncts(node: Node) -> list[Node]:
    if isinstance(node, Binary) and node.operator == "&&":
        return _conjuncts(node.left) + _conjuncts(node.right)
    return [node]


class _EventSplitter:
    """Takes Mixer's ``connection.event == "open"`` term out of a rule's match.

    ``context.protocol == "tcp" && ((connection.event | "na") == "open")`` -> match
    ``context.protocol == "tcp"`` and event ``CONNECTIONS_OPENED``.
    """

    def __init__(self) -> None:
        self.event: ValueSource | None = None

    def __call__(self, tree: Node) -> Node:
        kept: list[Node] = []
        for term in _conjuncts(tree):
            event = _event_term(term)
            if event is None:
                kept.append(term)
            elif event not in EVENTS:
                raise ExpressionError(
                    f"connection.event {event!r}: tcpacct counts the events "
                    '"open" and "close" only',
                    term.offset,
                )
            elif self.event is not None:
                raise ExpressionError("connection.event is tested twice", term.offset)
            else:
                self.event = EVENTS[event]
        if not kept:
            return Literal(tree.offset, 1, True, ValueType.BOOL)
        rest = kept[0]
        for term in kept[1:]:
            rest = Binary(rest.offset, 1 + max(rest.depth, term.depth), "&&", rest, term)
        return rest


@dataclass
class _RuleMatch:
    usable: bool
    match: CompiledExpression | None = None
    event: ValueSource | None = None


def _rule_match(rule: _Object) -> _RuleMatch:
    """The rule's match (None: everything) and the connection event it selects, if any."""
    checker = rule.checker
    located = rule.spec.get("match")
    match: CompiledExpression | None = None
    splitter = _EventSplitter()
    if located is not None and not (isinstance(located.value, str) and not located.value.strip()):
        match = checker.expression(located, rule.label, "match", ValueType.BOOL, splitter)
        if match is None:
            return _RuleMatch(False)
        if isinstance(match.tree, Literal) and match.tree.value is True:
            match = None
    if rule.namespace == DEFAULT_CONFIG_NAMESPACE:
        return _RuleMatch(True, match, splitter.event)
    scope = f'(destination.service.namespace | destination.namespace | "") == "{rule.namespace}"'
    text = scope if match is None else f"({match.text}) && {scope}"
    try:
        scoped = compile_expression(text, VOCABULARY, ValueType.BOOL)
    except ExpressionError as error:
        checker.problem(
            located or rule.spec_at, rule.label, f"match with its namespace scope: {error.message}"
        )
        return _RuleMatch(False)
    return _RuleMatch(True, scoped, splitter.event)


def _check_instance_names(objects: MixerObjects) -> None:
    for handler_metrics in objects.handlers.values():
        for handler_metric in handler_metrics or []:
            if handler_metric.instance not in objects.instances:
                handler = handler_metric.handler
                name, namespace = handler_metric.instance
                handler.checker.problem(
                    handler_metric.located,
                    handler.label,
                    f"{handler_metric.exposed_name}: instance_name refers to instance "
                    f"{namespace}/{name}, which is not defined in the configuration",
                )


def resolve(objects: MixerObjects) -> list[CompiledMetric]:
    """Phase two: rules -> handler metrics -> instances -> compiled metrics."""
    _check_instance_names(objects)
    metrics: list[CompiledMetric] = []
    for rule in objects.rules:
        match = _rule_match(rule)
        actions_at = rule.checker.field(
            rule.spec_at, rule.spec, "actions", rule.label, required=True
        )
        if actions_at is None:
            continue
        if not isinstance(actions_at.value, list):
            rule.checker.problem(actions_at, rule.label, "actions must be a list")
            continue
        for action in actions_at.value:
            metrics.extend(_action(objects, rule, action, match))
    for handler_metrics in objects.handlers.values():
        for handler_metric in handler_metrics or []:
            if not any(m.name == handler_metric.exposed_name for m in metrics):
                objects.warn(
                    handler_metric.handler.checker,
                    handler_metric.located,
                    f"{handler_metric.exposed_name}: no rule sends instance "
                    f"{handler_metric.instance[1]}/{handler_metric.instance[0]} to "
                    f"{handler_metric.handler.label}; the metric stays empty",
                )
    return metrics


def _action(
    objects: MixerObjects,
    rule: _Object,
    action: Located,
    match: _RuleMatch,
) -> list[CompiledMetric]:
    checker = rule.checker
    fields = checker.mapping(action, rule.label, "an action")
    if fields is None:
        return []
    handler_ref = checker.text(action, fields, "handler", rule.label, required=True)
    instances = checker.text_list(action, fields, "instances", rule.label) or []
    if handler_ref is None:
        return []
    resolved = _split_reference(handler_ref, HANDLER_KINDS, rule.namespace)
    if isinstance(resolved, str):
        checker.problem(fields["handler"], rule.label, resolved)
        return []
    if resolved not in objects.handlers:
        checker.problem(
            fields["handler"],
            rule.label,
            f"handler {handler_ref!r} "
            f"({resolved[1]}/{resolved[0]}) is not defined in the configuration",
        )
        return []
    handler_metrics = objects.handlers[resolved]
    metrics: list[CompiledMetric] = []
    for reference, located in instances:
        instance_key = _split_reference(reference, INSTANCE_KINDS, rule.namespace)
        if isinstance(instance_key, str):
            checker.problem(located, rule.label, instance_key)
            continue
        if instance_key not in objects.instances:
            checker.problem(
                located,
                rule.label,
                f"instance {reference!r} "
                f"({instance_key[1]}/{instance_key[0]}) is not defined in the "
                "configuration",
            )
            continue
        instance = objects.instances[instance_key]
        if instance is None or handler_metrics is None:
            continue  # an ignored kind (logentry, stdio ...): warned about already
        for handler_metric in handler_metrics:
            if handler_metric.instance != instance_key:
                continue
            metric = _combine(rule, handler_metric, instance, match, located)
            if metric is not None and match.usable:
                metrics.append(metric)
    return metrics


def _combine(
    rule: _Object,
    handler_metric: _HandlerMetric,
    instance: _Instance,
    match: _RuleMatch,
    reference: Located,
) -> CompiledMetric | None:
    if instance.value is None or instance.dimensions is None:
        return None  # the instance's own problems are reported already
    labels = handler_metric.label_names
    if labels is None:
        labels = list(instance.dimensions)
    dimensions: dict[str, CompiledExpression] = {}
    handler = handler_metric.handler
    for label in labels:
        expression = instance.dimensions.get(label)
        if expression is None:
            handler.checker.problem(
                handler_metric.located,
                handler.label,
                f"{handler_metric.exposed_name}: label {label!r} is not "
                f"a dimension of {instance.source.label}",
            )
            return None
        dimensions[label] = expression
    if not match.usable:
        return None  # the rule's match has problems of its own
    value = instance.value
    if value == COUNTS_EVENTS:
        if match.event is None:
            rule.checker.problem(
                reference,
                rule.label,
                f"{instance.source.label} counts 1 per event: the rule must also match "
                'connection.event == "open" or "close"',
            )
            return None
        value = match.event
    elif match.event is not None:
        rule.checker.problem(
            reference,
            rule.label,
            f"{instance.source.label} counts bytes, which tcpacct does not split by "
            "connection.event",
        )
        return None
    assert isinstance(value, ValueSource)
    origin = Origin(
        handler.checker.file, handler_metric.located.line, f"{handler.label} via {rule.label}"
    )
    return CompiledMetric(
        handler_metric.exposed_name,
        handler_metric.help,
        value,
        dimensions,
        match.match,
        DESTINATION_ONLY,
        origin,
    )

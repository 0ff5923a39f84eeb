"""The attribute vocabulary: each name a function of ``ConnectionAttributes``.

Names follow Mixer's attribute vocabulary where Mixer had one (``source.workload.name``,
``destination.service.host``, ``context.reporter.kind`` ...); a few tcpacct additions carry
what Istio's later labels need (``source.canonical.service``, ``source.cluster.id``).

A value that is not known (``"unknown"`` or empty text, port 0, a label that is not set)
reads as ``None``: *absent*, which Mixer's ``|`` operator replaces by its default::

    read("source.workload.name", ratings_v2_to_mongodb)   -> "ratings-v2"
    read("source.principal", ratings_v2_to_mongodb)       -> None  ("unknown" in the model)
    lookup("destination.labels", attrs, "version")        -> "v1"
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

from agent.model import UNKNOWN, ConnectionAttributes, PeerIdentity, Reporter, ValueSource

from .expressions import Attribute, ValueType

EVENT_ATTRIBUTE = "connection.event"

# What a metric counts, by the name its ``value`` gives.
COUNTED: dict[str, ValueSource] = {source.value: source for source in ValueSource}

# Well-known labels that PeerIdentity also carries as fields: a label lookup falls back on
# the field when enrichment filled the field but not the label map (local mode).
_LABEL_FIELDS = {
    "app": "app",
    "version": "version",
    "service.istio.io/canonical-name": "canonical_service",
    "service.istio.io/canonical-revision": "canonical_revision",
}


def _known(value: str) -> str | None:
    """``"unknown"`` or ``""`` -> None; anything else as is."""
    return None if not value or value == UNKNOWN else value


def _peer_text(side: str, field: str) -> Callable[[ConnectionAttributes], str | None]:
    get = attrgetter(f"{side}.{field}")

    def read(attributes: ConnectionAttributes) -> str | None:
        value = get(attributes)
        return None if not value or value == UNKNOWN else value

    read.__name__ = f"read_{side}_{field}"
    return read


def _peer_port(side: str) -> Callable[[ConnectionAttributes], int | None]:
    def read(attributes: ConnectionAttributes) -> int | None:
        port = getattr(attributes, side).port
        return port or None

    return read


def _peer_label(side: str) -> Callable[[ConnectionAttributes, str], str | None]:
    def lookup(attributes: ConnectionAttributes, key: str) -> str | None:
        peer: PeerIdentity = getattr(attributes, side)
        value = peer.labels.get(key)
        if value:
            return value
        field = _LABEL_FIELDS.get(key)
        return _known(getattr(peer, field)) if field else None

    return lookup


def _service(field: str) -> Callable[[ConnectionAttributes], str | None]:
    def read(attributes: ConnectionAttributes) -> str | None:
        return _known(getattr(attributes.service, field))

    return read


def _reporter_kind(attributes: ConnectionAttributes) -> str:
    return "outbound" if attributes.reporter is Reporter.SOURCE else "inbound"


def _protocol(attributes: ConnectionAttributes) -> str | None:
    return _known(attributes.protocol)


def _absent(_attributes: ConnectionAttributes) -> Any:
    return None


def _peer_vocabulary(side: str) -> list[Attribute]:
    s, t = side, ValueType.STRING
    return [
        Attribute(
            f"{s}.workload.name",
            t,
            "workload (Deployment, StatefulSet ...) name",
            _peer_text(s, "workload"),
        ),
        Attribute(f"{s}.workload.namespace", t, "workload namespace", _peer_text(s, "namespace")),
        Attribute(f"{s}.namespace", t, "pod namespace", _peer_text(s, "namespace")),
        Attribute(f"{s}.name", t, "pod name", _peer_text(s, "pod_name")),
        Attribute(f"{s}.uid", t, "Istio's kubernetes://<pod>.<namespace>", _peer_text(s, "uid")),
        Attribute(f"{s}.ip", t, "address (IPv4-mapped IPv6 folded to IPv4)", _peer_text(s, "ip")),
        Attribute(f"{s}.port", ValueType.INT, "port", _peer_port(s)),
        Attribute(
            f"{s}.principal",
            t,
            "SPIFFE identity of the service account",
            _peer_text(s, "principal"),
        ),
        Attribute(f"{s}.user", t, "legacy Mixer name of .principal", _peer_text(s, "principal")),
        Attribute(f"{s}.labels", ValueType.STRING_MAP, "pod labels", lookup=_peer_label(s)),
        Attribute(
            f"{s}.canonical.service",
            t,
            "tcpacct: Istio canonical service",
            _peer_text(s, "canonical_service"),
        ),
        Attribute(
            f"{s}.canonical.revision",
            t,
            "tcpacct: Istio canonical revision",
            _peer_text(s, "canonical_revision"),
        ),
        Attribute(f"{s}.cluster.id", t, "tcpacct: cluster name", _peer_text(s, "cluster")),
    ]


def _build_vocabulary() -> dict[str, Attribute]:
    t = ValueType.STRING
    attributes = [
        *_peer_vocabulary("source"),
        *_peer_vocabulary("destination"),
        Attribute(
            "destination.service.host",
            t,
            "service FQDN, e.g. mongodb.default.svc.cluster.local",
            _service("host"),
        ),
        Attribute("destination.service.name", t, "service name", _service("name")),
        Attribute("destination.service.namespace", t, "service namespace", _service("namespace")),
        Attribute(
            "destination.service",
            t,
            "legacy Mixer name of destination.service.host",
            _service("host"),
        ),
        Attribute(
            "source.service",
            t,
            "legacy Mixer 0.x name; tcpacct reads the source "
            "workload name, as Istio's later samples did",
            _peer_text("source", "workload"),
        ),
        Attribute("context.protocol", t, '"tcp"', _protocol),
        Attribute(
            "context.reporter.kind",
            t,
            '"outbound" (source reporter) or "inbound" (destination reporter)',
            _reporter_kind,
        ),
        Attribute(
            "connection.mtls", ValueType.BOOL, "never known to tcpacct (always absent)", _absent
        ),
        Attribute(
            "context.proxy_error_code",
            t,
            "Envoy's response flags: never known to tcpacct (always absent)",
            _absent,
        ),
        Attribute(
            EVENT_ATTRIBUTE,
            t,
            "Mixer's open/continue/close report",
            _absent,
            misuse="is only understood in an Istio rule's match, as a term such as "
            '(connection.event | "na") == "open" joined by &&; in tcpacct\'s own format '
            "use value connection.opened or connection.closed",
        ),
    ]
    attributes += [
        Attribute(
            name,
            ValueType.INT,
            f"counted: {source.name.lower()}",
            _absent,
            misuse="is what a metric counts: use it as the metric's value, not in a "
            "match or a dimension",
        )
        for name, source in COUNTED.items()
    ]
    return {attribute.name: attribute for attribute in attributes}


VOCABULARY: dict[str, Attribute] = _build_vocabulary()


def read(name: str, attributes: ConnectionAttributes) -> Any:
    """The value of one scalar attribute, or None when absent (for tests and docs)."""
    reader = VOCABULARY[name].read
    assert reader is not None, f"{name} is a map"
    return reader(attributes)


def lookup(name: str, attributes: ConnectionAttributes, key: str) -> str | None:
    """One key of a map attribute, or None when absent."""
    finder = VOCABULARY[name].lookup
    assert finder is not None, f"{name} is not a map"
    return finder(attributes, key)

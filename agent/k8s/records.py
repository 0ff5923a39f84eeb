"""Kubernetes API objects (JSON dicts) -> small records holding only the fields tcpacct uses.

The API sends a few kilobytes per Pod; a record keeps a few hundred bytes, so 5,000 pods stay
small. Decoding never raises on a malformed object: a field that is missing or of the wrong
type becomes its default, and an object without a name/namespace decodes to ``None``.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.model import fold_address

MAX_LABELS = 32
"""Labels kept per pod beyond the ones identity rules read (a huge label map is cut)."""
MAX_LABEL_TEXT = 253
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
IDENTITY_LABELS = (
    "app",
    "version",
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
    "pod-template-hash",
)


@dataclass(frozen=True, slots=True)
class OwnerRef:
    """The controlling owner of an object: ``("ReplicaSet", "web-7d4b9c")``."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class PodRecord:
    uid: str
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""
    node_name: str = ""
    host_network: bool = False
    ips: tuple[str, ...] = ()
    phase: str = ""
    owner: OwnerRef | None = None
    created: float = 0.0  # creationTimestamp, seconds since the epoch (0.0 if unknown)
    config_hash: str = ""  # a static pod's mirror: the UID its cgroups carry

    @property
    def terminal(self) -> bool:
        """A Succeeded/Failed pod keeps ``status.podIP`` but no longer holds the address."""
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int | str | None = None


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    uid: str
    name: str
    namespace: str
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointSliceRecord:
    """One EndpointSlice: which service it belongs to, its ready addresses, its target ports."""

    uid: str
    name: str
    namespace: str
    service_name: str
    addresses: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class OwnedRecord:
    """A ReplicaSet or a Job, kept only for its own controlling owner (Deployment, CronJob)."""

    uid: str
    name: str
    namespace: str
    owner: OwnerRef | None = None


Record = PodRecord | ServiceRecord | EndpointSliceRecord | OwnedRecord


def _text(value: Any, default: str = "") -> str:
    if isinstance(value, str):
        return sys.intern(value[:MAX_LABEL_TEXT]) if len(value) < 64 else value[:MAX_LABEL_TEXT]
    return default


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def parse_timestamp(value: Any) -> float:
    """RFC 3339 text -> seconds since the epoch: ``"2024-05-01T10:00:00Z"`` -> ``1714557600.0``.

    Anything unparseable -> ``0.0``.
    """
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def parse_address(value: Any) -> str | None:
    """Folded canonical address text, or ``None``: ``"::ffff:198.18.0.7"`` -> ``"198.18.0.7"``."""
    if not isinstance(value, str):
        return None
    try:
        return sys.intern(fold_address(value))
    except ValueError:
        return None


class LabelMap(dict[str, str]):
    """A pod's kept labels; identical maps are shared between pods (see :func:`keep_labels`)."""

    __slots__ = ("__weakref__",)


_shared_label_maps: weakref.WeakValueDictionary[tuple[tuple[str, str], ...], LabelMap] = (
    weakref.WeakValueDictionary()
)
_shared_label_maps_lock = threading.Lock()


def keep_labels(labels: Any) -> Mapping[str, str]:
    """The labels worth keeping: identity labels first, then others up to ``MAX_LABELS``.

    ``{"app": "web", "x": 1}`` -> ``{"app": "web"}`` (non-text values are dropped).
    """
    source = _mapping(labels)
    kept: dict[str, str] = {}
    for key in IDENTITY_LABELS:
        value = source.get(key)
        if isinstance(value, str):
            kept[key] = _text(value)
    for key, value in source.items():
        if len(kept) >= MAX_LABELS:
            break
        if isinstance(key, str) and isinstance(value, str) and key not in kept:
            kept[_text(key)] = _text(value)
    # Pods of one ReplicaSet carry the same labels: keep one copy for all of them.
    signature = tuple(kept.items())
    with _shared_label_maps_lock:
        shared = _shared_label_maps.get(signature)
        if shared is None:
            shared = LabelMap(kept)
            _shared_label_maps[signature] = shared
    return shared


def controller_of(metadata: Mapping[str, Any]) -> OwnerRef | None:
    """The owner reference with ``controller: true`` (else the first one), or ``None``.

    ``{"ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d8f", "controller": True}]}``
    -> ``OwnerRef("ReplicaSet", "web-5d8f")``.
    """
    references = [_mapping(ref) for ref in _list(metadata.get("ownerReferences"))]
    chosen = next((ref for ref in references if ref.get("controller") is True), None)
    if chosen is None and references:
        chosen = references[0]
    if chosen is None:
        return None
    kind, name = _text(chosen.get("kind")), _text(chosen.get("name"))
    return OwnerRef(kind, name) if kind and name else None


def _identity(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], str, str, str] | None:
    metadata = _mapping(obj.get("metadata"))
    name, namespace = _text(metadata.get("name")), _text(metadata.get("namespace"))
    if not name or not namespace:
        return None
    uid = _text(metadata.get("uid")) or f"{namespace}/{name}"
    return metadata, uid, name, namespace


def decode_pod(obj: Mapping[str, Any]) -> PodRecord | None:
    """A Pod as the API sends it -> :class:`PodRecord` (``None`` without name/namespace)."""
    found = _identity(obj)
    if found is None:
        return None
    metadata, uid, name, namespace = found
    spec, status = _mapping(obj.get("spec")), _mapping(obj.get("status"))
    ips: list[str] = []
    candidates = [_mapping(item).get("ip") for item in _list(status.get("podIPs"))]
    candidates.append(status.get("podIP"))
    for candidate in candidates:
        address = parse_address(candidate)
        if address is not None and address not in ips:
            ips.append(address)
    return PodRecord(
        uid=uid,
        name=name,
        namespace=namespace,
        labels=keep_labels(metadata.get("labels")),
        service_account=_text(spec.get("serviceAccountName")) or "default",
        node_name=_text(spec.get("nodeName")),
        host_network=spec.get("hostNetwork") is True,
        ips=tuple(ips),
        phase=_text(status.get("phase")),
        owner=controller_of(metadata),
        created=parse_timestamp(metadata.get("creationTimestamp")),
        config_hash=_text(_mapping(metadata.get("annotations")).get(MIRROR_ANNOTATION)),
    )


def decode_service(obj: Mapping[str, Any]) -> ServiceRecord | None:
    """A Service -> :class:`ServiceRecord`; headless (``clusterIP: None``) keeps no address."""
    found = _identity(obj)
    if found is None:
        return None
    _, uid, name, namespace = found
    spec = _mapping(obj.get("spec"))
    ips: list[str] = []
    for candidate in [*_list(spec.get("clusterIPs")), spec.get("clusterIP")]:
        address = parse_address(candidate)
        if address is not None and address not in ips:
            ips.append(address)
    ports = []
    for item in _list(spec.get("ports")):
        port = _mapping(item).get("port")
        if isinstance(port, int) and not isinstance(port, bool):
            target = _mapping(item).get("targetPort")
            ports.append(ServicePort(port, target if isinstance(target, int | str) else None))
    return ServiceRecord(uid, name, namespace, tuple(ips), tuple(ports))


def decode_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSliceRecord | None:
    """An EndpointSlice -> its service name, ready addresses and ports.

    Endpoints whose ``conditions.ready`` is explicitly false are skipped (Kubernetes: a
    missing condition means ready).
    """
    found = _identity(obj)
    if found is None:
        return None
    metadata, uid, name, namespace = found
    service = _text(_mapping(metadata.get("labels")).get("kubernetes.io/service-name"))
    addresses: list[str] = []
    for endpoint in map(_mapping, _list(obj.get("endpoints"))):
        if _mapping(endpoint.get("conditions")).get("ready") is False:
            continue
        for candidate in _list(endpoint.get("addresses")):
            address = parse_address(candidate)
            if address is not None and address not in addresses:
                addresses.append(address)
    ports = []
    for item in map(_mapping, _list(obj.get("ports"))):
        port = item.get("port")
        if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
            ports.append(port)
    return EndpointSliceRecord(uid, name, namespace, service, tuple(addresses), tuple(ports))


def decode_owned(obj: Mapping[str, Any]) -> OwnedRecord | None:
    """A ReplicaSet or Job -> its controlling owner (``OwnerRef("Deployment", "web")``)."""
    found = _identity(obj)
    if found is None:
        return None
    metadata, uid, name, namespace = found
    return OwnedRecord(uid, name, namespace, controller_of(metadata))

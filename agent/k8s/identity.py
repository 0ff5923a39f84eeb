"""Istio's naming rules: pod and Service records -> peer and service identities.

The rules follow Istio's peer metadata (``pkg/kube`` ``GetDeployMetaFromPod`` and the
canonical-service labels):

- workload: the controller's name, walking ReplicaSet -> Deployment and Job -> CronJob; a bare
  pod is its own workload;
- app / version: ``app`` / ``version``, else ``app.kubernetes.io/name`` / ``.../version``;
- canonical service: ``service.istio.io/canonical-name``, else ``app.kubernetes.io/name``, else
  ``app``, else the workload; canonical revision: ``service.istio.io/canonical-revision``, else
  ``app.kubernetes.io/version``, else ``version``, else ``"latest"``;
- principal: ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``;
- uid: ``kubernetes://<pod>.<namespace>``; service host: ``<name>.<namespace>.svc.<domain>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.k8s.records import OwnedRecord, PodRecord, ServiceRecord
from agent.model import UNKNOWN, PeerIdentity, ServiceIdentity

CRONJOB_JOB_NAME = re.compile(r"^(.+)-\d{8,10}$")
"""A Job a CronJob made: ``<cronjob>-<scheduled time in minutes>`` (Istio's heuristic)."""

OwnerLookup = Callable[[str, str, str], OwnedRecord | None]
"""(kind, namespace, name) -> the owned object's record, if the cache holds it."""


def workload_name(pod: PodRecord, owned: OwnerLookup) -> str:
    """The workload a pod belongs to.

    ``web-5d8f-x2x9z`` owned by ReplicaSet ``web-5d8f`` owned by Deployment ``web`` -> ``web``;
    a Job ``backup-28391040`` owned by CronJob ``backup`` -> ``backup``; a bare pod -> its name.
    When the ReplicaSet/Job itself is not known, Istio's name heuristics apply: the
    ``pod-template-hash`` suffix is cut from a ReplicaSet name, and a Job name ending in
    ``-<8..10 digits>`` is taken as a CronJob's.
    """
    owner = pod.owner
    if owner is None:
        return pod.name
    if owner.kind in ("ReplicaSet", "Job"):
        record = owned(owner.kind, pod.namespace, owner.name)
        if record is not None:
            return record.owner.name if record.owner is not None else record.name
        if owner.kind == "ReplicaSet":
            template_hash = pod.labels.get("pod-template-hash", "")
            if template_hash and owner.name.endswith(f"-{template_hash}"):
                return owner.name[: -len(template_hash) - 1]
            return owner.name
        match = CRONJOB_JOB_NAME.match(owner.name)
        return match.group(1) if match else owner.name
    return owner.name


def _first(labels: Mapping[str, str], *keys: str) -> str | None:
    for key in keys:
        value = labels.get(key)
        if value:
            return value
    return None


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """The cluster-wide settings identity depends on."""

    cluster_name: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"

    def principal(self, namespace: str, service_account: str) -> str:
        """``("shop", "cart")`` -> ``"spiffe://cluster.local/ns/shop/sa/cart"``."""
        return f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{service_account or 'default'}"

    def service_host(self, name: str, namespace: str) -> str:
        """``("mongodb", "default")`` -> ``"mongodb.default.svc.cluster.local"``."""
        return f"{name}.{namespace}.svc.{self.cluster_domain}"

    def peer(self, pod: PodRecord, workload: str, ip: str = "") -> PeerIdentity:
        """A pod record and its workload name -> the peer identity Istio would report."""
        labels = pod.labels
        app = _first(labels, "app", "app.kubernetes.io/name") or UNKNOWN
        version = _first(labels, "version", "app.kubernetes.io/version") or UNKNOWN
        canonical_service = (
            _first(labels, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
            or workload
        )
        canonical_revision = (
            _first(
                labels,
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            )
            or "latest"
        )
        return PeerIdentity(
            workload=workload or UNKNOWN,
            namespace=pod.namespace,
            principal=self.principal(pod.namespace, pod.service_account),
            app=app,
            version=version,
            canonical_service=canonical_service or UNKNOWN,
            canonical_revision=canonical_revision,
            cluster=self.cluster_name,
            uid=f"kubernetes://{pod.name}.{pod.namespace}",
            pod_name=pod.name,
            ip=ip or (pod.ips[0] if pod.ips else ""),
            labels=labels,
        )

    def service(self, service: ServiceRecord) -> ServiceIdentity:
        """A Service record -> ``ServiceIdentity("web.shop.svc.cluster.local", "web", "shop")``."""
        return ServiceIdentity(
            host=self.service_host(service.name, service.namespace),
            name=service.name,
            namespace=service.namespace,
        )

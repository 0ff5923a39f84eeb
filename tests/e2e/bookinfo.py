"""The slice of bookinfo that Istio's "Collecting Metrics for TCP services" task uses, as the
Kubernetes API test server serves it: ``ratings-v2`` talking to ``mongodb``.

Objects, all in namespace ``default``:

- Deployment ``ratings-v2`` -> ReplicaSet ``ratings-v2-<hash>`` -> Pod ``ratings-v2-<hash>-<id>``
  (labels app=ratings, version=v2, service account ``bookinfo-ratings-v2``);
- Deployment ``mongodb-v1`` -> ReplicaSet -> Pod (labels app=mongodb, version=v1);
- Service ``mongodb`` (port 27017 named ``mongo``, selector app=mongodb) and its
  EndpointSlice; Service ``mongodb-exporter`` (port 9216 named ``metrics``, the same pods): the
  "other service on another port", whose traffic must not reach the mongo metrics.

Pod IPs are the network-namespace "pods" of :mod:`tests.support.netlab`.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.support.k8s_api_server import pod, replica_set

NAMESPACE = "default"
CLUSTER_DOMAIN = "cluster.local"
TRUST_DOMAIN = "cluster.local"

MONGO_SERVICE = "mongodb"
MONGO_PORT = 27017
MONGO_HOST = f"{MONGO_SERVICE}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"
OTHER_SERVICE = "mongodb-exporter"
OTHER_PORT = 9216
OTHER_HOST = f"{OTHER_SERVICE}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"


def _hash(length: int) -> str:
    """A pod-template-hash-like suffix: ``_hash(10)`` -> ``"6f8b9d7c5x"`` (lower case, digits)."""
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(secrets.choice(alphabet) for _ in range(length))


@dataclass(frozen=True)
class Workload:
    """One Deployment with its single ReplicaSet and single pod."""

    deployment: str
    labels: dict[str, str]
    service_account: str
    template_hash: str = field(default_factory=lambda: _hash(10))
    pod_id: str = field(default_factory=lambda: _hash(5))
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    container_id: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def replica_set(self) -> str:
        return f"{self.deployment}-{self.template_hash}"

    @property
    def pod_name(self) -> str:
        return f"{self.replica_set}-{self.pod_id}"

    @property
    def principal(self) -> str:
        """``spiffe://cluster.local/ns/default/sa/bookinfo-ratings-v2`` for ratings-v2."""
        return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{self.service_account}"

    def objects(self, pod_ip: str) -> list[dict[str, Any]]:
        labels = {**self.labels, "pod-template-hash": self.template_hash}
        return [
            deployment(self.deployment, self.labels, self.service_account),
            replica_set(self.replica_set, NAMESPACE, self.deployment),
            pod(
                self.pod_name,
                NAMESPACE,
                pod_ip,
                labels=labels,
                owner=("ReplicaSet", self.replica_set),
                service_account=self.service_account,
                uid=self.uid,
            ),
        ]


def ratings_v2() -> Workload:
    return Workload("ratings-v2", {"app": "ratings", "version": "v2"}, "bookinfo-ratings-v2")


def mongodb_v1() -> Workload:
    # bookinfo-db.yaml names no service account: the namespace's "default" one.
    return Workload("mongodb-v1", {"app": "mongodb", "version": "v1"}, "default")


def deployment(name: str, labels: dict[str, str], service_account: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": dict(labels)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "serviceAccountName": service_account,
                    "containers": [{"name": "main", "image": "example.invalid/app:1"}],
                },
            },
        },
    }


def cluster_service(
    name: str, cluster_ip: str, port: int, port_name: str, selector: dict[str, str]
) -> dict[str, Any]:
    """``cluster_service("mongodb", "198.19.3.7", 27017, "mongo", {"app": "mongodb"})``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "selector": dict(selector),
            "ports": [{"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def service_endpoints(
    service: str, port: int, port_name: str, backend: Workload, backend_ip: str
) -> dict[str, Any]:
    """The EndpointSlice the control plane would make for a one-backend Service."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-{_hash(5)}",
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [backend_ip],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": backend.pod_name},
            }
        ],
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


def free_cluster_ips(count: int) -> list[str]:
    """``count`` distinct ClusterIPs from 198.19.0.0/16, random so that labs running at the
    same time on this machine (other tests) do not DNAT each other's traffic."""
    chosen: set[str] = set()
    while len(chosen) < count:
        chosen.add(f"198.19.{100 + secrets.randbelow(150)}.{1 + secrets.randbelow(254)}")
    return sorted(chosen)


@dataclass(frozen=True)
class Bookinfo:
    ratings: Workload
    mongodb: Workload
    ratings_ip: str
    mongodb_ip: str
    mongo_cluster_ip: str
    other_cluster_ip: str

    def objects(self) -> list[dict[str, Any]]:
        mongo_selector = {"app": "mongodb"}
        return [
            *self.ratings.objects(self.ratings_ip),
            *self.mongodb.objects(self.mongodb_ip),
            cluster_service(
                MONGO_SERVICE, self.mongo_cluster_ip, MONGO_PORT, "mongo", mongo_selector
            ),
            service_endpoints(MONGO_SERVICE, MONGO_PORT, "mongo", self.mongodb, self.mongodb_ip),
            cluster_service(
                OTHER_SERVICE, self.other_cluster_ip, OTHER_PORT, "metrics", mongo_selector
            ),
            service_endpoints(OTHER_SERVICE, OTHER_PORT, "metrics", self.mongodb, self.mongodb_ip),
        ]

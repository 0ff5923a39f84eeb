"""Istio identity rules and record decoding: owners, label defaults, FQDNs, principals."""

from __future__ import annotations

import pytest

from agent.k8s.identity import IdentityRules, workload_name
from agent.k8s.records import (
    MAX_LABELS,
    OwnedRecord,
    OwnerRef,
    decode_endpoint_slice,
    decode_owned,
    decode_pod,
    decode_service,
    parse_timestamp,
)
from agent.model import PeerIdentity, ServiceIdentity
from tests.support.k8s_api_server import endpoint_slice, job, pod, replica_set, service


def owned_lookup(*records: OwnedRecord):
    table = {}
    for record in records:
        kind = "ReplicaSet" if record.owner and record.owner.kind == "Deployment" else "Job"
        table[(kind, record.namespace, record.name)] = record
    return lambda kind, namespace, name: table.get((kind, namespace, name))


def decoded(obj):
    record = decode_pod(obj)
    assert record is not None
    return record


@pytest.mark.parametrize(
    ("owner", "labels", "known", "expected"),
    [
        (None, {}, (), "bare-pod"),
        (("ReplicaSet", "web-5d8f9"), {}, (replica_set("web-5d8f9", "ns", "web"),), "web"),
        # ReplicaSet not (yet) in the cache: cut the pod-template-hash suffix, as Istio does
        (("ReplicaSet", "web-5d8f9"), {"pod-template-hash": "5d8f9"}, (), "web"),
        (("ReplicaSet", "web-5d8f9"), {"pod-template-hash": "zzz"}, (), "web-5d8f9"),
        # a bare ReplicaSet is its own workload
        (("ReplicaSet", "lonely"), {}, (replica_set("lonely", "ns", None),), "lonely"),
        (("Job", "backup-28391040"), {}, (job("backup-28391040", "ns", "nightly"),), "nightly"),
        (("Job", "backup-28391040"), {}, (), "backup"),  # CronJob name heuristic
        (("Job", "migrate"), {}, (), "migrate"),
        (("Job", "migrate"), {}, (job("migrate", "ns", None),), "migrate"),
        (("StatefulSet", "db"), {}, (), "db"),
        (("DaemonSet", "agent"), {}, (), "agent"),
    ],
)
def test_workload_name(owner, labels, known, expected) -> None:
    record = decoded(pod("bare-pod", "ns", "198.18.0.1", owner=owner, labels=labels))
    lookup = owned_lookup(*(decode_owned(obj) for obj in known))
    assert workload_name(record, lookup) == expected


def test_owned_record_in_another_namespace_is_not_used() -> None:
    record = decoded(pod("p", "ns", "198.18.0.1", owner=("ReplicaSet", "web-5d8f9")))
    lookup = owned_lookup(decode_owned(replica_set("web-5d8f9", "other", "web")))
    assert workload_name(record, lookup) == "web-5d8f9"


@pytest.mark.parametrize(
    ("labels", "app", "version", "canonical_service", "canonical_revision"),
    [
        ({}, "unknown", "unknown", "wl", "latest"),
        ({"app": "web", "version": "v1"}, "web", "v1", "web", "v1"),
        (
            {"app.kubernetes.io/name": "web", "app.kubernetes.io/version": "1.2"},
            "web",
            "1.2",
            "web",
            "1.2",
        ),
        (
            {"app": "a", "app.kubernetes.io/name": "b", "version": "v1",
             "app.kubernetes.io/version": "2"},
            "a",
            "v1",
            "b",  # canonical name prefers app.kubernetes.io/name, as Istio does
            "2",
        ),
        (
            {"app": "a", "service.istio.io/canonical-name": "c",
             "service.istio.io/canonical-revision": "r"},
            "a",
            "unknown",
            "c",
            "r",
        ),
    ],
)
def test_label_defaults(labels, app, version, canonical_service, canonical_revision) -> None:
    record = decoded(pod("wl-1", "ns", "198.18.0.1", labels=labels))
    peer = IdentityRules().peer(record, "wl")
    assert (peer.app, peer.version, peer.canonical_service, peer.canonical_revision) == (
        app,
        version,
        canonical_service,
        canonical_revision,
    )


def test_peer_identity_fields() -> None:
    rules = IdentityRules(cluster_name="east", trust_domain="corp.example")
    record = decoded(pod("web-1", "shop", "2001:db8::a", service_account="web-sa"))
    assert rules.peer(record, "web") == PeerIdentity(
        workload="web",
        namespace="shop",
        principal="spiffe://corp.example/ns/shop/sa/web-sa",
        app="unknown",
        version="unknown",
        canonical_service="web",
        canonical_revision="latest",
        cluster="east",
        uid="kubernetes://web-1.shop",
        pod_name="web-1",
        ip="2001:db8::a",
        labels={},
    )


def test_service_identity_and_fqdn() -> None:
    rules = IdentityRules(cluster_domain="k8s.internal")
    record = decode_service(service("mongodb", "default", "198.19.0.10", [27017]))
    assert record is not None
    assert rules.service(record) == ServiceIdentity(
        "mongodb.default.svc.k8s.internal", "mongodb", "default"
    )
    assert IdentityRules().service_host("a", "b") == "a.b.svc.cluster.local"
    assert IdentityRules().principal("ns", "") == "spiffe://cluster.local/ns/ns/sa/default"


def test_pod_decoding_folds_mapped_addresses_and_keeps_dual_stack() -> None:
    record = decoded(pod("p", "ns", ["::ffff:198.18.0.7", "2001:DB8::7"]))
    assert record.ips == ("198.18.0.7", "2001:db8::7")
    assert record.owner is None
    assert record.service_account == "default"


def test_pod_decoding_tolerates_missing_and_wrong_fields() -> None:
    assert decode_pod({}) is None
    assert decode_pod({"metadata": {"name": "x"}}) is None
    record = decode_pod(
        {
            "metadata": {
                "name": "x",
                "namespace": "ns",
                "labels": {"app": 5, "ok": "yes"},
                "ownerReferences": [{"kind": "ReplicaSet"}],
                "creationTimestamp": "not a time",
            },
            "spec": "nonsense",
            "status": {"podIP": "not-an-ip", "podIPs": [{"ip": None}, "x"]},
        }
    )
    assert record is not None
    assert (record.uid, record.ips, record.labels, record.owner, record.created) == (
        "ns/x",
        (),
        {"ok": "yes"},
        None,
        0.0,
    )
    assert IdentityRules().peer(record, "x").app == "unknown"


def test_huge_and_non_ascii_label_maps_are_cut_safely() -> None:
    labels = {f"k{i:04d}": "v" * 1000 for i in range(5000)}
    labels["app"] = "wéb-☃"
    record = decoded(pod("p", "ns", "198.18.0.1", labels=labels))
    assert len(record.labels) == MAX_LABELS
    assert record.labels["app"] == "wéb-☃"
    assert max(len(value) for value in record.labels.values()) == 253
    assert IdentityRules().peer(record, "p").app == "wéb-☃"


def test_controller_owner_preferred_over_first_reference() -> None:
    obj = pod("p", "ns", "198.18.0.1")
    obj["metadata"]["ownerReferences"] = [
        {"kind": "ConfigMap", "name": "c"},
        {"kind": "StatefulSet", "name": "db", "controller": True},
    ]
    assert decoded(obj).owner == OwnerRef("StatefulSet", "db")


def test_endpoint_slice_skips_endpoints_not_ready() -> None:
    obj = endpoint_slice("s", "ns", "web", ["198.18.0.1", "198.18.0.2"], [8080, 9090])
    obj["endpoints"][1]["conditions"]["ready"] = False
    obj["endpoints"].append({"addresses": ["198.18.0.3"]})  # no conditions: ready
    record = decode_endpoint_slice(obj)
    assert record is not None
    assert (record.service_name, record.addresses, record.ports) == (
        "web",
        ("198.18.0.1", "198.18.0.3"),
        (8080, 9090),
    )


def test_headless_service_has_no_cluster_ip() -> None:
    record = decode_service(service("h", "ns", "None", [80]))
    assert record is not None
    assert record.cluster_ips == ()


def test_timestamps() -> None:
    assert parse_timestamp("2024-05-01T10:00:00Z") == 1714557600.0
    assert parse_timestamp(None) == 0.0

"""The cache fed directly: pod IP reuse over time, retention, indexes kept consistent."""

from __future__ import annotations

import tracemalloc

from agent.k8s import KubernetesCache
from agent.k8s.records import decode_endpoint_slice, decode_pod, decode_service
from tests.support.k8s_api_server import endpoint_slice, pod, service

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def created(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_reused_ip_resolves_to_the_pod_that_held_it_at_the_time() -> None:
    clock = Clock(T0 + 10)
    cache = KubernetesCache(clock=clock, retention_seconds=300)
    old = decode_pod(pod("old", "ns", "198.18.0.5", uid="u-old", created=created(T0)))
    cache.upsert("pods", old)
    clock.now = T0 + 100
    cache.remove("pods", old)
    clock.now = T0 + 101
    new = decode_pod(pod("new", "ns", "198.18.0.5", uid="u-new", created=created(T0 + 101)))
    cache.upsert("pods", new)
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 50).pod_name == "old"
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 150).pod_name == "new"
    assert cache.pod_by_ip("198.18.0.5").pod_name == "new"
    assert cache.pod_by_uid("u-old").pod_name == "old"  # deleted, still retained
    clock.now = T0 + 1000
    cache.upsert("pods", new)  # any write prunes what is past retention
    assert cache.pod_by_uid("u-old") is None
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 50).pod_name == "new"  # best left
    assert cache.stats().deleted_pods_retained == 0


def test_newer_pod_wins_while_the_old_deletion_is_not_seen_yet() -> None:
    clock = Clock(T0 + 10)
    cache = KubernetesCache(clock=clock)
    cache.upsert("pods", decode_pod(pod("old", "ns", "198.18.0.5", uid="a", created=created(T0))))
    clock.now = T0 + 200
    cache.upsert(
        "pods", decode_pod(pod("new", "ns", "198.18.0.5", uid="b", created=created(T0 + 190)))
    )
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 195).pod_name == "new"
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 100).pod_name == "old"


def test_ip_gained_later_counts_from_when_it_was_seen() -> None:
    clock = Clock(T0 + 5)
    cache = KubernetesCache(clock=clock)
    old = decode_pod(pod("old", "ns", "198.18.0.5", uid="a", created=created(T0 - 100)))
    cache.upsert("pods", old)
    pending = decode_pod(pod("new", "ns", None, uid="b", created=created(T0)))
    cache.upsert("pods", pending)  # created at T0, no IP yet
    clock.now = T0 + 20
    cache.remove("pods", old)
    clock.now = T0 + 21
    cache.upsert("pods", decode_pod(pod("new", "ns", "198.18.0.5", uid="b", created=created(T0))))
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 10).pod_name == "old"
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 30).pod_name == "new"


def test_finished_and_host_network_pods_do_not_hold_ips() -> None:
    cache = KubernetesCache(clock=Clock(T0))
    cache.upsert("pods", decode_pod(pod("done", "ns", "198.18.0.6", uid="d", phase="Succeeded")))
    cache.upsert("pods", decode_pod(pod("h", "ns", "198.18.0.1", uid="h", host_network=True)))
    assert cache.pod_by_ip("198.18.0.6") is None
    assert cache.pod_by_ip("198.18.0.1") is None
    assert cache.pod_by_uid("h").workload == "h"
    assert cache.stats().lookup_misses == {"pod_by_ip": 2}


def test_relist_removes_what_is_gone_and_reindexes() -> None:
    cache = KubernetesCache(clock=Clock(T0))
    a = decode_service(service("a", "ns", "198.19.0.1", [80]))
    b = decode_service(service("b", "ns", "198.19.0.2", [80]))
    cache.replace("services", [a, b])
    cache.replace("services", [decode_service(service("b", "ns", "198.19.0.3", [80]))])
    assert cache.service_by_cluster_ip("198.19.0.1") is None
    assert cache.service_by_cluster_ip("198.19.0.2") is None
    assert cache.service_by_cluster_ip("198.19.0.3").name == "b"


def test_endpoint_index_follows_slice_updates() -> None:
    cache = KubernetesCache(clock=Clock(T0))
    first = decode_endpoint_slice(endpoint_slice("s1", "ns", "web", ["198.18.0.1"], [8080]))
    cache.upsert("endpointslices", first)
    moved = decode_endpoint_slice(endpoint_slice("s1", "ns", "web", ["198.18.0.2"], [8080]))
    cache.upsert("endpointslices", moved)
    other = decode_endpoint_slice(endpoint_slice("s2", "ns", "api", ["198.18.0.2"], [8080]))
    cache.upsert("endpointslices", other)
    assert cache.service_by_endpoint("198.18.0.1", 8080) is None
    assert cache.service_by_endpoint("198.18.0.2", 8080).name == "api"  # first by name
    cache.remove("endpointslices", other)
    assert cache.service_by_endpoint("198.18.0.2", 8080).host == "web.ns.svc.cluster.local"


def test_five_thousand_pods_stay_small() -> None:
    cache = KubernetesCache(clock=Clock(T0))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(5000):
            obj = pod(
                f"web-5d8f9c7b4-{index:05d}",
                "production",
                f"198.18.{index // 250}.{index % 250}",
                labels={"app": "web", "version": "v1", "pod-template-hash": "5d8f9c7b4",
                        "team": "payments", "tier": "frontend"},
                owner=("ReplicaSet", "web-5d8f9c7b4"),
                service_account="web",
            )
            cache.upsert("pods", decode_pod(obj))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.stats().objects["pods"] == 5000
    assert used < 8 * 1024 * 1024, used


def test_a_remembered_answer_is_dropped_when_any_record_changes() -> None:
    """pod_by_ip remembers an address's answer while nothing changed: asked again - at the
    same or a later time - after its pod left and another took the address, or after its
    owner became known, it answers from the records as they are now."""
    clock = Clock(T0 + 10)
    cache = KubernetesCache(clock=clock, retention_seconds=300)
    old = decode_pod(pod("old-5d8f9-a", "ns", "198.18.0.5", uid="u-old", created=created(T0),
                         owner=("ReplicaSet", "old-5d8f9")))  # fmt: skip
    cache.upsert("pods", old)
    first = cache.pod_by_ip("198.18.0.5", at=T0 + 20)
    assert first.pod_name == "old-5d8f9-a"
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 30) is first  # remembered
    cache.upsert("replicasets", decode_owned("old-5d8f9", "web"))
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 30).workload == "web"
    clock.now = T0 + 100
    cache.remove("pods", old)
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 150) is None  # nobody holds it now
    new = decode_pod(pod("new", "ns", "198.18.0.5", uid="u-new", created=created(T0 + 100)))
    cache.upsert("pods", new)
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 150).pod_name == "new"
    assert cache.pod_by_ip("198.18.0.5", at=T0 + 30).pod_name == "old-5d8f9-a"


def decode_owned(name: str, deployment: str):
    from agent.k8s.records import decode_owned as decode
    from tests.support.k8s_api_server import replica_set

    return decode(replica_set(name, "ns", deployment))

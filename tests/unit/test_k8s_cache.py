"""KubernetesCache against the project's test API server, through the official client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from agent.k8s import KubernetesCache, api_client
from agent.k8s.identity import IdentityRules
from agent.k8s.watching import Backoff
from agent.model import PeerIdentity, ServiceIdentity
from tests.support.k8s_api_server import (
    KubernetesApiServer,
    endpoint_slice,
    job,
    pod,
    replica_set,
    service,
)

FAST = Backoff(initial=0.01, cap=0.05)


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Polls ``condition`` until true; fails the test after ``timeout`` (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {condition}")
        time.sleep(0.01)


def populate(server: KubernetesApiServer) -> None:
    server.apply(replica_set("web-5d8f9", "shop", "web"))
    server.apply(
        pod(
            "web-5d8f9-abcde",
            "shop",
            "198.18.0.10",
            labels={"app": "web", "version": "v2", "pod-template-hash": "5d8f9"},
            owner=("ReplicaSet", "web-5d8f9"),
            service_account="web-sa",
        )
    )
    server.apply(job("backup-28391040", "ops", "backup"))
    server.apply(pod("backup-28391040-xyz", "ops", "198.18.0.11", owner=("Job", "backup-28391040")))
    server.apply(service("web", "shop", "198.19.0.10", [80]))
    server.apply(endpoint_slice("web-abc", "shop", "web", ["198.18.0.10"], [8080]))


@pytest.fixture
def server() -> Iterator[KubernetesApiServer]:
    with KubernetesApiServer(bookmark_interval=60.0) as running:
        yield running


def make_cache(server: KubernetesApiServer, tmp_path, **kwargs) -> KubernetesCache:
    client = api_client(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    options = {"backoff": FAST, "rules": IdentityRules(cluster_name="test-cluster")}
    options.update(kwargs)
    return KubernetesCache(client, **options)


@pytest.fixture
def started(server, tmp_path) -> Iterator[KubernetesCache]:
    populate(server)
    cache = make_cache(server, tmp_path)
    cache.start()
    try:
        assert cache.wait_synced(10)
        yield cache
    finally:
        cache.stop()


def test_list_gives_identities_with_istio_rules(started: KubernetesCache) -> None:
    web = started.pod_by_ip("198.18.0.10")
    assert web == PeerIdentity(
        workload="web",
        namespace="shop",
        principal="spiffe://cluster.local/ns/shop/sa/web-sa",
        app="web",
        version="v2",
        canonical_service="web",
        canonical_revision="v2",
        cluster="test-cluster",
        uid="kubernetes://web-5d8f9-abcde.shop",
        pod_name="web-5d8f9-abcde",
        ip="198.18.0.10",
        labels={"app": "web", "version": "v2", "pod-template-hash": "5d8f9"},
    )
    backup = started.pod_by_ip("::ffff:198.18.0.11")
    assert backup is not None
    assert (backup.workload, backup.app, backup.canonical_service) == (
        "backup",
        "unknown",
        "backup",
    )
    assert started.service_by_cluster_ip("198.19.0.10", 80) == ServiceIdentity(
        "web.shop.svc.cluster.local", "web", "shop"
    )
    assert started.service_by_cluster_ip("198.19.0.10", 81) is None
    assert started.service_by_endpoint("198.18.0.10", 8080) == ServiceIdentity(
        "web.shop.svc.cluster.local", "web", "shop"
    )
    assert started.service_by_endpoint("198.18.0.10", 80) is None
    stats = started.stats()
    assert stats.synced is True
    assert stats.objects == {
        "pods": 2, "services": 1, "endpointslices": 1, "replicasets": 1, "jobs": 1
    }
    assert stats.lookup_misses == {"service_by_cluster_ip": 1, "service_by_endpoint": 1}
    assert stats.api_errors == dict.fromkeys(stats.objects, 0)


def test_watch_applies_additions_changes_and_deletions(server, started) -> None:
    server.apply(pod("db-0", "shop", "198.18.0.20", owner=("StatefulSet", "db")))
    wait_until(lambda: started.pod_by_ip("198.18.0.20") is not None)
    assert started.pod_by_ip("198.18.0.20").workload == "db"
    server.apply(
        pod("db-0", "shop", "198.18.0.20", owner=("StatefulSet", "db"), labels={"app": "mongo"})
    )
    wait_until(lambda: started.pod_by_ip("198.18.0.20").app == "mongo")
    server.delete("Service", "shop", "web")
    wait_until(lambda: started.service_by_cluster_ip("198.19.0.10") is None)
    assert started.stats().objects["services"] == 0
    assert started.stats().relists == dict.fromkeys(started.stats().objects, 0)


def test_a_pods_identity_follows_its_owner_learned_later(server, started) -> None:
    """Identities are remembered per pod record, workload name and address: a ReplicaSet
    that arrives after its pod renames the pod's workload at the next lookup, and the
    same pod at two addresses has two identities."""
    server.apply(pod("api-7c9-x1", "shop", ["198.18.0.30", "2001:db8::30"],
                     owner=("ReplicaSet", "api-7c9")))  # fmt: skip
    wait_until(lambda: started.pod_by_ip("198.18.0.30") is not None)
    before = started.pod_by_ip("198.18.0.30")
    assert before.workload == "api-7c9"  # owner not known yet, no template-hash label
    assert started.pod_by_ip("198.18.0.30") is before  # made once
    assert started.pod_by_ip("2001:db8::30").ip == "2001:db8::30"
    server.apply(replica_set("api-7c9", "shop", "api"))
    wait_until(lambda: started.pod_by_ip("198.18.0.30").workload == "api")


def test_bookmark_moves_the_resume_version(server, started) -> None:
    server.apply(service("other", "shop", "198.19.0.11", [27017]))  # bumps the global version
    version = server.resource_version
    wait_until(lambda: server.open_watches() == 5)
    watches_before = len(server.requests_for("pods", watch=True))
    server.send_bookmarks()
    pods_watcher = next(w for w in started._watchers if w.kind.name == "pods")
    wait_until(lambda: pods_watcher.resource_version == str(version))
    server.end_watches()
    wait_until(lambda: len(server.requests_for("pods", watch=True)) > watches_before)
    resumed = server.requests_for("pods", watch=True)[-1]
    assert resumed.query["resourceVersion"] == str(version)
    assert resumed.query["allowWatchBookmarks"] == "true"
    assert len(server.requests_for("pods", watch=False)) == 1  # resumed, not listed again


def test_restart_resumes_the_watch_without_listing_again(server, started) -> None:
    server.stop()
    server.apply(pod("late-1", "shop", "198.18.0.30"))
    server.start()
    wait_until(lambda: started.pod_by_ip("198.18.0.30") is not None)
    assert started.pod_by_ip("198.18.0.30").workload == "late-1"
    assert len(server.requests_for("pods", watch=False)) == 1
    assert started.stats().relists["pods"] == 0


def test_gone_after_restart_lists_again_and_drops_what_was_deleted(server, started) -> None:
    server.stop()
    server.delete("Pod", "ops", "backup-28391040-xyz")
    server.apply(pod("new-1", "shop", "198.18.0.31"))
    server.expire_history()
    server.start()
    wait_until(lambda: started.pod_by_ip("198.18.0.31") is not None)
    wait_until(lambda: started.stats().objects["pods"] == 2)
    assert started.stats().relists["pods"] == 1
    assert len(server.requests_for("pods", watch=False)) == 2
    gone = started.stats().deleted_pods_retained
    assert gone == 1


def test_server_errors_are_counted_and_retried(server, tmp_path) -> None:
    populate(server)
    server.fail_next(2, status=500, path_contains="/pods", watch=False)
    cache = make_cache(server, tmp_path)
    cache.start()
    try:
        assert cache.wait_synced(10)
        assert cache.pod_by_ip("198.18.0.10").workload == "web"
        assert cache.stats().api_errors["pods"] == 2
        assert cache.stats().api_errors["services"] == 0
    finally:
        cache.stop()


def test_list_answered_gone_is_retried(server, tmp_path) -> None:
    populate(server)
    server.fail_next(1, status=410, path_contains="/services", watch=False)
    cache = make_cache(server, tmp_path)
    cache.start()
    try:
        assert cache.wait_synced(10)
        assert cache.service_by_cluster_ip("198.19.0.10") is not None
        assert cache.stats().api_errors["services"] == 1
    finally:
        cache.stop()


def test_paged_list_sees_every_object(server, tmp_path) -> None:
    for index in range(7):
        server.apply(pod(f"p-{index}", "shop", f"198.18.1.{index}"))
    cache = make_cache(server, tmp_path, page_size=3)
    cache.start()
    try:
        assert cache.wait_synced(10)
        assert [cache.pod_by_ip(f"198.18.1.{i}").pod_name for i in range(7)] == [
            f"p-{i}" for i in range(7)
        ]
        continues = [r for r in server.requests_for("pods", watch=False) if "continue" in r.query]
        assert len(continues) == 2
    finally:
        cache.stop()


def test_api_absent_at_start_then_appearing(tmp_path) -> None:
    server = KubernetesApiServer(start=False, bookmark_interval=60.0)
    try:
        populate(server)
        cache = make_cache(server, tmp_path)
        cache.start()
        try:
            wait_until(lambda: cache.stats().api_errors["pods"] >= 2)
            assert cache.synced() is False
            assert cache.pod_by_ip("198.18.0.10") is None
            server.start()
            assert cache.wait_synced(10)
            assert cache.pod_by_ip("198.18.0.10").workload == "web"
        finally:
            cache.stop()
    finally:
        server.stop()


def test_stop_ends_every_watcher_thread(server, tmp_path) -> None:
    cache = make_cache(server, tmp_path)
    cache.start()
    assert cache.wait_synced(10)
    wait_until(lambda: server.open_watches() == 5)
    cache.stop()
    assert [w.running for w in cache._watchers] == [False] * 5

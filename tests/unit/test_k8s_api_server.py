"""The test API server speaks what the official client expects (typed models, Watch)."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.support.k8s_api_server import KubernetesApiServer, endpoint_slice, pod, service


@pytest.fixture
def api(tmp_path):
    with KubernetesApiServer(bookmark_interval=60.0) as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        yield server, config.new_client_from_config(config_file=str(kubeconfig))


def test_typed_list_get_and_paging(api) -> None:
    server, api_client = api
    server.apply(pod("a", "ns1", "198.18.0.1", labels={"app": "x"}))
    server.apply(pod("b", "ns1", "198.18.0.2"))
    server.apply(pod("c", "ns2", "198.18.0.3"))
    core = client.CoreV1Api(api_client)
    first = core.list_pod_for_all_namespaces(limit=2)
    assert [p.metadata.name for p in first.items] == ["a", "b"]
    rest = core.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    assert [p.metadata.name for p in rest.items] == ["c"]
    assert rest.metadata._continue is None
    assert first.metadata.resource_version == str(server.resource_version)
    assert [p.metadata.name for p in core.list_namespaced_pod("ns1").items] == ["a", "b"]
    assert core.read_namespaced_pod("a", "ns1").status.pod_ip == "198.18.0.1"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("zz", "ns1")
    assert missing.value.status == 404
    server.apply(service("db", "ns1", "198.19.0.10", [27017]))
    assert core.list_service_for_all_namespaces().items[0].spec.cluster_ip == "198.19.0.10"
    server.apply(endpoint_slice("db-1", "ns1", "db", ["198.18.0.2"], [27017]))
    slices = client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces()
    assert slices.items[0].endpoints[0].addresses == ["198.18.0.2"]


def test_watch_stream_resumes_after_a_version_and_sees_bookmarks(api) -> None:
    server, api_client = api
    server.apply(pod("a", "ns1", "198.18.0.1"))
    core = client.CoreV1Api(api_client)
    version = core.list_pod_for_all_namespaces().metadata.resource_version
    server.apply(pod("b", "ns1", "198.18.0.2"))
    server.delete("Pod", "ns1", "a")

    def bookmark_then_end() -> None:
        server.send_bookmarks()
        server.end_watches()

    seen = []
    stream = watch.Watch().stream(
        core.list_pod_for_all_namespaces,
        resource_version=version,
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    )
    for event in stream:
        obj = event["object"]
        if event["type"] == "BOOKMARK":
            seen.append(("BOOKMARK", obj["metadata"]["resourceVersion"]))
            break
        seen.append((event["type"], obj.metadata.name))
        if len(seen) == 2:
            threading.Thread(target=bookmark_then_end).start()
    assert seen == [("ADDED", "b"), ("DELETED", "a"), ("BOOKMARK", str(server.resource_version))]


def test_expired_history_is_410_for_watch_and_continue(api) -> None:
    server, api_client = api
    for name in "abc":
        server.apply(pod(name, "ns1", None))
    core = client.CoreV1Api(api_client)
    page = core.list_pod_for_all_namespaces(limit=1)
    server.apply(pod("d", "ns1", None))
    server.expire_history()
    with pytest.raises(ApiException) as gone:
        list(watch.Watch().stream(
            core.list_pod_for_all_namespaces,
            resource_version=page.metadata.resource_version,
            timeout_seconds=5,
        ))
    assert gone.value.status == 410
    with pytest.raises(ApiException) as expired:
        core.list_pod_for_all_namespaces(limit=1, _continue=page.metadata._continue)
    assert expired.value.status == 410


def test_injected_failures_and_restart_on_the_same_port(api) -> None:
    server, api_client = api
    core = client.CoreV1Api(api_client)
    server.fail_next(1, status=500, path_contains="/pods")
    with pytest.raises(ApiException) as failed:
        core.list_pod_for_all_namespaces()
    assert failed.value.status == 500
    port = server.port
    server.apply(pod("a", "ns1", "198.18.0.1"))
    server.restart()
    assert server.port == port
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces().items] == ["a"]

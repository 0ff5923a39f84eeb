"""The agent in Kubernetes mode, as a process, against pods made of network namespaces.

The node is the root namespace; "pods" are network namespaces on its bridge, their programs
(``tests/support/pod_peer.py``) in kubelet-style cgroups; ClusterIPs are DNAT-ed by the node
with nftables as kube-proxy does; the Kubernetes API is the project's test server, which the
agent's unmodified official client lists and watches (``--kubeconfig``). Every scenario books
what the pods' own programs moved and asserts that the agent's ``istio_tcp_*`` series of the
scenario's namespace are exactly those, label for label, for both reporters — no series
missing, none extra, no byte more or less:

- pod -> pod by pod IP (with and without a Service owning the endpoint);
- pod -> ClusterIP -> two Deployments behind one Service: the split per backend pod, as the
  backends themselves counted it;
- pod-local 127.0.0.1 (both ends that pod);
- a host-network pod (a node process in a pod cgroup of its own) -> a pod;
- IPv6 pod addresses and an IPv6 ClusterIP;
- churn: a pod deleted and another created with its IP while traffic flows;
- the API server restarted mid-run (watch resumed; then 410 Gone and a relist);
- the API server absent at the agent's start (counting meanwhile, /readyz 503 then 200).

One agent serves the scenarios that need a running API server (module scope); the absent-API
scenario starts its own. Teardown (agents, API servers, processes, namespaces, nft tables,
cgroups) runs on every exit.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.privileged.conftest import _unavailable
from tests.privileged.test_agent_process import free_port
from tests.support.k8s_api_server import KubernetesApiServer
from tests.support.k8s_scenarios import (
    NO_SERVICE,
    PROBE_CONFIG,
    PROBE_METRICS,
    TCPACCT,
    UNKNOWN_END,
    AgentProcess,
    KubePod,
    Ledger,
    Service,
    Workload,
    cluster_service,
    endpoint_slice,
    expected_probe_series,
    expected_series,
    free_cluster_ip,
    probe_lines,
    series_of_addresses,
    series_of_namespaces,
    start_peer,
)
from tests.support.netlab import NetLab, require_tools

NOT_SYNCED = "Kubernetes cache not synced yet (counting goes on meanwhile)\n"

# -- set-up shared by the scenarios ----------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def privileges() -> None:
    if os.geteuid() != 0:
        _unavailable("Kubernetes-mode tests need root (BPF, network namespaces, nftables)")
    missing = require_tools()
    if missing:
        _unavailable(f"missing tools {missing}: run sudo make setup (iproute2, nftables)")
    if not TCPACCT.exists():
        _unavailable(f"{TCPACCT} missing: run make setup (installs the package in the venv)")


def agent_arguments(backend: str, kubeconfig: Path, probe_config: Path) -> list[str]:
    return [
        "--interval",
        "1",
        "--kubeconfig",
        str(kubeconfig),
        "--node-name",
        "node-1",
        "--config",
        str(probe_config),
        "--backend",
        backend,
        "--log-level",
        "info",
    ]


@dataclass
class Cluster:
    """The API server and the agent the scenarios share."""

    api: KubernetesApiServer
    agent: AgentProcess


@pytest.fixture(scope="module")
def cluster(backend: str, tmp_path_factory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("kubernetes-mode")
    probe_config = directory / "probe.yaml"
    probe_config.write_text(PROBE_CONFIG)
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(KubernetesApiServer())
        kubeconfig = api.write_kubeconfig(directory / "kubeconfig")
        agent = AgentProcess(
            agent_arguments(backend, kubeconfig, probe_config),
            directory / "agent.log",
            free_port(),
        )
        stack.callback(agent.stop)
        agent.wait_ready()
        yield Cluster(api, agent)
        assert agent.self_metric("tcpacct_poll_errors_total") == 0, agent.log()
        assert agent.stop() == 0, agent.log()


@dataclass
class Scene:
    """One scenario's namespace: the objects it applied (deleted again at its end)."""

    api: KubernetesApiServer
    namespace: str
    applied: list[tuple[str, str, str]] = field(default_factory=list)

    def apply(self, *objects: dict[str, Any]) -> None:
        for obj in objects:
            stored = self.api.apply(obj)
            key = (stored["kind"], stored["metadata"]["namespace"], stored["metadata"]["name"])
            if key not in self.applied:
                self.applied.append(key)

    def apply_pod(self, kube_pod: KubePod) -> None:
        self.apply(*kube_pod.workload.objects(), kube_pod.api_object())

    def delete(self, kind: str, name: str) -> None:
        self.api.delete(kind, self.namespace, name)
        self.applied.remove((kind, self.namespace, name))

    def workload(self, name: str, **options: Any) -> Workload:
        return Workload(name, self.namespace, **options)

    def clean(self) -> None:
        for kind, namespace, name in reversed(self.applied):
            self.api.delete(kind, namespace, name)
        self.applied.clear()


@contextlib.contextmanager
def scene(cluster: Cluster, namespace: str) -> Iterator[Scene]:
    built = Scene(cluster.api, namespace)
    try:
        yield built
    finally:
        built.clean()


def wait_for_namespace(
    cluster: Cluster,
    ledger: Ledger,
    namespace: str,
    what: str,
    lab: NetLab,
    also: frozenset[str] = frozenset(),
) -> None:
    """Until the agent's istio_tcp_* series of ``namespace`` are exactly the ledger's; a
    failure also shows the probe series of the lab's addresses (and ``also``)."""
    addresses = {pod.ipv4 for pod in lab.pods} | {pod.ipv6 for pod in lab.pods if pod.ipv6}
    addresses |= {pod.gateway4 for pod in lab.pods} | also
    cluster.agent.wait_for_series(
        expected_series(ledger),
        lambda series: series_of_namespaces(series, {namespace}),
        what=what,
        explain=lambda text: probe_lines(text, addresses),
    )


def wait_cache_pods(agent: AgentProcess, count: float, what: str) -> None:
    """Until the agent's cache holds ``count`` pods (its own self-metric)."""
    deadline = time.monotonic() + 20
    while agent.self_metric("tcpacct_k8s_cache_objects", kind="pods") != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the cache never held {count} pods\n{agent.log()}")
        time.sleep(0.2)


# -- the scenarios ---------------------------------------------------------------------------


def test_pod_to_pod_direct_both_reporters(cluster: Cluster) -> None:
    """web -> db by db's pod IP: once on a port a Service's endpoints hold (the Service is
    named), once on a port no Service has."""
    with NetLab(pods=2) as lab, scene(cluster, "direct") as ns:
        web_ns, db_ns = lab.pods
        web = ns.workload("web", labels={"app": "web", "version": "v1"}, service_account="web")
        db = ns.workload("db", labels={"app": "db", "version": "v3"}, service_account="db-sa")
        web_pod, db_pod = web.pod(web_ns.ipv4), db.pod(db_ns.ipv4)
        ns.apply_pod(web_pod)
        ns.apply_pod(db_pod)
        ns.apply(
            cluster_service("db", "direct", free_cluster_ip(), 5432, 5432),
            endpoint_slice("db", "direct", [(db_pod, db_ns.ipv4)], 5432),
        )
        server = start_peer(lab, db_pod, db_ns)
        server.listen("0.0.0.0", 5432)
        server.listen("0.0.0.0", 7000)
        client = start_peer(lab, web_pod, web_ns)

        ledger = Ledger()
        to_service = ledger.flow(web_pod.identity, db_pod.identity, Service("db", "direct"))
        unnamed = ledger.flow(web_pod.identity, db_pod.identity, NO_SERVICE)
        ledger.talk(client, to_service, "a", (db_ns.ipv4, 5432), [(1_000, 20_000), (3, 7)])
        ledger.talk(client, to_service, "b", (db_ns.ipv4, 5432), [(70_001, 11)], close=False)
        ledger.talk(client, unnamed, "c", (db_ns.ipv4, 7000), [(555, 4_444)])
        wait_for_namespace(cluster, ledger, "direct", "direct, b still open", lab)

        wrote, read = client.exchange("b", 9, 123_456)
        to_service.add(request=wrote, response=read)
        client.close("b")
        to_service.add(closed=1)
        assert server.served(5432, 2) == (to_service.request, to_service.response, 2)
        assert server.served(7000, 1) == (unnamed.request, unnamed.response, 1)
        wait_for_namespace(cluster, ledger, "direct", "direct, all closed", lab)


def test_cluster_ip_split_over_two_deployments(cluster: Cluster) -> None:
    """productpage -> Service reviews (ClusterIP) -> reviews-v1 and reviews-v2 in turn: each
    backend's bytes land on its own workload and version, as the backends counted them."""
    with NetLab(pods=3) as lab, scene(cluster, "split") as ns:
        client_ns, v1_ns, v2_ns = lab.pods
        product = ns.workload("productpage", labels={"app": "productpage", "version": "v1"})
        reviews = [
            ns.workload(
                f"reviews-{version}",
                labels={"app": "reviews", "version": version},
                service_account="bookinfo-reviews",
            )
            for version in ("v1", "v2")
        ]
        client_pod = product.pod(client_ns.ipv4)
        backends = [reviews[0].pod(v1_ns.ipv4), reviews[1].pod(v2_ns.ipv4)]
        cluster_ip = free_cluster_ip()
        for kube_pod in (client_pod, *backends):
            ns.apply_pod(kube_pod)
        ns.apply(
            cluster_service("reviews", "split", cluster_ip, 9080, 9080),
            endpoint_slice(
                "reviews", "split", [(backends[0], v1_ns.ipv4), (backends[1], v2_ns.ipv4)], 9080
            ),
        )
        lab.add_cluster_ip(cluster_ip, 9080, [(v1_ns, 9080), (v2_ns, 9080)])
        servers = [start_peer(lab, backends[0], v1_ns), start_peer(lab, backends[1], v2_ns)]
        for server in servers:
            server.listen("0.0.0.0", 9080)
        client = start_peer(lab, client_pod, client_ns)

        sizes = [(100, 1_000), (20_000, 3), (7, 777_777), (4_000, 4_000), (1, 1), (60_000, 9)]
        sent = Ledger()  # the client's own account, whichever backend answered
        total = sent.flow(UNKNOWN_END, UNKNOWN_END, NO_SERVICE)
        for number, (payload, response) in enumerate(sizes):
            sent.talk(client, total, f"r{number}", (cluster_ip, 9080), [(payload, response)])

        ledger = Ledger()
        service = Service("reviews", "split")
        for server, backend in zip(servers, backends, strict=True):
            read, written, closed = server.served(9080, 3)  # round robin: 3 each
            ledger.flow(client_pod.identity, backend.identity, service).add(
                request=read, response=written, opened=closed, closed=closed
            )
        by_backend = list(ledger.flows.values())
        assert by_backend[0].request != by_backend[1].request  # the split is visible
        assert sum(t.request for t in by_backend) == total.request
        assert sum(t.response for t in by_backend) == total.response
        wait_for_namespace(cluster, ledger, "split", "ClusterIP split", lab)


def test_pod_local_loopback(cluster: Cluster) -> None:
    """A pod talking to itself on 127.0.0.1: both ends that pod; the Service that lists the
    pod's address on that port names the destination."""
    with NetLab(pods=1) as lab, scene(cluster, "loopback") as ns:
        (cache_ns,) = lab.pods
        cache = ns.workload("cache", labels={"app": "redis"}, kind="StatefulSet")
        cache_pod = cache.pod(cache_ns.ipv4)
        ns.apply_pod(cache_pod)
        ns.apply(
            cluster_service("redis", "loopback", free_cluster_ip(), 6379, 6379),
            endpoint_slice("redis", "loopback", [(cache_pod, cache_ns.ipv4)], 6379),
        )
        peer = start_peer(lab, cache_pod, cache_ns)
        peer.listen("127.0.0.1", 6379)
        peer.listen("127.0.0.1", 6380)

        ledger = Ledger()
        itself = cache_pod.identity
        assert itself.canonical_revision == "latest" and itself.workload == "cache"
        named = ledger.flow(itself, itself, Service("redis", "loopback"))
        unnamed = ledger.flow(itself, itself, NO_SERVICE)
        ledger.talk(peer, named, "l1", ("127.0.0.1", 6379), [(12_345, 54_321)])
        ledger.talk(peer, named, "l2", ("127.0.0.1", 6379), [(1, 2), (3, 4)])
        ledger.talk(peer, unnamed, "l3", ("127.0.0.1", 6380), [(999, 1)])
        assert peer.served(6379, 2) == (named.request, named.response, 2)
        wait_for_namespace(
            cluster, ledger, "loopback", "pod-local 127.0.0.1", lab, frozenset({"127.0.0.1"})
        )


def test_host_network_pod_found_by_cgroup(cluster: Cluster) -> None:
    """A DaemonSet's host-network pod (a process in the node's namespace, in its own pod
    cgroup) scraping a pod: the source is that pod's workload on both reporters."""
    with NetLab(pods=1) as lab, scene(cluster, "hostnet") as ns:
        (target_ns,) = lab.pods
        probe = ns.workload(
            "node-probe", labels={"app": "node-probe"}, kind="DaemonSet", service_account="probe"
        )
        target = ns.workload("exporter", labels={"app": "exporter", "version": "2.1"})
        # A host-network pod's address is the node's: here the bridge address it comes from.
        probe_pod = probe.pod(target_ns.gateway4, host_network=True)
        target_pod = target.pod(target_ns.ipv4)
        ns.apply_pod(probe_pod)
        ns.apply_pod(target_pod)
        server = start_peer(lab, target_pod, target_ns)
        server.listen("0.0.0.0", 9100)
        client = start_peer(lab, probe_pod, None)  # on the node

        ledger = Ledger()
        flow = ledger.flow(probe_pod.identity, target_pod.identity, NO_SERVICE)
        for number in range(3):
            ledger.talk(client, flow, f"h{number}", (target_ns.ipv4, 9100), [(50, 30_000 + number)])
        assert server.served(9100, 3) == (flow.request, flow.response, 3)
        wait_for_namespace(cluster, ledger, "hostnet", "host-network pod", lab)


def test_ipv6_pod_addresses(cluster: Cluster) -> None:
    """Dual-stack pods talking over IPv6: directly, and through an IPv6 ClusterIP."""
    with NetLab(pods=2, ipv6=True) as lab, scene(cluster, "ipv6") as ns:
        client_ns, server_ns = lab.pods
        assert client_ns.ipv6 is not None and server_ns.ipv6 is not None
        app = ns.workload("frontend", labels={"app": "frontend", "version": "v6"})
        api = ns.workload("api", labels={"app.kubernetes.io/name": "api"})
        client_pod = app.pod([client_ns.ipv4, client_ns.ipv6])
        server_pod = api.pod([server_ns.ipv4, server_ns.ipv6])
        cluster_ip = free_cluster_ip(ipv6=True)
        ns.apply_pod(client_pod)
        ns.apply_pod(server_pod)
        ns.apply(
            cluster_service("api", "ipv6", cluster_ip, 443, 8443),
            endpoint_slice("api", "ipv6", [(server_pod, server_ns.ipv6)], 8443),
        )
        lab.add_cluster_ip(cluster_ip, 443, [(server_ns, 8443)])
        server = start_peer(lab, server_pod, server_ns)
        server.listen("::", 8443)
        server.listen("::", 9000)
        client = start_peer(lab, client_pod, client_ns)

        ledger = Ledger()
        api_identity = server_pod.identity
        # app.kubernetes.io/name is the app and the canonical service, as Istio's
        assert (api_identity.app, api_identity.canonical_service) == ("api", "api")
        assert (api_identity.version, api_identity.canonical_revision) == ("unknown", "latest")
        via_service = ledger.flow(client_pod.identity, api_identity, Service("api", "ipv6"))
        direct = ledger.flow(client_pod.identity, api_identity, NO_SERVICE)
        ledger.talk(client, via_service, "s1", (cluster_ip, 443), [(2_048, 65_536)])
        ledger.talk(client, via_service, "s2", (cluster_ip, 443), [(10, 10), (20, 20)])
        ledger.talk(client, direct, "d1", (server_ns.ipv6, 9000), [(31_337, 1)])
        assert server.served(8443, 2) == (via_service.request, via_service.response, 2)
        wait_for_namespace(cluster, ledger, "ipv6", "IPv6", lab)


def test_pod_ip_reused_while_traffic_flows(cluster: Cluster) -> None:
    """Pod ``db-old`` at address X is deleted and ``db-new`` created at X while a client
    talks to X: what was connected before the switch stays ``db-old``'s (also bytes moved
    after it), connections made after are ``db-new``'s.

    The servers run as pods of another node (no cgroup of this node's kubelet), so both
    reporters name them by address, through the cache's record of who held X when.
    """
    with NetLab(pods=2) as lab, scene(cluster, "churn") as ns:
        client_ns, server_ns = lab.pods
        client_pod = ns.workload("loader", labels={"app": "loader"}).pod(client_ns.ipv4)
        old_pod = ns.workload("db-old", labels={"app": "db", "version": "old"}).pod(
            server_ns.ipv4, node="node-2"
        )
        new_pod = ns.workload("db-new", labels={"app": "db", "version": "new"}).pod(
            server_ns.ipv4, node="node-2"
        )
        ns.apply_pod(client_pod)
        ns.apply_pod(old_pod)
        wait_cache_pods(cluster.agent, 2, "before the switch")  # this scenario's only pods
        server = start_peer(lab, None, server_ns, name="db server")
        server.listen("0.0.0.0", 3306)
        client = start_peer(lab, client_pod, client_ns)
        address = (server_ns.ipv4, 3306)

        ledger = Ledger()
        before = ledger.flow(client_pod.identity, old_pod.identity, NO_SERVICE)
        after = ledger.flow(client_pod.identity, new_pod.identity, NO_SERVICE)
        ledger.talk(client, before, "o1", address, [(4_321, 8_765)])
        ledger.talk(client, before, "o2", address, [(10, 20)], close=False)
        wait_for_namespace(cluster, ledger, "churn", "before the switch", lab)

        time.sleep(1.1)  # creationTimestamp counts whole seconds: db-new is visibly newer
        ns.delete("Pod", old_pod.name)
        wait_cache_pods(cluster.agent, 1, "db-old deleted")
        ns.apply_pod(new_pod)
        wait_cache_pods(cluster.agent, 2, "db-new created")
        wrote, read = client.exchange("o2", 600, 6_000)  # an old connection, still flowing
        before.add(request=wrote, response=read)
        ledger.talk(client, after, "n1", address, [(77, 7_777)])
        ledger.talk(client, after, "n2", address, [(50_000, 5)], close=False)
        client.close("o2")
        before.add(closed=1)
        wait_for_namespace(cluster, ledger, "churn", "after the switch", lab)
        client.close("n2")
        after.add(closed=1)
        assert server.served(3306, 4) == (
            before.request + after.request,
            before.response + after.response,
            4,
        )
        wait_for_namespace(cluster, ledger, "churn", "all closed", lab)


def test_api_server_restarted_mid_run(cluster: Cluster) -> None:
    """The API server goes away and comes back twice while pods talk: counting goes on
    under the last known labels, the watch resumes from its resourceVersion (a pod created
    meanwhile arrives), then after a 410 Gone the agent relists; nothing is counted twice."""
    api, agent = cluster.api, cluster.agent
    with NetLab(pods=4) as lab, scene(cluster, "restart") as ns:
        client_ns, first_ns, second_ns, third_ns = lab.pods
        client_pod = ns.workload("client", labels={"app": "client"}).pod(client_ns.ipv4)
        servers = {
            name: ns.workload(name, labels={"app": name}).pod(netns.ipv4)
            for name, netns in (("one", first_ns), ("two", second_ns), ("three", third_ns))
        }
        ns.apply_pod(client_pod)
        ns.apply_pod(servers["one"])
        wait_cache_pods(agent, 2, "start")
        peers = {
            name: start_peer(lab, servers[name], netns)
            for name, netns in (("one", first_ns), ("two", second_ns), ("three", third_ns))
        }
        for peer in peers.values():
            peer.listen("0.0.0.0", 8080)
        client = start_peer(lab, client_pod, client_ns)

        ledger = Ledger()
        flows = {
            name: ledger.flow(client_pod.identity, pod.identity, NO_SERVICE)
            for name, pod in servers.items()
        }
        to_one = flows["one"]
        ledger.talk(client, to_one, "a", (first_ns.ipv4, 8080), [(1_111, 2_222)])
        ledger.talk(client, to_one, "long", (first_ns.ipv4, 8080), [(5, 5)], close=False)
        wait_for_namespace(cluster, ledger, "restart", "before the restarts", lab)
        restarts = agent.self_metric("tcpacct_k8s_watch_restarts_total", kind="pods")
        relists = agent.self_metric("tcpacct_k8s_relists_total", kind="pods")

        # 1: down; counting goes on with what the cache knows; a pod is created meanwhile.
        api.stop()
        ledger.talk(client, to_one, "b", (first_ns.ipv4, 8080), [(3_333, 4_444)])
        wrote, read = client.exchange("long", 66, 666)
        to_one.add(request=wrote, response=read)
        wait_for_namespace(cluster, ledger, "restart", "API server down", lab)
        ns.apply_pod(servers["two"])
        api.start()
        wait_cache_pods(agent, 3, "watch resumed")
        assert agent.self_metric("tcpacct_k8s_watch_restarts_total", kind="pods") > restarts
        assert agent.self_metric("tcpacct_k8s_relists_total", kind="pods") == relists
        ledger.talk(client, flows["two"], "c", (second_ns.ipv4, 8080), [(200, 20_000)])
        wait_for_namespace(cluster, ledger, "restart", "after the first restart", lab)

        # 2: down, history compacted meanwhile: the watch gets 410 Gone and lists again.
        api.stop()
        ns.apply_pod(servers["three"])
        api.expire_history()
        api.start()
        wait_cache_pods(agent, 4, "relisted")
        assert agent.self_metric("tcpacct_k8s_relists_total", kind="pods") == relists + 1
        ledger.talk(client, flows["three"], "d", (third_ns.ipv4, 8080), [(9_999, 1)])
        ledger.talk(client, to_one, "e", (first_ns.ipv4, 8080), [(123, 321)])
        wrote, read = client.exchange("long", 7, 70_000)
        to_one.add(request=wrote, response=read)
        client.close("long")
        to_one.add(closed=1)
        for name, count in (("one", 4), ("two", 1), ("three", 1)):
            flow = flows[name]
            assert peers[name].served(8080, count) == (flow.request, flow.response, count)
        wait_for_namespace(cluster, ledger, "restart", "after the relist", lab)


def test_api_server_absent_at_start(backend: str, tmp_path: Path) -> None:
    """No API server when the agent starts: /readyz 503 while bytes are counted (under
    "unknown", exactly), then the server appears: /readyz 200, new connections named.
    A connection named "unknown" keeps those labels (a connection is named once)."""
    probe_config = tmp_path / "probe.yaml"
    probe_config.write_text(PROBE_CONFIG)
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(KubernetesApiServer(start=False))  # port held, refusing
        lab = stack.enter_context(NetLab(pods=2))
        client_ns, server_ns = lab.pods
        client_pod = Workload("early", "absent", {"app": "early"}).pod(client_ns.ipv4)
        server_pod = Workload("store", "absent", {"app": "store"}).pod(server_ns.ipv4)
        for kube_pod in (client_pod, server_pod):
            for obj in (*kube_pod.workload.objects(), kube_pod.api_object()):
                api.apply(obj)
        agent = AgentProcess(
            agent_arguments(backend, api.write_kubeconfig(tmp_path / "kubeconfig"), probe_config),
            tmp_path / "agent.log",
            free_port(),
        )
        stack.callback(agent.stop)
        agent.wait_readyz(503, NOT_SYNCED)  # serving, polling, not ready
        server = start_peer(lab, server_pod, server_ns)
        server.listen("0.0.0.0", 6000)
        client = start_peer(lab, client_pod, client_ns)
        address = (server_ns.ipv4, 6000)

        unnamed = Ledger()
        early = unnamed.flow(UNKNOWN_END, UNKNOWN_END, NO_SERVICE)
        unnamed.talk(client, early, "u1", address, [(1_234, 56_789)])
        unnamed.talk(client, early, "u2", address, [(4_096, 16)], close=False)
        ours = {client_ns.ipv4, server_ns.ipv4}
        later = Ledger()  # connections made once the API server is there

        def by_address() -> dict:
            expected = expected_probe_series(unnamed, client_ns.ipv4, server_ns.ipv4, 6000)
            expected.update(expected_probe_series(later, client_ns.ipv4, server_ns.ipv4, 6000))
            return expected

        agent.wait_for_series(
            by_address(),
            lambda series: series_of_addresses(series, ours),
            PROBE_METRICS,
            what="API server absent",
        )
        assert agent.get("/readyz") == (503, NOT_SYNCED)
        assert agent.self_metric("tcpacct_k8s_api_errors_total") > 0

        api.start()
        agent.wait_ready()
        assert agent.get("/readyz") == (200, "ready (Kubernetes cache synced)\n")
        wrote, read = client.exchange("u2", 10, 100_000)  # named "unknown" for good
        early.add(request=wrote, response=read)
        client.close("u2")
        early.add(closed=1)
        named = later.flow(client_pod.identity, server_pod.identity, NO_SERVICE)
        later.talk(client, named, "k1", address, [(8_000, 80)])
        assert server.served(6000, 3) == (
            early.request + named.request,
            early.response + named.response,
            3,
        )
        agent.wait_for_series(
            by_address(),
            lambda series: series_of_addresses(series, ours),
            PROBE_METRICS,
            what="API server there (by address)",
        )
        agent.wait_for_series(
            expected_series(later),
            lambda series: series_of_namespaces(series, {"absent"}),
            what="API server there (Istio labels)",
        )
        assert agent.stop() == 0, agent.log()

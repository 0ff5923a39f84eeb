"""Figure 5: the Kubernetes metadata cache with 5,000 pods and 1,000 services.

The project's test API server (tests/support/k8s_api_server.py) serves the objects; the
cache runs in a process of its own (``python -m bench.k8s_cache --kubeconfig F``) with the
unmodified official client, so its RSS is the cache's (plus the interpreter and client):
RSS before starting the watchers, after the first full sync, and the cost of each lookup.

Cluster: 50 namespaces; 1,000 Deployments' ReplicaSets, 5 pods each (198.18.0.0/16 pod
IPs); 1,000 Services (ClusterIPs in 198.19.0.0/16), each with an EndpointSlice of its 5 pods.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.agent_cost import hot_spots
from bench.figures import Figure, Omitted
from bench.probe import memory_kib
from bench.stats import summarise

ROOT = Path(__file__).resolve().parents[1]
PODS, SERVICES, NAMESPACES = 5_000, 1_000, 50
LOOKUPS = 20_000


def pod_ip(i: int) -> str:
    """Pod ``i`` -> its address: ``0`` -> ``"198.18.0.1"``, ``300`` -> ``"198.18.1.45"``."""
    return f"198.18.{(i + 1) // 256}.{(i + 1) % 256}"


def service_ip(i: int) -> str:
    return f"198.19.{(i + 1) // 256}.{(i + 1) % 256}"


def populate(server: Any) -> None:
    from tests.support.k8s_api_server import endpoint_slice, pod, replica_set, service

    per_service = PODS // SERVICES
    for s in range(SERVICES):
        namespace = f"ns-{s % NAMESPACES}"
        app = f"app-{s}"
        server.apply(replica_set(f"{app}-5d8f9", namespace, app))
        server.apply(service(app, namespace, service_ip(s), [8080]))
        ips = [pod_ip(s * per_service + k) for k in range(per_service)]
        server.apply(endpoint_slice(f"{app}-abc", namespace, app, ips, [8080]))
        for k, ip in enumerate(ips):
            server.apply(
                pod(
                    f"{app}-5d8f9-{k:05d}",
                    namespace,
                    ip,
                    labels={"app": app, "version": "v1", "pod-template-hash": "5d8f9"},
                    owner=("ReplicaSet", f"{app}-5d8f9"),
                )
            )


def _per_call_ns(call: Any, arguments: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    for args in arguments:
        call(*args)
    return (time.perf_counter() - start) * 1e9 / len(arguments)


ACCOUNTING_POLLS, CONNECTIONS_PER_POLL = 8, 3_000


def finished_pairs(poll: int, connections: int = CONNECTIONS_PER_POLL) -> list[Any]:
    """Both finished sockets of poll ``poll``'s ``connections`` pod-to-pod connections (ids
    no other poll uses): a client in one of pods 0-199 (ephemeral port) to a server in one
    of pods 1000-1199 on 8080 (its Service found by endpoint), 64 bytes each way."""
    from agent.model import Endpoint, Role, SocketFlag, SocketSample

    ended = SocketFlag.OPENED | SocketFlag.CLOSED | SocketFlag.DESTROYED
    samples = []
    for i in range(connections):
        client_ip, server_ip = pod_ip(i * 7 % 200), pod_ip(1000 + i * 13 % 200)
        sid = 1 + 2 * (poll * connections + i)
        client = Endpoint(client_ip, 30000 + (sid // 2) % 30000)
        server = Endpoint(server_ip, 8080)
        samples.append(
            SocketSample(sid, 64, 64, client, server, Role.CLIENT, ended, 0, 100, "client")
        )
        samples.append(
            SocketSample(sid + 1, 64, 64, server, client, Role.SERVER, ended, 0, 200, "server")
        )
    return samples


def accounting_us(cache: Any) -> list[float]:
    """Kubernetes mode's CPU per finished socket: polls of finished connections through the
    real accountant and KubernetesEnricher over the synced cache; thread CPU per socket of
    each poll after the first (which makes the series)."""
    from agent.accounting import Accountant
    from agent.enrich.kubernetes import KubernetesEnricher
    from agent.metrics.catalogue import load_catalogue
    from agent.model import KernelCounters, KernelPoll

    accountant = Accountant(load_catalogue([]), KubernetesEnricher(cache))
    per_socket = []
    for number in range(ACCOUNTING_POLLS):
        finished = finished_pairs(number)
        poll = KernelPoll(KernelCounters(), (), tuple(finished), (), {}, sequence=number + 1)
        start = time.thread_time()
        accountant.apply(poll)
        per_socket.append((time.thread_time() - start) * 1e6 / len(finished))
    return per_socket[1:]


def cache_main(kubeconfig: str) -> dict[str, Any]:
    """In the cache's own process: sync, then time lookups; the answer as a dict."""
    import gc

    from agent.k8s import KubernetesCache, api_client

    before = memory_kib()
    cache = KubernetesCache(api_client(kubeconfig))
    start = time.perf_counter()
    cache.start()
    try:
        if not cache.wait_synced(300):
            raise RuntimeError("the cache did not sync within 300 s")
        sync_seconds = time.perf_counter() - start
        time.sleep(0.5)
        gc.collect()
        after = memory_kib()
        stats = cache.stats()
        hits = [(pod_ip(i * 7 % PODS),) for i in range(LOOKUPS)]
        misses = [(f"198.18.250.{i % 250}",) for i in range(LOOKUPS)]
        services = [(service_ip(i % SERVICES), 8080) for i in range(LOOKUPS)]
        endpoints = [(pod_ip(i * 7 % PODS), 8080) for i in range(LOOKUPS)]
        lookups = {
            "pod_by_ip_hit": _per_call_ns(cache.pod_by_ip, hits),
            "pod_by_ip_miss": _per_call_ns(cache.pod_by_ip, misses),
            "service_by_cluster_ip": _per_call_ns(cache.service_by_cluster_ip, services),
            "service_by_endpoint": _per_call_ns(cache.service_by_endpoint, endpoints),
        }
        found = sum(cache.pod_by_ip(a) is not None for (a,) in hits[:PODS])
        accounting = accounting_us(cache)
        profiler = cProfile.Profile()
        profiler.enable()
        for (address,) in hits[:2000]:
            cache.pod_by_ip(address)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(10)
    finally:
        cache.stop()
    return {
        "rss_before_mib": before["rss_kib"] / 1024,
        "rss_synced_mib": after["rss_kib"] / 1024,
        "sync_seconds": sync_seconds,
        "objects": dict(stats.objects),
        "lookups_ns": lookups,
        "accounting_us": accounting,
        "hits_found": found,
        "pod_by_ip_profile": hot_spots(text.getvalue(), 10),
    }


def measure_k8s_cache(rounds: int = 3) -> tuple[list[Figure], list[Omitted]]:
    try:
        from tests.support.k8s_api_server import KubernetesApiServer
    except ImportError as error:
        reason = f"tests/support/k8s_api_server.py is not importable ({error})"
        return [], [Omitted("k8s.cache", "Kubernetes cache", reason)]
    runs = []
    with (
        KubernetesApiServer(bookmark_interval=60.0) as server,
        tempfile.TemporaryDirectory(prefix="bench-k8s-") as tmp,
    ):
        populate(server)
        kubeconfig = server.write_kubeconfig(Path(tmp) / "kubeconfig")
        for _ in range(rounds):
            done = subprocess.run(
                [sys.executable, "-m", "bench.k8s_cache", "--kubeconfig", str(kubeconfig)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                reason = f"the cache process failed: {done.stderr.strip()[-800:]}"
                return [], [Omitted("k8s.cache", "Kubernetes cache", reason)]
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cluster = f"{PODS} pods, {SERVICES} services + EndpointSlices, {SERVICES} ReplicaSets"
    growth = [r["rss_synced_mib"] - r["rss_before_mib"] for r in runs]
    figures = [
        Figure(
            key="k8s.cache_rss_mib.pods_5k_services_1k",
            title="cache process RSS after sync",
            unit="MiB",
            method=f"{cluster} from the test API server; VmRSS of the cache's process after "
            f"the first full list+watch sync; {rounds} fresh processes.",
            value=summarise([r["rss_synced_mib"] for r in runs]),
            details={
                "growth_by_sync_mib": growth,
                "rss_before_mib": [r["rss_before_mib"] for r in runs],
                "objects": runs[0]["objects"],
            },
        ),
        Figure(
            key="k8s.cache_growth_mib.pods_5k_services_1k",
            title="RSS added by syncing the cache",
            unit="MiB",
            method="RSS after sync minus RSS before the watchers started (same process).",
            value=summarise(growth),
        ),
        Figure(
            key="k8s.sync_s.pods_5k_services_1k",
            title="time to first full sync",
            unit="s",
            method="from cache.start() to wait_synced() (all five kinds listed).",
            value=summarise([r["sync_seconds"] for r in runs]),
        ),
    ]
    figures.append(
        Figure(
            key="k8s.account_us_per_finished_socket",
            title="Kubernetes mode: CPU per finished socket (naming and counting)",
            unit="us",
            method=f"in the cache's process after sync: {ACCOUNTING_POLLS} polls of "
            f"{CONNECTIONS_PER_POLL} finished pod-to-pod connections (both ends; a Service found "
            "by endpoint) through the real accountant and KubernetesEnricher (built-in "
            "metrics; no netns, cgroup or conntrack resolvers, which a DaemonSet adds); thread "
            "CPU of accountant.apply() per finished socket, each poll after the first; the "
            "median poll of each process.",
            value=summarise([statistics.median(r["accounting_us"]) for r in runs]),
            details={"polls_us": [r["accounting_us"] for r in runs]},
        )
    )
    for name in runs[0]["lookups_ns"]:
        figures.append(
            Figure(
                key=f"k8s.lookup_ns.{name}",
                title=f"cache lookup {name.replace('_', ' ')}",
                unit="ns",
                method=f"{LOOKUPS} calls in a loop after sync, wall time per call.",
                value=summarise([r["lookups_ns"][name] for r in runs]),
                details={
                    "hits_found": runs[0]["hits_found"],
                    "profile_top_2000_calls": runs[0]["pod_by_ip_profile"],
                }
                if name == "pod_by_ip_hit"
                else {},
            )
        )
    return figures, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.k8s_cache")
    parser.add_argument("--kubeconfig", required=True)
    args = parser.parse_args(argv)
    sys.stdout.write(json.dumps(cache_main(args.kubeconfig)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Builds a running agent from settings: the one place that knows every concrete part.

Order matters: the HTTP port is bound first (a taken port fails before BPF is compiled),
listening sockets are read before the kernel hooks attach (roles of older connections), and
on any failure everything already made is closed again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.registry import CollectorRegistry

from agent.accounting import Accountant
from agent.collecting import tune_for_polling
from agent.ebpf.tracing import Capacities, KernelTracer, open_tracer
from agent.enrich.local import LocalEnricher
from agent.exporter import SelfMetric, TcpacctCollector
from agent.k8s.client import api_client, in_cluster_available
from agent.metrics.catalogue import load_catalogue
from agent.metrics.reloading import ConfigWatcher
from agent.model import Enricher
from agent.pipeline import Agent
from agent.priority import yield_cpu
from agent.resolve.listening import listening_sockets
from agent.resolve.processes import ProcessNames
from agent.serving import EndpointSecurity, Health, MetricsServer
from agent.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class RunningAgent:
    agent: Agent
    server: MetricsServer
    tracer: KernelTracer
    port: int
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()


def build_agent(settings: Settings) -> RunningAgent:
    closers: list[Callable[[], None]] = []
    try:
        return _build(settings, closers)
    except BaseException:
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                closer()
        raise


@dataclass
class EnrichmentMode:
    """Local or Kubernetes enrichment, with what it adds to readiness and self-metrics."""

    name: str
    enricher: Enricher
    readiness: Callable[[], Health] | None = None
    self_metrics: Callable[[], list[SelfMetric]] = lambda: []


def kubernetes_wanted(settings: Settings) -> bool:
    """Forced by --kubernetes/--no-kubernetes, else on in a cluster or with --kubeconfig."""
    if settings.kubernetes is not None:
        return settings.kubernetes
    return settings.kubeconfig is not None or in_cluster_available()


def _enrichment(settings: Settings, closers: list[Callable[[], None]]) -> EnrichmentMode:
    if not kubernetes_wanted(settings):
        return EnrichmentMode("local", LocalEnricher(ProcessNames(settings.proc_root).name))
    # Kubernetes mode's parts are imported only here: local mode starts without them.
    from agent.enrich.kubernetes import KubernetesEnricher
    from agent.k8s.cache import KubernetesCache
    from agent.k8s.identity import IdentityRules
    from agent.resolve.cgroups import CgroupResolver
    from agent.resolve.conntrack import ConntrackResolver
    from agent.resolve.netns import NetnsResolver

    api = api_client(str(settings.kubeconfig) if settings.kubeconfig else None)
    cache = KubernetesCache(
        api,
        rules=IdentityRules(cluster_name=settings.cluster_name, trust_domain=settings.trust_domain),
    )
    cache.start()  # the API server may be down: watchers retry with backoff meanwhile
    closers.append(cache.stop)
    cgroups = CgroupResolver(settings.proc_root)
    nat = ConntrackResolver()
    closers.append(nat.close)
    enricher = KubernetesEnricher(
        cache, netns=NetnsResolver(settings.proc_root, cgroups=cgroups), processes=cgroups, nat=nat
    )

    def readiness() -> Health:
        if cache.synced():
            return Health(True, "ready (Kubernetes cache synced)")
        return Health(False, "Kubernetes cache not synced yet (counting goes on meanwhile)")

    def self_metrics() -> list[SelfMetric]:
        stats = cache.stats()
        per_kind = [
            (
                "tcpacct_k8s_cache_objects",
                "Objects in the Kubernetes cache",
                "gauge",
                stats.objects,
            ),
            (
                "tcpacct_k8s_watch_restarts_total",
                "Watch streams restarted",
                "counter",
                stats.watch_restarts,
            ),
            (
                "tcpacct_k8s_relists_total",
                "Full relists (410 Gone, start, errors)",
                "counter",
                stats.relists,
            ),
            ("tcpacct_k8s_api_errors_total", "Kubernetes API errors", "counter", stats.api_errors),
            (
                "tcpacct_k8s_lookup_misses_total",
                "Lookups that found nothing",
                "counter",
                stats.lookup_misses,
            ),
        ]
        metrics = [
            SelfMetric(name, text, kind, [({"kind": k}, v) for k, v in sorted(values.items())])
            for name, text, kind, values in per_kind
        ]
        metrics.append(
            SelfMetric(
                "tcpacct_k8s_cache_synced",
                "1 once every kind has listed",
                "gauge",
                [({}, int(stats.synced))],
            )
        )
        return metrics

    return EnrichmentMode("kubernetes", enricher, readiness, self_metrics)


def open_counting(settings: Settings) -> tuple[KernelTracer, Accountant]:
    """The kernel side and accounting without the HTTP endpoint (``tcpacct top``)."""
    tracer = open_tracer(
        settings.backend,
        btf_path=settings.btf_path,
        capacities=Capacities(sockets=settings.max_sockets, closed=settings.max_closed),
        listeners=lambda: listening_sockets(settings.proc_root),
        compile_cache=settings.compile_cache,
    )
    tracer.start_draining()
    enricher = LocalEnricher(ProcessNames(settings.proc_root).name)
    accountant = Accountant(load_catalogue(settings.config_files), enricher)
    tune_for_polling()
    return tracer, accountant


def _build(settings: Settings, closers: list[Callable[[], None]]) -> RunningAgent:
    catalogue = load_catalogue(settings.config_files)
    registry = CollectorRegistry(auto_describe=False)
    holder: dict[str, Agent] = {}

    def live() -> Health:
        return holder["agent"].liveness() if "agent" in holder else Health(True, "starting")

    def ready() -> Health:
        return holder["agent"].readiness() if "agent" in holder else Health(False, "starting")

    server = MetricsServer(
        settings.listen_host,
        settings.listen_port,
        registry,
        live=live,
        ready=ready,
        security=EndpointSecurity(
            settings.tls_cert, settings.tls_key, settings.basic_auth, settings.bearer_token
        ),
    )
    closers.append(server.close)
    server.start()

    tracer = open_tracer(
        settings.backend,
        btf_path=settings.btf_path,
        capacities=Capacities(sockets=settings.max_sockets, closed=settings.max_closed),
        listeners=lambda: listening_sockets(settings.proc_root),
        compile_cache=settings.compile_cache,
    )
    closers.append(tracer.close)
    tracer.start_draining()
    mode = _enrichment(settings, closers)
    accountant = Accountant(
        catalogue,
        mode.enricher,
        max_series=settings.max_series,
        series_ttl=settings.series_ttl or None,
    )
    agent = Agent(
        tracer,
        accountant,
        interval=settings.interval,
        catalogue_loader=lambda: load_catalogue(settings.config_files),
        extra_self_metrics=mode.self_metrics,
        extra_readiness=mode.readiness,
    )
    holder["agent"] = agent
    registry.register(TcpacctCollector(accountant, agent.self_metrics))
    if settings.config_files:
        watcher = ConfigWatcher(settings.config_files, agent.reload)
        watcher.start()
        closers.append(watcher.stop)
    tune_for_polling()  # what exists now lives as long as the agent
    yield_cpu(settings.nice)  # every thread is started by now; later ones inherit it
    return RunningAgent(agent, server, tracer, server.port, closers)

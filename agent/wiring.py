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
from agent.ebpf.tracing import Capacities, KernelTracer, open_tracer
from agent.enrich.local import LocalEnricher
from agent.exporter import TcpacctCollector
from agent.metrics.catalogue import load_catalogue
from agent.metrics.reloading import ConfigWatcher
from agent.pipeline import Agent
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


def open_counting(settings: Settings) -> tuple[KernelTracer, Accountant]:
    """The kernel side and accounting without the HTTP endpoint (``tcpacct top``)."""
    tracer = open_tracer(
        settings.backend,
        btf_path=settings.btf_path,
        capacities=Capacities(sockets=settings.max_sockets, closed=settings.max_closed),
        listeners=lambda: listening_sockets(settings.proc_root),
    )
    enricher = LocalEnricher(ProcessNames(settings.proc_root).name)
    return tracer, Accountant(load_catalogue(settings.config_files), enricher)


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
    )
    closers.append(tracer.close)
    enricher = LocalEnricher(ProcessNames(settings.proc_root).name)
    accountant = Accountant(
        catalogue,
        enricher,
        max_series=settings.max_series,
        series_ttl=settings.series_ttl or None,
    )
    agent = Agent(
        tracer,
        accountant,
        interval=settings.interval,
        catalogue_loader=lambda: load_catalogue(settings.config_files),
    )
    holder["agent"] = agent
    registry.register(TcpacctCollector(accountant, agent.self_metrics))
    if settings.config_files:
        watcher = ConfigWatcher(settings.config_files, agent.reload)
        watcher.start()
        closers.append(watcher.stop)
    return RunningAgent(agent, server, tracer, server.port, closers)

"""Fakes for unit tests: socket samples, polls, an enricher and a tiny metric catalogue.

    sample(7, sent=100, role=Role.CLIENT)                  -> a SocketSample with socket id 7
    poll(live=[sample(7, sent=100)], finished=[])          -> a KernelPoll
    FakeEnricher(pending={7}).attributes(s7, peers, final=False) -> None (held back)
    FakeCatalogue().definitions() -> one metric per ValueSource, labels
        (reporter, source_workload, destination_workload)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.model import (
    ConnectionAttributes,
    Endpoint,
    KernelCounters,
    KernelPoll,
    MetricDefinition,
    PeerIdentity,
    PeerIndex,
    Reporter,
    Role,
    ServiceIdentity,
    SocketFlag,
    SocketSample,
    ValueSource,
)

CLIENT_ADDRESS = "198.18.0.1"
SERVER_ADDRESS = "198.18.0.2"
SERVER_PORT = 80


def sample(
    socket_id: int,
    *,
    sent: int = 0,
    received: int = 0,
    role: Role = Role.CLIENT,
    flags: SocketFlag = SocketFlag.OPENED,
    client_port: int | None = None,
    pid: int = 0,
    comm: str = "",
    netns: int = 4026531840,
) -> SocketSample:
    """A socket of a connection 198.18.0.1:<40000+id> -> 198.18.0.2:80, seen from ``role``.

    ``sample(3, sent=10)`` -> client socket 198.18.0.1:40003 -> 198.18.0.2:80 that wrote 10.
    """
    client = Endpoint(CLIENT_ADDRESS, client_port if client_port is not None else 40000 + socket_id)
    server = Endpoint(SERVER_ADDRESS, SERVER_PORT)
    local, remote = (server, client) if role is Role.SERVER else (client, server)
    return SocketSample(
        socket_id=socket_id,
        sent_bytes=sent,
        received_bytes=received,
        local=local,
        remote=remote,
        role=role,
        flags=flags,
        netns=netns,
        pid=pid,
        comm=comm,
    )


def poll(
    live: Iterable[SocketSample] = (),
    finished: Iterable[SocketSample] = (),
    counters: KernelCounters | None = None,
) -> KernelPoll:
    return KernelPoll(
        counters=counters if counters is not None else KernelCounters(),
        live=tuple(live),
        finished=tuple(finished),
    )


@dataclass
class FakeEnricher:
    """Names the local end ``workloads[socket_id]`` (default ``"app"``), the remote end by
    its address. Sockets in ``pending`` cannot be named until asked with ``final=True``.

    Every call is recorded as ``(socket_id, final)`` in ``calls``.
    """

    workloads: dict[int, str] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)
    calls: list[tuple[int, bool]] = field(default_factory=list)

    def attributes(
        self, sample: SocketSample, peers: PeerIndex, *, final: bool
    ) -> ConnectionAttributes | None:
        self.calls.append((sample.socket_id, final))
        if sample.socket_id in self.pending and not final:
            return None
        local = PeerIdentity(
            workload=self.workloads.get(sample.socket_id, "app"),
            ip=sample.local.address,
            port=sample.local.port,
        )
        remote = PeerIdentity(
            workload=sample.remote.address, ip=sample.remote.address, port=sample.remote.port
        )
        client, server = (remote, local) if sample.role is Role.SERVER else (local, remote)
        return ConnectionAttributes(
            reporter=sample.reporter,
            source=client,
            destination=server,
            service=ServiceIdentity(host=str(sample.server)),
        )


@dataclass(frozen=True)
class FakeMetric:
    """A metric definition labelled by reporter and the two workloads."""

    name: str
    value: ValueSource
    help: str = "a fake metric"
    label_names: tuple[str, ...] = ("reporter", "source_workload", "destination_workload")
    reporters: frozenset[Reporter] = frozenset(Reporter)

    def evaluate(self, attributes: ConnectionAttributes) -> tuple[str, ...] | None:
        if attributes.reporter not in self.reporters:
            return None
        values = {
            "reporter": attributes.reporter.value,
            "source_workload": attributes.source.workload,
            "destination_workload": attributes.destination.workload,
        }
        return tuple(values[name] for name in self.label_names)


FAKE_METRICS = (
    FakeMetric("fake_sent_bytes_total", ValueSource.SENT_BYTES),
    FakeMetric("fake_received_bytes_total", ValueSource.RECEIVED_BYTES),
    FakeMetric("fake_opened_total", ValueSource.CONNECTIONS_OPENED),
    FakeMetric("fake_closed_total", ValueSource.CONNECTIONS_CLOSED),
)


@dataclass(frozen=True)
class FakeCatalogue:
    """``agent.model.MetricCatalogue`` over fixed definitions (default: :data:`FAKE_METRICS`)."""

    metrics: tuple[MetricDefinition, ...] = FAKE_METRICS

    def definitions(self) -> tuple[MetricDefinition, ...]:
        return self.metrics


class NoPeers:
    """A PeerIndex with no peers."""

    def peer_of(self, sample: SocketSample) -> SocketSample | None:
        return None


@dataclass
class PeersOf:
    """A PeerIndex from an explicit map socket id -> peer sample."""

    peers: dict[int, SocketSample] = field(default_factory=dict)

    def peer_of(self, sample: SocketSample) -> SocketSample | None:
        return self.peers.get(sample.socket_id)

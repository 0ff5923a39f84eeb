"""Local mode: each end is named after its process on this host, else its address."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.enrich.local import LocalEnricher
from agent.metrics.catalogue import load_catalogue
from agent.model import (
    ConnectionAttributes,
    Endpoint,
    PeerIdentity,
    Reporter,
    Role,
    ServiceIdentity,
    SocketFlag,
    SocketSample,
)
from tests.support.fakes import NoPeers, PeersOf

PROCESSES = {42: "curl", 43: "nginx"}


def enricher(processes: dict[int, str] | None = None) -> LocalEnricher:
    table = PROCESSES if processes is None else processes
    return LocalEnricher(table.get)


def socket_sample(local: tuple[str, int], remote: tuple[str, int], role: Role, *,
                  pid: int = 0, comm: str = "", socket_id: int = 1) -> SocketSample:
    return SocketSample(
        socket_id=socket_id, sent_bytes=0, received_bytes=0, local=Endpoint(*local),
        remote=Endpoint(*remote), role=role, flags=SocketFlag.OPENED, pid=pid, comm=comm,
    )


def test_client_of_a_remote_server() -> None:
    """The module docstring's example: curl (pid 42) -> 198.18.0.2:80 off this host."""
    sample = socket_sample(("198.18.0.1", 40001), ("198.18.0.2", 80), Role.CLIENT, pid=42)
    assert enricher().attributes(sample, NoPeers(), final=False) == ConnectionAttributes(
        reporter=Reporter.SOURCE,
        source=PeerIdentity(workload="curl", ip="198.18.0.1", port=40001),
        destination=PeerIdentity(workload="198.18.0.2", ip="198.18.0.2", port=80),
        service=ServiceIdentity(host="198.18.0.2:80"),
        protocol="tcp",
    )


def test_server_for_a_remote_client() -> None:
    sample = socket_sample(("198.18.0.2", 80), ("198.18.0.9", 51000), Role.SERVER, pid=43)
    assert enricher().attributes(sample, NoPeers(), final=False) == ConnectionAttributes(
        reporter=Reporter.DESTINATION,
        source=PeerIdentity(workload="198.18.0.9", ip="198.18.0.9", port=51000),
        destination=PeerIdentity(workload="nginx", ip="198.18.0.2", port=80),
        service=ServiceIdentity(host="198.18.0.2:80"),
    )


def test_both_ends_on_this_host_are_named_after_their_processes() -> None:
    client = socket_sample(("127.0.0.1", 5000), ("127.0.0.1", 8080), Role.CLIENT, pid=42)
    server = socket_sample(("127.0.0.1", 8080), ("127.0.0.1", 5000), Role.SERVER, pid=43,
                           socket_id=2)
    peers = PeersOf({1: server, 2: client})
    from_client = enricher().attributes(client, peers, final=False)
    from_server = enricher().attributes(server, peers, final=False)
    assert from_client is not None and from_server is not None
    assert (from_client.source.workload, from_client.destination.workload) == ("curl", "nginx")
    assert (from_server.source.workload, from_server.destination.workload) == ("curl", "nginx")
    assert from_client.service.host == from_server.service.host == "127.0.0.1:8080"
    assert (from_client.reporter, from_server.reporter) == (Reporter.SOURCE,
                                                            Reporter.DESTINATION)


def test_process_gone_falls_back_on_the_kernel_task_name() -> None:
    sample = socket_sample(("198.18.0.1", 40001), ("198.18.0.2", 80), Role.CLIENT, pid=999,
                           comm="wget")
    attributes = enricher().attributes(sample, NoPeers(), final=False)
    assert attributes is not None and attributes.source.workload == "wget"


def test_unknown_owner_is_held_back_until_final() -> None:
    sample = socket_sample(("198.18.0.1", 40001), ("198.18.0.2", 80), Role.CLIENT, pid=0)
    assert enricher().attributes(sample, NoPeers(), final=False) is None
    attributes = enricher().attributes(sample, NoPeers(), final=True)
    assert attributes is not None
    assert (attributes.source.workload, attributes.destination.workload) == (
        "unknown", "198.18.0.2"
    )


def test_pid_known_but_no_name_anywhere_is_held_back() -> None:
    sample = socket_sample(("198.18.0.1", 40001), ("198.18.0.2", 80), Role.CLIENT, pid=999)
    assert enricher().attributes(sample, NoPeers(), final=False) is None


@pytest.mark.parametrize("loopback", ["127.0.0.1", "127.3.4.5", "::1"])
def test_loopback_peer_not_seen_yet_is_waited_for(loopback: str) -> None:
    sample = socket_sample((loopback, 5000), (loopback, 8080), Role.CLIENT, pid=42)
    assert enricher().attributes(sample, NoPeers(), final=False) is None
    attributes = enricher().attributes(sample, NoPeers(), final=True)
    assert attributes is not None
    assert (attributes.source.workload, attributes.destination.workload) == ("curl", loopback)


def test_peer_without_an_owner_is_waited_for_then_named_by_address() -> None:
    client = socket_sample(("127.0.0.1", 5000), ("127.0.0.1", 8080), Role.CLIENT, pid=42)
    server = socket_sample(("127.0.0.1", 8080), ("127.0.0.1", 5000), Role.SERVER, pid=0,
                           socket_id=2)
    peers = PeersOf({1: server})
    assert enricher().attributes(client, peers, final=False) is None
    attributes = enricher().attributes(client, peers, final=True)
    assert attributes is not None and attributes.destination.workload == "127.0.0.1"


def test_ipv6_service_address_is_bracketed() -> None:
    sample = socket_sample(("2001:db8::1", 40001), ("2001:db8::2", 443), Role.CLIENT, pid=42)
    attributes = enricher().attributes(sample, NoPeers(), final=False)
    assert attributes is not None
    assert attributes.service.host == "[2001:db8::2]:443"
    assert attributes.destination == PeerIdentity(workload="2001:db8::2", ip="2001:db8::2",
                                                  port=443)


def test_local_mode_labels_of_the_builtin_metrics() -> None:
    """README's local-mode table: workloads, destination_service, "tcp", the rest unknown."""
    sample = socket_sample(("198.18.0.1", 40001), ("198.18.0.2", 80), Role.CLIENT, pid=42)
    attributes = enricher().attributes(sample, NoPeers(), final=False)
    assert attributes is not None
    metric = load_catalogue([]).get("istio_tcp_received_bytes_total")
    assert metric is not None
    labels = dict(zip(metric.label_names, metric.evaluate(attributes) or (), strict=True))
    assert {k: v for k, v in labels.items() if v != "unknown"} == {
        "reporter": "source",
        "source_workload": "curl",
        "destination_workload": "198.18.0.2",
        "destination_service": "198.18.0.2:80",
        "request_protocol": "tcp",
        "response_flags": "-",
    }
    assert len(labels) == 23


# -- naming keys (agent.model.NamingKeys) -------------------------------------------------

_ADDRESSES = ("127.0.0.1", "198.18.0.1", "198.18.0.2")
_PORTS = (80, 8080, 40000, 40001)


@st.composite
def _ends(draw: st.DrawFn) -> tuple[SocketSample, PeersOf]:
    """A socket from small pools (so keys collide often), with or without a peer socket."""
    role = draw(st.sampled_from((Role.CLIENT, Role.SERVER)))
    local = (draw(st.sampled_from(_ADDRESSES)), draw(st.sampled_from(_PORTS)))
    remote = (draw(st.sampled_from(_ADDRESSES)), draw(st.sampled_from(_PORTS)))
    pid = draw(st.sampled_from((0, 42, 43, 44)))  # 44: gone, comm decides
    comm = draw(st.sampled_from(("", "worker")))
    sample = socket_sample(local, remote, role, pid=pid, comm=comm)
    peers = PeersOf()
    if draw(st.booleans()):
        peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        peer_pid = draw(st.sampled_from((0, 42, 43)))
        peers.peers[1] = socket_sample(remote, local, peer_role, pid=peer_pid, socket_id=2)
    return sample, peers


@settings(max_examples=400, deadline=None)
@given(_ends(), _ends())
def test_equal_naming_keys_evaluate_alike_under_a_catalogue_that_reads_no_address(
    first: tuple[SocketSample, PeersOf], second: tuple[SocketSample, PeersOf]
) -> None:
    """What accounting relies on to name a finished socket by its key alone: the key is
    None exactly when the enricher would not answer yet, and two sockets with equal keys
    get attributes the built-in metrics evaluate alike (they read no ip or port)."""
    names = enricher()
    catalogue = load_catalogue([])
    assert catalogue.reads_addresses is False
    keys, evaluated = [], []
    for sample, peers in (first, second):
        key = names.naming_key(sample, peers)
        attributes = names.attributes(sample, peers, final=False)
        assert (key is None) == (attributes is None)
        keys.append(key)
        evaluated.append(
            None
            if attributes is None
            else tuple(d.evaluate(attributes) for d in catalogue.definitions())
        )
    if keys[0] is not None and keys[0] == keys[1]:
        assert evaluated[0] == evaluated[1]


def test_a_naming_key_leaves_out_the_ephemeral_port_only() -> None:
    """curl -> nginx on this host from two client ports: one key; the server's port is
    part of it (it makes the service)."""
    names = enricher()
    keys = set()
    for port in (40000, 40001):
        client = socket_sample(("127.0.0.1", port), ("127.0.0.1", 8080), Role.CLIENT, pid=42)
        server = socket_sample(("127.0.0.1", 8080), ("127.0.0.1", port), Role.SERVER, pid=43)
        keys.add(names.naming_key(client, PeersOf({1: server})))
    assert keys == {(Role.CLIENT, "curl", "nginx", "127.0.0.1", 8080)}
    other = socket_sample(("127.0.0.1", 40000), ("127.0.0.1", 9090), Role.CLIENT, pid=42)
    assert names.naming_key(other, NoPeers()) is None  # loopback peer not seen yet

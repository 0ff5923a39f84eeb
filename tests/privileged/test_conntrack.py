"""Resolvers against real kernel state: conntrack NAT lookups behind kube-proxy-style DNAT
(network namespaces, nftables), and network namespace / cgroup -> pod on real processes.

Three "pods" on the node's bridge: a client and two backends of a ClusterIP that the node
DNATs in turn (first connection -> backend 0, second -> backend 1). The backends report which
client address each accepted connection came from; the resolver must name exactly that
backend for each client tuple, and the ClusterIP for each server tuple.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from agent.model import Endpoint
from agent.resolve import ConntrackResolver
from tests.privileged.conftest import _unavailable
from tests.support.netlab import NetLab, read_line, require_tools

SERVER = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
listener = socket.socket(family, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen()
print("listening", flush=True)
kept = []
for _ in range(int(sys.argv[3])):
    connection, peer = listener.accept()
    kept.append(connection)
    print(peer[0], peer[1], flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
kept = []
for _ in range(int(sys.argv[3])):
    connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    connection.sendall(b"x")
    kept.append(connection)
    local = connection.getsockname()
    print(local[0], local[1], flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module", autouse=True)
def privileges() -> None:
    if os.geteuid() != 0:
        _unavailable("conntrack tests need root (network namespaces, nftables)")
    missing = require_tools()
    if missing:
        _unavailable(f"missing tools {missing}: run sudo make setup (iproute2, nftables)")


@pytest.fixture(params=["ipv4", "ipv6"])
def family(request) -> str:
    return request.param


@pytest.fixture
def lab(family: str) -> Iterator[NetLab]:
    with NetLab(pods=3, ipv6=family == "ipv6") as built:
        yield built


def read(process, lab: NetLab) -> str:
    return read_line(process, context=lab.diagnostics)


def address_of(pod, family: str) -> str:
    return pod.ipv4 if family == "ipv4" else pod.ipv6


def test_cluster_ip_backends_and_original_destinations(lab: NetLab, family: str) -> None:
    client, backend0, backend1 = lab.pods
    cluster_ip = "198.19.7.10" if family == "ipv4" else "2001:db8:ffff::10"
    lab.add_cluster_ip(cluster_ip, 80, [(backend0, 8080), (backend1, 8080)])
    servers = []
    for backend in (backend0, backend1):
        server = backend.spawn(
            [sys.executable, "-c", SERVER, address_of(backend, family), "8080", "1"]
        )
        assert read(server, lab) == "listening"
        servers.append(server)
    connector = client.spawn([sys.executable, "-c", CLIENT, cluster_ip, "80", "2"])
    client_ports = [int(read(connector, lab).split()[1]) for _ in range(2)]
    accepted = [read(server, lab).split() for server in servers]

    # Each backend saw the client's own address (no source NAT), one connection each.
    client_address = address_of(client, family)
    assert sorted(int(port) for _, port in accepted) == sorted(client_ports)
    assert {address for address, _ in accepted} == {client_address}

    nat = ConntrackResolver()
    try:
        for backend, (_, port) in zip((backend0, backend1), accepted, strict=True):
            seen_client = Endpoint(client_address, int(port))
            backend_endpoint = Endpoint(address_of(backend, family), 8080)
            assert nat.translated_destination(seen_client, Endpoint(cluster_ip, 80)) == (
                backend_endpoint
            )
            assert nat.original_tuple(seen_client, backend_endpoint) == (
                seen_client,
                Endpoint(cluster_ip, 80),
            )
        # round robin: the first connection went to backend 0
        assert int(accepted[0][1]) == client_ports[0]
        unused_port = max(client_ports) + 1
        assert (
            nat.translated_destination(
                Endpoint(client_address, unused_port), Endpoint(cluster_ip, 80)
            )
            is None
        )
        assert nat.errors == 0
    finally:
        nat.close()


def test_direct_connection_is_tracked_without_translation(lab: NetLab, family: str) -> None:
    client, server_pod, _ = lab.pods
    server = server_pod.spawn(
        [sys.executable, "-c", SERVER, address_of(server_pod, family), "9000", "1"]
    )
    assert read(server, lab) == "listening"
    connector = client.spawn(
        [sys.executable, "-c", CLIENT, address_of(server_pod, family), "9000", "1"]
    )
    port = int(read(connector, lab).split()[1])
    read(server, lab)
    source = Endpoint(address_of(client, family), port)
    destination = Endpoint(address_of(server_pod, family), 9000)
    nat = ConntrackResolver()
    try:
        assert nat.translated_destination(source, destination) == destination
        assert nat.original_tuple(source, destination) == (source, destination)
    finally:
        nat.close()


# -- namespace and cgroup -> pod, on real processes ---------------------------------------------

POD_UID = "5f0c7a4e-1b2d-4c3e-8f9a-0123456789ab"
CONTAINER_ID = "c0ffee" + "0" * 58
SLEEPER = "import sys; print('ready', flush=True); sys.stdin.read()"


def test_pod_found_by_namespace_and_by_cgroup(lab: NetLab, family: str) -> None:
    from agent.resolve import CgroupResolver, ContainerRef, NetnsResolver

    pod, _, _ = lab.pods
    in_pod = pod.spawn([sys.executable, "-c", SLEEPER])
    on_node = lab.spawn_on_node([sys.executable, "-c", SLEEPER])  # a host-network "pod"
    cgroup = lab.pod_cgroup(POD_UID, CONTAINER_ID)
    cgroup.add(in_pod.pid)
    assert read(in_pod, lab) == "ready"
    assert read(on_node, lab) == "ready"
    cgroups = CgroupResolver("/proc", cache_seconds=0.0)  # the test moves a process
    assert cgroups.container_of(in_pod.pid) == ContainerRef(POD_UID, CONTAINER_ID)
    assert cgroups.container_of(on_node.pid) is None
    netns = NetnsResolver("/proc", cgroups=cgroups, rescan_interval=0.0)
    assert netns.pod_uid_of_netns(pod.netns_inode) == POD_UID
    node = os.stat("/proc/self/ns/net").st_ino
    assert netns.host_netns() == node
    assert netns.pod_uid_of_netns(node) is None
    cgroup.add(on_node.pid)
    assert cgroups.pod_uid_of_pid(on_node.pid) == POD_UID  # found by cgroup on the node
    assert netns.pod_uid_of_netns(node) is None  # the node's namespace is never a pod's

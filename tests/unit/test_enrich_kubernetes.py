"""KubernetesEnricher with fake directories, resolvers and NAT tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.enrich.kubernetes import KubernetesEnricher
from agent.model import (
    NO_SERVICE,
    ConnectionAttributes,
    Endpoint,
    PeerIdentity,
    Reporter,
    Role,
    ServiceIdentity,
    SocketFlag,
    SocketSample,
)

HOST_NS, WEB_NS, DB_NS = 4026531840, 4026532001, 4026532002


def peer(name: str, workload: str, ip: str, namespace: str = "shop") -> PeerIdentity:
    return PeerIdentity(
        workload=workload,
        namespace=namespace,
        principal=f"spiffe://cluster.local/ns/{namespace}/sa/default",
        app=workload,
        cluster="Kubernetes",
        uid=f"kubernetes://{name}.{namespace}",
        pod_name=name,
        ip=ip,
    )


WEB = peer("web-1", "web", "198.18.0.2")
DB0 = peer("db-0", "db", "198.18.0.3")
DB1 = peer("db-1", "db", "198.18.0.4")
AGENT = peer("agent-x", "agent", "198.18.0.1", namespace="kube-system")  # hostNetwork
DB_SERVICE = ServiceIdentity("db.shop.svc.cluster.local", "db", "shop")


@dataclass
class FakeDirectory:
    is_synced: bool = True
    by_uid: dict[str, PeerIdentity] = field(default_factory=dict)
    by_ip: dict[str, PeerIdentity] = field(default_factory=dict)
    cluster_ips: dict[tuple[str, int], ServiceIdentity] = field(default_factory=dict)
    endpoints: dict[tuple[str, int], ServiceIdentity] = field(default_factory=dict)
    pod_network: str = "198.18."
    ip_queries: list[tuple[str, float | None]] = field(default_factory=list)

    def synced(self) -> bool:
        return self.is_synced

    def pod_by_ip(self, address: str, at: float | None = None) -> PeerIdentity | None:
        self.ip_queries.append((address, at))
        return self.by_ip.get(address)

    def pod_by_uid(self, uid: str) -> PeerIdentity | None:
        return self.by_uid.get(uid)

    def service_by_cluster_ip(self, address: str, port: int | None = None):
        return self.cluster_ips.get((address, port))

    def service_by_endpoint(self, address: str, port: int):
        return self.endpoints.get((address, port))

    def may_be_pod_ip(self, address: str) -> bool:
        return address.startswith(self.pod_network) and address != "198.18.0.1"


class FakeNat:
    def __init__(self, entries=()) -> None:
        # (orig src, orig dst, reply src, reply dst)
        self.entries = [tuple(Endpoint(*e) for e in entry) for entry in entries]

    def translated_destination(self, source, destination):
        for osrc, odst, rsrc, _ in self.entries:
            if (osrc, odst) == (source, destination):
                return rsrc
        return None

    def original_tuple(self, client, server):
        for osrc, odst, rsrc, rdst in self.entries:
            if (rsrc, rdst) == (server, client):
                return osrc, odst
        return None


class Peers:
    def __init__(self, *samples: SocketSample) -> None:
        self.samples = samples

    def peer_of(self, sample: SocketSample) -> SocketSample | None:
        for other in self.samples:
            if (other.local, other.remote) == (sample.remote, sample.local):
                return other
        return None


NO_PEERS = Peers()


def sample(
    local: tuple[str, int],
    remote: tuple[str, int],
    role: Role,
    *,
    netns: int = 0,
    pid: int = 0,
    socket_id: int = 1,
) -> SocketSample:
    return SocketSample(
        socket_id=socket_id,
        sent_bytes=10,
        received_bytes=20,
        local=Endpoint(*local),
        remote=Endpoint(*remote),
        role=role,
        flags=SocketFlag.OPENED,
        netns=netns,
        pid=pid,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(directory: FakeDirectory | None = None, nat: FakeNat | None = None, clock=None):
    directory = directory or FakeDirectory(
        by_uid={"uid-web": WEB, "uid-db0": DB0, "uid-db1": DB1, "uid-agent": AGENT},
        by_ip={"198.18.0.2": WEB, "198.18.0.3": DB0, "198.18.0.4": DB1},
        cluster_ips={("198.19.0.10", 27017): DB_SERVICE},
        endpoints={("198.18.0.3", 27017): DB_SERVICE, ("198.18.0.4", 27017): DB_SERVICE},
    )
    netns = {WEB_NS: "uid-web", DB_NS: "uid-db0"}
    cgroups = {100: "uid-web", 200: "uid-db0", 300: "uid-agent"}

    class Netns:
        def pod_uid_of_netns(self, inode):
            return netns.get(inode)

    class Cgroups:
        def pod_uid_of_pid(self, pid):
            return cgroups.get(pid)

    enricher = KubernetesEnricher(
        directory,
        netns=Netns(),
        processes=Cgroups(),
        nat=nat or FakeNat(),
        clock=clock or Clock(),
    )
    return enricher, directory


def at(identity: PeerIdentity, address: str, port: int) -> PeerIdentity:
    from dataclasses import replace

    return replace(identity, ip=address, port=port)


def test_pod_to_pod_direct_from_both_ends() -> None:
    enricher, _ = make()
    client = sample(("198.18.0.2", 40000), ("198.18.0.3", 27017), Role.CLIENT, netns=WEB_NS)
    server = sample(
        ("198.18.0.3", 27017), ("198.18.0.2", 40000), Role.SERVER, netns=DB_NS, socket_id=2
    )
    peers = Peers(client, server)
    expected_source = at(WEB, "198.18.0.2", 40000)
    expected_destination = at(DB0, "198.18.0.3", 27017)
    assert enricher.attributes(client, peers, final=False) == ConnectionAttributes(
        Reporter.SOURCE, expected_source, expected_destination, DB_SERVICE
    )
    assert enricher.attributes(server, peers, final=False) == ConnectionAttributes(
        Reporter.DESTINATION, expected_source, expected_destination, DB_SERVICE
    )


def test_cluster_ip_backend_comes_from_conntrack() -> None:
    nat = FakeNat(
        [
            (("198.18.0.2", 40000), ("198.19.0.10", 27017), ("198.18.0.4", 27017),
             ("198.18.0.2", 40000)),
        ]
    )
    enricher, _ = make(nat=nat)
    client = sample(("198.18.0.2", 40000), ("198.19.0.10", 27017), Role.CLIENT, netns=WEB_NS)
    attributes = enricher.attributes(client, NO_PEERS, final=False)
    assert attributes == ConnectionAttributes(
        Reporter.SOURCE, at(WEB, "198.18.0.2", 40000), at(DB1, "198.18.0.4", 27017), DB_SERVICE
    )
    server = sample(("198.18.0.4", 27017), ("198.18.0.2", 40000), Role.SERVER, netns=DB_NS)
    # netns DB_NS says db-0 in this fake; the server view takes the local pod from it
    assert enricher.attributes(server, NO_PEERS, final=False).service == DB_SERVICE


def test_cluster_ip_without_conntrack_entry_keeps_the_service() -> None:
    enricher, _ = make()
    client = sample(("198.18.0.2", 40000), ("198.19.0.10", 27017), Role.CLIENT, netns=WEB_NS)
    attributes = enricher.attributes(client, NO_PEERS, final=False)
    assert attributes.destination == PeerIdentity(ip="198.19.0.10", port=27017)
    assert attributes.destination.workload == "unknown"
    assert attributes.service == DB_SERVICE


def test_server_behind_masquerade_gets_the_real_client_and_service() -> None:
    nat = FakeNat(
        [
            (("198.18.0.2", 40000), ("198.19.0.10", 27017), ("198.18.0.3", 27017),
             ("198.18.0.1", 61000)),
        ]
    )
    enricher, _ = make(nat=nat)
    server = sample(("198.18.0.3", 27017), ("198.18.0.1", 61000), Role.SERVER, netns=DB_NS)
    assert enricher.attributes(server, NO_PEERS, final=False) == ConnectionAttributes(
        Reporter.DESTINATION, at(WEB, "198.18.0.2", 40000), at(DB0, "198.18.0.3", 27017),
        DB_SERVICE,
    )


def test_pod_local_loopback_is_the_pod_itself() -> None:
    enricher, _ = make()
    client = sample(("127.0.0.1", 50000), ("127.0.0.1", 27017), Role.CLIENT, netns=DB_NS)
    server = sample(
        ("127.0.0.1", 27017), ("127.0.0.1", 50000), Role.SERVER, netns=DB_NS, socket_id=2
    )
    for socket in (client, server):
        attributes = enricher.attributes(socket, NO_PEERS, final=False)
        assert attributes.source == at(DB0, "127.0.0.1", 50000)
        assert attributes.destination == at(DB0, "127.0.0.1", 27017)
        assert attributes.service == DB_SERVICE  # db-0's own address is a db endpoint


def test_host_network_pods_are_found_by_cgroup_and_peer_socket() -> None:
    enricher, _ = make()
    client = sample(
        ("198.18.0.1", 45000), ("198.18.0.3", 27017), Role.CLIENT, netns=HOST_NS, pid=300
    )
    server = sample(
        ("198.18.0.3", 27017), ("198.18.0.1", 45000), Role.SERVER, netns=DB_NS, socket_id=2
    )
    peers = Peers(client, server)
    for socket in (client, server):
        attributes = enricher.attributes(socket, peers, final=False)
        assert attributes.source == at(AGENT, "198.18.0.1", 45000)
        assert attributes.destination == at(DB0, "198.18.0.3", 27017)


def test_not_synced_waits_unless_final() -> None:
    enricher, directory = make()
    directory.is_synced = False
    client = sample(("198.18.0.2", 40000), ("198.18.0.3", 27017), Role.CLIENT, netns=WEB_NS)
    assert enricher.attributes(client, NO_PEERS, final=False) is None
    assert enricher.attributes(client, NO_PEERS, final=True).destination.workload == "db"


def test_pod_not_in_cache_yet_waits_unless_final() -> None:
    enricher, directory = make()
    del directory.by_uid["uid-web"]
    del directory.by_ip["198.18.0.2"]
    client = sample(("198.18.0.2", 40000), ("198.18.0.3", 27017), Role.CLIENT, netns=WEB_NS)
    assert enricher.attributes(client, NO_PEERS, final=False) is None
    final = enricher.attributes(client, NO_PEERS, final=True)
    assert final.source == PeerIdentity(ip="198.18.0.2", port=40000)
    assert final.destination.workload == "db"


def test_unknown_address_in_the_pod_network_waits_but_external_does_not() -> None:
    enricher, _ = make()
    to_new_pod = sample(("198.18.0.2", 40000), ("198.18.0.9", 80), Role.CLIENT, netns=WEB_NS)
    assert enricher.attributes(to_new_pod, NO_PEERS, final=False) is None
    external = sample(("198.18.0.2", 40001), ("203.0.113.7", 443), Role.CLIENT, netns=WEB_NS)
    attributes = enricher.attributes(external, NO_PEERS, final=False)
    assert attributes == ConnectionAttributes(
        Reporter.SOURCE,
        at(WEB, "198.18.0.2", 40001),
        PeerIdentity(ip="203.0.113.7", port=443),
        ServiceIdentity(),
    )


def test_ip_lookups_use_the_time_the_socket_was_first_seen() -> None:
    clock = Clock()
    enricher, directory = make(clock=clock)
    del directory.by_ip["198.18.0.3"]
    client = sample(("198.18.0.2", 40000), ("198.18.0.3", 27017), Role.CLIENT, netns=WEB_NS)
    assert enricher.attributes(client, NO_PEERS, final=False) is None
    clock.now = 1005.0
    directory.by_ip["198.18.0.3"] = DB0
    assert enricher.attributes(client, NO_PEERS, final=False).destination.workload == "db"
    assert [query for query in directory.ip_queries if query[0] == "198.18.0.3"] == [
        ("198.18.0.3", 1000.0),
        ("198.18.0.3", 1000.0),
    ]
    assert enricher._first_seen == {}  # forgotten once answered


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_ipv6_and_mapped_addresses(role: Role) -> None:
    web6 = peer("web-1", "web", "2001:db8::2")
    db6 = peer("db-0", "db", "2001:db8::3")
    directory = FakeDirectory(
        by_uid={"uid-web": web6},
        by_ip={"2001:db8::3": db6, "2001:db8::2": web6},
        pod_network="2001:db8:",
    )
    enricher, _ = make(directory)
    local, remote = ("2001:db8::2", 40000), ("2001:db8::3", 27017)
    if role is Role.SERVER:
        local, remote = remote, local
    socket = sample(local, remote, role, netns=WEB_NS if role is Role.CLIENT else 0)
    attributes = enricher.attributes(socket, NO_PEERS, final=False)
    assert (attributes.source.workload, attributes.destination.workload) == ("web", "db")
    assert attributes.reporter is (Reporter.SOURCE if role is Role.CLIENT else Reporter.DESTINATION)


def test_with_the_real_cache() -> None:
    """KubernetesCache satisfies the enricher's PodDirectory (as the pipeline wires them)."""
    from agent.k8s import KubernetesCache
    from agent.k8s.records import decode_endpoint_slice, decode_owned, decode_pod, decode_service
    from tests.support.k8s_api_server import endpoint_slice, pod, replica_set, service

    cache = KubernetesCache(clock=lambda: 2_000_000_000.0)
    web = decode_pod(pod("web-7f-x", "shop", "198.18.0.2", owner=("ReplicaSet", "web-7f"),
                         uid="uid-web", labels={"app": "web"}))
    db = decode_pod(pod("db-0", "shop", "198.18.0.3", owner=("StatefulSet", "db"), uid="uid-db"))
    for kind, record in (
        ("replicasets", decode_owned(replica_set("web-7f", "shop", "web"))),
        ("pods", web),
        ("pods", db),
        ("services", decode_service(service("db", "shop", "198.19.0.10", [27017]))),
        ("endpointslices", decode_endpoint_slice(
            endpoint_slice("db-a", "shop", "db", ["198.18.0.3"], [27017]))),
    ):
        cache.upsert(kind, record)
    nat = FakeNat([(("198.18.0.2", 40000), ("198.19.0.10", 27017), ("198.18.0.3", 27017),
                    ("198.18.0.2", 40000))])

    class Netns:
        def pod_uid_of_netns(self, inode):
            return {WEB_NS: "uid-web"}.get(inode)

    enricher = KubernetesEnricher(cache, netns=Netns(), nat=nat, clock=lambda: 2_000_000_000.0)
    client = sample(("198.18.0.2", 40000), ("198.19.0.10", 27017), Role.CLIENT, netns=WEB_NS)
    attributes = enricher.attributes(client, NO_PEERS, final=True)
    assert (attributes.source.workload, attributes.source.app) == ("web", "web")
    assert (attributes.destination.workload, attributes.destination.pod_name) == ("db", "db-0")
    assert attributes.service == DB_SERVICE
    assert (attributes.destination.ip, attributes.destination.port) == ("198.18.0.3", 27017)


def test_loopback_server_sockets_skip_the_conntrack_lookup() -> None:
    """Nothing is DNAT-ed to loopback; busy nodes have many such sockets (sidecars, local
    proxies), and each conntrack lookup costs milliseconds."""
    asked: list[tuple[Endpoint, Endpoint]] = []

    class CountingNat(FakeNat):
        def original_tuple(self, client, server):
            asked.append((client, server))
            return super().original_tuple(client, server)

    enricher, _ = make(nat=CountingNat())
    loopback = sample(("127.0.0.1", 27017), ("127.0.0.1", 50000), Role.SERVER, netns=DB_NS)
    attributes = enricher.attributes(loopback, NO_PEERS, final=False)
    assert attributes.destination == at(DB0, "127.0.0.1", 27017)
    assert asked == []
    pod_address = sample(
        ("198.18.0.3", 27017), ("198.18.0.2", 50000), Role.SERVER, netns=DB_NS, socket_id=2
    )
    enricher.attributes(pod_address, NO_PEERS, final=False)
    assert asked == [(Endpoint("198.18.0.2", 50000), Endpoint("198.18.0.3", 27017))]


# -- naming keys (agent.model.NamingKeys) ----------------------------------------------------


def test_connections_between_the_same_pods_share_a_naming_key() -> None:
    """Two connections from web-1 to db-0 differ in the client's port only: one key, and
    attributes that differ in that port alone. To db-1 (another pod, same Service) is
    another key."""
    enricher, _ = make()
    first = sample(("198.18.0.2", 40000), ("198.18.0.3", 27017), Role.CLIENT, netns=WEB_NS)
    second = sample(
        ("198.18.0.2", 40002), ("198.18.0.3", 27017), Role.CLIENT, netns=WEB_NS, socket_id=2
    )
    other_pod = sample(
        ("198.18.0.2", 40004), ("198.18.0.4", 27017), Role.CLIENT, netns=WEB_NS, socket_id=3
    )
    key = enricher.naming_key(first, NO_PEERS)
    assert key == (Role.CLIENT, WEB, DB0, DB_SERVICE)
    assert enricher.naming_key(second, NO_PEERS) == key
    assert enricher.naming_key(other_pod, NO_PEERS) == (Role.CLIENT, WEB, DB1, DB_SERVICE)
    server = sample(("198.18.0.3", 27017), ("198.18.0.2", 40000), Role.SERVER, netns=DB_NS)
    assert enricher.naming_key(server, NO_PEERS) == (Role.SERVER, WEB, DB0, DB_SERVICE)
    external = sample(("198.18.0.2", 40006), ("203.0.113.9", 443), Role.CLIENT, netns=WEB_NS)
    assert enricher.naming_key(external, NO_PEERS) == (Role.CLIENT, WEB, None, NO_SERVICE)


def test_no_naming_key_while_attributes_would_wait() -> None:
    enricher, directory = make()
    pending = sample(("198.18.0.2", 40000), ("198.18.0.77", 80), Role.CLIENT, netns=WEB_NS)
    assert enricher.attributes(pending, NO_PEERS, final=False) is None
    assert enricher.naming_key(pending, NO_PEERS) is None
    directory.is_synced = False
    known = sample(("198.18.0.2", 40000), ("198.18.0.3", 27017), Role.CLIENT, netns=WEB_NS)
    assert enricher.naming_key(known, NO_PEERS) is None


def test_a_keyed_socket_is_named_at_the_time_it_was_first_seen() -> None:
    """naming_key forgets the socket's first-seen time (nothing is kept per finished
    socket), and an attributes() call for it right after still looks its addresses up at
    that time - the pod the key was made from."""
    clock = Clock()
    enricher, directory = make(clock=clock)
    live = sample(("198.18.0.2", 40000), ("198.18.0.77", 27017), Role.CLIENT, netns=WEB_NS)
    assert enricher.attributes(live, NO_PEERS, final=False) is None  # not in the cache yet
    directory.by_ip["198.18.0.77"] = DB1
    clock.now += 60
    directory.ip_queries.clear()
    key = enricher.naming_key(live, NO_PEERS)
    enricher.attributes(live, NO_PEERS, final=True)
    assert key == (Role.CLIENT, WEB, DB1, DB_SERVICE)
    assert directory.ip_queries == [("198.18.0.77", 1000.0)] * 2
    assert not enricher._first_seen


def _hidden_keys(enricher: KubernetesEnricher):
    """The same enricher without ``naming_key``: accounting names every socket."""

    class Plain:
        def attributes(self, sample, peers, *, final):
            return enricher.attributes(sample, peers, final=final)

    return Plain()


ENDS = (
    # (local, remote, role, netns): pod to pod, through a ClusterIP (NAT), external, loopback,
    # host network, an unknown address in the pod network
    (("198.18.0.2", 0), ("198.18.0.3", 27017), Role.CLIENT, WEB_NS),
    (("198.18.0.2", 0), ("198.18.0.4", 27017), Role.CLIENT, WEB_NS),
    (("198.18.0.3", 27017), ("198.18.0.2", 0), Role.SERVER, DB_NS),
    (("198.18.0.2", 0), ("198.19.0.10", 27017), Role.CLIENT, WEB_NS),
    (("198.18.0.4", 27017), ("198.18.0.2", 0), Role.SERVER, 0),
    (("198.18.0.2", 0), ("203.0.113.9", 443), Role.CLIENT, WEB_NS),
    (("127.0.0.1", 0), ("127.0.0.1", 8080), Role.CLIENT, WEB_NS),
    (("127.0.0.1", 8080), ("127.0.0.1", 0), Role.SERVER, WEB_NS),
    (("198.18.0.1", 0), ("198.18.0.3", 27017), Role.CLIENT, 0),
    (("198.18.0.2", 0), ("198.18.0.99", 80), Role.CLIENT, WEB_NS),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(ENDS) - 1),
            st.integers(1024, 1030),  # the ephemeral port
            st.integers(0, 500),
            st.integers(0, 500),
            st.booleans(),  # live in an earlier poll
            st.booleans(),  # the pod cache synced
        ),
        max_size=20,
    )
)
def test_naming_by_key_counts_what_naming_every_socket_counts(connections) -> None:
    """Kubernetes mode: an accountant that names finished sockets by their keys ends with
    the same families as one that names each socket, over pods, Services (with and without
    NAT), external and loopback ends, host-network pods and addresses not known yet."""
    from agent.accounting import Accountant
    from agent.metrics.catalogue import load_catalogue
    from agent.model import KernelCounters, KernelPoll

    nat = FakeNat(
        [
            [("198.18.0.2", p), ("198.19.0.10", 27017), ("198.18.0.4", 27017), ("198.18.0.2", p)]
            for p in range(1024, 1028)
        ]
    )
    keyed, directory = make(nat=nat)
    plain, plain_directory = make(nat=nat)
    accountants = [
        Accountant(load_catalogue([]), keyed),
        Accountant(load_catalogue([]), _hidden_keys(plain)),
    ]
    final = SocketFlag.OPENED | SocketFlag.CLOSED | SocketFlag.DESTROYED
    sequence = 0
    for number, (end, port, sent, received, live_first, synced) in enumerate(connections):
        local, remote, role, netns = ENDS[end]
        local = (local[0], local[1] or port)
        remote = (remote[0], remote[1] or port)
        one = dataclasses.replace(
            sample(local, remote, role, netns=netns, socket_id=number + 1),
            sent_bytes=sent,
            received_bytes=received,
            pid=100 if netns == 0 and role is Role.CLIENT else 0,
        )
        directory.is_synced = plain_directory.is_synced = synced
        for accountant in accountants:
            polls = [((), (dataclasses.replace(one, flags=final),))]
            if live_first:
                polls.insert(0, ((dataclasses.replace(one, sent_bytes=0),), ()))
            for live, finished in polls:
                sequence += 1
                accountant.apply(
                    KernelPoll(KernelCounters(), live, finished, (), {}, sequence=sequence)
                )
    snapshots = [
        [(f.name, f.label_names, dict(f.samples)) for f in a.families()] for a in accountants
    ]
    assert snapshots[0] == snapshots[1]

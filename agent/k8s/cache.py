"""The Kubernetes metadata cache: records kept in step by watchers, answering lookups.

Lookups are dictionary reads under one lock, cheap enough to run for every socket on every
poll. A pod's IP is remembered with the interval it held it, and a deleted pod stays for
``retention_seconds``, so a connection made to a pod whose IP was later reused still resolves
to the pod that held the IP at the time (as far as the watch events tell).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.k8s.identity import IdentityRules, workload_name
from agent.k8s.records import (
    EndpointSliceRecord,
    OwnedRecord,
    PodRecord,
    Record,
    ServiceRecord,
    decode_endpoint_slice,
    decode_owned,
    decode_pod,
    decode_service,
    parse_address,
)
from agent.k8s.watching import Backoff, ResourceKind, ResourceWatcher
from agent.memo import BoundedMemo
from agent.model import PeerIdentity, ServiceIdentity

PODS, SERVICES, ENDPOINT_SLICES, REPLICA_SETS, JOBS = (
    "pods",
    "services",
    "endpointslices",
    "replicasets",
    "jobs",
)
KINDS = (PODS, SERVICES, ENDPOINT_SLICES, REPLICA_SETS, JOBS)
OWNED_KIND = {REPLICA_SETS: "ReplicaSet", JOBS: "Job"}
DEFAULT_RULES = IdentityRules()
DEFAULT_BACKOFF = Backoff()


@dataclass(slots=True)
class IpHolding:
    """A pod held an address from ``start`` until ``end`` (``None``: still holds it)."""

    uid: str
    start: float
    end: float | None = None

    def covers(self, at: float) -> bool:
        return self.start <= at and (self.end is None or at <= self.end)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Self-metrics: objects per kind, watch activity and API errors per kind, misses.

    ``relists``: full lists after the first one (after 410 Gone), per kind.
    """

    synced: bool
    objects: dict[str, int]
    watch_restarts: dict[str, int] = field(default_factory=dict)
    relists: dict[str, int] = field(default_factory=dict)
    api_errors: dict[str, int] = field(default_factory=dict)
    lookup_misses: dict[str, int] = field(default_factory=dict)
    deleted_pods_retained: int = 0


def resource_kinds(api: Any) -> list[ResourceKind]:
    """The watched kinds, bound to ``api`` (a ``kubernetes.client.ApiClient``)."""
    from kubernetes import client

    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    batch, discovery = client.BatchV1Api(api), client.DiscoveryV1Api(api)
    return [
        ResourceKind(PODS, core.list_pod_for_all_namespaces, decode_pod),
        ResourceKind(SERVICES, core.list_service_for_all_namespaces, decode_service),
        ResourceKind(
            ENDPOINT_SLICES,
            discovery.list_endpoint_slice_for_all_namespaces,
            decode_endpoint_slice,
        ),
        ResourceKind(REPLICA_SETS, apps.list_replica_set_for_all_namespaces, decode_owned),
        ResourceKind(JOBS, batch.list_job_for_all_namespaces, decode_owned),
    ]


class KubernetesCache:
    """Pods, Services, EndpointSlices, ReplicaSets and Jobs of the whole cluster.

    Built with an ``api_client`` it runs one watcher thread per kind after :meth:`start`;
    built without, it is fed through :meth:`replace`/:meth:`upsert`/:meth:`remove` (tests).
    """

    def __init__(
        self,
        api_client: Any = None,
        *,
        rules: IdentityRules = DEFAULT_RULES,
        retention_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
        backoff: Backoff = DEFAULT_BACKOFF,
        watch_timeout_seconds: int = 300,
        page_size: int = 500,
        kinds: Iterable[ResourceKind] | None = None,
    ) -> None:
        self.rules = rules
        self.retention_seconds = retention_seconds
        self._clock = clock
        self._lock = threading.RLock()
        self._pods: dict[str, PodRecord] = {}
        self._uid_aliases: dict[str, str] = {}  # static pod config hash -> mirror pod UID
        self._pod_networks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
        self._host_addresses: set[str] = set()  # host-network pods' (the nodes') addresses
        self._deleted_pods: dict[str, tuple[PodRecord, float]] = {}
        self._holdings: dict[str, list[IpHolding]] = {}
        self._services: dict[tuple[str, str], ServiceRecord] = {}
        self._service_by_ip: dict[str, tuple[str, str]] = {}
        self._slices: dict[tuple[str, str], EndpointSliceRecord] = {}
        self._endpoints: dict[tuple[str, int], Counter[tuple[str, str]]] = {}
        self._owned: dict[tuple[str, str, str], OwnedRecord] = {}
        self._misses: Counter[str] = Counter()
        self._folded: BoundedMemo[str, str] = BoundedMemo(65536)
        self._identities: BoundedMemo[tuple[int, str, str], tuple[PodRecord, PeerIdentity]] = (
            BoundedMemo(65536)
        )
        # pod_by_ip's answers: address -> (generation, since, identity). Every record change
        # bumps the generation, so an answer holds while nothing changed, for any time from
        # ``since`` on (its address had one holder, which still holds it)
        self._generation = 0
        self._answers: BoundedMemo[str, tuple[int, float, PeerIdentity]] = BoundedMemo(65536)
        if kinds is None and api_client is not None:
            kinds = resource_kinds(api_client)
        self._watchers = [
            ResourceWatcher(
                kind,
                self,
                backoff=backoff,
                page_size=page_size,
                watch_timeout_seconds=watch_timeout_seconds,
            )
            for kind in (kinds or ())
        ]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for watcher in self._watchers:
            watcher.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops every watcher and waits at most ``timeout`` seconds in all.

        Watchers wake at once (open streams are shut, backoff waits interrupted); one stuck
        in a request to an unresponsive server is left behind (a daemon thread).
        """
        deadline = time.monotonic() + timeout
        for watcher in self._watchers:
            watcher.stop(0)
        for watcher in self._watchers:
            watcher.join(max(0.0, deadline - time.monotonic()))

    def synced(self) -> bool:
        """Every kind has been listed at least once (lookups reflect the cluster)."""
        return all(watcher.synced.is_set() for watcher in self._watchers)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for watcher in self._watchers:
            if not watcher.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    # -- lookups -----------------------------------------------------------------------------

    def pod_by_ip(self, address: str, at: float | None = None) -> PeerIdentity | None:
        """The pod that held ``address`` at time ``at`` (seconds since the epoch; default: now).

        Host-network pods are not indexed by IP (they share the node's address). When several
        pods held the address at ``at`` (the deletion of the old one not yet seen), the one
        that got it last wins.
        """
        folded = self._fold(address)
        if not folded:
            with self._lock:
                self._misses["pod_by_ip"] += 1
            return None
        with self._lock:
            when = self._clock() if at is None else at
            answer = self._answers.get(folded)
            if answer is not None and answer[0] == self._generation and when >= answer[1]:
                return answer[2]
            pod = self._holder(folded, when)
            if pod is None:
                self._misses["pod_by_ip"] += 1
                return None
            identity = self._peer(pod, folded)
            holdings = self._holdings[folded]
            if len(holdings) == 1 and holdings[0].end is None and holdings[0].start <= when:
                self._answers.keep(folded, (self._generation, holdings[0].start, identity))
            return identity

    def pod_by_uid(self, uid: str) -> PeerIdentity | None:
        """A live or recently deleted pod by its UID (as cgroup paths name it).

        A static pod's cgroups carry its config hash, which its mirror pod in the API holds
        in the ``kubernetes.io/config.mirror`` annotation: that resolves too.
        """
        with self._lock:
            uid = self._uid_aliases.get(uid, uid)
            pod = self._pods.get(uid)
            if pod is None and uid in self._deleted_pods:
                pod = self._deleted_pods[uid][0]
            if pod is None:
                self._misses["pod_by_uid"] += 1
                return None
            return self._peer(pod, "")

    def service_by_cluster_ip(
        self, address: str, port: int | None = None
    ) -> ServiceIdentity | None:
        """The Service whose ClusterIP is ``address`` (and which declares ``port``, if given)."""
        folded = self._fold(address)
        with self._lock:
            key = self._service_by_ip.get(folded) if folded else None
            service = self._services.get(key) if key else None
            if (
                service is not None
                and port is not None
                and service.ports
                and all(declared.port != port for declared in service.ports)
            ):
                service = None
            if service is None:
                self._misses["service_by_cluster_ip"] += 1
                return None
            return self.rules.service(service)

    def service_by_endpoint(self, address: str, port: int) -> ServiceIdentity | None:
        """The Service whose EndpointSlices list ``address:port`` (first by namespace/name)."""
        folded = self._fold(address)
        with self._lock:
            owners = self._endpoints.get((folded, port)) if folded else None
            if not owners:
                self._misses["service_by_endpoint"] += 1
                return None
            namespace, name = min(owners)
        return ServiceIdentity(self.rules.service_host(name, namespace), name, namespace)

    def may_be_pod_ip(self, address: str) -> bool:
        """Whether ``address`` is in a network pods were seen in (a /16 for IPv4, a /64 for
        IPv6) and is no node's: an unknown address there is likely a pod the cache has not
        heard of yet."""
        try:
            ip = ipaddress.ip_address(self._fold(address) or "")
        except ValueError:
            return False
        prefix = 16 if ip.version == 4 else 64
        network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        with self._lock:
            return network in self._pod_networks and str(ip) not in self._host_addresses

    def is_cluster_ip(self, address: str) -> bool:
        folded = self._fold(address)
        with self._lock:
            return folded in self._service_by_ip

    def stats(self) -> CacheStats:
        with self._lock:
            objects = {
                PODS: len(self._pods),
                SERVICES: len(self._services),
                ENDPOINT_SLICES: len(self._slices),
                REPLICA_SETS: sum(1 for key in self._owned if key[0] == "ReplicaSet"),
                JOBS: sum(1 for key in self._owned if key[0] == "Job"),
            }
            misses = dict(self._misses)
            retained = len(self._deleted_pods)
        return CacheStats(
            synced=self.synced(),
            objects=objects,
            watch_restarts={w.kind.name: w.counters.watch_restarts for w in self._watchers},
            relists={w.kind.name: max(0, w.counters.lists - 1) for w in self._watchers},
            api_errors={w.kind.name: w.counters.api_errors for w in self._watchers},
            lookup_misses=misses,
            deleted_pods_retained=retained,
        )

    # -- record sink (called by watchers) ----------------------------------------------------

    def replace(self, kind: str, records: list[Record]) -> None:
        """A full list: objects not in it are gone (deleted while the watch was down)."""
        with self._lock:
            present = {self._key(kind, record) for record in records}
            for key, old in list(self._stored(kind).items()):
                if key not in present:
                    self.remove(kind, old)
            for record in records:
                self.upsert(kind, record)

    def upsert(self, kind: str, record: Record) -> None:
        with self._lock:
            self._generation += 1  # pod_by_ip's remembered answers no longer hold
            now = self._clock()
            if isinstance(record, PodRecord):
                self._upsert_pod(record, now)
            elif isinstance(record, ServiceRecord):
                self._forget_service(self._services.get(self._key(kind, record)))
                self._services[(record.namespace, record.name)] = record
                for address in record.cluster_ips:
                    self._service_by_ip[address] = (record.namespace, record.name)
            elif isinstance(record, EndpointSliceRecord):
                key = (record.namespace, record.name)
                self._forget_slice(self._slices.get(key))
                self._slices[key] = record
                if record.service_name:
                    owner = (record.namespace, record.service_name)
                    for address in record.addresses:
                        for port in record.ports:
                            self._endpoints.setdefault((address, port), Counter())[owner] += 1
            elif isinstance(record, OwnedRecord):
                self._owned[self._key(kind, record)] = record
            self._prune(now)

    def remove(self, kind: str, record: Record) -> None:
        with self._lock:
            self._generation += 1
            now = self._clock()
            key = self._key(kind, record)
            if isinstance(record, PodRecord):
                old = self._pods.pop(record.uid, None)
                if old is not None:
                    self._end_holdings(old.uid, set(old.ips), now)
                    self._deleted_pods[old.uid] = (old, now)
                    if old.config_hash and self._uid_aliases.get(old.config_hash) == old.uid:
                        del self._uid_aliases[old.config_hash]
            elif isinstance(record, ServiceRecord):
                self._forget_service(self._services.pop(key, None))
            elif isinstance(record, EndpointSliceRecord):
                self._forget_slice(self._slices.pop(key, None))
            elif isinstance(record, OwnedRecord):
                self._owned.pop(key, None)
            self._prune(now)

    # -- internals ---------------------------------------------------------------------------

    def _key(self, kind: str, record: Record) -> Any:
        if kind == PODS:
            return record.uid
        if kind in OWNED_KIND:
            return (OWNED_KIND[kind], record.namespace, record.name)
        return (record.namespace, record.name)

    def _stored(self, kind: str) -> dict[Any, Any]:
        if kind == PODS:
            return dict(self._pods)
        if kind == SERVICES:
            return dict(self._services)
        if kind == ENDPOINT_SLICES:
            return dict(self._slices)
        return {key: value for key, value in self._owned.items() if key[0] == OWNED_KIND[kind]}

    def _fold(self, address: str) -> str | None:
        """:func:`parse_address` for lookups, remembered: a node asks about few addresses,
        many times (parsing one costs microseconds)."""
        folded = self._folded.get(address)  # "": not an address
        if folded is None:
            folded = self._folded.keep(address, parse_address(address) or "")
        return folded or None

    def _peer(self, pod: PodRecord, ip: str) -> PeerIdentity:
        """The identity of a pod record at ``ip``, made once per record, workload and
        address (an updated pod is a new record; a new owner, a new workload name)."""
        workload = self._workload(pod)
        key = (id(pod), workload, ip)
        made = self._identities.get(key)
        if made is not None and made[0] is pod:
            return made[1]
        identity = self.rules.peer(pod, workload, ip)
        self._identities.keep(key, (pod, identity))  # keeps `pod` alive: its id stays unique
        return identity

    def _workload(self, pod: PodRecord) -> str:
        return workload_name(pod, lambda kind, ns, name: self._owned.get((kind, ns, name)))

    def _upsert_pod(self, pod: PodRecord, now: float) -> None:
        old = self._pods.get(pod.uid)
        self._pods[pod.uid] = pod
        if pod.config_hash:
            self._uid_aliases[pod.config_hash] = pod.uid
        if pod.host_network:
            self._host_addresses.update(pod.ips)
        self._deleted_pods.pop(pod.uid, None)
        held = set() if pod.terminal or pod.host_network else set(pod.ips)
        before = set() if old is None or old.terminal or old.host_network else set(old.ips)
        self._end_holdings(pod.uid, before - held, now)
        for address in held - before:
            self._pod_networks.add(_network_of(address))
            # First sight of the pod with this address: it has held it since it was created.
            # An address gained later was gained about now.
            start = (pod.created or now) if old is None else now
            self._holdings.setdefault(address, []).append(IpHolding(pod.uid, start))

    def _end_holdings(self, uid: str, addresses: set[str], now: float) -> None:
        for address in addresses:
            for holding in self._holdings.get(address, ()):
                if holding.uid == uid and holding.end is None:
                    holding.end = now

    def _holder(self, address: str, at: float) -> PodRecord | None:
        holdings = self._holdings.get(address)
        if not holdings:
            return None
        covering = [h for h in holdings if h.covers(at)]
        if not covering:  # clocks disagree, or the pod is newer than the connection
            covering = [h for h in holdings if h.end is None]
        if not covering:
            return None
        chosen = max(covering, key=lambda h: h.start)
        pod = self._pods.get(chosen.uid)
        if pod is None and chosen.uid in self._deleted_pods:
            pod = self._deleted_pods[chosen.uid][0]
        return pod

    def _forget_service(self, service: ServiceRecord | None) -> None:
        if service is None:
            return
        for address in service.cluster_ips:
            if self._service_by_ip.get(address) == (service.namespace, service.name):
                del self._service_by_ip[address]

    def _forget_slice(self, endpoint_slice: EndpointSliceRecord | None) -> None:
        if endpoint_slice is None or not endpoint_slice.service_name:
            return
        owner = (endpoint_slice.namespace, endpoint_slice.service_name)
        for address in endpoint_slice.addresses:
            for port in endpoint_slice.ports:
                owners = self._endpoints.get((address, port))
                if owners is None:
                    continue
                owners[owner] -= 1
                if owners[owner] <= 0:
                    del owners[owner]
                if not owners:
                    del self._endpoints[(address, port)]

    def _prune(self, now: float) -> None:
        """Drops deleted pods and ended IP holdings older than the retention."""
        horizon = now - self.retention_seconds
        expired = [uid for uid, (_, gone) in self._deleted_pods.items() if gone < horizon]
        for uid in expired:
            del self._deleted_pods[uid]
        if not expired and len(self._holdings) < 4 * (len(self._pods) + 16):
            return
        for address in list(self._holdings):
            kept = [h for h in self._holdings[address] if h.end is None or h.end >= horizon]
            if kept:
                self._holdings[address] = kept
            else:
                del self._holdings[address]


def _network_of(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``"198.18.3.7"`` -> ``198.18.0.0/16``; ``"2001:db8::7"`` -> ``2001:db8::/64``."""
    ip = ipaddress.ip_address(address)
    return ipaddress.ip_network(f"{ip}/{16 if ip.version == 4 else 64}", strict=False)

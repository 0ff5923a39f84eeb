"""Kubernetes mode: each end of a connection is a pod (workload, app, principal …) and the
destination may be a Service.

How an end is found (design.md, issue 3):

- the local end: the pod owning the socket's network namespace, else the pod of the process
  that moved bytes (its cgroup: how host-network pods are found), else the pod holding the
  local address;
- the remote end: the pod of the peer socket when the other end is on this node too (its
  namespace or cgroup), else the pod at the address (at the time the socket was first seen);
  ``127.0.0.1`` and other loopback addresses are the local pod itself;
- a client connecting to a ClusterIP: ``service`` from the Service, and the backend pod from
  the NAT mapping kube-proxy made (conntrack); without a conntrack entry the destination
  workload is "unknown" and the service still known;
- a server: the original destination from conntrack gives the Service (a ClusterIP) and the
  real client (when source-NAT-ed); else the Service whose endpoints hold the local address.

Example: a client socket ``198.18.0.2:40000 -> 198.19.0.10:80`` in pod ``web-1``, with
Service ``db`` at ClusterIP ``198.19.0.10`` and conntrack saying the backend is
``198.18.0.3:27017`` (pod ``db-0``) -> ``reporter=source``, ``source.workload="web"``,
``destination.workload="db"``, ``service.host="db.shop.svc.cluster.local"``.

This module imports neither ``agent.k8s`` nor ``agent.resolve``: it states what it needs as
Protocols below, which ``KubernetesCache``, ``NetnsResolver``, ``CgroupResolver`` and
``ConntrackResolver`` satisfy.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from agent.model import (
    NO_SERVICE,
    UNKNOWN,
    ConnectionAttributes,
    Endpoint,
    PeerIdentity,
    PeerIndex,
    Role,
    ServiceIdentity,
    SocketSample,
    is_loopback,
)


class PodDirectory(Protocol):
    """Pod and Service lookups (``agent.k8s.KubernetesCache``)."""

    def synced(self) -> bool: ...

    def pod_by_ip(self, address: str, at: float | None = None) -> PeerIdentity | None: ...

    def pod_by_uid(self, uid: str) -> PeerIdentity | None: ...

    def service_by_cluster_ip(
        self, address: str, port: int | None = None
    ) -> ServiceIdentity | None: ...

    def service_by_endpoint(self, address: str, port: int) -> ServiceIdentity | None: ...

    def may_be_pod_ip(self, address: str) -> bool: ...


class NetnsPods(Protocol):
    """Network namespace inode -> pod UID (``agent.resolve.NetnsResolver``)."""

    def pod_uid_of_netns(self, inode: int) -> str | None: ...


class ProcessPods(Protocol):
    """pid -> pod UID from its cgroup (``agent.resolve.CgroupResolver``)."""

    def pod_uid_of_pid(self, pid: int) -> str | None: ...


class NatTable(Protocol):
    """NAT mappings of tracked connections (``agent.resolve.ConntrackResolver``)."""

    def translated_destination(
        self, source: Endpoint, destination: Endpoint
    ) -> Endpoint | None: ...

    def original_tuple(
        self, client: Endpoint, server: Endpoint
    ) -> tuple[Endpoint, Endpoint] | None: ...


@dataclasses.dataclass(slots=True)
class _End:
    """One resolved end: the pod at ``endpoint`` (None: no known pod), and whether waiting
    a poll could name it better. Its identity is made only when attributes are: a socket
    named by its key needs none.

    Not changed once made; not frozen for the constructor's cost (as PeerIdentity): a churn
    makes two or three per socket."""

    endpoint: Endpoint  # the address and port this connection uses at that end
    pod: PeerIdentity | None = None  # the directory's identity of the pod, at its own ip
    pending: bool = False

    def identity(self) -> PeerIdentity:
        """The pod at this connection's address and port; "unknown" in every other field
        when there is no pod: ``_End(Endpoint("198.18.0.2", 40000), WEB).identity()`` ->
        web-1 at 198.18.0.2:40000."""
        endpoint, pod = self.endpoint, self.pod
        if pod is None:
            return PeerIdentity(ip=endpoint.address, port=endpoint.port)
        return pod.at_address(endpoint.address, endpoint.port)


class KubernetesEnricher:
    """Implements :class:`agent.model.Enricher` for Kubernetes mode.

    ``netns``, ``processes`` and ``nat`` are optional (``None``: that source is not used).
    ``clock`` gives the time a socket was first seen, used to pick the pod that held a reused
    IP at that time.
    """

    def __init__(
        self,
        pods: PodDirectory,
        *,
        netns: NetnsPods | None = None,
        processes: ProcessPods | None = None,
        nat: NatTable | None = None,
        clock: Callable[[], float] = time.time,
        max_remembered_sockets: int = 200_000,
    ) -> None:
        self.pods = pods
        self.netns = netns
        self.processes = processes
        self.nat = nat
        self._clock = clock
        self._first_seen: OrderedDict[int, float] = OrderedDict()
        self._max_remembered = max_remembered_sockets
        # (socket id, first seen) of the socket naming_key was last asked for: an
        # attributes() call for the same socket right after resolves it at the same time.
        self._keyed_at: tuple[int, float] = (0, 0.0)

    def attributes(
        self, sample: SocketSample, peers: PeerIndex, *, final: bool
    ) -> ConnectionAttributes | None:
        if not final and not self.pods.synced():
            return None  # the cache is still listing: every lookup would miss for now
        at = self._first_seen_at(sample.socket_id)
        source, destination, service = self._ends(sample, peers, at)
        if not final and (source.pending or destination.pending):
            return None
        self._first_seen.pop(sample.socket_id, None)
        return ConnectionAttributes(
            reporter=sample.reporter,
            source=source.identity(),
            destination=destination.identity(),
            service=service,
        )

    def naming_key(self, sample: SocketSample, peers: PeerIndex) -> Hashable | None:
        """``agent.model.NamingKeys``: the socket's role, the pods of its two ends (None for
        an end that is no known pod) and its Service - everything :meth:`attributes` names
        it by but the ends' ip and port. None while :meth:`attributes` would wait.

        A client in pod web-1 (port 41000) to db-0 through Service db ->
        ``(Role.CLIENT, <web-1>, <db-0>, <db>)``, as from port 41002. Asked for finished
        sockets: like ``attributes(final=True)`` it forgets when the socket was first seen
        (an ``attributes`` call for the same socket next still resolves at that time)."""
        if not self.pods.synced():
            return None
        socket_id = sample.socket_id
        at = self._first_seen.pop(socket_id, None)
        if at is None:
            at = self._clock()
        self._keyed_at = (socket_id, at)
        source, destination, service = self._ends(sample, peers, at)
        if source.pending or destination.pending:
            return None
        return (sample.role, source.pod, destination.pod, service)

    def _ends(
        self, sample: SocketSample, peers: PeerIndex, at: float
    ) -> tuple[_End, _End, ServiceIdentity]:
        """The connection's source and destination, and its Service."""
        local = self._local_end(sample, at)
        if sample.role is Role.SERVER:
            source, service = self._server_view(sample, peers, local, at)
            return source, local, service
        destination, service = self._client_view(sample, peers, local, at)
        return local, destination, service

    # -- the local end -----------------------------------------------------------------------

    def _first_seen_at(self, socket_id: int) -> float:
        keyed_id, keyed_at = self._keyed_at
        if keyed_id == socket_id:
            return keyed_at
        seen = self._first_seen.get(socket_id)
        if seen is None:
            seen = self._clock()
            self._first_seen[socket_id] = seen
            while len(self._first_seen) > self._max_remembered:
                self._first_seen.popitem(last=False)
        return seen

    def _pod_uid_of(self, sample: SocketSample) -> str | None:
        """The pod owning the socket's namespace, else the pod of the process."""
        uid = None
        if self.netns is not None and sample.netns:
            uid = self.netns.pod_uid_of_netns(sample.netns)
        if uid is None and self.processes is not None and sample.pid:
            uid = self.processes.pod_uid_of_pid(sample.pid)
        return uid

    def _local_end(self, sample: SocketSample, at: float) -> _End:
        uid = self._pod_uid_of(sample)
        if uid is not None:
            pod = self.pods.pod_by_uid(uid)
            if pod is not None:
                return _End(sample.local, pod)
        by_address = self._by_address(sample.local, at)
        if uid is None or (by_address.pod is not None and by_address.pod.workload != UNKNOWN):
            return by_address
        # A pod we know runs here, not in the cache yet: worth another poll.
        return _End(sample.local, by_address.pod, pending=True)

    def _by_address(self, endpoint: Endpoint, at: float) -> _End:
        if is_loopback(endpoint.address):
            return _End(endpoint)
        pod = self.pods.pod_by_ip(endpoint.address, at)
        if pod is not None:
            return _End(endpoint, pod)
        return _End(endpoint, pending=self.pods.may_be_pod_ip(endpoint.address))

    # -- the remote end ----------------------------------------------------------------------

    def _remote_end(
        self, sample: SocketSample, peers: PeerIndex, local: _End, address: Endpoint, at: float
    ) -> _End:
        """The pod at ``address`` (the remote end as it really is, after any NAT)."""
        peer = peers.peer_of(sample)
        if peer is not None:
            uid = self._pod_uid_of(peer)
            pod = self.pods.pod_by_uid(uid) if uid is not None else None
            if pod is not None:
                return _End(address, pod)
        if is_loopback(address.address):
            # Same network namespace: the same pod (host-network pods have a peer socket).
            return _End(address, local.pod, pending=local.pending)
        return self._by_address(address, at)

    def _client_view(
        self, sample: SocketSample, peers: PeerIndex, local: _End, at: float
    ) -> tuple[_End, ServiceIdentity]:
        remote = sample.remote
        service = self.pods.service_by_cluster_ip(remote.address, remote.port)
        if service is not None:
            backend = None
            if self.nat is not None:
                backend = self.nat.translated_destination(sample.local, remote)
            if backend is None or backend == remote:
                return _End(remote), service
            return self._by_address(backend, at), service
        destination = self._remote_end(sample, peers, local, remote, at)
        return destination, self._service_of_endpoint(remote, destination)

    def _server_view(
        self, sample: SocketSample, peers: PeerIndex, local: _End, at: float
    ) -> tuple[_End, ServiceIdentity]:
        client = sample.remote
        service = None
        # kube-proxy DNATs to endpoints, never to a loopback address: a loopback server socket
        # has no NAT mapping to find, and each conntrack lookup costs milliseconds.
        if self.nat is not None and not is_loopback(sample.local.address):
            original = self.nat.original_tuple(client, sample.local)
            if original is not None:
                original_client, original_server = original
                if original_server != sample.local:
                    service = self.pods.service_by_cluster_ip(
                        original_server.address, original_server.port
                    )
                client = original_client
        if client != sample.remote:  # source-NAT-ed: the peer index knows the seen tuple only
            source = self._by_address(client, at)
        else:
            source = self._remote_end(sample, peers, local, client, at)
        if service is None:
            service = self._service_of_endpoint(sample.local, local)
        return source, service

    def _service_of_endpoint(self, endpoint: Endpoint, end: _End) -> ServiceIdentity:
        """The Service whose endpoints hold ``endpoint``, else the pod's own address on that
        port (for loopback and host-network addresses)."""
        service = self.pods.service_by_endpoint(endpoint.address, endpoint.port)
        pod_ip = end.pod.ip if end.pod is not None else ""
        if service is None and pod_ip and pod_ip != endpoint.address:
            service = self.pods.service_by_endpoint(pod_ip, endpoint.port)
        return service or NO_SERVICE

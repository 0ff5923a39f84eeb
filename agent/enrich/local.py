"""Local mode (no Kubernetes): each end is the process on this host, else its address.

Labels in local mode (README "Metric semantics"): ``*_workload`` is the process name of that
end when it is on this host, else the remote address; ``destination_service`` is
``"<server address>:<server port>"``; everything else "unknown".

>>> # client socket of `curl` (pid 42) to 198.18.0.2:80, whose server end is not on this host
>>> # -> source.workload "curl", destination.workload "198.18.0.2",
>>> #    service.host "198.18.0.2:80", reporter "source"
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable

from agent.memo import BoundedMemo
from agent.model import (
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


class LocalEnricher:
    """Names connection ends after local processes (implements ``agent.model.Enricher``).

    ``process_name(pid)`` returns the process's name, or None if it is gone; the task name
    the kernel recorded is the fallback.
    """

    def __init__(
        self, process_name: Callable[[int], str | None], identities_kept: int = 16384
    ) -> None:
        self._process_name = process_name
        # (address, port, workload) -> its PeerIdentity: a server end is named once for all
        # its connections, and a client end once for both of its sockets' views (flat keys
        # hash in C, without Endpoint.__hash__)
        self._identities: BoundedMemo[tuple[str, int, str], PeerIdentity] = BoundedMemo(
            identities_kept
        )
        self._services: BoundedMemo[tuple[str, int], ServiceIdentity] = BoundedMemo(identities_kept)

    def _name(self, sample: SocketSample) -> str | None:
        if not sample.pid:
            return None
        return self._process_name(sample.pid) or sample.comm or None

    def _workloads(
        self, sample: SocketSample, peers: PeerIndex, *, final: bool
    ) -> tuple[str, str] | None:
        """(local end's workload, remote end's) or None while one is not known yet."""
        local_name = self._name(sample)
        if local_name is None and not final:
            return None  # the owning process shows up with its first send or receive
        peer = peers.peer_of(sample)
        if peer is not None:
            remote_name = self._name(peer)
            if remote_name is None and not final:
                return None
        elif is_loopback(sample.remote.address) and not final:
            return None  # the other end is on this host; its socket appears next poll
        else:
            remote_name = None
        return local_name or UNKNOWN, remote_name or sample.remote.address

    def attributes(
        self, sample: SocketSample, peers: PeerIndex, *, final: bool
    ) -> ConnectionAttributes | None:
        workloads = self._workloads(sample, peers, final=final)
        if workloads is None:
            return None
        local = self._identity(sample.local, workloads[0])
        remote = self._identity(sample.remote, workloads[1])
        client, server = (remote, local) if sample.role is Role.SERVER else (local, remote)
        return ConnectionAttributes(
            reporter=sample.reporter,
            source=client,
            destination=server,
            service=self._service(sample.server),
        )

    def naming_key(self, sample: SocketSample, peers: PeerIndex) -> Hashable | None:
        """``agent.model.NamingKeys``: everything :meth:`attributes` names a socket by but
        its ends' ip and port (the server's stay: they make the service).
        A curl connection from port 41000 to a local nginx on 127.0.0.1:80 ->
        ``(Role.CLIENT, "curl", "nginx", "127.0.0.1", 80)``, as from port 41002."""
        workloads = self._workloads(sample, peers, final=False)
        if workloads is None:
            return None
        server = sample.server
        return (sample.role, *workloads, server.address, server.port)

    def _service(self, server: Endpoint) -> ServiceIdentity:
        """One ServiceIdentity per server end, shared by all its connections."""
        key = (server.address, server.port)
        service = self._services.get(key)
        if service is None:
            service = self._services.keep(key, ServiceIdentity(host=sys.intern(str(server))))
        return service

    def _identity(self, endpoint: Endpoint, workload: str) -> PeerIdentity:
        key = (endpoint.address, endpoint.port, workload)
        identity = self._identities.get(key)
        if identity is None:
            made = PeerIdentity(workload=workload, ip=endpoint.address, port=endpoint.port)
            identity = self._identities.keep(key, made)
        return identity

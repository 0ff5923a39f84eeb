"""The data that flows between tcpacct's stages, and the interfaces where I/O begins.

Kernel side (decoded by ``agent.ebpf``): :class:`SocketSample` — one socket's cumulative
counters as the kernel holds them. Accounting folds samples into per-label totals; enrichment
turns a sample into :class:`ConnectionAttributes` (who is on each end); metric definitions
turn attributes into label values.

Nothing here does I/O or imports a third-party package.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

UNKNOWN = "unknown"


class Role(enum.IntEnum):
    """Which end of the connection a socket is (values shared with bpf/tcpacct.c)."""

    UNKNOWN = 0
    CLIENT = 1  # connect()ed: SYN_SENT -> ESTABLISHED
    SERVER = 2  # accept()ed: SYN_RECV -> ESTABLISHED


class SocketFlag(enum.IntFlag):
    """Lifecycle facts the kernel recorded on a socket (values shared with bpf/tcpacct.c)."""

    NONE = 0
    OPENED = 1  # the transition to ESTABLISHED was seen
    CLOSED = 2  # the socket reached TCP_CLOSE (or was destroyed)
    PREEXISTING = 4  # first seen moving bytes, not being established (older than the agent)
    DESTROYED = 8  # tcp_destroy_sock: final, nothing more can move


class ValueSource(enum.Enum):
    """What a metric counts, in Istio's connection-bound direction."""

    RECEIVED_BYTES = "connection.received.bytes"  # client -> server (requests)
    SENT_BYTES = "connection.sent.bytes"  # server -> client (responses)
    CONNECTIONS_OPENED = "connection.opened"
    CONNECTIONS_CLOSED = "connection.closed"


class Reporter(enum.Enum):
    """Which end reports: Istio's ``reporter`` label."""

    SOURCE = "source"  # the client end ("outbound" in Mixer's context.reporter.kind)
    DESTINATION = "destination"  # the server end ("inbound")


@dataclass(slots=True, unsafe_hash=True)
class Endpoint:
    """An IP address (IPv4-mapped IPv6 already folded to IPv4) and a port.

    Treated as immutable. Not a frozen dataclass only because a frozen one's constructor
    costs four times as much, and a busy node decodes one per socket end per poll.
    """

    address: str
    port: int

    def __str__(self) -> str:
        """``Endpoint("10.0.0.5", 22)`` -> ``"10.0.0.5:22"``; IPv6 -> ``"[2001:db8::1]:80"``."""
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@functools.lru_cache(maxsize=65536)
def is_loopback(address: str) -> bool:
    """``"127.0.0.1"`` -> True, ``"::1"`` -> True, ``"198.18.0.5"`` -> False, ``"x"`` ->
    False; remembered (a node sees few addresses, each in many connections: parsing one
    costs microseconds)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=65536)
def fold_address(address: str) -> str:
    """Canonical text of an address, IPv4-mapped IPv6 folded to IPv4.

    ``"::ffff:198.18.0.1"`` -> ``"198.18.0.1"``; ``"2001:DB8::0:1"`` -> ``"2001:db8::1"``.
    Remembered: a node folds the same few addresses for many connections (parsing one
    costs microseconds).
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(slots=True, unsafe_hash=True)
class SocketSample:
    """One TCP socket's cumulative counters and identity, as read from the kernel.

    Everything but the two counters is fixed for the object's life (not frozen for the
    constructor's cost, as :class:`Endpoint`). A reader may update a live sample's counters
    in place when only they moved (the kernel tracer does, so a busy socket costs no new
    object): keep ``sent_bytes``/``received_bytes`` themselves, not the sample, to
    remember a past poll's counts.

    ``sent_bytes``/``received_bytes`` are what the local application wrote/read (return
    values of its send/receive calls), counted since the agent first saw the socket.
    ``socket_id`` is unique for the agent's lifetime (kernel ``struct sock`` addresses are
    reused; ids are not).
    """

    socket_id: int
    sent_bytes: int
    received_bytes: int
    local: Endpoint
    remote: Endpoint
    role: Role
    flags: SocketFlag
    netns: int = 0
    pid: int = 0  # tgid of the process that owns/moved bytes on the socket, 0 if not known
    comm: str = ""  # that task's name as the kernel saw it
    # The reader's bookkeeping, not part of the sample's value: the kernel entry's version
    # when this sample was read, and whether a later read at that same version found
    # everything but the counters unchanged (then reads at that version update counters only)
    kernel_version: int = field(default=0, compare=False, hash=False, repr=False)
    settled: bool = field(default=False, compare=False, hash=False, repr=False)
    # and the part of each counter its kernel entry holds itself; the rest is its slot's
    # (bpf/tcpacct.c struct slot), which later reads of the slot alone bring up to date
    entry_sent: int = field(default=0, compare=False, hash=False, repr=False)
    entry_received: int = field(default=0, compare=False, hash=False, repr=False)

    @property
    def client(self) -> Endpoint:
        return self.remote if self.role is Role.SERVER else self.local

    @property
    def server(self) -> Endpoint:
        return self.local if self.role is Role.SERVER else self.remote

    @property
    def reporter(self) -> Reporter:
        return Reporter.DESTINATION if self.role is Role.SERVER else Reporter.SOURCE

    @property
    def connection_received_bytes(self) -> int:
        """Client -> server bytes: a client's writes, a server's reads."""
        return self.received_bytes if self.role is Role.SERVER else self.sent_bytes

    @property
    def connection_sent_bytes(self) -> int:
        """Server -> client bytes: a server's writes, a client's reads."""
        return self.sent_bytes if self.role is Role.SERVER else self.received_bytes

    @property
    def established(self) -> bool:
        return bool(self.flags & (SocketFlag.OPENED | SocketFlag.PREEXISTING))


@dataclass(frozen=True, slots=True)
class KernelCounters:
    """Counters the kernel keeps for what it could not attribute to a tracked socket.

    ``untracked_*``: bytes on sockets that found the socket map full.
    ``spilled_*``: final cumulative counts of sockets whose close record found the closed
    map full (user space subtracts what it had already counted for them).
    ``lifecycle_events_missed``: socket state changes and destroys no program handled (one
    that landed in the kernel's few instructions around a lifecycle program already running
    on that CPU): a connection's open or close may be missing from the totals.
    """

    untracked_sent_bytes: int = 0
    untracked_received_bytes: int = 0
    untracked_sockets: int = 0
    spilled_sent_bytes: int = 0
    spilled_received_bytes: int = 0
    spilled_sockets: int = 0
    lifecycle_events_missed: int = 0


@dataclass(frozen=True, slots=True)
class KernelPoll:
    """One poll of the kernel: live sockets, sockets finished since the last poll, counters.

    Read in this order (the accounting invariant depends on it): counters, live, finished.
    """

    counters: KernelCounters
    live: tuple[SocketSample, ...]
    finished: tuple[SocketSample, ...]
    # The live sockets whose counters or lifecycle changed since the reader's last poll
    # (None: all of them). Lets accounting skip the unchanged majority of a large node.
    changed: tuple[SocketSample, ...] | None = None
    # live, by socket id, when the reader has it: may be a view of the reader's own table,
    # valid until its next poll (accounting reads it within the poll it came with)
    by_id: Mapping[int, SocketSample] | None = None
    # An incremental reader numbers its polls from 1. A consumer that saw the previous one
    # may trust that every socket new to live is in ``changed`` and that every one that
    # left live without a finished record is in ``gone``; one that did not (or 0: not
    # numbered) compares the whole live set instead.
    sequence: int = 0
    gone: tuple[int, ...] = ()  # socket ids that left live without a finished record

    def live_by_id(self) -> dict[int, SocketSample]:
        return {sample.socket_id: sample for sample in self.live}


@dataclass(frozen=True, slots=True)
class ListeningSocket:
    """A listening TCP socket found at start (seeds the kernel's role and owner lookups)."""

    netns: int
    port: int
    pid: int = 0
    comm: str = ""


class KernelReader(Protocol):
    """The kernel side as the pipeline sees it (implemented by ``agent.ebpf``)."""

    backend: str

    def poll(self) -> KernelPoll: ...

    def map_usage(self) -> Mapping[str, tuple[int, int]]:
        """Map name -> (entries, capacity)."""
        ...


@dataclass(slots=True)
class PeerIdentity:
    """Who is on one end of a connection. Every text field defaults to ``"unknown"``.

    Fixed for the object's life (identities are shared by many connections and kept in
    memos): not frozen only because a frozen dataclass's constructor costs 3-4x more (2.6
    against 0.7 us here), and a churn of short connections makes one per connection.
    """

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    cluster: str = UNKNOWN
    uid: str = UNKNOWN  # Istio's kubernetes://<pod>.<namespace>, or a process id locally
    pod_name: str = UNKNOWN
    ip: str = ""
    port: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.workload, self.namespace, self.uid, self.ip, self.port))

    def at_address(self, ip: str, port: int) -> PeerIdentity:
        """The same peer seen at another address: ``PeerIdentity(workload="web",
        ip="198.18.0.5").at_address("198.18.0.5", 41000)`` -> web at 198.18.0.5:41000.
        What ``dataclasses.replace(self, ip=ip, port=port)`` gives, for a fifth of its cost
        (Kubernetes mode makes one per connection end)."""
        return PeerIdentity(
            self.workload,
            self.namespace,
            self.principal,
            self.app,
            self.version,
            self.canonical_service,
            self.canonical_revision,
            self.cluster,
            self.uid,
            self.pod_name,
            ip,
            port,
            self.labels,
        )


@dataclass(slots=True, unsafe_hash=True)
class ServiceIdentity:
    """The destination service of a connection (Istio's ``destination_service*``); fixed
    for the object's life (not frozen for the constructor's cost, as PeerIdentity)."""

    host: str = UNKNOWN  # FQDN, e.g. mongodb.default.svc.cluster.local
    name: str = UNKNOWN
    namespace: str = UNKNOWN


NO_SERVICE = ServiceIdentity()  # every field "unknown"; shared, never changed


@dataclass(slots=True, unsafe_hash=True)
class ConnectionAttributes:
    """Everything known about one end's view of a connection, for metric definitions;
    fixed for the object's life (not frozen for the constructor's cost, as PeerIdentity:
    one is made per connection end)."""

    reporter: Reporter
    source: PeerIdentity
    destination: PeerIdentity
    service: ServiceIdentity = NO_SERVICE
    protocol: str = "tcp"


class Enricher(Protocol):
    """Turns a socket into connection attributes.

    ``attributes`` returns ``None`` while an end cannot be resolved *yet* (the peer socket
    or the pod is not known this poll); accounting then holds the socket's bytes back and
    asks again next poll. With ``final=True`` it must answer, using "unknown" where needed.
    """

    def attributes(
        self, sample: SocketSample, peers: PeerIndex, *, final: bool
    ) -> ConnectionAttributes | None: ...


class NamingKeys(Protocol):
    """What an enricher may also offer: ``naming_key(sample, peers) -> Hashable | None``.

    Two samples with equal keys get attributes that differ at most in their ends' ``ip``
    and ``port`` (so a catalogue that reads neither evaluates them alike); None when the
    enricher would not answer yet (``attributes(..., final=False)`` is None). Accounting
    names a finished socket by its key alone when an earlier one had the same, e.g. local
    mode: ``(Role.CLIENT, "curl", "nginx", "127.0.0.1", 80)`` for every curl connection
    to the local nginx, whatever its ephemeral port.
    """

    def naming_key(self, sample: SocketSample, peers: PeerIndex) -> Hashable | None: ...


class PeerIndex(Protocol):
    """The other tracked sockets of this poll, to find the local peer of a connection."""

    def peer_of(self, sample: SocketSample) -> SocketSample | None: ...


class SeriesKey:
    """One exported series: metric name and its label values (in the definition's order).

    Immutable, with its hash computed once: accounting looks series up on every poll.
    """

    __slots__ = ("_hash", "labels", "metric")

    def __init__(self, metric: str, labels: tuple[str, ...]) -> None:
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "_hash", hash((metric, labels)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SeriesKey is immutable")

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, SeriesKey):
            return NotImplemented
        return (
            self._hash == other._hash
            and self.metric == other.metric
            and self.labels == other.labels
        )

    def __repr__(self) -> str:
        return f"SeriesKey({self.metric!r}, {self.labels!r})"


class MetricDefinition(Protocol):
    """One metric: what it counts and how a connection maps to its label values."""

    name: str
    help: str
    value: ValueSource
    label_names: tuple[str, ...]

    def evaluate(self, attributes: ConnectionAttributes) -> tuple[str, ...] | None:
        """Label values for this connection, or ``None`` when the metric does not match."""
        ...


class MetricCatalogue(Protocol):
    """The effective set of metric definitions (built-in plus configuration).

    A catalogue may also offer ``evaluation_key(attributes) -> Hashable``: attributes with
    equal keys evaluate alike under every definition, so accounting evaluates once per key;
    and ``reads_addresses``: False when no definition reads an end's ip or port (then
    accounting may name sockets by :class:`NamingKeys`).
    """

    def definitions(self) -> Iterable[MetricDefinition]: ...

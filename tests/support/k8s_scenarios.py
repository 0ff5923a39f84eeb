"""Building blocks of the Kubernetes-mode privileged tests: workloads and their pods as the
API serves them, the pods' programs (``pod_peer.py``) in network namespaces and kubelet-style
cgroups, the agent as a process, and the exact series a scenario must produce.

A scenario books every connection it makes in a :class:`Ledger` (bytes as the pods' own
programs count them), and :func:`expected_series` turns the ledger into the ``istio_tcp_*``
series both reporters must show, label for label::

    ledger.flow(client.identity, server.identity, NO_SERVICE).add(request=1008, response=5000)
    expected_series(ledger)
    -> {("istio_tcp_received_bytes_total", frozenset({("reporter", "source"), ...})): 1008,
        ("istio_tcp_sent_bytes_total", ...): 5000, ...}   (and the same for "destination")
"""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import agent_process
from tests.support.k8s_api_server import pod, replica_set
from tests.support.netlab import NetLab, Pod, read_line

PEER_PROGRAM = Path(__file__).resolve().with_name("pod_peer.py")
TCPACCT = agent_process.TCPACCT
CLUSTER_NAME = "Kubernetes"
TRUST_DOMAIN = "cluster.local"
UNKNOWN = "unknown"

ISTIO_METRICS = (
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
)

# A metric of the tests' own (native config), by address: names connections whose ends are
# unknown, which the Istio label set cannot tell apart from other traffic on the machine.
PROBE_METRICS = ("test_peer_received_bytes", "test_peer_sent_bytes")
PROBE_CONFIG = """\
metrics:
""" + "".join(
    f"""\
  - name: {name}
    help: Bytes of connections by address (tests only).
    kind: counter
    value: connection.{direction}.bytes
    reporters: [source, destination]
    dimensions:
      reporter: conditional(context.reporter.kind == "outbound", "source", "destination")
      source_ip: source.ip | "unknown"
      destination_ip: destination.ip | "unknown"
      destination_port: destination.port | 0
      source_workload: source.workload.name | "unknown"
      destination_workload: destination.workload.name | "unknown"
"""
    for name, direction in zip(PROBE_METRICS, ("received", "sent"), strict=True)
)


# -- who is on each end ----------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What the ``source_*`` or ``destination_*`` labels of one end say."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    cluster: str = UNKNOWN

    def labels(self, side: str) -> dict[str, str]:
        """``Identity(workload="web", ...).labels("source")`` -> ``{"source_workload": "web",
        "source_workload_namespace": ..., "source_principal": ..., ...}``."""
        return {
            f"{side}_workload": self.workload,
            f"{side}_workload_namespace": self.namespace,
            f"{side}_principal": self.principal,
            f"{side}_app": self.app,
            f"{side}_version": self.version,
            f"{side}_canonical_service": self.canonical_service,
            f"{side}_canonical_revision": self.canonical_revision,
            f"{side}_cluster": self.cluster,
        }


UNKNOWN_END = Identity()


@dataclass(frozen=True)
class Service:
    """A Service as the ``destination_service*`` labels name it."""

    name: str = UNKNOWN
    namespace: str = UNKNOWN

    @property
    def host(self) -> str:
        """``Service("reviews", "shop").host`` -> ``"reviews.shop.svc.cluster.local"``."""
        if self.name == UNKNOWN:
            return UNKNOWN
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def labels(self) -> dict[str, str]:
        return {
            "destination_service": self.host,
            "destination_service_name": self.name,
            "destination_service_namespace": self.namespace,
        }


NO_SERVICE = Service()


@dataclass(frozen=True)
class Workload:
    """A controller's pods: ``kind`` "Deployment" (through a ReplicaSet), "DaemonSet",
    "StatefulSet", or "" for bare pods (each its own workload)."""

    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    kind: str = "Deployment"
    template_hash: str = field(default_factory=lambda: secrets.token_hex(5))

    @property
    def replica_set(self) -> str:
        return f"{self.name}-{self.template_hash}"

    def identity(self, pod_name: str) -> Identity:
        """The labels Istio derives from the pod's labels (docs/kubernetes.md's table):
        ``{"app.kubernetes.io/name": "api"}`` -> app and canonical service ``"api"``,
        version ``"unknown"``, canonical revision ``"latest"``."""
        labels = self.labels
        workload = self.name if self.kind else pod_name

        def first(*keys: str) -> str | None:
            return next((labels[key] for key in keys if key in labels), None)

        return Identity(
            workload=workload,
            namespace=self.namespace,
            principal=f"spiffe://{TRUST_DOMAIN}/ns/{self.namespace}/sa/{self.service_account}",
            app=first("app", "app.kubernetes.io/name") or UNKNOWN,
            version=first("version", "app.kubernetes.io/version") or UNKNOWN,
            canonical_service=first(
                "service.istio.io/canonical-name", "app.kubernetes.io/name", "app"
            )
            or workload,
            canonical_revision=first(
                "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"
            )
            or "latest",
            cluster=CLUSTER_NAME,
        )

    def objects(self) -> list[dict[str, Any]]:
        """The controller objects the cache walks (a Deployment's ReplicaSet)."""
        if self.kind != "Deployment":
            return []
        return [replica_set(self.replica_set, self.namespace, self.name)]

    def owner(self) -> tuple[str, str] | None:
        """The pods' controller reference: (kind, name)."""
        if self.kind == "Deployment":
            return ("ReplicaSet", self.replica_set)
        return (self.kind, self.name) if self.kind else None

    def pod(self, ips: str | Sequence[str], **extra: Any) -> KubePod:
        """A new pod of this workload at ``ips`` (a new name and UID each time)."""
        suffix = secrets.token_hex(3)
        name = (
            f"{self.replica_set}-{suffix}"
            if self.kind == "Deployment"
            else (f"{self.name}-{suffix}")
        )
        addresses = [ips] if isinstance(ips, str) else list(ips)
        return KubePod(self, name, addresses, **extra)


@dataclass
class KubePod:
    """One pod: its API object and the cgroup identity its processes get on the node."""

    workload: Workload
    name: str
    ips: list[str]
    host_network: bool = False
    node: str = "node-1"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    container_id: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def identity(self) -> Identity:
        return self.workload.identity(self.name)

    def api_object(self) -> dict[str, Any]:
        workload = self.workload
        labels = dict(workload.labels)
        if workload.kind == "Deployment":
            labels["pod-template-hash"] = workload.template_hash
        return pod(
            self.name,
            workload.namespace,
            self.ips,
            labels=labels,
            owner=workload.owner(),
            service_account=workload.service_account,
            node=self.node,
            host_network=self.host_network,
            uid=self.uid,
        )


def cluster_service(
    name: str, namespace: str, cluster_ip: str, port: int, target_port: int
) -> dict[str, Any]:
    """``cluster_service("reviews", "split", "198.19.4.7", 80, 9080)``."""
    family = "IPv6" if ":" in cluster_ip else "IPv4"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": [family],
            "ports": [{"name": "tcp", "port": port, "targetPort": target_port, "protocol": "TCP"}],
        },
    }


def endpoint_slice(
    service: str, namespace: str, backends: Iterable[tuple[KubePod, str]], port: int
) -> dict[str, Any]:
    """The EndpointSlice of ``service``: each (pod, address) ready on ``port``."""
    backends = list(backends)
    family = "IPv6" if backends and ":" in backends[0][1] else "IPv4"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-{secrets.token_hex(3)}",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": kube_pod.name},
            }
            for kube_pod, address in backends
        ],
        "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}],
    }


def free_cluster_ip(ipv6: bool = False) -> str:
    """A random ClusterIP (198.19.0.0/16, or 2001:db8:ffff::/64), so that labs of tests
    running at the same time do not DNAT each other's traffic."""
    if ipv6:
        return f"2001:db8:ffff::{secrets.randbelow(0xFFFF) + 1:x}"
    return f"198.19.{secrets.randbelow(250) + 1}.{secrets.randbelow(254) + 1}"


# -- the pods' programs ----------------------------------------------------------------------


class Peer:
    """``pod_peer.py`` running in a pod (or on the node), in its pod's cgroup."""

    def __init__(self, process: subprocess.Popen, name: str, context: Callable[[], str]):
        self.process = process
        self.name = name
        self.context = context

    def ask(self, command: str, timeout: float = 20.0) -> list[str]:
        """Sends one command; its ``ok ...`` answer split in words (else AssertionError)."""
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = read_line(self.process, timeout=timeout, context=self.context)
        if not answer.startswith("ok "):
            raise AssertionError(f"{self.name}: {command!r} -> {answer!r}")
        return answer.split()

    def listen(self, host: str, port: int) -> None:
        self.ask(f"listen {host} {port}")

    def open(self, name: str, host: str, port: int) -> tuple[str, int]:
        """Connects; returns the local address and port."""
        words = self.ask(f"open {name} {host} {port}")
        return words[3], int(words[4])

    def exchange(self, name: str, payload: int, response: int) -> tuple[int, int]:
        """One request: returns (bytes written, bytes read), checked against the request."""
        words = self.ask(f"exchange {name} {payload} {response}")
        wrote, read = int(words[3]), int(words[4])
        assert (wrote, read) == (8 + payload, response), words
        return wrote, read

    def close(self, name: str) -> None:
        self.ask(f"close {name}")

    def served(self, port: int, closed: int) -> tuple[int, int, int]:
        """The server's account of ended connections on ``port`` (read, written, closed),
        once ``closed`` of them have ended."""
        words = self.ask(f"wait-served {port} {closed}")
        return int(words[3]), int(words[4]), int(words[5])


def start_peer(lab: NetLab, kube_pod: KubePod | None, netns: Pod | None, *, name: str = "") -> Peer:
    """Runs ``pod_peer.py`` in ``netns`` (``None``: on the node, as a host-network pod) and,
    when ``kube_pod`` is given, in that pod's kubelet-style cgroup — before it does anything.
    """
    argv = [sys.executable, str(PEER_PROGRAM)]
    process = netns.spawn(argv) if netns is not None else lab.spawn_on_node(argv)
    if kube_pod is not None:
        lab.pod_cgroup(kube_pod.uid, kube_pod.container_id).add(process.pid)
    return Peer(process, name or (kube_pod.name if kube_pod else "node"), lab.diagnostics)


# -- ground truth ----------------------------------------------------------------------------


@dataclass
class Traffic:
    """What the programs moved on a set of connections, by their own account."""

    request: int = 0  # client -> server
    response: int = 0  # server -> client
    opened: int = 0
    closed: int = 0

    def add(self, request: int = 0, response: int = 0, opened: int = 0, closed: int = 0) -> None:
        self.request += request
        self.response += response
        self.opened += opened
        self.closed += closed


FlowKey = tuple[Identity, Identity, Service]


@dataclass
class Ledger:
    """Traffic per (source, destination, service), as both reporters must show it."""

    flows: dict[FlowKey, Traffic] = field(default_factory=dict)

    def flow(self, source: Identity, destination: Identity, service: Service) -> Traffic:
        return self.flows.setdefault((source, destination, service), Traffic())

    def talk(
        self,
        peer: Peer,
        flow: Traffic,
        name: str,
        address: tuple[str, int],
        exchanges: Sequence[tuple[int, int]],
        *,
        close: bool = True,
    ) -> None:
        """Opens ``name`` to ``address``, makes the exchanges (payload, response), closes it
        (unless told not to), booking each step in ``flow``."""
        peer.open(name, *address)
        flow.add(opened=1)
        for payload, response in exchanges:
            wrote, read = peer.exchange(name, payload, response)
            flow.add(request=wrote, response=read)
        if close:
            peer.close(name)
            flow.add(closed=1)


SeriesKey = tuple[str, frozenset[tuple[str, str]]]


def istio_labels(
    reporter: str, source: Identity, destination: Identity, service: Service
) -> dict[str, str]:
    """Every label of an ``istio_tcp_*`` series."""
    return {
        "reporter": reporter,
        **source.labels("source"),
        **destination.labels("destination"),
        **service.labels(),
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }


def expected_series(
    ledger: Ledger, reporters: Sequence[str] = ("source", "destination")
) -> dict[SeriesKey, int]:
    """The non-zero ``istio_tcp_*`` series the ledger's connections must produce."""
    expected: dict[SeriesKey, int] = {}
    for (source, destination, service), traffic in ledger.flows.items():
        values = (traffic.request, traffic.response, traffic.opened, traffic.closed)
        for reporter in reporters:
            labels = frozenset(istio_labels(reporter, source, destination, service).items())
            for metric, value in zip(ISTIO_METRICS, values, strict=True):
                if value:
                    key = (metric, labels)
                    expected[key] = expected.get(key, 0) + value
    return expected


def expected_probe_series(
    ledger: Ledger, source_ip: str, destination_ip: str, destination_port: int
) -> dict[SeriesKey, int]:
    """The non-zero probe series (``PROBE_CONFIG``) of the ledger's connections, all made
    from ``source_ip`` to ``destination_ip:destination_port``, for both reporters."""
    expected: dict[SeriesKey, int] = {}
    for (source, destination, _), traffic in ledger.flows.items():
        for reporter in ("source", "destination"):
            labels = frozenset(
                {
                    "reporter": reporter,
                    "source_ip": source_ip,
                    "destination_ip": destination_ip,
                    "destination_port": str(destination_port),
                    "source_workload": source.workload,
                    "destination_workload": destination.workload,
                }.items()
            )
            for metric, value in zip(
                PROBE_METRICS, (traffic.request, traffic.response), strict=True
            ):
                if value:
                    key = (metric, labels)
                    expected[key] = expected.get(key, 0) + value
    return expected


# -- what the agent shows --------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_series(text: str, metrics: Iterable[str]) -> dict[SeriesKey, int]:
    """Samples of ``metrics`` in an exposition: ``'m{a="b"} 3.0'`` -> ``{("m", {("a",
    "b")}): 3}``."""
    wanted = set(metrics)
    found: dict[SeriesKey, int] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in wanted:
            continue
        labels = frozenset(_LABEL.findall(match.group(2) or ""))
        found[(match.group(1), labels)] = int(float(match.group(3)))
    return found


def series_of_namespaces(series: dict[SeriesKey, int], namespaces: set[str]) -> dict:
    """The non-zero series that name one of ``namespaces`` on either end or as the
    Service's namespace (the scenario's own; other traffic on the machine is left out)."""
    keys = (
        "source_workload_namespace",
        "destination_workload_namespace",
        "destination_service_namespace",
    )
    kept = {}
    for (metric, labels), value in series.items():
        named = dict(labels)
        if value and any(named.get(key) in namespaces for key in keys):
            kept[(metric, labels)] = value
    return kept


def series_of_addresses(series: dict[SeriesKey, int], addresses: set[str]) -> dict:
    """The non-zero probe series whose source and destination are both in ``addresses``."""
    kept = {}
    for (metric, labels), value in series.items():
        named = dict(labels)
        if value and {named.get("source_ip"), named.get("destination_ip")} <= addresses:
            kept[(metric, labels)] = value
    return kept


def probe_lines(text: str, addresses: set[str]) -> str:
    """The probe series touching ``addresses``: how the agent named those connections."""
    lines = ["probe series of the scenario's addresses:"]
    for (metric, labels), value in sorted(parse_series(text, PROBE_METRICS).items(), key=repr):
        named = dict(labels)
        if {named.get("source_ip"), named.get("destination_ip")} & addresses:
            lines.append(f"  {metric} {value} {dict(sorted(labels))}")
    return "\n".join(lines)


HEALTH_PREFIXES = (
    "tcpacct_poll",
    "tcpacct_map_",
    "tcpacct_tracked_sockets",
    "tcpacct_held_back_sockets",
    "tcpacct_unattributed_bytes_total",
    "tcpacct_untracked_sockets_total",
    "tcpacct_spilled_sockets_total",
    "tcpacct_lifecycle_events_missed_total",
    "tcpacct_k8s_",
)


def health_lines(text: str, sockstat: Path = Path("/proc/net/sockstat")) -> str:
    """The agent's self-metrics that explain missing counts (polls falling behind, full
    maps, unattributed bytes), and the node's socket totals: the agent counts every TCP
    socket of the machine, so another test's load shows here."""
    lines = ["agent health:"]
    lines += [f"  {line}" for line in text.splitlines() if line.startswith(HEALTH_PREFIXES)]
    with contextlib.suppress(OSError):
        lines.append(f"node {sockstat}:\n{sockstat.read_text()}")
    return "\n".join(lines)


def describe_difference(expected: dict, seen: dict) -> str:
    """Lines naming each series whose value differs (missing, extra, or other value)."""
    lines = []
    for key in sorted(set(expected) | set(seen), key=repr):
        if expected.get(key) != seen.get(key):
            metric, labels = key
            shown = {k: v for k, v in sorted(labels) if v != UNKNOWN or k == "reporter"}
            lines.append(f"  {metric} expected {expected.get(key)} got {seen.get(key)}: {shown}")
    return "\n".join(lines)


class AgentProcess(agent_process.AgentProcess):
    """``tcpacct run`` in Kubernetes mode on the node, started at once; ended by its PID."""

    def __init__(self, arguments: Sequence[str], log_path: Path, port: int) -> None:
        super().__init__(port, arguments, log_path)
        self.start()

    def wait_for_series(
        self,
        expected: dict[SeriesKey, int],
        select: Callable[[dict[SeriesKey, int]], dict],
        metrics: Iterable[str] = ISTIO_METRICS,
        *,
        what: str,
        deadline_seconds: float = 20.0,
        explain: Callable[[str], str] | None = None,
    ) -> None:
        """Until the selected series equal ``expected`` exactly (none missing, none extra,
        no other value); fails at once when one is above its expected value (counters only
        grow), else at the deadline, showing the difference, what ``explain`` makes of the
        exposition, and the agent's log."""
        metrics = tuple(metrics)
        deadline = time.monotonic() + deadline_seconds
        while True:
            text = self.scrape()
            seen = select(parse_series(text, metrics))
            if seen == expected:
                return
            over = any(value > expected.get(key, 0) for key, value in seen.items())
            if over or time.monotonic() >= deadline:
                raise AssertionError(
                    f"{what}: the agent's series differ from the pods' own account "
                    f"({'a value above its truth' if over else 'deadline'}):\n"
                    f"{describe_difference(expected, seen)}\n"
                    f"{explain(text) if explain else ''}\n{health_lines(text)}\n"
                    f"agent log:\n{self.log()}"
                )
            time.sleep(0.5)

    def self_metric(self, name: str, **labels: str) -> float:
        """The sum of a self-metric's samples matching ``labels``."""
        total = 0.0
        for (metric, found), value in parse_series(self.scrape(), [name]).items():
            named = dict(found)
            if metric == name and all(named.get(k) == v for k, v in labels.items()):
                total += value
        return total

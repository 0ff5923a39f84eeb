"""A small Kubernetes API server for tests, spoken to by the unmodified official client.

It serves list and watch for pods, services, namespaces (core/v1), endpointslices
(discovery.k8s.io/v1), replicasets and deployments (apps/v1), jobs and cronjobs (batch/v1),
with what a list+watch client depends on:

- one global resourceVersion, bumped by every change; lists carry it in ``metadata``;
- ``limit``/``continue`` paging (pages are read from the live store, not a snapshot);
- watch streaming with chunked transfer encoding, one JSON event per line, resuming after a
  given ``resourceVersion`` (none or ``"0"``: synthetic ADDED events for what exists first),
  ``timeoutSeconds``, ``allowWatchBookmarks`` -> periodic BOOKMARK events;
- ``410 Gone``: a watch from a version older than the retained history gets an ERROR event
  with a Status of code 410 (:meth:`KubernetesApiServer.expire_history` drops the history);
- injected failures (any status, e.g. 500 or 410) and delays, matched by path and verb;
- stop, and restart on the same port with the same objects (as an API server backed by etcd).

Usage::

    with KubernetesApiServer() as server:
        server.apply(pod("web-1", "shop", "198.18.0.10"))
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        ...
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class ResourceType:
    plural: str
    kind: str
    group_version: str  # "v1", "apps/v1"
    namespaced: bool = True

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"


RESOURCE_TYPES = {
    t.plural: t
    for t in (
        ResourceType("pods", "Pod", "v1"),
        ResourceType("services", "Service", "v1"),
        ResourceType("namespaces", "Namespace", "v1", namespaced=False),
        ResourceType("endpointslices", "EndpointSlice", "discovery.k8s.io/v1"),
        ResourceType("replicasets", "ReplicaSet", "apps/v1"),
        ResourceType("deployments", "Deployment", "apps/v1"),
        ResourceType("jobs", "Job", "batch/v1"),
        ResourceType("cronjobs", "CronJob", "batch/v1"),
    )
}
PLURAL_OF_KIND = {t.kind: t.plural for t in RESOURCE_TYPES.values()}


def resource_type(kind_or_plural: str) -> ResourceType:
    """``"Pod"`` or ``"pods"`` -> the pods :class:`ResourceType`."""
    plural = PLURAL_OF_KIND.get(kind_or_plural, kind_or_plural.lower())
    if plural not in RESOURCE_TYPES:
        raise KeyError(f"unknown kind {kind_or_plural!r}")
    return RESOURCE_TYPES[plural]


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``meta/v1`` Status, as the API server sends with errors."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Injection:
    """Answer the next ``count`` matching requests with ``status`` (or delay them)."""

    count: int
    status: int = 0
    delay: float = 0.0
    path_contains: str = ""
    watch: bool | None = None  # None: lists and watches

    def matches(self, path: str, watching: bool) -> bool:
        return (
            self.count > 0
            and self.path_contains in path
            and (self.watch is None or self.watch == watching)
        )


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass
class Event:
    resource_version: int
    plural: str
    namespace: str
    type: str
    object: dict[str, Any]


@dataclass
class ApiState:
    """The objects and their change history: survives a server restart."""

    resource_version: int = 1
    compacted: int = 0  # watches from a version below this get 410 Gone
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)


class KubernetesApiServer:
    """The test API server. ``start=False`` reserves the port but refuses connections."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        start: bool = True,
        bookmark_interval: float = 1.0,
        max_watch_seconds: float = 600.0,
    ) -> None:
        self.host = host
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        self.state = ApiState()
        self.requests: list[RequestRecord] = []
        self._injections: list[Injection] = []
        self._lock = threading.Lock()
        self._bookmark_generation = 0
        self._end_generation = 0
        self._connections: set[socket.socket] = set()
        self._open_watches = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._httpd = self._bind(port)
        self.port = self._httpd.server_address[1]
        if start:
            self.start()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _bind(self, port: int) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer((self.host, port), _make_handler(self), bind_and_activate=False)
        httpd.daemon_threads = True
        httpd.allow_reuse_address = True
        httpd.server_bind()  # holds the port; connections are refused until listen()
        return httpd

    def start(self) -> None:
        """Starts answering (again) on the same port."""
        if self._thread is not None:
            return
        if self._httpd is None:
            self._httpd = self._bind(self.port)
        self._stopping.clear()
        self._httpd.server_activate()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stops listening and cuts every open connection (watch streams break mid-way)."""
        if self._thread is None:
            if self._httpd is not None:
                self._httpd.server_close()
                self._httpd = None
            return
        self._stopping.set()
        with self.state.changed:
            self.state.changed.notify_all()
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._thread = None
        self._httpd = None

    def restart(self, *, down_for: float = 0.0) -> None:
        """Stop, optionally stay down ``down_for`` seconds, start on the same port."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def __enter__(self) -> KubernetesApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the cluster's objects ---------------------------------------------------------------

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Creates or replaces an object (kind from ``obj["kind"]``); returns the stored copy.

        Fills ``metadata.uid``, ``creationTimestamp`` (kept across updates) and
        ``resourceVersion``; emits ADDED or MODIFIED.
        """
        stored = copy.deepcopy(dict(obj))
        rtype = resource_type(stored["kind"])
        stored.setdefault("apiVersion", rtype.group_version)
        metadata = stored.setdefault("metadata", {})
        namespace = metadata.get("namespace", "default") if rtype.namespaced else ""
        if rtype.namespaced:
            metadata["namespace"] = namespace
        key = (rtype.plural, namespace, metadata["name"])
        with self.state.changed:
            previous = self.state.objects.get(key)
            if previous is not None:
                metadata.setdefault("uid", previous["metadata"]["uid"])
                metadata.setdefault(
                    "creationTimestamp", previous["metadata"]["creationTimestamp"]
                )
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", _now_rfc3339())
            self.state.resource_version += 1
            metadata["resourceVersion"] = str(self.state.resource_version)
            self.state.objects[key] = stored
            self._record("MODIFIED" if previous is not None else "ADDED", rtype, stored)
            return copy.deepcopy(stored)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Deletes an object; emits DELETED. ``False`` if there was none."""
        rtype = resource_type(kind)
        key = (rtype.plural, namespace if rtype.namespaced else "", name)
        with self.state.changed:
            stored = self.state.objects.pop(key, None)
            if stored is None:
                return False
            self.state.resource_version += 1
            stored["metadata"]["resourceVersion"] = str(self.state.resource_version)
            self._record("DELETED", rtype, stored)
            return True

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        rtype = resource_type(kind)
        with self.state.changed:
            found = self.state.objects.get((rtype.plural, namespace, name))
            return copy.deepcopy(found) if found else None

    @property
    def resource_version(self) -> int:
        with self.state.changed:
            return self.state.resource_version

    def _record(self, event_type: str, rtype: ResourceType, obj: dict[str, Any]) -> None:
        self.state.events.append(
            Event(
                self.state.resource_version,
                rtype.plural,
                obj["metadata"].get("namespace", ""),
                event_type,
                copy.deepcopy(obj),
            )
        )
        self.state.changed.notify_all()

    # -- test controls -----------------------------------------------------------------------

    def expire_history(self) -> None:
        """Forgets all change history: a watch or continue from an older version gets 410."""
        with self.state.changed:
            self.state.compacted = self.state.resource_version
            self.state.events.clear()

    def end_watches(self) -> None:
        """Ends every open watch stream cleanly (as the API server does at its timeout)."""
        with self.state.changed:
            self._end_generation += 1
            self.state.changed.notify_all()

    def send_bookmarks(self) -> None:
        """Every open watch that allows bookmarks sends one now."""
        with self.state.changed:
            self._bookmark_generation += 1
            self.state.changed.notify_all()

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        path_contains: str = "",
        watch: bool | None = None,
    ) -> None:
        """The next ``count`` matching requests fail with ``status`` and a Status body."""
        with self._lock:
            self._injections.append(Injection(count, status, 0.0, path_contains, watch))

    def delay_next(
        self, seconds: float, count: int = 1, *, path_contains: str = "", watch: bool | None = None
    ) -> None:
        """The next ``count`` matching requests are answered ``seconds`` late."""
        with self._lock:
            self._injections.append(Injection(count, 0, seconds, path_contains, watch))

    def requests_for(self, plural: str, *, watch: bool | None = None) -> list[RequestRecord]:
        """Requests seen for a kind (``"pods"``), lists and/or watches, in order."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.rstrip("/").endswith("/" + plural)
                and (watch is None or r.watch == watch)
            ]

    def open_watches(self) -> int:
        """Watch streams being served right now."""
        with self._lock:
            return self._open_watches

    def write_kubeconfig(self, path: str | Path, *, token: str = "tcpacct-test-token") -> Path:
        """A kubeconfig (JSON is YAML) pointing at this server; returns its path."""
        name = "tcpacct-test"
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": self.url}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [
                {"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}
            ],
            "current-context": name,
        }
        target = Path(path)
        target.write_text(json.dumps(document, indent=2))
        return target

    # -- request handling (called from handler threads) --------------------------------------

    def _injection_for(self, path: str, watching: bool) -> Injection | None:
        with self._lock:
            for injection in self._injections:
                if injection.matches(path, watching):
                    injection.count -= 1
                    return injection
        return None

    def _list(self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]):
        limit = int(query.get("limit") or 0)
        start_after: tuple[str, str] | None = None
        token = query.get("continue")
        with self.state.changed:
            if token:
                decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                if decoded["rv"] < self.state.compacted:
                    return HTTPStatus.GONE, status_body(
                        410, "Expired", "The provided continue parameter is too old"
                    )
                start_after = (decoded["ns"], decoded["name"])
            items = sorted(
                (
                    (key[1], key[2]),
                    obj,
                )
                for key, obj in self.state.objects.items()
                if key[0] == rtype.plural and (namespace is None or key[1] == namespace)
            )
            if start_after is not None:
                items = [item for item in items if item[0] > start_after]
            metadata: dict[str, Any] = {"resourceVersion": str(self.state.resource_version)}
            if limit and len(items) > limit:
                items = items[:limit]
                last = items[-1][0]
                metadata["continue"] = base64.urlsafe_b64encode(
                    json.dumps(
                        {"rv": self.state.resource_version, "ns": last[0], "name": last[1]}
                    ).encode()
                ).decode()
            body = {
                "kind": f"{rtype.kind}List",
                "apiVersion": rtype.group_version,
                "metadata": metadata,
                "items": [
                    {k: v for k, v in copy.deepcopy(obj).items() if k not in ("kind", "apiVersion")}
                    for _, obj in items
                ],
            }
        return HTTPStatus.OK, body

    def _watch_events(
        self,
        rtype: ResourceType,
        namespace: str | None,
        query: Mapping[str, str],
        write_line,
    ) -> None:
        """Streams events until the timeout, :meth:`end_watches`, or :meth:`stop`."""
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout = min(float(query.get("timeoutSeconds") or self.max_watch_seconds),
                      self.max_watch_seconds)
        deadline = time.monotonic() + timeout
        requested = query.get("resourceVersion") or ""
        state = self.state
        with state.changed:
            end_generation = self._end_generation
            bookmark_generation = self._bookmark_generation
            if requested in ("", "0"):
                position = state.resource_version
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for key, obj in sorted(state.objects.items())
                    if key[0] == rtype.plural and (namespace is None or key[1] == namespace)
                ]
            else:
                position = int(requested)
                initial = []
                if position < state.compacted:
                    gone = status_body(
                        410, "Expired", f"too old resource version: {position} ({state.compacted})"
                    )
                    write_line({"type": "ERROR", "object": gone})
                    return
        for event in initial:
            write_line(event)
        next_bookmark = time.monotonic() + self.bookmark_interval
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            with state.changed:
                pending = [
                    e
                    for e in state.events
                    if e.resource_version > position
                    and e.plural == rtype.plural
                    and (namespace is None or e.namespace == namespace)
                ]
                forced_bookmark = self._bookmark_generation != bookmark_generation
                ended = self._end_generation != end_generation
                bookmark_due = bookmarks and now >= next_bookmark
                if not pending and not forced_bookmark and not ended and not bookmark_due:
                    wake = min(deadline, next_bookmark if bookmarks else deadline)
                    state.changed.wait(max(0.0, min(wake - now, 0.5)))
                    continue
                bookmark_generation = self._bookmark_generation
                current = state.resource_version
            for event in pending:
                write_line({"type": event.type, "object": event.object})
                position = event.resource_version
            if bookmarks and (forced_bookmark or time.monotonic() >= next_bookmark):
                position = max(position, current)
                write_line(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": rtype.kind,
                            "apiVersion": rtype.group_version,
                            "metadata": {"resourceVersion": str(position)},
                        },
                    }
                )
                next_bookmark = time.monotonic() + self.bookmark_interval
            if ended:
                return


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_path(path: str) -> tuple[ResourceType, str | None, str | None] | None:
    """``/api/v1/namespaces/shop/pods/web-1`` -> (pods, "shop", "web-1");
    ``/apis/apps/v1/replicasets`` -> (replicasets, None, None)."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group_version, rest = "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    namespace: str | None = None
    name: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 2:
        return None
    plural = rest[0]
    if len(rest) == 2:
        name = rest[1]
    rtype = RESOURCE_TYPES.get(plural)
    if rtype is None or rtype.group_version != group_version:
        return None
    return rtype, namespace, name


def _make_handler(server: KubernetesApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tcpacct-test-apiserver"

        def setup(self) -> None:
            super().setup()
            with server._lock:
                server._connections.add(self.connection)

        def finish(self) -> None:
            with server._lock:
                server._connections.discard(self.connection)
            with contextlib.suppress(OSError):
                super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send_json(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            split = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            record = RequestRecord("GET", split.path, query)
            with server._lock:
                server.requests.append(record)
            if split.path == "/version":
                self._send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
                return
            parsed = parse_path(split.path)
            if parsed is None:
                self._send_json(404, status_body(404, "NotFound", f"no route {split.path}"))
                return
            rtype, namespace, name = parsed
            injection = server._injection_for(split.path, record.watch)
            if injection is not None:
                if injection.delay:
                    time.sleep(injection.delay)
                if injection.status:
                    reason = HTTPStatus(injection.status).phrase.replace(" ", "")
                    if injection.status == 410:
                        reason = "Expired"
                    self._send_json(
                        injection.status,
                        status_body(injection.status, reason, "injected by the test"),
                    )
                    return
            if name is not None:
                found = server.get(rtype.plural, namespace or "", name)
                if found is None:
                    self._send_json(404, status_body(404, "NotFound", f"{name} not found"))
                else:
                    self._send_json(200, found)
                return
            if record.watch:
                self._stream_watch(rtype, namespace, query)
                return
            status, body = server._list(rtype, namespace, query)
            self._send_json(status, body)

        def _stream_watch(
            self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]
        ) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def write_line(event: Mapping[str, Any]) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            with server._lock:
                server._open_watches += 1
            try:
                server._watch_events(rtype, namespace, query, write_line)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True
            finally:
                with server._lock:
                    server._open_watches -= 1

    return Handler


# -- object builders for tests ---------------------------------------------------------------


def pod(
    name: str,
    namespace: str,
    ip: str | Iterable[str] | None,
    *,
    labels: Mapping[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    service_account: str = "default",
    node: str = "node-1",
    host_network: bool = False,
    phase: str = "Running",
    uid: str | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """A Pod as the API would hold it: ``pod("web-1", "shop", "198.18.0.10",
    owner=("ReplicaSet", "web-5d8f"))``."""
    ips = [ip] if isinstance(ip, str) else list(ip or [])
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if uid:
        metadata["uid"] = uid
    if created:
        metadata["creationTimestamp"] = created
    if owner:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "apps/v1" if owner[0] in ("ReplicaSet", "StatefulSet", "DaemonSet")
                else "batch/v1",
                "kind": owner[0],
                "name": owner[1],
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{owner[0]}/{owner[1]}")),
                "controller": True,
            }
        ]
    status: dict[str, Any] = {"phase": phase}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": address} for address in ips]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "hostNetwork": host_network,
            "containers": [{"name": "main", "image": "example.invalid/app:1"}],
        },
        "status": status,
    }


def service(
    name: str, namespace: str, cluster_ip: str | Iterable[str], ports: Iterable[int]
) -> dict[str, Any]:
    """``service("mongodb", "default", "198.19.0.10", [27017])``."""
    ips = [cluster_ip] if isinstance(cluster_ip, str) else list(cluster_ip)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ports": [{"port": p, "targetPort": p, "protocol": "TCP"} for p in ports],
        },
    }


def endpoint_slice(
    name: str,
    namespace: str,
    service_name: str,
    addresses: Iterable[str],
    ports: Iterable[int],
    *,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """One endpoint per address, all ready, the given target ports."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"port": p, "protocol": "TCP"} for p in ports],
    }


def replica_set(name: str, namespace: str, deployment: str | None) -> dict[str, Any]:
    """A ReplicaSet, owned by ``deployment`` if given."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if deployment:
        metadata["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
             "uid": str(uuid.uuid4()), "controller": True}
        ]
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": metadata, "spec": {}}


def job(name: str, namespace: str, cronjob: str | None) -> dict[str, Any]:
    """A Job, owned by ``cronjob`` if given."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if cronjob:
        metadata["ownerReferences"] = [
            {"apiVersion": "batch/v1", "kind": "CronJob", "name": cronjob,
             "uid": str(uuid.uuid4()), "controller": True}
        ]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": {}}

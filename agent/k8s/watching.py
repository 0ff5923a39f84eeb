"""One list+watch loop per resource kind, on a background thread.

The loop is the one client-go's reflector runs: list (in pages) to get every object and a
resourceVersion, then watch from that resourceVersion with bookmarks; when the watch ends,
watch again from the last resourceVersion seen (objects or bookmarks); on ``410 Gone``
(the version is too old) list again; on any other error wait with capped exponential backoff
and resume. Objects travel as raw JSON (``_preload_content=False``) and are decoded straight
into small records, never into the client's model classes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from agent.k8s.records import Record

log = logging.getLogger(__name__)

GONE = 410


class RecordSink(Protocol):
    """Where a watcher delivers decoded records (the cache)."""

    def replace(self, kind: str, records: list[Record]) -> None: ...

    def upsert(self, kind: str, record: Record) -> None: ...

    def remove(self, kind: str, record: Record) -> None: ...


@dataclass(frozen=True, slots=True)
class ResourceKind:
    """A watched kind: its name, the client's list function for it, and its decoder.

    ``list_call`` is e.g. ``CoreV1Api(client).list_pod_for_all_namespaces``.
    """

    name: str
    list_call: Callable[..., Any]
    decode: Callable[[Mapping[str, Any]], Record | None]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff: ``Backoff(0.5, 30).delay(3)`` -> ``4.0`` (0.5·2³)."""

    initial: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.initial * (2 ** min(failures, 32)))


class ResourceGone(Exception):
    """The requested resourceVersion (or continue token) is too old: list again."""


class WatchCounters:
    """What a watcher did, for self-metrics. Plain ints written by one thread."""

    def __init__(self) -> None:
        self.lists = 0
        self.watches = 0
        self.watch_restarts = 0
        self.relists_after_gone = 0
        self.api_errors = 0


class ResourceWatcher:
    """Keeps ``sink`` in step with one kind of object until :meth:`stop`."""

    def __init__(
        self,
        kind: ResourceKind,
        sink: RecordSink,
        *,
        backoff: Backoff = Backoff(),
        page_size: int = 500,
        watch_timeout_seconds: int = 300,
        connect_timeout_seconds: float = 5.0,
    ) -> None:
        self.kind = kind
        self.sink = sink
        self.backoff = backoff
        self.page_size = page_size
        self.watch_timeout_seconds = watch_timeout_seconds
        self.connect_timeout_seconds = connect_timeout_seconds
        self.counters = WatchCounters()
        self.synced = threading.Event()
        self.resource_version = ""
        self._stopping = threading.Event()
        self._response: Any = None
        self._response_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"k8s-watch-{kind.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the loop: wakes the backoff wait and shuts the open stream's socket."""
        self._stopping.set()
        with self._response_lock:
            response = self._response
        if response is not None:
            _shutdown(response)
        self.join(timeout)

    def join(self, timeout: float) -> bool:
        """Waits for the loop to end; ``True`` if it has."""
        if self._thread.is_alive() and timeout > 0:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        failures = 0
        need_list = True
        while not self._stopping.is_set():
            listing = need_list
            try:
                if need_list:
                    self._list()
                    need_list = False
                self._watch()
                failures = 0
            except ResourceGone as error:
                need_list = True
                if not listing:  # the watch's version expired: list again at once
                    self.counters.relists_after_gone += 1
                    continue
                self._pause_after(error, failures)  # the list itself said 410: back off
                failures += 1
            except Exception as error:  # API down, 5xx, broken stream: retry after a pause
                if self._stopping.is_set():
                    break
                self._pause_after(error, failures)
                failures += 1
            if not self._stopping.is_set():
                self.counters.watch_restarts += 1

    def _pause_after(self, error: BaseException, failures: int) -> None:
        self.counters.api_errors += 1
        delay = self.backoff.delay(failures)
        log.warning(
            "%s list/watch failed (%s); retrying in %.2fs",
            self.kind.name,
            _describe(error),
            delay,
        )
        self._stopping.wait(delay)

    def _call(self, **params: Any) -> Any:
        try:
            return self.kind.list_call(_preload_content=False, **params)
        except ApiException as error:
            if error.status == GONE:
                raise ResourceGone(str(error.reason)) from error
            raise

    def _list(self) -> None:
        """Every object, in pages; replaces the sink's contents; sets the resourceVersion."""
        records: list[Record] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": self.page_size}
            if token:
                params["_continue"] = token
            response = self._call(
                **params,
                _request_timeout=(self.connect_timeout_seconds, 60.0),
            )
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
            for item in body.get("items") or []:
                record = self.kind.decode(item) if isinstance(item, Mapping) else None
                if record is not None:
                    records.append(record)
            metadata = body.get("metadata") or {}
            token = metadata.get("continue") or None
            if token is None:
                self.resource_version = str(metadata.get("resourceVersion") or "")
                break
        self.sink.replace(self.kind.name, records)
        self.counters.lists += 1
        self.synced.set()

    def _watch(self) -> None:
        """One watch request, events applied as they stream in, until the server ends it."""
        response = self._call(
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self.resource_version or None,
            timeout_seconds=self.watch_timeout_seconds,
            _request_timeout=(self.connect_timeout_seconds, self.watch_timeout_seconds + 30.0),
        )
        with self._response_lock:
            self._response = response
        if self._stopping.is_set():
            _shutdown(response)
        self.counters.watches += 1
        try:
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return
                self._apply(json.loads(line))
        finally:
            with self._response_lock:
                self._response = None
            response.release_conn()

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind_of_event = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            return
        if kind_of_event == "ERROR":
            code = obj.get("code")
            if code == GONE:
                raise ResourceGone(str(obj.get("message", "")))
            raise ApiException(
                status=code if isinstance(code, int) else 0, reason=str(obj.get("message", ""))
            )
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind_of_event == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        record = self.kind.decode(obj)
        if record is not None:
            if kind_of_event in ("ADDED", "MODIFIED"):
                self.sink.upsert(self.kind.name, record)
            elif kind_of_event == "DELETED":
                self.sink.remove(self.kind.name, record)
        if version:
            self.resource_version = str(version)


def _shutdown(response: Any) -> None:
    """Unblocks a thread reading ``response`` (urllib3 >= 2.3 ``shutdown``, else close)."""
    try:
        shutdown = getattr(response, "shutdown", None)
        if shutdown is not None:
            shutdown()
        else:
            response.close()
    except Exception:  # the stream may already be gone
        log.debug("closing a watch stream failed", exc_info=True)


def _describe(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"

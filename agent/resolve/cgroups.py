"""pid -> (pod UID, container id) from ``/proc/<pid>/cgroup``.

The kubelet puts every container in a cgroup whose path names the pod and the container, in
one of two styles (either under cgroup v1 controllers or the v2 unified hierarchy):

- cgroupfs: ``/kubepods/burstable/pod0f3a9c2e-7c1b-4d5e-9f00-1234567890ab/<container id>``
- systemd:  ``/kubepods.slice/kubepods-burstable.slice/``
  ``kubepods-burstable-pod0f3a9c2e_7c1b_4d5e_9f00_1234567890ab.slice/``
  ``cri-containerd-<container id>.scope`` (also ``docker-``, ``crio-`` prefixes)

Guaranteed pods have no QoS level in the path (``kubepods/pod<uid>``,
``kubepods-pod<uid>.slice``); nested set-ups (kind, kubelet in a slice) add a prefix.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_POD = re.compile(
    r"kubepods(?:[-/.](?:besteffort|burstable|guaranteed))*(?:\.slice)?"
    r"[-/](?:kubepods-(?:besteffort|burstable|guaranteed)-)?"
    r"pod(?P<uid>[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}"
    r"[-_][0-9a-fA-F]{12}|[0-9a-fA-F]{32})(?:\.slice)?"
)
_CONTAINER = re.compile(
    r"^(?:(?:cri-containerd|docker|crio|libpod|cri-o)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$"
)


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """Where a process runs: its pod's UID and its container's id ("" for the pod cgroup)."""

    pod_uid: str
    container_id: str = ""


def parse_cgroup_path(path: str) -> ContainerRef | None:
    """One cgroup path -> its pod and container, or ``None`` outside any pod.

    ``"/kubepods/burstable/pod0f3a9c2e-7c1b-4d5e-9f00-1234567890ab/4c1d…(64 hex)"``
    -> ``ContainerRef("0f3a9c2e-7c1b-4d5e-9f00-1234567890ab", "4c1d…")``;
    ``"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f3a9c2e_7c1b_4d5e_9f00_``
    ``1234567890ab.slice/cri-containerd-4c1d….scope"`` -> the same;
    ``"/user.slice/user-1000.slice/session-2.scope"`` -> ``None``.
    """
    match = _POD.search(path)
    if match is None:
        return None
    uid = match.group("uid").replace("_", "-").lower()
    container_id = ""
    tail = path[match.end() :].strip("/").split("/")
    if tail and tail[0]:
        found = _CONTAINER.match(tail[0])
        if found is not None:
            container_id = found.group("id")
    return ContainerRef(uid, container_id)


def parse_cgroup_file(text: str) -> ContainerRef | None:
    """The contents of ``/proc/<pid>/cgroup`` -> the pod/container it names.

    Lines are ``hierarchy-id:controllers:path`` (v1) or ``0::path`` (v2). The first line that
    names a pod decides; a line that also names a container is preferred.
    ``"0::/kubepods/pod0f3a9c2e-7c1b-4d5e-9f00-1234567890ab/4c1d…\\n"`` -> that pod.
    """
    best: ContainerRef | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ref = parse_cgroup_path(parts[2])
        if ref is None:
            continue
        if ref.container_id:
            return ref
        best = best or ref
    return best


class CgroupResolver:
    """pid -> :class:`ContainerRef` by reading ``<proc_root>/<pid>/cgroup``.

    Answers are remembered for ``cache_seconds`` (a busy host-network process is asked
    about for every new socket); a PID reused by another container within that time would
    be misnamed, which is why the time is short.
    """

    def __init__(
        self,
        proc_root: str | Path = "/proc",
        *,
        cache_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = 65536,
    ) -> None:
        self.proc_root = Path(proc_root)
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._max_cached = max_cached
        self._cache: dict[int, tuple[float, ContainerRef | None]] = {}
        self._lock = threading.Lock()

    def container_of(self, pid: int) -> ContainerRef | None:
        """``None`` when the process is in no pod, is gone, or cannot be read."""
        if pid <= 0:
            return None
        now = self._clock()
        with self._lock:
            cached = self._cache.get(pid)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text()
        except (OSError, UnicodeDecodeError):
            return None
        ref = parse_cgroup_file(text)
        with self._lock:
            if len(self._cache) >= self._max_cached:
                self._cache.clear()
            self._cache[pid] = (now, ref)
        return ref

    def pod_uid_of_pid(self, pid: int) -> str | None:
        ref = self.container_of(pid)
        return ref.pod_uid if ref is not None else None

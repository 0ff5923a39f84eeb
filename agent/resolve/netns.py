"""Network namespace inode -> pod UID.

Every pod has its own network namespace (except host-network pods, which share the node's).
The kernel gives each socket's namespace inode; any process in that namespace has
``/proc/<pid>/ns/net`` pointing at the same inode, and its cgroup names the pod. A full scan
of ``/proc`` builds the whole inode -> pod map at once; it runs on a miss, at most once per
``rescan_interval`` seconds, and tolerates processes exiting mid-scan.

The kernel reuses a namespace's inode number soon after the namespace is gone (a pod
deleted, another created: the new pod's namespace often gets the old one's number). So each
remembered inode keeps the process it was found through, and a hit counts only while that
process is still in that namespace and still in that pod's cgroup; otherwise the entry is
dropped and the map rebuilt (at most once per ``rescan_interval``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.resolve.cgroups import CgroupResolver

AMBIGUOUS = ""


class NetnsResolver:
    """``pod_uid_of_netns(inode)`` -> the pod UID owning that namespace, or ``None``.

    The node's own namespace never maps to a pod: it is shared by every host-network pod and
    by the node's processes. It is ``host_netns`` if given, else that of pid 1 under
    ``proc_root``, else (pid 1 unreadable, as under some lockdowns) this process's own — the
    agent runs in the node's network namespace.
    """

    def __init__(
        self,
        proc_root: str | Path = "/proc",
        *,
        cgroups: CgroupResolver | None = None,
        rescan_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        host_netns: int | None = None,
    ) -> None:
        self.proc_root = Path(proc_root)
        self._proc_text = str(self.proc_root)
        self._host_netns = host_netns
        self.cgroups = cgroups or CgroupResolver(proc_root)
        self.rescan_interval = rescan_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._pods: dict[int, tuple[str, int]] = {}  # inode -> (pod UID, a pid in it)
        self._last_scan: float | None = None
        self.scans = 0

    def host_netns(self) -> int | None:
        if self._host_netns is None:
            self._host_netns = self._inode_of(1) or _own_netns()
        return self._host_netns

    def pod_uid_of_netns(self, inode: int) -> str | None:
        if inode <= 0 or inode == self.host_netns():
            return None  # the node's namespace: never one pod's, and not worth a scan
        with self._lock:
            uid = self._valid_entry(inode)
            if uid is None and self._scan_due():
                self._scan()
                found = self._pods.get(inode)
                uid = found[0] if found else None
        return uid or None  # AMBIGUOUS ("") -> None

    def _valid_entry(self, inode: int) -> str | None:
        """The remembered UID of ``inode`` if the process it was found through is still in
        that namespace and pod; else forgets the entry (the namespace, or the inode number,
        may now be another pod's)."""
        entry = self._pods.get(inode)
        if entry is None:
            return None
        uid, pid = entry
        if self._inode_of(pid) == inode and (
            uid == AMBIGUOUS or self.cgroups.pod_uid_of_pid(pid) == uid
        ):
            return uid
        del self._pods[inode]
        return None

    def _scan_due(self) -> bool:
        return self._last_scan is None or self._clock() - self._last_scan >= self.rescan_interval

    def _scan(self) -> None:
        self._last_scan = self._clock()
        self.scans += 1
        host = self.host_netns()
        found: dict[int, tuple[str, int]] = {}
        try:
            entries = os.listdir(self.proc_root)
        except OSError:
            return
        for entry in entries:
            if not entry.isdigit():
                continue
            pid = int(entry)
            inode = self._inode_of(pid)
            if inode is None or inode == host:
                continue
            uid = self.cgroups.pod_uid_of_pid(pid)
            if uid is None:
                continue
            known = found.get(inode)
            if known is None:
                found[inode] = (uid, pid)
            else:  # the lowest pid (a pod's first process, its sandbox) as the witness
                found[inode] = (uid if known[0] == uid else AMBIGUOUS, min(pid, known[1]))
        self._pods = found

    def _inode_of(self, pid: int) -> int | None:
        """The inode of ``<proc_root>/<pid>/ns/net`` (``None`` if the process is gone).

        The link reads ``net:[4026532281]``; fixture trees may hold a plain file with that
        text instead of the kernel's magic link.
        """
        # a text path: building a Path costs twice the readlink, and every lookup of a
        # pod's socket checks its witness process here
        path = f"{self._proc_text}/{pid}/ns/net"
        try:
            target = os.readlink(path)
        except OSError:
            if os.path.islink(path):
                return None  # the kernel's link, not ours to read (gone, or not permitted)
            try:
                with open(path, encoding="utf-8") as link_text:
                    target = link_text.read().strip()
            except (OSError, UnicodeDecodeError):
                return None
        if target.startswith("net:[") and target.endswith("]"):
            try:
                return int(target[5:-1])
            except ValueError:
                return None
        return None


def _own_netns() -> int | None:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None

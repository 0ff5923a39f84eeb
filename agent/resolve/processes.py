"""Process names by pid, read from a /proc tree (a parameter: the DaemonSet mounts the
host's at /host/proc)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path


class ProcessNames:
    """``name(1234)`` -> ``"nginx"`` (the ``comm`` of the process), None once it is gone.

    Cached (bounded, LRU): a connection's process is looked up once, not every poll. A pid
    that is gone is cached as gone too: a short-lived process's many connections (and those
    of a server that exited) cost one failed read, not one each.
    """

    def __init__(self, proc_root: Path = Path("/proc"), capacity: int = 16384) -> None:
        self._proc = proc_root
        self._capacity = capacity
        self._cache: OrderedDict[int, str | None] = OrderedDict()

    def name(self, pid: int) -> str | None:
        if pid in self._cache:
            self._cache.move_to_end(pid)
            return self._cache[pid]
        try:
            name = (self._proc / str(pid) / "comm").read_text().rstrip("\n") or None
        except (OSError, UnicodeDecodeError):
            name = None  # exited while we looked, or never visible to us
        self._cache[pid] = name
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return name

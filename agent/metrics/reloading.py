"""Noticing that configuration files changed, including a ConfigMap's symlink swap.

A Kubernetes ConfigMap volume shows ``metrics.yaml -> ..data/metrics.yaml`` with
``..data -> ..2024_05_01_10_00_00.123`` and updates by pointing ``..data`` at a new
directory in one rename. The file's own path never changes and the new file may keep the
old mtime and size, so a file is identified by its resolved target, inode, device, size
and mtime together::

    fingerprint(Path("/etc/tcpacct/metrics.yaml"))
    -> ("/etc/tcpacct/..2024_05_01_10_00_00.123/metrics.yaml", 1234, 64768, 812, 17145...)

:class:`ConfigWatcher` polls the fingerprints in a thread and calls ``on_change`` once per
change seen; the caller reloads (and keeps the old configuration if the new one is bad).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

Fingerprint = tuple[str, int, int, int, int] | None


def fingerprint(path: Path) -> Fingerprint:
    """(resolved path, inode, device, size, mtime in ns) of ``path``; None if unreadable."""
    try:
        resolved = os.path.realpath(path)
        status = os.stat(resolved)
    except OSError:
        return None
    return (resolved, status.st_ino, status.st_dev, status.st_size, status.st_mtime_ns)


class ConfigWatcher:
    """Calls ``on_change()`` from its own thread when any of ``paths`` changes.

    ``check()`` compares once and may be called directly (tests, SIGHUP handlers);
    ``start()``/``stop()`` run it every ``interval`` seconds. ``stop()`` returns as soon
    as the thread has finished its current check.
    """

    def __init__(
        self, paths: Sequence[Path], on_change: Callable[[], None], interval: float = 2.0
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.paths = tuple(Path(path) for path in paths)
        self.on_change = on_change
        self.interval = interval
        self._seen = self._fingerprints()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _fingerprints(self) -> tuple[Fingerprint, ...]:
        return tuple(fingerprint(path) for path in self.paths)

    def check(self) -> bool:
        """Compare the files with what was seen last; call ``on_change`` if they differ."""
        with self._lock:
            current = self._fingerprints()
            if current == self._seen:
                return False
            changed = [
                str(path)
                for path, old, new in zip(self.paths, self._seen, current, strict=True)
                if old != new
            ]
            self._seen = current
        log.info("configuration changed: %s", ", ".join(changed))
        try:
            self.on_change()
        except Exception:  # the watcher must outlive a failing reload
            log.exception("reloading the configuration failed")
        return True

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.check()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ConfigWatcher already started")
        self._thread = threading.Thread(target=self._run, name="config-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ConfigWatcher:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

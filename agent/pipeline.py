"""Wiring: kernel reader -> accountant (with enricher and metric definitions) -> exporter.

:class:`Agent` owns the poll loop. A poll that raises is logged, counted
(``tcpacct_poll_errors_total``) and survived: the kernel's counters are cumulative, so the
next successful poll counts everything since the last one.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.accounting import Accountant
from agent.exporter import SelfMetric
from agent.model import KernelReader, MetricCatalogue
from agent.serving import Health

log = logging.getLogger(__name__)


def _version() -> str:
    """The installed package's version (pyproject.toml), not a second copy of it."""
    try:
        return importlib.metadata.version("tcpacct")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


@dataclass
class PollStats:
    polls: int = 0
    errors: int = 0
    last_duration: float = 0.0
    total_duration: float = 0.0
    last_success: float = 0.0  # monotonic time
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})


class Agent:
    """One running agent: polls the kernel every interval and serves what it counted."""

    def __init__(
        self,
        kernel: KernelReader,
        accountant: Accountant,
        *,
        interval: float,
        catalogue_loader: Callable[[], MetricCatalogue] | None = None,
        extra_self_metrics: Callable[[], Iterable[SelfMetric]] = lambda: (),
        extra_readiness: Callable[[], Health] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kernel = kernel
        self.accountant = accountant
        self.interval = interval
        self._catalogue_loader = catalogue_loader
        self._extra_self_metrics = extra_self_metrics
        self._extra_readiness = extra_readiness
        self._clock = clock
        self.stats = PollStats()
        self._poll_lock = threading.Lock()
        self.started = clock()

    # -- the loop ------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """One poll; False (after logging and counting) if it failed."""
        with self._poll_lock:
            start = self._clock()
            try:
                self.accountant.apply(self.kernel.poll())
            except Exception:
                self.stats.errors += 1
                log.exception("poll failed; the next poll counts everything since the last one")
                return False
            finally:
                duration = self._clock() - start
                self.stats.polls += 1
                self.stats.last_duration = duration
                self.stats.total_duration += duration
            self.stats.last_success = self._clock()
            return True

    def run(self, stop: threading.Event) -> None:
        """Poll at every interval until ``stop`` is set (then poll once more)."""
        self.poll_once()
        next_at = self._clock() + self.interval
        while not stop.wait(max(0.0, next_at - self._clock())):
            self.poll_once()
            next_at += self.interval
            if next_at < self._clock():  # fell behind (suspend, slow poll): no burst
                next_at = self._clock() + self.interval

    # -- reload ----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read metric definitions; a bad config is refused and the old one kept."""
        if self._catalogue_loader is None:
            return True
        try:
            catalogue = self._catalogue_loader()
        except Exception as error:
            self.stats.reloads["failure"] += 1
            log.error("config reload refused, keeping the running definitions: %s", error)
            return False
        with self._poll_lock:
            self.accountant.replace_catalogue(catalogue)
        self.stats.reloads["success"] += 1
        log.info("config reloaded")
        return True

    # -- health ----------------------------------------------------------------------------
    def liveness(self) -> Health:
        stale_after = max(60.0, 6 * self.interval)
        last = self.stats.last_success or self.started
        if self._clock() - last > stale_after:
            return Health(False, f"no successful poll for {self._clock() - last:.0f} s")
        return Health(True, "ok")

    def readiness(self) -> Health:
        if not self.stats.last_success:
            return Health(False, "waiting for the first poll")
        if self._extra_readiness is not None:
            return self._extra_readiness()
        return Health(True, "ready")

    # -- self-metrics ----------------------------------------------------------------------
    def self_metrics(self) -> list[SelfMetric]:
        acc = self.accountant.stats()
        usage = self.kernel.map_usage()
        s = self.stats
        metrics = [
            SelfMetric(
                "tcpacct_build_info", "tcpacct version", "gauge", [({"version": VERSION}, 1)]
            ),
            SelfMetric(
                "tcpacct_backend_info",
                "Kernel backend counting bytes (tracepoint, fentry or kprobe)",
                "gauge",
                [({"backend": self.kernel.backend}, 1)],
            ),
            SelfMetric(
                "tcpacct_map_entries",
                "Entries in a BPF map: socks at the last poll; closed, the most one drain "
                "of it found",
                "gauge",
                [({"map": name}, used) for name, (used, _) in usage.items()],
            ),
            SelfMetric(
                "tcpacct_map_capacity",
                "Capacity of a BPF map",
                "gauge",
                [({"map": name}, cap) for name, (_, cap) in usage.items()],
            ),
            SelfMetric(
                "tcpacct_unattributed_bytes_total",
                "Bytes counted in the kernel that could not be attributed to a connection "
                "(socket map full, closed map full, or a finished socket no naming could "
                "name); direction is the local application's",
                "counter",
                [
                    ({"direction": "sent"}, acc.unattributed_sent_bytes),
                    ({"direction": "received"}, acc.unattributed_received_bytes),
                ],
            ),
            SelfMetric(
                "tcpacct_untracked_sockets_total",
                "Sockets the kernel could not track because the socket map was full",
                "counter",
                [({}, acc.untracked_sockets)],
            ),
            SelfMetric(
                "tcpacct_spilled_sockets_total",
                "Closed sockets whose final counts found the closed map full",
                "counter",
                [({}, acc.spilled_sockets)],
            ),
            SelfMetric(
                "tcpacct_lifecycle_events_missed_total",
                "Socket state changes and destroys the kernel ran no tcpacct program for (one "
                "landing at the edge of a lifecycle program already running on its CPU); a "
                "connection's open or close may be missing from the totals",
                "counter",
                [({}, acc.lifecycle_events_missed)],
            ),
            SelfMetric(
                "tcpacct_tracked_sockets",
                "Sockets being accounted",
                "gauge",
                [({}, acc.tracked_sockets)],
            ),
            SelfMetric(
                "tcpacct_held_back_sockets",
                "Sockets whose bytes wait for their peer or pod to be known",
                "gauge",
                [({}, acc.held_back_sockets)],
            ),
            SelfMetric(
                "tcpacct_series", "Connection metric series exported", "gauge", [({}, acc.series)]
            ),
            SelfMetric(
                "tcpacct_polls_total", "Polls of the kernel maps", "counter", [({}, s.polls)]
            ),
            SelfMetric(
                "tcpacct_poll_errors_total",
                "Polls that failed (and were survived)",
                "counter",
                [({}, s.errors)],
            ),
            SelfMetric(
                "tcpacct_poll_duration_seconds",
                "Duration of the last poll",
                "gauge",
                [({}, s.last_duration)],
            ),
            SelfMetric(
                "tcpacct_poll_seconds_total",
                "Time spent polling",
                "counter",
                [({}, s.total_duration)],
            ),
            SelfMetric(
                "tcpacct_config_reloads_total",
                "Metric config reloads by result",
                "counter",
                [({"result": k}, v) for k, v in s.reloads.items()],
            ),
        ]
        metrics.extend(self._extra_self_metrics())
        return metrics

"""The agent under test, in its own process: ``python -m bench.probe [options]``.

It attaches the kernel side (``open_tracer``), folds every poll into a real
:class:`agent.accounting.Accountant` (built-in metrics, local-mode enricher) and, unless
``--interval 0``, polls from a background thread every interval and drains finished
sockets' records from the kernel every ``--drain`` seconds (0.25, as the agent's
``KernelTracer.start_draining``) from another, as the agent does. Being a
separate process, its polling competes with the workload for CPUs as the real agent would,
never for the workload's interpreter lock.

It speaks JSON lines: one command per line on stdin, one answer per line on stdout. After
attaching it prints ``{"ready": true, "backend": "tracepoint", "attach_s": 0.98, ...}``.
Its threads run at the agent's niceness (``--nice``, default ``tcpacct run``'s: 10), so
that its polls compete with a workload as the agent's would.

=================================== ===========================================================
command                             answer
=================================== ===========================================================
``{"cmd": "watch", "ports": [P]}``  keep the last sample of every socket with local or remote
                                    port P (``"all"``: every socket) in the accuracy ledger
``{"cmd": "poll"}``                 one poll now: ``{"poll_cpu_s", "apply_cpu_s", "wall_s",
                                    "live", "finished", "rss_kib"}`` (``"profile": N`` adds the
                                    N hottest functions by cProfile)
``{"cmd": "settle", "polls": 5}``   that many polls in a row (held-back sockets get named);
                                    with ``"ports": [P]`` first until every socket seen on
                                    those ports has finished (a FIN the loopback backlog
                                    dropped is resent after 200 ms+), at most 5 s
``{"cmd": "report", "ports": [P]}`` ledger sockets and accountant totals for those ports
                                    (since the last ``"mark": true`` report: a workload's
                                    server port may be one an earlier workload used)
``{"cmd": "stats"}``                poller thread's CPU per poll, the errors it survived, RSS
``{"cmd": "detach"}``               detach every hook (programs stay loaded, maps kept) and
                                    pause the poller: the data path as with no agent
``{"cmd": "attach"}``               attach again (lifecycle hooks first) and resume polling;
                                    ``"accounting": false``: the poller only empties the
                                    ``changed`` map and closed records (hooks-only
                                    rounds); ``"without": ["inet_sock_set_state"]``: those
                                    tracepoints' hooks (or those programs) stay detached
                                    (a design variant)
``{"cmd": "run_time_stats",``       the kernel's per-program run time on or off (BPF_ENABLE_STATS;
``"on": true}``                     off again at quit)
``{"cmd": "program_stats"}``        ``{"programs": {"on_send": {"run_ns", "runs",
                                    "recursion_misses"}, ...}}``, the kernel's counters
``{"cmd": "quit"}``                 detach, answer ``{"ok": true}``, exit
=================================== ===========================================================
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.accounting import Accountant
from agent.collecting import tune_for_polling
from agent.ebpf.syscalls import enable_run_time_stats
from agent.ebpf.tracing import DRAIN_PERIOD, Capacities, KernelTracer, open_tracer
from agent.enrich.local import LocalEnricher
from agent.metrics.catalogue import load_catalogue
from agent.model import KernelPoll, SocketFlag, SocketSample
from agent.priority import yield_cpu
from agent.resolve.listening import listening_sockets
from agent.resolve.processes import ProcessNames
from agent.settings import Settings

SERVICE_LABEL = "destination_service"
log = logging.getLogger("bench.probe")


STATUS_FIELDS = {
    "VmRSS:": "rss_kib",
    "VmHWM:": "hwm_kib",
    "RssAnon:": "rss_anon_kib",
    "RssFile:": "rss_file_kib",
}


def memory_kib(status: Path = Path("/proc/self/status")) -> dict[str, int]:
    """Resident memory from /proc/<pid>/status.

    ``"VmRSS:\\t  51234 kB"`` -> ``{"rss_kib": 51234, ...}``; also ``hwm_kib`` (peak),
    ``rss_anon_kib`` (heap, the agent's own data) and ``rss_file_kib`` (mapped files: the
    interpreter's libraries; libbcc's LLVM only on the fentry/kprobe backends).
    """
    out = dict.fromkeys(STATUS_FIELDS.values(), 0)
    for line in status.read_text().splitlines():
        name = STATUS_FIELDS.get(line.split(None, 1)[0] if line else "")
        if name is not None:
            out[name] = int(line.split()[1])
    return out


def sample_record(sample: SocketSample) -> dict[str, Any]:
    return {
        "socket_id": sample.socket_id,
        "local": [sample.local.address, sample.local.port],
        "remote": [sample.remote.address, sample.remote.port],
        "role": sample.role.name.lower(),
        "flags": int(sample.flags),
        "sent": sample.sent_bytes,
        "received": sample.received_bytes,
        "pid": sample.pid,
    }


class ProbedAgent:
    """Tracer + accountant + optional poller and drainer threads, with per-poll CPU
    accounting."""

    def __init__(
        self,
        tracer: KernelTracer,
        accountant: Accountant,
        interval: float,
        drain_period: float = DRAIN_PERIOD,
    ) -> None:
        self.tracer = tracer
        self.accountant = accountant
        self.interval = interval
        self.drain_period = drain_period
        self.drainer: threading.Thread | None = None
        self._drain_cpu = 0.0  # the drainer's thread CPU since the poller last took it
        self._drain_cpu_lock = threading.Lock()
        self.lock = threading.Lock()
        self.attached = threading.Event()
        self.attached.set()
        self.accounting = True  # False: hooks-only rounds (see discard_raw)
        self.watched: set[int] | None = set()  # None: every socket
        self.ledger: dict[int, SocketSample] = {}
        # accountant totals (service, metric, reporter) when the last round began
        self.marked: dict[tuple[str, str, str], int] = {}
        self.poller_cpu: list[float] = []
        self.poller_errors: list[str] = []  # what the poller thread survived (stats)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.stats_fd: int | None = None  # while the kernel's run-time statistics are on

    def start_poller(self) -> None:
        if self.interval > 0:
            self.thread = threading.Thread(target=self._poll_forever, daemon=True)
            self.thread.start()
            if self.drain_period > 0:
                self.drainer = threading.Thread(target=self._drain_forever, daemon=True)
                self.drainer.start()

    def _drain_forever(self) -> None:
        """As the agent's drainer: every drain period the finished sockets' records leave
        the kernel's closed records (decoded and kept for the next poll; in hooks-only rounds
        thrown away raw). Its thread CPU counts in the next periodic poll's; an error is
        kept in ``poller_errors`` as the poller's are."""
        while not self.stop.wait(self.drain_period):
            with self.lock:
                attached, accounting = self.attached.is_set(), self.accounting
            if not attached:
                continue
            cpu = time.thread_time()
            try:
                if accounting:
                    self.tracer.drain()
                else:
                    self.discard_closed()
            except Exception as error:
                log.exception("drain failed")
                self.poller_errors.append(f"drain: {type(error).__name__}: {error}")
            with self._drain_cpu_lock:
                self._drain_cpu += time.thread_time() - cpu

    def _take_drain_cpu(self) -> float:
        with self._drain_cpu_lock:
            taken, self._drain_cpu = self._drain_cpu, 0.0
        return taken

    def _poll_forever(self) -> None:
        """Poll every interval. A poll that raises is logged and kept in ``poller_errors``
        (the accuracy checks read them), and the thread goes on as the agent's would: a
        poller that died silently would leave later rounds without periodic polls."""
        while not self.stop.wait(self.interval):
            if not self.attached.is_set():
                continue
            try:
                if not self.accounting:
                    self.discard_raw()
                    continue
                result = self.poll()
            except Exception as error:
                log.exception("poll failed")
                self.poller_errors.append(f"{type(error).__name__}: {error}")
                continue
            drained = self._take_drain_cpu()
            self.poller_cpu.append(result["poll_cpu_s"] + result["apply_cpu_s"] + drained)

    def discard_raw(self) -> None:
        """Hooks-only rounds: empty the ``changed`` map and closed records as a poll does, without
        decoding or accounting what they hold, so the kernel side runs exactly as with the
        agent while no user-space work competes with the workload. (The tracer's own
        readers, used from here on purpose: this is the benchmark's probe.)"""
        tracer = self.tracer
        with self.lock, tracer._lock:
            tracer._next_round()
            tracer._changes.read(delete=True)
            tracer._changes.release()
            tracer._finished.take()
            tracer._finished.release()

    def discard_closed(self) -> None:
        """Hooks-only rounds' drain: empty the closed records without decoding them."""
        tracer = self.tracer
        with self.lock, tracer._lock:
            tracer._finished.take()
            tracer._finished.release()

    def _record(self, poll: KernelPoll) -> None:
        watched, ledger = self.watched, self.ledger
        if watched is None:
            for sample in (*poll.live, *poll.finished):
                ledger[sample.socket_id] = sample
            return
        if not watched:
            return
        for sample in (*poll.live, *poll.finished):
            if sample.local.port in watched or sample.remote.port in watched:
                ledger[sample.socket_id] = sample

    def poll(self, profile: int = 0) -> dict[str, Any]:
        with self.lock:
            profiler = cProfile.Profile() if profile else None
            wall = time.perf_counter()
            if profiler:
                profiler.enable()
            cpu0 = time.thread_time()
            result = self.tracer.poll()
            cpu1 = time.thread_time()
            self.accountant.apply(result)
            cpu2 = time.thread_time()
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - wall
            self._record(result)
        answer: dict[str, Any] = {
            "poll_cpu_s": cpu1 - cpu0,
            "apply_cpu_s": cpu2 - cpu1,
            "wall_s": wall,
            "live": len(result.live),
            "finished": len(result.finished),
            **memory_kib(),
        }
        if profiler:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile)
            answer["profile"] = text.getvalue()
        return answer

    def wait_finished(self, ports: set[int], timeout: float) -> None:
        """Poll every 50 ms until no socket of the ledger on ``ports`` is still open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            with self.lock:
                open_ = [
                    s
                    for s in self.ledger.values()
                    if (s.local.port in ports or s.remote.port in ports)
                    and not s.flags & SocketFlag.DESTROYED
                ]
            if not open_:
                return
            time.sleep(0.05)

    def report(self, ports: set[int], mark: bool = False) -> dict[str, Any]:
        """Ledger sockets on ``ports`` (forgotten once reported) and the accountant's totals
        for services ``127.0.0.1:<port>``, less what they were at the last ``mark`` (a
        listener's ephemeral port can be one an earlier workload's server had: its series
        already holds that workload's counts). ``mark``: remember every total now."""
        with self.lock:
            if mark:
                self.marked = self._service_totals(None)
            reported = [
                s for s in self.ledger.values() if s.local.port in ports or s.remote.port in ports
            ]
            for sample in reported:
                del self.ledger[sample.socket_id]
            sockets = [sample_record(s) for s in reported]
            services: dict[str, dict[str, dict[str, int]]] = {}
            for (service, name, reporter), value in self._service_totals(ports).items():
                metric = services.setdefault(service, {}).setdefault(name, {})
                metric[reporter] = value - self.marked.get((service, name, reporter), 0)
            stats = self.accountant.stats()
        return {
            "sockets": sockets,
            "services": services,
            "unattributed": [stats.unattributed_sent_bytes, stats.unattributed_received_bytes],
            "lifecycle_events_missed": stats.lifecycle_events_missed,
        }

    def _service_totals(self, ports: set[int] | None) -> dict[tuple[str, str, str], int]:
        """The accountant's totals by (service, metric, reporter), of services on ``ports``
        (None: all), summed over the other labels."""
        totals: dict[tuple[str, str, str], int] = {}
        for family in self.accountant.families():
            if SERVICE_LABEL not in family.label_names:
                continue
            at = family.label_names.index(SERVICE_LABEL)
            by_reporter = family.label_names.index("reporter")
            for labels, value in family.samples.items():
                port = labels[at].rsplit(":", 1)[-1]
                if ports is not None and (not port.isdigit() or int(port) not in ports):
                    continue
                key = (labels[at], family.name, labels[by_reporter])
                totals[key] = totals.get(key, 0) + value
        return totals

    def detach(self) -> None:
        """Detach every hook; the BPF programs and maps stay loaded."""
        with self.lock:
            if not self.attached.is_set():
                return
            self.tracer.detach_hooks()
            self.attached.clear()

    def attach(self, accounting: bool = True, without: tuple[str, ...] = ()) -> None:
        """Attach the hooks (but those on ``without``'s tracepoints or of its programs; only
        when detached before); with ``accounting`` False the poller only empties the maps."""
        with self.lock:
            if accounting and not self.accounting:
                # what hooks-only rounds threw away: read the whole socket map next poll
                self.tracer._seen_lost = -1
            self.accounting = accounting
            if self.attached.is_set():
                return
            self.tracer.attach_hooks(without)
            self.attached.set()

    def run_time_stats(self, on: bool) -> None:
        """The kernel's per-program run time on (``on``) or off; off again at close."""
        if on and self.stats_fd is None:
            self.stats_fd = enable_run_time_stats()
        elif not on and self.stats_fd is not None:
            os.close(self.stats_fd)
            self.stats_fd = None

    def program_stats(self) -> dict[str, dict[str, int]]:
        """``{"on_send": {"run_ns": 2750000, "runs": 20000, "recursion_misses": 0}, ...}``"""
        return {
            name: {
                "run_ns": stats.run_ns,
                "runs": stats.runs,
                "recursion_misses": stats.recursion_misses,
            }
            for name, stats in self.tracer.program_stats().items()
        }

    def close(self) -> None:
        self.run_time_stats(False)
        self.stop.set()
        for thread in (self.thread, self.drainer):
            if thread is not None:
                thread.join(timeout=30)
        self.tracer.close()


def _answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve(agent: ProbedAgent) -> None:
    for line in sys.stdin:
        command = json.loads(line)
        name = command.get("cmd")
        if name == "watch":
            with agent.lock:
                if command["ports"] == "all":
                    agent.watched = None
                elif agent.watched is not None:
                    agent.watched |= set(command["ports"])
            _answer({"ok": True})
        elif name == "poll":
            _answer(agent.poll(profile=int(command.get("profile", 0))))
        elif name == "settle":
            if command.get("ports"):
                agent.wait_finished(set(command["ports"]), timeout=5.0)
            for _ in range(int(command.get("polls", 5))):
                agent.poll()
            _answer({"ok": True})
        elif name == "report":
            _answer(agent.report(set(command["ports"]), bool(command.get("mark"))))
        elif name == "stats":
            _answer({
                "poller_cpu_s": agent.poller_cpu, "poller_errors": agent.poller_errors,
                **memory_kib(),
            })  # fmt: skip
        elif name == "run_time_stats":
            agent.run_time_stats(bool(command["on"]))
            _answer({"ok": True})
        elif name == "program_stats":
            _answer({"programs": agent.program_stats()})
        elif name == "detach":
            agent.detach()
            _answer({"ok": True})
        elif name == "attach":
            agent.attach(
                accounting=bool(command.get("accounting", True)),
                without=tuple(command.get("without", ())),
            )
            _answer({"ok": True})
        elif name == "quit":
            break
        else:
            _answer({"error": f"unknown command {name!r}"})
    agent.close()
    _answer({"ok": True})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe")
    parser.add_argument("--backend", default="tracepoint")
    parser.add_argument("--sockets", type=int, default=65536)
    parser.add_argument("--closed", type=int, default=65536)
    parser.add_argument("--interval", type=float, default=1.0, help="0: no poller thread")
    parser.add_argument(
        "--drain", type=float, default=DRAIN_PERIOD, help="seconds; 0: no drainer thread"
    )
    parser.add_argument(
        "--nice", type=int, default=Settings().nice, help="as tcpacct run's (agent.priority)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    start = time.perf_counter()
    tracer = open_tracer(
        args.backend,
        capacities=Capacities(sockets=args.sockets, closed=args.closed),
        listeners=listening_sockets,
    )
    attach_s = time.perf_counter() - start
    tracer.poll()  # what was in the closed records before us is not ours to count
    accountant = Accountant(load_catalogue([]), LocalEnricher(ProcessNames().name))
    tune_for_polling()  # as the agent does once it is assembled
    agent = ProbedAgent(tracer, accountant, args.interval, args.drain)
    agent.start_poller()
    yield_cpu(args.nice)  # as the agent does once its threads are started
    _answer({
        "ready": True, "backend": tracer.backend, "attach_s": attach_s, "nice": args.nice,
        **memory_kib(),
    })  # fmt: skip
    serve(agent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Figure 3 (part): ``/metrics`` scrape time with ~10k series, and time from start to ready.

The scrape figure uses the real accountant, exporter and HTTP server, fed a synthetic poll:
2,500 client sockets of 2,500 differently named local processes to 2,500 remote addresses in
198.18.0.0/15 (never contacted: nothing is sent anywhere) -> 4 built-in metrics x 2,500 =
10,000 series. The start-to-ready figure runs ``tcpacct run`` itself and polls ``/readyz``.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from agent.accounting import Accountant
from agent.enrich.local import LocalEnricher
from agent.exporter import TcpacctCollector, encode_text
from agent.metrics.catalogue import load_catalogue
from agent.model import (
    Endpoint,
    KernelCounters,
    KernelPoll,
    Role,
    SocketFlag,
    SocketSample,
)
from agent.serving import Health, MetricsServer
from bench.figures import Figure, Target
from bench.probe import memory_kib
from bench.stats import summarise
from bench.workloads import free_port

ROOT = Path(__file__).resolve().parents[1]
TCPACCT = ROOT / ".venv" / "bin" / "tcpacct"
READY_TARGET = Target("value", "<=", 1.0, "ready <= 1 s (without Kubernetes sync)")
RSS_TARGET = Target("value", "<=", 150, "<= 150 MiB RSS")


def synthetic_poll(connections: int) -> KernelPoll:
    """``connections`` client sockets, each of its own process (pid 10000+i) to its own
    remote address: ``i = 0`` -> 198.18.0.1:80 from 127.0.0.1:20000."""
    samples = []
    for i in range(connections):
        remote = f"198.18.{(i + 1) // 256}.{(i + 1) % 256}"
        samples.append(
            SocketSample(
                socket_id=i + 1,
                sent_bytes=1000 + i,
                received_bytes=2000 + i,
                local=Endpoint("127.0.0.1", 20000 + i % 40000),
                remote=Endpoint(remote, 80),
                role=Role.CLIENT,
                flags=SocketFlag.OPENED,
                pid=10000 + i,
                comm=f"app-{i}",
            )
        )
    return KernelPoll(KernelCounters(), tuple(samples), ())


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def measure_scrape(connections: int = 2_500, scrapes: int = 20) -> list[Figure]:
    accountant = Accountant(load_catalogue([]), LocalEnricher(lambda pid: f"app-{pid}"))
    accountant.apply(synthetic_poll(connections))
    series = accountant.stats().series
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TcpacctCollector(accountant))
    server = MetricsServer(
        "127.0.0.1",
        0,
        registry,
        live=lambda: Health(True, "ok"),
        ready=lambda: Health(True, "ready"),
    )
    server.start()
    walls, encodes, size = [], [], 0
    try:
        for _ in range(scrapes):
            start = time.perf_counter()
            status, body = _get(server.port, "/metrics", timeout=60)
            walls.append(1000 * (time.perf_counter() - start))
            if status != 200:
                raise RuntimeError(f"/metrics answered {status}")
            size = len(body)
        for _ in range(5):
            cpu = time.thread_time()
            encode_text(registry)
            encodes.append(1000 * (time.thread_time() - cpu))
    finally:
        server.close()
    return [
        Figure(
            key="cost.scrape_ms.series_10k",
            title=f"/metrics scrape, {series} series",
            unit="ms",
            method=f"GET /metrics from the agent's own HTTP server over loopback, {scrapes} "
            f"scrapes; {connections} synthetic connections through the real accountant "
            "(local-mode names, built-in metrics).",
            value=summarise(walls),
            details={
                "series": series,
                "body_bytes": size,
                "encode_cpu_ms": summarise(encodes).as_dict(),
            },
        )
    ]


def _start_once(timeout: float = 60.0, compile_cache: Path | None = None) -> dict[str, float]:
    port = free_port()
    command = [str(TCPACCT), "run", "--interval", "1", "--listen", f"127.0.0.1:{port}"]
    command += ["--backend", "tracepoint", "--log-level", "warning"]
    if compile_cache is not None:
        command += ["--compile-cache", str(compile_cache)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listening = attached = ready = None
    try:
        deadline = start + timeout
        while time.perf_counter() < deadline and process.poll() is None:
            try:
                status, body = _get(port, "/readyz", timeout=2)
            except OSError:
                time.sleep(0.01)
                continue
            now = time.perf_counter() - start
            listening = listening or now
            if b"first poll" in body:  # BPF attached, the first poll under way
                attached = attached or now
            if status == 200:
                ready = now
                break
            time.sleep(0.01)
        if ready is None:
            raise RuntimeError("tcpacct run did not become ready")
        time.sleep(2.0)  # a couple of polls
        memory = memory_kib(Path(f"/proc/{process.pid}/status"))
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
    return {
        "ready_s": ready,
        "http_s": listening or ready,
        "attached_s": attached or ready,
        "rss_mib": memory["rss_kib"] / 1024,
        "rss_anon_mib": memory["rss_anon_kib"] / 1024,
        "rss_file_mib": memory["rss_file_kib"] / 1024,
    }


def measure_startup(rounds: int = 5) -> list[Figure]:
    colds = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="tcpacct-bench-cache-") as empty:
            colds.append(_start_once(compile_cache=Path(empty)))
    runs = [_start_once() for _ in range(rounds)]  # the first fills the default cache
    warm = runs[1:] or runs
    return [
        Figure(
            key="cost.ready_s",
            title="tcpacct run: start to ready (compiled program in the cache)",
            unit="s",
            method=f"{len(warm)} starts of `tcpacct run --interval 1 --backend tracepoint` with "
            "the compiled program already in the compile cache (every start but a node's "
            "first, or the first after an upgrade); time from spawning the process to the "
            "first 200 from /readyz (polled every 10 ms), which needs the BPF program loaded "
            "and attached and one poll done.",
            value=summarise([r["ready_s"] for r in warm]),
            target=READY_TARGET,
            details={
                "http_answering_s": [r["http_s"] for r in warm],
                "attached_s": [r["attached_s"] for r in warm],
            },
            note="Phases: interpreter start and imports until /readyz answers "
            "(http_answering_s), then loading and attaching the BPF program (attached_s), "
            "then the first poll.",
        ),
        Figure(
            key="cost.ready_s.cold_cache",
            title="tcpacct run: start to ready, compiling first (empty compile cache)",
            unit="s",
            method=f"{rounds} starts as above, each with an empty --compile-cache: the "
            "program is compiled by the child process (bcc, LLVM) before loading.",
            value=summarise([r["ready_s"] for r in colds]),
            details={
                "http_answering_s": [r["http_s"] for r in colds],
                "attached_s": [r["attached_s"] for r in colds],
            },
        ),
        Figure(
            key="cost.rss_mib.idle_agent",
            title="tcpacct run RSS, idle host",
            unit="MiB",
            method="VmRSS of `tcpacct run` 2 s after ready (RssAnon: its own heap; "
            "RssFile: mapped files).",
            value=summarise([r["rss_mib"] for r in runs]),
            target=RSS_TARGET,
            details={
                "rss_anon_mib": [r["rss_anon_mib"] for r in runs],
                "rss_file_mib": [r["rss_file_mib"] for r in runs],
            },
        ),
    ]

"""Load held, faults survived: every figure here is exact at the end (README's table).

- churn at the most this machine sustains, with /metrics scraped every 100 ms by 3 clients;
- 100,000 live sockets at once (50,000 connections held by several processes: this
  sandbox's hard descriptor limit is 20,000 per process);
- the socket map and the closed map at and past capacity: unattributed bytes counted
  exactly, sockets tracked again once room frees;
- SIGKILL of the agent while traffic flows: nothing left attached, the restarted agent counts
  from its start;
- a broken config reloaded mid-traffic: refused, counted, the old one keeps counting;
- the agent exits non-zero with a clear message only when it cannot run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from agent.ebpf.tracing import Capacities
from tests.privileged.test_agent_process import (
    TCPACCT,
    bpf_program_ids,
    free_port,
    metric_sum,
    programs_of,
    scrape,
    wait_ready,
)
from tests.support.harness import (
    CLOSED,
    OPENED,
    RECEIVED,
    SENT,
    Harness,
    connect_pair,
    exchange,
    listener,
    open_test_tracer,
    service_of,
)

CHURN_SOURCE = Path(__file__).resolve().parents[1] / "support" / "churn.c"
CHURN_SECONDS = float(os.environ.get("TCPACCT_CHURN_SECONDS", "60"))
# One churn process per core but one: the agent must keep up on the core left (with two on
# this 2-vCPU machine, 13,000 connections/s outran the agent's accounting, which then caught
# up only long after the traffic stopped).
CHURN_PROCESSES = max(1, (os.cpu_count() or 2) - 1)


@pytest.fixture(scope="session")
def churn(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("churn") / "churn"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(CHURN_SOURCE)], check=True)
    return binary


def start_agent(backend: str, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(TCPACCT),
            "run",
            "--interval",
            "1",
            "--listen",
            f"127.0.0.1:{port}",
            "--backend",
            backend,
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_ready(port, process)
    return process, port


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Scrapers:
    """Several clients scraping /metrics every 100 ms; counts successes and failures."""

    def __init__(self, port: int, clients: int = 3) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                scrape(self.port)
                self.ok += 1
            except OSError as error:
                self.failed.append(str(error))

    def __enter__(self) -> Scrapers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def wait_for(predicate, timeout: float = 30.0, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def test_churn_with_scrapes_every_100ms_is_exact(backend, churn):
    """Churn processes (all cores but one) against the agent, for CHURN_SECONDS."""
    agent, port = start_agent(backend)
    try:
        with Scrapers(port) as scrapers:
            workers = [
                subprocess.Popen(
                    [str(churn), str(CHURN_SECONDS), "100", "300"],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(CHURN_PROCESSES)
            ]
            results = [json.loads(w.communicate(timeout=CHURN_SECONDS + 60)[0]) for w in workers]
            assert all(w.returncode == 0 for w in workers)

            def settled() -> bool:
                text = scrape(port)
                return all(
                    metric_sum(
                        text, CLOSED, destination_service=f"127.0.0.1:{r['port']}", reporter=rep
                    )
                    == r["connections"]
                    for r in results
                    for rep in ("source", "destination")
                )

            if not wait_for(settled, timeout=CHURN_SECONDS * 2):
                text = scrape(port)
                seen = {
                    (r["port"], rep, metric): metric_sum(
                        text, metric, destination_service=f"127.0.0.1:{r['port']}", reporter=rep
                    )
                    for r in results
                    for rep in ("source", "destination")
                    for metric in (OPENED, CLOSED, RECEIVED, SENT)
                }
                stats = {
                    name: metric_sum(text, name)
                    for name in (
                        "tcpacct_unattributed_bytes_total",
                        "tcpacct_held_back_sockets",
                        "tcpacct_tracked_sockets",
                        "tcpacct_spilled_sockets_total",
                        "tcpacct_untracked_sockets_total",
                        "tcpacct_poll_errors_total",
                    )
                }
                raise AssertionError(f"closes not all counted in time: {results} {seen} {stats}")
        text = scrape(port)
        total = sum(r["connections"] for r in results)
        print(
            f"churn: {total} connections in {CHURN_SECONDS:g} s = "
            f"{total / CHURN_SECONDS:.0f}/s; {scrapers.ok} scrapes"
        )
        for result in results:
            service = f"127.0.0.1:{result['port']}"
            for reporter in ("source", "destination"):
                labels = {"destination_service": service, "reporter": reporter}
                assert metric_sum(text, RECEIVED, **labels) == result["request_bytes"]
                assert metric_sum(text, SENT, **labels) == result["response_bytes"]
                assert metric_sum(text, OPENED, **labels) == result["connections"]
                assert metric_sum(text, CLOSED, **labels) == result["connections"]
        assert metric_sum(text, "tcpacct_unattributed_bytes_total") == 0
        assert metric_sum(text, "tcpacct_poll_errors_total") == 0
        assert not scrapers.failed
        assert scrapers.ok > 10 * CHURN_SECONDS
    finally:
        stop(agent)


def test_hundred_thousand_live_sockets(backend, churn):
    """50,000 connections held open at once: 100,000 sockets, every byte attributed."""
    per_process, processes = 8_500, 6  # 51,000 connections, 102,000 sockets
    tracer = open_test_tracer(backend, Capacities(sockets=262_144, closed=262_144))
    holders = []
    try:
        harness = Harness(tracer)
        for _ in range(processes):
            holder = subprocess.Popen(
                [str(churn), "--hold", str(per_process), "7", "11"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(holder)
        held = [json.loads(h.stdout.readline()) for h in holders]
        harness.poll(3)
        live = [
            s
            for s in harness.last_samples
            if s.local.port in {p for h in held for p in h["ports"]}
            or s.remote.port in {p for h in held for p in h["ports"]}
        ]
        assert len(live) == 2 * per_process * processes
        for reporter in ("source", "destination"):
            received = sum(
                harness.total(RECEIVED, destination_service=f"127.0.0.1:{port}", reporter=reporter)
                for h in held
                for port in h["ports"]
            )
            sent = sum(
                harness.total(SENT, destination_service=f"127.0.0.1:{port}", reporter=reporter)
                for h in held
                for port in h["ports"]
            )
            assert received == 7 * per_process * processes
            assert sent == 11 * per_process * processes
        stats = harness.accountant.stats()
        assert stats.unattributed_sent_bytes == stats.unattributed_received_bytes == 0
        assert tracer.map_usage()["socks"][0] >= 2 * per_process * processes
    finally:
        for holder in holders:
            holder.stdin.close()
            holder.wait(timeout=60)
        tracer.close()


def test_full_socket_map_counts_unattributed_and_tracks_again_when_room_frees(backend):
    capacity = 64
    tracer = open_test_tracer(backend, Capacities(sockets=capacity, closed=4096))
    try:
        harness = Harness(tracer)
        occupied = tracer.map_usage()["socks"][0]
        pairs = []
        with listener() as lsock:
            for _ in range(60):  # 120 sockets for at most `capacity` entries
                client, server = connect_pair(lsock)
                exchange(client, server, 1000, 3000)
                pairs.append((client, server))
            harness.poll()
            service = service_of(lsock.getsockname())
            counted_received = harness.total(RECEIVED, destination_service=service)
            counted_sent = harness.total(SENT, destination_service=service)
            stats = harness.accountant.stats()
            assert stats.untracked_sockets > 0
            # Every socket wrote and read 1000 + 3000 bytes; each byte is either on a tracked
            # socket's series or unattributed (the machine is otherwise quiet in CI).
            assert (
                counted_received
                + counted_sent
                + stats.unattributed_sent_bytes
                + stats.unattributed_received_bytes
                == 120 * (1000 + 3000)
            )
            assert counted_received // 1000 <= capacity - occupied
            for client, server in pairs:
                client.close()
                server.close()
            harness.settle()
            # room freed: new connections are tracked again
            client, server = connect_pair(lsock)
            exchange(client, server, 555, 666)
            harness.poll()
            assert harness.total(RECEIVED, destination_service=service, reporter="source") >= 555
            client.close()
            server.close()
    finally:
        tracer.close()


def test_full_closed_map_spills_exactly(backend):
    """More sockets finish between two polls than the closed map holds."""
    tracer = open_test_tracer(backend, Capacities(sockets=65536, closed=16))
    try:
        harness = Harness(tracer)
        with listener() as lsock:
            service = service_of(lsock.getsockname())
            pairs = [connect_pair(lsock) for _ in range(40)]
            for client, server in pairs:
                exchange(client, server, 100, 10)
            harness.poll()  # all 80 sockets seen once, 100 + 10 bytes each way counted
            for client, server in pairs:
                exchange(client, server, 1, 2)  # bytes the accountant has not seen yet
                client.close()
                server.close()
            time.sleep(0.2)
            harness.settle()
        stats = harness.accountant.stats()
        assert stats.spilled_sockets > 0
        counted = sum(harness.total(m, destination_service=service) for m in (RECEIVED, SENT))
        unattributed = stats.unattributed_sent_bytes + stats.unattributed_received_bytes
        # 80 sockets each wrote 101 or 12 and read the other. Bytes seen at the first poll
        # are counted for all; the last 1 + 2 of a spilled socket are unattributed (the closed
        # map is machine-wide: other sockets may spill too, hence ">=").
        seen_first, everything = 40 * (100 + 10) * 2, 40 * (101 + 12) * 2
        assert seen_first <= counted < everything
        assert (counted - seen_first) % 3 == 0  # whole sockets' late bytes
        assert counted + unattributed >= everything
        assert harness.total(CLOSED, destination_service=service) == 80
    finally:
        tracer.close()


def test_sigkill_leaves_nothing_attached_and_a_restart_counts_from_its_start(backend, churn):
    agent, port = start_agent(backend)
    mine = programs_of(agent.pid)
    assert len(mine) >= 4
    traffic = subprocess.Popen([str(churn), "4", "10", "10"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=10)
    traffic.communicate(timeout=30)
    assert wait_for(lambda: not (mine & bpf_program_ids()), timeout=10), (
        "programs left attached after SIGKILL"
    )
    agent, port = start_agent(backend)
    try:
        with listener() as lsock:
            client, server = connect_pair(lsock)
            exchange(client, server, 4242, 2424)
            client.close()
            server.close()
            service = service_of(lsock.getsockname())
        assert wait_for(lambda: metric_sum(scrape(port), CLOSED, destination_service=service) == 2)
        text = scrape(port)
        assert metric_sum(text, RECEIVED, destination_service=service, reporter="source") == 4242
        assert metric_sum(text, SENT, destination_service=service, reporter="destination") == 2424
    finally:
        stop(agent)


def test_broken_config_mid_traffic_is_refused_and_the_old_one_keeps_counting(backend, tmp_path):
    config = tmp_path / "metrics.yaml"
    config.write_text("metrics: []\n")
    agent, port = start_agent(backend, "--config", str(config))
    try:
        with listener() as lsock:
            service = service_of(lsock.getsockname())
            client, server = connect_pair(lsock)
            exchange(client, server, 100, 200)
            config.write_text("metrics: [ {name: 'bad name', value: nope\n")  # not even YAML
            agent.send_signal(signal.SIGHUP)
            assert wait_for(
                lambda: (
                    metric_sum(scrape(port), "tcpacct_config_reloads_total", result="failure") >= 1
                )
            )
            exchange(client, server, 1, 2)
            client.close()
            server.close()
            assert wait_for(
                lambda: metric_sum(scrape(port), CLOSED, destination_service=service) == 2
            )
            text = scrape(port)
            assert metric_sum(text, RECEIVED, destination_service=service, reporter="source") == 101
            assert agent.poll() is None
    finally:
        stop(agent)


def test_exits_nonzero_with_a_clear_message_only_when_it_cannot_run(backend):
    with listener() as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(TCPACCT), "run", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "address already in use" in result.stderr

    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(TCPACCT), "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "needs root" in result.stderr

    if not Path("/sys/bus/event_source/devices/kprobe").exists():
        result = subprocess.run(
            [str(TCPACCT), "run", "--backend", "kprobe", "--listen", f"127.0.0.1:{free_port()}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert "kprobes are not built into this kernel" in result.stderr

    result = subprocess.run(
        [str(TCPACCT), "run", "--interval", "0.1"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "at least 1 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_scrape_while_metrics_endpoint_is_hammered_never_fails(backend):
    agent, port = start_agent(backend)
    try:
        with Scrapers(port, clients=6) as scrapers:
            time.sleep(3)
        assert not scrapers.failed and scrapers.ok > 100
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        stop(agent)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

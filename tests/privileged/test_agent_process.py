"""The agent as a user runs it: ``tcpacct run`` as a process, /metrics over HTTP, SIGTERM.

Also: a connection opened before the agent started is attributed to its real 4-tuple,
process and role, and counts from the agent's start.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.harness import (
    CLOSED,
    OPENED,
    RECEIVED,
    SENT,
    connect_pair,
    exchange,
    listener,
    service_of,
)
from tests.support.niceness import thread_niceness

TCPACCT = Path(sys.executable).with_name("tcpacct")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_sum(text: str, name: str, **labels: str) -> int:
    total = 0
    for line in text.splitlines():
        if line.startswith(name + " "):
            body = ""
        elif line.startswith(name + "{"):
            body = line[len(name) + 1 : line.rindex("}")]
        else:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))
        if all(found.get(k) == v for k, v in labels.items()):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


# Compiling the BPF program takes ~1 s natively and up to a minute under emulation (tests/vm).
READY_TIMEOUT = float(os.environ.get("TCPACCT_TEST_READY_TIMEOUT", "180"))


def wait_ready(port: int, process: subprocess.Popen, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"agent exited with {process.returncode}: "
                f"{process.stderr.read() if process.stderr else ''}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("agent not ready in time")


def bpf_program_ids() -> set[str]:
    """Every BPF program loaded on the machine, by id (from bpftool)."""
    out = subprocess.run(["bpftool", "prog", "list"], capture_output=True, text=True, check=True)
    return {line.split(":")[0] for line in out.stdout.splitlines() if re.match(r"^\d+:", line)}


def programs_of(pid: int) -> set[str]:
    """Ids of the BPF programs a process holds (``prog_id:`` in its fds' fdinfo), so that
    other processes loading BPF meanwhile do not confuse the check."""
    ids = set()
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        match = re.search(r"^prog_id:\s+(\d+)", text, re.M)
        if match:
            ids.add(match.group(1))
    return ids


@pytest.fixture
def agent_process(backend):
    port = free_port()
    before = bpf_program_ids()
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
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(port, process)
        yield port, process, before
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_run_serves_exact_counts_and_sigterm_detaches_everything(agent_process):
    port, process, _ = agent_process
    mine = programs_of(process.pid)
    assert len(mine) >= 4 and mine <= bpf_program_ids(), "the agent's programs while it runs"
    request, response = 123_456, 654_321
    with listener() as lsock:
        client, server = connect_pair(lsock)
        exchange(client, server, request, response)
        client.close()
        server.close()
        service = service_of(lsock.getsockname())
    time.sleep(3.5)  # > 3 report intervals: held-back names resolved, closes drained
    text = scrape(port)
    for reporter in ("source", "destination"):
        labels = {"destination_service": service, "reporter": reporter}
        assert metric_sum(text, RECEIVED, **labels) == request
        assert metric_sum(text, SENT, **labels) == response
        assert metric_sum(text, OPENED, **labels) == 1
        assert metric_sum(text, CLOSED, **labels) == 1
    assert 'tcpacct_backend_info{backend="' in text
    assert "\ntcpacct_lifecycle_events_missed_total 0\n" in text  # every event handled
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert not (mine & bpf_program_ids()), "programs left attached after SIGTERM"


def test_connection_older_than_the_agent(backend):
    """Opened before the agent: real 4-tuple, process and role; bytes from the start on."""
    from tests.support.harness import Harness, open_test_tracer

    with listener() as lsock:
        client, server = connect_pair(lsock)
        exchange(client, server, 1000, 2000)  # before the agent: not counted
        tracer = open_test_tracer(backend)
        try:
            harness = Harness(tracer)
            exchange(client, server, 777, 888)
            harness.poll()
            mine = {s.local: s for s in harness.last_samples}
            client_sample = mine[_endpoint(client.getsockname())]
            server_sample = mine[_endpoint(server.getsockname())]
            assert client_sample.remote == _endpoint(client.getpeername())
            assert server_sample.remote == _endpoint(server.getpeername())
            assert client_sample.role.name == "CLIENT" and server_sample.role.name == "SERVER"
            assert client_sample.pid == os.getpid() == server_sample.pid
            assert (client_sample.sent_bytes, client_sample.received_bytes) == (777, 888)
            assert (server_sample.sent_bytes, server_sample.received_bytes) == (888, 777)
            client.close()
            server.close()
            harness.settle()
            service = service_of(lsock.getsockname())
            for reporter in ("source", "destination"):
                assert (
                    harness.total(RECEIVED, destination_service=service, reporter=reporter) == 777
                )
                assert harness.total(SENT, destination_service=service, reporter=reporter) == 888
                # opened before the agent: not seen opening, but seen closing
                assert harness.total(OPENED, destination_service=service, reporter=reporter) == 0
                assert harness.total(CLOSED, destination_service=service, reporter=reporter) == 1
        finally:
            tracer.close()


def _endpoint(address: tuple):
    from agent.model import Endpoint, fold_address

    return Endpoint(fold_address(address[0]), address[1])


def test_the_agent_keeps_no_compiler_in_its_memory(agent_process):
    """The tracepoint backend is compiled by a child process and loaded with bpf(2): neither
    bcc's library nor LLVM/clang is mapped into the running agent. fentry and kprobe
    programs are attached by bcc in the agent, which then maps libbcc (README says so)."""
    port, process, _ = agent_process
    maps = Path(f"/proc/{process.pid}/maps").read_text()
    mapped = {line.split()[-1] for line in maps.splitlines() if len(line.split()) >= 6}
    compilers = sorted(p for p in mapped if re.search(r"libbcc|LLVM|clang", p))
    if scrape_backend(port) == "backend tracepoint":
        assert compilers == []
    else:
        assert any("libbcc" in p for p in compilers), compilers


def test_every_thread_of_the_agent_yields_the_cpu(agent_process):
    """``tcpacct run`` without --nice: the poller, the HTTP server, the closed-map drainer
    and every other thread run at niceness 10 (agent.priority)."""
    _, process, _ = agent_process
    threads = thread_niceness(process.pid)
    assert len(threads) >= 3, threads  # main (polls), HTTP server, drainer at least
    assert set(threads.values()) == {10}, threads


def scrape_backend(port: int) -> str:
    match = re.search(r'tcpacct_backend_info\{backend="(\w+)"', scrape(port))
    return f"backend {match.group(1)}" if match else "no backend"

"""The data-path workloads, run in the benchmark process, each returning what it moved.

Every workload uses a listener of its own (a fresh port), so the agent's counts for it can
be picked out by that port. Loops are bounded by a count; nothing waits without a timeout.

=================== ============================================ ===========================
workload            one operation                                 figure
=================== ============================================ ===========================
``send_recv``       1-byte send on one end, 1-byte recv on the    ns per call (2 calls/op)
                    other, same thread, pinned to one CPU
``unix_send_recv``  the same over an AF_UNIX socketpair            ns per call
``request_response`` 64-byte request, 64-byte response; server in  transactions/s
                    its own process on the other CPU
``churn``           connect, send 64 bytes, wait for the server's  connections/s
                    close, close
=================== ============================================ ===========================
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.servers import recv_exactly
from bench.tcpinfo import tcp_info_after_ack

ROOT = Path(__file__).resolve().parents[1]
SERVER_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Moved:
    """What one workload run did: its rate and the bytes the applications moved.

    ``tcp_info`` sums the kernel's per-socket counters at the end of each connection
    (``client_acked``, ``client_received``, ``server_acked``, ``server_received``). They
    count sequence space, so a client's acknowledged SYN and a FIN read before tcp_info was
    taken add one each: ``sequence_octets`` says how many, per key, to take away.
    """

    name: str
    server_port: int
    seconds: float
    operations: int
    connections: int = 1
    client_sent: int = 0
    client_received: int = 0
    server_sent: int = 0
    server_received: int = 0
    tcp_info: dict[str, int] = field(default_factory=dict)
    sequence_octets: dict[str, int] = field(default_factory=dict)
    data_client_port: int = 0  # iperf3: the data connection's client port (not the control)

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.operations / self.seconds

    @property
    def ns_per_call(self) -> float:
        """For send/recv loops: two calls per operation."""
        return self.seconds * 1e9 / (2 * self.operations)


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run the block on one CPU (this thread only), restoring the old mask afterwards."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def free_port() -> int:
    """A loopback port nobody listens on right now (for tools that want one named)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _connected_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    server, _ = listener.accept()
    client.settimeout(None)
    return listener, client, server


def send_recv(calls: int, cpu: int | None) -> Moved:
    """``calls`` 1-byte sends on a loopback TCP client, each read by a 1-byte recv."""
    listener, client, server = _connected_pair()
    port = listener.getsockname()[1]
    try:
        send, recv, byte = client.send, server.recv, b"x"
        with pinned(cpu):
            start = time.perf_counter()
            for _ in range(calls):
                send(byte)
                recv(1)
            seconds = time.perf_counter() - start
        client_acked, client_tcpi_received = tcp_info_after_ack(client, calls)
        server_acked, server_tcpi_received = tcp_info_after_ack(server, 0)
    finally:
        for sock in (client, server, listener):
            sock.close()
    return Moved(
        "send_recv",
        port,
        seconds,
        calls,
        client_sent=calls,
        server_received=calls,
        tcp_info={
            "client_acked": client_acked,
            "client_received": client_tcpi_received,
            "server_acked": server_acked,
            "server_received": server_tcpi_received,
        },
        sequence_octets={"client_acked": 1},  # the SYN
    )


def unix_send_recv(calls: int, cpu: int | None) -> Moved:
    """The same loop over an AF_UNIX stream socketpair (no TCP: the agent must count 0)."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        send, recv, byte = left.send, right.recv, b"x"
        with pinned(cpu):
            start = time.perf_counter()
            for _ in range(calls):
                send(byte)
                recv(1)
            seconds = time.perf_counter() - start
    finally:
        left.close()
        right.close()
    return Moved("unix_send_recv", 0, seconds, calls, connections=0)


class _Server:
    """A ``bench.servers`` process (pinned to ``cpu``) and its port."""

    def __init__(self, kind: str, cpu: int | None, size: int, count: int = 1) -> None:
        command = [sys.executable, "-m", "bench.servers", kind, f"--size={size}"]
        command += [f"--count={count}"] + ([f"--cpu={cpu}"] if cpu is not None else [])
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=10)
            raise RuntimeError(f"bench.servers {kind} did not start")
        self.port = int(json.loads(line)["port"])

    def result(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        try:
            out, _ = self.process.communicate(timeout=SERVER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def request_response(
    transactions: int, size: int, client_cpu: int | None, server_cpu: int | None
) -> Moved:
    """``transactions`` request/response exchanges of ``size`` bytes over one connection."""
    server = _Server("rr", server_cpu, size)
    try:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        message = b"r" * size
        with pinned(client_cpu):
            sendall = client.sendall
            start = time.perf_counter()
            for _ in range(transactions):
                sendall(message)
                if len(recv_exactly(client, size)) != size:
                    raise RuntimeError("rr server closed early")
            seconds = time.perf_counter() - start
        acked, tcpi_received = tcp_info_after_ack(client, transactions * size)
        client.close()
        far = server.result()
    finally:
        server.kill()
    moved = transactions * size
    return Moved(
        "request_response",
        server.port,
        seconds,
        transactions,
        client_sent=moved,
        client_received=moved,
        server_sent=far["sent"],
        server_received=far["received"],
        tcp_info={
            "client_acked": acked,
            "client_received": tcpi_received,
            "server_acked": far["tcp_info"]["acked"],
            "server_received": far["tcp_info"]["received"],
        },
        sequence_octets={"client_acked": 1, "server_received": 1},  # SYN; the client's FIN
    )


def churn(connections: int, size: int, client_cpu: int | None, server_cpu: int | None) -> Moved:
    """``connections`` short connections: connect, send ``size`` bytes, server closes first."""
    server = _Server("churn", server_cpu, size, count=connections)
    address = ("127.0.0.1", server.port)
    message = b"c" * size
    acked_total = received_total = 0
    try:
        with pinned(client_cpu):
            start = time.perf_counter()
            for _ in range(connections):
                sock = socket.create_connection(address, timeout=30)
                sock.sendall(message)
                if sock.recv(1) != b"":
                    raise RuntimeError("churn server sent data")
                acked, received = tcp_info_after_ack(sock, size)
                acked_total += acked
                received_total += received
                sock.close()
            seconds = time.perf_counter() - start
        far = server.result()
    finally:
        server.kill()
    return Moved(
        "churn",
        server.port,
        seconds,
        connections,
        connections=connections,
        client_sent=connections * size,
        server_received=far["received"],
        tcp_info={
            "client_acked": acked_total,
            "client_received": received_total,
            "server_acked": far["tcp_info"]["acked"],
            "server_received": far["tcp_info"]["received"],
        },
        # each client's SYN, and the server's FIN the client waited for
        sequence_octets={"client_acked": connections, "client_received": connections},
    )

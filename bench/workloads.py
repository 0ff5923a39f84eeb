"""The data-path workloads, run in the benchmark process, each returning what it moved.

Every workload uses a listener of its own (a fresh port), so the agent's counts for it can
be picked out by that port. Loops are bounded by a count; nothing waits without a timeout.

=================== ============================================ ===========================
workload            one operation                                 figure
=================== ============================================ ===========================
``send_recv``       1-byte send on one end, 1-byte recv on the    ns per call (2 calls/op)
                    other, same thread, pinned to one CPU (C:
                    ``bench/loops.c``)
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
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.native import compiled
from bench.servers import recv_exactly
from bench.tcpinfo import tcp_info_after_ack

ROOT = Path(__file__).resolve().parents[1]
SERVER_TIMEOUT = 120.0
LOOPS_SOURCE = ROOT / "bench" / "loops.c"
LOOP_TIMEOUT = 300.0


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
    block_seconds: tuple[float, ...] = ()  # send/recv loops: equal blocks, timed one by one
    # churn: CPU time during the run - the client thread's, the server process's, and what
    # the two CPUs were busy (every task, interrupt and softirq) or stolen by the host
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.operations / self.seconds

    @property
    def ns_per_call(self) -> float:
        """For send/recv loops: two calls per operation."""
        return self.seconds * 1e9 / (2 * self.operations)

    @property
    def fastest_ns_per_call(self) -> float:
        """For send/recv loops timed in equal blocks: ns per call of the fastest block.

        4 blocks of 0.2, 0.1, 0.1, 0.1 s over 200 operations -> 1e6 ns (``ns_per_call``
        is 1.25e6). Without blocks, ``ns_per_call``.
        """
        if not self.block_seconds:
            return self.ns_per_call
        per_block = self.operations / len(self.block_seconds)
        return min(self.block_seconds) * 1e9 / (2 * per_block)


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


CPUIDLE = Path("/sys/devices/system/cpu")


def idle_seconds(cpus: Collection[int]) -> float | None:
    """Time the CPUs have spent idle since boot, by cpuidle's residency counters (us,
    exact; /proc/stat's idle is printed in 10 ms ticks, a 1 s round's whole error budget),
    or ``None`` where a CPU has no cpuidle states."""
    total_us = 0
    for cpu in cpus:
        states = sorted((CPUIDLE / f"cpu{cpu}" / "cpuidle").glob("state*/time"))
        if not states:
            return None
        total_us += sum(int(state.read_text()) for state in states)
    return total_us / 1e6


def steal_seconds(cpus: Collection[int]) -> float:
    """Time the host stole from the CPUs since boot (/proc/stat, 10 ms ticks)."""
    rows = psutil.cpu_times(percpu=True)
    return sum(rows[cpu].steal for cpu in cpus)


def process_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, from the scheduler's own count
    (/proc/PID/task/*/schedstat, ns: exact where /proc/PID/stat is in 10 ms ticks);
    threads that ended meanwhile are not in it."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between the listing and the read
    return total_ns / 1e9


@dataclass(frozen=True, slots=True)
class CpuReading:
    """Where the CPUs' clocks stood at one moment; two readings give what a run cost them:
    busy = elapsed x CPUs - idle (every task, interrupt and softirq on them)."""

    cpus: tuple[int, ...]
    at: float
    idle: float | None
    steal: float

    @classmethod
    def now(cls, cpus: Collection[int]) -> CpuReading:
        chosen = tuple(sorted(cpus))
        return cls(chosen, time.monotonic(), idle_seconds(chosen), steal_seconds(chosen))

    def since(self, before: CpuReading) -> dict[str, float]:
        """``{"cpus_busy": s, "cpus_steal": s}`` (busy left out without cpuidle)."""
        spent = {"cpus_steal": self.steal - before.steal}
        if self.idle is not None and before.idle is not None:
            elapsed = (self.at - before.at) * len(self.cpus)
            spent["cpus_busy"] = elapsed - (self.idle - before.idle)
        return spent


def free_port() -> int:
    """A loopback port nobody listens on right now (for tools that want one named)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_loops(kind: str, calls: int, cpu: int | None, blocks: int) -> dict[str, Any]:
    """Run ``bench/loops.c`` (compiled on first use): its JSON report.

    ``calls`` is rounded up to a multiple of ``blocks``; ``cpu`` None runs it unpinned.
    """
    per_block = max(1, -(-calls // blocks))
    command = [
        str(compiled(LOOPS_SOURCE)),
        kind,
        str(per_block * blocks),
        str(-1 if cpu is None else cpu),
        str(blocks),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=LOOP_TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def moved_from_loops(report: dict[str, Any]) -> Moved:
    """``Moved`` from a ``bench/loops.c`` report (``kind`` ``tcp`` or ``unix``).

    TCP: the client wrote and the server read ``iterations`` bytes; the client's
    ``tcpi_bytes_acked`` also counts its SYN. AF_UNIX: no TCP connection, port 0.
    """
    common = {
        "seconds": float(report["seconds"]),
        "operations": int(report["iterations"]),
        "block_seconds": tuple(float(b) for b in report["block_seconds"]),
    }
    if report["kind"] == "unix":
        return Moved("unix_send_recv", 0, connections=0, **common)
    return Moved(
        "send_recv",
        int(report["server_port"]),
        client_sent=int(report["client_sent"]),
        client_received=int(report["client_received"]),
        server_sent=int(report["server_sent"]),
        server_received=int(report["server_received"]),
        tcp_info={k: int(v) for k, v in report["tcp_info"].items()},
        sequence_octets={"client_acked": 1},  # the SYN
        **common,
    )


def send_recv(calls: int, cpu: int | None, blocks: int = 1) -> Moved:
    """``calls`` 1-byte sends on a loopback TCP client, each read by a 1-byte recv (in C)."""
    return moved_from_loops(run_loops("tcp", calls, cpu, blocks))


def unix_send_recv(calls: int, cpu: int | None, blocks: int = 1) -> Moved:
    """The same loop over an AF_UNIX stream socketpair (no TCP: the agent must count 0)."""
    return moved_from_loops(run_loops("unix", calls, cpu, blocks))


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


def _connect_send_close(address: tuple[str, int], message: bytes) -> tuple[int, int]:
    """One churned connection: connect, send ``message``, see the server's close, close;
    its ``tcp_info`` (bytes acked, bytes received) once the message is acked."""
    sock = socket.create_connection(address, timeout=30)
    try:
        sock.sendall(message)
        if sock.recv(1) != b"":
            raise RuntimeError("churn server sent data")
        return tcp_info_after_ack(sock, len(message))
    finally:
        sock.close()


def churn_blocks(
    blocks: int,
    connections: int,
    size: int,
    client_cpu: int | None,
    server_cpu: int | None,
    before_block: Callable[[int], None],
) -> list[float]:
    """``blocks`` blocks of ``connections`` churned connections each to one server process,
    ``before_block(i)`` called before block ``i`` (not timed: e.g. hooks switched on or
    off); each block's connections per second. The server's bytes are checked at the end."""
    server = _Server("churn", server_cpu, size, count=blocks * connections)
    address, message = ("127.0.0.1", server.port), b"c" * size
    rates = []
    try:
        with pinned(client_cpu):
            for block in range(blocks):
                before_block(block)
                start = time.perf_counter()
                for _ in range(connections):
                    _connect_send_close(address, message)
                rates.append(connections / (time.perf_counter() - start))
        far = server.result()
    finally:
        server.kill()
    expected = blocks * connections * size
    if far["received"] != expected:
        raise RuntimeError(f"churn server received {far['received']} bytes, not {expected}")
    return rates


def churn(connections: int, size: int, client_cpu: int | None, server_cpu: int | None) -> Moved:
    """``connections`` short connections: connect, send ``size`` bytes, server closes first."""
    server = _Server("churn", server_cpu, size, count=connections)
    address = ("127.0.0.1", server.port)
    message = b"c" * size
    acked_total = received_total = 0
    cpus = {cpu for cpu in (client_cpu, server_cpu) if cpu is not None} or os.sched_getaffinity(0)
    try:
        with pinned(client_cpu):
            cpus_before = CpuReading.now(cpus)
            thread_before = time.thread_time()
            start = time.perf_counter()
            for _ in range(connections):
                acked, received = _connect_send_close(address, message)
                acked_total += acked
                received_total += received
            seconds = time.perf_counter() - start
            client_seconds = time.thread_time() - thread_before
            cpus_spent = CpuReading.now(cpus).since(cpus_before)
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
        cpu_seconds={
            "client": client_seconds,
            "server": float(far.get("cpu_seconds", 0.0)),
            **cpus_spent,
        },
    )

"""The ring of closed records (bpf/tcpacct.c record_closed, agent/ebpf/tracing.py
_ClosedRing): read from its tail up to the first record not committed, across the end of
the array, and - with the real program - around it many times without a record lost."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agent.ebpf.decoding import SOCK_INFO
from agent.ebpf.syscalls import MapHandle, create_map
from agent.ebpf.tracing import CLOSED_RECORD_SIZE, Capacities, _ClosedRing
from tests.privileged.conftest import _unavailable
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

ARRAY = 2
CAPACITY = 4
HEAD, TAIL = (0).to_bytes(4, "little"), (1).to_bytes(4, "little")


class Ring:
    """A ring of CAPACITY records made by the test, written as the kernel writes it."""

    def __init__(self) -> None:
        self.ring_fd = create_map(ARRAY, 4, CLOSED_RECORD_SIZE, CAPACITY, 0, "t_ring")
        self.ends_fd = create_map(ARRAY, 4, 8, 2, 0, "t_ends")
        self.records = MapHandle(self.ring_fd, 4, CLOSED_RECORD_SIZE)
        self.ends = MapHandle(self.ends_fd, 4, 8)

    def reserve(self) -> int:
        """The next record's number (the head moves past it; nothing is written yet)."""
        number = int.from_bytes(self.ends.lookup(HEAD) or bytes(8), "little")
        self.ends.update(HEAD, (number + 1).to_bytes(8, "little"))
        return number

    def write(self, number: int, socket_id: int, sent: int, *, commit: bool = True) -> None:
        """Record ``number``'s sock_info; its number field says it is whole when ``commit``
        (otherwise it keeps an older record's number, as while the kernel copies)."""
        index = (number % CAPACITY).to_bytes(4, "little")
        old = self.records.lookup(index) or bytes(CLOSED_RECORD_SIZE)
        mark = (number + 1).to_bytes(8, "little") if commit else old[SOCK_INFO.size :]
        info = SOCK_INFO.pack(socket_id, sent, 0, bytes(16), bytes(16), 0, 0, 2, 1, 0, 0, 0, b"")
        self.records.update(index, info + mark)

    def tail(self) -> int:
        return int.from_bytes(self.ends.lookup(TAIL) or bytes(8), "little")

    def close(self) -> None:
        os.close(self.ring_fd)
        os.close(self.ends_fd)


@pytest.fixture
def ring() -> Iterator[Ring]:
    if os.geteuid() != 0:
        _unavailable("needs root to create BPF maps (run: sudo make test)")
    made = Ring()
    try:
        yield made
    finally:
        made.close()


def taken(reader: _ClosedRing) -> list[tuple[int, int]]:
    """(id, sent) of every record a take returns."""
    raw = reader.take()
    records = [
        SOCK_INFO.unpack_from(raw, offset)[:2] for offset in range(0, len(raw), reader.stride)
    ]
    reader.release()
    return records


def test_a_take_stops_at_the_first_record_not_committed_and_wraps(ring) -> None:
    reader = _ClosedRing(ring.ring_fd, ring.ends_fd, CAPACITY)
    assert taken(reader) == []
    for socket_id in (1, 2):
        ring.write(ring.reserve(), socket_id, 10 * socket_id)
    assert taken(reader) == [(1, 10), (2, 20)]
    assert ring.tail() == 2

    # records 2, 3 and 4 reserved; 3 is still being copied in, 4 (index 0) is whole
    two, three, four = ring.reserve(), ring.reserve(), ring.reserve()
    ring.write(two, 3, 30)
    ring.write(three, 4, 40, commit=False)
    ring.write(four, 5, 50)
    assert taken(reader) == [(3, 30)]
    assert ring.tail() == 3
    assert taken(reader) == []  # 3 is still not whole: nothing after it either

    ring.write(three, 4, 40)
    assert taken(reader) == [(4, 40), (5, 50)]  # index 3, then index 0
    assert ring.tail() == 5


def test_a_new_reader_starts_at_the_tail_the_last_one_left(ring) -> None:
    first = _ClosedRing(ring.ring_fd, ring.ends_fd, CAPACITY)
    ring.write(ring.reserve(), 1, 10)
    assert taken(first) == [(1, 10)]
    ring.write(ring.reserve(), 2, 20)
    assert taken(_ClosedRing(ring.ring_fd, ring.ends_fd, CAPACITY)) == [(2, 20)]


def test_a_record_committed_while_the_window_was_read_is_read_again(ring, monkeypatch) -> None:
    """The first read only finds how far the committed records go; their bytes come from
    the second. Here the record's bytes change between the two reads, as they would had the
    first read copied them while the kernel was still writing them."""
    reader = _ClosedRing(ring.ring_fd, ring.ends_fd, CAPACITY)
    number = ring.reserve()
    ring.write(number, 7, 1)
    committed = reader._committed

    def committed_then_rewritten(records: int) -> int:
        found = committed(records)
        ring.write(number, 7, 700)  # what the kernel had finished writing by now
        return found

    monkeypatch.setattr(reader, "_committed", committed_then_rewritten)
    assert taken(reader) == [(7, 700)]


def test_the_program_writes_the_ring_around_many_times_without_losing_a_record(backend) -> None:
    """10 connections (20 sockets) a round, 8 rounds, into a ring of 64 records: the ring
    goes around 2.5 times, and every socket's final bytes are counted, none spilled."""
    tracer = open_test_tracer(backend, Capacities(sockets=4096, closed=64))
    try:
        # the ring where the kernel has compare-and-swap (this one), else the hash map
        assert isinstance(tracer._finished, _ClosedRing) == tracer._plan.slots
        harness = Harness(tracer)
        with listener() as lsock:
            service = service_of(lsock.getsockname())
            for _ in range(8):
                pairs = [connect_pair(lsock) for _ in range(10)]
                for client, server in pairs:
                    exchange(client, server, 300, 20)
                    client.close()
                    server.close()
                time.sleep(0.1)
                harness.settle()
        stats = harness.accountant.stats()
        assert stats.spilled_sockets == 0
        assert harness.total(OPENED, destination_service=service) == 160
        assert harness.total(CLOSED, destination_service=service) == 160
        # Istio's directions: received = the requests (300 bytes), sent = the responses (20)
        for reporter in ("source", "destination"):
            labels = {"destination_service": service, "reporter": reporter}
            assert harness.total(RECEIVED, **labels) == 80 * 300
            assert harness.total(SENT, **labels) == 80 * 20
        if tracer._plan.slots:  # every socket's record went through the ring
            assert tracer._finished._tail >= 160
    finally:
        tracer.close()


# One worker: connections to the listener it was handed, each request and response read in
# full, both ends closed in this process on this CPU. It starts when the test writes a line.
# At niceness 19 it leaves the CPU to the test's drainer and poller whenever they wake: the
# agent's capacity is sized for its 0.25 s drains, the test's smaller ring for 2 ms ones.
CHURN_WORKER = """
import os, socket, sys
cpu, fd, connections, request, response = map(int, sys.argv[1:])
os.sched_setaffinity(0, {cpu})
os.nice(19)
lsock = socket.socket(fileno=fd)
name = lsock.getsockname()
sys.stdin.readline()
def read(sock, size):
    while size:
        size -= len(sock.recv(size))
for _ in range(connections):
    client = socket.create_connection(name)
    server, _ = lsock.accept()
    client.sendall(b"q" * request)
    read(server, request)
    server.sendall(b"r" * response)
    read(client, response)
    client.close()
    server.close()
"""


def test_both_cpus_closing_at_once_into_a_ring_being_drained_lose_no_record(backend) -> None:
    """Two processes, one per CPU, each make and close 10,000 connections at the same time:
    40,000 records reserved from two CPUs at once into a ring of 8,192 while the agent's
    drainer takes them every 2 ms (and a poll accounts them every 50 ms), so writers race
    each other for record numbers and the reader for the records they are still copying.
    Every socket's bytes are counted at its own service, none spilled. The ring leaves the
    drainer ~0.3 s of slack, and the test's garbage collector is off during the burst: in
    the whole suite's heap one collection could stall the drainer past a smaller ring."""
    cpus = sorted(os.sched_getaffinity(0))
    connections = 10_000
    tracer = open_test_tracer(backend, Capacities(sockets=8192, closed=8192))
    workers: list[subprocess.Popen[str]] = []
    try:
        harness = Harness(tracer)
        with listener() as first, listener() as second:
            services = []
            for number, lsock in enumerate((first, second)):
                request, response = 100 + number, 7 + number
                services.append((service_of(lsock.getsockname()), request, response))
                cpu = cpus[number % len(cpus)]
                arguments = (cpu, lsock.fileno(), connections, request, response)
                command = [sys.executable, "-c", CHURN_WORKER, *map(str, arguments)]
                workers.append(
                    subprocess.Popen(
                        command, stdin=subprocess.PIPE, text=True, pass_fds=(lsock.fileno(),)
                    )
                )
            tracer.start_draining(period=0.002)
            gc.disable()
            try:
                for worker in workers:
                    worker.stdin.write("go\n")
                    worker.stdin.flush()
                deadline = time.monotonic() + 60
                while any(worker.poll() is None for worker in workers):
                    assert time.monotonic() < deadline, "the workers did not finish in 60 s"
                    harness.poll()  # as the agent's poller: what was drained is accounted
                    time.sleep(0.05)
            finally:
                gc.enable()
            assert [worker.returncode for worker in workers] == [0, 0]
        harness.settle()
        stats = harness.accountant.stats()
        assert stats.spilled_sockets == 0
        for service, request, response in services:
            assert harness.total(OPENED, destination_service=service) == 2 * connections
            assert harness.total(CLOSED, destination_service=service) == 2 * connections
            for reporter in ("source", "destination"):
                labels = {"destination_service": service, "reporter": reporter}
                assert harness.total(RECEIVED, **labels) == connections * request
                assert harness.total(SENT, **labels) == connections * response
        if tracer._plan.slots:
            assert tracer._finished._tail >= 4 * connections  # around the ring 4 times and more
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        tracer.close()

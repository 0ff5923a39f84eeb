"""The bench's hot-path candidates (bpf/hot_path_candidates.c) count exactly, and the
bench's machinery loads, attaches and counts their runs — so their figures compare ways of
doing the same work. No timing is asserted."""

from __future__ import annotations

import ctypes
import os
import socket
import struct

import pytest

from agent.ebpf.syscalls import BPF_MAP_LOOKUP_ELEM, ElemAttr, bpf, enable_run_time_stats
from bench.design import CANDIDATES, LoadedCandidate, counted_ns_per_run

CAPACITY = 1024  # the array candidate then has 2048 slots: quick to read whole
SENT = 7919  # in 8 writes; no other socket here sends this many bytes in the test's second
COUNTERS = struct.Struct("<QQQ")  # struct counters: sk, sent, received

COUNTING = [c for c in CANDIDATES if not c.name.startswith("empty")]


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to load BPF (run: sudo make test)", pytrace=False)


def _move_bytes() -> tuple[socket.socket, socket.socket, socket.socket]:
    """A loopback connection whose client sent SENT bytes that the server read."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    payload = b"x" * SENT
    for start in range(0, SENT, 1000):
        client.sendall(payload[start : start + 1000])
    got = 0
    while got < SENT:
        got += len(server.recv(SENT - got))
    return listener, client, server


def _table_values(loaded: LoadedCandidate) -> list[tuple[int, int, int]]:
    table = loaded.bpf["table"]
    return [COUNTERS.unpack(bytes(value)) for value in table.values()]


def _sk_storage_value(loaded: LoadedCandidate, sock: socket.socket) -> tuple[int, int, int]:
    """A socket's local storage, looked up from user space by its fd."""
    key, value = ctypes.c_int(sock.fileno()), ctypes.create_string_buffer(COUNTERS.size)
    attr = ElemAttr(
        map_fd=loaded.map_fd("table"),
        key=ctypes.addressof(key),
        value=ctypes.addressof(value),
    )
    bpf(BPF_MAP_LOOKUP_ELEM, attr)
    return COUNTERS.unpack(value.raw)


@pytest.mark.parametrize("candidate", COUNTING, ids=lambda c: c.name)
def test_every_counting_candidate_counts_a_connections_bytes_exactly(candidate) -> None:
    loaded = LoadedCandidate(candidate, CAPACITY)
    sockets: tuple[socket.socket, ...] = ()
    try:
        with loaded.attached():
            sockets = _move_bytes()
        _, client, server = sockets
        if candidate.name == "sk_storage":
            assert _sk_storage_value(loaded, client)[1:] == (SENT, 0)
            assert _sk_storage_value(loaded, server)[1:] == (0, SENT)
        else:
            values = _table_values(loaded)
            assert [v[1:] for v in values if v[1] == SENT] == [(SENT, 0)]
            assert [v[1:] for v in values if v[2] == SENT] == [(0, SENT)]
            if candidate.name == "array":  # every used slot names its socket
                assert all(sk != 0 for sk, sent, received in values if sent or received)
    finally:
        for sock in sockets:
            sock.close()
        loaded.close()


def test_the_bench_counts_every_candidates_runs_on_the_send_recv_loop() -> None:
    """counted_ns_per_run refuses a round whose programs ran fewer times than the loop's
    send and recv calls (not attached, or statistics off); every candidate passes."""
    stats_fd = enable_run_time_stats()
    try:
        for candidate in CANDIDATES:
            loaded = LoadedCandidate(candidate, CAPACITY)
            try:
                ns, operations = counted_ns_per_run(loaded, 2000, cpu=0)
            finally:
                loaded.close()
            assert operations == 2000
            assert ns > 0
    finally:
        os.close(stats_fd)
    loaded = LoadedCandidate(CANDIDATES[0], CAPACITY)
    try:
        with pytest.raises(RuntimeError, match="run-time statistics off"):
            counted_ns_per_run(loaded, 2000, cpu=0)  # statistics are off again
    finally:
        loaded.close()

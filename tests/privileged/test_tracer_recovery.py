"""The kernel tracer's poll over real BPF maps that the test fills itself (no programs
attached): what a poll that fails half way leaves for the next one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.accounting import Accountant
from agent.ebpf.decoding import C_COUNT, SLOT, SOCK_INFO, encode_port
from agent.ebpf.syscalls import MapHandle, create_map
from agent.ebpf.tracing import (
    CLOSED_RECORD_SIZE,
    LISTENER_KEY,
    PROCESS_INFO,
    Capacities,
    KernelTracer,
)
from agent.model import SocketFlag
from tests.privileged.conftest import _unavailable
from tests.support.fakes import FakeCatalogue, FakeEnricher

HASH, ARRAY, PERCPU_ARRAY = 1, 2, 6
CAPACITY = 1024
LOOPBACK = socket.inet_aton("127.0.0.1") + bytes(12)
OPENED = int(SocketFlag.OPENED)
FINAL = int(SocketFlag.OPENED | SocketFlag.CLOSED | SocketFlag.DESTROYED)


class _Program:
    """What KernelTracer needs of a loaded program: its maps; nothing to attach, no
    programs (whose recursion misses a poll reads)."""

    def __init__(self, map_fds: dict[str, int]) -> None:
        self.map_fds = map_fds
        self.program_fds: dict[str, int] = {}

    def attach(self, hooks: object) -> None: ...

    def detach(self, hooks: object) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Plan:
    name: str = "tracepoint"
    hooks: tuple[()] = ()


@pytest.fixture(params=["closed_ring", "closed"])
def maps(request) -> Iterator[dict[str, int]]:
    """The maps of a program with slots and the ring of closed records, or (``closed``)
    with the hash map of closed records that kernels without compare-and-swap get."""
    if os.geteuid() != 0:
        _unavailable("needs root to create BPF maps (run: sudo make test)")
    finished = (
        {
            "closed_ring": create_map(ARRAY, 4, CLOSED_RECORD_SIZE, CAPACITY, 0, "t_ring"),
            "closed_ends": create_map(ARRAY, 4, 8, 2, 0, "t_ends"),
        }
        if request.param == "closed_ring"
        else {"closed": create_map(HASH, 8, SOCK_INFO.size, CAPACITY, 0, "t_closed")}
    )
    fds = {
        **finished,
        "socks": create_map(HASH, 8, SOCK_INFO.size, CAPACITY, 0, "t_socks"),
        "changed": create_map(HASH, 8, 1, CAPACITY, 0, "t_changed"),
        "counters": create_map(PERCPU_ARRAY, 4, 8, C_COUNT, 0, "t_counters"),
        "poll_round": create_map(ARRAY, 4, 4, 1, 0, "t_round"),
        "slots": create_map(ARRAY, 4, SLOT.size, Capacities(CAPACITY).slots, 1 << 10, "t_slots"),
        "listeners": create_map(HASH, LISTENER_KEY.size, PROCESS_INFO.size, 64, 0, "t_lst"),
    }
    try:
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def record_finished(maps: dict[str, int], final: bytes) -> None:
    """A finished socket's record, written as the kernel writes it: the next record of the
    ring (committed, the head moved past it), or an entry of the hash map by its id."""
    if "closed" in maps:
        MapHandle(maps["closed"], 8, SOCK_INFO.size).update(final[:8], final)
        return
    ends = MapHandle(maps["closed_ends"], 4, 8)
    head = int.from_bytes(ends.lookup((0).to_bytes(4, "little")) or bytes(8), "little")
    ring = MapHandle(maps["closed_ring"], 4, CLOSED_RECORD_SIZE)
    ring.update((head % CAPACITY).to_bytes(4, "little"), final + (head + 1).to_bytes(8, "little"))
    ends.update((0).to_bytes(4, "little"), (head + 1).to_bytes(8, "little"))


def entry(socket_id: int, sent: int, flags: int = OPENED) -> bytes:
    """A client socket 127.0.0.1:<40000+id> -> 127.0.0.1:80 as the kernel side keeps it."""
    return SOCK_INFO.pack(
        socket_id, sent, 0, LOOPBACK, LOOPBACK, encode_port(40000 + socket_id),
        encode_port(80), socket.AF_INET, 1, flags, 4026531840, 4242, b"client",
    )  # fmt: skip


def test_a_poll_that_fails_half_way_loses_nothing(maps) -> None:
    """Two failed polls: one consumed the change marks and updated a sample in place, the
    other took a finished record out of the kernel map. The next poll reports every live
    socket as changed under a number that shows the gap, and hands the record over."""
    tracer = KernelTracer(_Program(maps), _Plan(), Capacities(CAPACITY, CAPACITY, 64))
    socks, changed = MapHandle(maps["socks"], 8, SOCK_INFO.size), MapHandle(maps["changed"], 8, 1)

    def live(socket_id: int, sent: int) -> None:
        key = (0xFFFF_8880_0000_0000 + 4096 * socket_id).to_bytes(8, "little")
        socks.update(key, entry(socket_id, sent))
        changed.update(key, b"\x01")

    for socket_id in (1, 2, 3):
        live(socket_id, 100)
    accountant = Accountant(FakeCatalogue(), FakeEnricher())
    first = tracer.poll()
    accountant.apply(first)
    assert {s.socket_id: s.sent_bytes for s in first.live} == {1: 100, 2: 100, 3: 100}

    for socket_id in (1, 2, 3):
        live(socket_id, 250)
    record_finished(maps, entry(9, 70, FINAL))
    refresh, calls = tracer._decoder.refresh, []

    def failing_refresh(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("half way")
        return refresh(*args, **kwargs)

    tracer._decoder.refresh = failing_refresh
    with pytest.raises(MemoryError):
        tracer.poll()  # marks consumed, one sample updated in place, nothing reported
    tracer._decoder.refresh = refresh

    # a second failure, after the closed map's record left the kernel and was decoded
    live(4, 5)
    release = tracer._socks.release

    def failing_release() -> None:
        raise OSError("madvise failed")

    tracer._socks.release = failing_release
    with pytest.raises(OSError):
        tracer.poll()
    tracer._socks.release = release

    third = tracer.poll()
    assert third.sequence == first.sequence + 3
    assert {s.socket_id: s.sent_bytes for s in third.changed} == {1: 250, 2: 250, 3: 250, 4: 5}
    assert [(s.socket_id, s.sent_bytes) for s in third.finished] == [(9, 70)]
    accountant.apply(third)
    received = next(f for f in accountant.families() if f.name == "fake_received_bytes_total")
    assert sum(received.samples.values()) == 3 * 250 + 5 + 70

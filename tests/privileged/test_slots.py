"""The hot path's slots (bpf/tcpacct.c `slots`): a tracked socket's bytes are counted in its
slot, not its hash-map entry; the slot is freed when the socket is retired; sockets that
find no free slot count in their entries; every count stays exact either way."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from agent.ebpf import tracing
from agent.ebpf.backends import plan_backend
from agent.ebpf.btf import Btf
from agent.ebpf.decoding import SLOT, SOCK_INFO, SockInfo, encode_port
from agent.ebpf.syscalls import MapHandle
from agent.ebpf.tracing import Capacities, KernelTracer
from agent.model import Role, SocketFlag
from tests.support.bpf_maps import delete_entry
from tests.support.harness import (
    Harness,
    connect_pair,
    exchange,
    listener,
    open_test_tracer,
    recv_exact,
    send_exact,
    service_of,
)


def _entries(tracer: KernelTracer) -> dict[int, SockInfo]:
    """The kernel's socket map as it is now, by socket id (white box: the tracer's reader)."""
    _, raw = tracer._socks.read(delete=False)
    entries = {}
    for offset in range(0, len(raw), SOCK_INFO.size):
        info = SockInfo.from_buffer_copy(raw[offset : offset + SOCK_INFO.size])
        entries[info.id] = info
    tracer._socks.release()
    return entries


def _slots(tracer: KernelTracer) -> list[tuple[int, int, int, int, int, int]]:
    """Every slot of the memory-mapped array: (sk, id, sent, received, needs_process,
    spare)."""
    return list(SLOT.iter_unpack(tracer._slot_view[: tracer.capacities.slots * SLOT.size]))


def _ends(tracer: KernelTracer, port: int) -> dict[int, object]:
    return {s.socket_id: s for s in tracer.poll().live if port in (s.local.port, s.remote.port)}


def test_a_live_sockets_bytes_are_counted_in_its_slot(harness) -> None:
    """Both ends get a slot; after their first bytes (the process known) everything they
    move goes to the slot: entry + slot = the sample = the bytes moved."""
    with listener() as lsock:
        client, server = connect_pair(lsock)
        try:
            for _ in range(5):
                exchange(client, server, 1000, 3000)
            ends = _ends(harness.tracer, lsock.getsockname()[1])
            assert len(ends) == 2
            entries, slots = _entries(harness.tracer), _slots(harness.tracer)
            moved = {(s.sent_bytes, s.received_bytes) for s in ends.values()}
            assert moved == {(5000, 15000), (15000, 5000)}  # the client's, the server's
            for socket_id, sample in ends.items():
                entry = entries[socket_id]
                assert entry.slot, "a tracked socket has a slot"
                sk, owner_id, sent, received, needs_process, _ = slots[entry.slot - 1]
                assert (owner_id, needs_process) == (socket_id, 0)
                assert sk != 0
                assert (entry.sent + sent, entry.received + received) == (
                    sample.sent_bytes,
                    sample.received_bytes,
                )
                # at most the first call's bytes went to the entry (the process unknown)
                assert sent + received >= 20000 - 3000
        finally:
            client.close()
            server.close()


def test_bytes_counted_in_slots_mark_nothing_and_come_with_the_next_poll(harness) -> None:
    """Once its process is known, a socket's bytes go to its slot and the kernel marks
    nothing in `changed`: each poll finds them by reading the slots, and reports both ends
    changed with exact counts."""
    tracer = harness.tracer
    with listener() as lsock:
        client, server = connect_pair(lsock)
        try:
            exchange(client, server, 10, 20)
            ends = _ends(tracer, lsock.getsockname()[1])
            assert len(ends) == 2
            tracer.poll()
            entries, slots = _entries(tracer), _slots(tracer)
            keys = {slots[entries[i].slot - 1][0] for i in ends}
            assert len(keys) == 2 and 0 not in keys
            sent = received = 0
            for round_ in range(1, 4):
                exchange(client, server, 100 * round_, 7 * round_)
                sent, received = sent + 100 * round_, received + 7 * round_
                raw_keys, _ = tracer._changes.read(delete=False)
                marked = set(raw_keys.cast("Q"))
                tracer._changes.release()
                assert not keys & marked, "bytes in a slot mark nothing"
                poll = tracer.poll()
                moved = sorted(
                    (s.sent_bytes, s.received_bytes) for s in poll.changed if s.socket_id in ends
                )
                client_counts = (10 + sent, 20 + received)
                assert moved == sorted([client_counts, client_counts[::-1]])
        finally:
            client.close()
            server.close()


def test_a_sockets_process_learned_on_the_slot_path_comes_with_the_next_poll(harness) -> None:
    """An accepted socket whose listener's process is not known (a listener older than the
    agent that seeding missed: its entry is overwritten with no process here) is tracked
    without one, so its slot sends the first byte call the slow way. That call sets the
    process and marks the entry: the next poll shows the process, no later change needed."""
    tracer = harness.tracer
    with listener() as lsock:
        port = lsock.getsockname()[1]
        netns = os.stat("/proc/self/ns/net").st_ino
        no_process = tracing.PROCESS_INFO.pack(0, b"")
        tracer._listeners.update(tracing.LISTENER_KEY.pack(netns, encode_port(port), 0), no_process)
        client, server = connect_pair(lsock)
        try:
            peer_port = server.getpeername()[1]

            def server_end():
                (end,) = [s for s in tracer.poll().live
                          if (s.local.port, s.remote.port) == (port, peer_port)]  # fmt: skip
                return end

            before = server_end()
            entry = _entries(tracer)[before.socket_id]
            needs_process = _slots(tracer)[entry.slot - 1][4]
            assert (before.pid, needs_process) == (0, 1), "tracked with no process"
            send_exact(server, 3)
            recv_exact(client, 3)
            after = server_end()
            assert (after.pid, after.sent_bytes) == (os.getpid(), 3)
            assert after.comm
        finally:
            client.close()
            server.close()


def test_a_socket_read_from_its_entry_and_its_slot_in_one_poll_is_reported_once(
    harness, monkeypatch
) -> None:
    """A new socket's entry is read (it was marked), then it moves bytes in its slot before
    the same poll scans the slots: the poll reports it once, with every byte."""
    tracer = harness.tracer
    tracer.poll()
    with listener() as lsock:
        client, server = connect_pair(lsock)
        try:
            send_exact(client, 1)  # each end's first byte clears needs_process (slow path)
            recv_exact(server, 1)
            read_entries = tracer._read_changed

            def read_then_move(keys):
                read = read_entries(keys)
                send_exact(client, 5)  # counted in the slot after the entry was read
                recv_exact(server, 5)
                return read

            with monkeypatch.context() as patch:
                patch.setattr(tracer, "_read_changed", read_then_move)
                poll = tracer.poll()
            port = lsock.getsockname()[1]
            mine = [s for s in poll.changed if port in (s.local.port, s.remote.port)]
            assert len(mine) == len({s.socket_id for s in mine}) == 2
            assert sorted((s.sent_bytes, s.received_bytes) for s in mine) == [(0, 6), (6, 0)]
        finally:
            client.close()
            server.close()


def test_a_retired_socket_frees_its_slot(harness) -> None:
    with listener() as lsock:
        client, server = connect_pair(lsock)
        exchange(client, server, 10, 20)
        ids = set(_ends(harness.tracer, lsock.getsockname()[1]))
        assert len(ids) == 2
        in_use = {owner_id for _, owner_id, *_ in _slots(harness.tracer)}
        assert ids <= in_use
        client.close()
        server.close()
        harness.settle()
        assert not ids & {s.socket_id for s in harness.tracer.poll().live}
        in_use = {owner_id for _, owner_id, *_ in _slots(harness.tracer)}
        assert not ids & in_use


@pytest.fixture
def own_tracer(backend):
    """A tracer of the test's own (white-box edits of its maps stay out of the session's)."""
    tracer = open_test_tracer(backend, Capacities(sockets=1024, closed=1024, listeners=64))
    yield tracer
    tracer.close()


def test_a_new_entry_takes_over_a_slot_still_naming_its_address(own_tracer) -> None:
    """give_slot's takeover: when a socket's entry is gone but its slot still names the
    address (staged here: the entry deleted from user space, the slot sent to the slow
    path), the socket's next call tracks it anew, and the new entry takes the slot with
    what it had counted: no byte the slot held is lost."""
    tracer = own_tracer
    with listener() as lsock:
        port = lsock.getsockname()[1]
        client, server = connect_pair(lsock)
        try:
            exchange(client, server, 10, 20)
            (old,) = [s for s in _ends(tracer, port).values() if s.remote.port == port]
            entry = _entries(tracer)[old.socket_id]
            index = entry.slot - 1
            sk, owner_id, sent, received, _, spare = _slots(tracer)[index]
            assert (owner_id, entry.sent + sent, entry.received + received) == (
                old.socket_id,
                10,
                20,
            )
            assert (entry.sent, entry.received) == (0, 0), "all in the slot: staged as lost"
            fds = tracer._program.map_fds
            delete_entry(fds["socks"], sk.to_bytes(8, "little"))
            slots = MapHandle(fds["slots"], 4, SLOT.size)
            slots.update(index.to_bytes(4, "little"), SLOT.pack(sk, owner_id, sent, received,
                                                                1, spare))  # fmt: skip
            send_exact(client, 7)
            recv_exact(server, 7)
            (new,) = [e for e in _entries(tracer).values() if e.id != old.socket_id
                      and _slots(tracer)[index][0] == sk and e.slot == index + 1]  # fmt: skip
            assert new.id > old.socket_id
            assert new.flags & SocketFlag.PREEXISTING and new.role == Role.CLIENT
            _, new_owner, slot_sent, slot_received, needs_process, _ = _slots(tracer)[index]
            assert (new_owner, needs_process) == (new.id, 0)
            assert (new.sent + slot_sent, new.received + slot_received) == (17, 20)
            (sample,) = [s for s in _ends(tracer, port).values() if s.socket_id == new.id]
            assert (sample.sent_bytes, sample.received_bytes) == (17, 20)
        finally:
            client.close()
            server.close()


@pytest.fixture
def two_slot_tracer(backend):
    tracer = open_test_tracer(backend, Capacities(sockets=1024, closed=1024, listeners=64,
                                                  slots=2))  # fmt: skip
    yield tracer
    tracer.close()


def test_sockets_that_find_no_free_slot_count_in_their_entries(two_slot_tracer) -> None:
    """Two slots for twelve sockets: at least ten count in their entries. Every count is
    exact - live, and closed through the final records (entry + slot)."""
    harness = Harness(two_slot_tracer)
    with listener() as lsock:
        port = lsock.getsockname()[1]
        pairs = [connect_pair(lsock) for _ in range(6)]
        try:
            for number, (client, server) in enumerate(pairs):
                exchange(client, server, 100 + number, 1000 + number)
            ends = _ends(two_slot_tracer, port)
            entries = _entries(two_slot_tracer)
            assert len(ends) == 12
            assert sum(1 for i in ends if entries[i].slot == 0) >= 10
            assert sum(1 for i in ends if entries[i].slot != 0) >= 1
            moved = sorted((s.sent_bytes, s.received_bytes) for s in ends.values())
            clients = [(100 + n, 1000 + n) for n in range(6)]
            assert moved == sorted(clients + [(b, a) for a, b in clients])
        finally:
            for client, server in pairs:
                client.close()
                server.close()
        harness.settle()
    request = sum(100 + n for n in range(6))
    response = sum(1000 + n for n in range(6))
    totals = harness.connection_totals(service_of(("127.0.0.1", port)))
    assert totals == {
        ("istio_tcp_received_bytes_total", "source"): request,
        ("istio_tcp_received_bytes_total", "destination"): request,
        ("istio_tcp_sent_bytes_total", "source"): response,
        ("istio_tcp_sent_bytes_total", "destination"): response,
        ("istio_tcp_connections_opened_total", "source"): 6,
        ("istio_tcp_connections_opened_total", "destination"): 6,
        ("istio_tcp_connections_closed_total", "source"): 6,
        ("istio_tcp_connections_closed_total", "destination"): 6,
    }


def test_slots_are_planned_from_linux_5_12_on_x86_64_only() -> None:
    """The slot array's user-space reads need loads kept in order (x86-64): elsewhere every
    backend counts in map entries, as on kernels before 5.12."""
    btf = Btf.from_path(Path("/sys/kernel/btf/vmlinux"))
    for backend in ("fentry", "kprobe"):
        older = plan_backend(backend, btf, release="5.11.22", for_attaching=False, machine="x86_64")
        newer = plan_backend(backend, btf, release="5.12.0", for_attaching=False, machine="x86_64")
        assert (older.slots, newer.slots) == (False, True)
    release = os.uname().release
    assert plan_backend("tracepoint", btf, release=release, machine="x86_64").slots
    for backend in ("tracepoint", "fentry", "kprobe"):
        arm = plan_backend(backend, btf, release=release, for_attaching=False, machine="aarch64")
        assert not arm.slots, backend
    assert plan_backend("tracepoint", btf, release=release).slots == (
        os.uname().machine == "x86_64"
    )


@pytest.fixture
def slotless_tracer(backend, monkeypatch):
    """The program as a kernel before 5.12 gets it: no -DSLOTS, no slots map."""
    planned = tracing.plan_backend
    monkeypatch.setattr(
        tracing, "plan_backend", lambda *a, **k: dataclasses.replace(planned(*a, **k), slots=False)
    )
    tracer = open_test_tracer(backend, Capacities(sockets=1024, closed=1024, listeners=64))
    yield tracer
    tracer.close()


def test_without_slots_every_socket_counts_in_its_entry_exactly(slotless_tracer) -> None:
    assert "slots" not in slotless_tracer._program.map_fds
    harness = Harness(slotless_tracer)
    with listener() as lsock:
        port = lsock.getsockname()[1]
        client, server = connect_pair(lsock)
        for _ in range(3):
            exchange(client, server, 700, 900)
        ends = _ends(slotless_tracer, port)
        assert sorted((s.sent_bytes, s.received_bytes) for s in ends.values()) == [
            (2100, 2700),
            (2700, 2100),
        ]
        assert all(entry.slot == 0 for entry in _entries(slotless_tracer).values())
        client.close()
        server.close()
        harness.settle()
    totals = harness.connection_totals(service_of(("127.0.0.1", port)))
    assert totals[("istio_tcp_received_bytes_total", "source")] == 2100
    assert totals[("istio_tcp_sent_bytes_total", "destination")] == 2700
    assert totals[("istio_tcp_connections_closed_total", "destination")] == 1

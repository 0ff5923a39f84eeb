"""Exact byte counts against the bytes the test moved and the kernel's own tcp_info.

Direction is bound to the connection (Istio): received = client -> server (a client's writes,
a server's reads), sent = server -> client. The client socket reports as "source", the server
socket as "destination"; both ends are on this host, so both reporters appear.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
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
    recv_exact,
    send_exact,
    service_of,
    tcp_info_bytes,
)


def assert_connection(
    harness,
    service: str,
    request: int,
    response: int,
    connections: int = 1,
    closed: int | None = None,
) -> None:
    totals = harness.connection_totals(service)
    closed = connections if closed is None else closed
    expected = {
        (RECEIVED, "source"): request,
        (RECEIVED, "destination"): request,
        (SENT, "source"): response,
        (SENT, "destination"): response,
        (OPENED, "source"): connections,
        (OPENED, "destination"): connections,
        (CLOSED, "source"): closed,
        (CLOSED, "destination"): closed,
    }
    assert totals == expected


@pytest.mark.parametrize(
    ("family", "bind_host", "connect_host", "client_family"),
    [
        (socket.AF_INET, "127.0.0.1", None, None),
        (socket.AF_INET6, "::1", None, None),
        # an IPv6 socket talking to an IPv4 address: IPv4-mapped, folded to IPv4
        (socket.AF_INET6, "::", "::ffff:127.0.0.1", socket.AF_INET6),
    ],
    ids=["ipv4", "ipv6", "ipv4-mapped"],
)
def test_one_connection_exact_and_matches_tcp_info(
    harness, family, bind_host, connect_host, client_family
):
    request, response = 1_234_567, 765_432
    with listener(family, bind_host) as lsock:
        client, server = connect_pair(lsock, client_family, connect_host)
        exchange(client, server, request, response)
        assert tcp_info_bytes(client, active_opener=True) == (request, response)
        assert tcp_info_bytes(server, active_opener=False) == (response, request)
        harness.poll()
        port = lsock.getsockname()[1]
        host = "127.0.0.1" if connect_host == "::ffff:127.0.0.1" else bind_host
        service = service_of((host, port))
        # counted while open, before any close
        assert harness.total(RECEIVED, destination_service=service, reporter="source") == request
        assert harness.total(SENT, destination_service=service, reporter="destination") == response
        client.close()
        server.close()
    harness.settle()
    assert_connection(harness, service, request, response)


def test_labels_name_local_processes_in_local_mode(harness):
    with listener() as lsock:
        client, server = connect_pair(lsock)
        exchange(client, server, 10, 20)
        harness.poll(2)
        service = service_of(lsock.getsockname())
        rows = harness.series(RECEIVED, destination_service=service)
        name = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        assert {(r["reporter"], r["source_workload"], r["destination_workload"]) for r in rows} == {
            ("source", name, name),
            ("destination", name, name),
        }
        assert all(r["request_protocol"] == "tcp" and r["response_flags"] == "-" for r in rows)
        client.close()
        server.close()


def test_200_concurrent_connections(harness):
    count, request, response = 200, 3_000, 5_000
    with listener() as lsock:
        pairs = [connect_pair(lsock) for _ in range(count)]
        threads = [
            threading.Thread(target=exchange, args=(c, s, request, response)) for c, s in pairs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        service = service_of(lsock.getsockname())
        for client, server in pairs:
            client.close()
            server.close()
    harness.settle()
    assert_connection(harness, service, count * request, count * response, connections=count)


def test_connections_that_open_and_close_between_two_polls(harness):
    harness.poll()
    with listener() as lsock:
        for size in (1, 10, 1000, 100_000):
            client, server = connect_pair(lsock)
            exchange(client, server, size, 2 * size)
            client.close()
            server.close()
        service = service_of(lsock.getsockname())
    harness.settle()
    assert_connection(harness, service, 101_011, 202_022, connections=4)


def test_sendfile_is_counted(harness):
    size = 3_000_000
    with tempfile.TemporaryFile() as blob, listener() as lsock:
        blob.write(os.urandom(size))
        blob.flush()
        client, server = connect_pair(lsock)
        reader = threading.Thread(target=recv_exact, args=(server, size))
        reader.start()
        offset = 0
        while offset < size:
            offset += os.sendfile(client.fileno(), blob.fileno(), offset, size - offset)
        reader.join()
        service = service_of(lsock.getsockname())
        assert tcp_info_bytes(client, active_opener=True)[0] == size
        client.close()
        server.close()
    harness.settle()
    assert_connection(harness, service, size, 0)


def test_msg_peek_is_not_counted_and_recv_into_recvmsg_are(harness):
    with listener() as lsock:
        client, server = connect_pair(lsock)
        client.sendall(b"a" * 5000)
        time.sleep(0.05)
        assert len(server.recv(5000, socket.MSG_PEEK)) > 0  # not counted
        assert len(server.recv(5000, socket.MSG_PEEK)) > 0
        buffer = bytearray(2000)
        got = server.recv_into(buffer, 2000, socket.MSG_WAITALL)
        data, _, _, _ = server.recvmsg(3000, 0, socket.MSG_WAITALL)
        assert got + len(data) == 5000
        server.sendall(b"b" * 300)
        view = bytearray(300)
        assert (
            client.recvmsg_into(
                [memoryview(view)[:100], memoryview(view)[100:]], 0, socket.MSG_WAITALL
            )[0]
            == 300
        )
        service = service_of(lsock.getsockname())
        client.close()
        server.close()
    harness.settle()
    assert_connection(harness, service, 5000, 300)


def test_large_waitall_read_against_a_trickling_writer(harness):
    """One receive call that the kernel completes in many pieces: counted once, exactly."""
    size, piece = 400_000, 1_000
    with listener() as lsock:
        client, server = connect_pair(lsock)

        def trickle():
            for _ in range(size // piece):
                client.sendall(b"t" * piece)
                time.sleep(0.0002)

        writer = threading.Thread(target=trickle)
        writer.start()
        data = server.recv(size, socket.MSG_WAITALL)
        writer.join()
        assert len(data) == size
        service = service_of(lsock.getsockname())
        assert tcp_info_bytes(server, active_opener=False)[1] == size
        client.close()
        server.close()
    harness.settle()
    assert_connection(harness, service, size, 0)


def test_nonblocking_partial_writes_count_what_moved(harness):
    with listener() as lsock:
        client, server = connect_pair(lsock)
        client.setblocking(False)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        moved, refused = 0, 0
        payload = b"p" * 1_000_000
        for _ in range(50):
            try:
                moved += client.send(payload)  # partial: far less than asked
            except BlockingIOError:
                refused += 1
                break
        assert 0 < moved < 50 * len(payload)
        client.setblocking(True)
        recv_exact(server, moved)
        service = service_of(lsock.getsockname())
        client.close()
        server.close()
    harness.settle()
    assert_connection(harness, service, moved, 0)


def test_udp_is_ignored(harness):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(100):
        sender.sendto(b"u" * 1000, receiver.getsockname())
        receiver.recv(2000)
    harness.poll(2)
    ports = {receiver.getsockname()[1], sender.getsockname()[1]}
    tracked_ports = {s.local.port for s in harness.last_samples}
    assert not ports & tracked_ports
    sender.close()
    receiver.close()


def test_half_close_reply_read_after_fin(harness):
    """The client shuts down its write side, then reads the reply after the server's FIN."""
    request, response = 50_000, 80_000
    with listener() as lsock:
        client, server = connect_pair(lsock)
        send_exact(client, request)
        client.shutdown(socket.SHUT_WR)
        recv_exact(server, request)
        assert server.recv(1) == b""  # the client's FIN
        send_exact(server, response)
        server.close()  # FIN to the client; the server end is gone
        time.sleep(0.05)
        harness.poll()
        recv_exact(client, response)  # read after the peer's FIN
        assert client.recv(1) == b""
        service = service_of(lsock.getsockname())
        client.close()
    harness.settle()
    assert_connection(harness, service, request, response)


def test_queued_data_read_after_rst(harness):
    """The peer resets; data already queued is still read, and counted exactly once."""
    queued = 30_000
    with listener() as lsock:
        client, server = connect_pair(lsock)
        send_exact(server, queued)
        time.sleep(0.05)
        # RST: SO_LINGER with a zero timeout
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        server.close()
        time.sleep(0.05)
        harness.poll()  # the client socket is in TCP_CLOSE now, data still queued
        got = 0
        try:
            while got < queued:
                data = client.recv(65536)
                if not data:
                    break
                got += len(data)
        except ConnectionResetError:
            pass
        assert got == queued
        service = service_of(lsock.getsockname())
        client.close()
    harness.settle()
    assert_connection(harness, service, 0, queued)


def test_ten_thousand_sequential_short_connections(harness):
    """struct sock addresses are reused constantly; every connection still counts once."""
    count = 10_000
    with listener() as lsock:
        address = lsock.getsockname()
        for i in range(count):
            client = socket.create_connection(address)
            server, _ = lsock.accept()
            client.sendall(b"q" * (i % 7 + 1))
            recv_exact(server, i % 7 + 1)
            server.sendall(b"r" * (i % 5 + 1))
            recv_exact(client, i % 5 + 1)
            client.close()
            server.close()
            if i % 2500 == 0:
                harness.poll()
        service = service_of(address)
    harness.settle()
    request = sum(i % 7 + 1 for i in range(count))
    response = sum(i % 5 + 1 for i in range(count))
    assert_connection(harness, service, request, response, connections=count)
    assert harness.accountant.stats().unattributed_sent_bytes == 0


def test_a_poll_reads_only_the_sockets_that_changed(harness):
    """Incremental polls: after one connection of 40 moves bytes, the poll's changed
    samples are exactly its two ends; idle sockets stay live without being re-read."""
    with listener() as lsock:
        pairs = [connect_pair(lsock) for _ in range(40)]
        try:
            for client, server in pairs:
                exchange(client, server, 10, 20)
            harness.poll(2)
            port = lsock.getsockname()[1]
            ours = {
                s.socket_id
                for s in harness.tracer.poll().live
                if port in (s.local.port, s.remote.port)
            }
            assert len(ours) == 80
            client, server = pairs[7]
            exchange(client, server, 3, 4)
            result = harness.tracer.poll()
            changed = [s for s in result.changed if port in (s.local.port, s.remote.port)]
            ends = {(s.local.port, s.sent_bytes, s.received_bytes) for s in changed}
            assert ends == {
                (client.getsockname()[1], 13, 24),
                (port, 24, 13),
            }
            assert ours <= {s.socket_id for s in result.live}
            harness.accountant.apply(result)
            harness.settle()
            assert_connection(
                harness, service_of(("127.0.0.1", port)), 40 * 10 + 3, 40 * 20 + 4, 40, 0
            )
        finally:
            for client, server in pairs:
                client.close()
                server.close()


def test_nested_lifecycle_handlers_alone_count_exactly(backend):
    """The kernel never re-enters a program on a CPU: a lifecycle event that fires while
    on_set_state/on_destroy runs there (a softirq interrupting process context) is skipped
    for it and handled by its twin, which acts while the primary is marked busy. Here only
    the twins are attached and 'busy' is forced on every CPU, so every event goes down the
    twins' path: counts must be as exact as ever."""
    import struct

    from agent.ebpf.decoding import C_LIFECYCLE_NESTED
    from agent.ebpf.syscalls import MapHandle, possible_cpus
    from agent.ebpf.tracing import Capacities
    from tests.support.harness import Harness, open_test_tracer

    tracer = open_test_tracer(backend, Capacities(sockets=4096, closed=4096))
    try:
        primaries = [h for h in tracer._plan.hooks if h.function in ("on_set_state", "on_destroy")]
        assert len(primaries) == 2
        tracer._program.detach(primaries)
        cpus = possible_cpus()
        busy = MapHandle(tracer._program.map_fds["lifecycle_busy"], 4, 4, cpus=cpus)
        for which in (0, 1):  # BUSY_SET_STATE, BUSY_DESTROY
            busy.update(struct.pack("<I", which), struct.pack(f"<{cpus}Q", *[1] * cpus))
        harness = Harness(tracer)
        nested_before = tracer._read_counters()[C_LIFECYCLE_NESTED]
        with listener() as lsock:
            client, server = connect_pair(lsock)
            exchange(client, server, 4321, 8765)
            client.close()
            server.close()
            time.sleep(0.2)
            harness.settle()
            assert_connection(harness, service_of(lsock.getsockname()), 4321, 8765)
        # the twins count what they handle: at least this connection's two destroys and the
        # state changes both ends go through (connect, established twice, close twice, ...)
        assert tracer._read_counters()[C_LIFECYCLE_NESTED] - nested_before >= 12
        assert tracer.poll().counters.lifecycle_events_missed == 0  # no primary missed any
    finally:
        tracer.close()


def test_bytes_after_a_read_in_the_round_that_marked_them_come_with_the_next_poll(
    harness, monkeypatch
):
    """A socket whose first change of a poll round lands between the round's start and the
    read of ``changed`` is read in that poll; a second change in the same round marks
    nothing (the entry already carries the round). The next poll must still read it, or
    those bytes would wait for the socket's next activity or close."""
    with listener() as lsock:
        client, server = connect_pair(lsock)
        try:
            exchange(client, server, 10, 20)
            harness.poll(2)
            tracer = harness.tracer
            next_round = tracer._next_round

            def round_then_one_byte() -> None:
                next_round()
                send_exact(client, 1)  # marked in the new round, before `changed` is read

            with monkeypatch.context() as patch:
                patch.setattr(tracer, "_next_round", round_then_one_byte)
                first = tracer.poll()
            port = client.getsockname()[1]
            (read,) = [s for s in first.changed if s.local.port == port]
            assert read.sent_bytes == 11
            send_exact(client, 1)  # same round: the entry is not marked again
            second = tracer.poll()
            (mine,) = [s for s in second.live if s.local.port == port]
            assert mine.sent_bytes == 12
            assert mine in second.changed
            recv_exact(server, 2)
        finally:
            client.close()
            server.close()


def test_a_settled_live_socket_shows_its_close_at_the_next_poll(harness):
    """A client socket whose reads found nothing but its counters changed - settled (later
    reads of its entry take its counters only) or, with a slot, not read again at all (its
    bytes come from its slot) - then reset by its peer while its application still holds
    it: the next poll shows it CLOSED with the bytes it read (the kernel bumps the entry's
    version at TCP_CLOSE and marks it)."""
    from agent.model import SocketFlag

    with listener() as lsock:
        client, server = connect_pair(lsock)
        port = client.getsockname()[1]

        def client_sample():
            for sample in harness.tracer.poll().live:
                if sample.local.port == port and sample.remote.port == lsock.getsockname()[1]:
                    return sample
            raise AssertionError("client socket not live")

        for _ in range(3):  # read new, compared whole and settled, read for counters
            send_exact(server, 1000)
            recv_exact(client, 1000)
            settled = client_sample()
        assert settled.received_bytes == 3000 and not settled.flags & SocketFlag.CLOSED
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        server.close()
        time.sleep(0.05)
        closed = client_sample()
        assert closed.flags & SocketFlag.CLOSED
        assert closed.received_bytes == 3000
        client.close()
    harness.settle()


def _socket_map_key(tracer, socket_id: int) -> int:
    """The socket map key (its struct sock address) of the live entry with ``socket_id``."""
    raw_keys, raw = tracer._socks.read(delete=False)
    try:
        keys = raw_keys.cast("B").cast("Q")
        ids = [int.from_bytes(raw[o : o + 8], "little") for o in range(0, len(raw), 104)]
        return keys[ids.index(socket_id)]
    finally:
        tracer._socks.release()


def test_an_opened_entry_at_an_address_that_opens_again_ends_before_the_new_one(harness):
    """When an opened socket's destroy is never seen (tcpacct_lifecycle_events_missed_total)
    its entry stays; a new connection's server end at the same address must not take over
    its id. Simulated by running on_set_state (SYN_RECV -> ESTABLISHED) once more with
    BPF_PROG_TEST_RUN on a live server socket: the old entry ends with its counts, and what
    moves afterwards is the new entry's."""
    from agent.model import Role, SocketFlag
    from tests.support.prog_test_run import run_raw_tracepoint

    tracer = harness.tracer
    with listener() as lsock:
        client, server = connect_pair(lsock)
        try:
            exchange(client, server, 1000, 2000)
            port, peer_port = lsock.getsockname()[1], client.getsockname()[1]

            def server_end(samples):
                return [s for s in samples if (s.local.port, s.remote.port) == (port, peer_port)]

            (old,) = server_end(tracer.poll().live)
            key = _socket_map_key(tracer, old.socket_id)
            run_raw_tracepoint(tracer._program.program_fds["on_set_state"], [key, 3, 1])
            exchange(client, server, 10, 20)
            result = tracer.poll()
            (ended,) = server_end(result.finished)
            assert ended.socket_id == old.socket_id
            assert (ended.received_bytes, ended.sent_bytes) == (1000, 2000)
            assert SocketFlag.OPENED in ended.flags and SocketFlag.DESTROYED in ended.flags
            (new,) = server_end(result.live)
            assert new.socket_id > old.socket_id
            assert (new.received_bytes, new.sent_bytes, new.role) == (10, 20, Role.SERVER)
            assert SocketFlag.OPENED in new.flags and new.pid == os.getpid()
        finally:
            client.close()
            server.close()

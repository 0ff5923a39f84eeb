"""Detaching and attaching the kernel hooks of a loaded tracer, as the benchmark's agent-off,
agent-on and design-variant rounds do (KernelTracer.detach_hooks / attach_hooks)."""

from __future__ import annotations

import os
import socket

import pytest

from agent.ebpf.backends import LIFECYCLE_PRIMARIES, LIFECYCLE_TRACEPOINTS
from agent.ebpf.syscalls import enable_run_time_stats
from agent.ebpf.tracing import Capacities, KernelTracer
from agent.model import Role, SocketFlag, SocketSample
from tests.support.harness import (
    listener,
    live_by_ports,
    open_test_tracer,
    recv_exact,
    send_exact,
)


def _connection(
    tracer: KernelTracer, lsock: socket.socket, size: int
) -> tuple[SocketSample | None, ...]:
    """One loopback connection to ``lsock`` moving ``size`` bytes client -> server, polled
    while both ends are open: the (client, server) samples found by their ports, None where
    none was."""
    with socket.create_connection(lsock.getsockname()) as client:
        server, _ = lsock.accept()
        with server:
            send_exact(client, size)
            recv_exact(server, size)
            live = live_by_ports(tracer)
            return tuple(
                live.get((end.getsockname()[1], end.getpeername()[1])) for end in (client, server)
            )


def test_detached_hooks_see_nothing_and_attach_without_leaves_those_hooks_out(
    tracer: KernelTracer, backend: str
) -> None:
    """Detached: a connection leaves no entry. Attached without inet_sock_set_state: both
    ends are made at their first byte (PREEXISTING, never OPENED), bytes exact, the server
    known as such by its listener (recorded when it listened, hooks attached). Attached
    without the recursion twins (named by program): both ends OPENED, bytes exact, and the
    kernel ran no twin while the primaries ran. Attached whole again: both ends OPENED.
    ``tracer`` (the session's) only checks that BPF loads here."""
    own = open_test_tracer(backend, Capacities(sockets=1024, closed=1024, listeners=64))
    try:
        if own.backend != "tracepoint":
            # fentry and kprobe data hooks are attached by bcc, which detaches them only all
            # together: the benchmark switches hooks on the tracepoint backend alone
            with pytest.raises(RuntimeError, match=r"cannot detach a .* hook alone"):
                own.detach_hooks()
            return
        with listener() as lsock:
            _switch_and_connect(own, lsock)
    finally:
        own.close()


def _switch_and_connect(own: KernelTracer, lsock: socket.socket) -> None:
    own.detach_hooks()
    assert _connection(own, lsock, 100) == (None, None)

    own.attach_hooks(without=("inet_sock_set_state",))
    client, server = _connection(own, lsock, 300)
    assert client is not None and server is not None
    assert (client.sent_bytes, server.received_bytes) == (300, 300)
    for end in (client, server):
        assert SocketFlag.PREEXISTING in end.flags and SocketFlag.OPENED not in end.flags
    assert (client.role, server.role) == (Role.CLIENT, Role.SERVER)

    own.detach_hooks()
    twins = tuple(name for _, name in LIFECYCLE_TRACEPOINTS if name not in LIFECYCLE_PRIMARIES)
    own.attach_hooks(without=twins)
    stats_fd = enable_run_time_stats()
    try:
        before = own.program_stats()
        client, server = _connection(own, lsock, 400)
        after = own.program_stats()
    finally:
        os.close(stats_fd)
    assert client is not None and server is not None
    assert (client.sent_bytes, server.received_bytes) == (400, 400)
    for end in (client, server):
        assert SocketFlag.OPENED in end.flags and SocketFlag.PREEXISTING not in end.flags
    assert {name: after[name].runs - before[name].runs for name in twins} == dict.fromkeys(twins, 0)
    assert all(after[name].runs > before[name].runs for name in LIFECYCLE_PRIMARIES)

    own.detach_hooks()
    own.attach_hooks()
    client, server = _connection(own, lsock, 500)
    assert client is not None and server is not None
    assert (client.sent_bytes, server.received_bytes) == (500, 500)
    for end in (client, server):
        assert SocketFlag.OPENED in end.flags and SocketFlag.PREEXISTING not in end.flags

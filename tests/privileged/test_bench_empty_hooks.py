"""The churn floor's empty programs (bench/empty_hooks.py): attached once per name given,
on the tracepoints tcpacct's tracepoint backend uses, and detached after the block — so
the floor figure measures the dispatch of exactly tcpacct's attachments. No timing is
asserted."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.ebpf.syscalls import enable_run_time_stats, program_run_stats
from bench.empty_hooks import DATA_TRACEPOINTS, EmptyHooks, tcpacct_attachments

SENDS = 200


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to load BPF (run: sudo make test)", pytrace=False)


def _one_byte_sends(count: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            for _ in range(count):
                client.sendall(b"x")
                assert server.recv(1) == b"x"


def test_tcpacct_attachments_are_the_tracepoint_backends_hooks() -> None:
    attachments = tcpacct_attachments()
    assert sorted(attachments) == sorted(
        ["inet_sock_set_state"] * 2 + ["tcp_destroy_sock"] * 2 + list(DATA_TRACEPOINTS)
    )


def test_an_empty_program_runs_once_per_attachment_and_not_after_the_block() -> None:
    """Attached twice to sock_send_length, SENDS one-byte sends run it at least 2 x SENDS
    times (other processes' sends may add); after the block, none."""
    empty = EmptyHooks()
    stats_fd = enable_run_time_stats()
    try:
        with empty.attached(("sock_send_length", "sock_send_length")):
            before = program_run_stats(empty.program_fd).runs
            _one_byte_sends(SENDS)
            during = program_run_stats(empty.program_fd).runs - before
        after = program_run_stats(empty.program_fd).runs
        _one_byte_sends(50)
        detached = program_run_stats(empty.program_fd).runs - after
    finally:
        os.close(stats_fd)
        empty.close()
    assert during >= 2 * SENDS
    if Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "0":
        assert detached == 0

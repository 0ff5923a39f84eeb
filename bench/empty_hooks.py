"""Empty raw-tracepoint programs on a chosen set of tracepoints: the floor of a hook set.

A program of two instructions (``r0 = 0; exit``) is loaded once with ``bpf(2)`` and
attached as many times as a hook set names a tracepoint. Whatever a workload loses with
it attached is the kernel's cost of firing those tracepoints into BPF at all (the
dispatch, with this machine's Spectre mitigations and cold caches), before any program
does any work: ``EmptyHooks().attached(("tcp_destroy_sock", "tcp_destroy_sock"))`` runs
the empty program twice per destroyed socket, as tcpacct's primary and twin would.
"""

from __future__ import annotations

import os
import platform
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.ebpf.backends import plan_backend
from agent.ebpf.btf import Btf
from agent.ebpf.syscalls import BPF_PROG_TYPE_RAW_TRACEPOINT, load_program, open_raw_tracepoint

# r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K), exit (BPF_JMP | BPF_EXIT): 8 bytes each
EMPTY_INSTRUCTIONS = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
DATA_TRACEPOINTS = ("sock_send_length", "sock_recv_length")


def tcpacct_attachments(btf_path: Path = Path("/sys/kernel/btf/vmlinux")) -> tuple[str, ...]:
    """The tracepoints tcpacct's tracepoint backend attaches a program to on this kernel,
    once per program: ``("inet_sock_set_state", "inet_sock_set_state", "tcp_destroy_sock",
    "tcp_destroy_sock", "sock_send_length", "sock_recv_length")`` (each lifecycle handler
    with its twin)."""
    plan = plan_backend("tracepoint", Btf.from_path(btf_path), release=platform.release())
    return tuple(hook.target for hook in plan.hooks)


class EmptyHooks:
    """One loaded empty program, attached per block to any tracepoints (not attached
    outside them). Close it when done."""

    def __init__(self) -> None:
        self.program_fd = load_program("empty", BPF_PROG_TYPE_RAW_TRACEPOINT, EMPTY_INSTRUCTIONS)

    @contextmanager
    def attached(self, tracepoints: Iterable[str]) -> Iterator[None]:
        """The empty program on each of ``tracepoints`` (a name twice: attached twice)."""
        links: list[int] = []
        try:
            for tracepoint in tracepoints:
                links.append(open_raw_tracepoint(tracepoint, self.program_fd))
            yield
        finally:
            for link in links:
                os.close(link)

    def close(self) -> None:
        os.close(self.program_fd)

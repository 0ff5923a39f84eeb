"""Run a loaded raw-tracepoint program once, in this process, with arguments the test
chooses (BPF_PROG_TEST_RUN, Linux >= 5.10): a lifecycle event the kernel did not fire.

``run_raw_tracepoint(fd, [sock_address, 3, 1])`` runs the program as
``inet_sock_set_state(sk, TCP_SYN_RECV, TCP_ESTABLISHED)`` would, and returns its return
value. The program reads the socket through ``bpf_probe_read_kernel`` as it always does, so
``sock_address`` must be a live socket's (a key of the tracer's socket map).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from agent.ebpf.syscalls import bpf

BPF_PROG_TEST_RUN = 10


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


def run_raw_tracepoint(program_fd: int, arguments: Sequence[int]) -> int:
    args = (ctypes.c_uint64 * len(arguments))(*arguments)
    attr = _TestRunAttr(
        prog_fd=program_fd, ctx_size_in=ctypes.sizeof(args), ctx_in=ctypes.addressof(args)
    )
    bpf(BPF_PROG_TEST_RUN, attr)
    return int(attr.retval)

"""A socket's identity as the kernel side reads it: both ends of IPv4, IPv6 and IPv4-mapped
connections, with sock_common's fields read in one block (bpf/tcpacct.c read_common) and
field by field (the path for kernels whose fields lie more than SKC_SPAN_MAX bytes apart,
taken here by compiling with -DSKC_SPAN_MAX=0)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from agent.ebpf.tracing import BPF_DIR, Capacities, KernelTracer, open_tracer
from agent.model import Role
from tests.support.harness import listener, live_by_ports, recv_exact, send_exact

# (listener family and address, client family, client's own address, address it connects
# to): the two ends' addresses differ where loopback allows it (127.0.0.0/8), so an address
# read from the wrong field shows; IPv6 loopback has ::1 alone, and IPv4-mapped addresses
# put two different ones into the IPv6 fields
CASES = [
    (socket.AF_INET, "127.0.0.2", socket.AF_INET, "127.0.0.3", "127.0.0.2"),
    (socket.AF_INET6, "::1", socket.AF_INET6, "::1", "::1"),
    (socket.AF_INET6, "::", socket.AF_INET6, "::ffff:127.0.0.3", "::ffff:127.0.0.2"),
]


def _bpf_dir(tmp_path: Path, field_by_field: bool) -> Path:
    """bpf/ as shipped, or a copy whose tcpacct.c reads sock_common field by field."""
    if not field_by_field:
        return BPF_DIR
    copy = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, copy)
    source = copy / "tcpacct.c"
    source.write_text("#define SKC_SPAN_MAX 0\n" + source.read_text())
    return copy


def _folded(address: str) -> str:
    """``"::ffff:127.0.0.1"`` -> ``"127.0.0.1"`` (the tracer folds IPv4-mapped addresses)."""
    return address.removeprefix("::ffff:")


@pytest.mark.parametrize("field_by_field", [False, True], ids=["one-read", "field-by-field"])
def test_both_ends_identity_is_the_sockets_own(
    tracer: KernelTracer, backend: str, tmp_path: Path, field_by_field: bool
) -> None:
    """``tracer`` (the session's) only checks that BPF loads here, as every privileged test."""
    own = open_tracer(
        backend,
        capacities=Capacities(sockets=1024, closed=1024, listeners=64),
        bpf_dir=_bpf_dir(tmp_path, field_by_field),
        compile_cache=tmp_path / "cache",
    )
    netns = os.stat("/proc/self/ns/net").st_ino
    try:
        for family, listen_host, client_family, client_host, connect_host in CASES:
            with listener(family, listen_host) as lsock, socket.socket(client_family) as client:
                client.bind((client_host, 0))
                client.connect((connect_host, lsock.getsockname()[1]))
                server, _ = lsock.accept()
                with server:
                    send_exact(client, 300)
                    recv_exact(server, 300)
                    live = live_by_ports(own)
                    for sock, role in ((client, Role.CLIENT), (server, Role.SERVER)):
                        local, remote = sock.getsockname(), sock.getpeername()
                        sample = live[(local[1], remote[1])]
                        assert (sample.local.address, sample.local.port) == (
                            _folded(local[0]),
                            local[1],
                        )
                        assert (sample.remote.address, sample.remote.port) == (
                            _folded(remote[0]),
                            remote[1],
                        )
                        assert (sample.role, sample.netns, sample.pid) == (
                            role,
                            netns,
                            os.getpid(),
                        )
    finally:
        own.close()

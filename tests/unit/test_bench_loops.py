"""The C send/recv loops' reports as the benchmark reads them, and the binary cache's names
(pure: nothing is compiled or timed here)."""

from __future__ import annotations

import pytest

from bench.accuracy import compare
from bench.native import binary_name
from bench.workloads import Moved, moved_from_loops

TCP_REPORT = {
    "kind": "tcp", "cpu": 1, "iterations": 400, "seconds": 0.004,
    "block_seconds": [0.0013, 0.0009, 0.0008, 0.001],
    "client_sent": 400, "client_received": 0, "server_sent": 0, "server_received": 400,
    "server_port": 80, "client_port": 5000,
    "tcp_info": {"client_acked": 401, "client_received": 0, "server_acked": 0,
                 "server_received": 400},
}  # fmt: skip


def test_tcp_report_is_what_the_python_loop_returned() -> None:
    moved = moved_from_loops(TCP_REPORT)
    assert (moved.name, moved.server_port, moved.operations, moved.connections) == (
        "send_recv", 80, 400, 1,
    )  # fmt: skip
    assert (moved.client_sent, moved.server_received, moved.client_received) == (400, 400, 0)
    assert moved.sequence_octets == {"client_acked": 1}
    assert moved.ns_per_call == pytest.approx(5_000.0)  # 0.004 s / 800 calls
    assert moved.fastest_ns_per_call == pytest.approx(4_000.0)  # 0.0008 s / 200 calls
    sockets = [
        {"role": "client", "local": ["127.0.0.1", 5000], "remote": ["127.0.0.1", 80],
         "sent": 400, "received": 0},
        {"role": "server", "local": ["127.0.0.1", 80], "remote": ["127.0.0.1", 5000],
         "sent": 0, "received": 400},
    ]  # fmt: skip
    service = {
        "istio_tcp_received_bytes_total": {"source": 400, "destination": 400},
        "istio_tcp_connections_opened_total": {"source": 1, "destination": 1},
        "istio_tcp_connections_closed_total": {"source": 1, "destination": 1},
    }
    checks = compare(moved, {"sockets": sockets, "services": {"127.0.0.1:80": service}})
    assert all(c["exact"] for c in checks), [c for c in checks if not c["exact"]]
    assert "tracer client_sent = tcp_info client_acked" in [c["check"] for c in checks]


def test_unix_report_has_no_connection() -> None:
    report = {
        "kind": "unix", "cpu": 1, "iterations": 10, "seconds": 1e-5, "block_seconds": [1e-5],
        "client_sent": 10, "client_received": 0, "server_sent": 0, "server_received": 10,
    }  # fmt: skip
    moved = moved_from_loops(report)
    assert (moved.name, moved.server_port, moved.connections, moved.tcp_info) == (
        "unix_send_recv", 0, 0, {},
    )  # fmt: skip
    assert moved.fastest_ns_per_call == moved.ns_per_call == pytest.approx(500.0)


def test_fastest_without_blocks_is_the_mean() -> None:
    assert Moved("x", 0, 2.0, 1_000).fastest_ns_per_call == pytest.approx(1e6)


def test_binary_name_follows_source_flags_and_compiler() -> None:
    name = binary_name("loops", b"int main(){}", ("-O2",), "gcc 12.2.0")
    assert name.startswith("loops-") and len(name) == len("loops-") + 16
    assert name == binary_name("loops", b"int main(){}", ("-O2",), "gcc 12.2.0")
    assert name != binary_name("loops", b"int main(){return 0;}", ("-O2",), "gcc 12.2.0")
    assert name != binary_name("loops", b"int main(){}", ("-O3",), "gcc 12.2.0")
    assert name != binary_name("loops", b"int main(){}", ("-O2",), "gcc 13.1.0")

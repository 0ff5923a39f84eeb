"""Test harness for the privileged tier: the real kernel side and real accounting, plus
ground truth from the kernel's own ``tcp_info`` and small socket helpers."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agent.accounting import Accountant
from agent.ebpf.tracing import Capacities, KernelTracer, open_tracer
from agent.enrich.local import LocalEnricher
from agent.metrics.catalogue import load_catalogue
from agent.model import SocketSample
from agent.resolve.listening import listening_sockets
from agent.resolve.processes import ProcessNames

SENT = "istio_tcp_sent_bytes_total"
RECEIVED = "istio_tcp_received_bytes_total"
OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"

TCP_INFO_SIZE = 232
TCPI_BYTES_ACKED = 120
TCPI_BYTES_RECEIVED = 128


def open_test_tracer(backend: str, capacities: Capacities | None = None) -> KernelTracer:
    return open_tracer(
        backend,
        capacities=capacities or Capacities(sockets=65536, closed=65536),
        listeners=listening_sockets,
    )


def live_by_ports(tracer: KernelTracer) -> dict[tuple[int, int], SocketSample]:
    """A fresh poll's live sockets by (local port, remote port): both ends of a loopback
    connection are two keys, ``(40000, 8080)`` and ``(8080, 40000)``."""
    return {(sample.local.port, sample.remote.port): sample for sample in tracer.poll().live}


def tcp_info_bytes(sock: socket.socket, *, active_opener: bool) -> tuple[int, int]:
    """Payload bytes (sent and acked, received) by the kernel's own tcp_info: ground truth.

    ``tcpi_bytes_acked`` counts acknowledged sequence space, which on the end that called
    connect() includes its SYN: one byte more than the payload. Read before any FIN (a FIN
    also takes a sequence number).
    """
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    acked, received = struct.unpack_from("<QQ", raw, TCPI_BYTES_ACKED)
    return acked - int(active_opener), received


class Harness:
    """Polls the tracer into a fresh accountant; answers questions about series."""

    def __init__(self, tracer: KernelTracer) -> None:
        self.tracer = tracer
        self.tracer.poll()  # drain what earlier tests left in the closed map
        self.accountant = Accountant(
            load_catalogue([]), LocalEnricher(ProcessNames().name), max_wait_polls=3
        )
        self.last_samples: list[SocketSample] = []

    def poll(self, times: int = 1) -> None:
        for _ in range(times):
            result = self.tracer.poll()
            self.last_samples = [*result.live, *result.finished]
            self.accountant.apply(result)

    def settle(self) -> None:
        """Enough polls for held-back sockets to be named and finished ones drained."""
        self.poll(5)

    def total(self, metric: str, **labels: str) -> int:
        """Sum of a metric's series whose labels match every given value."""
        total = 0
        for family in self.accountant.families():
            if family.name != metric:
                continue
            for values, value in family.samples.items():
                named = dict(zip(family.label_names, values, strict=True))
                if all(named.get(k) == v for k, v in labels.items()):
                    total += value
        return total

    def series(self, metric: str, **labels: str) -> list[dict[str, str]]:
        out = []
        for family in self.accountant.families():
            if family.name == metric:
                for values, value in family.samples.items():
                    named = dict(zip(family.label_names, values, strict=True))
                    if all(named.get(k) == v for k, v in labels.items()):
                        out.append({**named, "value": str(value)})
        return out

    def connection_totals(self, service: str) -> dict[tuple[str, str], int]:
        """{(metric, reporter): total} for every series with destination_service == service."""
        out: dict[tuple[str, str], int] = {}
        for metric in (SENT, RECEIVED, OPENED, CLOSED):
            for reporter in ("source", "destination"):
                out[(metric, reporter)] = self.total(
                    metric, destination_service=service, reporter=reporter
                )
        return out


def service_of(address: tuple) -> str:
    """A server socket name -> the local-mode destination_service label."""
    host, port = address[0], address[1]
    if ":" in host:
        host = (
            host.removeprefix("::ffff:")
            if host.startswith("::ffff:") and "." in host
            else f"[{host}]"
        )
    return f"{host}:{port}"


@dataclass
class Pair:
    client: socket.socket
    server: socket.socket
    listener: socket.socket

    def close(self) -> None:
        for sock in (self.client, self.server, self.listener):
            sock.close()


@contextmanager
def listener(family: int = socket.AF_INET, host: str = "127.0.0.1") -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(512)
    try:
        yield sock
    finally:
        sock.close()


def connect_pair(
    lsock: socket.socket, family: int | None = None, connect_host: str | None = None
) -> tuple[socket.socket, socket.socket]:
    name = lsock.getsockname()
    client = socket.socket(family or lsock.family, socket.SOCK_STREAM)
    client.connect((connect_host or name[0], name[1]))
    server, _ = lsock.accept()
    return client, server


def send_exact(sock: socket.socket, size: int, chunk: int = 65536) -> int:
    payload = b"x" * min(size, chunk)
    sent = 0
    while sent < size:
        sent += sock.send(payload[: min(chunk, size - sent)])
    return sent


def recv_exact(sock: socket.socket, size: int) -> int:
    got = 0
    while got < size:
        data = sock.recv(min(1 << 20, size - got))
        if not data:
            raise ConnectionError(f"peer closed after {got} of {size} bytes")
        got += len(data)
    return got


def exchange(client: socket.socket, server: socket.socket, request: int, response: int) -> None:
    """client writes ``request`` bytes, server reads them and writes ``response`` back."""
    reader = threading.Thread(target=recv_exact, args=(server, request))
    reader.start()
    send_exact(client, request)
    reader.join()
    reader = threading.Thread(target=recv_exact, args=(client, response))
    reader.start()
    send_exact(server, response)
    reader.join()

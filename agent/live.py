"""``tcpacct top``: a live view of connections and workload pairs, like bcc's tcptop with
tcpacct's labels, refreshed every interval. ``--once --json`` prints one snapshot."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from agent.accounting import Accountant, FamilySnapshot
from agent.model import KernelPoll, KernelReader, Role, SocketSample

SORT_KEYS = ("total", "tx", "rx")


@dataclass(frozen=True, slots=True)
class ConnectionRate:
    pid: int
    comm: str
    local: str
    remote: str
    role: str
    tx_per_second: float  # bytes the local process wrote, per second
    rx_per_second: float
    tx_total: int
    rx_total: int


@dataclass(frozen=True, slots=True)
class PairRate:
    source_workload: str
    destination_workload: str
    destination_service: str
    reporter: str
    received_per_second: float  # client -> server
    sent_per_second: float  # server -> client


@dataclass(frozen=True, slots=True)
class Snapshot:
    interval: float
    connections: list[ConnectionRate]
    pairs: list[PairRate]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class RateTracker:
    """Turns successive polls into per-connection and per-pair rates."""

    def __init__(self, accountant: Accountant) -> None:
        self._accountant = accountant
        self._last_socket: dict[int, tuple[int, int]] = {}
        self._last_pairs: dict[tuple[str, ...], tuple[int, int]] = {}

    def update(self, poll: KernelPoll, interval: float) -> Snapshot:
        self._accountant.apply(poll)
        rows = [self._connection(s, interval) for s in (*poll.live, *poll.finished)]
        for sample in poll.finished:
            self._last_socket.pop(sample.socket_id, None)
        return Snapshot(interval, rows, self._pairs(self._accountant.families(), interval))

    def _connection(self, sample: SocketSample, interval: float) -> ConnectionRate:
        sent0, received0 = self._last_socket.get(sample.socket_id, (0, 0))
        self._last_socket[sample.socket_id] = (sample.sent_bytes, sample.received_bytes)
        return ConnectionRate(
            pid=sample.pid,
            comm=sample.comm,
            local=str(sample.local),
            remote=str(sample.remote),
            role="server" if sample.role is Role.SERVER else "client",
            tx_per_second=(sample.sent_bytes - sent0) / interval,
            rx_per_second=(sample.received_bytes - received0) / interval,
            tx_total=sample.sent_bytes,
            rx_total=sample.received_bytes,
        )

    def _pairs(self, families: Iterable[FamilySnapshot], interval: float) -> list[PairRate]:
        received: dict[tuple[str, ...], int] = {}
        sent: dict[tuple[str, ...], int] = {}
        for family in families:
            if family.name not in ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"):
                continue
            index = {name: i for i, name in enumerate(family.label_names)}
            wanted = ("source_workload", "destination_workload", "destination_service", "reporter")
            if not all(name in index for name in wanted):
                continue
            target = received if family.name.startswith("istio_tcp_received") else sent
            for labels, value in family.samples.items():
                key = tuple(labels[index[name]] for name in wanted)
                target[key] = target.get(key, 0) + value
        out = []
        for key in sorted(set(received) | set(sent)):
            r0, s0 = self._last_pairs.get(key, (0, 0))
            r, s = received.get(key, 0), sent.get(key, 0)
            self._last_pairs[key] = (r, s)
            out.append(PairRate(*key, (r - r0) / interval, (s - s0) / interval))
        return out


def sort_connections(rows: list[ConnectionRate], key: str) -> list[ConnectionRate]:
    measure: dict[str, Callable[[ConnectionRate], float]] = {
        "total": lambda r: r.tx_per_second + r.rx_per_second,
        "tx": lambda r: r.tx_per_second,
        "rx": lambda r: r.rx_per_second,
    }
    return sorted(rows, key=measure[key], reverse=True)


def human_rate(value: float) -> str:
    """``1536.0`` -> ``"1.5 KiB/s"``; ``0`` -> ``"0 B/s"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}/s" if unit == "B" else f"{value:.1f} {unit}/s"
        value /= 1024
    return f"{value:.1f} GiB/s"


def render_tables(snapshot: Snapshot, sort: str, limit: int) -> object:
    from rich.console import Group
    from rich.table import Table

    connections = Table(
        title=f"connections (every {snapshot.interval:g} s, by {sort})", expand=True
    )
    for column in ("PID", "COMM", "LOCAL", "REMOTE", "ROLE", "TX/s", "RX/s", "TX", "RX"):
        connections.add_column(
            column, justify="right" if column in ("TX/s", "RX/s", "TX", "RX", "PID") else "left"
        )
    for row in sort_connections(snapshot.connections, sort)[:limit]:
        connections.add_row(
            str(row.pid),
            row.comm,
            row.local,
            row.remote,
            row.role,
            human_rate(row.tx_per_second),
            human_rate(row.rx_per_second),
            str(row.tx_total),
            str(row.rx_total),
        )
    pairs = Table(
        title="workload pairs (Istio direction: received = client -> server)", expand=True
    )
    for column in ("SOURCE", "DESTINATION", "SERVICE", "REPORTER", "RECEIVED/s", "SENT/s"):
        pairs.add_column(column)
    ranked = sorted(
        snapshot.pairs, key=lambda p: p.received_per_second + p.sent_per_second, reverse=True
    )
    for pair in ranked[:limit]:
        pairs.add_row(
            pair.source_workload,
            pair.destination_workload,
            pair.destination_service,
            pair.reporter,
            human_rate(pair.received_per_second),
            human_rate(pair.sent_per_second),
        )
    return Group(connections, pairs)


def run_top(
    kernel: KernelReader,
    tracker: RateTracker,
    *,
    interval: float,
    once: bool,
    as_json: bool,
    sort: str,
    limit: int,
    stop: threading.Event,
) -> Snapshot | None:
    kernel.poll()  # start counting from now
    tracker.update(kernel.poll(), interval)
    if once:
        if stop.wait(interval):
            return None
        snapshot = tracker.update(kernel.poll(), interval)
        if as_json:
            print(snapshot.to_json())
        else:
            from rich.console import Console

            Console().print(render_tables(snapshot, sort, limit))
        return snapshot
    from rich.live import Live

    with Live(auto_refresh=False, screen=False) as live:
        while not stop.wait(interval):
            snapshot = tracker.update(kernel.poll(), interval)
            live.update(render_tables(snapshot, sort, limit), refresh=True)
    return None

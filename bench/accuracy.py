"""Counted bytes vs bytes moved vs tcp_info, for one workload run.

Three sources are compared, each check naming what it expected and what it got:

- the tracer (``ledger``): the last sample of each of the workload's sockets must equal what
  the applications moved (``client_sent`` is what the client wrote, and so on);
- ``tcp_info``: the kernel's own per-socket counters, less the SYN/FIN octets they count,
  must equal the same tracer sums;
- the accountant: its series for ``destination_service="127.0.0.1:<port>"`` must add up to
  the tracer's sums over every socket on the port, per reporter, and count each connection
  opened and closed once per reporter.

>>> sockets = [{"role": "client", "local": ["127.0.0.1", 5000], "remote": ["127.0.0.1", 80],
...             "sent": 64, "received": 0}]
>>> sums(sockets, server_port=80)["client_sent"]
64
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bench.workloads import Moved

SIDES = ("client_sent", "client_received", "server_sent", "server_received")
SENT, RECEIVED = "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"
OPENED, CLOSED = "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"


def sums(
    sockets: Iterable[Mapping[str, Any]], server_port: int, data_client_port: int = 0
) -> dict[str, int]:
    """Per-side byte sums of the sockets of one server port (only the data connection when
    ``data_client_port`` is given), plus how many client and server sockets there were."""
    out = dict.fromkeys((*SIDES, "client_sockets", "server_sockets"), 0)
    for s in sockets:
        local_port, remote_port = s["local"][1], s["remote"][1]
        if s["role"] == "client" and remote_port == server_port:
            side = "client"
            client_port = local_port
        elif s["role"] == "server" and local_port == server_port:
            side = "server"
            client_port = remote_port
        else:
            continue
        if data_client_port and client_port != data_client_port:
            continue
        out[f"{side}_sockets"] += 1
        out[f"{side}_sent"] += s["sent"]
        out[f"{side}_received"] += s["received"]
    return out


def _check(name: str, expected: int, got: int) -> dict[str, Any]:
    return {"check": name, "expected": expected, "got": got, "exact": expected == got}


def compare(moved: Moved, report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every check for one run; each ``{"check", "expected", "got", "exact"}``."""
    sockets = report["sockets"]
    counted = sums(sockets, moved.server_port, moved.data_client_port)
    checks = []
    truth = {side: getattr(moved, side) for side in SIDES}
    if moved.name == "iperf3":  # its report has only the data connection's two sums
        truth = {"client_sent": moved.client_sent, "server_received": moved.server_received}
    for side, expected in truth.items():
        checks.append(_check(f"tracer {side} = bytes moved", expected, counted[side]))
    checks.append(_check("client sockets seen", moved.connections, counted["client_sockets"]))
    checks.append(_check("server sockets seen", moved.connections, counted["server_sockets"]))
    tcpi_side = {
        "client_acked": "client_sent",
        "client_received": "client_received",
        "server_acked": "server_sent",
        "server_received": "server_received",
    }
    for key, side in tcpi_side.items():
        if key in moved.tcp_info:
            payload = moved.tcp_info[key] - moved.sequence_octets.get(key, 0)
            checks.append(_check(f"tracer {side} = tcp_info {key}", payload, counted[side]))
    everything = sums(sockets, moved.server_port)
    service = report["services"].get(f"127.0.0.1:{moved.server_port}", {})

    def series(metric: str, reporter: str) -> int:
        return int(service.get(metric, {}).get(reporter, 0))

    # Istio direction: received = client -> server, sent = server -> client.
    checks += [
        _check(
            "accountant received{source} = client writes",
            everything["client_sent"],
            series(RECEIVED, "source"),
        ),
        _check(
            "accountant received{destination} = server reads",
            everything["server_received"],
            series(RECEIVED, "destination"),
        ),
        _check(
            "accountant sent{destination} = server writes",
            everything["server_sent"],
            series(SENT, "destination"),
        ),
        _check(
            "accountant sent{source} = client reads",
            everything["client_received"],
            series(SENT, "source"),
        ),
    ]
    for reporter, side in (("source", "client_sockets"), ("destination", "server_sockets")):
        checks.append(
            _check(f"accountant opened{{{reporter}}}", everything[side], series(OPENED, reporter))
        )
        checks.append(
            _check(f"accountant closed{{{reporter}}}", everything[side], series(CLOSED, reporter))
        )
    return checks


def exact_fraction(runs: Iterable[Iterable[Mapping[str, Any]]]) -> float:
    """Fraction of runs whose every check was exact: ``[[ok, ok], [ok, wrong]]`` -> 0.5."""
    runs = [list(run) for run in runs]
    if not runs:
        return float("nan")
    return sum(all(c["exact"] for c in run) for run in runs) / len(runs)

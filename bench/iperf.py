"""iperf3 over loopback: ``iperf3 -s -1 -B 127.0.0.1 -p P`` and ``iperf3 -c ... -J``.

The client's JSON report gives the bytes each end's application moved on the data
connection (``end.sum_sent.bytes`` written by the client, ``end.sum_received.bytes`` read
by the server) and that connection's client port (``start.connected[0].local_port``), which
tells it apart from iperf3's control connection to the same server port.

iperf3 opens each data connection by writing its 37-byte session cookie (``COOKIE_SIZE`` in
iperf_api.h) before the test data; its byte sums leave the cookie out, the socket does not.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.workloads import Moved

IPERF3 = "/usr/bin/iperf3"
LISTEN_STATE = "0A"
COOKIE_SIZE = 37


def is_listening(port: int, proc_net_tcp: Path = Path("/proc/net/tcp")) -> bool:
    """Whether 127.0.0.1:``port`` is in LISTEN state.

    A /proc/net/tcp line ``"0: 0100007F:1F90 00000000:0000 0A ..."`` means 127.0.0.1:8080
    is listening.
    """
    wanted = f"0100007F:{port:04X}"
    for line in proc_net_tcp.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == wanted and fields[3] == LISTEN_STATE:
            return True
    return False


def parse_report(report: dict[str, Any], port: int, seconds: float) -> Moved:
    """An iperf3 ``-J`` client report -> what moved on the data connection.

    ``{"start": {"connected": [{"local_port": 5000}]}, "end": {"sum_sent": {"bytes": 10},
    "sum_received": {"bytes": 10, "bits_per_second": 80.0}}}`` -> Moved with
    ``client_sent=10``, ``server_received=10``, ``data_client_port=5000``.
    """
    end = report["end"]
    return Moved(
        "iperf3",
        port,
        seconds,
        operations=int(end["sum_received"]["bytes"]),  # rate() is bytes per second
        client_sent=int(end["sum_sent"]["bytes"]) + COOKIE_SIZE,
        server_received=int(end["sum_received"]["bytes"]) + COOKIE_SIZE,
        data_client_port=int(report["start"]["connected"][0]["local_port"]),
    )


def run_iperf3(
    port: int, length: str, seconds: float, affinity: str | None = "0,1", timeout: float = 60
) -> Moved:
    """One iperf3 test of ``seconds`` with writes of ``length`` (e.g. ``"1K"``, ``"128K"``)."""
    server = subprocess.Popen(
        [IPERF3, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not is_listening(port):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"iperf3 server on port {port} did not start")
            time.sleep(0.02)
        command = [IPERF3, "-c", "127.0.0.1", "-p", str(port), "-l", length]
        command += ["-t", f"{seconds:g}", "-J"] + (["-A", affinity] if affinity else [])
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        report = json.loads(done.stdout)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
    return parse_report(report, port, float(report["end"]["sum_received"]["seconds"]))

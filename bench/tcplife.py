"""The peer: bcc's ``tcplife`` (Debian ``bpfcc-tools``), run as a user would run it.

tcplife needs tracefs (bcc looks for ``/sys/kernel/tracing/events/sock/inet_sock_set_state``
to pick its tracepoint over a kprobe, which this kernel lacks) and kernel headers. tracefs
is mounted in a private mount namespace of its own (``unshare -m``), so the host is left as it
was; the headers are the ones tcpacct itself chose (``BCC_KERNEL_SOURCE``).

Its CSV rows (``-s``)::

    PID,COMM,IP,LADDR,LPORT,RADDR,RPORT,TX_KB,RX_KB,MS
    32408,python3,4,127.0.0.1,45123,127.0.0.1,33316,0,0,0.15

TX_KB/RX_KB are ``tcp_sock.bytes_acked``/``bytes_received`` divided by 1024 and truncated,
read with struct layouts from those headers.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agent.ebpf.headers import choose_headers

TCPLIFE = Path("/usr/sbin/tcplife-bpfcc")
HEADER_PREFIX = "PID,COMM,IP,LADDR"


@dataclass(frozen=True, slots=True)
class LifeRow:
    """One tcplife row: a socket's life, its ends and its byte counts in KiB."""

    pid: int
    local_port: int
    remote_port: int
    tx_kb: int
    rx_kb: int


def parse_rows(text: str) -> list[LifeRow]:
    """tcplife ``-s`` output -> rows (the header and anything malformed skipped).

    ``"PID,COMM,...\\n7,nc,4,127.0.0.1,80,127.0.0.1,5000,2,0,0.1\\n"`` ->
    ``[LifeRow(pid=7, local_port=80, remote_port=5000, tx_kb=2, rx_kb=0)]``.
    """
    rows = []
    for fields in csv.reader(text.splitlines()):
        if len(fields) != 10 or not fields[0].isdigit():
            continue
        try:
            pid, lport, rport, tx, rx = (int(fields[i]) for i in (0, 4, 6, 7, 8))
        except ValueError:
            continue
        rows.append(LifeRow(pid, lport, rport, tx, rx))
    return rows


def lost_samples(stderr: str) -> int:
    """bcc's ``"Possibly lost 12 samples"`` lines -> 12 (summed)."""
    total = 0
    for line in stderr.splitlines():
        words = line.split()
        if line.startswith("Possibly lost") and len(words) > 2 and words[2].isdigit():
            total += int(words[2])
    return total


class TcpLife:
    """A running tcplife; ``rows()`` reads what it printed so far."""

    def __init__(self, start_timeout: float = 90.0) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bench-tcplife-")
        self._out = Path(self._dir.name) / "out.csv"
        self._err = Path(self._dir.name) / "err.txt"
        self._timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    def __enter__(self) -> TcpLife:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
        self._dir.cleanup()

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("BCC_KERNEL_SOURCE", str(choose_headers().path))
        script = (
            "mount -t tracefs nodev /sys/kernel/tracing && "
            f"exec /usr/bin/python3 {TCPLIFE} -s"
        )
        started = time.monotonic()
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.process = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdout=out,
                stderr=err,
                env=env,
            )
        deadline = started + self._timeout
        while HEADER_PREFIX not in self._out.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tcplife did not start: {self._err.read_text()[-1500:]}")
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - started

    def rows(self) -> list[LifeRow]:
        return parse_rows(self._out.read_text(errors="replace"))

    def lost(self) -> int:
        return lost_samples(self._err.read_text(errors="replace"))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

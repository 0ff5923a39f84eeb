"""A real Prometheus server (Debian's ``prometheus``) for end-to-end tests.

Started on loopback with its own data directory and a config that scrapes one target every
second; queried through its HTTP API; stopped by PID. Usage::

    with PrometheusServer(tmp_path / "prometheus", target="127.0.0.1:9437") as prometheus:
        prometheus.wait_target_up(deadline=30)
        prometheus.query('istio_mongo_received_bytes{source_version="v2"}')
        # -> [({"__name__": "istio_mongo_received_bytes", "source_version": "v2", ...}, 1008.0)]
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

PROMETHEUS = "/usr/bin/prometheus"
JOB = "tcpacct"

Sample = tuple[dict[str, str], float]


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_config(target: str) -> str:
    """The config: one job, ``target`` scraped every second (timeout below the interval).

    ``"127.0.0.1:9437"`` -> a YAML text whose ``scrape_configs[0].static_configs[0].targets``
    is ``["127.0.0.1:9437"]``.
    """
    return (
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )


def decode_vector(body: dict) -> list[Sample]:
    """An instant-query answer -> ``[(labels, value)]``.

    ``{"status": "success", "data": {"resultType": "vector", "result": [{"metric": {"a": "b"},
    "value": [1700000000.1, "42"]}]}}`` -> ``[({"a": "b"}, 42.0)]``.
    """
    if body.get("status") != "success":
        raise PrometheusError(f"query failed: {body.get('errorType')}: {body.get('error')}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [({}, float(data["result"][1]))]
    if data["resultType"] != "vector":
        raise PrometheusError(f"expected a vector, got {data['resultType']}")
    return [(dict(item["metric"]), float(item["value"][1])) for item in data["result"]]


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """One Prometheus process on ``127.0.0.1:<free port>`` scraping ``target``."""

    def __init__(self, workdir: Path, target: str, binary: str = PROMETHEUS) -> None:
        self.workdir = Path(workdir)
        self.target = target
        self.binary = binary
        self.port = free_loopback_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, ready_within: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(scrape_config(self.target))
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.process.returncode}: {self.log()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready within {ready_within} s: {self.log()}")

    def stop(self) -> None:
        """Ends our process by its PID (SIGTERM, then SIGKILL) and removes its data."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def log(self, last: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-last:]
        return ""

    def query(self, expression: str) -> list[Sample]:
        """Instant query at "now" through ``/api/v1/query``."""
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        try:
            with urllib.request.urlopen(address, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400/422 carry the reason as JSON
            body = json.load(error)
        return decode_vector(body)

    def wait_target_up(self, deadline_seconds: float = 30.0) -> None:
        """Until ``up{job="tcpacct"} == 1``: the agent has been scraped successfully."""
        deadline = time.monotonic() + deadline_seconds
        seen: list[Sample] = []
        while time.monotonic() < deadline:
            seen = self.query(f'up{{job="{JOB}"}}')
            if [value for _, value in seen] == [1.0]:
                return
            time.sleep(0.5)
        raise PrometheusError(
            f"target {self.target} not up within {deadline_seconds} s: {seen}; "
            f"last scrape errors: {self.scrape_errors()}"
        )

    def scrape_errors(self) -> list[str]:
        """``lastError`` of every active target (``/api/v1/targets``)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as response:
            body = json.load(response)
        return [target.get("lastError", "") for target in body["data"]["activeTargets"]]

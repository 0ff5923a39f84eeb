"""Drives ``bench.probe`` (the agent under test) from the benchmark process.

>>> with AgentProbe(interval=1.0) as probe:   # doctest: +SKIP
...     probe.request({"cmd": "watch", "ports": [40001]})
{'ok': True}
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class ProbeError(RuntimeError):
    """The probe died, answered with an error, or did not answer in time."""


class AgentProbe:
    """A running ``python -m bench.probe``; ``close()`` detaches it (also on errors)."""

    def __init__(
        self,
        *,
        backend: str = "tracepoint",
        sockets: int = 65536,
        closed: int = 65536,
        interval: float = 1.0,
        start_timeout: float = 60.0,
    ) -> None:
        self._command = [
            sys.executable,
            "-m",
            "bench.probe",
            f"--backend={backend}",
            f"--sockets={sockets}",
            f"--closed={closed}",
            f"--interval={interval}",
        ]
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[str] | None = None
        self._selector = selectors.DefaultSelector()
        self.hello: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> AgentProbe:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> dict[str, Any]:
        self._process = subprocess.Popen(
            self._command,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self._process.stdout is not None
        self._selector.register(self._process.stdout, selectors.EVENT_READ)
        try:
            self.hello = self._read(self._start_timeout)
        except ProbeError:
            self.close()
            raise
        return self.hello

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProbeError(f"probe gave no answer within {timeout:.0f} s")
            if self._selector.select(timeout=left):
                line = self._process.stdout.readline()
                if not line:
                    error = self._process.stderr.read() if self._process.stderr else ""
                    raise ProbeError(f"probe exited: {error.strip()[-2000:]}")
                answer = json.loads(line)
                if "error" in answer:
                    raise ProbeError(answer["error"])
                return answer

    def request(self, command: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        """Ask the probe to detach and exit; kill it (by its pid) if it does not."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.poll() is None and process.stdin is not None:
                process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                process.stdin.flush()
                process.stdin.close()
            process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait(timeout=10)
        finally:
            self._selector.close()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

"""``tcpacct run`` as a process of a test: started with a log file, asked over HTTP, ended by
its own PID (SIGTERM; if that is not enough, its threads' states and tracebacks go to the log).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

TCPACCT = Path(sys.executable).with_name("tcpacct")


class AgentProcess:
    """``tcpacct run --listen 127.0.0.1:<port> <arguments>``, logging to ``log_path``."""

    def __init__(self, port: int, arguments: Sequence[str], log_path: Path) -> None:
        self.port = port
        self.arguments = list(arguments)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.stuck_threads = ""  # what each thread was doing when SIGTERM was not enough

    def start(self) -> None:
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [str(TCPACCT), "run", "--listen", f"127.0.0.1:{self.port}", *self.arguments],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            )

    def log(self, last: int = 6000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-last:]
        return ""

    def get(self, path: str) -> tuple[int, str]:
        """``GET path`` -> (status, body); an error status is returned, not raised."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def scrape(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200, (status, body)
        return body

    def check_alive(self) -> None:
        assert self.process is not None, "agent not started"
        if self.process.poll() is not None:
            raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log()}")

    def wait_readyz(self, status: int, body: str, deadline_seconds: float = 90.0) -> None:
        """Until ``/readyz`` answers exactly ``status`` and ``body``."""
        deadline = time.monotonic() + deadline_seconds
        answer: tuple[int, str] | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                answer = self.get("/readyz")
                if answer == (status, body):
                    return
            time.sleep(0.2)
        raise AssertionError(
            f"/readyz never answered {status} {body!r} (last: {answer}):\n{self.log()}"
        )

    def wait_ready(self, deadline_seconds: float = 90.0) -> None:
        """Until ``/readyz`` is 200: the first poll ran (and in Kubernetes mode the cache
        synced)."""
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                if self.get("/readyz")[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"agent not ready within {deadline_seconds} s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM to our PID. If it has not ended 20 s later: its threads' kernel stacks go to
        ``stuck_threads``, then SIGABRT makes faulthandler write their Python tracebacks to
        the log (SIGKILL if even that fails). Returns the exit code."""
        process, self.process = self.process, None
        if process is None:
            return self.exit_code
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                self.stuck_threads = thread_states(process.pid)
                process.send_signal(signal.SIGABRT)  # faulthandler: every thread's traceback
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        self.exit_code = process.returncode
        return self.exit_code


def thread_states(pid: int, proc_root: str | Path = "/proc") -> str:
    """Every thread of ``pid``: name, state, kernel wait channel and kernel stack (root can
    read it), e.g. ``"1234 python3 S do_epoll_wait\n  [<0>] ep_poll+0x...``."""
    lines = []
    tasks = Path(proc_root) / str(pid) / "task"
    with contextlib.suppress(OSError):
        for task in sorted(tasks.iterdir(), key=lambda path: int(path.name)):
            facts = []
            for name in ("comm", "wchan", "stack"):
                try:
                    facts.append((task / name).read_text().strip())
                except OSError as error:
                    facts.append(f"<{error.strerror}>")
            comm, wchan, stack = facts
            state = ""
            with contextlib.suppress(OSError):
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            lines.append(f"{task.name} {comm} {state} {wchan}")
            lines.extend(f"  {frame}" for frame in stack.splitlines()[:12])
    return "\n".join(lines)

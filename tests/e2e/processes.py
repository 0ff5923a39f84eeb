"""Processes of the end-to-end tests: the agent (``tcpacct run``) and line-driven workloads.

Every wait is bounded; every process is ended by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

TCPACCT = Path(sys.executable).with_name("tcpacct")


class LineChannel:
    """Request/answer lines with a process that has binary, unbuffered stdin/stdout pipes.

    ``channel.ask("exchange c1 1000 5000")`` -> ``"ok exchange c1 1008 5000"``; a process
    that answers ``error ...``, dies, or stays silent past ``timeout`` fails the call.
    """

    def __init__(self, process: subprocess.Popen, name: str) -> None:
        if process.stdout is None or process.stdin is None:
            raise ValueError("the process needs stdin and stdout pipes")
        self.process = process
        self.name = name
        self._buffer = b""

    def read_line(self, timeout: float = 20.0) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no answer within {timeout} s")
            readable, _, _ = select.select([descriptor], [], [], left)
            if not readable:
                continue
            chunk = os.read(descriptor, 65536)
            if not chunk:
                raise AssertionError(f"{self.name} ended ({self.process.poll()}): {self.stderr()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def ask(self, command: str, timeout: float = 20.0) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        answer = self.read_line(timeout)
        if not answer.startswith("ok "):
            raise AssertionError(f"{self.name}: {command!r} -> {answer!r}")
        return answer

    def stderr(self) -> str:
        """What the process wrote on stderr, if it has ended (never blocks on a live one)."""
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            return self.process.stderr.read().decode(errors="replace")[-2000:]
        return ""


BINARY_PIPES: dict[str, object] = {
    "stdin": subprocess.PIPE,
    "stdout": subprocess.PIPE,
    "stderr": subprocess.PIPE,
    "text": False,
    "bufsize": 0,
}


class AgentProcess:
    """``tcpacct run`` in Kubernetes mode on the node, logging to a file."""

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

    def log(self, last: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-last:]
        return ""

    def wait_ready(self, deadline_seconds: float = 90.0) -> None:
        """Until ``/readyz`` answers 200: the cache synced and the first poll ran."""
        assert self.process is not None
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log()}")
            url = f"http://127.0.0.1:{self.port}/readyz"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url, timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.25)
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

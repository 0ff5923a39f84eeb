"""Processes of the end-to-end tests: the agent (``tcpacct run``) and line-driven workloads.

Every wait is bounded; every process is ended by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time

from tests.support.agent_process import TCPACCT, AgentProcess, thread_states

__all__ = ["BINARY_PIPES", "TCPACCT", "AgentProcess", "LineChannel", "thread_states"]


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

"""The agent's threads yield the CPU: agent.priority.yield_cpu, run in a child process
(niceness cannot be raised back without privileges, so the test process keeps its own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.priority import yield_cpu
from tests.support.niceness import niceness_of

CHILD = """
import json, os, threading
from agent.priority import yield_cpu
from tests.support.niceness import thread_niceness
started, stop = threading.Event(), threading.Event()
def idle():
    started.set()
    stop.wait()
worker = threading.Thread(target=idle)
worker.start()
started.wait()
first = yield_cpu(7)
again = yield_cpu(7)
later = threading.Thread(target=lambda: print(json.dumps(
    {"first": first, "again": again, "threads": thread_niceness(os.getpid())})))
later.start()
later.join()
stop.set()
worker.join()
"""


def test_every_thread_and_those_started_later_run_at_the_niceness() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(result.stdout)
    assert (report["first"], report["again"]) == (2, 0)  # main + worker; then nothing to do
    niceness = report["threads"].values()
    assert len(niceness) == 3 and set(niceness) == {7}  # the later thread inherited it


def test_a_niceness_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="niceness 20: must be 0-19"):
        yield_cpu(20)


def test_niceness_is_read_past_a_name_with_spaces_and_parentheses() -> None:
    line = "42 (my (odd) prog) S 1 42 42 0 -1 4194560 100 0 0 0 5 2 0 0 30 10 3 0 77\n"
    assert niceness_of(line) == 10


def test_a_thread_that_cannot_be_changed_is_logged_and_left(tmp_path, caplog) -> None:
    """A thread that exited between listing and setting: logged, not counted, no error."""
    (tmp_path / "2147483646").mkdir()  # no such thread
    assert yield_cpu(10, tasks=tmp_path) == 0
    assert "could not set thread 2147483646 to niceness 10" in caplog.text


def test_a_thread_that_ends_while_its_process_is_read_is_left_out(tmp_path) -> None:
    """/proc lists a task, then the task ends before its stat is read (the agent's HTTP
    server makes a thread per request): the rest are still read."""
    from tests.support.niceness import thread_niceness

    tasks = tmp_path / "42" / "task"
    (tasks / "42").mkdir(parents=True)
    (tasks / "42" / "stat").write_text("42 (tcpacct) S " + " ".join(["0"] * 15) + " 10 1 0")
    (tasks / "43").mkdir()  # listed, its stat already gone
    assert thread_niceness(42, proc=tmp_path) == {42: 10}

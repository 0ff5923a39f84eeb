"""pytest plugin for the privileged tier when it runs inside the stock-kernel VM.

Loaded in the guest with ``-p tests.vm.guest_plugin``; it changes no test. It records, in
``$TCPACCT_VM_OUT``, what the host side asserts on besides the exit code:

- ``<step>.backend``: the backend the session's ``tracer`` fixture really loaded (``KernelTracer
  .backend``), e.g. ``fentry`` for ``TCPACCT_TEST_BACKEND=auto`` on 6.1;
- ``<step>.summary``: outcome counts as JSON, e.g. ``{"passed": 13, "failed": 0, ...}``.

``<step>`` is ``$TCPACCT_VM_STEP``. Outside the VM (no ``TCPACCT_VM_OUT``) it does nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from pathlib import Path

import pytest

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def _record(suffix: str, text: str) -> None:
    out, step = os.environ.get("TCPACCT_VM_OUT"), os.environ.get("TCPACCT_VM_STEP")
    if out and step:
        Path(out, f"{step}.{suffix}").write_text(text)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest
) -> Generator:
    outcome = yield
    if fixturedef.argname == "tracer" and outcome.excinfo is None:
        _record("backend", f"{outcome.get_result().backend}\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:
    counts = {name: len(terminalreporter.stats.get(name, [])) for name in OUTCOMES}
    _record("summary", json.dumps({**counts, "exitstatus": int(exitstatus)}) + "\n")

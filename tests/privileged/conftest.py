"""Privileged tier: real BPF programs, real sockets, exact counts.

Needs root and a kernel that loads the chosen backend (env ``TCPACCT_TEST_BACKEND``:
auto|tracepoint|fentry|kprobe, default auto). Under ``CI=true`` nothing here may skip: a
missing privilege or a backend that will not load fails the run saying why.
"""

from __future__ import annotations

import os

import pytest

from tests.support.harness import Harness, open_test_tracer

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"privileged tier cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/privileged" in str(item.fspath):
            item.add_marker(pytest.mark.privileged)


@pytest.fixture(scope="session")
def backend() -> str:
    return os.environ.get("TCPACCT_TEST_BACKEND", "auto")


@pytest.fixture(scope="session")
def tracer(backend: str):
    if os.geteuid() != 0:
        _unavailable("needs root to load BPF (run: sudo make test)")
    try:
        kernel = open_test_tracer(backend)
    except Exception as error:  # BackendUnavailable, BtfError, HeadersError, bcc errors
        _unavailable(f"BPF backend {backend!r} cannot load here: {error}")
    yield kernel
    kernel.close()


@pytest.fixture
def harness(tracer) -> Harness:
    """A fresh accountant over the session's tracer; poll() drives it."""
    return Harness(tracer)

"""End-to-end tier: the agent as a process, a Kubernetes API, pods as network namespaces and a
real Prometheus server.

Root-only like the privileged tier (it loads BPF, makes namespaces and nft tables). Under
``CI=true`` nothing here may skip: a missing privilege or tool fails the run saying why.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.e2e.processes import TCPACCT
from tests.e2e.prometheus_server import PROMETHEUS
from tests.support.netlab import require_tools

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"e2e tier cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.privileged)


@pytest.fixture(scope="session")
def e2e_prerequisites() -> None:
    """Root, the lab's tools, Prometheus and the installed ``tcpacct`` entry point."""
    if os.geteuid() != 0:
        _unavailable("needs root: BPF, network namespaces, nftables (run: sudo make test-e2e)")
    missing = require_tools()
    if missing:
        _unavailable(f"missing tools {missing}: run sudo make setup (iproute2, nftables)")
    if shutil.which(PROMETHEUS) is None:
        _unavailable(f"{PROMETHEUS} missing: run sudo make setup (Debian package prometheus)")
    if not TCPACCT.exists():
        _unavailable(f"{TCPACCT} missing: run make setup (installs the package in the venv)")


@pytest.fixture(scope="session")
def backend() -> str:
    return os.environ.get("TCPACCT_TEST_BACKEND", "auto")

"""The DaemonSet's capabilities are each needed, and together enough.

Each operation the agent needs a privilege for runs as root in a child process whose
capability bounding set is exactly the DaemonSet's ``capabilities.add`` (``setpriv
--bounding-set=-all,+bpf,...``; a root process's effective set is then that set), where it
must succeed, and again without one capability, where every operation that capability is
there for must fail. The "other user" is a process this test starts as ``nobody`` with one
TCP socket open.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
NOBODY = 65534

# What each operation does, as a Python program run under the reduced capability set.
# argv: [pid of the other user's process, its socket's fd number, backend].
OPERATIONS = {
    "load and attach the BPF programs": (
        "import sys; from agent.ebpf.tracing import open_tracer; open_tracer(sys.argv[3]).close()"
    ),
    "list another user's /proc/<pid>/fd": (
        "import os, sys; assert os.listdir(f'/proc/{sys.argv[1]}/fd')"
    ),
    "readlink another user's socket fd": (
        "import os, sys; "
        "assert os.readlink(f'/proc/{sys.argv[1]}/fd/{sys.argv[2]}').startswith('socket:[')"
    ),
    "readlink another user's /proc/<pid>/ns/net": (
        "import os, sys; assert os.readlink(f'/proc/{sys.argv[1]}/ns/net').startswith('net:[')"
    ),
    # The table's entry count (IPCTNL_MSG_CT_GET_STATS) goes through the same CAP_NET_ADMIN
    # check as a dump or a lookup, and takes no time on a busy host's table.
    "read conntrack over netlink": (
        "from pyroute2 import NFCTSocket; s = NFCTSocket(); "
        "assert s.count()[0].get_attr('CTA_STATS_GLOBAL_ENTRIES') is not None; s.close()"
    ),
}

# Which operations each added capability is there for (the comments in daemonset.yaml).
NEEDED_FOR = {
    "BPF": ["load and attach the BPF programs"],
    "PERFMON": ["load and attach the BPF programs"],
    "SYS_PTRACE": [
        "readlink another user's socket fd",
        "readlink another user's /proc/<pid>/ns/net",
    ],
    "DAC_READ_SEARCH": ["list another user's /proc/<pid>/fd", "readlink another user's socket fd"],
    "NET_ADMIN": ["read conntrack over netlink"],
}


def daemonset_capabilities() -> list[str]:
    documents = yaml.safe_load_all((REPO / "daemonset" / "daemonset.yaml").read_text())
    (daemonset,) = [doc for doc in documents if doc and doc["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container["securityContext"]["capabilities"]["add"]


@pytest.fixture(scope="module")
def other_users_socket() -> Iterator[tuple[int, int]]:
    """(pid, fd) of a process running as nobody that holds one TCP socket."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (run: sudo make test)"
    elif shutil.which("setpriv") is None:
        reason = "setpriv (util-linux) not found"
    if reason:
        if IN_CI:
            pytest.fail(f"privileged tier cannot run under CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    holder = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            "print(s.fileno(), flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        fd = int(holder.stdout.readline())
        assert os.stat(f"/proc/{holder.pid}").st_uid == NOBODY
        yield holder.pid, fd
    finally:
        holder.kill()
        holder.wait(timeout=10)


def attempt(
    operation: str, capabilities: list[str], pid: int, fd: int
) -> subprocess.CompletedProcess[str]:
    bounding = ",".join(["-all", *(f"+{cap.lower()}" for cap in capabilities)])
    backend = os.environ.get("TCPACCT_TEST_BACKEND", "auto")
    return subprocess.run(
        [
            "setpriv",
            f"--bounding-set={bounding}",
            "--",
            sys.executable,
            "-c",
            OPERATIONS[operation],
            str(pid),
            str(fd),
            backend,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )


def test_every_capability_says_what_it_is_for() -> None:
    assert sorted(daemonset_capabilities()) == sorted(NEEDED_FOR)
    assert {op for ops in NEEDED_FOR.values() for op in ops} == set(OPERATIONS)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_the_daemonsets_capabilities_are_enough(
    operation: str, other_users_socket: tuple[int, int]
) -> None:
    result = attempt(operation, daemonset_capabilities(), *other_users_socket)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("capability", "operation"),
    [(cap, op) for cap, ops in NEEDED_FOR.items() for op in ops],
)
def test_each_capability_is_needed(
    capability: str, operation: str, other_users_socket: tuple[int, int]
) -> None:
    fewer = [cap for cap in daemonset_capabilities() if cap != capability]
    result = attempt(operation, fewer, *other_users_socket)
    assert result.returncode != 0, f"{operation} worked without CAP_{capability}"

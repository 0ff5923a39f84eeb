"""The privileged tier on Debian bookworm's stock 6.1 kernel, in a VM: fentry, kprobe and auto.

This machine's kernel (6.18, locked down) runs only the tracepoint backend; most users' kernels
run fentry or kprobes. One boot of the cached image (tests/vm/build_image.sh) runs, in order:

- ``smoke``: a bcc program of its own (kretprobe tcp_sendmsg, fentry tcp_cleanup_rbuf) counts a
  1 MiB loopback transfer exactly: the kernel, bcc and the 9p-shared .venv work at all;
- ``fentry`` and ``kprobe``: the accuracy tests and the agent-process tests (a connection older
  than the agent: struct offsets from this kernel's BTF; ``tcpacct run`` counting exactly and
  detaching everything on SIGTERM) with ``TCPACCT_TEST_BACKEND`` forced; the kprobe run leaves
  out the 10,000-connection churn test (its lifecycle hooks are the fentry run's);
- ``auto``: one exact connection through the test tracer, which must have chosen fentry (6.1
  has no ``sock:sock_send_length`` tracepoint);
- ``check``: ``tcpacct check --json`` must say that fentry and kprobe load, that the tracepoint
  backend does not (naming the missing tracepoint), and that auto would use fentry.

Each step is bounded by a timeout; qemu by a hard one. ``TCPACCT_VM_STEPS=smoke,check``
runs a subset (for development); ``make test-vm`` runs this file alone.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass

import pytest

from tests.vm.run_in_vm import (
    GuestResult,
    VmError,
    build_image,
    missing_tools,
    run_in_vm,
    steps_command,
)

IN_CI = os.environ.get("CI", "").lower() == "true"
STEP_TIMEOUT = float(os.environ.get("TCPACCT_VM_STEP_TIMEOUT", "900"))
BUILD_TIMEOUT = 1800.0
BOOT_ALLOWANCE = 180.0

ACCURACY = "tests/privileged/test_accuracy.py"
AGENT_PROCESS = "tests/privileged/test_agent_process.py"
IDENTITY = "tests/privileged/test_identity_reads.py"


def guest_pytest(backend: str, *selection: str) -> str:
    """The guest command for the privileged tests under one backend.

    ``guest_pytest("kprobe", "tests/privileged/test_accuracy.py")`` ->
    ``TCPACCT_TEST_BACKEND=kprobe .venv/bin/python -m pytest ... tests/privileged/test_accuracy.py``
    """
    argv = [
        ".venv/bin/python", "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
        "-p", "tests.vm.guest_plugin", "--timeout=600", "--durations=5", *selection,
    ]  # fmt: skip
    return f"TCPACCT_TEST_BACKEND={backend} {shlex.join(argv)}"


@dataclass(frozen=True)
class GuestStep:
    """One command of the guest run, and the backend its ``tracer`` fixture must have loaded."""

    name: str
    command: str
    expected_backend: str | None = None
    is_pytest: bool = False


STEPS = (
    GuestStep("smoke", ".venv/bin/python tests/vm/guest_smoke.py"),
    GuestStep("fentry", guest_pytest("fentry", ACCURACY, AGENT_PROCESS, IDENTITY), "fentry", True),
    GuestStep(
        "kprobe",
        guest_pytest("kprobe", ACCURACY, AGENT_PROCESS, IDENTITY, "-k", "not ten_thousand"),
        "kprobe",
        True,
    ),
    GuestStep(
        "auto",
        guest_pytest("auto", f"{ACCURACY}::test_one_connection_exact_and_matches_tcp_info[ipv4]"),
        "fentry",
        True,
    ),
    GuestStep("check", '.venv/bin/tcpacct check --json >"$TCPACCT_VM_OUT/check.json"'),
)


def selected_steps() -> tuple[GuestStep, ...]:
    wanted = os.environ.get("TCPACCT_VM_STEPS")
    if not wanted:
        return STEPS
    names = {name.strip() for name in wanted.split(",")}
    return tuple(step for step in STEPS if step.name in names)


SELECTED = selected_steps()
VM_TIMEOUT = BOOT_ALLOWANCE + STEP_TIMEOUT * len(SELECTED)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.vm,
    pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT + 60),
]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"the VM tier cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def guest() -> GuestResult:
    """All selected steps in one boot of the stock-kernel VM."""
    if os.geteuid() != 0:
        _unavailable("needs root to build the VM image (run: sudo make test-vm)")
    if missing := missing_tools():
        _unavailable(f"{', '.join(missing)} not installed (run: sudo make setup)")
    try:
        image_dir = build_image(timeout=BUILD_TIMEOUT)
    except VmError as error:
        pytest.fail(f"cannot build the VM image: {error}", pytrace=False)
    command = steps_command({step.name: step.command for step in SELECTED}, STEP_TIMEOUT)
    result = run_in_vm(command, image_dir=image_dir, env={"CI": "true"}, timeout=VM_TIMEOUT)
    print(f"VM image {image_dir}: {result.output}")
    return result


def step_report(guest: GuestResult, step: GuestStep) -> str:
    log = guest.files.get(f"{step.name}.log", "(no log: the step never ran)")
    return f"step {step.name!r}: {step.command}\n--- step output ---\n{log}\n{guest.describe()}"


def check_findings(guest: GuestResult) -> dict[str, dict[str, str]]:
    """``tcpacct check --json`` from the guest as ``{name: finding}``.

    ``{"ok": true, "checks": [{"name": "backend auto", "status": "ok", "detail": "would use
    fentry", ...}]}`` -> ``{"backend auto": {"name": "backend auto", "status": "ok", ...}}``
    """
    text = guest.files.get("check.json", "")
    assert text, f"tcpacct check wrote no JSON\n{guest.describe()}"
    return {finding["name"]: finding for finding in json.loads(text)["checks"]}


def assert_check_picks_fentry_and_knows_why_not_tracepoint(guest: GuestResult) -> None:
    findings = check_findings(guest)
    assert " 6.1." in findings["kernel"]["detail"], findings["kernel"]
    assert findings["backend fentry"]["status"] == "ok", findings["backend fentry"]
    assert findings["backend kprobe"]["status"] == "ok", findings["backend kprobe"]
    tracepoint = findings["backend tracepoint"]
    assert tracepoint["status"] == "warn" and "sock_send_length" in tracepoint["detail"], tracepoint
    auto = findings["backend auto"]
    assert (auto["status"], auto["detail"]) == ("ok", "would use fentry"), auto


@pytest.mark.parametrize("step", SELECTED, ids=[step.name for step in SELECTED])
def test_step_passes_in_the_stock_kernel_vm(guest: GuestResult, step: GuestStep) -> None:
    report = step_report(guest, step)
    assert guest.files.get(f"{step.name}.rc", "").strip() == "0", report
    if step.is_pytest:
        summary = json.loads(guest.files.get(f"{step.name}.summary", "{}") or "{}")
        assert summary.get("passed", 0) > 0, report
        assert summary.get("failed") == summary.get("error") == summary.get("skipped") == 0, report
        assert guest.files.get(f"{step.name}.backend", "").strip() == step.expected_backend, report
    if step.name == "check":
        assert_check_picks_fentry_and_knows_why_not_tracepoint(guest)

"""The VM runner's host-side pieces, without a VM: the guest scripts run here under bash."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tests.vm.run_in_vm import guest_script, qemu_command, read_text_files, steps_command


def run_steps(tmp_path: Path, steps: dict[str, str], step_timeout: float) -> dict[str, str]:
    out = tmp_path / "out"
    script = steps_command(steps, step_timeout)
    done = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": "/usr/bin:/bin", "TCPACCT_VM_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {**read_text_files(out), "stdout": done.stdout}


def test_steps_leave_exit_code_output_and_step_name(tmp_path: Path) -> None:
    files = run_steps(
        tmp_path,
        {"first": 'echo "hello from $TCPACCT_VM_STEP"', "second": "echo oops >&2; exit 3"},
        step_timeout=30,
    )
    assert files["first.rc"] == "0\n"
    assert files["first.log"] == "hello from first\n"
    assert files["second.rc"] == "3\n"
    assert files["second.log"] == "oops\n"
    assert files["stdout"].splitlines()[0].startswith("step first: exit 0 after ")
    assert files["stdout"].splitlines()[1].startswith("step second: exit 3 after ")


def test_a_step_over_its_timeout_is_ended_with_124_and_the_next_still_runs(
    tmp_path: Path,
) -> None:
    files = run_steps(tmp_path, {"slow": "sleep 30", "next": "true"}, step_timeout=1)
    assert files["slow.rc"] == "124\n"
    assert files["next.rc"] == "0\n"


def test_a_step_with_quotes_runs_as_written(tmp_path: Path) -> None:
    files = run_steps(tmp_path, {"quoted": """printf '%s|' "a b" 'c"d' $'e\\'f'"""}, 30)
    assert files["quoted.log"] == """a b|c"d|e'f|"""


def test_guest_script_mounts_the_checkout_at_its_host_path_and_records_the_exit(
    tmp_path: Path,
) -> None:
    script = guest_script("echo 'hi there'", Path("/srv/clone of tcpacct"), {"CI": "true"})
    lines = script.splitlines()
    assert "mkdir -p '/srv/clone of tcpacct'" in lines
    assert any(
        line.startswith("if ! mount -t 9p")
        and line.endswith("checkout '/srv/clone of tcpacct'; then")
        for line in lines
    )
    assert "export CI=true" in lines
    assert "export TCPACCT_VM_OUT=/mnt/run/out" in lines
    (run,) = [line for line in lines if line.startswith("/bin/bash -c ")]
    assert shlex.split(run) == [
        "/bin/bash", "-c", "echo 'hi there'", "</dev/null", ">/mnt/run/output.log", "2>&1"
    ]  # fmt: skip
    assert lines[-2:] == ["echo $? >/mnt/run/exit-code", "sync"]


def test_qemu_uses_tcg_no_network_and_a_snapshot_of_the_image(tmp_path: Path) -> None:
    argv = qemu_command(
        Path("/cache/img"), tmp_path, Path("/work/main"), memory_mb=1024, cpus=2, cpu_model="max"
    )
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert argv[argv.index("-nic") + 1] == "none"
    assert "-enable-kvm" not in argv and "kvm" not in argv[argv.index("-accel") + 1]
    assert "file=/cache/img/rootfs.ext4,format=raw,if=virtio,snapshot=on" in argv
    assert "path=/work/main,mount_tag=checkout,security_model=none,readonly=on" in joined
    assert f"path={tmp_path},mount_tag=run," in joined

"""Boot the stock-kernel image under qemu (TCG) and run one shell command inside it.

The guest sees two 9p shares: the checkout, read-only, mounted at the same absolute path as on
the host (so the host's ``.venv``, whose editable install and scripts name that path, runs
there unchanged), and a per-run directory where the command's output and exit code land. It
has no network device. qemu is ended by its PID when the hard timeout passes, and every
temporary file (the run share, the disk snapshot overlay) is removed.

    $ sudo python3 tests/vm/run_in_vm.py -- uname -r
    6.1.0-56-amd64

Used by ``tests/vm/test_stock_kernel.py``; stdlib only, so the system ``python3`` runs it too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
BUILD_SCRIPT = HERE / "build_image.sh"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144"
# guest.sh writes EXIT_FILE once the command ended: a run without it did not finish.
EXIT_FILE = "exit-code"
OUTPUT_FILE = "output.log"
OUT_DIR = "out"


class VmError(RuntimeError):
    """The VM could not be built or started (missing tools, build failure)."""


@dataclass(frozen=True)
class GuestResult:
    """What one guest run brought back.

    ``exit_code`` is None when the command never finished (hard timeout, kernel panic, a guest
    that could not mount the checkout). ``files`` holds the text files the command wrote to
    ``$TCPACCT_VM_OUT`` (name -> content), e.g. ``{"fentry.rc": "0\\n"}``.
    """

    exit_code: int | None
    output: str
    console: str
    timed_out: bool
    files: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """A report for a failed assertion: exit code, the command's output, the console tail."""
        status = "timed out" if self.timed_out else f"exit code {self.exit_code}"
        console_tail = "\n".join(self.console.splitlines()[-40:])
        return (
            f"guest {status}\n--- guest output ---\n{self.output}\n"
            f"--- serial console (last 40 lines) ---\n{console_tail}"
        )


def missing_tools(
    tools: Sequence[str] = ("qemu-system-x86_64", "debootstrap", "mkfs.ext4"),
) -> list[str]:
    """The host tools the tier needs that are not on PATH, e.g. ``["debootstrap"]``."""
    return [tool for tool in tools if shutil.which(tool) is None]


def build_image(script: Path = BUILD_SCRIPT, timeout: float = 1800) -> Path:
    """Build the image if the cache does not hold it for this recipe; return its directory."""
    try:
        done = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise VmError(f"{script} took longer than {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise VmError(f"{script} failed ({done.returncode}):\n{done.stderr}")
    image_dir = Path(done.stdout.strip().splitlines()[-1])
    if not (image_dir / "complete").is_file():
        raise VmError(f"{script} printed {image_dir}, which holds no complete image")
    return image_dir


def guest_script(command: str, checkout: Path, env: Mapping[str, str]) -> str:
    """The shell script the guest's init runs from the run share (``/mnt/run/guest.sh``).

    ``guest_script("uname -r", Path("/work/main"), {"CI": "true"})`` mounts the checkout tag at
    /work/main, exports CI=true and TCPACCT_VM_OUT=/mnt/run/out, runs ``uname -r`` there with
    its output in /mnt/run/output.log, and writes its exit status to /mnt/run/exit-code.
    """
    exports = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TCPACCT_VM_OUT": f"/mnt/run/{OUT_DIR}",
        **env,
    }
    target = shlex.quote(str(checkout))
    lines = [
        "mkdir -p " + target,
        f"if ! mount -t 9p -o {NINEP_OPTIONS},cache=loose,ro checkout {target}; then",
        f"  echo 'guest.sh: cannot mount the checkout at {checkout}' >/mnt/run/{OUTPUT_FILE}",
        "  exit 1",
        "fi",
        *(f"export {name}={shlex.quote(value)}" for name, value in exports.items()),
        "cd " + target,
        f"/bin/bash -c {shlex.quote(command)} </dev/null >/mnt/run/{OUTPUT_FILE} 2>&1",
        f"echo $? >/mnt/run/{EXIT_FILE}",
        "sync",
    ]
    return "\n".join(lines) + "\n"


def steps_command(steps: Mapping[str, str], step_timeout: float) -> str:
    """One guest command that runs several named commands in turn, each bounded by a timeout.

    For each ``name -> command`` it leaves ``name.log`` (output), ``name.rc`` (exit status; 124
    on timeout) and ``name.seconds`` in ``$TCPACCT_VM_OUT``, with ``TCPACCT_VM_STEP=name`` set
    while ``command`` runs. ``steps_command({"uname": "uname -r"}, 60)`` ->
    ``... run_step uname 'uname -r'`` after a small ``run_step`` shell function.
    """
    lines = [
        'mkdir -p "$TCPACCT_VM_OUT"',
        "run_step() {",
        "  local started=$SECONDS",
        f'  TCPACCT_VM_STEP=$1 timeout --kill-after=10 {step_timeout:.0f} /bin/bash -c "$2" \\',
        '    </dev/null >"$TCPACCT_VM_OUT/$1.log" 2>&1',
        '  echo $? >"$TCPACCT_VM_OUT/$1.rc"',
        '  echo $((SECONDS - started)) >"$TCPACCT_VM_OUT/$1.seconds"',
        '  echo "step $1: exit $(cat "$TCPACCT_VM_OUT/$1.rc") after $((SECONDS - started)) s"',
        "}",
        *(
            f"run_step {shlex.quote(name)} {shlex.quote(command)}"
            for name, command in steps.items()
        ),
    ]
    return "\n".join(lines) + "\n"


def qemu_command(
    image_dir: Path, run_share: Path, checkout: Path, *, memory_mb: int, cpus: int, cpu_model: str
) -> list[str]:
    """The qemu command line: TCG (the host's KVM cannot run a stock kernel), no network."""
    kernel_args = "root=/dev/vda rw console=ttyS0 init=/sbin/tcpacct-vm-init panic=-1 quiet"
    return [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi",
        "-cpu", cpu_model,
        "-smp", str(cpus),
        "-m", str(memory_mb),
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none",
        "-nic", "none",
        "-serial", "stdio",
        "-kernel", str(image_dir / "vmlinuz"),
        "-initrd", str(image_dir / "initrd.img"),
        "-append", kernel_args,
        # snapshot=on: writes go to a throw-away overlay (in TMPDIR), the image stays pristine.
        "-drive", f"file={image_dir / 'rootfs.ext4'},format=raw,if=virtio,snapshot=on",
        "-virtfs", f"local,path={run_share},mount_tag=run,security_model=none,id=run",
        "-virtfs",
        f"local,path={checkout},mount_tag=checkout,security_model=none,readonly=on,id=checkout",
    ]  # fmt: skip


def read_text_files(directory: Path) -> dict[str, str]:
    """Every regular file directly in ``directory`` as text (undecodable bytes replaced)."""
    if not directory.is_dir():
        return {}
    return {
        path.name: path.read_text(errors="replace")
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def run_in_vm(
    command: str,
    *,
    image_dir: Path,
    checkout: Path = CHECKOUT,
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
    memory_mb: int = 1024,
    cpus: int = 2,
    cpu_model: str = os.environ.get("TCPACCT_VM_CPU", "max"),
) -> GuestResult:
    """Boot the image, run ``command`` (bash, in the checkout) in the guest, power off.

    Blocks until the guest powers off or ``timeout`` seconds pass; then qemu is killed by PID.
    """
    checkout = checkout.resolve()
    with tempfile.TemporaryDirectory(prefix="tcpacct-vm-") as scratch:
        run_share = Path(scratch) / "share"
        (run_share / OUT_DIR).mkdir(parents=True)
        (run_share / "guest.sh").write_text(guest_script(command, checkout, env or {}))
        console_path = Path(scratch) / "console.log"
        argv = qemu_command(
            image_dir, run_share, checkout, memory_mb=memory_mb, cpus=cpus, cpu_model=cpu_model
        )
        qemu_env = {**os.environ, "TMPDIR": scratch}  # the snapshot overlay dies with scratch
        timed_out = False
        with console_path.open("wb") as console:
            qemu = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env=qemu_env,
            )  # fmt: skip
            try:
                qemu.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if qemu.poll() is None:
                    qemu.kill()  # SIGKILL to this PID only
                    qemu.wait()
        shared = read_text_files(run_share)
        exit_text = shared.get(EXIT_FILE, "").strip()
        return GuestResult(
            exit_code=int(exit_text) if exit_text.isdigit() else None,
            output=shared.get(OUTPUT_FILE, ""),
            console=console_path.read_text(errors="replace"),
            timed_out=timed_out,
            files=read_text_files(run_share / OUT_DIR),
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900, help="hard limit in seconds")
    parser.add_argument("--memory", type=int, default=1024, help="guest memory in MB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--console", action="store_true", help="print the serial console too")
    parser.add_argument("command", nargs="+", help="run in the guest by bash, in the checkout")
    args = parser.parse_args(argv)
    if missing := missing_tools():
        print(f"run_in_vm: missing {', '.join(missing)}; run: sudo make setup", file=sys.stderr)
        return 2
    image_dir = build_image()
    env = dict(item.split("=", 1) for item in args.env)
    result = run_in_vm(
        args.command[0] if len(args.command) == 1 else shlex.join(args.command),
        image_dir=image_dir, env=env, timeout=args.timeout,
        memory_mb=args.memory, cpus=args.cpus,
    )  # fmt: skip
    if args.console:
        print(result.console, file=sys.stderr)
    print(result.output, end="")
    if result.exit_code is None:
        print(result.describe(), file=sys.stderr)
        return 124 if result.timed_out else 125
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

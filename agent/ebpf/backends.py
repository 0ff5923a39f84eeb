"""The three kernel backends: what each hooks, what it needs, and why it may not load here.

All share bpf/tcpacct.c (maps and the lifecycle on raw tracepoints ``inet_sock_set_state`` and
``tcp_destroy_sock``); they differ in how bytes are counted:

========== ================================================ ===============================
backend    send / receive hooks                              needs
========== ================================================ ===============================
tracepoint raw tp sock:sock_send_length / sock_recv_length   Linux >= 6.3
fentry     fexit tcp_sendmsg / tcp_recvmsg (+ tcp_sendpage)  BTF and BPF trampolines
kprobe     kprobe+kretprobe on the same functions            kprobes (CONFIG_KPROBES)
========== ================================================ ===============================
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from agent.ebpf.btf import KIND_FUNC, KIND_TYPEDEF, Btf, BtfError

BACKENDS = ("tracepoint", "fentry", "kprobe")
# Each lifecycle handler twice: the second program handles the events the kernel skipped the
# first for (it is never re-entered on a CPU; see bpf/tcpacct.c on_set_state_nested).
LIFECYCLE_TRACEPOINTS = (
    ("inet_sock_set_state", "on_set_state"),
    ("inet_sock_set_state", "on_set_state_nested"),
    ("tcp_destroy_sock", "on_destroy"),
    ("tcp_destroy_sock", "on_destroy_nested"),
)
# The first of each pair: its recursion misses are the events its twin had to handle.
LIFECYCLE_PRIMARIES = ("on_set_state", "on_destroy")


class BackendUnavailable(Exception):
    """A backend cannot run on this kernel; the message says what is missing."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend}: {reason}")
        self.backend = backend
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Hook:
    """One attachment: ``kind`` is raw_tracepoint, kprobe or kretprobe; fentry programs are
    attached by bcc itself when the module loads (KRETFUNC_PROBE)."""

    kind: str
    target: str
    function: str


@dataclass(frozen=True, slots=True)
class BackendPlan:
    name: str
    source: str  # file name in bpf/ (one file; the backend is a cflag)
    cflags: tuple[str, ...] = ()
    hooks: tuple[Hook, ...] = ()
    attached_by_bcc: tuple[str, ...] = field(default=())  # kernel functions (fentry)
    # the hot path's slots (bpf/tcpacct.c `slots`): compare-and-swap and exchange on map
    # values (Linux 5.12) and a memory-mapped array (5.5); older kernels count in the hash map
    slots: bool = True


SLOTS_SINCE = (5, 12)
# User space reads a slot's owner, counters and owner again from the memory-mapped array
# with plain loads (agent/ebpf/decoding.py fold_slot): the owner check holds only where the
# CPU does not reorder loads with loads, as x86-64 does not. Elsewhere (arm64 may) sockets
# count in their map entries, which user space reads through bpf(2), as before 5.12.
SLOTS_MACHINES = ("x86_64", "amd64")


def _slots(release: str, machine: str) -> bool:
    """Whether the hot path's slot array is used: ``("6.18.1", "x86_64")`` -> True;
    ``("5.11.22", "x86_64")`` or ``("6.18.1", "aarch64")`` -> False."""
    return _kernel_version(release) >= SLOTS_SINCE and machine in SLOTS_MACHINES


def _has_tracepoint(btf: Btf, name: str) -> bool:
    return btf.has(KIND_TYPEDEF, f"btf_trace_{name}")


def _kernel_version(release: str) -> tuple[int, int]:
    """``"6.1.0-56-amd64"`` -> ``(6, 1)``."""
    major, minor = release.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _tcp_function_cflags(btf: Btf, release: str) -> tuple[list[str], bool]:
    try:
        arity = btf.function_arity("tcp_recvmsg")
    except BtfError as error:
        raise BackendUnavailable("fentry", f"tcp_recvmsg not in BTF ({error})") from error
    if arity not in (4, 5, 6):
        raise BackendUnavailable("fentry", f"tcp_recvmsg has {arity} parameters; expected 4-6")
    cflags = [f"-DTCP_RECVMSG_ARITY={arity}"]
    # Before 6.5 sendfile/splice reach TCP through tcp_sendpage, not tcp_sendmsg; from 6.5
    # tcp_sendpage (while it exists) calls tcp_sendmsg, so hooking both would count twice.
    sendpage = btf.has(KIND_FUNC, "tcp_sendpage") and _kernel_version(release) < (6, 5)
    if sendpage:
        cflags.append("-DHOOK_TCP_SENDPAGE=1")
    return cflags, sendpage


def plan_backend(
    name: str,
    btf: Btf,
    *,
    release: str,
    sys_root: Path = Path("/sys"),
    for_attaching: bool = True,
    machine: str | None = None,
) -> BackendPlan:
    """What to compile and attach for a backend, or BackendUnavailable saying why not.

    ``for_attaching=False`` plans a compile only: it skips the check that the kernel has
    kprobes (compiling needs none). ``machine``: this one's (``platform.machine()``) unless
    given; it decides, with the release, whether the slot array is used (SLOTS_MACHINES)."""
    slots = _slots(release, machine if machine is not None else platform.machine())
    lifecycle = tuple(Hook("raw_tracepoint", tp, fn) for tp, fn in LIFECYCLE_TRACEPOINTS)
    for tracepoint in dict(LIFECYCLE_TRACEPOINTS):
        if not _has_tracepoint(btf, tracepoint):
            raise BackendUnavailable(name, f"tracepoint {tracepoint} is not in this kernel")
    if name == "tracepoint":
        for tracepoint in ("sock_send_length", "sock_recv_length"):
            if not _has_tracepoint(btf, tracepoint):
                raise BackendUnavailable(
                    name,
                    f"tracepoint sock:{tracepoint} is not in this kernel "
                    f"({release}; it was added in Linux 6.3)",
                )
        return BackendPlan(
            name,
            "tcpacct.c",
            ("-DBACKEND_TRACEPOINT=1",),
            hooks=(
                *lifecycle,
                Hook("raw_tracepoint", "sock_send_length", "on_send"),
                Hook("raw_tracepoint", "sock_recv_length", "on_receive"),
            ),
            slots=slots,
        )
    if name == "fentry":
        cflags, sendpage = _tcp_function_cflags(btf, release)
        functions = ("tcp_sendmsg", "tcp_recvmsg", *(("tcp_sendpage",) if sendpage else ()))
        return BackendPlan(
            name,
            "tcpacct.c",
            ("-DBACKEND_FENTRY=1", *cflags),
            lifecycle,
            functions,
            slots=slots,
        )
    if name == "kprobe":
        kprobe_pmu = sys_root / "bus/event_source/devices/kprobe"
        kprobe_events = [
            sys_root / "kernel/tracing/kprobe_events",
            sys_root / "kernel/debug/tracing/kprobe_events",
        ]
        missing = not kprobe_pmu.exists() and not any(p.exists() for p in kprobe_events)
        if for_attaching and missing:
            raise BackendUnavailable(
                name,
                f"kprobes are not built into this kernel (no {kprobe_pmu} and no "
                "kprobe_events in tracefs; needs CONFIG_KPROBES and CONFIG_KPROBE_EVENTS)",
            )
        cflags, sendpage = _tcp_function_cflags(btf, release)
        functions = ("tcp_sendmsg", "tcp_recvmsg", *(("tcp_sendpage",) if sendpage else ()))
        hooks = [*lifecycle]
        for function in functions:
            hooks.append(Hook("kprobe", function, f"enter_{function}"))
            hooks.append(Hook("kretprobe", function, f"exit_{function}"))
        return BackendPlan(
            name,
            "tcpacct.c",
            ("-DBACKEND_KPROBE=1", *cflags),
            tuple(hooks),
            slots=slots,
        )
    raise BackendUnavailable(name, f"unknown backend (choose from {', '.join(BACKENDS)})")


def _may_load_bpf(status: Path = Path("/proc/self/status")) -> bool:
    """Root, or CAP_BPF (39) and CAP_PERFMON (38) in the effective set."""
    if os.geteuid() == 0:
        return True
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return bool(caps >> 39 & 1 and caps >> 38 & 1)
    except OSError:
        pass
    return False


def explain_load_error(backend: str, error: BaseException) -> str:
    """A bcc exception -> what is missing, in words a user can act on.

    ``explain_load_error("fentry", Exception("Failed to load BPF program b'kretfunc__...':
    Permission denied"))`` -> ``"fentry/fexit programs were refused (EPERM) ..."``.
    """
    text = str(error)
    if not _may_load_bpf():
        return (
            f"not allowed to load BPF ({text}): run as root, or grant CAP_BPF and "
            "CAP_PERFMON (bcc cannot even create its maps without them)"
        )
    if "Failed to compile" in text:
        return f"the BPF program did not compile ({text}); see the compiler messages above"
    refused = ("Permission denied", "Operation not permitted", "Need super-user")
    if backend == "fentry" and any(word in text for word in refused):
        return (
            "fentry/fexit programs were refused by this kernel (EPERM: BPF trampolines are "
            "unavailable or blocked, e.g. by lockdown)"
        )
    if "Operation not permitted" in text or "Permission denied" in text:
        return f"the kernel refused to load BPF ({text}): run as root or with CAP_BPF+CAP_PERFMON"
    if "raw tracepoint" in text:
        return f"attaching a raw tracepoint failed ({text})"
    return text

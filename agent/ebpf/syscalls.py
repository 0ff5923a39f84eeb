"""The bpf(2) system call, for the few commands the agent needs after its programs are loaded.

Reading maps and loading pre-compiled programs need nothing of bcc, whose shared library
brings LLVM and clang into the process (~90 MiB of mapped files). Everything here is a thin
wrapper: build the ``union bpf_attr`` for one command, call ``syscall(SYS_bpf, ...)``, raise
``OSError`` with the kernel's errno on failure.

Layouts follow ``include/uapi/linux/bpf.h``; only the leading fields each command reads are
set, the rest of the attribute stays zero as the kernel requires.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# SYS_bpf per architecture (asm/unistd.h).
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_TRACING = 26  # with BPF_TRACE_RAW_TP: a BTF-typed tracepoint (tp_btf)
BPF_TRACE_RAW_TP = 23
BPF_PSEUDO_MAP_FD = 1
BPF_LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM

_ATTR_SIZE = 128  # larger than every attribute used here; the kernel accepts zero padding

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


def _sys_bpf_number() -> int:
    machine = platform.machine()
    try:
        return _SYS_BPF[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown for {machine}") from None


_NR_BPF = _sys_bpf_number()


def bpf(command: int, attr: ctypes.Array[ctypes.c_char] | ctypes.Structure) -> int:
    """One bpf(2) call; returns its result (an fd for creating commands), raises OSError."""
    result = _syscall(_NR_BPF, command, ctypes.addressof(attr), ctypes.sizeof(attr))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(result)


def bpf_errno(command: int, attr: ctypes.Structure) -> int:
    """As :func:`bpf`, but returns 0 or the errno (for calls where ENOENT is an answer)."""
    result = _syscall(_NR_BPF, command, ctypes.addressof(attr), ctypes.sizeof(attr))
    return 0 if result >= 0 else ctypes.get_errno()


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
        ("_pad", ctypes.c_uint8 * (_ATTR_SIZE - 44)),
    ]


class ElemAttr(ctypes.Structure):
    """BPF_MAP_*_ELEM: map_fd, key, value (or next_key), flags."""

    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("_pad", ctypes.c_uint8 * (_ATTR_SIZE - 32)),
    ]


class BatchAttr(ctypes.Structure):
    """BPF_MAP_*_BATCH: in_batch, out_batch, keys, values, count, map_fd, flags."""

    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("_pad", ctypes.c_uint8 * (_ATTR_SIZE - 56)),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint8 * (_ATTR_SIZE - 112)),
    ]


class _RawTracepointAttr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_uint64),
        ("prog_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint8 * (_ATTR_SIZE - 12)),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
        ("_pad", ctypes.c_uint8 * (_ATTR_SIZE - 16)),
    ]


def map_sizes(fd: int) -> tuple[int, int]:
    """(key size, value size) of the map at ``fd``, as the kernel holds it (for a per-CPU
    map the value size is one CPU's)."""
    info = _MapInfo()
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
    )
    return int(info.key_size), int(info.value_size)


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info up to recursion_misses (Linux >= 5.12); a kernel that fills
    less leaves the rest zero."""

    _fields_ = [
        ("_head", ctypes.c_uint8 * 192),  # type ... prog_tags: not read here
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
    ]


class _StatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("_pad", ctypes.c_uint8 * (_ATTR_SIZE - 4))]


@dataclass(frozen=True, slots=True)
class ProgramRunStats:
    """What the kernel counted for one program: ``run_ns`` and ``runs`` only while run-time
    statistics are on (:func:`enable_run_time_stats`), ``recursion_misses`` always."""

    run_ns: int
    runs: int
    recursion_misses: int


def program_run_stats(fd: int) -> ProgramRunStats:
    """The kernel's counters of the program at ``fd``:
    ``ProgramRunStats(run_ns=2750000, runs=20000, recursion_misses=0)``."""
    info = _ProgInfo()
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
    )
    return ProgramRunStats(int(info.run_time_ns), int(info.run_cnt), int(info.recursion_misses))


def enable_run_time_stats() -> int:
    """Turn on the kernel's per-program run time and run count (BPF_ENABLE_STATS, Linux
    >= 5.8) until the returned fd is closed. They cost every BPF program on the machine two
    clock reads per run, so only a measurement keeps them on, and never longer than its fd."""
    return bpf(BPF_ENABLE_STATS, _StatsAttr(type=BPF_STATS_RUN_TIME))


def create_map(
    map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str
) -> int:
    """A new map's fd. ``create_map(1, 8, 96, 65536, 0, "socks")`` -> ``7``."""
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode()[:15],
    )
    return bpf(BPF_MAP_CREATE, attr)


def load_program(
    name: str,
    prog_type: int,
    instructions: bytes,
    license: str = "GPL",
    *,
    expected_attach_type: int = 0,
    attach_btf_id: int = 0,
) -> int:
    """A verified program's fd; on refusal, OSError whose text ends with the verifier log.

    A BTF-typed tracepoint program is ``prog_type=BPF_PROG_TYPE_TRACING``,
    ``expected_attach_type=BPF_TRACE_RAW_TP`` and ``attach_btf_id`` the kernel BTF id of
    the tracepoint's ``btf_trace_<name>`` typedef (``Btf.tracepoint_type_id``)."""
    insns = ctypes.create_string_buffer(instructions, len(instructions))
    licence = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(instructions) // 8,
        insns=ctypes.addressof(insns),
        license=ctypes.addressof(licence),
        prog_name=name.encode()[:15],
        expected_attach_type=expected_attach_type,
        attach_btf_id=attach_btf_id,
    )
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EINVAL):
            raise
    log = ctypes.create_string_buffer(1 << 20)  # ask again, with the verifier's reasons
    attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as error:
        tail = log.value.decode(errors="replace").strip().splitlines()[-12:]
        raise OSError(error.errno, f"{error.strerror}: " + "\n".join(tail)) from None


def open_raw_tracepoint(tracepoint: str | None, program_fd: int) -> int:
    """Attach a raw tracepoint program; the attachment lives as long as the returned fd.

    ``tracepoint`` None attaches a BTF-typed tracepoint program where its load named it."""
    name = ctypes.create_string_buffer(tracepoint.encode()) if tracepoint else None
    attr = _RawTracepointAttr(name=ctypes.addressof(name) if name else 0, prog_fd=program_fd)
    return bpf(BPF_RAW_TRACEPOINT_OPEN, attr)


def relocate_map_fds(instructions: bytes, new_fd_of: dict[int, int]) -> bytes:
    """Rewrite the map fds a compiler baked into ``ld_imm64`` instructions.

    An ``ld_imm64`` with ``src_reg == BPF_PSEUDO_MAP_FD`` (byte 1's high nibble) carries a
    map fd in its 32-bit immediate (bytes 4-7): ``{5: 9}`` turns ``18 15 00 00 05 00 00 00``
    into ``18 15 00 00 09 00 00 00``. Raises KeyError for an fd not in ``new_fd_of``.
    """
    code = bytearray(instructions)
    index = 0
    while index < len(code):
        if code[index] == BPF_LD_IMM64:
            if code[index + 1] >> 4 == BPF_PSEUDO_MAP_FD:
                old = int.from_bytes(code[index + 4 : index + 8], "little")
                code[index + 4 : index + 8] = new_fd_of[old].to_bytes(4, "little")
            index += 16  # ld_imm64 takes two instruction slots
        else:
            index += 8
    return bytes(code)


def possible_cpus(path: Path = Path("/sys/devices/system/cpu/possible")) -> int:
    """How many values a per-CPU map holds per key: ``"0-3"`` -> 4, ``"0,2-3"`` -> 4."""
    total = 0
    for part in path.read_text().strip().split(","):
        first, _, last = part.partition("-")
        total += int(last or first) - int(first) + 1
    return total


def check_sizes(fd: int, key_size: int, value_size: int) -> None:
    """Refuse a map whose key or (per-CPU: one CPU's) value size is not what the caller's
    buffers are made for: the kernel would write past them."""
    actual = map_sizes(fd)
    if actual != (key_size, value_size):
        raise OSError(
            errno.EINVAL,
            f"BPF map fd {fd} has key/value sizes {actual}, expected {(key_size, value_size)}",
        )


class MapHandle:
    """Lookups and updates of one map by fd, with buffers allocated once.

    ``cpus``: for a per-CPU map, how many values a key holds (each padded to 8 bytes);
    lookups return them all, updates take them all. The map's sizes are checked first.
    """

    def __init__(self, fd: int, key_size: int, value_size: int, *, cpus: int = 0) -> None:
        check_sizes(fd, key_size, value_size)
        self.key_size = key_size
        self.value_size = (value_size + 7) // 8 * 8 * cpus if cpus else value_size
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(self.value_size)
        self._attr = ElemAttr(
            map_fd=fd, key=ctypes.addressof(self._key), value=ctypes.addressof(self._value)
        )

    def lookup(self, key: bytes) -> bytes | None:
        """The value at ``key``, or None when there is none."""
        ctypes.memmove(self._key, key, self.key_size)
        error = bpf_errno(BPF_MAP_LOOKUP_ELEM, self._attr)
        if error == errno.ENOENT:
            return None
        if error:
            raise OSError(error, f"BPF map lookup failed: {os.strerror(error)}")
        return self._value.raw

    def update(self, key: bytes, value: bytes) -> None:
        """Create or replace the value at ``key`` (BPF_ANY)."""
        ctypes.memmove(self._key, key, self.key_size)
        ctypes.memmove(self._value, value, self.value_size)
        bpf(BPF_MAP_UPDATE_ELEM, self._attr)

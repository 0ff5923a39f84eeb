"""The compile cache's data (agent/ebpf/compiled.py) and the bpf(2) helpers that need no
kernel (agent/ebpf/syscalls.py): relocation of map fds, CPU counts."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.ebpf.compiled import CompiledProgram, MapSpec, cache_key, read_cached, write_cached
from agent.ebpf.syscalls import possible_cpus, relocate_map_fds


def insn(code: int, regs: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, regs, off, imm)


def ld_map_fd(fd: int, dst: int = 1) -> bytes:
    """ld_imm64 dst, map fd: two slots, src_reg = BPF_PSEUDO_MAP_FD (1)."""
    return insn(0x18, (1 << 4) | dst, 0, fd) + insn(0, 0, 0, 0)


def test_relocation_rewrites_map_fds_and_nothing_else() -> None:
    plain_imm64 = insn(0x18, 2, 0, 5) + insn(0, 0, 0, 0)  # src_reg 0: a constant 5, not a map
    mov = insn(0xB7, 3, 0, 5)  # r3 = 5
    code = ld_map_fd(5) + mov + plain_imm64 + ld_map_fd(6, dst=2) + insn(0x95)
    out = relocate_map_fds(code, {5: 40, 6: 41})
    assert out == ld_map_fd(40) + mov + plain_imm64 + ld_map_fd(41, dst=2) + insn(0x95)


def test_relocation_refuses_an_unknown_map_fd() -> None:
    with pytest.raises(KeyError):
        relocate_map_fds(ld_map_fd(9), {5: 40})


@pytest.mark.parametrize(("text", "count"), [("0\n", 1), ("0-1\n", 2), ("0-3,8-11\n", 8)])
def test_possible_cpus(tmp_path: Path, text: str, count: int) -> None:
    path = tmp_path / "possible"
    path.write_text(text)
    assert possible_cpus(path) == count


PROGRAM = CompiledProgram(
    maps=(MapSpec("socks", 1, 8, 96, 65536, 0, 5), MapSpec("counters", 6, 4, 8, 7, 0, 6)),
    functions={"on_send": ld_map_fd(5) + insn(0x95), "on_destroy": insn(0x95)},
)


def test_compiled_program_survives_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "tracepoint-abc.json"
    write_cached(path, PROGRAM)
    assert read_cached(path) == PROGRAM
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


@pytest.mark.parametrize(
    "text", ["", "{", '{"format": 99}', '{"format": 2, "maps": []}', '{"format": 2, "maps": [{}]}']
)
def test_a_broken_cache_file_reads_as_missing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(text)
    assert read_cached(path) is None
    assert read_cached(tmp_path / "absent.json") is None


def test_cache_key_changes_with_whatever_the_compile_depends_on() -> None:
    base = cache_key(b"int x;", ["-DA=1"], "6.1.0", "/usr/src/h")
    assert cache_key(b"int x;", ["-DA=1"], "6.1.0", "/usr/src/h") == base
    assert len(base) == 24
    assert cache_key(b"int y;", ["-DA=1"], "6.1.0", "/usr/src/h") != base
    assert cache_key(b"int x;", ["-DA=2"], "6.1.0", "/usr/src/h") != base
    assert cache_key(b"int x;", ["-DA=1"], "6.18.0", "/usr/src/h") != base
    assert cache_key(b"int x;", ["-DA=1", "6.1.0"], "/usr/src/h") != base  # no ambiguity


def test_a_cache_file_others_may_write_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "tracepoint-abc.json"
    write_cached(path, PROGRAM)
    assert read_cached(path) == PROGRAM
    path.chmod(0o666)
    assert read_cached(path) is None
    path.chmod(0o600)
    path.parent.chmod(0o777)
    assert read_cached(path) is None

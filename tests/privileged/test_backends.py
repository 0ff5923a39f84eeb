"""Every backend compiles on this machine; the ones this kernel cannot run say why.

This kernel (6.18, locked down) runs only the tracepoint backend: fentry is refused (EPERM)
and kprobes are not built in. Their runtime proof is the stock-kernel VM tier (tests/vm).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.ebpf.backends import LIFECYCLE_TRACEPOINTS, BackendUnavailable
from agent.ebpf.compiled import read_cached
from agent.ebpf.syscalls import ProgramRunStats, enable_run_time_stats
from agent.ebpf.tracing import Capacities, compile_only, open_tracer

LIFECYCLE = frozenset(function for _, function in LIFECYCLE_TRACEPOINTS)


@pytest.mark.parametrize("backend", ["tracepoint", "fentry", "kprobe"])
def test_every_backend_compiles(backend: str) -> None:
    """compile_only raises on a compile error; a load refusal comes back as a reason."""
    outcome = compile_only(backend)
    assert outcome == "loaded" or "refused" in outcome


def test_a_backend_this_kernel_lacks_names_what_is_missing() -> None:
    if Path("/sys/bus/event_source/devices/kprobe").exists():
        pytest.skip("this kernel has kprobes: nothing is missing")
    with pytest.raises(BackendUnavailable) as caught:
        open_tracer("kprobe", capacities=Capacities(sockets=1024, closed=1024, listeners=64))
    assert "kprobes are not built into this kernel" in str(caught.value)


def test_auto_names_every_backend_it_tried_when_none_works(tmp_path: Path) -> None:
    """A BTF without the tracepoints and a /sys without kprobes: auto explains each."""
    from tests.support.btf_blob import mini_kernel

    writer, _ = mini_kernel()
    btf = tmp_path / "vmlinux"
    btf.write_bytes(writer.bytes())
    with pytest.raises(BackendUnavailable) as caught:
        open_tracer("auto", btf_path=btf, sys_root=tmp_path)
    text = str(caught.value)
    assert "no backend works here" in text
    for backend in ("tracepoint", "fentry", "kprobe"):
        assert f"backend {backend}:" in text


def test_the_tracepoint_program_is_compiled_once_into_the_cache(tmp_path: Path, monkeypatch):
    """First start: a child process compiles into the cache. Next start: loaded from the
    cache without compiling. A damaged cache file is compiled again, not trusted."""
    import agent.ebpf.tracing as tracing

    small = Capacities(sockets=1024, closed=1024, listeners=64)
    try:
        tracing.open_tracer("tracepoint", capacities=small, compile_cache=tmp_path).close()
    except BackendUnavailable as error:
        pytest.skip(f"tracepoint backend not here: {error}")
    (cached,) = tmp_path.iterdir()
    first = cached.read_bytes()
    specs = {spec.name: spec for spec in read_cached(cached).maps}
    # per-CPU maps keep one CPU's value size (u64 counters, u32 busy flags), not bcc's
    # every-CPU array: a wrong size would misread CPUs and overrun read buffers
    assert (specs["counters"].value_size, specs["lifecycle_busy"].value_size) == (8, 4)
    assert (specs["socks"].value_size, specs["changed"].value_size) == (104, 1)
    # the hot path's slots: an array user space memory-maps (BPF_F_MMAPABLE), 2x sockets
    slots = specs["slots"]
    assert (slots.map_type, slots.value_size, slots.flags) == (2, 40, 1 << 10)
    assert slots.max_entries == small.slots

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled although the cache holds the program")

    monkeypatch.setattr(tracing, "compile_in_child", no_compiling)
    tracer = tracing.open_tracer("tracepoint", capacities=small, compile_cache=tmp_path)
    try:
        assert tracer.poll().counters.untracked_sockets == 0
    finally:
        tracer.close()
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]
    monkeypatch.undo()
    cached.write_text('{"format": 2, "maps": [')
    tracing.open_tracer("tracepoint", capacities=small, compile_cache=tmp_path).close()
    assert cached.read_bytes() == first


def test_a_compile_error_names_the_source_line(tmp_path: Path) -> None:
    bpf_dir = tmp_path / "bpf"
    bpf_dir.mkdir()
    source = (Path(__file__).resolve().parents[2] / "bpf" / "tcpacct.c").read_text()
    (bpf_dir / "tcpacct.c").write_text(source + "\nint broken( { }\n")
    with pytest.raises(BackendUnavailable) as caught:
        open_tracer(
            "tracepoint",
            capacities=Capacities(sockets=1024, closed=1024, listeners=64),
            bpf_dir=bpf_dir,
            compile_cache=tmp_path / "cache",
        )
    assert "tcpacct.c:" in str(caught.value)


def test_a_map_handle_refuses_a_map_of_other_sizes() -> None:
    """Buffers are sized from what the caller expects; a map with other sizes (as the
    per-CPU maps once were, from the cache) is refused before any read overruns them."""
    import os

    from agent.ebpf.syscalls import MapHandle, create_map

    percpu_array = 6
    fd = create_map(percpu_array, 4, 16, 2, 0, "test_sizes")
    try:
        with pytest.raises(OSError, match=r"sizes \(4, 16\), expected \(4, 8\)"):
            MapHandle(fd, 4, 8, cpus=2)
        assert MapHandle(fd, 4, 16, cpus=2).value_size == 32
    finally:
        os.close(fd)


def test_a_batch_reader_reads_every_entry_and_gives_its_pages_back() -> None:
    """What a batch read filled is handed back to the kernel after the poll (the pages read
    as zeros afterwards), and the next read fills them again with the map's entries."""
    import os

    from agent.ebpf.syscalls import MapHandle, create_map
    from agent.ebpf.tracing import _BatchReader

    hash_map, entries = 1, 5000
    fd = create_map(hash_map, 8, 96, 8192, 0, "test_release")
    try:
        handle = MapHandle(fd, 8, 96)
        expected = {}
        for index in range(entries):
            key, value = index + 1, bytes([index % 251 + 1]) * 96
            handle.update(key.to_bytes(8, "little"), value)
            expected[key] = value
        reader = _BatchReader(fd, 8, 96, 8192)
        for _ in range(2):
            keys, values = reader.read(delete=False)
            got = {
                key: bytes(values[i * 96 : (i + 1) * 96])
                for i, key in enumerate(keys.cast("B").cast("Q"))
            }
            assert got == expected
            del keys, values
            reader.release()
            assert not any(reader._buffers.views(entries)[1])  # pages given back: zeros
    finally:
        os.close(fd)


def _one_byte_exchanges(count: int) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as client,
    ):
        server, _ = listener.accept()
        with server:
            for _ in range(count):
                client.sendall(b"x")
                assert server.recv(1) == b"x"


def test_the_kernel_counts_program_runs_only_while_run_time_stats_are_on(tracer) -> None:
    """bpf_prog_info's run counters, as the benchmark reads them: 200 one-byte sends and
    200 receives run the data-path programs at least 400 times (other processes' socket
    calls may add), and none once the statistics' fd is closed."""

    def data_path(stats: dict[str, ProgramRunStats]) -> tuple[int, int]:
        chosen = [s for name, s in stats.items() if name not in LIFECYCLE]
        return sum(s.runs for s in chosen), sum(s.run_ns for s in chosen)

    stats_fd = enable_run_time_stats()
    try:
        runs_before, ns_before = data_path(tracer.program_stats())
        _one_byte_exchanges(200)
        runs_after, ns_after = data_path(tracer.program_stats())
    finally:
        os.close(stats_fd)
    assert runs_after - runs_before >= 400
    assert ns_after > ns_before
    if Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() != "0":
        return  # someone else turned them on for the whole machine
    _one_byte_exchanges(50)
    assert data_path(tracer.program_stats())[0] == runs_after

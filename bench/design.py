"""Figure 6: candidate hot paths for the per-call target, by the kernel's own count.

Each candidate in ``bpf/hot_path_candidates.c`` is attached alone to sock_send_length and
sock_recv_length while bench/loops.c runs the 1-byte send+recv loop; the kernel's run-time
statistics (BPF_ENABLE_STATS) give its time per run. Candidates rotate round by round, so
they see the same machine, and every round also runs the empty raw-tracepoint candidate,
whose count is the statistics' own clock reads: a candidate's figure is its count less the
empty one's in the same round, i.e. the work its body does per call. The dispatch of the
tracepoint is not in these figures (datapath's empty-program figure has it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.ebpf.btf import Btf
from agent.ebpf.syscalls import (
    BPF_PROG_TYPE_RAW_TRACEPOINT,
    BPF_PROG_TYPE_TRACING,
    BPF_TRACE_RAW_TP,
    enable_run_time_stats,
    load_program,
    open_raw_tracepoint,
    program_run_stats,
)
from bench.figures import Figure
from bench.stats import paired_difference, summarise
from bench.workloads import send_recv

log = logging.getLogger("bench.design")

SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "hot_path_candidates.c"
TRACEPOINTS = ("sock_send_length", "sock_recv_length")
FUNCTIONS = ("on_send", "on_recv")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")


@dataclass(frozen=True)
class Candidate:
    """One way of finding a socket's counters, built with ``-D<cflag>``."""

    name: str
    cflag: str
    btf_typed: bool  # a tp_btf program (BPF_PROG_TYPE_TRACING), else a raw tracepoint
    what: str


CANDIDATES = (
    Candidate("empty_raw_tp", "CANDIDATE_EMPTY", False, "raw tracepoint, empty"),
    Candidate("empty_tp_btf", "CANDIDATE_EMPTY_TP_BTF", True, "tp_btf, empty"),
    Candidate("hash", "CANDIDATE_HASH", False, "hash map by socket address (tcpacct's table)"),
    Candidate("array", "CANDIDATE_ARRAY", False, "open addressing in an array (tcpacct's slots)"),
    Candidate("sk_storage", "CANDIDATE_SK_STORAGE", True, "tp_btf, socket local storage"),
)
BASELINE = CANDIDATES[0]


class LoadedCandidate:
    """A candidate compiled by bcc and its two programs loaded (not attached)."""

    def __init__(self, candidate: Candidate, capacity: int, btf: Btf | None = None) -> None:
        from agent.ebpf.headers import apply_headers, choose_headers

        apply_headers(choose_headers())
        from bcc import BPF

        self.candidate = candidate
        self.bpf = BPF(src_file=str(SOURCE).encode(),
                       cflags=[f"-D{candidate.cflag}", f"-DCAPACITY={capacity}"])  # fmt: skip
        self.program_fds: list[int] = []
        self._owned: list[int] = []
        for function, tracepoint in zip(FUNCTIONS, TRACEPOINTS, strict=True):
            if candidate.btf_typed:
                btf = btf or Btf.from_path(VMLINUX_BTF)
                fd = load_program(
                    function, BPF_PROG_TYPE_TRACING, self.bpf.dump_func(function),
                    expected_attach_type=BPF_TRACE_RAW_TP,
                    attach_btf_id=btf.tracepoint_type_id(tracepoint),
                )  # fmt: skip
                self._owned.append(fd)
            else:
                fd = self.bpf.load_func(function, BPF_PROG_TYPE_RAW_TRACEPOINT).fd
            self.program_fds.append(fd)

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Both programs on their tracepoints for the duration of the block."""
        links: list[int] = []
        try:
            for fd, tracepoint in zip(self.program_fds, TRACEPOINTS, strict=True):
                links.append(
                    open_raw_tracepoint(None if self.candidate.btf_typed else tracepoint, fd)
                )
            yield
        finally:
            for link in links:
                os.close(link)

    def runs(self) -> tuple[int, int]:
        """(runs, run_ns) of both programs so far (run-time statistics must be on)."""
        stats = [program_run_stats(fd) for fd in self.program_fds]
        return sum(s.runs for s in stats), sum(s.run_ns for s in stats)

    def map_fd(self, name: str) -> int:
        """A map's fd by name (bcc's Python tables do not know socket local storage)."""
        from bcc.libbcc import lib

        return int(lib.bpf_table_fd(self.bpf.module, name.encode()))

    def close(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self.bpf.cleanup()


def counted_ns_per_run(loaded: LoadedCandidate, calls: int, cpu: int) -> tuple[float, int]:
    """(kernel-counted ns per program run, send+recv operations) over one loop round."""
    with loaded.attached():
        runs_before, ns_before = loaded.runs()
        moved = send_recv(calls, cpu)
        runs_after, ns_after = loaded.runs()
    runs = runs_after - runs_before
    if runs < 2 * moved.operations:
        raise RuntimeError(
            f"{loaded.candidate.name}: {runs} program runs for {moved.operations} "
            "send+recv pairs (run-time statistics off, or the programs not attached)"
        )
    return (ns_after - ns_before) / runs, moved.operations


def measure_candidates(rounds: int, calls: int, cpu: int, capacity: int = 65536) -> list[Figure]:
    """Figure 6: every candidate's body, ns per call by the kernel's count, over ``rounds``
    rotating rounds of ``calls`` send+recv iterations pinned to ``cpu``."""
    btf = Btf.from_path(VMLINUX_BTF)
    loaded = [LoadedCandidate(c, capacity, btf) for c in CANDIDATES]
    counted: dict[str, list[float]] = {c.name: [] for c in CANDIDATES}
    stats_fd = enable_run_time_stats()
    try:
        for number in range(rounds):
            start = number % len(loaded)
            for candidate in (*loaded[start:], *loaded[:start]):
                ns, _ = counted_ns_per_run(candidate, calls, cpu)
                counted[candidate.candidate.name].append(ns)
            log.info("round %d: %s", number,
                     {k: round(v[-1], 1) for k, v in counted.items()})  # fmt: skip
    finally:
        os.close(stats_fd)
        for candidate in loaded:
            candidate.close()
    baseline = counted[BASELINE.name]
    figures = [
        Figure(
            key=f"design.hot_path_counted_ns.{BASELINE.name}",
            title="what the kernel's count gives an empty raw-tracepoint program (clock reads)",
            unit="ns",
            method=_method(rounds, calls),
            value=summarise(baseline),
        )
    ]
    for candidate in CANDIDATES[1:]:
        body = paired_difference(counted[candidate.name], baseline)
        details: dict[str, Any] = {
            "counted_ns_per_run": summarise(counted[candidate.name]).as_dict()
        }
        figures.append(
            Figure(
                key=f"design.hot_path_ns.{candidate.name}",
                title=f"hot path candidate `{candidate.name}`: {candidate.what}, ns per call",
                unit="ns",
                method=f"as `design.hot_path_counted_ns.{BASELINE.name}`, less that "
                "program's count in the same round: the work the body does per call.",
                value=body,
                details=details,
            )
        )
    return figures


def _method(rounds: int, calls: int) -> str:
    return (
        f"bpf/hot_path_candidates.c, each candidate attached alone to sock_send_length and "
        f"sock_recv_length for a round of bench/loops.c ({calls} 1-byte send+recv iterations, "
        f"pinned), {rounds} rotating rounds; the kernel's run-time count (BPF_ENABLE_STATS) "
        "of its two programs / their runs."
    )

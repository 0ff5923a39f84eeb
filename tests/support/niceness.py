"""Read a thread's niceness the way ``ps -o ni`` does, from ``/proc/<pid>/task/<tid>/stat``."""

from __future__ import annotations

from pathlib import Path


def niceness_of(stat_line: str) -> int:
    """``"42 (my prog) S 1 42 42 0 -1 4194560 100 0 0 0 5 2 0 0 30 10 3 0 ..."`` -> 10: field
    19 (the name in parentheses may hold spaces and parentheses of its own)."""
    return int(stat_line.rpartition(")")[2].split()[16])


def thread_niceness(pid: int, proc: Path = Path("/proc")) -> dict[int, int]:
    """Every thread of process ``pid`` -> its niceness. A thread that ends between the
    listing and its read (the HTTP server's per-request threads do) is left out."""
    found = {}
    for task in (proc / str(pid) / "task").iterdir():
        try:
            found[int(task.name)] = niceness_of((task / "stat").read_text())
        except FileNotFoundError:
            continue
    return found

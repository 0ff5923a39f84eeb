"""agent/resolve/processes.py: process names by pid from a /proc tree, cached."""

from __future__ import annotations

from pathlib import Path

from agent.resolve.processes import ProcessNames


def proc_with(tmp_path: Path, names: dict[int, str]) -> Path:
    for pid, name in names.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(name + "\n")
    return tmp_path


def test_a_name_is_read_once(tmp_path: Path) -> None:
    names = ProcessNames(proc_with(tmp_path, {42: "nginx"}))
    assert names.name(42) == "nginx"
    (tmp_path / "42" / "comm").write_text("changed\n")
    assert names.name(42) == "nginx"  # cached: a connection's process is read once


def test_a_gone_process_is_read_once_and_cached_as_gone(tmp_path: Path) -> None:
    names = ProcessNames(proc_with(tmp_path, {}))
    assert names.name(7) is None
    proc_with(tmp_path, {7: "late"})
    assert names.name(7) is None  # many sockets of an exited server: one failed read


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    names = ProcessNames(proc_with(tmp_path, {1: "a", 2: "b", 3: "c"}), capacity=2)
    assert [names.name(pid) for pid in (1, 2, 1, 3)] == ["a", "b", "a", "c"]
    (tmp_path / "2" / "comm").write_text("B\n")  # 2 was evicted: read again
    (tmp_path / "1" / "comm").write_text("A\n")  # 1 was used recently: still cached
    assert (names.name(1), names.name(2)) == ("a", "B")

"""ConfigWatcher notices edits and a Kubernetes ConfigMap's ``..data`` symlink swap."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.metrics.reloading import ConfigWatcher, fingerprint

OLD = "metrics: []\n"
NEW = "metrics: {}\n"  # same size as OLD: only the target identity tells them apart


def configmap_volume(root: Path, content: str) -> Path:
    """A directory laid out as the kubelet lays out a ConfigMap volume; returns the file."""
    version = root / "..2024_05_01_10_00_00.000000001"
    version.mkdir()
    (version / "metrics.yaml").write_text(content)
    (root / "..data").symlink_to(version.name)
    (root / "metrics.yaml").symlink_to("..data/metrics.yaml")
    return root / "metrics.yaml"


def swap_configmap(root: Path, content: str, like: Path) -> None:
    """Publish a new version as the kubelet does: new dir, new link, atomic rename."""
    version = root / "..2024_05_01_10_05_00.000000002"
    version.mkdir()
    target = version / "metrics.yaml"
    target.write_text(content)
    status = like.stat()
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))  # same mtime, same size
    (root / "..data_tmp").symlink_to(version.name)
    os.replace(root / "..data_tmp", root / "..data")


def test_symlink_swap_is_a_change_even_with_equal_mtime_and_size(tmp_path):
    path = configmap_volume(tmp_path, OLD)
    calls = []
    watcher = ConfigWatcher([path], lambda: calls.append(path.read_text()), interval=1)
    assert watcher.check() is False
    old_target = path.resolve()
    swap_configmap(tmp_path, NEW, like=old_target)
    new_target = path.resolve()
    assert (new_target.stat().st_size, new_target.stat().st_mtime_ns) == (
        old_target.stat().st_size,
        old_target.stat().st_mtime_ns,
    )
    assert watcher.check() is True
    assert calls == [NEW]
    assert watcher.check() is False
    assert calls == [NEW]


def test_edit_in_place_and_removal_are_changes(tmp_path):
    path = tmp_path / "metrics.yaml"
    path.write_text(OLD)
    calls = []
    watcher = ConfigWatcher([path], lambda: calls.append("change"), interval=1)
    path.write_text(OLD + "# more\n")
    assert watcher.check() is True
    path.unlink()
    assert fingerprint(path) is None
    assert watcher.check() is True
    path.write_text(OLD)
    assert watcher.check() is True
    assert calls == ["change"] * 3


def test_a_failing_reload_does_not_stop_the_watcher(tmp_path, caplog):
    path = tmp_path / "metrics.yaml"
    path.write_text(OLD)

    def broken() -> None:
        raise RuntimeError("bad config")

    watcher = ConfigWatcher([path], broken, interval=1)
    path.write_text(OLD + "x: 1\n")
    assert watcher.check() is True
    assert "reloading the configuration failed" in caplog.text
    path.write_text(OLD + "x: 2\n")
    assert watcher.check() is True


def test_watcher_thread_reports_a_swap_and_stops(tmp_path):
    path = configmap_volume(tmp_path, OLD)
    changed = threading.Event()
    watcher = ConfigWatcher([path], changed.set, interval=0.05)
    with watcher:
        swap_configmap(tmp_path, NEW, like=path.resolve())
        assert changed.wait(timeout=30), "the watcher thread never reported the swap"
    assert watcher._thread is not None
    assert not watcher._thread.is_alive()


def test_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="interval must be positive"):
        ConfigWatcher([tmp_path / "x.yaml"], lambda: None, interval=0)

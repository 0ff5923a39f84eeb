"""netns inode -> pod UID by scanning a fixture /proc tree."""

from __future__ import annotations

import os
from pathlib import Path

from agent.resolve import NetnsResolver

HOST, POD_A_NS, POD_B_NS, OTHER_NS = 4026531840, 4026532281, 4026532400, 4026532500
UID_A = "0f3a9c2e-7c1b-4d5e-9f00-1234567890ab"
UID_B = "11111111-2222-3333-4444-555555555555"


def add_process(proc: Path, pid: int, netns: int | None, cgroup: str | None) -> None:
    directory = proc / str(pid)
    (directory / "ns").mkdir(parents=True)
    if netns is not None:
        os.symlink(f"net:[{netns}]", directory / "ns" / "net")
    if cgroup is not None:
        (directory / "cgroup").write_text(cgroup)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def tree(proc: Path) -> None:
    add_process(proc, 1, HOST, "0::/init.scope\n")
    add_process(proc, 10, POD_A_NS, f"0::/kubepods/pod{UID_A}/{'a' * 64}\n")  # pause
    add_process(proc, 11, POD_A_NS, f"0::/kubepods/pod{UID_A}/{'b' * 64}\n")  # app
    add_process(proc, 20, HOST, f"0::/kubepods/pod{UID_B}/{'c' * 64}\n")  # hostNetwork pod
    add_process(proc, 30, OTHER_NS, "0::/user.slice/user-1000.slice/session-1.scope\n")
    add_process(proc, 40, POD_B_NS, None)  # exited mid-scan: no cgroup file any more
    add_process(proc, 41, None, None)  # exited before its ns link could be read
    (proc / "self").mkdir()
    (proc / "meminfo").write_text("")


def test_pod_namespaces_map_to_their_pod(tmp_path: Path) -> None:
    tree(tmp_path)
    resolver = NetnsResolver(tmp_path, clock=Clock())
    assert resolver.host_netns() == HOST
    assert resolver.pod_uid_of_netns(POD_A_NS) == UID_A
    assert resolver.pod_uid_of_netns(HOST) is None  # shared by host-network pods and the node
    assert resolver.pod_uid_of_netns(OTHER_NS) is None
    assert resolver.pod_uid_of_netns(POD_B_NS) is None
    assert resolver.pod_uid_of_netns(0) is None
    assert resolver.scans == 1  # misses within the rescan interval do not rescan


def test_new_namespace_found_after_the_rescan_interval(tmp_path: Path) -> None:
    tree(tmp_path)
    clock = Clock()
    resolver = NetnsResolver(tmp_path, clock=clock, rescan_interval=1.0)
    assert resolver.pod_uid_of_netns(POD_B_NS) is None
    (tmp_path / "40" / "cgroup").write_text(f"0::/kubepods/pod{UID_B}/{'d' * 64}\n")
    assert resolver.pod_uid_of_netns(POD_B_NS) is None
    clock.now += 1.0
    assert resolver.pod_uid_of_netns(POD_B_NS) == UID_B
    assert resolver.pod_uid_of_netns(POD_A_NS) == UID_A
    assert resolver.scans == 2


def test_a_namespace_shared_by_two_pods_is_ambiguous(tmp_path: Path) -> None:
    tree(tmp_path)
    add_process(tmp_path, 12, POD_A_NS, f"0::/kubepods/pod{UID_B}/{'e' * 64}\n")
    assert NetnsResolver(tmp_path, clock=Clock()).pod_uid_of_netns(POD_A_NS) is None


def test_plain_file_ns_entries_and_missing_proc(tmp_path: Path) -> None:
    (tmp_path / "7" / "ns").mkdir(parents=True)
    (tmp_path / "7" / "ns" / "net").write_text(f"net:[{POD_A_NS}]\n")
    (tmp_path / "7" / "cgroup").write_text(f"0::/kubepods/pod{UID_A}\n")
    assert NetnsResolver(tmp_path, clock=Clock()).pod_uid_of_netns(POD_A_NS) == UID_A
    assert NetnsResolver(tmp_path / "absent", clock=Clock()).pod_uid_of_netns(POD_A_NS) is None


def test_the_node_namespace_given_explicitly_is_never_scanned(tmp_path: Path) -> None:
    tree(tmp_path)
    (tmp_path / "1" / "ns" / "net").unlink()  # pid 1 unreadable, as under lockdown
    resolver = NetnsResolver(tmp_path, clock=Clock(), host_netns=HOST)
    assert resolver.pod_uid_of_netns(HOST) is None
    assert resolver.scans == 0
    assert resolver.pod_uid_of_netns(POD_A_NS) == UID_A


def test_an_inode_number_reused_by_another_pods_namespace(tmp_path: Path) -> None:
    """Pod A's namespace is gone and the kernel gave its inode number to pod B's new one:
    the remembered answer is not trusted once the process it came from left."""
    tree(tmp_path)
    clock = Clock()
    resolver = NetnsResolver(tmp_path, clock=clock, rescan_interval=1.0)
    assert resolver.pod_uid_of_netns(POD_A_NS) == UID_A
    for pid in (10, 11):  # pod A ends
        for path in sorted((tmp_path / str(pid)).rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        (tmp_path / str(pid)).rmdir()
    add_process(tmp_path, 50, POD_A_NS, f"0::/kubepods/pod{UID_B}/{'f' * 64}\n")  # pod B
    assert resolver.pod_uid_of_netns(POD_A_NS) is None  # within the rescan interval
    clock.now += 1.0
    assert resolver.pod_uid_of_netns(POD_A_NS) == UID_B
    assert resolver.scans == 2


def test_a_remembered_namespace_is_checked_against_its_process(tmp_path: Path) -> None:
    """Hits need no rescan while the process found in the namespace is still there; a
    process that moved to another namespace no longer vouches for the old one."""
    tree(tmp_path)
    clock = Clock()
    resolver = NetnsResolver(tmp_path, clock=clock, rescan_interval=1.0)
    assert resolver.pod_uid_of_netns(POD_A_NS) == UID_A
    clock.now += 5.0
    assert resolver.pod_uid_of_netns(POD_A_NS) == UID_A
    assert resolver.scans == 1
    for pid in (10, 11):  # both of pod A's processes now show another namespace
        link = tmp_path / str(pid) / "ns" / "net"
        link.unlink()
        os.symlink(f"net:[{OTHER_NS}]", link)
    assert resolver.pod_uid_of_netns(POD_A_NS) is None
    assert resolver.scans == 2

"""pid -> pod UID / container id from cgroup files (fixture trees, no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.resolve import CgroupResolver, ContainerRef, parse_cgroup_file
from agent.resolve.cgroups import parse_cgroup_path

UID = "0f3a9c2e-7c1b-4d5e-9f00-1234567890ab"
SYSTEMD_UID = UID.replace("-", "_")
CID = "4c1d" + "a" * 60


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # cgroup v1, cgroupfs driver, one line per controller
        (
            f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n"
            f"11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/\n",
            ContainerRef(UID, CID),
        ),
        # cgroup v2, systemd driver, containerd
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}"
            f".slice/cri-containerd-{CID}.scope\n",
            ContainerRef(UID, CID),
        ),
        # v1 systemd, guaranteed (no QoS level), docker
        (
            f"4:pids:/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/docker-{CID}.scope\n",
            ContainerRef(UID, CID),
        ),
        # cgroupfs guaranteed, CRI-O
        (f"0::/kubepods/pod{UID}/crio-{CID}\n", ContainerRef(UID, CID)),
        # kind / kubelet in a slice: a prefix before kubepods; upper-case hex folded
        (
            f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
            f"kubelet-kubepods-burstable-pod{SYSTEMD_UID.upper()}.slice/cri-containerd-{CID}.scope",
            ContainerRef(UID, CID),
        ),
        # static pods have a 32-hex UID (a hash of the manifest)
        ("0::/kubepods/besteffort/pod" + "b" * 32 + "/" + CID, ContainerRef("b" * 32, CID)),
        # the pod cgroup itself (e.g. a conmon or the sandbox scope not matched): pod only
        (
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}"
            f".slice/crio-conmon-{CID}.scope",
            ContainerRef(UID, ""),
        ),
        # container line preferred over a pod-only line
        (
            f"2:cpu:/kubepods/pod{UID}\n1:memory:/kubepods/pod{UID}/{CID}\n",
            ContainerRef(UID, CID),
        ),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("0::/\n", None),
        ("0::/system.slice/containerd.service\n", None),
        ("", None),
        ("garbage without colons\n", None),
        (f"0::/kubepods/burstable/podnot-a-uid/{CID}\n", None),
    ],
)
def test_parse_cgroup_file(text: str, expected: ContainerRef | None) -> None:
    assert parse_cgroup_file(text) == expected


def test_parse_cgroup_path_example_from_docstring() -> None:
    assert parse_cgroup_path(f"/kubepods/burstable/pod{UID}/{CID}") == ContainerRef(UID, CID)


def write_process(proc: Path, pid: int, cgroup: str | None) -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    if cgroup is not None:
        (directory / "cgroup").write_text(cgroup)


def test_resolver_reads_the_proc_tree(tmp_path: Path) -> None:
    write_process(tmp_path, 42, f"0::/kubepods/pod{UID}/{CID}\n")
    write_process(tmp_path, 43, "0::/system.slice/sshd.service\n")
    write_process(tmp_path, 44, None)  # exited between listing and reading
    (tmp_path / "45").mkdir()
    (tmp_path / "45" / "cgroup").write_bytes(b"\xff\xfe")
    resolver = CgroupResolver(tmp_path)
    assert resolver.container_of(42) == ContainerRef(UID, CID)
    assert resolver.pod_uid_of_pid(42) == UID
    assert [resolver.pod_uid_of_pid(pid) for pid in (43, 44, 45, 46, 0, -1)] == [None] * 6


def test_answers_are_remembered_briefly(tmp_path: Path) -> None:
    now = [0.0]
    write_process(tmp_path, 42, f"0::/kubepods/pod{UID}/{CID}\n")
    resolver = CgroupResolver(tmp_path, cache_seconds=2.0, clock=lambda: now[0])
    assert resolver.pod_uid_of_pid(42) == UID
    (tmp_path / "42" / "cgroup").write_text("0::/system.slice/other.service\n")  # PID reused
    assert resolver.pod_uid_of_pid(42) == UID
    now[0] = 2.0
    assert resolver.pod_uid_of_pid(42) is None

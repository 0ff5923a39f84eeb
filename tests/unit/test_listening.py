"""Listening sockets at start: /proc/net/tcp{,6} rows and owners, from a fixture /proc tree."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from agent.model import ListeningSocket
from agent.resolve.listening import (
    diag_listeners,
    listening_sockets,
    parse_diag_listeners,
    parse_listeners,
)
from agent.resolve.netlink import messages

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode                                                     \n"
)
TCP6_HEADER = (
    "  sl  local_address                         remote_address                        st "
    "tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)


def tcp_row(slot: int, local: str, remote: str, state: str, inode: int, uid: int = 0) -> str:
    return (
        f"{slot:4d}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 "
        f"{uid:5d}        0 {inode} 1 000000009b4d2265 100 0 0 10 0                    \n"
    )


TCP = TCP_HEADER + "".join(
    [
        tcp_row(0, "0100007F:1F90", "00000000:0000", "0A", 12345),  # 127.0.0.1:8080 LISTEN
        tcp_row(1, "00000000:0016", "00000000:0000", "0A", 23456),  # 0.0.0.0:22 LISTEN
        tcp_row(2, "0100007F:1F90", "0100007F:C350", "01", 34567, 1000),  # ESTABLISHED
        tcp_row(3, "0100007F:A1B2", "0100007F:1F90", "06", 0),  # TIME_WAIT, inode 0
        tcp_row(4, "010012C6:0050", "00000000:0000", "0A", 23999),  # 198.18.0.1:80 LISTEN
    ]
)
TCP6 = TCP6_HEADER + "".join(
    [
        tcp_row(0, "00000000000000000000000000000000:24CD",
                "00000000000000000000000000000000:0000", "0A", 45678),  # [::]:9421
        tcp_row(1, "00000000000000000000000001000000:0016",
                "00000000000000000000000000000000:0000", "0A", 45679),  # [::1]:22
        tcp_row(2, "00000000000000000000000001000000:818C",
                "00000000000000000000000001000000:AB95", "06", 0),
    ]
)

HOST_NETNS = 4026531840
POD_NETNS = 4026532001


def test_parse_listeners_ipv4() -> None:
    assert list(parse_listeners(TCP)) == [(8080, 12345), (22, 23456), (80, 23999)]


def test_parse_listeners_ipv6() -> None:
    assert list(parse_listeners(TCP6)) == [(9421, 45678), (22, 45679)]


def test_parse_listeners_docstring_example() -> None:
    row = ("  0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
           "        0 12345 1 0000000000000000 100 0 0 10 0")
    assert list(parse_listeners(TCP_HEADER + row)) == [(8080, 12345)]


def test_parse_listeners_of_an_empty_or_short_table() -> None:
    assert list(parse_listeners("")) == []
    assert list(parse_listeners(TCP_HEADER)) == []
    assert list(parse_listeners(TCP_HEADER + "   0: 0100007F:1F90 00000000:0000 0A\n")) == []


def test_parse_listeners_of_this_machine_matches_its_listening_inodes() -> None:
    """Sanity on the real /proc/net/tcp text: every LISTEN row parses to a port."""
    text = Path("/proc/net/tcp").read_text()
    expected = [
        (int(f[1].rsplit(":", 1)[1], 16), int(f[9]))
        for f in (line.split() for line in text.splitlines()[1:])
        if f[3] == "0A"
    ]
    assert list(parse_listeners(text)) == expected


# -- a fixture /proc tree ------------------------------------------------------------------------


def make_process(proc: Path, pid: int, *, comm: str | None, netns: int | None,
                 sockets: tuple[int, ...] = (), tables: tuple[str, str] | None = None,
                 other_fds: tuple[str, ...] = ("/dev/null", "pipe:[777]")) -> None:
    """``/proc/<pid>`` with ns/net, fd/*, comm and net/tcp{,6} as the kernel shows them."""
    root = proc / str(pid)
    (root / "ns").mkdir(parents=True)
    (root / "fd").mkdir()
    if netns is not None:
        os.symlink(f"net:[{netns}]", root / "ns" / "net")  # dangling, like the real thing
    for fd, target in enumerate((*other_fds, *(f"socket:[{i}]" for i in sockets))):
        os.symlink(target, root / "fd" / str(fd))
    if comm is not None:
        (root / "comm").write_text(comm + "\n")
    if tables is not None:
        (root / "net").mkdir()
        (root / "net" / "tcp").write_text(tables[0])
        (root / "net" / "tcp6").write_text(tables[1])


POD_TCP = TCP_HEADER + tcp_row(0, "00000000:1F90", "00000000:0000", "0A", 99999)  # :8080


def host_proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    make_process(proc, 1, comm="systemd", netns=HOST_NETNS, tables=(TCP, TCP6))
    make_process(proc, 412, comm="sshd", netns=HOST_NETNS, sockets=(23456, 45679),
                 tables=(TCP, TCP6))
    make_process(proc, 777, comm="python3", netns=HOST_NETNS, sockets=(12345, 34567, 45678),
                 tables=(TCP, TCP6))
    # a pod: its own network namespace and table
    make_process(proc, 5000, comm="pod-app", netns=POD_NETNS, sockets=(99999,),
                 tables=(POD_TCP, TCP6_HEADER))
    make_process(proc, 5001, comm="pod-sidecar", netns=POD_NETNS, tables=(POD_TCP, TCP6_HEADER))
    # entries that are not processes, or processes we cannot look into
    (proc / "self").symlink_to("777")
    (proc / "net").mkdir()
    (proc / "sys").mkdir()
    make_process(proc, 9000, comm="kthread", netns=None)  # ns/net unreadable
    return proc


def test_listening_sockets_of_a_fixture_proc_tree(tmp_path: Path) -> None:
    found = listening_sockets(host_proc(tmp_path))
    assert sorted(found, key=lambda s: (s.netns, s.port)) == [
        ListeningSocket(netns=HOST_NETNS, port=22, pid=412, comm="sshd"),  # v4 and v6: once
        ListeningSocket(netns=HOST_NETNS, port=80, pid=0, comm=""),  # no owner found
        ListeningSocket(netns=HOST_NETNS, port=8080, pid=777, comm="python3"),
        ListeningSocket(netns=HOST_NETNS, port=9421, pid=777, comm="python3"),
        ListeningSocket(netns=POD_NETNS, port=8080, pid=5000, comm="pod-app"),
    ]


def test_owner_without_a_comm_file_still_counts(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    make_process(proc, 10, comm=None, netns=HOST_NETNS, sockets=(12345,),
                 tables=(TCP_HEADER + tcp_row(0, "00000000:0050", "00000000:0000", "0A", 12345),
                         TCP6_HEADER))
    assert listening_sockets(proc) == [ListeningSocket(HOST_NETNS, 80, pid=10, comm="")]


def test_namespace_without_listeners_or_tables_gives_nothing(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    make_process(proc, 10, comm="a", netns=HOST_NETNS, tables=(TCP_HEADER, TCP6_HEADER))
    make_process(proc, 11, comm="b", netns=POD_NETNS)  # no net/ directory at all
    assert listening_sockets(proc) == []


def test_empty_proc(tmp_path: Path) -> None:
    assert listening_sockets(tmp_path) == []


def test_a_vanished_first_process_does_not_hide_its_namespace(tmp_path, monkeypatch) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    make_process(proc, 10, comm="exiting", netns=POD_NETNS)  # net/ gone: it just exited
    make_process(proc, 11, comm="pod-app", netns=POD_NETNS, sockets=(99999,),
                 tables=(POD_TCP, TCP6_HEADER))
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: sorted(real_listdir(path)))  # 10 first
    assert listening_sockets(proc) == [ListeningSocket(POD_NETNS, 8080, 11, "pod-app")]


def diag_record(port: int, inode: int, family: int = 2) -> bytes:
    """One netlink message carrying an inet_diag_msg (linux/inet_diag.h layout)."""
    body = struct.pack("=BBBB", family, 10, 0, 0)  # family, state LISTEN, timer, retrans
    body += struct.pack(">HH", port, 0) + bytes(16 + 16) + struct.pack("=I", 0) + bytes(8)
    body += struct.pack("=IIIII", 0, 0, 0, 0, inode)  # expires, rqueue, wqueue, uid, inode
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


def test_parse_diag_listeners_reads_port_and_inode() -> None:
    data = diag_record(8080, 12345) + diag_record(22, 23456, family=10)
    assert parse_diag_listeners(data) == ([(8080, 12345), (22, 23456)], False)
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4)
    assert parse_diag_listeners(diag_record(80, 7) + done) == ([(80, 7)], True)


def test_parse_diag_listeners_raises_the_kernels_error() -> None:
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -1) + bytes(16)
    with pytest.raises(OSError):
        parse_diag_listeners(error)


def test_diag_listeners_finds_a_listener_of_this_process() -> None:
    """The real kernel: sock_diag needs no privilege to dump this namespace's listeners."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        inode = os.fstat(server.fileno()).st_ino
        assert diag_listeners().get(inode) == port


def test_netlink_messages_are_split_at_their_padded_lengths() -> None:
    first = struct.pack("=IHHII", 21, 20, 2, 7, 0) + b"xxxxx"  # 21 bytes, padded to 24
    second = struct.pack("=IHHII", 20, 3, 2, 7, 0) + bytes(4)
    chunk = first + bytes(3) + second
    assert [(kind, seq, len(m)) for kind, seq, m in messages(chunk)] == [(20, 7, 21), (3, 7, 20)]
    assert list(messages(struct.pack("=IHHII", 4, 3, 0, 0, 0))) == []  # a length too short

"""Listening TCP sockets of every network namespace on the host, with their owners.

The kernel side tells a new connection's role from its state transitions; for connections
older than the agent it needs the listening sockets (a local listener on the socket's port
makes it the server end), and for new connections accepted from a listener older than the
agent it takes the listener's owner as the process. Both come from this snapshot at start.

Read once per network namespace: the agent's own with a sock_diag netlink dump the kernel
filters to LISTEN sockets (``/proc/net/tcp`` also lists every TIME_WAIT socket: 200k of them
after a burst of short connections take a second to print and parse), every other one from
``<proc>/<pid>/net/tcp{,6}``. Owners from ``<proc>/<pid>/fd``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from agent.model import ListeningSocket
from agent.resolve.netlink import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HEADER,
    error_code,
    messages,
)

TCP_LISTEN = "0A"

# sock_diag (linux/inet_diag.h): an inet_diag_req_v2 for TCP sockets in the given states,
# answered by inet_diag_msg records: family, state, timer, retrans, then the socket id
# (sport and dport big endian, src, dst, if, cookie), expires, rqueue, wqueue, uid, inode.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_DIAG_REQ = struct.Struct("=BBBxI48x")  # family, protocol, ext, pad, states, inet_diag_sockid
_DIAG_PORT = struct.Struct(">H")
_DIAG_INODE_OFFSET = 4 + 48 + 4 * 4  # after the sock id, expires, rqueue, wqueue, uid


def parse_diag_listeners(data: bytes) -> tuple[list[tuple[int, int]], bool]:
    """(port, inode) of the inet_diag_msg records in one netlink read, and whether the
    dump is done.

    A record for a socket listening on port 8080 with inode 12345 -> ``([(8080, 12345)],
    False)``; a read ending in NLMSG_DONE -> ``(..., True)``. An NLMSG_ERROR raises OSError.
    """
    found: list[tuple[int, int]] = []
    for kind, _sequence, message in messages(data):
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR and error_code(message):
            raise OSError(error_code(message), os.strerror(error_code(message)))
        if kind == SOCK_DIAG_BY_FAMILY:
            body = NLMSG_HEADER.size
            (port,) = _DIAG_PORT.unpack_from(message, body + 4)
            (inode,) = struct.unpack_from("=I", message, body + _DIAG_INODE_OFFSET)
            found.append((port, inode))
    return found, False


def diag_listeners() -> dict[int, int]:
    """inode -> port of every listening TCP socket in this process's network namespace."""
    ports_by_inode: dict[int, int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(5)
        for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            request = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << 10)  # TCP_LISTEN
            header = NLMSG_HEADER.pack(
                NLMSG_HEADER.size + len(request),
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                sequence,
                0,
            )
            sock.send(header + request)
            done = False
            while not done:
                records, done = parse_diag_listeners(sock.recv(65536))
                for port, inode in records:
                    ports_by_inode[inode] = port
    return ports_by_inode


def parse_listeners(table: str) -> Iterator[tuple[int, int]]:
    """(port, socket inode) of LISTEN rows of a /proc/net/tcp or tcp6 table.

    ``"  0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
    0 12345 ..."`` -> ``(8080, 12345)``.
    """
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        port = int(fields[1].rsplit(":", 1)[1], 16)
        yield port, int(fields[9])


def _netns_inode(proc: Path, pid: str) -> int | None:
    """``readlink /proc/1/ns/net`` = ``"net:[4026531840]"`` -> ``4026531840``."""
    try:
        link = os.readlink(proc / pid / "ns" / "net")
    except OSError:
        return None
    return int(link[link.index("[") + 1 : -1]) if "[" in link else None


def _socket_inodes(proc: Path, pid: str) -> Iterator[int]:
    try:
        fds = os.listdir(proc / pid / "fd")
    except OSError:
        return
    for fd in fds:
        try:
            target = os.readlink(proc / pid / "fd" / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            yield int(target[8:-1])


def listening_sockets(proc: Path = Path("/proc")) -> list[ListeningSocket]:
    """Every listening TCP socket on the host, one per (netns, port), with an owner if found."""
    pids_by_netns: dict[int, list[str]] = {}
    for entry in os.listdir(proc):
        if entry.isdigit():
            netns = _netns_inode(proc, entry)
            if netns is not None:
                pids_by_netns.setdefault(netns, []).append(entry)
    own_netns = _netns_inode(Path("/proc"), "self")
    found: list[ListeningSocket] = []
    for netns, pids in pids_by_netns.items():
        ports_by_inode: dict[int, int] = {}
        if netns == own_netns:
            with contextlib.suppress(OSError):  # sock_diag refused: read /proc below
                ports_by_inode = diag_listeners()
        for pid in [] if ports_by_inode else pids:  # any process of the namespace will do
            try:
                tables = [(proc / pid / "net" / "tcp").read_text()]
            except OSError:
                continue  # exited while we read: try the next process of the namespace
            with contextlib.suppress(OSError):  # no IPv6 in this kernel
                tables.append((proc / pid / "net" / "tcp6").read_text())
            for text in tables:
                for port, inode in parse_listeners(text):
                    ports_by_inode[inode] = port
            break
        if not ports_by_inode:
            continue
        owners: dict[int, tuple[int, str]] = {}
        for pid in pids:
            for inode in _socket_inodes(proc, pid):
                if inode in ports_by_inode and inode not in owners:
                    try:
                        comm = (proc / pid / "comm").read_text().strip()
                    except OSError:
                        comm = ""
                    owners[inode] = (int(pid), comm)
        seen_ports: set[int] = set()
        for inode, port in ports_by_inode.items():
            if port in seen_ports:
                continue
            seen_ports.add(port)
            pid, comm = owners.get(inode, (0, ""))
            found.append(ListeningSocket(netns=netns, port=port, pid=pid, comm=comm))
    return found

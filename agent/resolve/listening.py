"""Listening TCP sockets of every network namespace on the host, with their owners.

The kernel side tells a new connection's role from its state transitions; for connections
older than the agent it needs the listening sockets (a local listener on the socket's port
makes it the server end), and for new connections accepted from a listener older than the
agent it takes the listener's owner as the process. Both come from this snapshot at start.

Read from ``<proc>/<pid>/net/tcp{,6}`` once per network namespace, owners from
``<proc>/<pid>/fd``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from agent.model import ListeningSocket

TCP_LISTEN = "0A"


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
    found: list[ListeningSocket] = []
    for netns, pids in pids_by_netns.items():
        ports_by_inode: dict[int, int] = {}
        for pid in pids:  # any process of the namespace will do; some exit while we read
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

"""White-box edits of the agent's BPF maps for tests that stage states the kernel side
rarely reaches by itself (an entry gone while its slot stays)."""

from __future__ import annotations

import ctypes
import errno
import os

from agent.ebpf.syscalls import ElemAttr, bpf_errno

BPF_MAP_DELETE_ELEM = 3


def delete_entry(fd: int, key: bytes) -> None:
    """Delete ``key`` from the map ``fd``: ``delete_entry(socks_fd, (0xffff8881).to_bytes(8,
    "little"))``. Raises KeyError when there is no such entry."""
    buffer = ctypes.create_string_buffer(key, len(key))
    attr = ElemAttr(map_fd=fd, key=ctypes.addressof(buffer))
    error = bpf_errno(BPF_MAP_DELETE_ELEM, attr)
    if error == errno.ENOENT:
        raise KeyError(key.hex())
    if error:
        raise OSError(error, f"BPF map delete failed: {os.strerror(error)}")

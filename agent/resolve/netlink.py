"""Netlink framing shared by the agent's raw netlink users (conntrack, sock_diag).

Stdlib only: the listener snapshot runs at every start, before anything heavier is imported.
``messages(chunk)`` splits one ``recv()`` into its messages: a chunk holding a 20-byte
NLMSG_DONE message with sequence 7 -> ``[(3, 7, <those 20 bytes>)]``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300


def align(length: int) -> int:
    """Netlink pads every message and attribute to 4 bytes: ``5`` -> ``8``."""
    return (length + 3) & ~3


def messages(chunk: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence, whole message) of each message in ``chunk``."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(chunk):
        length, kind, _flags, sequence, _port = NLMSG_HEADER.unpack_from(chunk, offset)
        if length < NLMSG_HEADER.size:
            return
        yield kind, sequence, chunk[offset : offset + length]
        offset += align(length)


def error_code(message: bytes) -> int:
    """The errno an NLMSG_ERROR message carries (0: an acknowledgement)."""
    (code,) = struct.unpack_from("=i", message, NLMSG_HEADER.size)
    return -code

"""The request protocol of the test workloads (stdlib only: it runs inside network namespaces).

Each request is an 8-byte header ``struct.pack("!II", payload_length, response_length)``
followed by ``payload_length`` bytes; the answer is ``response_length`` bytes. A connection
may carry any number of requests. Header ``(1000, 5000)`` + 1000 bytes in -> 5000 bytes out;
the serving end has then read 1008 bytes and written 5000.

Used by ``tests/support/pod_peer.py`` and ``tests/e2e/workloads/mongodb.py`` (run as scripts:
they import this file from its directory).
"""

from __future__ import annotations

import socket
import struct

HEADER = struct.Struct("!II")
CHUNK = 65536


def read_exactly(connection: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or ``None`` at a clean end of stream before the first byte."""
    parts = []
    got = 0
    while got < size:
        data = connection.recv(min(CHUNK, size - got))
        if not data:
            if got == 0:
                return None
            raise ConnectionError(f"peer closed after {got} of {size} bytes")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def answer_requests(connection: socket.socket, fill: bytes) -> tuple[int, int]:
    """Answer requests until the client ends the stream; returns (bytes read, written)."""
    read = written = 0
    while True:
        header = read_exactly(connection, HEADER.size)
        if header is None:
            return read, written
        payload, response = HEADER.unpack(header)
        read += HEADER.size
        if payload and read_exactly(connection, payload) is None:
            raise ConnectionError("peer closed before the payload")
        read += payload
        connection.sendall(fill * response)
        written += response

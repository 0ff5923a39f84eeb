"""A stand-in for bookinfo's ``ratings-v2``: a MongoDB client driven line by line by the test.

Run inside the ratings pod; reads commands on stdin, answers each with one line on stdout:

- ``open NAME HOST PORT`` -> ``ok open NAME <local port>``
- ``exchange NAME PAYLOAD RESPONSE`` -> sends a request (8-byte header + PAYLOAD bytes, see
  ``mongodb.py``), reads RESPONSE bytes -> ``ok exchange NAME <bytes written> <bytes read>``
  e.g. ``exchange c1 1000 5000`` -> ``ok exchange c1 1008 5000``
- ``close NAME`` -> ``ok close NAME``

Any failure answers ``error <message>``. Every socket has a timeout, so no command hangs.
"""

from __future__ import annotations

import socket
import struct
import sys

HEADER = struct.Struct("!II")
TIMEOUT = 15.0


def receive(connection: socket.socket, size: int) -> int:
    got = 0
    while got < size:
        data = connection.recv(min(65536, size - got))
        if not data:
            raise ConnectionError(f"server closed after {got} of {size} bytes")
        got += len(data)
    return got


def handle(words: list[str], connections: dict[str, socket.socket]) -> str:
    command, name = words[0], words[1]
    if command == "open":
        connection = socket.create_connection((words[2], int(words[3])), timeout=TIMEOUT)
        connections[name] = connection
        return f"ok open {name} {connection.getsockname()[1]}"
    if command == "exchange":
        payload, response = int(words[2]), int(words[3])
        connection = connections[name]
        connection.sendall(HEADER.pack(payload, response) + b"r" * payload)
        read = receive(connection, response)
        return f"ok exchange {name} {HEADER.size + payload} {read}"
    if command == "close":
        connections.pop(name).close()
        return f"ok close {name}"
    raise ValueError(f"unknown command {command!r}")


def main() -> None:
    connections: dict[str, socket.socket] = {}
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            answer = handle(words, connections)
        except Exception as error:  # reported to the test, which fails with it
            answer = f"error {type(error).__name__}: {error}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()

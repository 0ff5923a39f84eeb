"""A pod's program for the Kubernetes-mode tests: a TCP server and client driven line by line.

Stdlib only; runs inside a "pod" (a network namespace of ``tests.support.netlab``) or on the
node. Reads one command a line on stdin, answers each with one line on stdout:

- ``listen HOST PORT`` -> ``ok listen PORT`` (serves every connection on a thread)
- ``open NAME HOST PORT`` -> ``ok open NAME <local address> <local port>``
- ``exchange NAME PAYLOAD RESPONSE`` -> one request: an 8-byte header
  ``struct.pack("!II", PAYLOAD, RESPONSE)`` and PAYLOAD bytes out, RESPONSE bytes back ->
  ``ok exchange NAME <bytes written> <bytes read>``; ``exchange c1 1000 5000`` ->
  ``ok exchange c1 1008 5000``
- ``close NAME`` -> ``ok close NAME``
- ``served PORT`` -> ``ok served PORT <bytes read> <bytes written> <connections closed>``:
  the server side's own account of the connections on PORT that have ended (the client
  closed them), e.g. ``ok served 8080 1008 5000 1``
- ``wait-served PORT CLOSED`` -> as ``served``, once CLOSED connections have ended (or
  after 10 s)

Any failure answers ``error <message>``. Every socket has a timeout, so no command hangs.
The program ends when its stdin closes.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, in a netns
from request_wire import CHUNK, HEADER, answer_requests

TIMEOUT = 15.0

served: dict[int, list[int]] = {}  # port -> [read, written, closed]
served_changed = threading.Condition()


def serve(connection: socket.socket, port: int) -> None:
    with connection:
        connection.settimeout(120.0)
        read, written = answer_requests(connection, b"s")
    with served_changed:
        totals = served.setdefault(port, [0, 0, 0])
        totals[0] += read
        totals[1] += written
        totals[2] += 1
        served_changed.notify_all()


def accept_forever(listener: socket.socket, port: int) -> None:
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=serve, args=(connection, port), daemon=True).start()


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(64)
    threading.Thread(target=accept_forever, args=(listener, port), daemon=True).start()
    return listener


def receive(connection: socket.socket, size: int) -> int:
    got = 0
    while got < size:
        data = connection.recv(min(CHUNK, size - got))
        if not data:
            raise ConnectionError(f"server closed after {got} of {size} bytes")
        got += len(data)
    return got


def served_line(port: int) -> str:
    read, written, closed = served.get(port, [0, 0, 0])
    return f"ok served {port} {read} {written} {closed}"


def handle(words: list[str], connections: dict[str, socket.socket], listeners: list) -> str:
    command = words[0]
    if command == "listen":
        listeners.append(listen(words[1], int(words[2])))
        return f"ok listen {words[2]}"
    if command == "open":
        name = words[1]
        connection = socket.create_connection((words[2], int(words[3])), timeout=TIMEOUT)
        connections[name] = connection
        local = connection.getsockname()
        return f"ok open {name} {local[0]} {local[1]}"
    if command == "exchange":
        name, payload, response = words[1], int(words[2]), int(words[3])
        connection = connections[name]
        connection.sendall(HEADER.pack(payload, response) + b"c" * payload)
        read = receive(connection, response)
        return f"ok exchange {name} {HEADER.size + payload} {read}"
    if command == "close":
        connections.pop(words[1]).close()
        return f"ok close {words[1]}"
    if command == "served":
        with served_changed:
            return served_line(int(words[1]))
    if command == "wait-served":
        port, closed = int(words[1]), int(words[2])
        deadline = time.monotonic() + 10.0
        with served_changed:
            while served.get(port, [0, 0, 0])[2] < closed and time.monotonic() < deadline:
                served_changed.wait(deadline - time.monotonic())
            return served_line(port)
    raise ValueError(f"unknown command {command!r}")


def main() -> None:
    connections: dict[str, socket.socket] = {}
    listeners: list[socket.socket] = []
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            answer = handle(words, connections, listeners)
        except Exception as error:  # reported to the test, which fails with it
            answer = f"error {type(error).__name__}: {error}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()

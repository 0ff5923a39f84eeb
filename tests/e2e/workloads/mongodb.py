"""A stand-in for the bookinfo ``mongodb`` container: a TCP server that answers requests.

Run inside the mongodb pod as ``python mongodb.py PORT [PORT ...]``. Prints ``listening``
once every port is bound, then for each connection, when the client has closed it::

    closed <port> <bytes read> <bytes written>

Wire protocol (the client side is ``ratings.py``): each request is an 8-byte header
``struct.pack("!II", payload_length, response_length)`` followed by ``payload_length`` bytes;
the answer is ``response_length`` bytes. A connection may carry any number of requests.
Example: header ``(1000, 5000)`` + 1000 bytes in -> 5000 bytes out; this end then has read
1008 bytes and written 5000.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading

HEADER = struct.Struct("!II")
CHUNK = 65536
print_lock = threading.Lock()


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


def serve(connection: socket.socket, port: int) -> None:
    read = written = 0
    with connection:
        while True:
            header = read_exactly(connection, HEADER.size)
            if header is None:
                break
            payload_length, response_length = HEADER.unpack(header)
            read += HEADER.size
            if payload_length and read_exactly(connection, payload_length) is None:
                raise ConnectionError("peer closed before the payload")
            read += payload_length
            connection.sendall(b"m" * response_length)
            written += response_length
    with print_lock:
        print("closed", port, read, written, flush=True)


def accept_forever(listener: socket.socket, port: int) -> None:
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=serve, args=(connection, port), daemon=True).start()


def main(ports: list[int]) -> None:
    for port in ports:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(64)
        threading.Thread(target=accept_forever, args=(listener, port), daemon=True).start()
    print("listening", flush=True)
    sys.stdin.read()  # ends when the test closes our stdin


if __name__ == "__main__":
    main([int(port) for port in sys.argv[1:]])

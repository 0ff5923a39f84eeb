"""A stand-in for the bookinfo ``mongodb`` container: a TCP server that answers requests.

Run inside the mongodb pod as ``python mongodb.py PORT [PORT ...]``. Prints ``listening``
once every port is bound, then for each connection, when the client has closed it::

    closed <port> <bytes read> <bytes written>

Wire protocol: tests/support/request_wire.py (the client side is ``ratings.py``): header
``(1000, 5000)`` + 1000 bytes in -> 5000 bytes out; this end then has read 1008 bytes and
written 5000.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))  # run as a script
from request_wire import answer_requests

print_lock = threading.Lock()


def serve(connection: socket.socket, port: int) -> None:
    with connection:
        read, written = answer_requests(connection, b"m")
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

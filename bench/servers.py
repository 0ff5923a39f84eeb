"""The far end of the pinned workloads, in their own process: ``python -m bench.servers``.

``rr``: echo fixed-size messages back until the client closes. ``churn``: accept, read one
message, close first (TIME_WAIT stays on this side), ``--count`` times. Each prints
``{"port": P}`` once listening and, on exit, what it moved::

    {"connections": 1, "sent": 1280000, "received": 1280000,
     "tcp_info": {"acked": 1280000, "received": 1280000}}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from bench.tcpinfo import tcp_info_after_ack, tcp_info_bytes

ACCEPT_TIMEOUT = 60.0


def _report(**values: object) -> None:
    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read ``size`` bytes; fewer only if the peer closed first."""
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def serve_rr(listener: socket.socket, size: int) -> None:
    conn, _ = listener.accept()
    sent = received = 0
    while True:
        message = recv_exactly(conn, size)
        if not message:
            break
        received += len(message)
        conn.sendall(message)
        sent += len(message)
    acked, tcpi_received = tcp_info_after_ack(conn, sent)
    conn.close()
    _report(
        connections=1,
        sent=sent,
        received=received,
        tcp_info={"acked": acked, "received": tcpi_received},
    )


def serve_churn(listener: socket.socket, size: int, count: int) -> None:
    received = acked_total = tcpi_received_total = 0
    started = time.process_time()  # CPU only: waiting in accept() costs none
    for _ in range(count):
        conn, _ = listener.accept()
        received += len(recv_exactly(conn, size))
        acked, tcpi_received = tcp_info_bytes(conn)
        acked_total += acked
        tcpi_received_total += tcpi_received
        conn.close()
    _report(
        connections=count,
        sent=0,
        received=received,
        tcp_info={"acked": acked_total, "received": tcpi_received_total},
        cpu_seconds=time.process_time() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=("rr", "churn"))
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.settimeout(ACCEPT_TIMEOUT)
    _report(port=listener.getsockname()[1])
    try:
        if args.kind == "rr":
            serve_rr(listener, args.size)
        else:
            serve_churn(listener, args.size, args.count)
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

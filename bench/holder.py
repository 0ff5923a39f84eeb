"""Real loopback TCP connections for the agent-cost figures: ``python -m bench.holder``.

``live --count N``: open N connections (2N sockets) and keep them; on stdin ``touch`` sends
one byte each way on every connection (every socket changes before the next poll), ``quit``
closes them all. ``churn --rate R --seconds S``: open and close R connections per second for
S seconds. Answers are JSON lines on stdout.

N connections need 2N descriptors (RLIMIT_NOFILE is raised as far as the hard limit allows;
here that is 20,000, so 100k connections take several holders, ``--shard`` apart) and N
distinct 4-tuples: clients bind to 127.1.<shard>.k with ``IP_BIND_ADDRESS_NO_PORT`` (the port
is picked at connect time per 4-tuple), a new source address every 20,000 connections.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PER_SOURCE_ADDRESS = 20_000
BATCH = 500


def _say(**values: object) -> None:
    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()


def source_address(index: int, shard: int = 0) -> str:
    """Connection ``index`` of holder ``shard`` -> its client address:
    ``(0, 0)`` -> ``"127.1.0.1"``, ``(20000, 3)`` -> ``"127.1.3.2"``."""
    return f"127.1.{shard}.{1 + index // PER_SOURCE_ADDRESS}"


def fd_limit() -> int:
    """The most descriptors this process can have (soft limit raised to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def _client(index: int, server: tuple[str, int], shard: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source_address(index, shard), 0))
    sock.connect(server)
    return sock


def hold(count: int, shard: int) -> None:
    limit = fd_limit()
    if 2 * count + 64 > limit:
        raise SystemExit(f"{count} connections need {2 * count + 64} descriptors; limit {limit}")
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    server = listener.getsockname()
    pairs: list[tuple[socket.socket, socket.socket]] = []
    start = time.perf_counter()
    while len(pairs) < count:
        batch = min(BATCH, count - len(pairs))
        clients = [_client(len(pairs) + i, server, shard) for i in range(batch)]
        for client in clients:
            accepted, _ = listener.accept()
            pairs.append((client, accepted))
    opened = time.perf_counter() - start

    def touch() -> None:
        for client, accepted in pairs:
            client.send(b"t")
            accepted.recv(1)
            accepted.send(b"t")
            client.recv(1)

    touch()
    _say(ready=True, connections=len(pairs), port=server[1], open_seconds=opened)
    for line in sys.stdin:
        command = line.strip()
        if command == "touch":
            touch()
            _say(ok=True)
        elif command == "quit":
            break
    for client, accepted in pairs:
        client.close()
        accepted.close()
    listener.close()
    _say(ok=True)


def churn(rate: float, seconds: float, shard: int) -> None:
    """Connect, send 64 bytes, close (both ends), paced to ``rate`` per second."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    server = listener.getsockname()
    message = b"m" * 64
    done = 0
    start = time.perf_counter()
    limit = int(rate * seconds)
    while done < limit:
        elapsed = time.perf_counter() - start
        if elapsed > seconds * 2:
            break  # could not keep up: stop anyway, the answer says how many
        due = int(elapsed * rate) + 1
        if done >= due:
            time.sleep(min(0.001, (done + 1) / rate - elapsed))
            continue
        client = _client(done % (4 * PER_SOURCE_ADDRESS), server, shard)
        accepted, _ = listener.accept()
        client.sendall(message)
        accepted.recv(64)
        accepted.close()
        client.close()
        done += 1
    elapsed = time.perf_counter() - start
    listener.close()
    _say(connections=done, seconds=elapsed, rate=done / elapsed, port=server[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.holder")
    parser.add_argument("kind", choices=("live", "churn"))
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--shard", type=int, default=0, help="0-255: which 127.1.<shard>.x")
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.kind == "live":
        hold(args.count, args.shard)
    else:
        churn(args.rate, args.seconds, args.shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

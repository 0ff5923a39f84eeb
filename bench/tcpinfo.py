"""Ground truth from the kernel's own per-socket counters (``getsockopt(TCP_INFO)``)."""

from __future__ import annotations

import socket
import struct
import time

TCP_INFO_SIZE = 232
TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in struct tcp_info
TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64)


def tcp_info_bytes(sock: socket.socket) -> tuple[int, int]:
    """``(tcpi_bytes_acked, tcpi_bytes_received)`` of a TCP socket.

    A socket that wrote 1000 bytes the peer acknowledged and read 64 -> ``(1000, 64)``.
    """
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    acked, received = struct.unpack_from("<QQ", raw, TCPI_BYTES_ACKED)
    return acked, received


def tcp_info_after_ack(sock: socket.socket, sent: int, timeout: float = 0.5) -> tuple[int, int]:
    """tcp_info once everything ``sent`` is acknowledged (or after ``timeout``: what is)."""
    deadline = time.monotonic() + timeout
    acked, received = tcp_info_bytes(sock)
    while acked < sent and time.monotonic() < deadline:
        time.sleep(0.005)
        acked, received = tcp_info_bytes(sock)
    return acked, received

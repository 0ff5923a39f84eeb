"""NAT lookups in the kernel's connection tracking table, over netlink.

kube-proxy DNATs a ClusterIP to a backend pod; conntrack remembers both tuples of every
connection: the *original* one (as the client sent it) and the *reply* one (as the backend
answers). For a client socket ``198.18.0.2:40000 -> 198.19.0.10:80`` (ClusterIP) the entry's
reply tuple is ``198.18.0.3:8080 -> 198.18.0.2:40000``: the backend is the reply's source.
For the server socket (``198.18.0.3:8080``, peer ``198.18.0.2:40000``) the lookup goes the
other way: the reply tuple is what the server sees, and the original destination is the
ClusterIP.

Each lookup is one ``IPCTNL_MSG_CT_GET`` request for an exact tuple (no table dumps) on a
``NETLINK_NETFILTER`` socket, in the namespace the agent runs in (the node's, where
kube-proxy's NAT happens). The protocol constants come from pyroute2; the two small
messages are packed with ``struct``: pyroute2's generic message encoder costs ~0.8 ms per
request where the kernel answers in ~15 µs, and this runs for every new ClusterIP and server
connection.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_GET

from agent.model import Endpoint, fold_address
from agent.resolve.netlink import (
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSG_HEADER,
    align,
    error_code,
    messages,
)

log = logging.getLogger(__name__)

Direction = tuple[Endpoint, Endpoint]
"""(source, destination) of one direction of a tracked connection."""

# ctnetlink attribute numbers (linux/netfilter/nfnetlink_conntrack.h)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NFGEN_HEADER = struct.Struct("=BBH")  # family, version, resource id (big endian, 0)
NLA_HEADER = struct.Struct("=HH")  # length, type


@functools.lru_cache(maxsize=65536)
def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``"198.18.0.2"`` -> ``IPv4Address("198.18.0.2")``, remembered (parsing costs
    microseconds, and a node looks up the same few addresses for every connection)."""
    return ipaddress.ip_address(address)


def _attribute(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes: ``(1, b"\\xc6\\x12\\x00\\x02")`` ->
    ``08 00 01 00 c6 12 00 02``."""
    header = NLA_HEADER.pack(NLA_HEADER.size + len(payload), kind)
    return header + payload + b"\0" * (align(len(payload)) - len(payload))


def encode_get(sequence: int, source: Endpoint, destination: Endpoint, *, reply: bool) -> bytes:
    """A ``CT_GET`` request for the TCP entry whose original (or reply) tuple is
    ``source -> destination``. Addresses must be canonical (folded) text of one family."""
    src, dst = _ip(source.address), _ip(destination.address)
    family = socket.AF_INET6 if src.version == 6 else socket.AF_INET
    if family == socket.AF_INET6:
        src_kind, dst_kind = CTA_IP_V6_SRC, CTA_IP_V6_DST
    else:
        src_kind, dst_kind = CTA_IP_V4_SRC, CTA_IP_V4_DST
    addresses = _attribute(src_kind, src.packed) + _attribute(dst_kind, dst.packed)
    ports = (
        _attribute(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP]))
        + _attribute(CTA_PROTO_SRC_PORT, struct.pack("!H", source.port))
        + _attribute(CTA_PROTO_DST_PORT, struct.pack("!H", destination.port))
    )
    tuple_ = _attribute(CTA_TUPLE_IP | NLA_F_NESTED, addresses) + _attribute(
        CTA_TUPLE_PROTO | NLA_F_NESTED, ports
    )
    body = NFGEN_HEADER.pack(family, 0, 0) + _attribute(
        (CTA_TUPLE_REPLY if reply else CTA_TUPLE_ORIG) | NLA_F_NESTED, tuple_
    )
    header = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + len(body),
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_ACK,
        sequence,
        0,
    )
    return header + body


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without flags, payload) of each attribute in ``data``."""
    offset = 0
    while offset + NLA_HEADER.size <= len(data):
        length, kind = NLA_HEADER.unpack_from(data, offset)
        if length < NLA_HEADER.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + NLA_HEADER.size : offset + length]
        offset += align(length)


def _direction(payload: bytes) -> Direction | None:
    found = dict(_attributes(payload))
    addresses = dict(_attributes(found.get(CTA_TUPLE_IP, b"")))
    ports = dict(_attributes(found.get(CTA_TUPLE_PROTO, b"")))
    try:
        if CTA_IP_V6_SRC in addresses:
            src = ipaddress.IPv6Address(addresses[CTA_IP_V6_SRC])
            dst = ipaddress.IPv6Address(addresses[CTA_IP_V6_DST])
        else:
            src = ipaddress.IPv4Address(addresses[CTA_IP_V4_SRC])
            dst = ipaddress.IPv4Address(addresses[CTA_IP_V4_DST])
        (sport,) = struct.unpack("!H", ports[CTA_PROTO_SRC_PORT][:2])
        (dport,) = struct.unpack("!H", ports[CTA_PROTO_DST_PORT][:2])
    except (KeyError, ValueError, struct.error):
        return None
    return Endpoint(fold_address(str(src)), sport), Endpoint(fold_address(str(dst)), dport)


def decode_entry(message: bytes) -> tuple[Direction, Direction] | None:
    """A ``CT_NEW``/``CT_GET`` answer (netlink header included) -> its (original, reply)
    directions, e.g. ``((198.18.0.2:40000, 198.19.0.10:80), (198.18.0.3:8080,
    198.18.0.2:40000))``; ``None`` if it does not hold both."""
    start = NLMSG_HEADER.size + NFGEN_HEADER.size
    found = dict(_attributes(message[start:]))
    if CTA_TUPLE_ORIG not in found or CTA_TUPLE_REPLY not in found:
        return None
    original, reply = _direction(found[CTA_TUPLE_ORIG]), _direction(found[CTA_TUPLE_REPLY])
    if original is None or reply is None:
        return None
    return original, reply


class ConntrackMiss(Exception):
    """The kernel answered with an error (``errno``: ENOENT when there is no such entry)."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


class Transport(Protocol):
    """Sends one netlink request, returns the answer's messages (the final ACK excluded)."""

    def request(self, data: bytes, sequence: int) -> list[bytes]: ...

    def close(self) -> None: ...


class NetlinkTransport:
    """A ``NETLINK_NETFILTER`` socket of the agent's network namespace."""

    def __init__(self, timeout: float = 1.0) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._socket.settimeout(timeout)
        self._socket.bind((0, 0))

    def request(self, data: bytes, sequence: int) -> list[bytes]:
        self._socket.send(data)
        answer: list[bytes] = []
        while True:
            for kind, seq, message in messages(self._socket.recv(65536)):
                if seq != sequence:
                    continue  # a late answer to an earlier request that timed out
                if kind == NLMSG_ERROR:
                    code = error_code(message)
                    if code:
                        raise ConntrackMiss(code)
                    return answer
                answer.append(message)

    def close(self) -> None:
        self._socket.close()


class ConntrackResolver:
    """``translated_destination`` and ``original_tuple`` for TCP connections.

    Thread-safe (one socket behind a lock, opened on first use and again after a failure).
    A lookup that finds no entry, or fails, returns ``None``; ``misses``/``errors`` count
    them.
    """

    def __init__(self, transport_factory: Callable[[], Transport] = NetlinkTransport) -> None:
        self._factory = transport_factory
        self._transport: Transport | None = None
        self._lock = threading.Lock()
        self._sequence = itertools.count(1)
        self.lookups = 0
        self.misses = 0
        self.errors = 0

    def translated_destination(self, source: Endpoint, destination: Endpoint) -> Endpoint | None:
        """Original tuple ``source -> destination`` -> where it really goes (reply's source).

        ``(198.18.0.2:40000, 198.19.0.10:80)`` -> ``198.18.0.3:8080`` when DNAT-ed; the
        destination itself when the connection is tracked without NAT; ``None`` when the
        table has no such entry.
        """
        entry = self._get(source, destination, reply=False)
        return entry[1][0] if entry is not None else None

    def original_tuple(self, client: Endpoint, server: Endpoint) -> Direction | None:
        """What a server socket sees (peer ``client``, local ``server``) -> the original tuple.

        ``(198.18.0.2:40000, 198.18.0.3:8080)`` -> ``(198.18.0.2:40000, 198.19.0.10:80)``
        when the client connected to ClusterIP ``198.19.0.10:80``. The original source differs
        from ``client`` when the connection was also source-NAT-ed (masquerade).
        """
        entry = self._get(server, client, reply=True)
        return entry[0] if entry is not None else None

    def check(self) -> str | None:
        """Whether lookups work here: ``None`` if the kernel answers (an unknown tuple gives
        ENOENT), else why not (``"Operation not permitted"`` without CAP_NET_ADMIN, ...)."""
        probe = encode_get(0, Endpoint("198.18.255.1", 1), Endpoint("198.18.255.2", 1), reply=False)
        with self._lock:
            try:
                if self._transport is None:
                    self._transport = self._factory()
                self._transport.request(probe, 0)
            except ConntrackMiss as miss:
                return None if miss.code == errno.ENOENT else str(miss)
            except Exception as error:
                self._drop()
                return f"{type(error).__name__}: {error}"
        return None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _get(
        self, source: Endpoint, destination: Endpoint, *, reply: bool
    ) -> tuple[Direction, Direction] | None:
        """The entry with ``source -> destination`` as its original (or reply) tuple."""
        try:
            src, dst = fold_address(source.address), fold_address(destination.address)
            if _ip(src).version != _ip(dst).version:
                return None
        except ValueError:
            return None
        with self._lock:
            self.lookups += 1
            sequence = next(self._sequence)
            request = encode_get(
                sequence, Endpoint(src, source.port), Endpoint(dst, destination.port), reply=reply
            )
            try:
                if self._transport is None:
                    self._transport = self._factory()
                messages = self._transport.request(request, sequence)
            except ConntrackMiss as miss:
                self.misses += 1
                if miss.code != errno.ENOENT:
                    self.errors += 1
                    log.debug("conntrack lookup failed: %s", miss)
                return None
            except Exception:
                self.errors += 1
                log.debug("conntrack lookup failed", exc_info=True)
                self._drop()
                return None
            for message in messages:
                entry = decode_entry(message)
                if entry is not None:
                    return entry
            self.misses += 1
            return None

    def _drop(self) -> None:
        if self._transport is not None:
            try:
                self._transport.close()
            except Exception:
                log.debug("closing the conntrack socket failed", exc_info=True)
            self._transport = None

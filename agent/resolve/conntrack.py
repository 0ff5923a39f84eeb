"""NAT lookups in the kernel's connection tracking table, over netlink (pyroute2).

kube-proxy DNATs a ClusterIP to a backend pod; conntrack remembers both tuples of every
connection: the *original* one (as the client sent it) and the *reply* one (as the backend
answers). For a client socket ``198.18.0.2:40000 -> 198.19.0.10:80`` (ClusterIP) the entry's
reply tuple is ``198.18.0.3:8080 -> 198.18.0.2:40000``: the backend is the reply's source.
For the server socket (``198.18.0.3:8080``, peer ``198.18.0.2:40000``) the lookup goes the
other way: the reply tuple is what the server sees, and the original destination is the
ClusterIP.

Lookups are single GET requests for an exact tuple (no table dumps). The table is the one
of the namespace the agent runs in (the node's), where kube-proxy's NAT happens.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from typing import Any

from agent.model import Endpoint, fold_address

log = logging.getLogger(__name__)

Direction = tuple[Endpoint, Endpoint]
"""(source, destination) of one direction of a tracked connection."""


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _wire(address: str) -> str:
    """Addresses as conntrack holds them: folded IPv4 for IPv4-mapped IPv6."""
    return fold_address(address)


class ConntrackResolver:
    """``translated_destination`` and ``original_tuple`` for TCP connections.

    Thread-safe (one netlink socket per address family, behind a lock). A lookup that finds
    no entry, or fails, returns ``None``; ``errors`` and ``misses`` count them.
    """

    def __init__(self, socket_factory: Any = None) -> None:
        self._factory = socket_factory
        self._sockets: dict[int, Any] = {}
        self._lock = threading.Lock()
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
        if entry is None:
            return None
        reply_source, _ = entry[1]
        return reply_source

    def original_tuple(self, client: Endpoint, server: Endpoint) -> Direction | None:
        """What a server socket sees (peer ``client``, local ``server``) -> the original tuple.

        ``(198.18.0.2:40000, 198.18.0.3:8080)`` -> ``(198.18.0.2:40000, 198.19.0.10:80)``
        when the client connected to ClusterIP ``198.19.0.10:80``. The original source differs
        from ``client`` when the connection was also source-NAT-ed (masquerade).
        """
        entry = self._get(server, client, reply=True)
        if entry is None:
            return None
        return entry[0]

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets.values():
                try:
                    sock.close()
                except Exception:
                    log.debug("closing a conntrack socket failed", exc_info=True)
            self._sockets.clear()

    def _socket(self, family: int) -> Any:
        sock = self._sockets.get(family)
        if sock is None:
            if self._factory is not None:
                sock = self._factory(family)
            else:
                from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

                sock = NFCTSocket(nfgen_family=family)
            self._sockets[family] = sock
        return sock

    def _get(
        self, source: Endpoint, destination: Endpoint, *, reply: bool
    ) -> tuple[Direction, Direction] | None:
        """The entry with ``source -> destination`` as its original (or reply) tuple."""
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        try:
            src, dst = _wire(source.address), _wire(destination.address)
            family = _family(src)
        except ValueError:
            return None
        if family != _family(dst):
            return None
        key = NFCTAttrTuple(
            family=family,
            saddr=src,
            daddr=dst,
            proto=socket.IPPROTO_TCP,
            sport=source.port,
            dport=destination.port,
        )
        with self._lock:
            self.lookups += 1
            try:
                sock = self._socket(family)
                answer = sock.entry("get", **{"tuple_reply" if reply else "tuple_orig": key})
            except NetlinkError as error:
                if error.code != 2:  # ENOENT: no such connection
                    self.errors += 1
                    log.debug("conntrack lookup failed: %s", error)
                self.misses += 1
                return None
            except Exception:
                self.errors += 1
                log.debug("conntrack lookup failed", exc_info=True)
                self._drop_socket(family)
                return None
        for message in answer or ():
            tuples = _tuples(message, family)
            if tuples is not None:
                return tuples
        with self._lock:
            self.misses += 1
        return None

    def _drop_socket(self, family: int) -> None:
        sock = self._sockets.pop(family, None)
        if sock is not None:
            try:
                sock.close()
            except Exception:
                log.debug("closing a conntrack socket failed", exc_info=True)


def _tuples(message: Any, family: int) -> tuple[Direction, Direction] | None:
    """A ``nfct_msg`` -> ((orig src, orig dst), (reply src, reply dst))."""
    result = []
    for name in ("CTA_TUPLE_ORIG", "CTA_TUPLE_REPLY"):
        nested = message.get_attr(name)
        if nested is None:
            return None
        addresses = nested.get_attr("CTA_TUPLE_IP")
        ports = nested.get_attr("CTA_TUPLE_PROTO")
        if addresses is None or ports is None:
            return None
        prefix = "CTA_IP_V6" if family == socket.AF_INET6 else "CTA_IP_V4"
        src, dst = addresses.get_attr(f"{prefix}_SRC"), addresses.get_attr(f"{prefix}_DST")
        sport, dport = ports.get_attr("CTA_PROTO_SRC_PORT"), ports.get_attr("CTA_PROTO_DST_PORT")
        if None in (src, dst, sport, dport):
            return None
        result.append((Endpoint(fold_address(src), sport), Endpoint(fold_address(dst), dport)))
    return result[0], result[1]

"""ConntrackResolver's request and answer handling, with a fake netlink socket."""

from __future__ import annotations

import socket

from pyroute2.netlink.exceptions import NetlinkError

from agent.model import Endpoint
from agent.resolve import ConntrackResolver


class Attrs:
    def __init__(self, **attrs) -> None:
        self.attrs = attrs

    def get_attr(self, name):
        return self.attrs.get(name)


def message(family: int, orig, reply) -> Attrs:
    prefix = "CTA_IP_V6" if family == socket.AF_INET6 else "CTA_IP_V4"

    def tuple_(direction):
        (src, sport), (dst, dport) = direction
        return Attrs(
            CTA_TUPLE_IP=Attrs(**{f"{prefix}_SRC": src, f"{prefix}_DST": dst}),
            CTA_TUPLE_PROTO=Attrs(CTA_PROTO_SRC_PORT=sport, CTA_PROTO_DST_PORT=dport),
        )

    return Attrs(CTA_TUPLE_ORIG=tuple_(orig), CTA_TUPLE_REPLY=tuple_(reply))


class FakeConntrack:
    """A table of (orig, reply) entries answering GET by either tuple."""

    def __init__(self, family: int, entries) -> None:
        self.family = family
        self.entries = entries
        self.requests = []

    def entry(self, command, tuple_orig=None, tuple_reply=None):
        self.requests.append((command, "orig" if tuple_orig is not None else "reply"))
        key = tuple_orig if tuple_orig is not None else tuple_reply
        wanted = ((key.saddr, key.sport), (key.daddr, key.dport))
        assert key.proto == socket.IPPROTO_TCP
        for orig, reply in self.entries:
            if (orig if tuple_orig is not None else reply) == wanted:
                return [message(self.family, orig, reply)]
        raise NetlinkError(2, "No such file or directory")

    def close(self) -> None:
        pass


CLIENT = ("198.18.0.2", 40000)
CLUSTER_IP = ("198.19.0.10", 80)
BACKEND = ("198.18.0.3", 8080)
V4_ENTRIES = [((CLIENT, CLUSTER_IP), (BACKEND, CLIENT))]
V6_CLIENT, V6_CLUSTER_IP, V6_BACKEND = (
    ("2001:db8::2", 40000),
    ("2001:db8:1::10", 80),
    ("2001:db8::3", 8080),
)
V6_ENTRIES = [((V6_CLIENT, V6_CLUSTER_IP), (V6_BACKEND, V6_CLIENT))]


def resolver() -> tuple[ConntrackResolver, dict[int, FakeConntrack]]:
    tables = {
        socket.AF_INET: FakeConntrack(socket.AF_INET, V4_ENTRIES),
        socket.AF_INET6: FakeConntrack(socket.AF_INET6, V6_ENTRIES),
    }
    return ConntrackResolver(socket_factory=tables.__getitem__), tables


def test_client_side_finds_the_backend() -> None:
    nat, tables = resolver()
    assert nat.translated_destination(Endpoint(*CLIENT), Endpoint(*CLUSTER_IP)) == Endpoint(
        *BACKEND
    )
    assert nat.translated_destination(
        Endpoint("::ffff:198.18.0.2", 40000), Endpoint("::ffff:198.19.0.10", 80)
    ) == Endpoint(*BACKEND)
    assert tables[socket.AF_INET].requests == [("get", "orig"), ("get", "orig")]


def test_server_side_finds_the_original_destination() -> None:
    nat, tables = resolver()
    assert nat.original_tuple(Endpoint(*CLIENT), Endpoint(*BACKEND)) == (
        Endpoint(*CLIENT),
        Endpoint(*CLUSTER_IP),
    )
    assert tables[socket.AF_INET].requests == [("get", "reply")]


def test_ipv6() -> None:
    nat, _ = resolver()
    assert nat.translated_destination(
        Endpoint("2001:db8::2", 40000), Endpoint("2001:db8:1::10", 80)
    ) == Endpoint("2001:db8::3", 8080)
    assert nat.original_tuple(Endpoint("2001:db8::2", 40000), Endpoint("2001:db8::3", 8080)) == (
        Endpoint("2001:db8::2", 40000),
        Endpoint("2001:db8:1::10", 80),
    )


def test_misses_and_errors_answer_none() -> None:
    nat, _ = resolver()
    assert nat.translated_destination(Endpoint(*CLIENT), Endpoint("198.19.0.99", 80)) is None
    assert nat.translated_destination(Endpoint("198.18.0.2", 1), Endpoint("2001:db8::1", 2)) is None
    assert nat.translated_destination(Endpoint("not-an-ip", 1), Endpoint(*CLUSTER_IP)) is None
    assert (nat.misses, nat.errors) == (1, 0)

    def broken(family):
        raise PermissionError("netlink needs CAP_NET_ADMIN")

    failing = ConntrackResolver(socket_factory=broken)
    assert failing.translated_destination(Endpoint(*CLIENT), Endpoint(*CLUSTER_IP)) is None
    assert failing.errors == 1

"""ConntrackResolver's netlink messages, checked against pyroute2's own codec as the kernel."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

from agent.model import Endpoint
from agent.resolve import ConntrackResolver
from agent.resolve.conntrack import ConntrackMiss, decode_entry, encode_get

CLIENT, CLUSTER_IP, BACKEND = ("198.18.0.2", 40000), ("198.19.0.10", 80), ("198.18.0.3", 8080)
V6_CLIENT, V6_CLUSTER_IP, V6_BACKEND = (
    ("2001:db8::2", 40000),
    ("2001:db8:1::10", 80),
    ("2001:db8::3", 8080),
)
ENTRIES = [
    ((CLIENT, CLUSTER_IP), (BACKEND, CLIENT)),
    ((V6_CLIENT, V6_CLUSTER_IP), (V6_BACKEND, V6_CLIENT)),
]


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def pyroute2_tuple(direction) -> NFCTAttrTuple:
    (src, sport), (dst, dport) = direction
    return NFCTAttrTuple(
        family=family_of(src), saddr=src, daddr=dst, proto=6, sport=sport, dport=dport
    )


class FakeKernel:
    """Decodes requests with pyroute2 and answers entries encoded by pyroute2."""

    def __init__(self, entries=ENTRIES) -> None:
        self.entries = entries
        self.requests: list[tuple[str, tuple]] = []

    def request(self, data: bytes, sequence: int) -> list[bytes]:
        message = nfct_msg(data)
        message.decode()
        assert message["header"]["sequence_number"] == sequence
        assert message["header"]["type"] == (1 << 8) | 1  # CTNETLINK, CT_GET
        family = message["nfgen_family"]
        prefix = "CTA_IP_V6" if family == socket.AF_INET6 else "CTA_IP_V4"
        which = "CTA_TUPLE_ORIG" if message.get_attr("CTA_TUPLE_ORIG") else "CTA_TUPLE_REPLY"
        tuple_ = message.get_attr(which)
        ips, ports = tuple_.get_attr("CTA_TUPLE_IP"), tuple_.get_attr("CTA_TUPLE_PROTO")
        assert ports.get_attr("CTA_PROTO_NUM") == socket.IPPROTO_TCP
        asked = (
            (ips.get_attr(f"{prefix}_SRC"), ports.get_attr("CTA_PROTO_SRC_PORT")),
            (ips.get_attr(f"{prefix}_DST"), ports.get_attr("CTA_PROTO_DST_PORT")),
        )
        self.requests.append((which, asked))
        for orig, reply in self.entries:
            if (orig if which == "CTA_TUPLE_ORIG" else reply) == asked:
                answer = nfct_msg.create_from(
                    tuple_orig=pyroute2_tuple(orig),
                    tuple_reply=pyroute2_tuple(reply),
                    cta_status=398,
                )
                answer["header"]["sequence_number"] = sequence
                answer["nfgen_family"] = family
                answer.encode()
                return [bytes(answer.data)]
        raise ConntrackMiss(errno.ENOENT)

    def close(self) -> None:
        pass


def resolver(kernel: FakeKernel | None = None) -> tuple[ConntrackResolver, FakeKernel]:
    kernel = kernel or FakeKernel()
    return ConntrackResolver(lambda: kernel), kernel


def test_client_side_finds_the_backend() -> None:
    nat, kernel = resolver()
    assert nat.translated_destination(Endpoint(*CLIENT), Endpoint(*CLUSTER_IP)) == Endpoint(
        *BACKEND
    )
    assert nat.translated_destination(
        Endpoint("::ffff:198.18.0.2", 40000), Endpoint("::ffff:198.19.0.10", 80)
    ) == Endpoint(*BACKEND)
    assert kernel.requests == [("CTA_TUPLE_ORIG", (CLIENT, CLUSTER_IP))] * 2


def test_server_side_finds_the_original_destination() -> None:
    nat, kernel = resolver()
    assert nat.original_tuple(Endpoint(*CLIENT), Endpoint(*BACKEND)) == (
        Endpoint(*CLIENT),
        Endpoint(*CLUSTER_IP),
    )
    assert kernel.requests == [("CTA_TUPLE_REPLY", (BACKEND, CLIENT))]


def test_ipv6() -> None:
    nat, _ = resolver()
    assert nat.translated_destination(Endpoint(*V6_CLIENT), Endpoint(*V6_CLUSTER_IP)) == Endpoint(
        *V6_BACKEND
    )
    assert nat.original_tuple(Endpoint(*V6_CLIENT), Endpoint(*V6_BACKEND)) == (
        Endpoint(*V6_CLIENT),
        Endpoint(*V6_CLUSTER_IP),
    )


def test_misses_and_errors_answer_none() -> None:
    nat, _ = resolver()
    assert nat.translated_destination(Endpoint(*CLIENT), Endpoint("198.19.0.99", 80)) is None
    assert nat.translated_destination(Endpoint("198.18.0.2", 1), Endpoint("2001:db8::1", 2)) is None
    assert nat.translated_destination(Endpoint("not-an-ip", 1), Endpoint(*CLUSTER_IP)) is None
    assert (nat.lookups, nat.misses, nat.errors) == (1, 1, 0)

    def no_permission():
        raise PermissionError("netlink needs CAP_NET_ADMIN")

    failing = ConntrackResolver(no_permission)
    assert failing.translated_destination(Endpoint(*CLIENT), Endpoint(*CLUSTER_IP)) is None
    assert failing.errors == 1


def test_request_bytes_for_a_v4_tuple() -> None:
    data = encode_get(7, Endpoint(*CLIENT), Endpoint(*CLUSTER_IP), reply=False)
    length, kind, flags, sequence, port = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags, sequence, port) == (len(data), 0x101, 0x5, 7, 0)
    assert data[16:20] == bytes([socket.AF_INET, 0, 0, 0])
    assert bytes([198, 18, 0, 2]) in data and bytes([198, 19, 0, 10]) in data
    assert struct.pack("!H", 40000) in data and struct.pack("!H", 80) in data


@pytest.mark.parametrize("garbage", [b"", b"\0" * 20, b"\xff" * 64])
def test_decoding_garbage_gives_none(garbage: bytes) -> None:
    assert decode_entry(garbage) is None


def test_check_says_why_lookups_cannot_work() -> None:
    nat, _ = resolver()
    assert nat.check() is None  # ENOENT for the probe tuple: the kernel answers

    def no_permission():
        raise PermissionError(1, "Operation not permitted")

    assert ConntrackResolver(no_permission).check() == (
        "PermissionError: [Errno 1] Operation not permitted"
    )

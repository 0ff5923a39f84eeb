"""A writer of small synthetic BTF blobs (Documentation/bpf/btf.rst), for BTF reader tests.

    blob = BtfWriter()
    u32 = blob.int("unsigned int", 4)
    point = blob.struct("point", 8, [("x", u32, 0), ("y", u32, 32)])
    Btf(blob.bytes()).member("point", "y") -> Member("y", offset=4, size=4, type_id=u32)

Type ids are handed out in order (1, 2, ...); ``next_id`` tells the id the next type will
get, for types that refer to one defined later (a struct holding a pointer to itself).
Little-endian, as on x86-64.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

MAGIC = 0xEB9F
HEADER_LEN = 24

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION = 1, 2, 3, 4, 5
KIND_ENUM, KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST = 6, 7, 8, 9, 10
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC = 12, 13, 14, 15
KIND_DECL_TAG, KIND_ENUM64 = 17, 19

INT_SIGNED = 1

# A struct member: (name, type id, bit offset) or (name, type id, bit offset, bitfield bits).
MemberSpec = tuple[str, int, int] | tuple[str, int, int, int]


def info(kind: int, vlen: int = 0, kind_flag: bool = False) -> int:
    """The ``info`` word of a type record: ``info(KIND_STRUCT, 3)`` -> ``0x04000003``."""
    return (int(kind_flag) << 31) | (kind << 24) | vlen


@dataclass
class BtfWriter:
    """Builds the type and string sections; :meth:`bytes` gives the whole blob."""

    magic: int = MAGIC
    header_padding: int = 0  # extra header bytes (newer headers are longer than 24)
    _types: bytearray = field(default_factory=bytearray)
    _strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    _offsets: dict[str, int] = field(default_factory=dict)
    _count: int = 0

    @property
    def next_id(self) -> int:
        return self._count + 1

    def _name(self, name: str) -> int:
        if not name:
            return 0
        if name not in self._offsets:
            self._offsets[name] = len(self._strings)
            self._strings += name.encode() + b"\0"
        return self._offsets[name]

    def _record(self, name: str, info_word: int, size_or_type: int, trailer: bytes = b"") -> int:
        self._types += struct.pack("<III", self._name(name), info_word, size_or_type) + trailer
        self._count += 1
        return self._count

    # -- kinds -------------------------------------------------------------------------------
    def int(self, name: str, size: int, *, signed: bool = False, bits: int | None = None) -> int:
        encoding = INT_SIGNED if signed else 0
        word = (encoding << 24) | (bits if bits is not None else size * 8)
        return self._record(name, info(KIND_INT), size, struct.pack("<I", word))

    def ptr(self, target: int) -> int:
        return self._record("", info(KIND_PTR), target)

    def array(self, element: int, index: int, count: int) -> int:
        return self._record("", info(KIND_ARRAY), 0, struct.pack("<III", element, index, count))

    def typedef(self, name: str, target: int) -> int:
        return self._record(name, info(KIND_TYPEDEF), target)

    def const(self, target: int) -> int:
        return self._record("", info(KIND_CONST), target)

    def volatile(self, target: int) -> int:
        return self._record("", info(KIND_VOLATILE), target)

    def fwd(self, name: str) -> int:
        return self._record(name, info(KIND_FWD), 0)

    def _composite(self, kind: int, name: str, size: int, members: Sequence[MemberSpec]) -> int:
        kind_flag = any(len(m) == 4 for m in members)
        trailer = b""
        for member in members:
            member_name, type_id, bit_offset = member[0], member[1], member[2]
            bitfield = member[3] if len(member) == 4 else 0  # type: ignore[misc]
            offset = (bitfield << 24) | bit_offset if kind_flag else bit_offset
            trailer += struct.pack("<III", self._name(member_name), type_id, offset)
        return self._record(name, info(kind, len(members), kind_flag), size, trailer)

    def struct(self, name: str, size: int, members: Sequence[MemberSpec]) -> int:
        """``name=""`` makes an anonymous struct. A 4-tuple member is a bitfield (kind_flag)."""
        return self._composite(KIND_STRUCT, name, size, members)

    def union(self, name: str, size: int, members: Sequence[MemberSpec]) -> int:
        return self._composite(KIND_UNION, name, size, members)

    def enum(self, name: str, size: int, values: Sequence[tuple[str, int]]) -> int:
        trailer = b"".join(struct.pack("<Ii", self._name(n), v) for n, v in values)
        return self._record(name, info(KIND_ENUM, len(values)), size, trailer)

    def enum64(self, name: str, size: int, values: Sequence[tuple[str, int]]) -> int:
        trailer = b"".join(
            struct.pack("<III", self._name(n), v & 0xFFFFFFFF, v >> 32) for n, v in values
        )
        return self._record(name, info(KIND_ENUM64, len(values)), size, trailer)

    def func_proto(self, returns: int, params: Sequence[tuple[str, int]]) -> int:
        trailer = b"".join(struct.pack("<II", self._name(n), t) for n, t in params)
        return self._record("", info(KIND_FUNC_PROTO, len(params)), returns, trailer)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self._record(name, info(KIND_FUNC, linkage), proto)

    def var(self, name: str, type_id: int, linkage: int = 1) -> int:
        return self._record(name, info(KIND_VAR), type_id, struct.pack("<I", linkage))

    def datasec(self, name: str, size: int, variables: Sequence[tuple[int, int, int]]) -> int:
        """``variables``: (var type id, offset, size)."""
        trailer = b"".join(struct.pack("<III", *v) for v in variables)
        return self._record(name, info(KIND_DATASEC, len(variables)), size, trailer)

    def decl_tag(self, name: str, target: int, component: int = -1) -> int:
        return self._record(name, info(KIND_DECL_TAG), target, struct.pack("<i", component))

    # -- the blob ----------------------------------------------------------------------------
    def bytes(self) -> bytes:
        header_len = HEADER_LEN + self.header_padding
        header = struct.pack(
            "<HBBIIIII",
            self.magic,
            1,  # version
            0,  # flags
            header_len,
            0,  # type_off (relative to the end of the header)
            len(self._types),
            len(self._types),  # str_off
            len(self._strings),
        )
        return header + bytes(self.header_padding) + bytes(self._types) + bytes(self._strings)


def mini_kernel(
    sk_protocol_size: int = 2, sk_common_offset: int = 0
) -> tuple[BtfWriter, dict[str, int]]:
    """A tiny kernel with the structs tcpacct's layout needs, laid out like x86-64 6.x.

    Offsets (bytes): sock_common: skc_daddr 0, skc_rcv_saddr 4, skc_dport 12, skc_num 14,
    skc_family 16, skc_net 48, skc_v6_daddr 56, skc_v6_rcv_saddr 72; sock: __sk_common 0,
    sk_protocol 516 (``sk_protocol_size`` bytes); inet_sock: sk 0, inet_sport 782;
    net: ns 120; ns_common: inum 16. ``sk_common_offset`` moves ``__sk_common`` (a layout no
    kernel has had) to prove that offsets.py does not assume it at 0.
    """
    w = BtfWriter()
    ids: dict[str, int] = {}
    u8 = ids["u8"] = w.int("unsigned char", 1)
    u16 = ids["u16"] = w.int("short unsigned int", 2)
    u32 = ids["u32"] = w.int("unsigned int", 4)
    u64 = ids["u64"] = w.int("long long unsigned int", 8)
    be16 = ids["__be16"] = w.typedef("__be16", u16)
    be32 = w.typedef("__be32", u32)
    w.enum("sock_type", 4, [("SOCK_STREAM", 1), ("SOCK_DGRAM", 2)])  # kinds the index skips
    w.array(u8, u32, 16)
    in6_addr = ids["in6_addr"] = w.struct("in6_addr", 16, [("s6_addr", w.next_id - 1, 0)])
    # ns_common { ...; unsigned int inum @ 16 }, net { ...; struct ns_common ns @ 120 }
    ns_common = w.struct("ns_common", 24, [("stashed", u64, 0), ("ops", u64, 64),
                                           ("inum", u32, 128)])
    net = ids["net"] = w.struct("net", 256, [("passive", u32, 0), ("ns", ns_common, 960)])
    possible_net = ids["possible_net"] = w.struct("", 8, [("net", w.next_id + 1, 0)])
    w.ptr(net)  # id possible_net + 1
    ids["possible_net_t"] = w.typedef("possible_net_t", possible_net)
    # sock_common's anonymous unions, as in include/net/sock.h
    addrs = w.struct("", 8, [("skc_daddr", be32, 0), ("skc_rcv_saddr", be32, 32)])
    addrpair = w.union("", 8, [("skc_addrpair", u64, 0), ("", addrs, 0)])
    hashes = w.union("", 4, [("skc_hash", u32, 0), ("skc_u16hashes", u32, 0)])
    ports = w.struct("", 4, [("skc_dport", be16, 0), ("skc_num", u16, 16)])
    portpair = w.union("", 4, [("skc_portpair", u32, 0), ("", ports, 0)])
    portpair_t = w.typedef("portpair_t", portpair)  # an anonymous member through a typedef
    sock_common = ids["sock_common"] = w.struct(
        "sock_common",
        136,
        [
            ("", addrpair, 0),
            ("", hashes, 64),
            ("", portpair_t, 96),
            ("skc_family", u16, 128),
            ("skc_state", u8, 144),
            ("skc_reuse", u8, 152, 4),  # bitfields: a kind_flag struct
            ("skc_reuseport", u8, 156, 1),
            ("skc_net", ids["possible_net_t"], 384),
            ("skc_v6_daddr", in6_addr, 448),
            ("skc_v6_rcv_saddr", in6_addr, 576),
        ],
    )
    ids["sock"] = w.struct(
        "sock",
        768,
        [("__sk_common", sock_common, 8 * sk_common_offset), ("sk_gso_type", u16, 4112),
         ("sk_protocol", u16 if sk_protocol_size == 2 else u8, 4128), ("sk_type", u16, 4144)],
    )
    ids["inet_sock"] = w.struct(
        "inet_sock", 976, [("sk", ids["sock"], 0), ("inet_sport", be16, 6256)]
    )
    sock_ptr = w.ptr(ids["sock"])
    msghdr = w.fwd("msghdr")
    int_ = w.int("int", 4, signed=True)
    proto = w.func_proto(int_, [("sk", sock_ptr), ("msg", w.ptr(msghdr)), ("len", u64),
                                ("flags", int_), ("addr_len", w.ptr(int_))])
    ids["tcp_recvmsg"] = w.func("tcp_recvmsg", proto)
    proto = w.func_proto(int_, [("sk", sock_ptr), ("msg", w.ptr(msghdr)), ("size", u64)])
    ids["tcp_sendmsg"] = w.func("tcp_sendmsg", proto)
    ids["tcp_cleanup_rbuf"] = w.func("tcp_cleanup_rbuf", w.func_proto(0, [("sk", sock_ptr),
                                                                          ("copied", int_)]))
    ids["void_fn"] = w.func("tcp_init", w.func_proto(0, []))
    w.var("sysctl_tcp_mem", u64)
    w.datasec(".data", 8, [(w.next_id - 1, 0, 8)])
    w.decl_tag("noinline", ids["tcp_sendmsg"])
    w.enum64("big", 8, [("BIG", 1 << 40)])
    ids["after_everything"] = w.struct("after_everything", 4, [("last", u32, 0)])
    return w, ids

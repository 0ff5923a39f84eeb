"""Struct layouts from the running kernel's BTF (``/sys/kernel/btf/vmlinux``).

Kernel headers may be from another kernel version (bcc only needs them to compile), so every
offset the BPF programs use comes from here, passed as ``-D`` cflags.

The BTF format (Documentation/bpf/btf.rst): a header, a type section of variable-length
records (id 1, 2, ...), and a string section. Only what layout questions need is decoded:
struct/union members (with anonymous nesting) and function prototypes' parameter counts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

BTF_MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION = 1, 2, 3, 4, 5
KIND_ENUM, KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST = 6, 7, 8, 9, 10
KIND_RESTRICT, KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC = 11, 12, 13, 14, 15
KIND_FLOAT, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 16, 17, 18, 19

_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}

# Bytes that follow the 12-byte common header, per kind: fixed part + per-vlen-item part.
_TRAILER = {
    KIND_INT: (4, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}


class BtfError(Exception):
    """BTF is missing, malformed, or lacks a type or member we need."""


@dataclass(frozen=True, slots=True)
class Member:
    """A struct member as laid out: byte offset from the start of the outer struct, size."""

    name: str
    offset: int
    size: int
    type_id: int


class Btf:
    """An index over a BTF blob: names of structs/unions/functions → type ids.

    >>> btf = Btf.from_path("/sys/kernel/btf/vmlinux")   # doctest: +SKIP
    >>> btf.member("sock_common", "skc_dport")            # doctest: +SKIP
    Member(name='skc_dport', offset=12, size=2, type_id=...)
    """

    def __init__(self, blob: bytes) -> None:
        if len(blob) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x}, expected {BTF_MAGIC:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._types = memoryview(blob)[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = bytes(blob[hdr_len + str_off : hdr_len + str_off + str_len])
        # type id -> byte offset of its record in the type section; id 0 is void.
        self._record: list[int] = [0]
        # (kind, offset of the name in the string section) -> type id; names are looked up
        # by their offsets, so the ~70k names of a kernel's BTF are never decoded.
        self._by_name: dict[tuple[int, int], int] = {}
        self._index()

    @classmethod
    def from_path(cls, path: str | Path) -> Btf:
        try:
            return cls(Path(path).read_bytes())
        except OSError as error:
            raise BtfError(
                f"cannot read BTF at {path}: {error.strerror}; the kernel needs "
                "CONFIG_DEBUG_INFO_BTF=y (see `tcpacct check`)"
            ) from error

    def _index(self) -> None:
        types, unpack, pos, end = self._types, struct.unpack_from, 0, len(self._types)
        wanted = {KIND_STRUCT, KIND_UNION, KIND_FUNC, KIND_TYPEDEF}
        while pos < end:
            name_off, info, _ = unpack("<III", types, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self._record.append(pos)
            if kind in wanted and name_off:
                self._by_name.setdefault((kind, name_off), len(self._record) - 1)
            fixed, per_item = _TRAILER.get(kind, (0, 0))
            pos += 12 + fixed + per_item * vlen

    def _name_offsets(self, name: str) -> list[int]:
        """Where ``name`` starts in the string section (deduplicated: usually one place)."""
        needle, strings, found, start = b"\0" + name.encode() + b"\0", self._strings, [], 0
        while (at := strings.find(needle, start)) >= 0:
            found.append(at + 1)
            start = at + 1
        return found

    def _lookup(self, kind: int, name: str) -> int | None:
        """Type id of the first type of ``kind`` named ``name``, or None."""
        ids = [
            self._by_name[(kind, offset)]
            for offset in self._name_offsets(name)
            if (kind, offset) in self._by_name
        ]
        return min(ids) if ids else None

    def _string(self, offset: int) -> str:
        end = self._strings.index(b"\0", offset)
        return self._strings[offset:end].decode()

    def _header(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(name_off, kind, vlen, kind_flag, size_or_type) of a type id."""
        pos = self._record[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._types, pos)
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type

    def _resolve(self, type_id: int) -> int:
        """Follow typedef/const/volatile to the underlying type id."""
        for _ in range(64):
            _, kind, _, _, next_id = self._header(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = next_id
        raise BtfError(f"type {type_id}: modifier chain too long")

    def size_of(self, type_id: int) -> int:
        type_id = self._resolve(type_id)
        _, kind, _, _, size_or_type = self._header(type_id)
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return size_or_type
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _index, count = struct.unpack_from(
                "<III", self._types, self._record[type_id] + 12
            )
            return self.size_of(elem) * count
        raise BtfError(f"type {type_id} (kind {kind}) has no size")

    def struct_id(self, name: str) -> int:
        """Type id of a struct or union by name, or of what a typedef names (``possible_net_t``)."""
        for kind in (KIND_STRUCT, KIND_UNION, KIND_TYPEDEF):
            type_id = self._lookup(kind, name)
            if type_id is not None:
                return self._resolve(type_id)
        raise BtfError(f"struct {name} not found in BTF")

    def _members(self, type_id: int) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size or 0) of a struct/union's members."""
        pos = self._record[type_id]
        _, kind, vlen, kind_flag, _ = self._header(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise BtfError(f"type {type_id} is not a struct or union")
        out = []
        for i in range(vlen):
            name_off, member_type, offset = struct.unpack_from(
                "<III", self._types, pos + 12 + 12 * i
            )
            if kind_flag:
                bit_offset, bitfield = offset & 0xFFFFFF, offset >> 24
            else:
                bit_offset, bitfield = offset, self._int_bitfield(member_type)
            name = self._string(name_off) if name_off else ""
            out.append((name, member_type, bit_offset, bitfield))
        return out

    def _int_bitfield(self, type_id: int) -> int:
        """Old-style bitfields: an INT whose bit count is less than its size's."""
        type_id = self._resolve(type_id)
        _, kind, _, _, size = self._header(type_id)
        if kind != KIND_INT:
            return 0
        (encoding,) = struct.unpack_from("<I", self._types, self._record[type_id] + 12)
        bits, bit_offset = encoding & 0xFF, (encoding >> 16) & 0xFF
        return bits if bits != size * 8 or bit_offset else 0

    def member(self, struct_name: str, member_name: str) -> Member:
        """A member of a struct, searched through anonymous structs/unions.

        ``member("sock_common", "skc_daddr")`` -> ``Member("skc_daddr", 0, 4, ...)`` on x86-64
        (it sits in the anonymous ``skc_addrpair`` union).
        """
        found = self._find(self.struct_id(struct_name), member_name, 0)
        if found is None:
            raise BtfError(f"struct {struct_name} has no member {member_name}")
        return found

    def _find(self, type_id: int, name: str, base_bits: int) -> Member | None:
        for member_name, member_type, bit_offset, bitfield in self._members(type_id):
            bits = base_bits + bit_offset
            if member_name == name:
                if bits % 8 or bitfield:
                    raise BtfError(f"member {name} is a bitfield; no byte offset")
                return Member(name, bits // 8, self.size_of(member_type), member_type)
            if not member_name:
                inner = self._resolve(member_type)
                if self._header(inner)[1] in (KIND_STRUCT, KIND_UNION):
                    found = self._find(inner, name, bits)
                    if found is not None:
                        return found
        return None

    def has(self, kind: int, name: str) -> bool:
        """Whether a named type of that kind exists: ``has(KIND_FUNC, "tcp_sendpage")``."""
        return self._lookup(kind, name) is not None

    def tracepoint_type_id(self, tracepoint: str) -> int:
        """The id a BTF-typed tracepoint program attaches to: that of the typedef
        ``btf_trace_<tracepoint>`` (``"sock_send_length"`` -> the id of
        ``btf_trace_sock_send_length``)."""
        type_id = self._lookup(KIND_TYPEDEF, f"btf_trace_{tracepoint}")
        if type_id is None:
            raise BtfError(f"tracepoint {tracepoint} has no btf_trace_ typedef in BTF")
        return type_id

    def function_arity(self, function: str) -> int:
        """Number of parameters of a kernel function: ``"tcp_recvmsg"`` -> 5 on 6.1."""
        func_id = self._lookup(KIND_FUNC, function)
        if func_id is None:
            raise BtfError(f"function {function} not found in BTF")
        proto = self._header(func_id)[4]
        return self._header(proto)[2]

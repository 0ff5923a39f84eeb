"""The BTF reader and the offsets it gives the BPF programs, on synthetic blobs and (when
readable, no root needed) on this machine's /sys/kernel/btf/vmlinux checked against bpftool."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from agent.ebpf.btf import KIND_FUNC, KIND_STRUCT, Btf, BtfError, Member
from agent.ebpf.offsets import KernelLayout, kernel_layout
from tests.support.btf_blob import BtfWriter, mini_kernel

VMLINUX = Path("/sys/kernel/btf/vmlinux")


@pytest.fixture(scope="module")
def kernel() -> tuple[Btf, dict[str, int]]:
    writer, ids = mini_kernel()
    return Btf(writer.bytes()), ids


# -- the writer itself ---------------------------------------------------------------------


def test_writer_header_is_the_documented_layout() -> None:
    writer = BtfWriter()
    writer.int("int", 4, signed=True)
    blob = writer.bytes()
    magic, version, flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", blob
    )
    assert (magic, version, flags, hdr_len) == (0xEB9F, 1, 0, 24)
    assert (type_off, type_len, str_off, str_len) == (0, 16, 16, 5)  # "\0int\0"
    assert blob[24:40] == struct.pack("<IIII", 1, 0x01000000, 4, 0x01000020)
    assert blob[40:] == b"\0int\0"


# -- members ----------------------------------------------------------------------------------


def test_direct_member(kernel) -> None:
    btf, ids = kernel
    assert btf.member("sock_common", "skc_family") == Member("skc_family", 16, 2, ids["u16"])
    assert btf.member("sock", "sk_protocol") == Member("sk_protocol", 516, 2, ids["u16"])


def test_member_inside_anonymous_struct_inside_anonymous_union(kernel) -> None:
    btf, _ = kernel
    assert (btf.member("sock_common", "skc_daddr").offset,
            btf.member("sock_common", "skc_daddr").size) == (0, 4)
    assert (btf.member("sock_common", "skc_rcv_saddr").offset,
            btf.member("sock_common", "skc_rcv_saddr").size) == (4, 4)
    assert btf.member("sock_common", "skc_addrpair").offset == 0
    assert btf.member("sock_common", "skc_hash").offset == 8


def test_member_inside_an_anonymous_member_named_through_a_typedef(kernel) -> None:
    btf, ids = kernel
    assert btf.member("sock_common", "skc_dport") == Member("skc_dport", 12, 2, ids["__be16"])
    assert btf.member("sock_common", "skc_num") == Member("skc_num", 14, 2, ids["u16"])
    assert btf.member("sock_common", "skc_portpair").offset == 12


def test_member_size_through_typedefs_and_arrays(kernel) -> None:
    btf, ids = kernel
    daddr = btf.member("sock_common", "skc_v6_daddr")
    assert (daddr.offset, daddr.size, daddr.type_id) == (56, 16, ids["in6_addr"])
    assert btf.member("in6_addr", "s6_addr").size == 16  # u8[16]
    assert btf.member("sock_common", "skc_net") == Member(
        "skc_net", 48, 8, ids["possible_net_t"]
    )


def test_struct_named_by_a_typedef_of_an_anonymous_struct(kernel) -> None:
    btf, ids = kernel
    assert btf.member("possible_net_t", "net").offset == 0
    assert btf.struct_id("possible_net_t") == ids["possible_net"]  # the anonymous struct


def test_nested_named_struct_is_not_searched(kernel) -> None:
    """Only anonymous members are looked through: ``sock.skc_dport`` is ``__sk_common``'s."""
    btf, _ = kernel
    with pytest.raises(BtfError, match=r"^struct sock has no member skc_dport$"):
        btf.member("sock", "skc_dport")


def test_type_kinds_after_the_structs_are_indexed_past_every_record_size(kernel) -> None:
    """ENUM, ARRAY, FUNC_PROTO, VAR, DATASEC, DECL_TAG, ENUM64 records are skipped exactly."""
    btf, ids = kernel
    assert btf.member("after_everything", "last") == Member("last", 0, 4, ids["u32"])
    assert btf.struct_id("after_everything") == ids["after_everything"]


def test_missing_struct_and_member(kernel) -> None:
    btf, _ = kernel
    with pytest.raises(BtfError, match=r"^struct tcp_sock not found in BTF$"):
        btf.member("tcp_sock", "snd_una")
    with pytest.raises(BtfError, match=r"^struct sock_common has no member skc_bogus$"):
        btf.member("sock_common", "skc_bogus")


def test_bitfield_not_on_a_byte_boundary_is_refused(kernel) -> None:
    btf, _ = kernel
    with pytest.raises(BtfError, match=r"^member skc_reuseport is a bitfield; no byte offset$"):
        btf.member("sock_common", "skc_reuseport")


def test_bitfield_on_a_byte_boundary_is_refused(kernel) -> None:
    btf, _ = kernel
    with pytest.raises(BtfError, match="bitfield"):
        btf.member("sock_common", "skc_reuse")  # actual: Member("skc_reuse", 19, 1, ...)


def test_bitfield_encoded_in_the_int_type_is_refused() -> None:
    """Structs without kind_flag (older pahole) give a bitfield an INT type of fewer bits."""
    writer = BtfWriter()
    nibble = writer.int("unsigned char", 1, bits=4)  # BTF_INT_BITS 4: a bitfield
    u8 = writer.int("unsigned char", 1)
    writer.struct("flags", 4, [("state", u8, 0), ("reuse", nibble, 8)])  # no kind_flag
    with pytest.raises(BtfError, match="bitfield"):
        Btf(writer.bytes()).member("flags", "reuse")
    assert Btf(writer.bytes()).member("flags", "state") == Member("state", 0, 1, u8)


def test_regular_members_of_a_kind_flag_struct_keep_their_offsets(kernel) -> None:
    """sock_common has bitfields, so its member offsets carry a bitfield-size byte."""
    btf, _ = kernel
    assert btf.member("sock_common", "skc_v6_rcv_saddr").offset == 72


def test_member_of_a_non_struct_is_an_error() -> None:
    writer = BtfWriter()
    u32 = writer.int("unsigned int", 4)
    writer.typedef("u32", u32)
    btf = Btf(writer.bytes())
    with pytest.raises(BtfError, match="is not a struct or union"):
        btf.member("u32", "anything")


def test_size_of_follows_const_and_volatile() -> None:
    writer = BtfWriter()
    u16 = writer.int("short unsigned int", 2)
    cv = writer.const(writer.volatile(u16))
    pointer = writer.ptr(cv)
    writer.struct("s", 16, [("a", cv, 0), ("p", pointer, 64)])
    btf = Btf(writer.bytes())
    assert btf.size_of(cv) == 2
    assert btf.member("s", "a").size == 2
    assert btf.member("s", "p") == Member("p", 8, 8, pointer)


def test_modifier_loop_is_an_error_not_a_hang() -> None:
    writer = BtfWriter()
    writer.typedef("loop", 1)  # id 1 names itself
    with pytest.raises(BtfError, match="modifier chain too long"):
        Btf(writer.bytes()).size_of(1)


def test_union_members_all_start_at_zero() -> None:
    writer = BtfWriter()
    u32 = writer.int("unsigned int", 4)
    u64 = writer.int("long long unsigned int", 8)
    writer.union("pair", 8, [("whole", u64, 0), ("half", u32, 0)])
    btf = Btf(writer.bytes())
    assert btf.member("pair", "half") == Member("half", 0, 4, u32)
    assert btf.struct_id("pair") == 3


def test_longer_header_is_honoured() -> None:
    writer = BtfWriter(header_padding=8)
    u32 = writer.int("unsigned int", 4)
    writer.struct("s", 8, [("a", u32, 0), ("b", u32, 32)])
    assert Btf(writer.bytes()).member("s", "b") == Member("b", 4, 4, u32)


# -- functions -------------------------------------------------------------------------------


def test_function_arity(kernel) -> None:
    btf, _ = kernel
    assert btf.function_arity("tcp_recvmsg") == 5
    assert btf.function_arity("tcp_sendmsg") == 3
    assert btf.function_arity("tcp_cleanup_rbuf") == 2
    assert btf.function_arity("tcp_init") == 0


def test_function_presence(kernel) -> None:
    btf, _ = kernel
    assert btf.has(KIND_FUNC, "tcp_sendmsg")
    assert not btf.has(KIND_FUNC, "tcp_sendpage")
    assert btf.has(KIND_STRUCT, "sock")
    assert not btf.has(KIND_FUNC, "sock")
    with pytest.raises(BtfError, match=r"^function tcp_sendpage not found in BTF$"):
        btf.function_arity("tcp_sendpage")


def test_tracepoint_type_id_is_the_btf_trace_typedef() -> None:
    writer = BtfWriter()
    u32 = writer.int("unsigned int", 4)
    writer.typedef("sock_send_length", u32)  # not what a tp_btf program attaches to
    wanted = writer.typedef("btf_trace_sock_send_length", u32)
    btf = Btf(writer.bytes())
    assert btf.tracepoint_type_id("sock_send_length") == wanted
    with pytest.raises(BtfError, match=r"^tracepoint sock_recv_length has no btf_trace_"):
        btf.tracepoint_type_id("sock_recv_length")


# -- malformed input -----------------------------------------------------------------------------


def test_bad_magic() -> None:
    blob = BtfWriter(magic=0x1234).bytes()
    with pytest.raises(BtfError, match=r"^not BTF \(magic 0x1234, expected 0xeb9f\)$"):
        Btf(blob)


def test_elf_file_is_not_btf() -> None:
    with pytest.raises(BtfError, match="not BTF"):
        Btf(b"\x7fELF" + bytes(60))


def test_too_short() -> None:
    with pytest.raises(BtfError, match=r"^BTF blob too short$"):
        Btf(b"\x9f\xeb\x01\x00")


def test_unreadable_path_says_what_the_kernel_needs(tmp_path: Path) -> None:
    with pytest.raises(BtfError) as caught:
        Btf.from_path(tmp_path / "vmlinux")
    assert str(caught.value) == (
        f"cannot read BTF at {tmp_path / 'vmlinux'}: No such file or directory; the kernel "
        "needs CONFIG_DEBUG_INFO_BTF=y (see `tcpacct check`)"
    )


def test_from_path_reads_a_file(tmp_path: Path) -> None:
    writer, _ = mini_kernel()
    path = tmp_path / "vmlinux"
    path.write_bytes(writer.bytes())
    assert Btf.from_path(path).member("sock_common", "skc_dport").offset == 12


# -- offsets as cflags ---------------------------------------------------------------------------


MINI_LAYOUT = KernelLayout(
    OFF_SKC_DADDR=0,
    OFF_SKC_RCV_SADDR=4,
    OFF_SKC_DPORT=12,
    OFF_SKC_FAMILY=16,
    OFF_SKC_NET=48,
    OFF_SKC_V6_DADDR=56,
    OFF_SKC_V6_RCV_SADDR=72,
    OFF_SK_PROTOCOL=516,
    OFF_INET_SPORT=782,
    OFF_NET_NS_INUM=136,
)


def test_kernel_layout_of_the_mini_kernel(kernel) -> None:
    btf, _ = kernel
    layout = kernel_layout(btf)
    assert layout == MINI_LAYOUT
    assert layout.cflags() == [
        "-DOFF_SKC_DADDR=0",
        "-DOFF_SKC_RCV_SADDR=4",
        "-DOFF_SKC_DPORT=12",
        "-DOFF_SKC_FAMILY=16",
        "-DOFF_SKC_NET=48",
        "-DOFF_SKC_V6_DADDR=56",
        "-DOFF_SKC_V6_RCV_SADDR=72",
        "-DOFF_SK_PROTOCOL=516",
        "-DOFF_INET_SPORT=782",
        "-DOFF_NET_NS_INUM=136",
    ]


def test_kernel_layout_adds_the_offset_of_sk_common_to_its_fields_only() -> None:
    writer, _ = mini_kernel(sk_common_offset=8)
    layout = kernel_layout(Btf(writer.bytes()))
    assert layout == dataclasses.replace(
        MINI_LAYOUT,
        OFF_SKC_DADDR=8,
        OFF_SKC_RCV_SADDR=12,
        OFF_SKC_DPORT=20,
        OFF_SKC_FAMILY=24,
        OFF_SKC_NET=56,
        OFF_SKC_V6_DADDR=64,
        OFF_SKC_V6_RCV_SADDR=80,
    )  # sk_protocol, inet_sport and ns.inum are measured from their own structs


def test_kernel_layout_refuses_a_field_of_an_unexpected_size() -> None:
    """A kernel whose ``sk_protocol`` is not 16 bits: never guess, refuse."""
    writer, _ = mini_kernel(sk_protocol_size=1)
    with pytest.raises(BtfError) as caught:
        kernel_layout(Btf(writer.bytes()))
    assert str(caught.value) == "sock.sk_protocol is 1 bytes here, expected 2"


# -- this machine's kernel, checked against bpftool ----------------------------------------------


def _bpftool_raw() -> str:
    if not VMLINUX.is_file() or shutil.which("bpftool") is None:
        if os.environ.get("CI") == "true":  # setup.sh installs bpftool; CI must not skip
            pytest.fail("CI: /sys/kernel/btf/vmlinux or bpftool is missing")
        pytest.skip("needs /sys/kernel/btf/vmlinux and bpftool")
    try:
        return subprocess.run(
            ["bpftool", "btf", "dump", "file", str(VMLINUX), "format", "raw"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (subprocess.CalledProcessError, PermissionError) as error:
        pytest.skip(f"bpftool cannot read vmlinux BTF here: {error}")


_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?$")
_MODIFIER_KINDS = ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG")


class RawDump:
    """bpftool's raw dump, read lazily: an independent reading of the same BTF to compare
    the reader with. ``named("STRUCT", "sock")`` -> its id; ``find(id, "skc_dport")`` ->
    (bit offset, bitfield size) through anonymous members."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.split("\n")
        self.header_line = [i for i, line in enumerate(self.lines) if line.startswith("[")]

    def named(self, kind: str, name: str) -> int | None:
        found = re.search(rf"^\[(\d+)\] {kind} '{re.escape(name)}'", self.text, re.MULTILINE)
        return int(found.group(1)) if found else None

    def header(self, type_id: int) -> tuple[str, str, str]:
        """(kind, name, rest of the line) of a type."""
        found = _TYPE.match(self.lines[self.header_line[type_id - 1]])
        assert found is not None and int(found.group(1)) == type_id
        return found.group(2), found.group(3), found.group(4)

    def attribute(self, type_id: int, key: str) -> int:
        return int(re.search(rf"{key}=(\d+)", self.header(type_id)[2]).group(1))

    def members(self, type_id: int) -> list[tuple[str, int, int, int]]:
        out = []
        line = self.header_line[type_id - 1] + 1
        while line < len(self.lines) and self.lines[line].startswith("\t"):
            member = _MEMBER.match(self.lines[line])
            if member is not None:
                name, member_type, bits, bitfield = member.groups()
                out.append((name, int(member_type), int(bits), int(bitfield or 0)))
            line += 1
        return out

    def resolve(self, type_id: int) -> int:
        while self.header(type_id)[0] in _MODIFIER_KINDS:
            type_id = self.attribute(type_id, "type_id")
        return type_id

    def struct_id(self, name: str) -> int:
        struct_id = self.named("STRUCT", name)
        if struct_id is None:
            typedef = self.named("TYPEDEF", name)
            assert typedef is not None, name
            struct_id = self.resolve(typedef)
        return struct_id

    def find(self, type_id: int, name: str, base: int = 0) -> tuple[int, int] | None:
        """(bit offset, bitfield size) of a member, through anonymous members."""
        for member_name, member_type, bits, bitfield in self.members(type_id):
            if member_name == name:
                return base + bits, bitfield
            if member_name == "(anon)":
                inner = self.resolve(member_type)
                if self.header(inner)[0] in ("STRUCT", "UNION"):
                    found = self.find(inner, name, base + bits)
                    if found is not None:
                        return found
        return None

    def offset(self, struct_name: str, member_name: str) -> int:
        found = self.find(self.struct_id(struct_name), member_name)
        assert found is not None and found[1] == 0 and found[0] % 8 == 0
        return found[0] // 8


@pytest.fixture(scope="module")
def vmlinux() -> tuple[Btf, RawDump]:
    raw = RawDump(_bpftool_raw())
    return Btf.from_path(VMLINUX), raw


FIELDS = [
    ("sock_common", "skc_daddr"),
    ("sock_common", "skc_rcv_saddr"),
    ("sock_common", "skc_dport"),
    ("sock_common", "skc_num"),
    ("sock_common", "skc_family"),
    ("sock_common", "skc_net"),
    ("sock_common", "skc_v6_daddr"),
    ("sock_common", "skc_v6_rcv_saddr"),
    ("sock", "__sk_common"),
    ("sock", "sk_protocol"),
    ("inet_sock", "inet_sport"),
    ("net", "ns"),
    ("ns_common", "inum"),
    ("possible_net_t", "net"),
]


@pytest.mark.parametrize(("struct_name", "member_name"), FIELDS)
def test_real_vmlinux_offsets_agree_with_bpftool(vmlinux, struct_name, member_name) -> None:
    btf, raw = vmlinux
    assert btf.member(struct_name, member_name).offset == raw.offset(struct_name, member_name)


def test_real_vmlinux_layout_is_consistent(vmlinux) -> None:
    btf, raw = vmlinux
    common = raw.offset("sock", "__sk_common")
    expected = {
        "OFF_SKC_DADDR": common + raw.offset("sock_common", "skc_daddr"),
        "OFF_SKC_RCV_SADDR": common + raw.offset("sock_common", "skc_rcv_saddr"),
        "OFF_SKC_DPORT": common + raw.offset("sock_common", "skc_dport"),
        "OFF_SKC_FAMILY": common + raw.offset("sock_common", "skc_family"),
        "OFF_SKC_NET": common
        + raw.offset("sock_common", "skc_net")
        + raw.offset("possible_net_t", "net"),
        "OFF_SKC_V6_DADDR": common + raw.offset("sock_common", "skc_v6_daddr"),
        "OFF_SKC_V6_RCV_SADDR": common + raw.offset("sock_common", "skc_v6_rcv_saddr"),
        "OFF_SK_PROTOCOL": raw.offset("sock", "sk_protocol"),
        "OFF_INET_SPORT": raw.offset("inet_sock", "inet_sport"),
        "OFF_NET_NS_INUM": raw.offset("net", "ns") + raw.offset("ns_common", "inum"),
    }
    assert dataclasses.asdict(kernel_layout(btf)) == expected


@pytest.mark.parametrize("function", ["tcp_sendmsg", "tcp_recvmsg", "tcp_cleanup_rbuf"])
def test_real_vmlinux_function_arity_agrees_with_bpftool(vmlinux, function) -> None:
    btf, raw = vmlinux
    func_id = raw.named("FUNC", function)
    assert func_id is not None
    proto = raw.attribute(func_id, "type_id")
    assert btf.function_arity(function) == raw.attribute(proto, "vlen")


def test_real_vmlinux_byte_aligned_bitfield_is_refused(vmlinux) -> None:
    btf, raw = vmlinux
    found = raw.find(raw.struct_id("sock_common"), "skc_reuse")
    assert found is not None and found[1] == 4 and found[0] % 8 == 0  # the premise
    with pytest.raises(BtfError, match="bitfield"):
        btf.member("sock_common", "skc_reuse")

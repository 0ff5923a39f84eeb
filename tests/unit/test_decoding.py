"""Decoding the kernel's raw values: addresses, ports in network order, task names."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

import pytest

from agent.ebpf.decoding import (
    AF_INET,
    AF_INET6,
    SLOT,
    SOCK_INFO,
    LifecycleMisses,
    SampleDecoder,
    SockInfo,
    changed_in,
    decode_address,
    decode_comm,
    decode_counters,
    decode_port,
    decode_sample,
    encode_port,
    fold_slot,
)
from agent.model import Endpoint, KernelCounters, Role, SocketFlag


def raw_port(port: int) -> int:
    """A port as the BPF side stores it: network-order bytes read back as a host u16."""
    return struct.unpack("=H", struct.pack("!H", port))[0]


def raw_address(text: str) -> bytes:
    """Address bytes as the kernel keeps them, padded to 16."""
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def sock_info(
    family: int,
    local: tuple[str, int],
    remote: tuple[str, int],
    *,
    comm: bytes = b"curl",
    role: int = 1,
    flags: int = 1,
) -> SockInfo:
    info = SockInfo()
    info.id = 77
    info.sent = 2**40 + 3  # beyond 32 bits: u64 kept exact
    info.received = 12345
    ctypes.memmove(info.local_addr, raw_address(local[0]), 16)
    ctypes.memmove(info.remote_addr, raw_address(remote[0]), 16)
    info.local_port = raw_port(local[1])
    info.remote_port = raw_port(remote[1])
    info.family = family
    info.role = role
    info.flags = flags
    info.netns = 4026531840
    info.tgid = 4242
    info.comm = comm
    return info


@pytest.mark.parametrize(
    ("family", "raw", "text"),
    [
        (AF_INET, bytes([198, 18, 0, 1]) + bytes(12), "198.18.0.1"),
        (AF_INET, bytes([127, 0, 0, 1]) + b"\xaa" * 12, "127.0.0.1"),  # tail ignored
        (AF_INET6, raw_address("2001:db8::1"), "2001:db8::1"),
        (AF_INET6, raw_address("::1"), "::1"),
        (AF_INET6, bytes(10) + b"\xff\xff" + bytes([198, 18, 0, 7]), "198.18.0.7"),  # mapped
        (AF_INET6, bytes(16), "::"),
    ],
)
def test_decode_address(family: int, raw: bytes, text: str) -> None:
    assert decode_address(family, raw) == text


def test_family_constants_are_linux_values() -> None:
    assert (AF_INET, AF_INET6) == (2, 10)


@pytest.mark.parametrize("port", [1, 80, 443, 8080, 9437, 40000, 65535])
def test_port_byte_order_round_trip(port: int) -> None:
    assert decode_port(raw_port(port)) == port
    assert encode_port(port) == raw_port(port)


def test_port_example_from_docstring() -> None:
    assert decode_port(0x5000) == 80  # bytes 00 50 in memory
    assert encode_port(80) == 0x5000


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"nginx" + bytes(11), "nginx"),
        (b"nginx\0junk\0\0\0\0\0\0", "nginx"),  # stale bytes after the first NUL
        (b"\xff\xfeab" + bytes(12), "\ufffd\ufffdab"),  # not UTF-8
        (b"abcdefghijklmnop", "abcdefghijklmnop"),  # 16 bytes, no NUL
        (bytes(16), ""),
        ("żółw".encode(), "żółw"),
    ],
)
def test_decode_comm(raw: bytes, text: str) -> None:
    assert decode_comm(raw) == text


def test_decode_sample_ipv4() -> None:
    info = sock_info(AF_INET, ("198.18.0.1", 40001), ("198.18.0.2", 80))
    decoded = decode_sample(info)
    assert decoded.socket_id == 77
    assert (decoded.sent_bytes, decoded.received_bytes) == (2**40 + 3, 12345)
    assert decoded.local == Endpoint("198.18.0.1", 40001)
    assert decoded.remote == Endpoint("198.18.0.2", 80)
    assert decoded.role is Role.CLIENT
    assert decoded.flags == SocketFlag.OPENED
    assert (decoded.netns, decoded.pid, decoded.comm) == (4026531840, 4242, "curl")


def test_decode_sample_ipv6() -> None:
    info = sock_info(AF_INET6, ("2001:db8::2", 443), ("2001:db8::1", 51000), role=2)
    decoded = decode_sample(info)
    assert decoded.local == Endpoint("2001:db8::2", 443)
    assert decoded.remote == Endpoint("2001:db8::1", 51000)
    assert str(decoded.local) == "[2001:db8::2]:443"
    assert decoded.role is Role.SERVER


def test_decode_sample_folds_ipv4_mapped_ipv6() -> None:
    info = sock_info(AF_INET6, ("::ffff:198.18.0.1", 40001), ("::ffff:198.18.0.2", 80))
    decoded = decode_sample(info)
    assert decoded.local == Endpoint("198.18.0.1", 40001)
    assert decoded.remote == Endpoint("198.18.0.2", 80)


def test_decode_sample_comm_with_nul_and_invalid_utf8() -> None:
    info = sock_info(AF_INET, ("127.0.0.1", 1), ("127.0.0.1", 2), comm=b"py\xffthon\0xx")
    assert decode_sample(info).comm == "py\ufffdthon"


@pytest.mark.parametrize(
    ("raw", "role"),
    [(0, Role.UNKNOWN), (1, Role.CLIENT), (2, Role.SERVER), (3, Role.UNKNOWN), (255, Role.UNKNOWN)],
)
def test_decode_sample_role(raw: int, role: Role) -> None:
    info = sock_info(AF_INET, ("127.0.0.1", 1), ("127.0.0.1", 2), role=raw)
    assert decode_sample(info).role is role


def test_decode_sample_keeps_known_flags_only() -> None:
    info = sock_info(AF_INET, ("127.0.0.1", 1), ("127.0.0.1", 2), flags=0xF0 | 0b1011)
    assert decode_sample(info).flags == SocketFlag.OPENED | SocketFlag.CLOSED | SocketFlag.DESTROYED


def test_sock_info_layout_matches_the_c_struct() -> None:
    """bpf/tcpacct.c struct sock_info: 3 u64, two 16-byte addresses, ports, family, role,
    flags, netns, tgid, comm[16], changed_in, version, slot, spare -> 104 bytes with
    natural alignment; struct slot: 4 u64 and 2 u32 -> 40."""
    assert ctypes.sizeof(SockInfo) == 3 * 8 + 32 + 2 * 3 + 2 + 4 + 4 + 16 + 4 + 4 + 4 + 4
    assert SOCK_INFO.size == ctypes.sizeof(SockInfo)
    assert SockInfo.local_port.offset == 56
    assert SockInfo.comm.offset == 72
    assert SockInfo.changed_in.offset == 88
    assert SockInfo.slot.offset == 96
    assert SLOT.size == 40


def test_changed_in_reads_the_round_field() -> None:
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    info.changed_in = 0xDEADBEEF
    assert changed_in(bytes(info)) == 0xDEADBEEF
    assert changed_in(memoryview(bytes(info))) == 0xDEADBEEF
    assert changed_in(bytes(SOCK_INFO.size) + bytes(info), SOCK_INFO.size) == 0xDEADBEEF


def test_decode_sample_from_a_raw_buffer() -> None:
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    copy = SockInfo.from_buffer_copy(bytes(info))
    assert decode_sample(copy) == decode_sample(info)


def test_decode_counters_in_c_order() -> None:
    assert decode_counters([1, 2, 3, 4, 5, 6]) == KernelCounters(
        untracked_sent_bytes=1,
        untracked_received_bytes=2,
        untracked_sockets=3,
        spilled_sent_bytes=4,
        spilled_received_bytes=5,
        spilled_sockets=6,
    )


def test_missed_lifecycle_events_are_misses_no_twin_handled_in_two_polls_in_a_row() -> None:
    misses = LifecycleMisses()
    # (primaries' recursion misses, events the twins handled) per poll -> confirmed missed
    polls = [(0, 0), (5, 3), (5, 3), (6, 3), (6, 4), (9, 4), (9, 9), (9, 12)]
    assert [misses.confirmed(m, n) for m, n in polls] == [0, 0, 2, 2, 2, 2, 0, 0]
    # a miss whose twin had not counted it by the second read shows for one poll only
    blip = LifecycleMisses()
    assert [blip.confirmed(m, n) for m, n in [(1, 1), (2, 1), (2, 2), (2, 2)]] == [0, 0, 0, 0]
    assert decode_counters([0] * 8, 2).lifecycle_events_missed == 2


def test_decode_counters_pads_a_short_read_with_zeros() -> None:
    assert decode_counters([7, 8]) == KernelCounters(
        untracked_sent_bytes=7, untracked_received_bytes=8
    )


def test_network_order_helper_agrees_with_socket_module() -> None:
    assert raw_port(80) == socket.htons(80)


@pytest.mark.parametrize(
    ("family", "local", "remote"),
    [
        (AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000)),
        (AF_INET6, ("2001:db8::1", 443), ("2001:db8::2", 40000)),
        (AF_INET6, ("::ffff:127.0.0.1", 80), ("::ffff:127.0.0.1", 5000)),
    ],
)
def test_sample_decoder_decodes_as_decode_raw(family, local, remote) -> None:
    info = sock_info(family, local, remote, comm=b"py\xffthon")
    assert SampleDecoder().decode(bytes(info), {}) == decode_sample(info)


def test_sample_decoder_keeps_endpoints_of_an_unchanged_socket() -> None:
    decoder = SampleDecoder()
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    first = decoder.decode(bytes(info), {})
    info.sent += 5
    second = decoder.decode(bytes(info), {first.socket_id: first})
    assert second.sent_bytes == first.sent_bytes + 5
    assert second.local is first.local and second.remote is first.remote
    info.local_port = raw_port(8081)  # a changed endpoint is a new one
    third = decoder.decode(bytes(info), {first.socket_id: second})
    assert third.local == Endpoint("198.18.0.9", 8081) and third.remote is first.remote


def test_refresh_updates_a_live_sample_whose_counters_alone_moved() -> None:
    decoder = SampleDecoder()
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    first = decoder.decode(bytes(info), {})
    known = {first.socket_id: first}
    assert decoder.refresh(bytes(info), known) == (first, False)
    info.sent += 5
    info.received += 7
    sample, moved = decoder.refresh(bytes(info), known)
    assert moved and sample is first
    assert (first.sent_bytes, first.received_bytes) == (info.sent, info.received)
    assert first == decode_sample(info)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flags", 1 | 2),
        ("role", 2),
        ("tgid", 43),
        ("netns", 4026531841),
        ("local_port", raw_port(8081)),
        ("remote_port", raw_port(33001)),
        ("comm", b"other"),
    ],
)
def test_refresh_makes_a_new_sample_when_anything_but_the_counters_changed(field, value) -> None:
    decoder = SampleDecoder()
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    first = decoder.decode(bytes(info), {})
    untouched = decode_sample(info)
    setattr(info, field, value)
    sample, moved = decoder.refresh(bytes(info), {first.socket_id: first})
    assert moved and sample is not first
    assert sample == decode_sample(info) != first
    assert first == untouched


def test_refresh_sees_a_changed_address() -> None:
    decoder = SampleDecoder()
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    first = decoder.decode(bytes(info), {})
    moved_to = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.11", 33000))
    sample, moved = decoder.refresh(bytes(moved_to), {first.socket_id: first})
    assert moved and sample.remote == Endpoint("198.18.0.11", 33000)
    assert first.remote == Endpoint("198.18.0.10", 33000)


def test_sample_decoder_caches_stay_bounded() -> None:
    decoder = SampleDecoder(limit=4)
    for port in range(10):
        info = sock_info(
            AF_INET, (f"198.18.0.{port}", port), ("198.18.1.1", 80), comm=b"c%d" % port
        )
        assert decoder.decode(bytes(info), {}).local == Endpoint(f"198.18.0.{port}", port)
    assert len(decoder._addresses[AF_INET]) <= 4 and len(decoder._comms) <= 4


def test_a_settled_sample_is_read_for_its_counters_until_the_version_moves() -> None:
    """Compared whole and unchanged at its version, a sample is settled: later reads at that
    version update the counters only (the kernel bumps the version with every other change),
    and a new version brings a whole comparison again."""
    decoder = SampleDecoder()
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    first = decoder.decode(bytes(info), {})
    known = {first.socket_id: first}
    assert decoder.refresh(bytes(info), known) == (first, False)
    assert first.settled
    info.sent += 5
    info.comm = b"unbumped"  # not a change the kernel makes without a new version
    sample, moved = decoder.refresh(bytes(info), known)
    assert moved and sample is first and first.sent_bytes == info.sent
    assert first.comm == "curl"
    info.version += 1
    sample, moved = decoder.refresh(bytes(info), known)
    assert moved and sample is not first and sample.comm == "unbumped"
    assert not sample.settled and sample.kernel_version == info.version


def test_a_read_torn_by_a_change_is_compared_again_at_its_new_version() -> None:
    """An entry read while the kernel changed it: the old flags with the new version. The
    next read at that version still compares everything, and finds the new flags."""
    decoder = SampleDecoder()
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    first = decoder.decode(bytes(info), {})
    known = {first.socket_id: first}
    decoder.refresh(bytes(info), known)  # settled at version 0
    info.version = 1  # torn: the version bump seen, the flag change not yet
    assert decoder.refresh(bytes(info), known) == (first, False)
    assert not first.settled
    info.flags = 1 | 2  # CLOSED, as the kernel wrote it before the bump
    sample, moved = decoder.refresh(bytes(info), known)
    assert moved and sample.flags == SocketFlag.OPENED | SocketFlag.CLOSED
    known[sample.socket_id] = sample
    assert decoder.refresh(bytes(info), known) == (sample, False) and sample.settled


# -- fold_slot: the hot path's slot counters added into the entry -----------------------

SK = 0xFFFF_8880_1234_5600


def _entry_and_slots(slot: int, owner: int = SK, owner_id: int = 7) -> tuple[bytearray, bytes]:
    info = sock_info(AF_INET, ("198.18.0.9", 8080), ("198.18.0.10", 33000))
    info.id, info.sent, info.received, info.changed_in, info.slot = 7, 5, 2, 3, slot
    slots = bytearray(SLOT.size * 4)
    SLOT.pack_into(slots, SLOT.size * 2, owner, owner_id, 100, 40, 0, 0)
    return bytearray(bytes(info)), bytes(slots)


def test_fold_slot_adds_the_slot_counters_into_the_entry() -> None:
    entry, slots = _entry_and_slots(slot=3)  # index 2
    assert fold_slot(entry, 0, SK, slots) == (5, 2)  # the entry's own
    folded = SockInfo.from_buffer_copy(entry)
    assert (folded.sent, folded.received, folded.changed_in) == (105, 42, 3)
    sample, moved = SampleDecoder().refresh(entry, {})
    assert (sample.sent_bytes, sample.received_bytes, moved) == (105, 42, True)


def test_fold_slot_leaves_an_entry_without_a_slot_alone() -> None:
    entry, slots = _entry_and_slots(slot=0)
    before = bytes(entry)
    assert fold_slot(entry, 0, SK, slots) == (5, 2)
    assert bytes(entry) == before


@pytest.mark.parametrize(
    "owner, owner_id", [(SK + 64, 7), (SK, 8), (0, 0)], ids=["other socket", "other id", "freed"]
)
def test_fold_slot_refuses_a_slot_that_no_longer_names_the_entry(owner, owner_id) -> None:
    entry, slots = _entry_and_slots(slot=3, owner=owner, owner_id=owner_id)
    before = bytes(entry)
    assert fold_slot(entry, 0, SK, slots) is None
    assert bytes(entry) == before


def test_fold_slot_refuses_a_slot_whose_owner_changed_while_its_counters_were_read(
    monkeypatch,
) -> None:
    from agent.ebpf import decoding

    entry, slots = _entry_and_slots(slot=3)
    reads = []
    real = decoding._SLOT_OWNER

    class Owner:
        size = real.size

        @staticmethod
        def unpack_from(buffer, offset=0):
            reads.append(offset)
            owner = real.unpack_from(buffer, offset)
            return owner if len(reads) == 1 else (0, 0)  # freed after the first read

    monkeypatch.setattr(decoding, "_SLOT_OWNER", Owner)
    before = bytes(entry)
    assert fold_slot(entry, 0, SK, slots) is None
    assert reads == [2 * SLOT.size, 2 * SLOT.size]  # before and after the counters
    assert bytes(entry) == before


def test_fold_slot_works_at_an_offset_of_a_batch_buffer() -> None:
    first, slots = _entry_and_slots(slot=0)
    second, _ = _entry_and_slots(slot=3)
    buffer = memoryview(bytearray(bytes(first) + bytes(second)))
    assert fold_slot(buffer, SOCK_INFO.size, SK, slots) == (5, 2)
    assert SockInfo.from_buffer_copy(buffer[SOCK_INFO.size :]).sent == 105
    assert SockInfo.from_buffer_copy(buffer[: SOCK_INFO.size]).sent == 5

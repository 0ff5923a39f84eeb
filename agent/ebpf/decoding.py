"""Decoding the kernel's raw values (bpf/tcpacct.c) into :mod:`agent.model` types.

The BPF side keeps raw bytes: addresses in 16-byte arrays, ports in network byte order, the
task name as a NUL-padded char array. These small functions turn them into text.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from agent.memo import BoundedMemo
from agent.model import Endpoint, KernelCounters, Role, SocketFlag, SocketSample

AF_INET = socket.AF_INET  # 2
AF_INET6 = socket.AF_INET6  # 10

# Indices of the `counters` per-CPU array (bpf/tcpacct.c C_*).
C_UNTRACKED_SENT, C_UNTRACKED_RECEIVED, C_UNTRACKED_SOCKETS = 0, 1, 2
C_SPILLED_SENT, C_SPILLED_RECEIVED, C_SPILLED_SOCKETS = 3, 4, 5
C_CHANGES_LOST = 6  # the `changed` map was full: the reader must read the whole socket map
C_LIFECYCLE_NESTED = 7  # lifecycle events a nested twin handled (bpf/tcpacct.c)
C_COUNT = 8


class SockInfo(ctypes.Structure):
    """Mirror of ``struct sock_info`` (bpf/tcpacct.c), for fixtures and raw buffers."""

    _fields_ = [
        ("id", ctypes.c_uint64),
        ("sent", ctypes.c_uint64),
        ("received", ctypes.c_uint64),
        ("local_addr", ctypes.c_uint8 * 16),
        ("remote_addr", ctypes.c_uint8 * 16),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("role", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("netns", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
        ("changed_in", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("spare", ctypes.c_uint32),
    ]


_V4_MAPPED = bytes(10) + b"\xff\xff"


def decode_address(family: int, raw: bytes) -> str:
    """16 raw bytes -> address text, IPv4-mapped IPv6 folded to IPv4.

    ``decode_address(2, b"\\xc6\\x12\\x00\\x01" + bytes(12))`` -> ``"198.18.0.1"``;
    ``decode_address(10, bytes(10) + b"\\xff\\xff\\x7f\\x00\\x00\\x01")`` -> ``"127.0.0.1"``.
    """
    if family == AF_INET:
        return socket.inet_ntop(AF_INET, raw[:4])
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(AF_INET, raw[12:16])
    return socket.inet_ntop(AF_INET6, raw[:16])


def decode_port(raw: int) -> int:
    """A port as the kernel stores it (network byte order, read as a little-endian u16).

    ``decode_port(0x5000)`` -> ``80``.
    """
    return socket.ntohs(raw)


def encode_port(port: int) -> int:
    """Inverse of :func:`decode_port`: ``encode_port(80)`` -> ``0x5000``."""
    return socket.htons(port)


def decode_comm(raw: bytes) -> str:
    """``b"nginx\\x00..."`` -> ``"nginx"`` (task names are not guaranteed UTF-8)."""
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")


SOCK_INFO = struct.Struct("<QQQ16s16sHHHBBII16s16x")  # struct sock_info, 104 bytes
_COUNTS = struct.Struct("<QQQ68xI")  # id, sent, received ... version
_CHANGED_IN = struct.Struct("<88xI")  # struct sock_info.changed_in
_SLOT_AT = 96  # offset of struct sock_info.slot


def changed_in(raw: bytes | memoryview, offset: int = 0) -> int:
    """The poll round that last marked the ``struct sock_info`` at ``offset`` as changed.

    ``changed_in(bytes(88) + (7).to_bytes(4, "little") + bytes(4))`` -> ``7``.
    """
    return _CHANGED_IN.unpack_from(raw, offset)[0]


def slot_column(raw: memoryview) -> Sequence[int]:
    """Every entry's ``slot`` (index + 1 of its slot, 0: none) in a buffer of whole
    ``struct sock_info`` entries, as a strided view: entries with slots 3 and 0 ->
    ``[3, 0]``."""
    words = raw.cast("B").cast("I")  # u32 words; slot is word 24 of each 26
    return words[_SLOT_AT // 4 :: SOCK_INFO.size // 4]


SLOT = struct.Struct("<QQQQII")  # struct slot: sk, id, sent, received, needs_process, spare
SLOT_WORDS = SLOT.size // 8  # u64 words per slot: sk at word 0, id 1, sent 2, received 3
_SLOT_OWNER = struct.Struct("<QQ")  # sk, id
_SLOT_COUNTS = struct.Struct("<16xQQ")  # sent, received
_ENTRY_FOLD = struct.Struct("<QQQ72xI")  # sock_info id, sent, received, slot
_ENTRY_COUNTS = struct.Struct("<QQ")  # sock_info sent, received (at offset 8)


def fold_slot(
    raw: bytearray | memoryview, offset: int, key: int, slots: bytes | memoryview
) -> tuple[int, int] | None:
    """Add the counts of its slot (``struct slot`` in ``slots``, the kernel's memory-mapped
    array) into the ``struct sock_info`` at ``offset`` of ``raw``, in place; returns the
    entry's own (sent, received), as they were before. None when the slot no longer names
    the entry (its ``sk`` is not ``key`` or its ``id`` not the entry's): the socket was
    retired after ``raw`` was read, and its final counts are in the closed map.

    An entry with 5 bytes sent before it had slot 3, whose slot has counted 100 since:
    ``fold_slot(entry, 0, key, slots)`` -> ``(5, 2)``, the entry now says 105 sent.

    The owner is read before and after the counters: the kernel clears it first when it
    frees a slot (bpf/tcpacct.c free_slot) and ids are never reused, so the same owner both
    times means the counters between were this socket's (loads are not reordered on
    x86-64; on other machines the tracer uses no slots: agent/ebpf/backends.py
    SLOTS_MACHINES).
    """
    sid, sent, received, slot = _ENTRY_FOLD.unpack_from(raw, offset)
    if not slot:
        return sent, received
    at = (slot - 1) * SLOT.size
    owner = (key, sid)
    if _SLOT_OWNER.unpack_from(slots, at) != owner:
        return None
    slot_sent, slot_received = _SLOT_COUNTS.unpack_from(slots, at)
    if _SLOT_OWNER.unpack_from(slots, at) != owner:
        return None
    _ENTRY_COUNTS.pack_into(raw, offset + 8, sent + slot_sent, received + slot_received)
    return sent, received


_Fields = tuple[Any, ...]  # SOCK_INFO.unpack's answer
_ntohs = socket.ntohs
_ROLES = {int(role): role for role in Role}
_FLAGS = {value: SocketFlag(value) for value in range(16)}


def decode_sample(info: SockInfo) -> SocketSample:
    """A ``struct sock_info`` (bcc's generated type or :class:`SockInfo`) -> SocketSample."""
    return decode_raw(bytes(info))


def decode_raw(raw: bytes | memoryview) -> SocketSample:
    """The 104 bytes of a ``struct sock_info`` -> SocketSample (the per-poll hot path).

    id 7, 100 bytes sent, 20 received, 127.0.0.1:5000 -> 127.0.0.1:80, client, OPENED,
    netns 4026531840, pid 42, comm "curl" -> ``SocketSample(7, 100, 20,
    Endpoint("127.0.0.1", 5000), Endpoint("127.0.0.1", 80), Role.CLIENT, SocketFlag.OPENED,
    4026531840, 42, "curl")``.
    """
    return _DECODER.decode(raw, _NOTHING_BEFORE)


class SampleDecoder:
    """:func:`decode_raw` for repeated reads of the same sockets (the incremental poll).

    Address and task-name texts are cached by their raw bytes (a node has few distinct
    addresses and names), namespace and process numbers are shared, and a socket whose
    endpoints did not change keeps the Endpoint objects of its previous sample.
    ``decode(raw, {7: previous})`` -> the same SocketSample ``decode_raw(raw)`` gives;
    :meth:`refresh` updates a live sample whose counters alone moved.
    """

    def __init__(self, limit: int = 1 << 16) -> None:
        # raw 16 bytes -> text, one table per family (no key tuple to build per lookup)
        self._addresses: dict[int, BoundedMemo[bytes, str]] = {
            AF_INET: BoundedMemo(limit),
            AF_INET6: BoundedMemo(limit),
        }
        self._comms: BoundedMemo[bytes, str] = BoundedMemo(limit)
        self._numbers: BoundedMemo[int, int] = BoundedMemo(limit)
        self._limit = limit

    def _address(self, family: int, raw: bytes) -> str:
        table = self._addresses.get(family)
        if table is None:
            table = self._addresses.setdefault(family, BoundedMemo(self._limit))
        text = table.get(raw)
        return text if text is not None else table.keep(raw, decode_address(family, raw))

    def decode(
        self, raw: bytes | memoryview, previous: Mapping[int, SocketSample], offset: int = 0
    ) -> SocketSample:
        """The entry at ``offset`` of ``raw`` -> a new SocketSample."""
        fields = SOCK_INFO.unpack_from(raw, offset)
        return self._build(fields, previous.get(fields[0]))

    def refresh(
        self, raw: bytes | memoryview, previous: Mapping[int, SocketSample], offset: int = 0
    ) -> tuple[SocketSample, bool]:
        """The entry at ``offset`` of ``raw``, a live socket read again -> (its sample,
        whether anything in it moved).

        When only the counters differ from ``previous``'s sample of the same socket, that
        sample's counters are updated in place and it is returned: no object is made for a
        socket that only moved bytes, and no second copy of it lives until the accountant
        has seen the new one. Otherwise a new sample, as :meth:`decode` makes it.
        ``refresh(raw with 150 bytes sent, {7: sample with 100})`` -> ``(that sample, now
        150, True)``.

        The kernel bumps an entry's version after every change but the counters. A sample
        compared whole and found unchanged at the version it was read at is *settled*: while
        the version stays, only the counters are read. Not before: an entry read while the
        kernel was changing it may look half changed at the new version, so one more whole
        comparison at that version comes first.
        """
        sid, sent, received, version = _COUNTS.unpack_from(raw, offset)
        before = previous.get(sid)
        if before is not None and before.settled and before.kernel_version == version:
            if before.sent_bytes == sent and before.received_bytes == received:
                return before, False
            before.sent_bytes, before.received_bytes = sent, received
            return before, True
        fields = SOCK_INFO.unpack_from(raw, offset)
        if before is None:
            sample = self._build(fields, None)
            sample.kernel_version = version
            return sample, True
        (_, sent, received, local, remote, local_port, remote_port, family, role, flags, netns,
         tgid, comm) = fields  # fmt: skip
        texts = self._addresses.get(family)
        same = (
            texts is not None
            and before.pid == tgid
            and before.netns == netns
            and before.flags == flags & 0xF
            and before.role == role
            and before.local.port == _ntohs(local_port)
            and before.remote.port == _ntohs(remote_port)
            and before.local.address == texts.get(local)
            and before.remote.address == texts.get(remote)
            and before.comm == self._comms.get(comm)
        )
        if not same:  # anything but the counters changed (or a text is not cached yet)
            sample = self._build(fields, before)
            sample.kernel_version = version
            return sample, True
        before.settled = before.kernel_version == version
        before.kernel_version = version
        if before.sent_bytes == sent and before.received_bytes == received:
            return before, False
        before.sent_bytes, before.received_bytes = sent, received
        return before, True

    def _comm(self, raw: bytes) -> str:
        name = self._comms.get(raw)
        return name if name is not None else self._comms.keep(raw, decode_comm(raw))

    def _build(self, fields: _Fields, before: SocketSample | None) -> SocketSample:
        (
            sid,
            sent,
            received,
            local,
            remote,
            local_port,
            remote_port,
            family,
            role,
            flags,
            netns,
            tgid,
            comm,
        ) = fields
        # the memo lookups inline (one socket per call of a poll's hottest loop); a miss
        # goes through the methods that fill them
        texts = self._addresses.get(family)
        local_address = texts.get(local) if texts is not None else None
        if local_address is None:
            local_address = self._address(family, local)
            texts = self._addresses[family]
        remote_address = texts.get(remote)
        if remote_address is None:
            remote_address = self._address(family, remote)
        local_port, remote_port = _ntohs(local_port), _ntohs(remote_port)
        local_end = remote_end = None
        if before is not None:
            local_end, remote_end = before.local, before.remote
        if local_end is None or local_end.port != local_port or local_end.address != local_address:
            local_end = Endpoint(local_address, local_port)
        if (
            remote_end is None
            or remote_end.port != remote_port
            or remote_end.address != remote_address
        ):
            remote_end = Endpoint(remote_address, remote_port)
        # one int object per distinct namespace and process, not one per socket
        shared = self._numbers
        netns = shared.get(netns) or shared.keep(netns, netns)
        tgid = shared.get(tgid) or shared.keep(tgid, tgid)
        name = self._comms.get(comm)
        if name is None:
            name = self._comm(comm)
        return SocketSample(
            sid,
            sent,
            received,
            local_end,
            remote_end,
            _ROLES.get(role, Role.UNKNOWN),
            _FLAGS[flags & 0xF],
            netns,
            tgid,
            name,
        )


_DECODER = SampleDecoder()  # shared: its caches only save work (dict operations hold the GIL)
_NOTHING_BEFORE: Mapping[int, SocketSample] = {}


class LifecycleMisses:
    """Lifecycle events no program handled, from two kernel counts read one after the
    other: the primaries' recursion misses (bpf_prog_info, read first) less the events their
    twins handled (C_LIFECYCLE_NESTED). A miss the kernel counted just before the first read
    whose twin had not counted it yet by the second looks missed for one poll; a real miss
    stays. So a difference counts once two polls in a row show it:
    ``confirmed(5, 3)`` -> 0 (first sight), then ``confirmed(5, 3)`` -> 2, and after a
    one-poll blip ``confirmed(6, 3)`` -> 2, ``confirmed(6, 4)`` -> 2.
    """

    def __init__(self) -> None:
        self._last = 0  # the difference at the previous poll

    def confirmed(self, primary_misses: int, nested_handled: int) -> int:
        now = max(0, primary_misses - nested_handled)
        agreed = min(now, self._last)
        self._last = now
        return agreed


def decode_counters(
    per_index_sums: Sequence[int], lifecycle_events_missed: int = 0
) -> KernelCounters:
    """Sums over CPUs of the ``counters`` array, in C_* order (and the lifecycle events
    :class:`LifecycleMisses` confirmed missed) -> KernelCounters."""
    sums = list(per_index_sums) + [0] * (C_COUNT - len(per_index_sums))
    return KernelCounters(
        lifecycle_events_missed=lifecycle_events_missed,
        untracked_sent_bytes=sums[C_UNTRACKED_SENT],
        untracked_received_bytes=sums[C_UNTRACKED_RECEIVED],
        untracked_sockets=sums[C_UNTRACKED_SOCKETS],
        spilled_sent_bytes=sums[C_SPILLED_SENT],
        spilled_received_bytes=sums[C_SPILLED_RECEIVED],
        spilled_sockets=sums[C_SPILLED_SOCKETS],
    )

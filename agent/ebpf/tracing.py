"""Load, attach, read and detach the BPF programs.

``open_tracer(...)`` picks a backend (the first of tracepoint, fentry, kprobe that loads and
attaches, or the one forced), compiles bpf/tcpacct.c with BTF offsets as cflags, attaches
the lifecycle hooks, seeds the listening sockets, attaches the byte hooks and returns a
:class:`KernelTracer` whose ``poll()`` reads counters, live sockets and finished sockets, in
that order.

The tracepoint backend (every hook a raw tracepoint) never brings bcc into the agent: the
program is compiled by a child process into the compile cache (:mod:`agent.ebpf.compiling`;
once per program, kernel and configuration) and loaded with bpf(2) alone
(:mod:`agent.ebpf.loading`). fentry and kprobe programs are loaded and attached by bcc in
this process (their attachment needs bcc's BTF and perf-event plumbing). Either way maps
are read with bpf(2) (:mod:`agent.ebpf.syscalls`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
import types
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import Protocol

from agent.ebpf.backends import (
    BACKENDS,
    LIFECYCLE_PRIMARIES,
    LIFECYCLE_TRACEPOINTS,
    BackendPlan,
    BackendUnavailable,
    Hook,
    explain_load_error,
    plan_backend,
)
from agent.ebpf.btf import Btf
from agent.ebpf.compiled import CompiledProgram, cache_key, read_cached
from agent.ebpf.compiling import compile_in_child
from agent.ebpf.decoding import (
    C_CHANGES_LOST,
    C_COUNT,
    C_LIFECYCLE_NESTED,
    SLOT,
    SLOT_WORDS,
    LifecycleMisses,
    SampleDecoder,
    SockInfo,
    changed_in,
    decode_comm,
    decode_counters,
    encode_port,
    fold_slot,
    slot_column,
)
from agent.ebpf.headers import apply_headers, choose_headers
from agent.ebpf.loading import LoadedProgram
from agent.ebpf.offsets import kernel_layout
from agent.ebpf.syscalls import (
    BPF_MAP_LOOKUP_AND_DELETE_BATCH,
    BPF_MAP_LOOKUP_BATCH,
    BatchAttr,
    MapHandle,
    ProgramRunStats,
    bpf_errno,
    check_sizes,
    open_raw_tracepoint,
    possible_cpus,
    program_run_stats,
)
from agent.model import KernelPoll, ListeningSocket, SocketSample

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOCK_INFO_SIZE = ctypes.sizeof(SockInfo)  # 104
COMPILE_CACHE = Path("/var/cache/tcpacct/bpf")
DRAIN_PERIOD = 0.25  # seconds between drains of the kernel's closed map (start_draining)
MAPS = (
    "socks",
    "listeners",
    "counters",
    "next_id",
    "poll_round",
    "changed",
    "lifecycle_busy",
)
SLOT_MAPS = ("slots", "closed_ring", "closed_ends")  # kernels with compare-and-swap


def _maps(plan: BackendPlan) -> tuple[str, ...]:
    """The maps of the plan's program: MAPS, and where the kernel has compare-and-swap the
    slots and the ring of closed records, else the ``closed`` hash map."""
    return (*MAPS, *SLOT_MAPS) if plan.slots else (*MAPS, "closed")


CLOSED_RECORD_SIZE = SOCK_INFO_SIZE + 8  # struct closed_record: the final sock_info, number
CLOSED_HEAD, CLOSED_TAIL = 0, 1  # indexes of `closed_ends`
LISTENER_KEY = struct.Struct("<IHH")  # struct listener_key
PROCESS_INFO = struct.Struct("<I16s")  # struct process_info
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Capacities:
    """Sizes of the kernel maps. ``slots`` (the hot path's array; a power of two) is twice
    the sockets rounded up when not given, so a socket finds a free slot near its home:
    ``Capacities(sockets=65536).slots`` -> ``131072``."""

    sockets: int = 65536
    closed: int = 65536
    listeners: int = 8192
    slots: int = 0

    def __post_init__(self) -> None:
        if not self.slots:
            object.__setattr__(self, "slots", 1 << max(1, (2 * self.sockets - 1).bit_length()))
        if self.slots < 2 or self.slots & (self.slots - 1):
            raise ValueError(f"slots must be a power of two >= 2, not {self.slots}")


class _SlotTable:
    """The kernel's ``slots`` array (bpf/tcpacct.c), memory-mapped read-only: the counters
    of sockets that have a slot, read without a system call.

    The kernel marks nothing when it counts into a slot: :meth:`scan` finds the slots that
    moved by hashing the array in chunks of :data:`CHUNK_SLOTS` slots and reading only the
    chunks whose hash differs from the last scan's (an idle node's poll hashes the array and
    reads no slot).
    """

    CHUNK_SLOTS = 128  # 5 KiB of slots

    def __init__(self, pages: mmap.mmap | bytearray, slots: int) -> None:
        """``pages``: the array's memory (its mapping, or a buffer in tests) of ``slots``."""
        self._pages = pages
        self.view = memoryview(pages)
        self._words = self.view.cast("Q")
        self._size = slots * SLOT.size
        self._hashes: list[int] = []  # per chunk, as of the last scan; empty: scan all

    @classmethod
    def mapped(cls, map_fd: int, slots: int) -> _SlotTable:
        """The kernel's array of ``slots`` slots, memory-mapped read-only."""
        check_sizes(map_fd, 4, SLOT.size)
        size = -(-slots * SLOT.size // mmap.PAGESIZE) * mmap.PAGESIZE
        return cls(mmap.mmap(map_fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ), slots)

    def forget(self) -> None:
        """The next scan reads every chunk (after a poll that failed half way)."""
        self._hashes = []

    def _moved_chunks(self) -> list[int]:
        """Indexes of the chunks whose bytes changed since the last call."""
        view, step = self.view, self.CHUNK_SLOTS * SLOT.size
        hashes = [hash(bytes(view[at : at + step])) for at in range(0, self._size, step)]
        before, self._hashes = self._hashes, hashes
        if len(before) != len(hashes):
            return list(range(len(hashes)))
        pairs = zip(before, hashes, strict=True)
        return [index for index, (old, new) in enumerate(pairs) if old != new]

    def scan(self, samples: Mapping[int, SocketSample]) -> list[SocketSample]:
        """Update the counters of the live samples whose slots counted bytes since the
        last scan; returns those samples.

        A sample's counters are its entry's own (``entry_sent``/``entry_received``, which do
        not change while it has a slot) plus its slot's: an entry with 5 sent whose slot
        now says 150 makes the sample's ``sent_bytes`` 155.
        A slot is read as owner, counters, owner again (see decoding.fold_slot): a slot
        whose owner changed between is skipped (its socket was retired; its final counts
        are in the closed map), and so is a slot whose owner has no sample yet (its new
        entry is marked changed and read with the slot folded in)."""
        moved: list[SocketSample] = []
        add, get = moved.append, samples.get
        words, per_chunk = self._words, self.CHUNK_SLOTS * SLOT_WORDS
        last = self._size // 8  # the word after the last slot (the mapping is page-rounded)
        for chunk in self._moved_chunks():
            first = chunk * per_chunk
            end = min(first + per_chunk, last)
            ids = words[first + 1 : end : SLOT_WORDS].tolist()
            if not any(ids):
                continue  # slots taken and freed again since the last scan (churn)
            sent = words[first + 2 : end : SLOT_WORDS].tolist()
            received = words[first + 3 : end : SLOT_WORDS].tolist()
            again = words[first + 1 : end : SLOT_WORDS].tolist()
            if ids != again:  # an owner changed between the reads: skip its slot
                ids = [sid if sid == check else 0 for sid, check in zip(ids, again, strict=True)]
            for index in compress(range(len(ids)), ids):  # the slots that have an owner
                sample = get(ids[index])
                if sample is None:
                    continue
                now_sent = sample.entry_sent + sent[index]
                now_received = sample.entry_received + received[index]
                before_sent, before_received = sample.sent_bytes, sample.received_bytes
                # moved, and neither count lower than before (never lower a count)
                if (now_sent > before_sent and now_received >= before_received) or (
                    now_received > before_received and now_sent >= before_sent
                ):
                    sample.sent_bytes, sample.received_bytes = now_sent, now_received
                    add(sample)
        return moved

    def close(self) -> None:
        """Unmap (left to the garbage collector while a caller still holds a slice)."""
        with contextlib.suppress(BufferError):
            self._words.release()
            self.view.release()
            if isinstance(self._pages, mmap.mmap):
                self._pages.close()


class _BatchBuffers:
    """Key and value buffers for BPF batch reads, ``capacity`` entries, mapped once;
    :meth:`release` hands the pages the reads since the last release filled back to the
    kernel (a busy poll of 100k sockets fills ~10 MiB that would otherwise stay resident
    between polls)."""

    def __init__(self, key_size: int, value_size: int, capacity: int) -> None:
        self.key_size = key_size
        self.value_size = value_size
        # private: MADV_DONTNEED frees the pages (a shared anonymous mapping keeps its data)
        self._key_pages = mmap.mmap(-1, key_size * capacity, flags=mmap.MAP_PRIVATE)
        self._value_pages = mmap.mmap(-1, value_size * capacity, flags=mmap.MAP_PRIVATE)
        self._keys = (ctypes.c_char * (key_size * capacity)).from_buffer(self._key_pages)
        self._values = (ctypes.c_char * (value_size * capacity)).from_buffer(self._value_pages)
        self.keys_at = ctypes.addressof(self._keys)  # where entry 0's key goes
        self.values_at = ctypes.addressof(self._values)
        self.filled = 0  # entries the reads since the last release wrote

    def views(self, entries: int) -> tuple[memoryview, memoryview]:
        """The raw keys and values of the first ``entries`` entries."""
        return (
            memoryview(self._keys).cast("B")[: entries * self.key_size],
            memoryview(self._values).cast("B")[: entries * self.value_size],
        )

    def release(self) -> None:
        """Give back the pages of the reads (their memoryviews must no longer be used)."""
        for pages, size in ((self._key_pages, self.key_size), (self._value_pages, self.value_size)):
            used = min(len(pages), -(-self.filled * size // mmap.PAGESIZE) * mmap.PAGESIZE)
            if used:
                pages.madvise(mmap.MADV_DONTNEED, 0, used)
        self.filled = 0


class _BatchReader:
    """Reads a whole BPF hash map with BPF_MAP_LOOKUP[_AND_DELETE]_BATCH into
    :class:`_BatchBuffers`."""

    def __init__(self, map_fd: int, key_size: int, value_size: int, capacity: int) -> None:
        check_sizes(map_fd, key_size, value_size)
        self._capacity = capacity
        self._buffers = _BatchBuffers(key_size, value_size, capacity)
        self._tokens = (ctypes.c_uint64 * 2)()  # in, out
        self._attr = BatchAttr(map_fd=map_fd)

    def release(self) -> None:
        """Give back the pages of the last read (its memoryviews must no longer be used)."""
        self._buffers.release()

    def read(self, *, delete: bool) -> tuple[memoryview, memoryview]:
        """Raw keys and values of every entry (deleted as read when ``delete``)."""
        command = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
        attr, tokens, buffers = self._attr, self._tokens, self._buffers
        in_token, out_token = ctypes.addressof(tokens), ctypes.addressof(tokens) + 8
        total, first = 0, True
        while total < self._capacity:
            attr.in_batch = 0 if first else in_token
            attr.out_batch = out_token
            attr.keys = buffers.keys_at + buffers.key_size * total
            attr.values = buffers.values_at + buffers.value_size * total
            attr.count = self._capacity - total
            error = bpf_errno(command, attr)
            total += attr.count
            if error == errno.ENOENT:
                break  # the whole map was read
            if error == errno.ENOSPC and attr.count == 0:
                break  # a bucket larger than the space left: the rest next poll
            if error:
                raise OSError(error, f"BPF map batch read failed: {os.strerror(error)}")
            tokens[0], first = tokens[1], False
        buffers.filled = max(buffers.filled, total)
        return buffers.views(total)


class _FinishedRecords(Protocol):
    """Where finished sockets' final records wait in the kernel: :meth:`take` moves every
    record there is into a buffer (``stride`` bytes apart, each starting with its
    sock_info) and out of the kernel; :meth:`release` gives the buffer's pages back."""

    stride: int

    def take(self) -> memoryview: ...

    def release(self) -> None: ...


class _ClosedMap:
    """The ``closed`` hash map of kernels without compare-and-swap, keyed by socket id."""

    stride = SOCK_INFO_SIZE

    def __init__(self, map_fd: int, capacity: int) -> None:
        self._reader = _BatchReader(map_fd, 8, SOCK_INFO_SIZE, capacity)

    def take(self) -> memoryview:
        return self._reader.read(delete=True)[1]

    def release(self) -> None:
        self._reader.release()


class _ClosedRing:
    """The ``closed_ring`` array (bpf/tcpacct.c record_closed): record number n at index
    n % capacity, committed when its ``number`` field reads n + 1. The kernel keeps the head
    (records reserved) in ``closed_ends``; this reader keeps the tail (records taken) there.

    A take reads the unread window [tail, head) with BPF_MAP_LOOKUP_BATCH, finds how many
    records from the tail are committed, and reads those again: the kernel copies a record
    in before it sets the number, but a batch read copies bytes in no promised order, so a
    record committed while the first read ran could come out half old. Committed before
    the second read began, every byte of it is the final one. Then the tail moves past
    them, which frees their indexes for the kernel. With a capacity of 4, tail 2 and head
    5, where record 4 is reserved but not committed yet: records 2 and 3 (indexes 2, 3)
    are taken, and the tail becomes 4.
    """

    stride = CLOSED_RECORD_SIZE

    def __init__(self, ring_fd: int, ends_fd: int, capacity: int) -> None:
        check_sizes(ring_fd, 4, CLOSED_RECORD_SIZE)
        self._capacity = capacity
        self._ends = MapHandle(ends_fd, 4, 8)
        tail = self._ends.lookup(U32.pack(CLOSED_TAIL))
        self._tail = U64.unpack(tail)[0] if tail else 0
        self._buffers = _BatchBuffers(4, CLOSED_RECORD_SIZE, capacity)
        self._tokens = (ctypes.c_uint32 * 2)()  # in, out
        self._attr = BatchAttr(map_fd=ring_fd)

    def take(self) -> memoryview:
        raw = self._ends.lookup(U32.pack(CLOSED_HEAD))
        head = U64.unpack(raw)[0] if raw else self._tail
        unread = max(0, min(head - self._tail, self._capacity))
        committed = self._committed(self._read(unread))
        if committed:
            self._read(committed)
            self._tail += committed
            self._ends.update(U32.pack(CLOSED_TAIL), U64.pack(self._tail))
        return self._buffers.views(committed)[1]

    def release(self) -> None:
        self._buffers.release()

    def _committed(self, records: int) -> int:
        """How many of the first ``records`` read, from the tail on, are committed."""
        words = self._buffers.views(records)[1].cast("Q")
        numbers = words[SOCK_INFO_SIZE // 8 :: CLOSED_RECORD_SIZE // 8]
        expected = self._tail + 1
        for offset in range(records):
            if numbers[offset] != expected + offset:
                return offset
        return records

    def _read(self, records: int) -> int:
        """Read ``records`` records from the tail on into the buffer, in order; returns
        ``records``."""
        done = 0
        while done < records:
            index = (self._tail + done) % self._capacity
            count = min(records - done, self._capacity - index)
            self._read_indexes(index, count, done)
            done += count
        self._buffers.filled = max(self._buffers.filled, records)
        return records

    def _read_indexes(self, index: int, count: int, into: int) -> None:
        """Records at ``index`` .. ``index + count - 1`` into buffer positions ``into`` on."""
        attr, tokens = self._attr, self._tokens
        tokens[0] = index - 1  # a batch starts after its in_batch key
        attr.in_batch = ctypes.addressof(tokens) if index else 0
        attr.out_batch = ctypes.addressof(tokens) + 4
        attr.keys = self._buffers.keys_at + 4 * into
        attr.values = self._buffers.values_at + CLOSED_RECORD_SIZE * into
        attr.count = count
        error = bpf_errno(BPF_MAP_LOOKUP_BATCH, attr)
        if error or attr.count != count:
            reason = os.strerror(error) if error else f"{attr.count} of {count} records"
            raise OSError(error or errno.EIO, f"reading the closed ring failed: {reason}")


def _in_slot_order(raw: memoryview, indexes: list[int] | None = None) -> list[int]:
    """Indexes of the entries of a batch read (all, or ``indexes`` of them), by their
    slots, those without one first: entries with slots 3, 0, 1 -> ``[1, 2, 0]``.

    Samples decoded in this order - and the accountant's records of them, made in the
    order it first sees them - lie in memory in the order every later poll's slot scan
    visits them: a busy poll of 100k sockets that walks them at random instead costs
    about twice as much here (cache misses).
    """
    slot_of = slot_column(raw)
    return sorted(range(len(slot_of)) if indexes is None else indexes, key=slot_of.__getitem__)


class _Program(Protocol):
    """A loaded program: its maps' fds, hooks to attach and detach, and tear-down."""

    map_fds: Mapping[str, int]

    @property
    def program_fds(self) -> Mapping[str, int]: ...

    def attach(self, hooks: Iterable[Hook]) -> None: ...

    def detach(self, hooks: Iterable[Hook]) -> None: ...

    def close(self) -> None: ...


class _BccProgram:
    """Loaded and attached by bcc in this process (fentry, kprobe).

    bcc attaches one program per raw tracepoint; a second one on the same tracepoint (the
    lifecycle handlers' nested twins) is attached here with bpf(2) and its link fd kept.
    """

    def __init__(self, bpf: object, maps: tuple[str, ...]) -> None:
        self._bpf = bpf
        self.map_fds = {name: bpf[name].map_fd for name in maps}  # type: ignore[index]
        self._links: dict[tuple[str, str], int] = {}
        self._by_bcc: set[str] = set()  # raw tracepoints bcc attached

    @property
    def program_fds(self) -> Mapping[str, int]:
        """Each function bcc has loaded so far (attaching loads it), by name."""
        funcs = self._bpf.funcs  # type: ignore[attr-defined]
        return {
            (name.decode() if isinstance(name, bytes) else name): function.fd
            for name, function in funcs.items()
        }

    def attach(self, hooks: Iterable[Hook]) -> None:
        from bcc import BPF

        for hook in hooks:
            if hook.kind == "raw_tracepoint" and hook.target in self._by_bcc:
                program = self._bpf.load_func(hook.function, BPF.RAW_TRACEPOINT)  # type: ignore[attr-defined]
                self._links[(hook.target, hook.function)] = open_raw_tracepoint(
                    hook.target, program.fd
                )
                continue
            _attach_with_bcc(self._bpf, (hook,))
            if hook.kind == "raw_tracepoint":
                self._by_bcc.add(hook.target)

    def detach(self, hooks: Iterable[Hook]) -> None:
        for hook in hooks:
            if hook.kind != "raw_tracepoint":
                raise RuntimeError(f"cannot detach a {hook.kind} hook alone")
            link = self._links.pop((hook.target, hook.function), None)
            if link is not None:
                os.close(link)
            elif hook.target in self._by_bcc:
                self._bpf.detach_raw_tracepoint(tp=hook.target)  # type: ignore[attr-defined]
                self._by_bcc.discard(hook.target)

    def close(self) -> None:
        for link in self._links.values():
            with contextlib.suppress(OSError):
                os.close(link)
        self._links.clear()
        bpf = self._bpf
        for _ in range(16):
            try:
                bpf.cleanup()  # type: ignore[attr-defined]
                return
            except Exception as error:
                # bcc stops at the first probe it cannot remove, e.g. a legacy kprobe event
                # that belongs to another tracer of this process (a name clash: the
                # perf event of ours is closed by then). Skip it and go on with the rest.
                log.warning("detaching: %s; going on with the rest", error)
                kprobe_fds = bpf.kprobe_fds  # type: ignore[attr-defined]
                for name in [name for name, fds in kprobe_fds.items() if not fds]:
                    del kprobe_fds[name]


class KernelTracer:
    """The attached programs and their maps (implements ``agent.model.KernelReader``).

    Polls are incremental: the kernel puts the key of every entry that changed since the
    last poll into its ``changed`` map, and only those entries are read and decoded. The
    whole socket map is read on the first poll, and again whenever the kernel could not
    record a change (``changed`` full) or a finished socket's record was spilled (it left
    the socket map without a record telling user space).
    """

    def __init__(self, program: _Program, plan: BackendPlan, capacities: Capacities) -> None:
        self._program = program
        self._plan = plan
        self.backend = plan.name
        self.capacities = capacities
        self._lock = threading.Lock()
        self._closed = False
        fds = program.map_fds  # every handle and reader checks its map's sizes first
        self._socks = _BatchReader(fds["socks"], 8, SOCK_INFO_SIZE, capacities.sockets)
        self._entries = MapHandle(fds["socks"], 8, SOCK_INFO_SIZE)
        self._changes = _BatchReader(fds["changed"], 8, 1, capacities.sockets)
        self._finished: _FinishedRecords = (
            _ClosedRing(fds["closed_ring"], fds["closed_ends"], capacities.closed)
            if "closed_ring" in fds
            else _ClosedMap(fds["closed"], capacities.closed)
        )
        self._cpus = possible_cpus()
        self._counters = MapHandle(fds["counters"], 4, 8, cpus=self._cpus)
        self._per_cpu = struct.Struct(f"<{self._cpus}Q")
        self._round_table = MapHandle(fds["poll_round"], 4, 4)
        self._listeners = MapHandle(fds["listeners"], LISTENER_KEY.size, PROCESS_INFO.size)
        # without slots (kernels before 5.12) no entry names one: fold_slot reads nothing
        self._slot_table = (
            _SlotTable.mapped(fds["slots"], capacities.slots) if "slots" in fds else None
        )
        self._slot_view = self._slot_table.view if self._slot_table else memoryview(b"")
        self._round = 0
        self._seen_lost = self._seen_spilled = -1  # -1: the first poll reads everything
        self._samples: dict[int, SocketSample] = {}  # id -> last decoded sample (live)
        # keys to read again next poll: entries read in the round that marked them
        self._carried: set[int] = set()
        self._sequence = 0  # polls made (KernelPoll.sequence)
        self._gone: set[int] = set()  # ids a whole-map read no longer found
        self._report_all = False  # after a failed poll: every live socket is "changed"
        self._decoder = SampleDecoder()
        self._missed = LifecycleMisses()
        self._misses_unreadable = False
        self._drained: list[SocketSample] = []
        self._max_drained = 4 * capacities.closed
        self._closed_peak = 0  # most closed entries found by one drain
        self._stop_draining = threading.Event()
        self._drainer: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------
    def _decode_finished(self, raw: memoryview) -> list[SocketSample]:
        decode, samples = self._decoder.decode, self._samples  # callers hold self._lock
        stride = self._finished.stride
        return [decode(raw, samples, offset) for offset in range(0, len(raw), stride)]

    def _next_round(self) -> None:
        """Entries changed from now on are marked again (bpf/tcpacct.c mark_changed)."""
        self._round = (self._round + 1) & 0xFFFFFFFF
        self._round_table.update(U32.pack(0), U32.pack(self._round))

    def _read_counters(self) -> list[int]:
        """Each ``counters`` index summed over CPUs."""
        sums = []
        for index in range(C_COUNT):
            raw = self._counters.lookup(U32.pack(index))
            sums.append(sum(self._per_cpu.unpack(raw)) if raw else 0)
        return sums

    def _lifecycle_misses(self) -> int | None:
        """Events the kernel skipped the lifecycle primaries for (their twins handle those
        they see: C_LIFECYCLE_NESTED), read before the counters (LifecycleMisses). None
        when the kernel would not say: counting goes on, logged once."""
        fds = self._program.program_fds
        try:
            return sum(
                program_run_stats(fds[name]).recursion_misses
                for name in LIFECYCLE_PRIMARIES
                if name in fds
            )
        except OSError as error:
            if not self._misses_unreadable:
                log.warning("cannot read the lifecycle programs' recursion misses: %s", error)
                self._misses_unreadable = True
            return None

    def _read_entry(
        self,
        raw: bytearray | memoryview,
        offset: int,
        key: int,
        previous: Mapping[int, SocketSample],
    ) -> tuple[SocketSample, bool] | None:
        """The entry at ``offset`` of ``raw`` (socket map key ``key``), its slot folded in
        -> (its sample, whether it moved), as SampleDecoder.refresh; None when it was
        retired since the read (its final counts are being drained).

        An entry marked in the round this poll started was marked after the round began:
        a later change in the same round marks nothing, so its key is carried to the next
        poll (else bytes it moves after this read would wait for its next mark or close).
        """
        own = fold_slot(raw, offset, key, self._slot_view)
        if own is None:
            return None
        if changed_in(raw, offset) == self._round:
            self._carried.add(key)
        sample, moved = self._decoder.refresh(raw, previous, offset)
        sample.entry_sent, sample.entry_received = own
        return sample, moved

    def _read_everything(self) -> list[SocketSample]:
        """Every live entry, decoded; returns the ones that differ from the last poll."""
        raw_keys, raw = self._socks.read(delete=False)
        before = self._samples
        samples = {}
        changed = []
        keys = raw_keys.cast("B").cast("Q")
        for index in _in_slot_order(raw):
            read = self._read_entry(raw, index * SOCK_INFO_SIZE, keys[index], before)
            if read is None:
                continue
            sample, moved = read
            samples[sample.socket_id] = sample
            if moved:
                changed.append(sample)
        self._gone.update(before.keys() - samples.keys())  # less those finished: poll()
        self._samples = samples
        return changed

    def _read_changed(self, keys: set[int]) -> list[SocketSample]:
        """The entries at ``keys``: one lookup each, or one batch read of the whole map
        when so many changed that a batch read is cheaper."""
        samples = self._samples
        reads = []
        if len(keys) > max(1024, len(samples) // 8):
            raw_keys, raw = self._socks.read(delete=False)
            in_batch = raw_keys.cast("B").cast("Q")
            wanted = [index for index, key in enumerate(in_batch) if key in keys]
            for index in _in_slot_order(raw, wanted):
                reads.append(
                    self._read_entry(raw, index * SOCK_INFO_SIZE, in_batch[index], samples)
                )
        else:
            lookup = self._entries.lookup
            for key in keys:
                found = lookup(key.to_bytes(8, "little"))
                if found is not None:
                    reads.append(self._read_entry(bytearray(found), 0, key, samples))
        changed = [read[0] for read in reads if read is not None and read[1]]
        for sample in changed:
            samples[sample.socket_id] = sample
        return changed

    def poll(self) -> KernelPoll:
        """Counters, then live sockets, then sockets finished since the last poll (drained
        now, plus what :meth:`drain` took out of the closed map meanwhile).

        A poll that fails half way may have consumed change marks and updated samples in
        place without reporting them: the next one reads the whole map, reports every
        live socket as changed, and carries a new number (so accounting compares all)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("tracer is closed")
            try:
                return self._poll()
            except BaseException:
                self._seen_lost = -1
                self._report_all = True
                if self._slot_table is not None:
                    self._slot_table.forget()
                self._sequence += 1
                raise

    def _poll(self) -> KernelPoll:
        """One poll, with self._lock held."""
        misses = self._lifecycle_misses()
        sums = self._read_counters()
        missed = self._missed.confirmed(misses or 0, sums[C_LIFECYCLE_NESTED])
        counters = decode_counters(sums, missed)
        lost, spilled = sums[C_CHANGES_LOST], counters.spilled_sockets
        everything = (lost, spilled) != (self._seen_lost, self._seen_spilled)
        self._seen_lost, self._seen_spilled = lost, spilled
        self._next_round()
        raw_keys, _ = self._changes.read(delete=True)
        keys, self._carried = self._carried, set()
        if everything:
            changed = self._read_everything()
        else:
            keys.update(raw_keys.cast("B").cast("Q"))
            changed = self._read_changed(keys)
        # finished records leave the kernel map here: kept in _drained until this poll
        # has succeeded, so a failure below hands them to the next poll instead of losing them
        self._drained.extend(self._decode_finished(self._finished.take()))
        finished = self._drained
        samples = self._samples
        gone = self._gone
        for sample in finished:
            samples.pop(sample.socket_id, None)
            gone.discard(sample.socket_id)
        if self._slot_table is not None:
            # bytes counted in slots since the last poll (the kernel marked none of them)
            read = [(sample.sent_bytes, sample.received_bytes) for sample in changed]
            moved = self._slot_table.scan(samples)
            # An entry read this poll may have moved bytes since in its slot: the scan
            # returns exactly the samples whose counts it raised, so the ones whose counts
            # are as read are not among them (no set of the 100k moved ones needed).
            changed = [
                sample
                for sample, counts in zip(changed, read, strict=True)
                if (sample.sent_bytes, sample.received_bytes) == counts
            ]
            changed.extend(moved)
        if self._report_all:
            changed = list(samples.values())
        live = tuple(samples.values())
        for reader in (self._changes, self._socks, self._finished):
            reader.release()  # everything read is decoded into samples by now
        self._drained, self._gone, self._report_all = [], set(), False
        self._sequence += 1
        # by_id is a read-only view of the reader's own table (no copy of 200k entries per
        # poll): it holds until the next poll, which is all accounting needs of it.
        return KernelPoll(
            counters,
            live,
            tuple(finished),
            tuple(changed),
            types.MappingProxyType(samples),
            sequence=self._sequence,
            gone=tuple(gone),
        )

    def drain(self) -> int:
        """Move finished sockets' final counts out of the kernel's closed map into memory.

        Called every fraction of a second by :meth:`start_draining`, so the closed map's
        capacity bounds the closes per drain period rather than per report interval (or
        per slow poll). A finished socket is final: holding it until the next poll loses
        nothing, and it can never show up live again (the kernel removes it from the
        socket map before it enters the closed map).
        """
        with self._lock:
            if self._closed or len(self._drained) >= self._max_drained:
                # Accounting is behind: leave the rest in the kernel's closed map (past its
                # capacity the kernel spills them into counted totals) so memory stays bounded.
                return 0
            raw = self._finished.take()
            if not raw:
                return 0
            samples = self._decode_finished(raw)
            self._finished.release()
            self._drained.extend(samples)
            self._closed_peak = max(self._closed_peak, len(samples))
            return len(samples)

    def start_draining(self, period: float = DRAIN_PERIOD) -> None:
        def loop() -> None:
            while not self._stop_draining.wait(period):
                try:
                    self.drain()
                except Exception:
                    log.exception("draining the closed-socket map failed; the poll retries")

        self._drainer = threading.Thread(target=loop, name="closed-drain", daemon=True)
        self._drainer.start()

    def program_stats(self) -> dict[str, ProgramRunStats]:
        """The kernel's run counters of each loaded program, by function name (run time
        and count only while :func:`~agent.ebpf.syscalls.enable_run_time_stats` is on)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("tracer is closed")
            return {name: program_run_stats(fd) for name, fd in self._program.program_fds.items()}

    def map_usage(self) -> Mapping[str, tuple[int, int]]:
        return {
            "socks": (len(self._samples), self.capacities.sockets),
            "closed": (self._closed_peak, self.capacities.closed),
        }

    # -- set-up and tear-down ----------------------------------------------------------
    def seed_listeners(self, listeners: Iterable[ListeningSocket]) -> int:
        seeded = 0
        for listener in listeners:
            key = LISTENER_KEY.pack(listener.netns, encode_port(listener.port), 0)
            owner = PROCESS_INFO.pack(listener.pid, listener.comm.encode()[:15])
            try:
                self._listeners.update(key, owner)
                seeded += 1
            except OSError:  # map full: roles of old connections fall back to client
                log.warning("listener map full after %d listeners", seeded)
                break
        return seeded

    def detach_hooks(self) -> None:
        """Detach every hook, programs and maps staying loaded (the benchmark's agent-off);
        raw tracepoint hooks only."""
        self._program.detach(reversed(self._plan.hooks))

    def attach_hooks(self, without: Collection[str] = ()) -> None:
        """Attach again what :meth:`detach_hooks` detached; a hook whose tracepoint (or
        kernel function) or program is named in ``without`` stays detached (the benchmark's
        design variants: ``without=("inet_sock_set_state",)`` makes entries at a socket's
        first byte; ``without=("on_set_state_nested", "on_destroy_nested")`` leaves the
        lifecycle handlers' recursion twins out)."""
        self._program.attach(
            hook
            for hook in self._plan.hooks
            if hook.target not in without and hook.function not in without
        )

    def close(self) -> None:
        """Detach every program and free the maps; safe to call twice."""
        self._stop_draining.set()
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._slot_table is not None:
                self._slot_table.close()
            self._program.close()


def _cflags(plan: BackendPlan, btf: Btf, capacities: Capacities, bpf_dir: Path) -> list[str]:
    return [
        f"-I{bpf_dir}",
        f"-DMAX_SOCKETS={capacities.sockets}",
        f"-DMAX_CLOSED={capacities.closed}",
        f"-DMAX_LISTENERS={capacities.listeners}",
        *([f"-DSLOTS={capacities.slots}"] if plan.slots else []),
        *kernel_layout(btf).cflags(),
        *plan.cflags,
        "-Wno-macro-redefined",
    ]


def _compile_with_bcc(plan: BackendPlan, btf: Btf, capacities: Capacities, bpf_dir: Path) -> object:
    from bcc import BPF

    return BPF(src_file=str(bpf_dir / plan.source), cflags=_cflags(plan, btf, capacities, bpf_dir))


def _is_lifecycle(hook: Hook) -> bool:
    return hook.target in dict(LIFECYCLE_TRACEPOINTS)


def _attach_with_bcc(bpf: object, hooks: Iterable[Hook]) -> None:
    for hook in hooks:
        if hook.kind == "raw_tracepoint":
            bpf.attach_raw_tracepoint(tp=hook.target, fn_name=hook.function)  # type: ignore[attr-defined]
        elif hook.kind == "kprobe":
            bpf.attach_kprobe(event=hook.target, fn_name=hook.function)  # type: ignore[attr-defined]
        elif hook.kind == "kretprobe":
            # maxactive: enough return-probe instances for many threads blocked inside
            # tcp_sendmsg at once (a missed return would be a lost count). It makes bcc create
            # a legacy kprobe event named after this process, which a second tracer in the
            # same process cannot create again: then the kernel's default is used.
            try:
                bpf.attach_kretprobe(  # type: ignore[attr-defined]
                    event=hook.target, fn_name=hook.function, maxactive=64
                )
            except Exception:
                log.warning(
                    "kretprobe %s: maxactive=64 refused, using the kernel's default", hook.target
                )
                bpf.attach_kretprobe(event=hook.target, fn_name=hook.function)  # type: ignore[attr-defined]
        else:
            raise ValueError(f"unknown hook kind {hook.kind}")


def _bcc_version() -> str:
    """bcc's version file, found without importing bcc (a compile depends on it)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return "no bcc"
    try:
        return (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return spec.origin


def compiled_program(
    plan: BackendPlan,
    btf: Btf,
    capacities: Capacities,
    *,
    bpf_dir: Path = BPF_DIR,
    cache_dir: Path = COMPILE_CACHE,
    release: str = "",
    headers: str = "",
) -> CompiledProgram:
    """The backend's program from the compile cache, compiled by a child process when it
    is not there yet (or the cache directory is not writable: then into a temporary one)."""
    source = bpf_dir / plan.source
    cflags = _cflags(plan, btf, capacities, bpf_dir)
    functions = sorted({hook.function for hook in plan.hooks})
    key = cache_key(
        source.read_bytes(), cflags, release, headers, _bcc_version(), *functions, *_maps(plan)
    )
    path = cache_dir / f"{plan.name}-{key}.json"
    compiled = read_cached(path)
    if compiled is not None:
        return compiled
    if path.exists():
        log.warning(
            "compile cache %s not used (damaged, or writable by others than its owner): "
            "compiling again",
            path,
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tcpacct-bpf-") as scratch:
        out = path if writable else Path(scratch) / path.name
        if not writable:
            log.warning("compile cache %s is not writable: compiling for this run only", cache_dir)
        compile_in_child(source, cflags, functions, list(_maps(plan)), out)
        compiled = read_cached(out)
    if compiled is None:
        raise RuntimeError(f"the compiler left no readable program at {out}")
    log.info("compiled %s in %.2f s (cached as %s)", plan.source, time.monotonic() - started, out)
    return compiled


def _load(
    plan: BackendPlan,
    btf: Btf,
    capacities: Capacities,
    bpf_dir: Path,
    cache_dir: Path,
    release: str,
    headers: str,
) -> _Program:
    # Every tracepoint-backend program is a raw tracepoint, which bpf(2) attaches by name;
    # fentry programs need BTF ids and kprobes perf events, which bcc sets up.
    if plan.name == "tracepoint":
        compiled = compiled_program(
            plan,
            btf,
            capacities,
            bpf_dir=bpf_dir,
            cache_dir=cache_dir,
            release=release,
            headers=headers,
        )
        return LoadedProgram(compiled)
    return _BccProgram(_compile_with_bcc(plan, btf, capacities, bpf_dir), _maps(plan))


def open_tracer(
    backend: str = "auto",
    *,
    btf_path: Path = Path("/sys/kernel/btf/vmlinux"),
    capacities: Capacities = Capacities(),
    listeners: Callable[[], Iterable[ListeningSocket]] = lambda: (),
    bpf_dir: Path = BPF_DIR,
    sys_root: Path = Path("/sys"),
    release: str | None = None,
    compile_cache: Path = COMPILE_CACHE,
) -> KernelTracer:
    """Load and attach a backend; ``"auto"`` takes the first of BACKENDS that works here.

    ``listeners`` is called after the lifecycle hooks are attached (they record every later
    listen()) and before the byte hooks are, so no listener falls between the two.
    Raises BackendUnavailable naming, for each backend tried, what is missing.
    """
    release = release or os.uname().release
    btf = Btf.from_path(btf_path)
    headers = choose_headers(release)
    apply_headers(headers)
    candidates = BACKENDS if backend == "auto" else (backend,)
    reasons: list[str] = []
    for name in candidates:
        program: _Program | None = None
        try:
            plan = plan_backend(name, btf, release=release, sys_root=sys_root)
            program = _load(
                plan, btf, capacities, bpf_dir, compile_cache, release, str(headers.path)
            )
            program.attach(hook for hook in plan.hooks if _is_lifecycle(hook))
            tracer = KernelTracer(program, plan, capacities)
            tracer.seed_listeners(listeners())
            program.attach(hook for hook in plan.hooks if not _is_lifecycle(hook))
            log.info("backend %s attached (%s)", name, ", ".join(h.target for h in plan.hooks))
            return tracer
        except BackendUnavailable as error:
            reasons.append(str(error))
        except Exception as error:  # bcc raises bare Exception for load/attach failures
            reasons.append(f"backend {name}: {explain_load_error(name, error)}")
        if program is not None:
            with contextlib.suppress(Exception):
                program.close()
    if backend == "auto":
        raise BackendUnavailable("auto", "no backend works here:\n  " + "\n  ".join(reasons))
    raise BackendUnavailable(backend, reasons[0].split(": ", 1)[1] if reasons else "failed")


def compile_only(
    backend: str,
    *,
    btf_path: Path = Path("/sys/kernel/btf/vmlinux"),
    bpf_dir: Path = BPF_DIR,
    release: str | None = None,
) -> str:
    """Compile a backend's program without keeping it loaded (for `check` and tests).

    Returns "loaded", or the reason loading (not compiling) failed; raises on a compile error.
    fentry programs are loaded by bcc as part of compiling, so a refusal shows up here.
    """
    release = release or os.uname().release
    btf = Btf.from_path(btf_path)
    apply_headers(choose_headers(release))
    plan = plan_backend(backend, btf, release=release, for_attaching=False)
    try:
        bpf = _compile_with_bcc(
            plan, btf, Capacities(sockets=1024, closed=1024, listeners=64), bpf_dir
        )
    except Exception as error:
        if "Failed to compile" in str(error):
            raise
        return explain_load_error(backend, error)
    bpf.cleanup()
    return "loaded"


__all__ = [
    "Capacities",
    "KernelTracer",
    "compile_only",
    "decode_comm",
    "open_tracer",
]

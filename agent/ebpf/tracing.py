"""Load, attach, read and detach the BPF programs: the only module that imports bcc.

``open_tracer(...)`` picks a backend (the first of tracepoint, fentry, kprobe that loads and
attaches, or the one forced), compiles bpf/<backend>.c with BTF offsets as cflags, attaches
the lifecycle hooks, seeds the listening sockets, attaches the byte hooks and returns a
:class:`KernelTracer` whose ``poll()`` reads counters, live sockets and finished sockets, in
that order.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.ebpf.backends import (
    BACKENDS,
    BackendPlan,
    BackendUnavailable,
    explain_load_error,
    plan_backend,
)
from agent.ebpf.btf import Btf
from agent.ebpf.decoding import (
    C_CHANGES_LOST,
    C_COUNT,
    SampleDecoder,
    SockInfo,
    decode_comm,
    decode_counters,
    decode_raw,
    encode_port,
)
from agent.ebpf.headers import apply_headers, choose_headers
from agent.ebpf.offsets import kernel_layout
from agent.model import KernelPoll, ListeningSocket, SocketSample

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOCK_INFO_SIZE = ctypes.sizeof(SockInfo)  # 96


@dataclass(frozen=True, slots=True)
class Capacities:
    sockets: int = 65536
    closed: int = 65536
    listeners: int = 8192


class _BatchReader:
    """Reads a whole BPF hash map with BPF_MAP_LOOKUP[_AND_DELETE]_BATCH into buffers
    allocated once (bcc's own helper allocates per call and aliases its batch token)."""

    def __init__(
        self, lib: ctypes.CDLL, map_fd: int, key_size: int, value_size: int, capacity: int
    ) -> None:
        self._lib = lib
        self._fd = map_fd
        self._key_size = key_size
        self._value_size = value_size
        self._capacity = capacity
        self._keys = (ctypes.c_uint8 * (key_size * capacity))()
        self._values = (ctypes.c_uint8 * (value_size * capacity))()

    def read(self, *, delete: bool) -> tuple[memoryview, memoryview]:
        """Raw keys and values of every entry (deleted as read when ``delete``)."""
        call = self._lib.bpf_lookup_and_delete_batch if delete else self._lib.bpf_lookup_batch
        in_token, out_token, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
        total, first = 0, True
        while total < self._capacity:
            count.value = self._capacity - total
            result = call(
                self._fd,
                None if first else ctypes.byref(in_token),
                ctypes.byref(out_token),
                ctypes.byref(self._keys, self._key_size * total),
                ctypes.byref(self._values, self._value_size * total),
                ctypes.byref(count),
            )
            error = ctypes.get_errno()
            total += count.value
            if result != 0:
                if error == errno.ENOENT:
                    break  # the whole map was read
                if error == errno.ENOSPC and count.value == 0:
                    break  # a bucket larger than the space left: the rest next poll
                raise OSError(error, f"BPF map batch read failed: {os.strerror(error)}")
            in_token.value, first = out_token.value, False
        return (
            memoryview(self._keys)[: total * self._key_size],
            memoryview(self._values)[: total * self._value_size],
        )


class _EntryReader:
    """Looks up single ``socks`` entries by key into one buffer allocated once."""

    def __init__(self, lib: ctypes.CDLL, map_fd: int) -> None:
        self._lookup = lib.bpf_lookup_elem
        self._fd = map_fd
        self._key = ctypes.c_uint64(0)
        self._key_ref = ctypes.byref(self._key)
        self._value = (ctypes.c_uint8 * SOCK_INFO_SIZE)()

    def read(self, key: int) -> bytes | None:
        """The raw entry at ``key``, or None when there is none (the socket was retired)."""
        self._key.value = key
        if self._lookup(self._fd, self._key_ref, self._value) != 0:
            return None
        return bytes(self._value)


class KernelTracer:
    """The attached programs and their maps (implements ``agent.model.KernelReader``).

    Polls are incremental: the kernel puts the key of every entry that changed since the
    last poll into its ``changed`` map, and only those entries are read and decoded. The
    whole socket map is read on the first poll, and again whenever the kernel could not
    record a change (``changed`` full) or a finished socket's record was spilled (it left
    the socket map without a record telling user space).
    """

    def __init__(self, bpf: object, plan: BackendPlan, capacities: Capacities) -> None:
        from bcc import libbcc

        self._bpf = bpf
        self.backend = plan.name
        self.capacities = capacities
        self._lock = threading.Lock()
        self._closed = False
        lib = libbcc.lib
        self._socks = _BatchReader(lib, bpf["socks"].map_fd, 8, SOCK_INFO_SIZE, capacities.sockets)
        self._entries = _EntryReader(lib, bpf["socks"].map_fd)
        self._changes = _BatchReader(lib, bpf["changed"].map_fd, 8, 1, capacities.sockets)
        self._finished = _BatchReader(
            lib, bpf["closed"].map_fd, 8, SOCK_INFO_SIZE, capacities.closed
        )
        self._counters = bpf["counters"]
        self._round_table = bpf["poll_round"]
        self._round = 0
        self._seen_lost = self._seen_spilled = -1  # -1: the first poll reads everything
        self._full_reads = 0
        self._samples: dict[int, SocketSample] = {}  # id -> last decoded sample (live)
        self._decoder = SampleDecoder()
        self._drained: list[SocketSample] = []
        self._max_drained = 4 * capacities.closed
        self._closed_peak = 0  # most closed entries found by one drain
        self._stop_draining = threading.Event()
        self._drainer: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------
    def _decode_finished(self, raw: memoryview) -> list[SocketSample]:
        return [
            decode_raw(raw[offset : offset + SOCK_INFO_SIZE])
            for offset in range(0, len(raw), SOCK_INFO_SIZE)
        ]

    def _next_round(self) -> None:
        """Entries changed from now on are marked again (bpf/tcpacct.c mark_changed)."""
        self._round = (self._round + 1) & 0xFFFFFFFF
        self._round_table[ctypes.c_int(0)] = ctypes.c_uint32(self._round)

    def _read_everything(self) -> list[SocketSample]:
        """Every live entry, decoded; returns the ones that differ from the last poll."""
        _, raw = self._socks.read(delete=False)
        before = self._samples
        samples = {}
        changed = []
        decode = self._decoder.decode
        for offset in range(0, len(raw), SOCK_INFO_SIZE):
            sample = decode(raw[offset : offset + SOCK_INFO_SIZE], before)
            samples[sample.socket_id] = sample
            if before.get(sample.socket_id) != sample:
                changed.append(sample)
        self._samples = samples
        self._full_reads += 1
        return changed

    def _read_changed(self, keys: set[int]) -> list[SocketSample]:
        """The entries at ``keys``: one lookup each, or one batch read of the whole map
        when so many changed that a batch read is cheaper."""
        changed = []
        samples = self._samples
        decode = self._decoder.decode
        if len(keys) > max(1024, len(samples) // 8):
            raw_keys, raw = self._socks.read(delete=False)
            for index, key in enumerate(raw_keys.cast("B").cast("Q")):
                if key in keys:
                    offset = index * SOCK_INFO_SIZE
                    changed.append(decode(raw[offset : offset + SOCK_INFO_SIZE], samples))
        else:
            read = self._entries.read
            for key in keys:
                entry = read(key)
                if entry is not None:
                    changed.append(decode(entry, samples))
        for sample in changed:
            samples[sample.socket_id] = sample
        return changed

    def poll(self) -> KernelPoll:
        """Counters, then live sockets, then sockets finished since the last poll (drained
        now, plus what :meth:`drain` took out of the closed map meanwhile)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("tracer is closed")
            sums = [int(self._counters.sum(ctypes.c_int(i)).value) for i in range(C_COUNT)]
            counters = decode_counters(sums)
            lost, spilled = sums[C_CHANGES_LOST], counters.spilled_sockets
            everything = (lost, spilled) != (self._seen_lost, self._seen_spilled)
            self._seen_lost, self._seen_spilled = lost, spilled
            self._next_round()
            raw_keys, _ = self._changes.read(delete=True)
            if everything:
                changed = self._read_everything()
            else:
                changed = self._read_changed(set(raw_keys.cast("B").cast("Q")))
            finished = self._drained
            finished.extend(self._decode_finished(self._finished.read(delete=True)[1]))
            self._drained = []
            samples = self._samples
            for sample in finished:
                samples.pop(sample.socket_id, None)
            by_id = dict(samples)
        return KernelPoll(counters, tuple(by_id.values()), tuple(finished), tuple(changed), by_id)

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
            raw = self._finished.read(delete=True)[1]
            if not raw:
                return 0
            samples = self._decode_finished(raw)
            self._drained.extend(samples)
            self._closed_peak = max(self._closed_peak, len(samples))
            return len(samples)

    def start_draining(self, period: float = 0.25) -> None:
        def loop() -> None:
            while not self._stop_draining.wait(period):
                try:
                    self.drain()
                except Exception:
                    log.exception("draining the closed-socket map failed; the poll retries")

        self._drainer = threading.Thread(target=loop, name="closed-drain", daemon=True)
        self._drainer.start()

    def map_usage(self) -> Mapping[str, tuple[int, int]]:
        return {
            "socks": (len(self._samples), self.capacities.sockets),
            "closed": (self._closed_peak, self.capacities.closed),
        }

    # -- set-up and tear-down ----------------------------------------------------------
    def seed_listeners(self, listeners: Iterable[ListeningSocket]) -> int:
        table = self._bpf["listeners"]
        seeded = 0
        for listener in listeners:
            key = table.Key()
            key.netns = listener.netns
            key.port = encode_port(listener.port)
            value = table.Leaf()
            value.tgid = listener.pid
            value.comm = listener.comm.encode()[:15]
            try:
                table[key] = value
                seeded += 1
            except Exception:  # map full: roles of old connections fall back to client
                log.warning("listener map full after %d listeners", seeded)
                break
        return seeded

    def close(self) -> None:
        """Detach every program and free the maps; safe to call twice."""
        self._stop_draining.set()
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            bpf = self._bpf
            for _ in range(16):
                try:
                    bpf.cleanup()
                    return
                except Exception as error:
                    # bcc stops at the first probe it cannot remove, e.g. a legacy kprobe event
                    # that belongs to another tracer of this process (a name clash: the
                    # perf event of ours is closed by then). Skip it and go on with the rest.
                    log.warning("detaching: %s; going on with the rest", error)
                    for name in [name for name, fds in bpf.kprobe_fds.items() if not fds]:
                        del bpf.kprobe_fds[name]


def _compile(plan: BackendPlan, btf: Btf, capacities: Capacities, bpf_dir: Path) -> object:
    from bcc import BPF

    cflags = [
        f"-I{bpf_dir}",
        f"-DMAX_SOCKETS={capacities.sockets}",
        f"-DMAX_CLOSED={capacities.closed}",
        f"-DMAX_LISTENERS={capacities.listeners}",
        *kernel_layout(btf).cflags(),
        *plan.cflags,
        "-Wno-macro-redefined",
    ]
    return BPF(src_file=str(bpf_dir / plan.source), cflags=cflags)


def _attach(bpf: object, plan: BackendPlan, *, byte_hooks: bool) -> None:
    from bcc import BPF

    for hook in plan.hooks:
        is_lifecycle = hook.target in ("inet_sock_set_state", "tcp_destroy_sock")
        if is_lifecycle == byte_hooks:
            continue
        if hook.kind == "raw_tracepoint":
            bpf.attach_raw_tracepoint(tp=hook.target, fn_name=hook.function)
        elif hook.kind == "kprobe":
            bpf.attach_kprobe(event=hook.target, fn_name=hook.function)
        elif hook.kind == "kretprobe":
            # maxactive: enough return-probe instances for many threads blocked inside
            # tcp_sendmsg at once (a missed return would be a lost count). It makes bcc create
            # a legacy kprobe event named after this process, which a second tracer in the
            # same process cannot create again: then the kernel's default is used.
            try:
                bpf.attach_kretprobe(event=hook.target, fn_name=hook.function, maxactive=64)
            except Exception:
                log.warning(
                    "kretprobe %s: maxactive=64 refused, using the kernel's default", hook.target
                )
                bpf.attach_kretprobe(event=hook.target, fn_name=hook.function)
        else:
            raise ValueError(f"unknown hook kind {hook.kind}")
    del BPF


def open_tracer(
    backend: str = "auto",
    *,
    btf_path: Path = Path("/sys/kernel/btf/vmlinux"),
    capacities: Capacities = Capacities(),
    listeners: Callable[[], Iterable[ListeningSocket]] = lambda: (),
    bpf_dir: Path = BPF_DIR,
    sys_root: Path = Path("/sys"),
    release: str | None = None,
) -> KernelTracer:
    """Load and attach a backend; ``"auto"`` takes the first of BACKENDS that works here.

    ``listeners`` is called after the lifecycle hooks are attached (they record every later
    listen()) and before the byte hooks are, so no listener falls between the two.
    Raises BackendUnavailable naming, for each backend tried, what is missing.
    """
    release = release or os.uname().release
    btf = Btf.from_path(btf_path)
    apply_headers(choose_headers(release))
    candidates = BACKENDS if backend == "auto" else (backend,)
    reasons: list[str] = []
    for name in candidates:
        bpf = None
        try:
            plan = plan_backend(name, btf, release=release, sys_root=sys_root)
            bpf = _compile(plan, btf, capacities, bpf_dir)
            _attach(bpf, plan, byte_hooks=False)
            tracer = KernelTracer(bpf, plan, capacities)
            tracer.seed_listeners(listeners())
            _attach(bpf, plan, byte_hooks=True)
            log.info("backend %s attached (%s)", name, ", ".join(h.target for h in plan.hooks))
            return tracer
        except BackendUnavailable as error:
            reasons.append(str(error))
        except Exception as error:  # bcc raises bare Exception for load/attach failures
            reasons.append(f"backend {name}: {explain_load_error(name, error)}")
        if bpf is not None:
            with contextlib.suppress(Exception):
                bpf.cleanup()
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
        bpf = _compile(plan, btf, Capacities(sockets=1024, closed=1024, listeners=64), bpf_dir)
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

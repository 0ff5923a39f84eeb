"""Per-socket cumulative counts -> monotonic per-series totals.

Each poll brings every live socket's cumulative counters and the final counters of sockets
finished since the last poll. For each socket the accountant keeps the last cumulative value
it counted, adds the difference to the series the connection belongs to, and forgets the
socket after its final read (style.md #5). Totals only grow: a closed socket's bytes stay
counted.

Invariants (tested in tests/unit/test_accounting.py and, against the kernel, in
tests/privileged):

- every byte the kernel counted is added exactly once, to the series of its connection, or
  to ``unattributed`` when the kernel could not keep the socket;
- a socket that cannot be named yet (its peer or pod not known this poll) is held back, not
  dropped: its counters are cumulative, so the next poll adds everything since the last one;
- a socket the kernel had to spill (closed map full) vanishes from both maps; after two polls
  it is declared spilled and what was already counted for it is subtracted from the kernel's
  spilled total, leaving exactly the uncounted rest as unattributed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from agent.memo import BoundedMemo
from agent.model import (
    ConnectionAttributes,
    Enricher,
    KernelPoll,
    MetricCatalogue,
    MetricDefinition,
    Role,
    SeriesKey,
    SocketFlag,
    SocketSample,
    ValueSource,
)

log = logging.getLogger(__name__)

MISSING_POLLS_BEFORE_SPILLED = 2
# Applies in a row a finished socket's naming may raise in before its bytes are counted
# unattributed (its open and close uncounted): one bad record must not stop accounting.
NAMING_ATTEMPTS = 3
TOMBSTONE_POLLS = 16
OVERFLOW = "~other"
_OPENED, _CLOSED = SocketFlag.OPENED.value, SocketFlag.CLOSED.value
_ESTABLISHED = SocketFlag.OPENED.value | SocketFlag.PREEXISTING.value
# What a series counts, as an index into the per-socket amounts of _count.
_SOURCES = {
    ValueSource.RECEIVED_BYTES: 0,
    ValueSource.SENT_BYTES: 1,
    ValueSource.CONNECTIONS_OPENED: 2,
    ValueSource.CONNECTIONS_CLOSED: 3,
}
_CLOSES = _SOURCES[ValueSource.CONNECTIONS_CLOSED]
_SERVER = Role.SERVER
_FourTuple = tuple[str, int, str, int]  # local address, port, remote address, port


@dataclass(slots=True)
class _Tracked:
    """What the accountant remembers of one socket (one per live socket: kept small)."""

    sent: int = 0  # last cumulative counts added to totals
    received: int = 0
    counted: int = 0  # the _OPENED/_CLOSED events already counted
    waited: int = 0  # polls held back waiting for a name
    series: tuple[tuple[SeriesKey, int], ...] | None = None  # (series, _SOURCES index)
    attributes: ConnectionAttributes | None = None
    # the newest sample (the one in the peer index); while ``series`` is None, the one
    # whose bytes are held back
    last_seen: SocketSample | None = None


@dataclass(frozen=True, slots=True)
class FamilySnapshot:
    """One metric's series at a moment: what the exporter turns into a metric family."""

    name: str
    help: str
    label_names: tuple[str, ...]
    samples: dict[tuple[str, ...], int]


@dataclass(frozen=True, slots=True)
class AccountingStats:
    tracked_sockets: int
    held_back_sockets: int
    unattributed_sent_bytes: int
    unattributed_received_bytes: int
    untracked_sockets: int
    spilled_sockets: int
    series: int
    overflowed_connections: int = 0
    expired_series: int = 0
    lifecycle_events_missed: int = 0


class _Peers:
    """Sockets by (local, remote), to find the other end of a local connection.

    ``peer_of(client 127.0.0.1:5000 -> 127.0.0.1:80)`` -> the server socket
    ``127.0.0.1:80 -> 127.0.0.1:5000`` (preferring one in the same network namespace).
    Kept up to date across polls (only new and changed sockets are put, finished and
    vanished ones removed), so a poll that names a few new sockets does not re-index all.
    """

    def __init__(self, *groups: Iterable[SocketSample]) -> None:
        # Almost every 4-tuple has one socket: a lone sample is stored as itself, several
        # (the same tuple in different network namespaces) as a tuple of samples. Keys are
        # flat (address, port, address, port) tuples: hashed in C, no Endpoint.__hash__.
        self._by_tuple: dict[_FourTuple, SocketSample | tuple[SocketSample, ...]] = {}
        for group in groups:
            for sample in group:
                self.put(sample)

    def _all(self, key: _FourTuple) -> tuple[SocketSample, ...]:
        found = self._by_tuple.get(key)
        if found is None:
            return ()
        return found if isinstance(found, tuple) else (found,)

    def put(self, sample: SocketSample) -> None:
        local, remote = sample.local, sample.remote
        key = (local.address, local.port, remote.address, remote.port)
        found = self._by_tuple.get(key)
        if found is None or (not isinstance(found, tuple) and found.socket_id == sample.socket_id):
            self._by_tuple[key] = sample
            return
        others = tuple(s for s in self._all(key) if s.socket_id != sample.socket_id)
        self._by_tuple[key] = (*others, sample)

    def remove(self, sample: SocketSample) -> None:
        local, remote = sample.local, sample.remote
        key = (local.address, local.port, remote.address, remote.port)
        found = self._by_tuple.get(key)
        if found is None:
            return
        if not isinstance(found, tuple):
            if found.socket_id == sample.socket_id:
                del self._by_tuple[key]
            return
        rest = tuple(s for s in found if s.socket_id != sample.socket_id)
        if not rest:
            del self._by_tuple[key]
        else:
            self._by_tuple[key] = rest[0] if len(rest) == 1 else rest

    def peer_of(self, sample: SocketSample) -> SocketSample | None:
        local, remote = sample.local, sample.remote
        found = self._by_tuple.get((remote.address, remote.port, local.address, local.port))
        if found is None:
            return None
        if not isinstance(found, tuple):
            return found if found.socket_id != sample.socket_id else None
        others = [c for c in found if c.socket_id != sample.socket_id]
        for candidate in others:
            if candidate.netns == sample.netns:
                return candidate
        return others[0] if others else None


@dataclass
class _Unattributed:
    """Bytes the kernel counted but could not leave on a socket entry."""

    spilled_baseline_sent: int = 0  # already counted for sockets later declared spilled
    spilled_baseline_received: int = 0
    missing_sent: int = 0  # already counted for sockets absent now, not yet declared spilled
    missing_received: int = 0
    exported_sent: int = 0  # monotonic view
    exported_received: int = 0
    tombstones: dict[int, tuple[_Tracked, int]] = field(default_factory=dict)


class Accountant:
    """Folds kernel polls into series totals. Thread-safe: one poller, many readers."""

    def __init__(
        self,
        catalogue: MetricCatalogue,
        enricher: Enricher,
        *,
        max_wait_polls: int = 3,
        max_series: int | None = None,
        series_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_series``: past it, a new label set folds into the metric's ``~other`` series.
        ``series_ttl``: a series no live connection feeds and that has not moved for this
        long expires (the workload is gone)."""
        self._catalogue = catalogue
        self._enricher = enricher
        self._max_wait = max_wait_polls
        self._max_series = max_series
        self._series_ttl = series_ttl
        self._clock = clock
        self._touched: dict[SeriesKey, float] = {}
        self._now = clock()
        # id(series tuple) -> [received, sent, opened, closed (the _SOURCES order), series]
        self._moved: dict[int, list[Any]] = {}
        self._evaluated: BoundedMemo[object, tuple[tuple[SeriesKey, ValueSource], ...]] = (
            BoundedMemo(65536)
        )
        # evaluated series (by identity) -> their admission; cleared when a series goes
        self._admitted: BoundedMemo[
            int, tuple[tuple[tuple[SeriesKey, ValueSource], ...], tuple[tuple[SeriesKey, int], ...]]
        ] = BoundedMemo(65536)
        # finished sockets named by the enricher's naming key (see _series_by_naming_key)
        self._naming_key = _naming_key_of(enricher, catalogue)
        self._named: BoundedMemo[Hashable, tuple[tuple[SeriesKey, int], ...]] = BoundedMemo(65536)
        self._overflowed = 0
        self._expired = 0
        self._last_expiry = clock()
        self._published: tuple[dict[SeriesKey, int], tuple[MetricDefinition, ...]] = (
            {},
            tuple(catalogue.definitions()),
        )
        self._published_stats = AccountingStats(0, 0, 0, 0, 0, 0, 0)
        self._lock = threading.Lock()
        self._tracked: dict[int, _Tracked] = {}
        self._held: set[int] = set()  # tracked ids waiting for a name
        self._peers = _Peers()
        self._missing: dict[int, int] = {}  # tracked ids absent from both maps: for how long
        self._totals: dict[SeriesKey, int] = {}
        self._unattributed = _Unattributed()
        self._kernel_untracked = (0, 0, 0)  # sent, received, sockets
        self._kernel_spilled_sockets = 0
        self._lifecycle_missed = 0  # KernelCounters.lifecycle_events_missed, highest seen
        self._polls = 0
        self._last_sequence = -1  # KernelPoll.sequence of the last poll applied
        # Finished records whose naming raised, with their peers (already counted, in
        # _unapplied_counted): the next apply takes them first. Attempts so far, by id.
        self._unapplied: tuple[SocketSample, ...] = ()
        self._unapplied_counted: frozenset[int] = frozenset()
        self._naming_failures: dict[int, int] = {}
        self._vanished_naming_failures: dict[int, int] = {}  # spilled sockets' namings, by id
        self._unnamed_sent = self._unnamed_received = 0  # bytes of records given up on

    # -- folding -------------------------------------------------------------------------
    def apply(self, poll: KernelPoll) -> None:
        with self._lock:
            self._polls += 1
            self._now = self._clock()  # when the series this poll moves were last touched
            peers = self._peers
            # An incremental poll that follows the one this accountant saw last says what
            # entered and left live; otherwise the whole live set is compared.
            follows = poll.sequence > 0 and poll.sequence == self._last_sequence + 1
            self._last_sequence = -1  # until this poll is applied whole (see the end)
            vanish_candidates: AbstractSet[int] | None = None  # None: any tracked socket
            if poll.changed is None:
                todo: list[SocketSample] = list(poll.live)
                live_ids: AbstractSet[int] = {sample.socket_id for sample in poll.live}
            else:
                by_id = poll.by_id if poll.by_id is not None else poll.live_by_id()
                live_ids = by_id.keys()
                # what changed, what this accountant has not seen yet, what waits for a name
                if follows:  # every socket new to live is in changed
                    pending = {sid for sid in self._held if sid in by_id}
                    vanish_candidates = {*poll.gone, *self._missing}
                else:
                    pending = (live_ids - self._tracked.keys()) | (self._held & live_ids)
                if pending:  # usually none: no 100k-id set for a busy poll
                    pending -= {sample.socket_id for sample in poll.changed}
                todo = [*poll.changed, *(by_id[sid] for sid in pending)]
            # The index holds each socket's newest sample (no older copy stays alive); a
            # sample the reader updated in place (only its counters moved) is already there
            todo = self._count_moved_bytes(todo)
            tracked = self._tracked
            for sample in todo:
                known = tracked.get(sample.socket_id)
                if known is None or known.last_seen is not sample:
                    peers.put(sample)
            # A finished record leaves the kernel once: one whose naming raised comes
            # again here (with its peer, so that it is named as it would have been).
            finished, counted_before = poll.finished, self._unapplied_counted
            if self._unapplied:
                finished = (*self._unapplied, *finished)
                self._unapplied, self._unapplied_counted = (), frozenset()
            for sample in finished:
                peers.put(sample)
            finished_ids = set()
            failed: list[tuple[SocketSample, Exception]] = []
            try:
                try:
                    for sample in todo:
                        self._advance(sample, peers, final=False)
                except BaseException:  # nothing finished is counted yet: all come again
                    self._unapplied, self._unapplied_counted = finished, counted_before
                    raise
                to_count = finished
                if counted_before:  # peers carried with a failed one: counted already
                    to_count = [s for s in finished if s.socket_id not in counted_before]
                for sample in self._count_unseen_finished(to_count, peers, failed):
                    finished_ids.add(sample.socket_id)
                    try:
                        self._advance(sample, peers, final=True)
                    except Exception as error:
                        failed.append((sample, error))
                if failed:
                    self._carry(failed, finished, peers)
                else:
                    self._naming_failures.clear()
            finally:
                for sample in finished:
                    peers.remove(sample)
            self._notice_vanished(live_ids, finished_ids, vanish_candidates, failed)
            self._add_moved()
            self._fold_kernel_counters(poll)
            self._expire_idle_series()
            self._publish()
            self._last_sequence = poll.sequence
            if failed:  # counted all it could; the pipeline logs and counts the error
                sample, error = failed[0]
                error.add_note(
                    f"naming {len(failed)} finished or spilled socket(s) failed, the first "
                    f"socket {sample.socket_id}: they are counted when a later poll names them"
                )
                raise error

    def _carry(
        self,
        failed: list[tuple[SocketSample, Exception]],
        finished: Iterable[SocketSample],
        peers: _Peers,
    ) -> None:
        """Finished records whose naming raised, for the next apply, with their peers
        among this apply's finished records (counted already: only peers there); one that
        failed :data:`NAMING_ATTEMPTS` applies in a row is given up on, its bytes counted
        unattributed (and exported so)."""
        finished_ids = {sample.socket_id for sample in finished}
        attempts: dict[int, int] = {}
        carried: dict[int, SocketSample] = {}  # by id: a failed socket may be another's peer
        for sample, _ in failed:
            sid = sample.socket_id
            tries = self._naming_failures.get(sid, 0) + 1
            if tries >= NAMING_ATTEMPTS:
                self._give_up_naming(sample)
                continue
            attempts[sid] = tries
            carried[sid] = sample
            peer = peers.peer_of(sample)  # a live one stays in the index by itself
            if peer is not None and peer.socket_id in finished_ids:
                carried.setdefault(peer.socket_id, peer)
        self._naming_failures = attempts
        self._unapplied = tuple(carried.values())
        self._unapplied_counted = frozenset(sid for sid in carried if sid not in attempts)

    def _give_up_naming(self, sample: SocketSample) -> None:
        sid = sample.socket_id
        tracked = self._tracked.pop(sid, None)
        self._held.discard(sid)
        self._missing.pop(sid, None)
        if tracked is not None and tracked.last_seen is not None:
            self._peers.remove(tracked.last_seen)
        self._unnamed_sent += max(0, sample.sent_bytes - (tracked.sent if tracked else 0))
        self._unnamed_received += max(
            0, sample.received_bytes - (tracked.received if tracked else 0)
        )
        log.warning(
            "socket %d could not be named in %d polls: its %d bytes sent and %d received are "
            "counted unattributed", sid, NAMING_ATTEMPTS, sample.sent_bytes, sample.received_bytes,
        )  # fmt: skip

    def _advance(self, sample: SocketSample, peers: _Peers, *, final: bool) -> None:
        sid = sample.socket_id
        tracked = self._tracked.get(sid)
        if tracked is None:
            tracked = self._revive(sid) or _Tracked()
            self._tracked[sid] = tracked
        last = tracked.last_seen
        if (
            last is not None
            and last is not sample
            and (last.local != sample.local or last.remote != sample.remote)
        ):
            self._peers.remove(last)  # its tuple became known at ESTABLISHED
        tracked.last_seen = sample
        if tracked.series is None and final and self._naming_key is not None:
            self._held.add(sid)  # until named: if naming raises, the next poll asks again
            tracked.series = self._series_by_naming_key(sample, peers)
            if tracked.series is not None:
                self._held.discard(sid)
        if tracked.series is None:
            # held until named: if naming raises, the next poll asks again
            self._held.add(sid)
            must_answer = final or tracked.waited >= self._max_wait
            attributes = self._enricher.attributes(sample, peers, final=must_answer)
            if attributes is None:
                tracked.waited += 1  # cumulative counters: nothing is lost by waiting
                if not final:
                    return
                attributes = self._enricher.attributes(sample, peers, final=True)
            if attributes is None:
                raise RuntimeError("enricher returned None for a final sample")
            tracked.attributes = attributes
            self._held.discard(sid)
            tracked.series = self._admit(self._series_for(attributes))
        self._count(tracked, sample)
        if final:
            del self._tracked[sid]
            self._missing.pop(sid, None)

    def _count_moved_bytes(self, samples: list[SocketSample]) -> list[SocketSample]:
        """Count the samples that are the same objects this accountant last counted, of
        named sockets - the reader updated only their counters in place, so only bytes can
        have moved (their open/close events were counted with the same flags) - and return
        the rest for :meth:`_advance`. What :meth:`_count` does for bytes, inline: a busy
        poll of 100k sockets runs this loop 100k times."""
        rest = []
        tracked, moved_by_series = self._tracked, self._moved
        for sample in samples:
            known = tracked.get(sample.socket_id)
            if known is None or known.last_seen is not sample or known.series is None:
                rest.append(sample)
                continue
            sent = sample.sent_bytes - known.sent
            received = sample.received_bytes - known.received
            if sent < 0:  # never let a (torn) smaller read make a total go down
                sent = 0
            else:
                known.sent = sample.sent_bytes
            if received < 0:
                received = 0
            else:
                known.received = sample.received_bytes
            if not (sent or received):
                continue
            series = known.series
            moved = moved_by_series.get(id(series))
            if moved is None:
                moved = moved_by_series[id(series)] = [0, 0, 0, 0, series]
            if sample.role is _SERVER:  # Istio direction: received = client -> server
                moved[0] += received
                moved[1] += sent
            else:
                moved[0] += sent
                moved[1] += received
        return rest

    def _count_unseen_finished(
        self,
        finished: Iterable[SocketSample],
        peers: _Peers,
        failed: list[tuple[SocketSample, Exception]],
    ) -> list[SocketSample]:
        """Count the finished sockets this accountant never saw live - opened and closed
        between two polls, as every connection of a churn - that have a naming key, and
        return the rest for :meth:`_advance`. What ``_advance(final=True)`` does for them,
        without the record it would make and drop: all their bytes, their open (when
        OPENED) and their close (when CLOSED after an open or PREEXISTING) go to their
        key's series, named here by the first socket that has the key (the first poll of
        a new server's churn holds thousands with one key). A churn of 10k connections/s
        runs this loop 20k times a second."""
        if self._naming_key is None:
            return list(finished)
        rest = []
        tracked, tombstones = self._tracked, self._unattributed.tombstones
        naming_key, named, move = self._naming_key, self._named, self._move
        for sample in finished:
            sid = sample.socket_id
            if sid in tracked or sid in tombstones:
                rest.append(sample)
                continue
            try:
                key = naming_key(sample, peers)
                if key is None:  # named the usual way, by its attributes
                    rest.append(sample)
                    continue
                series = named.get(key)
                if series is None:
                    series = self._name_key(key, sample, peers)
            except Exception as error:  # counted when a later apply names it
                failed.append((sample, error))
                continue
            flags = int(sample.flags)
            opened = 1 if flags & _OPENED else 0
            closed = 1 if flags & _CLOSED and flags & _ESTABLISHED else 0
            sent, received = sample.sent_bytes, sample.received_bytes
            if sent or received or opened or closed:
                move(series, sample.role, sent, received, opened, closed)
        return rest

    def _series_by_naming_key(
        self, sample: SocketSample, peers: _Peers
    ) -> tuple[tuple[SeriesKey, int], ...] | None:
        """A finished socket's series by its naming key, without making its attributes
        when an earlier socket had the same key (a churn of short connections between the
        same workloads differs only in ephemeral ports, which no definition reads here).
        None when the enricher has no key for it yet: then it is named the usual way."""
        assert self._naming_key is not None
        key = self._naming_key(sample, peers)
        if key is None:
            return None
        series = self._named.get(key)
        if series is None:
            series = self._name_key(key, sample, peers)
        return series

    def _name_key(
        self, key: Hashable, sample: SocketSample, peers: _Peers
    ) -> tuple[tuple[SeriesKey, int], ...]:
        """The series of a finished socket whose naming key has none yet, from its
        attributes; kept for the key's later sockets."""
        attributes = self._enricher.attributes(sample, peers, final=True)
        if attributes is None:
            raise RuntimeError("enricher returned None for a final sample")
        return self._named.keep(key, self._admit(self._series_for(attributes)))

    def _count(self, tracked: _Tracked, sample: SocketSample) -> None:
        sent = sample.sent_bytes - tracked.sent
        received = sample.received_bytes - tracked.received
        if sent < 0:  # never let a (torn) smaller read make a total go down
            sent = 0
        else:
            tracked.sent = sample.sent_bytes
        if received < 0:
            received = 0
        else:
            tracked.received = sample.received_bytes
        flags = int(sample.flags)
        counted = tracked.counted
        opened = 1 if flags & _OPENED and not counted & _OPENED else 0
        closed = 1 if flags & _CLOSED and flags & _ESTABLISHED and not counted & _CLOSED else 0
        if not (sent or received or opened or closed):
            return
        assert tracked.series is not None
        if opened or closed:
            tracked.counted = counted | (_OPENED if opened else 0) | (_CLOSED if closed else 0)
        self._move(tracked.series, sample.role, sent, received, opened, closed)

    def _move(
        self,
        series: tuple[tuple[SeriesKey, int], ...],
        role: Role,
        sent: int,
        received: int,
        opened: int,
        closed: int,
    ) -> None:
        """Add what a socket moved to its series' amounts for this poll: summed per series
        tuple (the connections of one label set share it) and added to the totals once per
        poll by :meth:`_add_moved`. A server's ``received`` is the client -> server
        direction, Istio's ``received``: a client that sent 5 and a server that received
        5 both add 5 to ``[0]``."""
        moved = self._moved.get(id(series))
        if moved is None:
            moved = self._moved[id(series)] = [0, 0, 0, 0, series]
        if role is _SERVER:
            moved[0] += received
            moved[1] += sent
        else:
            moved[0] += sent
            moved[1] += received
        moved[2] += opened
        moved[3] += closed

    def _add_moved(self) -> None:
        """What this poll's sockets moved, into the totals: once per series tuple."""
        totals, touched, now = self._totals, self._touched, self._now
        for *amounts, series in self._moved.values():
            for key, source in series:
                amount = amounts[source]
                if amount:
                    totals[key] = totals.get(key, 0) + amount
                    touched[key] = now
        self._moved.clear()

    def _admit(
        self, series: tuple[tuple[SeriesKey, ValueSource], ...]
    ) -> tuple[tuple[SeriesKey, int], ...]:
        """A connection's series: the evaluated ones, admitted once per evaluation (a
        connection like an earlier one reuses its admission while every series exists)."""
        hit = self._admitted.get(id(series))
        if hit is not None and hit[0] is series:
            return hit[1]
        admitted = self._admit_new(series)
        self._admitted.keep(id(series), (series, admitted))  # keeps `series` alive: ids unique
        return admitted

    def _admit_new(
        self, series: tuple[tuple[SeriesKey, ValueSource], ...]
    ) -> tuple[tuple[SeriesKey, int], ...]:
        """Create a connection's series, folding new label sets past the budget into
        ``~other``; existing series are always reused."""
        now = self._clock()
        admitted = []
        overflowed = False
        for key, source in series:
            if (
                key not in self._totals
                and self._max_series is not None
                and len(self._totals) >= self._max_series
            ):
                key = SeriesKey(key.metric, (OVERFLOW,) * len(key.labels))
                overflowed = True
            if key not in self._totals:
                self._totals[key] = 0
                self._touched[key] = now
            admitted.append((key, _SOURCES[source]))
        self._overflowed += overflowed
        return tuple(admitted)

    def _expire_idle_series(self) -> None:
        if self._series_ttl is None:
            return
        now = self._clock()
        if now - self._last_expiry < min(60.0, self._series_ttl / 4):
            return
        self._last_expiry = now
        fed = {key for t in self._tracked.values() if t.series for key, _ in t.series}
        for key, touched in list(self._touched.items()):
            if now - touched > self._series_ttl and key not in fed:
                del self._touched[key]
                self._totals.pop(key, None)
                self._expired += 1
                self._admitted.clear()
                self._named.clear()

    def _series_for(
        self, attributes: ConnectionAttributes
    ) -> tuple[tuple[SeriesKey, ValueSource], ...]:
        """Evaluated once per distinct label-relevant attributes (the catalogue says which),
        not per connection and never per byte."""
        key_of = getattr(self._catalogue, "evaluation_key", None)
        key = key_of(attributes) if key_of is not None else attributes
        cached = self._evaluated.get(key)
        if cached is not None:
            return cached
        out = []
        for definition in self._catalogue.definitions():
            labels = definition.evaluate(attributes)
            if labels is not None:
                out.append((SeriesKey(definition.name, labels), definition.value))
        return self._evaluated.keep(key, tuple(out))

    def _notice_vanished(
        self,
        live_ids: AbstractSet[int],
        finished_ids: set[int],
        candidates: AbstractSet[int] | None,
        failed: list[tuple[SocketSample, Exception]],
    ) -> None:
        """Sockets gone from both maps: the kernel spilled their close (closed map full).

        ``candidates``: the only tracked sockets that can be absent (what the reader said
        left live, and those already missing); None: any tracked socket. A held-back
        socket is named when it is declared spilled; a naming that raises is appended to
        ``failed`` and the socket stays missing, to be named by the next poll (after
        :data:`NAMING_ATTEMPTS` its bytes stay unattributed, as the kernel counted them)."""
        unattributed = self._unattributed
        unattributed.missing_sent = unattributed.missing_received = 0
        if candidates is None:
            absent = self._tracked.keys() - live_ids - finished_ids
        else:
            tracked = self._tracked
            absent = {
                sid
                for sid in candidates
                if sid in tracked and sid not in live_ids and sid not in finished_ids
            }
        self._missing = {sid: self._missing.get(sid, 0) + 1 for sid in absent}
        for sid, polls in list(self._missing.items()):
            tracked = self._tracked[sid]
            if polls < MISSING_POLLS_BEFORE_SPILLED:
                # Its spill may already be in the kernel counters read this poll: what was
                # counted for it must not be exported as unattributed meanwhile.
                # (A socket still held back will be named and counted up to its last sample.)
                last = tracked.last_seen if tracked.series is None else None
                unattributed.missing_sent += last.sent_bytes if last else tracked.sent
                unattributed.missing_received += last.received_bytes if last else tracked.received
                continue
            last = tracked.last_seen
            attributes = None
            if tracked.series is None and last is not None:
                # held back when it vanished: name it now from what was last seen of it
                try:
                    attributes = self._enricher.attributes(last, _Peers(), final=True)
                except Exception as error:
                    failed.append((last, error))
                    tries = self._vanished_naming_failures.get(sid, 0) + 1
                    if tries < NAMING_ATTEMPTS:  # stays missing: named again next poll
                        self._vanished_naming_failures[sid] = tries
                        unattributed.missing_sent += last.sent_bytes
                        unattributed.missing_received += last.received_bytes
                        continue
                    log.warning(
                        "socket %d (its close spilled) could not be named in %d polls: its "
                        "bytes stay counted unattributed", sid, NAMING_ATTEMPTS,
                    )  # fmt: skip
            self._vanished_naming_failures.pop(sid, None)
            del self._tracked[sid]
            del self._missing[sid]
            self._held.discard(sid)
            if last is not None:
                self._peers.remove(last)
            if attributes is not None:
                tracked.attributes = attributes
                tracked.series = self._admit(self._series_for(attributes))
                self._count(tracked, last)
            unattributed.spilled_baseline_sent += tracked.sent
            unattributed.spilled_baseline_received += tracked.received
            unattributed.tombstones[sid] = (tracked, self._polls)
            was_connection = last is not None and last.flags.value & _ESTABLISHED
            if tracked.series is not None and was_connection and not tracked.counted & _CLOSED:
                for key, source in tracked.series:
                    if source == _CLOSES:
                        self._totals[key] = self._totals.get(key, 0) + 1
                tracked.counted |= _CLOSED
        expired = [
            sid
            for sid, (_, when) in unattributed.tombstones.items()
            if self._polls - when > TOMBSTONE_POLLS
        ]
        for sid in expired:
            del unattributed.tombstones[sid]
        if self._vanished_naming_failures:  # revived meanwhile: nothing to retry
            missing = self._missing
            self._vanished_naming_failures = {
                sid: tries for sid, tries in self._vanished_naming_failures.items()
                if sid in missing
            }  # fmt: skip

    def _revive(self, sid: int) -> _Tracked | None:
        """A socket declared spilled shows up after all: undo the declaration."""
        entry = self._unattributed.tombstones.pop(sid, None)
        if entry is None:
            return None
        tracked, _ = entry
        self._unattributed.spilled_baseline_sent -= tracked.sent
        self._unattributed.spilled_baseline_received -= tracked.received
        return tracked

    def _fold_kernel_counters(self, poll: KernelPoll) -> None:
        c, u = poll.counters, self._unattributed
        counted_sent = u.spilled_baseline_sent + u.missing_sent
        counted_received = u.spilled_baseline_received + u.missing_received
        sent = c.untracked_sent_bytes + max(0, c.spilled_sent_bytes - counted_sent)
        received = c.untracked_received_bytes + max(0, c.spilled_received_bytes - counted_received)
        sent += self._unnamed_sent  # finished sockets no naming could name (_give_up_naming)
        received += self._unnamed_received
        u.exported_sent = max(u.exported_sent, sent)
        u.exported_received = max(u.exported_received, received)
        self._kernel_untracked = (
            c.untracked_sent_bytes,
            c.untracked_received_bytes,
            c.untracked_sockets,
        )
        # a counter: a twin's catch-up read between the two kernel reads may lower one poll's
        self._lifecycle_missed = max(self._lifecycle_missed, c.lifecycle_events_missed)
        self._kernel_spilled_sockets = c.spilled_sockets

    # -- reloading -------------------------------------------------------------------------
    def replace_catalogue(self, catalogue: MetricCatalogue) -> None:
        """Switch metric definitions. Totals of metrics whose definition is unchanged are
        kept; series of removed metrics disappear; live connections are re-evaluated and
        count into the new series from their next bytes on (nothing counted is lost)."""
        with self._lock:
            old = {_fingerprint(d): d.name for d in self._catalogue.definitions()}
            kept_names = {d.name for d in catalogue.definitions() if _fingerprint(d) in old}
            self._catalogue = catalogue
            self._naming_key = _naming_key_of(self._enricher, catalogue)
            self._evaluated.clear()
            self._admitted.clear()
            self._named.clear()
            self._totals = {k: v for k, v in self._totals.items() if k.metric in kept_names}
            self._touched = {k: v for k, v in self._touched.items() if k in self._totals}
            reviving = [tracked for tracked, _ in self._unattributed.tombstones.values()]
            for tracked in [*self._tracked.values(), *reviving]:
                if tracked.attributes is not None:
                    tracked.series = self._admit(self._series_for(tracked.attributes))
            self._publish()

    # -- reading -----------------------------------------------------------------------------
    def families(self) -> list[FamilySnapshot]:
        """The totals as of the last poll. Never waits for a poll in progress: a scrape
        reads the snapshot the last poll published."""
        totals, definitions = self._published
        by_metric: dict[str, dict[tuple[str, ...], int]] = {}
        for key, value in totals.items():
            by_metric.setdefault(key.metric, {})[key.labels] = value
        return [
            FamilySnapshot(d.name, d.help, d.label_names, by_metric.get(d.name, {}))
            for d in definitions
        ]

    def _publish(self) -> None:
        """Called with the lock held, after every change: one reference swap for readers."""
        self._published = (dict(self._totals), tuple(self._catalogue.definitions()))
        self._published_stats = AccountingStats(
            tracked_sockets=len(self._tracked),
            held_back_sockets=len(self._held),
            unattributed_sent_bytes=self._unattributed.exported_sent,
            unattributed_received_bytes=self._unattributed.exported_received,
            untracked_sockets=self._kernel_untracked[2],
            spilled_sockets=self._kernel_spilled_sockets,
            series=len(self._totals),
            overflowed_connections=self._overflowed,
            expired_series=self._expired,
            lifecycle_events_missed=self._lifecycle_missed,
        )

    def definitions(self) -> list[MetricDefinition]:
        with self._lock:
            return list(self._catalogue.definitions())

    def stats(self) -> AccountingStats:
        """As of the last poll (like :meth:`families`)."""
        return self._published_stats


def _naming_key_of(
    enricher: Enricher, catalogue: MetricCatalogue
) -> Callable[[SocketSample, _Peers], Hashable | None] | None:
    """The enricher's ``naming_key`` (agent.model.NamingKeys) when naming by it is exact:
    the catalogue says that no definition reads an end's ip or port."""
    if getattr(catalogue, "reads_addresses", True) is not False:
        return None
    naming_key: Callable[[SocketSample, _Peers], Hashable | None] | None = getattr(
        enricher, "naming_key", None
    )
    return naming_key


def _fingerprint(definition: MetricDefinition) -> object:
    """What makes two definitions count the same series: everything but where it was written
    (a definition that offers ``describe()`` includes its expressions and reporters)."""
    describe = getattr(definition, "describe", None)
    if describe is not None:
        described = dict(describe())
        described.pop("origin", None)
        return repr(sorted(described.items()))
    return (definition.name, definition.value, definition.label_names, definition.help)

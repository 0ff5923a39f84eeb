"""Accounting: kernel polls folded into monotonic series totals, every byte exactly once."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.accounting import NAMING_ATTEMPTS, Accountant
from agent.metrics.catalogue import load_catalogue
from agent.model import (
    ConnectionAttributes,
    KernelCounters,
    KernelPoll,
    PeerIndex,
    Role,
    SocketFlag,
    SocketSample,
    ValueSource,
)
from tests.support.fakes import FakeCatalogue, FakeEnricher, FakeMetric, poll, sample

OPENED = SocketFlag.OPENED
CLOSED = SocketFlag.CLOSED
DESTROYED = SocketFlag.DESTROYED
PREEXISTING = SocketFlag.PREEXISTING
FINAL = OPENED | CLOSED | DESTROYED

# Label tuples of the fake catalogue: (reporter, source_workload, destination_workload).
CLIENT_SERIES = ("source", "app", "198.18.0.2")  # a client socket of workload "app"
SERVER_SERIES = ("destination", "198.18.0.1", "app")  # a server socket of workload "app"


def fake_accountant(enricher: FakeEnricher | None = None, **kwargs: int) -> Accountant:
    return Accountant(FakeCatalogue(), enricher or FakeEnricher(), **kwargs)


def totals(accountant: Accountant, metric: str) -> dict[tuple[str, ...], int]:
    """Samples of one family: label values -> total."""
    for family in accountant.families():
        if family.name == metric:
            return dict(family.samples)
    raise AssertionError(f"no family {metric}")


def fake_totals(accountant: Accountant) -> dict[str, dict[tuple[str, ...], int]]:
    short = {
        "sent": "fake_sent_bytes_total",
        "received": "fake_received_bytes_total",
        "opened": "fake_opened_total",
        "closed": "fake_closed_total",
    }
    return {key: totals(accountant, name) for key, name in short.items()}


# -- deltas and direction -----------------------------------------------------------------


def test_cumulative_counters_become_deltas_across_polls() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=100, received=10)]))
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 100},  # a client's writes are the connection's requests
        "sent": {CLIENT_SERIES: 10},
        "opened": {CLIENT_SERIES: 1},
        "closed": {CLIENT_SERIES: 0},
    }
    accountant.apply(poll(live=[sample(1, sent=250, received=40)]))
    accountant.apply(poll(live=[sample(1, sent=250, received=40)]))
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 250}
    assert totals(accountant, "fake_sent_bytes_total") == {CLIENT_SERIES: 40}
    assert totals(accountant, "fake_opened_total") == {CLIENT_SERIES: 1}


def test_a_sample_the_reader_updates_in_place_counts_its_deltas() -> None:
    """The kernel tracer updates a live sample's counters in place when only they moved
    (SampleDecoder.refresh): the same object comes back with larger counts."""
    accountant = fake_accountant(FakeEnricher(pending={1}), max_wait_polls=1)
    live = sample(1, sent=100, received=10)
    by_id = {1: live}
    accountant.apply(KernelPoll(KernelCounters(), (live,), (), (live,), by_id))  # held back
    live.sent_bytes, live.received_bytes = 180, 30
    accountant.apply(KernelPoll(KernelCounters(), (live,), (), (live,), by_id))  # named
    live.sent_bytes, live.received_bytes = 250, 40
    accountant.apply(KernelPoll(KernelCounters(), (live,), (), (live,), by_id))
    accountant.apply(KernelPoll(KernelCounters(), (live,), (), (), by_id))
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 250},
        "sent": {CLIENT_SERIES: 40},
        "opened": {CLIENT_SERIES: 1},
        "closed": {CLIENT_SERIES: 0},
    }


def test_server_writes_are_sent_bytes_and_client_writes_are_received_bytes() -> None:
    accountant = fake_accountant()
    accountant.apply(
        poll(
            live=[
                sample(1, sent=1000, received=7, role=Role.CLIENT),
                sample(2, sent=30, received=5, role=Role.SERVER),
            ]
        )
    )
    assert totals(accountant, "fake_received_bytes_total") == {
        CLIENT_SERIES: 1000,
        SERVER_SERIES: 5,
    }
    assert totals(accountant, "fake_sent_bytes_total") == {CLIENT_SERIES: 7, SERVER_SERIES: 30}


BUILTIN_LABELS_OF_CLIENT = {
    "reporter": "source",
    "source_workload": "app",
    "source_workload_namespace": "unknown",
    "source_principal": "unknown",
    "source_app": "unknown",
    "source_version": "unknown",
    "source_canonical_service": "unknown",
    "source_canonical_revision": "unknown",
    "source_cluster": "unknown",
    "destination_workload": "198.18.0.2",
    "destination_workload_namespace": "unknown",
    "destination_principal": "unknown",
    "destination_app": "unknown",
    "destination_version": "unknown",
    "destination_canonical_service": "unknown",
    "destination_canonical_revision": "unknown",
    "destination_cluster": "unknown",
    "destination_service": "198.18.0.2:80",
    "destination_service_name": "unknown",
    "destination_service_namespace": "unknown",
    "request_protocol": "tcp",
    "response_flags": "-",
    "connection_security_policy": "unknown",
}


def labelled(accountant: Accountant, metric: str) -> list[tuple[dict[str, str], int]]:
    for family in accountant.families():
        if family.name == metric:
            return [
                (dict(zip(family.label_names, labels, strict=True)), value)
                for labels, value in family.samples.items()
            ]
    raise AssertionError(f"no family {metric}")


def test_builtin_istio_metrics_bind_direction_to_the_connection() -> None:
    accountant = Accountant(load_catalogue([]), FakeEnricher())
    accountant.apply(
        poll(
            live=[
                sample(1, sent=1000, received=7, role=Role.CLIENT),
                sample(2, sent=30, received=5, role=Role.SERVER),
            ]
        )
    )
    server_labels = {
        **BUILTIN_LABELS_OF_CLIENT,
        "reporter": "destination",
        "source_workload": "198.18.0.1",
        "destination_workload": "app",
    }
    assert labelled(accountant, "istio_tcp_received_bytes_total") == [
        (BUILTIN_LABELS_OF_CLIENT, 1000),
        (server_labels, 5),
    ]
    assert labelled(accountant, "istio_tcp_sent_bytes_total") == [
        (BUILTIN_LABELS_OF_CLIENT, 7),
        (server_labels, 30),
    ]
    assert labelled(accountant, "istio_tcp_connections_opened_total") == [
        (BUILTIN_LABELS_OF_CLIENT, 1),
        (server_labels, 1),
    ]
    assert labelled(accountant, "istio_tcp_connections_closed_total") == [
        (BUILTIN_LABELS_OF_CLIENT, 0),
        (server_labels, 0),
    ]


def test_families_list_every_definition_in_catalogue_order_even_without_samples() -> None:
    accountant = Accountant(load_catalogue([]), FakeEnricher())
    assert [(f.name, f.samples) for f in accountant.families()] == [
        ("istio_tcp_sent_bytes_total", {}),
        ("istio_tcp_received_bytes_total", {}),
        ("istio_tcp_connections_opened_total", {}),
        ("istio_tcp_connections_closed_total", {}),
    ]


# -- lifecycles ------------------------------------------------------------------------------


def test_socket_opened_and_closed_between_polls_is_counted_once() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(finished=[sample(1, sent=500, received=64, flags=FINAL)]))
    accountant.apply(poll())
    accountant.apply(poll())
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 500},
        "sent": {CLIENT_SERIES: 64},
        "opened": {CLIENT_SERIES: 1},
        "closed": {CLIENT_SERIES: 1},
    }
    assert accountant.stats().tracked_sockets == 0


def test_socket_live_then_finished_is_counted_once() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=100, received=1)]))
    accountant.apply(poll(live=[sample(1, sent=200, received=2)]))
    accountant.apply(poll(finished=[sample(1, sent=300, received=3, flags=FINAL)]))
    accountant.apply(poll())
    accountant.apply(poll())
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 300},
        "sent": {CLIENT_SERIES: 3},
        "opened": {CLIENT_SERIES: 1},
        "closed": {CLIENT_SERIES: 1},
    }
    stats = accountant.stats()
    assert (stats.tracked_sockets, stats.unattributed_sent_bytes) == (0, 0)


def test_live_and_finished_in_the_same_poll_counts_the_final_value_once() -> None:
    accountant = fake_accountant()
    accountant.apply(
        poll(
            live=[sample(1, sent=100, received=10)],
            finished=[sample(1, sent=140, received=10, flags=FINAL)],
        )
    )
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 140}
    assert totals(accountant, "fake_closed_total") == {CLIENT_SERIES: 1}


def test_bytes_read_after_tcp_close_count_and_close_is_counted_once() -> None:
    """A half-closed client reads the reply after TCP_CLOSE: CLOSED first, DESTROYED later."""
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=10, received=0)]))
    accountant.apply(poll(live=[sample(1, sent=10, received=400, flags=OPENED | CLOSED)]))
    accountant.apply(poll(live=[sample(1, sent=10, received=900, flags=OPENED | CLOSED)]))
    accountant.apply(poll(finished=[sample(1, sent=10, received=1200, flags=FINAL)]))
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 10},
        "sent": {CLIENT_SERIES: 1200},
        "opened": {CLIENT_SERIES: 1},
        "closed": {CLIENT_SERIES: 1},
    }


def test_failed_connect_is_neither_opened_nor_closed() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(finished=[sample(1, flags=CLOSED | DESTROYED)]))
    assert totals(accountant, "fake_opened_total") == {CLIENT_SERIES: 0}
    assert totals(accountant, "fake_closed_total") == {CLIENT_SERIES: 0}


def test_preexisting_connection_is_closed_but_never_opened() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=5, flags=PREEXISTING)]))
    accountant.apply(poll(finished=[sample(1, sent=8, flags=PREEXISTING | CLOSED | DESTROYED)]))
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 8},
        "sent": {CLIENT_SERIES: 0},
        "opened": {CLIENT_SERIES: 0},
        "closed": {CLIENT_SERIES: 1},
    }


def test_opened_is_counted_once_per_connection_not_once_per_poll() -> None:
    accountant = fake_accountant()
    for i in range(5):
        accountant.apply(poll(live=[sample(1, sent=i), sample(2, sent=i)]))
    accountant.apply(poll(live=[sample(3)]))
    assert totals(accountant, "fake_opened_total") == {CLIENT_SERIES: 3}


def test_reused_kernel_address_is_a_new_socket_id_and_counts_from_zero() -> None:
    """Same 4-tuple and workload, new id after the old one finished: both fully counted."""
    accountant = fake_accountant()
    accountant.apply(poll(finished=[sample(1, sent=70, client_port=40000, flags=FINAL)]))
    accountant.apply(poll(live=[sample(2, sent=30, client_port=40000)]))
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 100}
    assert totals(accountant, "fake_opened_total") == {CLIENT_SERIES: 2}


# -- held back while the enricher cannot name the socket ---------------------------------------


def test_held_back_socket_counts_everything_once_it_is_named() -> None:
    enricher = FakeEnricher(pending={1})
    accountant = fake_accountant(enricher, max_wait_polls=10)
    accountant.apply(poll(live=[sample(1, sent=100, received=1)]))
    accountant.apply(poll(live=[sample(1, sent=200, received=2)]))
    assert totals(accountant, "fake_received_bytes_total") == {}
    assert accountant.stats().held_back_sockets == 1
    enricher.pending.clear()
    accountant.apply(poll(live=[sample(1, sent=350, received=3)]))
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 350}
    assert totals(accountant, "fake_sent_bytes_total") == {CLIENT_SERIES: 3}
    assert totals(accountant, "fake_opened_total") == {CLIENT_SERIES: 1}
    assert accountant.stats().held_back_sockets == 0
    assert enricher.calls == [(1, False), (1, False), (1, False)]


def test_held_back_socket_is_forced_after_max_wait_polls() -> None:
    enricher = FakeEnricher(pending={1})
    accountant = fake_accountant(enricher, max_wait_polls=3)
    for sent in (10, 20, 30):
        accountant.apply(poll(live=[sample(1, sent=sent)]))
        assert totals(accountant, "fake_received_bytes_total") == {}
    accountant.apply(poll(live=[sample(1, sent=40)]))
    assert enricher.calls == [(1, False), (1, False), (1, False), (1, True)]
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 40}
    accountant.apply(poll(live=[sample(1, sent=45)]))
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 45}
    assert len(enricher.calls) == 4  # named once; not asked again


def test_held_back_socket_is_forced_when_its_final_record_arrives() -> None:
    enricher = FakeEnricher(pending={1})
    accountant = fake_accountant(enricher, max_wait_polls=10)
    accountant.apply(poll(live=[sample(1, sent=100)]))
    accountant.apply(poll(finished=[sample(1, sent=150, flags=FINAL)]))
    assert enricher.calls == [(1, False), (1, True)]
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 150},
        "sent": {CLIENT_SERIES: 0},
        "opened": {CLIENT_SERIES: 1},
        "closed": {CLIENT_SERIES: 1},
    }
    assert accountant.stats().tracked_sockets == 0


class _PeerRecorder:
    """Enricher that records which peer the accountant's index found for each socket."""

    def __init__(self) -> None:
        self.inner = FakeEnricher()
        self.peers: dict[int, int | None] = {}

    def attributes(
        self, sample: SocketSample, peers: PeerIndex, *, final: bool
    ) -> ConnectionAttributes | None:
        peer = peers.peer_of(sample)
        self.peers[sample.socket_id] = None if peer is None else peer.socket_id
        return self.inner.attributes(sample, peers, final=final)


def test_enricher_is_given_the_other_end_of_a_local_connection() -> None:
    recorder = _PeerRecorder()
    accountant = Accountant(FakeCatalogue(), recorder)
    client = sample(1, role=Role.CLIENT, client_port=5000)
    server = sample(2, role=Role.SERVER, client_port=5000)
    stranger = sample(3, role=Role.CLIENT, client_port=5001)
    accountant.apply(poll(live=[client], finished=[server, stranger]))
    assert recorder.peers == {1: 2, 2: 1, 3: None}


# -- vanished (spilled) sockets and unattributed bytes -------------------------------------------


def spilled(sent: int, received: int, sockets: int = 1) -> KernelCounters:
    return KernelCounters(
        spilled_sent_bytes=sent, spilled_received_bytes=received, spilled_sockets=sockets
    )


def unattributed(accountant: Accountant) -> tuple[int, int]:
    stats = accountant.stats()
    return stats.unattributed_sent_bytes, stats.unattributed_received_bytes


def test_vanished_socket_leaves_exactly_its_uncounted_rest_unattributed_when_spill_is_late() -> (
    None
):
    """The kernel spilled the close after the poll read its counters: the spill shows up in
    the poll that declares the socket spilled."""
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=100, received=20)]))
    accountant.apply(poll())  # absent once: not yet declared, spill not yet in the counters
    assert unattributed(accountant) == (0, 0)
    accountant.apply(poll(counters=spilled(150, 30)))  # absent twice: declared spilled
    assert unattributed(accountant) == (50, 10)
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 100}
    assert totals(accountant, "fake_sent_bytes_total") == {CLIENT_SERIES: 20}
    assert totals(accountant, "fake_closed_total") == {CLIENT_SERIES: 1}
    stats = accountant.stats()
    assert (stats.tracked_sockets, stats.spilled_sockets) == (0, 1)


def test_vanished_socket_leaves_exactly_its_uncounted_rest_unattributed() -> None:
    """Usual order: the close spilled before the next poll, so the spill is already in the
    counters of the first poll from which the socket is absent."""
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=100, received=20)]))
    accountant.apply(poll(counters=spilled(150, 30)))  # absent once
    accountant.apply(poll(counters=spilled(150, 30)))  # absent twice: declared spilled
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 100}
    assert unattributed(accountant) == (50, 10)  # actual: (150, 30)


def incremental(
    sequence: int,
    live: list[SocketSample],
    changed: list[SocketSample],
    *,
    gone: tuple[int, ...] = (),
    counters: KernelCounters | None = None,
) -> KernelPoll:
    """A numbered poll of an incremental reader (as KernelTracer makes them)."""
    return KernelPoll(
        counters if counters is not None else KernelCounters(),
        tuple(live),
        (),
        tuple(changed),
        {s.socket_id: s for s in live},
        sequence=sequence,
        gone=gone,
    )


def test_a_numbered_poll_that_says_a_socket_is_gone_spills_it_exactly() -> None:
    """Polls that follow each other: absence is learned from ``gone`` (and the sockets
    already missing), not by comparing every tracked socket with the live set."""
    accountant = fake_accountant()
    one, two = sample(1, sent=100, received=20), sample(2, sent=5)
    accountant.apply(incremental(1, [one, two], [one, two]))
    accountant.apply(incremental(2, [two], [], gone=(1,), counters=spilled(150, 30)))
    assert accountant.stats().tracked_sockets == 2  # absent once
    accountant.apply(incremental(3, [two], [], counters=spilled(150, 30)))
    assert accountant.stats().tracked_sockets == 1  # absent twice: declared spilled
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 105}
    assert totals(accountant, "fake_closed_total") == {CLIENT_SERIES: 1}
    assert unattributed(accountant) == (50, 10)


def test_a_numbered_poll_after_a_gap_compares_the_whole_live_set() -> None:
    """A poll this accountant did not see may have brought sockets (or taken them away):
    after a gap in the numbering the whole live set is compared."""
    accountant = fake_accountant()
    one, two = sample(1, sent=100), sample(2, sent=7)
    accountant.apply(incremental(1, [one], [one]))
    # poll 2 (which brought socket 2 and took socket 1 away) went elsewhere
    accountant.apply(incremental(3, [two], [], counters=spilled(100, 0)))
    accountant.apply(incremental(4, [two], [], counters=spilled(100, 0)))
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 107}
    assert accountant.stats().tracked_sockets == 1
    assert unattributed(accountant) == (0, 0)


def test_a_held_back_socket_is_asked_again_on_numbered_polls_without_changes() -> None:
    enricher = FakeEnricher(pending={1})
    accountant = fake_accountant(enricher, max_wait_polls=2)
    one = sample(1, sent=100)
    accountant.apply(incremental(1, [one], [one]))
    accountant.apply(incremental(2, [one], []))
    accountant.apply(incremental(3, [one], []))  # waited enough: named with what it has
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 100}
    assert [call for call in enricher.calls if call[0] == 1][-1] == (1, True)


@dataclass
class FailingOnce(FakeEnricher):
    """FakeEnricher whose first naming of socket ``fail_on`` raises."""

    fail_on: int = 0
    failed: bool = False

    def attributes(self, sample: SocketSample, peers: PeerIndex, *, final: bool):
        if sample.socket_id == self.fail_on and not self.failed:
            self.failed = True
            raise OSError("lookup failed")
        return super().attributes(sample, peers, final=final)


def test_a_poll_that_failed_half_way_makes_the_next_one_compare_the_whole_live_set() -> None:
    """A poll whose apply raised (here: the enricher, once) may not have taken every new
    socket in: the next numbered poll is not trusted to list them again."""

    accountant = fake_accountant(FailingOnce(fail_on=2))
    one, two = sample(1, sent=10), sample(2, sent=20)
    accountant.apply(incremental(1, [one], [one]))
    with pytest.raises(OSError, match="lookup failed"):
        accountant.apply(incremental(2, [one, two], [two]))
    accountant.apply(incremental(3, [one, two], []))  # socket 2 is not in changed again
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 30}


def test_a_finished_socket_whose_naming_failed_is_still_counted() -> None:
    """Its final record came in the poll whose naming of it failed: the next apply names
    and counts it (a finished record leaves the kernel once)."""

    accountant = fake_accountant(FailingOnce(fail_on=2))
    one = sample(1, sent=10)
    accountant.apply(incremental(1, [one], [one]))
    finished = dataclasses.replace(
        incremental(2, [one], []), finished=(sample(2, sent=20, flags=FINAL),)
    )
    with pytest.raises(OSError, match="lookup failed"):
        accountant.apply(finished)
    for sequence in (3, 4, 5):
        accountant.apply(incremental(sequence, [one], []))
    assert fake_totals(accountant)["received"] == {CLIENT_SERIES: 30}
    assert fake_totals(accountant)["closed"] == {CLIENT_SERIES: 1}
    assert accountant.stats().tracked_sockets == 1


def test_untracked_bytes_are_unattributed() -> None:
    accountant = fake_accountant()
    counters = KernelCounters(
        untracked_sent_bytes=11, untracked_received_bytes=22, untracked_sockets=3
    )
    accountant.apply(poll(counters=counters))
    assert unattributed(accountant) == (11, 22)
    assert accountant.stats().untracked_sockets == 3


def test_late_finished_record_revives_a_socket_declared_spilled_without_double_counting() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=100, received=20)]))
    accountant.apply(poll())
    accountant.apply(poll())  # declared spilled (closed counted now)
    assert totals(accountant, "fake_closed_total") == {CLIENT_SERIES: 1}
    assert accountant.stats().tracked_sockets == 0
    accountant.apply(poll(finished=[sample(1, sent=180, received=25, flags=FINAL)]))
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 180},
        "sent": {CLIENT_SERIES: 25},
        "opened": {CLIENT_SERIES: 1},
        "closed": {CLIENT_SERIES: 1},
    }
    assert unattributed(accountant) == (0, 0)
    assert accountant.stats().tracked_sockets == 0


def test_revived_socket_restores_the_spilled_baseline() -> None:
    """After a revival, a real spill of another socket is attributed in full."""
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=100)]))
    accountant.apply(poll())
    accountant.apply(poll())  # socket 1 declared spilled: baseline 100
    accountant.apply(poll(finished=[sample(1, sent=100, flags=FINAL)]))  # it was not
    accountant.apply(poll(counters=spilled(60, 0)))  # an untracked socket spilled 60
    assert unattributed(accountant) == (60, 0)


def test_unattributed_is_monotonic() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(counters=KernelCounters(untracked_sent_bytes=100)))
    accountant.apply(poll(counters=KernelCounters(untracked_sent_bytes=40)))  # torn read
    assert unattributed(accountant) == (100, 0)
    accountant.apply(poll(counters=KernelCounters(untracked_sent_bytes=130)))
    assert unattributed(accountant) == (130, 0)


def test_decreasing_cumulative_value_never_lowers_a_total() -> None:
    accountant = fake_accountant()
    seen = []
    for sent in (100, 90, 100, 120, 0, 125):
        accountant.apply(poll(live=[sample(1, sent=sent)]))
        seen.append(totals(accountant, "fake_received_bytes_total")[CLIENT_SERIES])
    assert seen == [100, 100, 100, 120, 120, 125]


# -- reloading definitions -----------------------------------------------------------------


def test_replace_catalogue_keeps_unchanged_metrics_and_drops_removed_ones() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=100, received=10)]))
    sent, received, opened, _closed = FakeCatalogue().metrics
    assert isinstance(sent, FakeMetric)
    sent_by_reporter = FakeMetric(sent.name, sent.value, label_names=("reporter",))
    accountant.replace_catalogue(FakeCatalogue((received, sent_by_reporter, opened)))
    assert fake_totals_after_reload(accountant) == {
        "fake_sent_bytes_total": {("source",): 0},  # changed labels: starts again
        "fake_received_bytes_total": {CLIENT_SERIES: 100},
        "fake_opened_total": {CLIENT_SERIES: 1},
    }
    accountant.apply(poll(live=[sample(1, sent=130, received=15)]))
    assert fake_totals_after_reload(accountant) == {
        "fake_sent_bytes_total": {("source",): 5},
        "fake_received_bytes_total": {CLIENT_SERIES: 130},
        "fake_opened_total": {CLIENT_SERIES: 1},
    }
    assert [d.name for d in accountant.definitions()] == [
        "fake_received_bytes_total",
        "fake_sent_bytes_total",
        "fake_opened_total",
    ]


def fake_totals_after_reload(accountant: Accountant) -> dict[str, dict[tuple[str, ...], int]]:
    return {family.name: dict(family.samples) for family in accountant.families()}


def test_socket_revived_after_a_reload_counts_into_the_new_definitions() -> None:
    accountant = fake_accountant()
    accountant.apply(poll(live=[sample(1, sent=100)]))
    accountant.apply(poll())
    accountant.apply(poll())  # declared spilled: tombstoned with its series
    sent, received, opened, closed = FakeCatalogue().metrics
    assert isinstance(received, FakeMetric)
    by_reporter = FakeMetric(received.name, received.value, label_names=("reporter",))
    accountant.replace_catalogue(FakeCatalogue((sent, by_reporter, opened, closed)))
    accountant.apply(poll(finished=[sample(1, sent=150, flags=FINAL)]))
    for family in accountant.families():
        assert all(len(labels) == len(family.label_names) for labels in family.samples)
    assert totals(accountant, "fake_received_bytes_total") == {("source",): 50}


def test_held_back_socket_that_spills_is_still_a_connection() -> None:
    enricher = FakeEnricher(pending={1})
    accountant = fake_accountant(enricher, max_wait_polls=10)
    accountant.apply(poll(live=[sample(1, sent=100)]))  # held back: not named yet
    accountant.apply(poll(counters=spilled(150, 0)))  # its close spilled
    accountant.apply(poll(counters=spilled(150, 0)))  # declared spilled
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 100},
        "sent": {CLIENT_SERIES: 0},
        "opened": {CLIENT_SERIES: 1},
        "closed": {CLIENT_SERIES: 1},
    }
    assert unattributed(accountant) == (50, 0)


@dataclass
class FailingFinalNaming(FakeEnricher):
    """FakeEnricher whose first ``failures`` final namings of socket 1 raise."""

    failures: int = 1

    def attributes(self, sample: SocketSample, peers: PeerIndex, *, final: bool):
        if final and sample.socket_id == 1 and self.failures:
            self.failures -= 1
            raise OSError("lookup failed")
        return super().attributes(sample, peers, final=final)


def test_a_vanished_socket_whose_naming_raised_is_named_by_the_next_poll() -> None:
    """A held-back socket whose close spilled is named when it is declared spilled; when
    that raises, the other socket declared spilled in the same poll is still done, and the
    next poll names and counts the first one as if nothing had failed."""
    accountant = fake_accountant(FailingFinalNaming(pending={1}), max_wait_polls=10)
    accountant.apply(poll(live=[sample(1, sent=100), sample(2, sent=30)]))
    accountant.apply(poll(counters=spilled(190, 0)))  # both absent once (finals 150 and 40)
    with pytest.raises(OSError, match="lookup failed") as raised:
        accountant.apply(poll(counters=spilled(190, 0)))  # declared spilled
    assert "a later poll" in " ".join(raised.value.__notes__)
    assert fake_totals(accountant)["closed"] == {CLIENT_SERIES: 1}  # socket 2's
    assert unattributed(accountant) == (60, 0)  # 50 of socket 1's, 10 of socket 2's
    assert accountant.stats().tracked_sockets == 1
    accountant.apply(poll(counters=spilled(190, 0)))
    assert fake_totals(accountant) == {
        "received": {CLIENT_SERIES: 130},
        "sent": {CLIENT_SERIES: 0},
        "opened": {CLIENT_SERIES: 2},
        "closed": {CLIENT_SERIES: 2},
    }
    assert unattributed(accountant) == (60, 0)
    assert accountant.stats().tracked_sockets == 0


def test_a_vanished_socket_no_naming_can_name_leaves_its_bytes_unattributed() -> None:
    accountant = fake_accountant(
        FailingFinalNaming(pending={1}, failures=NAMING_ATTEMPTS), max_wait_polls=10
    )
    accountant.apply(poll(live=[sample(1, sent=100, received=4)]))
    accountant.apply(poll(counters=spilled(150, 5)))
    for _ in range(NAMING_ATTEMPTS):
        with pytest.raises(OSError, match="lookup failed"):
            accountant.apply(poll(counters=spilled(150, 5)))
    accountant.apply(poll(counters=spilled(150, 5)))  # given up on: no error
    assert fake_totals(accountant)["opened"] == {}
    assert unattributed(accountant) == (150, 5)  # its every byte, none lost
    assert accountant.stats().tracked_sockets == 0


# -- cardinality budget and expiry ----------------------------------------------------------------

OTHER = ("~other", "~other", "~other")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_new_label_sets_past_the_budget_fold_into_other() -> None:
    enricher = FakeEnricher(workloads={1: "app", 2: "intruder", 3: "app", 4: "late"})
    accountant = fake_accountant(enricher, max_series=4)  # one connection's 4 series
    accountant.apply(poll(live=[sample(1, sent=10), sample(2, sent=20)]))
    accountant.apply(poll(live=[sample(3, sent=30)], finished=[sample(4, sent=40, flags=FINAL)]))
    assert totals(accountant, "fake_received_bytes_total") == {
        CLIENT_SERIES: 40,  # sockets 1 and 3: an existing label set is always reused
        OTHER: 60,  # sockets 2 and 4: new label sets past the budget
    }
    assert totals(accountant, "fake_opened_total") == {CLIENT_SERIES: 2, OTHER: 2}
    assert totals(accountant, "fake_closed_total") == {CLIENT_SERIES: 0, OTHER: 1}
    stats = accountant.stats()
    assert (stats.overflowed_connections, stats.series) == (2, 8)


def test_idle_series_of_finished_connections_expire_after_the_ttl() -> None:
    clock = FakeClock()
    enricher = FakeEnricher(workloads={1: "gone", 2: "staying"})
    accountant = fake_accountant(enricher, series_ttl=600.0, clock=clock)
    accountant.apply(poll(live=[sample(2, sent=5)], finished=[sample(1, sent=10, flags=FINAL)]))
    clock.now += 600.0
    accountant.apply(poll(live=[sample(2, sent=5)]))
    assert totals(accountant, "fake_received_bytes_total") == {
        ("source", "gone", "198.18.0.2"): 10,
        ("source", "staying", "198.18.0.2"): 5,
    }  # exactly the TTL: not yet
    clock.now += 60.0  # expiry is checked at most once a minute (ttl/4 when shorter)
    accountant.apply(poll(live=[sample(2, sent=5)]))  # socket 2 idle, but live: kept
    assert totals(accountant, "fake_received_bytes_total") == {
        ("source", "staying", "198.18.0.2"): 5
    }
    assert accountant.stats().expired_series == 4
    accountant.apply(poll(finished=[sample(2, sent=7, flags=FINAL)]))
    clock.now += 601.0
    accountant.apply(poll())
    assert totals(accountant, "fake_received_bytes_total") == {}
    assert accountant.stats().expired_series == 8


def test_without_a_ttl_series_never_expire() -> None:
    clock = FakeClock()
    accountant = fake_accountant(clock=clock)
    accountant.apply(poll(finished=[sample(1, sent=10, flags=FINAL)]))
    clock.now += 10**9
    accountant.apply(poll())
    assert totals(accountant, "fake_received_bytes_total") == {CLIENT_SERIES: 10}


# -- property: every byte moved is counted exactly once --------------------------------------


@dataclass
class _KernelModel:
    """A toy kernel: cumulative counts per socket id, a live map and a closed map."""

    next_id: int = 1
    live: dict[int, SocketSample] = field(default_factory=dict)
    closed: dict[int, SocketSample] = field(default_factory=dict)
    moved_received: int = 0  # client -> server bytes moved
    moved_sent: int = 0  # server -> client bytes moved
    connections: int = 0
    counters: KernelCounters = field(default_factory=KernelCounters)
    polled: set[int] = field(default_factory=set)  # socket ids a poll has shown
    numbered: bool = False  # drain as an incremental reader does (changed, gone, sequence)
    sequence: int = 0
    last_live: dict[int, SocketSample] = field(default_factory=dict)

    def open(self, role: Role) -> None:
        sid = self.next_id
        self.next_id += 1
        self.live[sid] = sample(sid, role=role, flags=OPENED)
        self.connections += 1

    def move(self, pick: int, write: bool, amount: int) -> None:
        if not self.live:
            return
        sid = sorted(self.live)[pick % len(self.live)]
        old = self.live[sid]
        sent = old.sent_bytes + (amount if write else 0)
        received = old.received_bytes + (0 if write else amount)
        self.live[sid] = sample(sid, sent=sent, received=received, role=old.role, flags=old.flags)
        client_to_server = write == (old.role is Role.CLIENT)
        if client_to_server:
            self.moved_received += amount
        else:
            self.moved_sent += amount

    def close(self, pick: int) -> None:
        if not self.live:
            return
        sid = sorted(self.live)[pick % len(self.live)]
        old = self.live.pop(sid)
        self.closed[sid] = sample(
            sid, sent=old.sent_bytes, received=old.received_bytes, role=old.role, flags=FINAL
        )

    def spill(self, pick: int) -> None:
        """Close a socket whose final record finds the closed map full."""
        if not self.live:
            return
        sid = sorted(self.live)[pick % len(self.live)]
        old = self.live.pop(sid)
        self.counters = dataclasses.replace(
            self.counters,
            spilled_sent_bytes=self.counters.spilled_sent_bytes + old.sent_bytes,
            spilled_received_bytes=self.counters.spilled_received_bytes + old.received_bytes,
            spilled_sockets=self.counters.spilled_sockets + 1,
        )

    def untracked(self, write: bool, amount: int) -> None:
        """Bytes on a socket that found the socket map full."""
        key = "untracked_sent_bytes" if write else "untracked_received_bytes"
        self.counters = dataclasses.replace(
            self.counters, **{key: getattr(self.counters, key) + amount}
        )

    def drain(self):
        result = poll(
            live=list(self.live.values()),
            finished=list(self.closed.values()),
            counters=self.counters,
        )
        if self.numbered:
            self.sequence += 1
            result = dataclasses.replace(
                result,
                changed=tuple(
                    s for s in self.live.values() if self.last_live.get(s.socket_id) is not s
                ),
                by_id=dict(self.live),
                sequence=self.sequence,
                gone=tuple(set(self.last_live) - set(self.live) - set(self.closed)),
            )
            self.last_live = dict(self.live)
        self.polled |= {*self.live, *self.closed}
        self.closed.clear()
        return result


_ACTIONS = [
    st.tuples(st.just("open"), st.sampled_from([Role.CLIENT, Role.SERVER])),
    st.tuples(st.just("move"), st.integers(0, 50), st.booleans(), st.integers(1, 10_000)),
    st.tuples(st.just("close"), st.integers(0, 50)),
    st.tuples(st.just("poll")),
    st.tuples(st.just("hold"), st.integers(0, 50)),
]
_actions = st.one_of(*_ACTIONS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(_actions, max_size=60), budget=st.sampled_from([None, 4, 9]))
def test_property_every_byte_moved_is_counted_once_per_direction(actions, budget) -> None:
    kernel = _KernelModel()
    # every socket its own workload, so a small series budget overflows into ~other
    enricher = FakeEnricher(workloads={sid: f"w{sid % 5}" for sid in range(1, 100)})
    accountant = Accountant(FakeCatalogue(), enricher, max_wait_polls=2, max_series=budget)
    for action in actions:
        match action:
            case ("open", role):
                kernel.open(role)
            case ("move", pick, write, amount):
                kernel.move(pick, write, amount)
            case ("close", pick):
                kernel.close(pick)
            case ("poll",):
                accountant.apply(kernel.drain())
            case ("hold", pick):  # the enricher cannot name this socket for a while
                enricher.pending.add(kernel.next_id - 1 - pick % max(kernel.next_id - 1, 1))
    while kernel.live:
        kernel.close(0)
    accountant.apply(kernel.drain())

    received = totals(accountant, "fake_received_bytes_total")
    sent = totals(accountant, "fake_sent_bytes_total")
    assert sum(received.values()) == kernel.moved_received
    assert sum(sent.values()) == kernel.moved_sent
    assert sum(totals(accountant, "fake_opened_total").values()) == kernel.connections
    assert sum(totals(accountant, "fake_closed_total").values()) == kernel.connections
    assert accountant.stats().tracked_sockets == 0
    assert unattributed(accountant) == (0, 0)


_lossy_actions = st.one_of(
    *_ACTIONS[:4],  # no "hold": see test_held_back_socket_that_spills_is_still_a_connection
    st.tuples(st.just("spill"), st.integers(0, 50)),
    st.tuples(st.just("untracked"), st.booleans(), st.integers(1, 10_000)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(_lossy_actions, max_size=60))
@example(
    actions=[
        ("open", Role.CLIENT),
        ("move", 0, True, 100),
        ("poll",),
        ("spill", 0),
        ("poll",),
        ("poll",),
    ]
)
@example(
    actions=[
        ("open", Role.SERVER),
        ("move", 0, False, 7),
        ("poll",),
        ("move", 0, True, 5),
        ("spill", 0),
        ("untracked", True, 3),
        ("poll",),
    ]
)
def test_property_with_full_maps_every_byte_is_counted_once_somewhere(actions) -> None:
    """Spilled closes and untracked sockets: series plus unattributed == bytes moved, at
    every poll never more, and each connection closed once."""
    for numbered in (False, True):
        _every_byte_once(actions, _KernelModel(numbered=numbered))


def _every_byte_once(actions, kernel: _KernelModel) -> None:
    enricher = FakeEnricher()
    accountant = Accountant(FakeCatalogue(), enricher, max_wait_polls=2)
    untracked = 0

    def counted() -> int:
        series = sum(totals(accountant, "fake_received_bytes_total").values()) + sum(
            totals(accountant, "fake_sent_bytes_total").values()
        )
        return series + sum(unattributed(accountant))

    for action in actions:
        match action:
            case ("open", role):
                kernel.open(role)
            case ("move", pick, write, amount):
                kernel.move(pick, write, amount)
            case ("close", pick):
                kernel.close(pick)
            case ("spill", pick):
                kernel.spill(pick)
            case ("untracked", write, amount):
                kernel.untracked(write, amount)
                untracked += amount
            case ("poll",):
                accountant.apply(kernel.drain())
                assert counted() <= kernel.moved_received + kernel.moved_sent + untracked
    while kernel.live:
        kernel.close(0)
    for _ in range(3):  # spilled sockets are declared after two polls of absence
        accountant.apply(kernel.drain())

    assert counted() == kernel.moved_received + kernel.moved_sent + untracked
    # a connection spilled before any poll showed it is only in tcpacct_spilled_sockets_total
    seen = len(kernel.polled)
    assert sum(totals(accountant, "fake_opened_total").values()) == seen
    assert sum(totals(accountant, "fake_closed_total").values()) == seen
    assert accountant.stats().tracked_sockets == 0


def test_property_model_moves_what_it_says() -> None:
    """The toy kernel of the property test itself: a client write is a request byte."""
    kernel = _KernelModel()
    kernel.open(Role.CLIENT)
    kernel.open(Role.SERVER)
    kernel.move(0, True, 7)  # socket 1 (client) writes 7
    kernel.move(1, True, 5)  # socket 2 (server) writes 5
    kernel.move(1, False, 3)  # socket 2 (server) reads 3
    assert (kernel.moved_received, kernel.moved_sent) == (10, 5)
    assert ValueSource.RECEIVED_BYTES.value == "connection.received.bytes"


# -- naming finished sockets by the enricher's naming key ------------------------------------


class CountingEnricher:
    """A LocalEnricher (curl 42 -> nginx 43) counting ``attributes`` calls; without
    ``naming_key`` when ``keys`` is False (the accountant then names every socket)."""

    def __init__(self, *, keys: bool = True) -> None:
        from agent.enrich.local import LocalEnricher

        self.inner = LocalEnricher({42: "curl", 43: "nginx"}.get)
        self.calls = 0
        self.keyed = 0  # naming_key calls
        if keys:
            self.naming_key = self._naming_key

    def _naming_key(self, sample: SocketSample, peers: PeerIndex) -> Hashable | None:
        self.keyed += 1
        return self.inner.naming_key(sample, peers)

    def attributes(
        self, sample: SocketSample, peers: PeerIndex, *, final: bool
    ) -> ConnectionAttributes | None:
        self.calls += 1
        return self.inner.attributes(sample, peers, final=final)


def loopback_pair(number: int, *, sent: int, received: int) -> tuple[SocketSample, SocketSample]:
    """Both finished sockets of connection ``number``: curl 127.0.0.1:<41000+n> -> nginx
    127.0.0.1:8080; the client wrote ``sent`` and read ``received``."""
    from agent.model import Endpoint

    client_end, server_end = Endpoint("127.0.0.1", 41000 + number), Endpoint("127.0.0.1", 8080)
    client = SocketSample(2 * number, sent, received, client_end, server_end, Role.CLIENT,
                          FINAL, pid=42, comm="curl")  # fmt: skip
    server = SocketSample(2 * number + 1, received, sent, server_end, client_end, Role.SERVER,
                          FINAL, pid=43, comm="nginx")  # fmt: skip
    return client, server


def test_finished_sockets_of_one_shape_are_named_once_and_count_exactly() -> None:
    """A churn of 20 short connections curl -> nginx: the client and the server views are
    named once each (by their naming keys), every byte and event counted."""
    enricher = CountingEnricher()
    accountant = Accountant(load_catalogue([]), enricher)
    pairs = [loopback_pair(n, sent=n + 1, received=10 * n) for n in range(20)]
    accountant.apply(poll(finished=[s for pair in pairs for s in pair]))
    assert enricher.calls == 2
    received = labelled(accountant, "istio_tcp_received_bytes_total")
    assert sorted(value for _, value in received) == [210, 210]  # 1 + 2 + ... + 20, each view
    assert sorted(value for _, value in labelled(accountant, "istio_tcp_sent_bytes_total")) == [
        1900, 1900,
    ]  # fmt: skip
    for metric in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
        assert sorted(value for _, value in labelled(accountant, metric)) == [20, 20]
    workloads = {(ls["source_workload"], ls["destination_workload"]) for ls, _ in received}
    assert workloads == {("curl", "nginx")}


def test_a_new_keys_finished_sockets_are_keyed_once_each_in_their_first_poll() -> None:
    """The first poll of a new server's churn: the first socket of each key names it, the
    rest of the poll count under it; no socket's key is worked out twice."""
    enricher = CountingEnricher()
    accountant = Accountant(load_catalogue([]), enricher)
    pairs = [loopback_pair(n, sent=1, received=2) for n in range(10)]
    accountant.apply(poll(finished=[s for pair in pairs for s in pair]))
    assert (enricher.keyed, enricher.calls) == (20, 2)
    assert sorted(v for _, v in labelled(accountant, "istio_tcp_received_bytes_total")) == [
        10, 10,
    ]  # fmt: skip


def test_a_catalogue_that_reads_ports_names_every_finished_socket(tmp_path) -> None:
    path = tmp_path / "ports.yaml"
    path.write_text(
        "metrics:\n  - name: by_client_port\n    value: connection.received.bytes\n"
        "    reporters: [source]\n    dimensions:\n      port: source.port\n"
    )
    enricher = CountingEnricher()
    accountant = Accountant(load_catalogue([path]), enricher)
    pairs = [loopback_pair(n, sent=n + 1, received=0) for n in range(3)]
    accountant.apply(poll(finished=[s for pair in pairs for s in pair]))
    assert enricher.calls == 6
    assert sorted(labelled(accountant, "by_client_port"), key=lambda item: item[1]) == [
        ({"port": "41000"}, 1), ({"port": "41001"}, 2), ({"port": "41002"}, 3),
    ]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # connection number: repeats are new connections later on
            st.integers(0, 1000),
            st.integers(0, 1000),
            st.sampled_from(("both", "client", "server")),
            st.booleans(),  # live first, finished in a later poll
            # how it ended: opened and closed; a connect that failed (never opened); older
            # than the agent
            st.sampled_from((FINAL, CLOSED | DESTROYED, PREEXISTING | CLOSED | DESTROYED)),
        ),
        max_size=25,
    )
)
def test_naming_by_key_counts_what_naming_every_socket_counts(connections) -> None:
    """Over polls of finished (and first-live) sockets, an accountant that names finished
    sockets by their keys ends with the same families as one that names each socket."""
    by_key, each = CountingEnricher(), CountingEnricher(keys=False)
    accountants = [Accountant(load_catalogue([]), e) for e in (by_key, each)]
    next_id = 0
    for number, sent, received, ends, live_first, ended in connections:
        client, server = loopback_pair(number, sent=sent, received=received)
        renumbered = []
        for view in (client, server):
            next_id += 1
            renumbered.append(dataclasses.replace(view, socket_id=next_id, flags=ended))
        kept = [s for s, name in zip(renumbered, ("client", "server"), strict=True)
                if ends in ("both", name)]  # fmt: skip
        for accountant in accountants:
            if live_first:
                live = [dataclasses.replace(s, flags=OPENED, sent_bytes=0) for s in kept]
                accountant.apply(poll(live=live))
            accountant.apply(poll(finished=kept))
    snapshots = [
        [(f.name, f.label_names, dict(f.samples)) for f in a.families()] for a in accountants
    ]
    assert snapshots[0] == snapshots[1]


class FailingCalls(CountingEnricher):
    """CountingEnricher whose naming calls (``naming_key`` and ``attributes`` together,
    numbered from 0) in ``fail_at`` raise, as a failing conntrack or cache lookup would."""

    def __init__(self, fail_at: set[int], *, keys: bool = True) -> None:
        super().__init__(keys=keys)
        self.fail_at, self.numbered = fail_at, 0

    def _maybe_fail(self) -> None:
        number, self.numbered = self.numbered, self.numbered + 1
        if number in self.fail_at:
            raise OSError(f"lookup {number} failed")

    def _naming_key(self, sample: SocketSample, peers: PeerIndex) -> Hashable | None:
        self._maybe_fail()
        return super()._naming_key(sample, peers)

    def attributes(
        self, sample: SocketSample, peers: PeerIndex, *, final: bool
    ) -> ConnectionAttributes | None:
        self._maybe_fail()
        return super().attributes(sample, peers, final=final)


@pytest.mark.parametrize("keys", [True, False])
def test_finished_records_of_an_apply_whose_naming_raised_are_counted_by_the_next(keys) -> None:
    """A finished record leaves the kernel once. When naming one of a poll's finished
    sockets raises (the first here, by its key or its attributes), the others are counted
    at once and that one by the next apply - once each."""
    enricher = FailingCalls({0}, keys=keys)
    accountant = Accountant(load_catalogue([]), enricher)
    pairs = [loopback_pair(n, sent=n + 1, received=10) for n in range(3)]
    with pytest.raises(OSError, match="lookup 0 failed"):
        accountant.apply(poll(finished=[s for pair in pairs for s in pair]))
    received = labelled(accountant, "istio_tcp_received_bytes_total")
    assert sorted(value for _, value in received) == [5, 6]  # curl's first socket waits
    accountant.apply(poll())
    accountant.apply(poll())
    received = labelled(accountant, "istio_tcp_received_bytes_total")
    assert sorted(value for _, value in received) == [6, 6]  # 1 + 2 + 3, each reporter
    for metric in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
        assert sorted(value for _, value in labelled(accountant, metric)) == [3, 3]
    assert accountant.stats().tracked_sockets == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 4),  # connection number
            st.integers(0, 1000),
            st.integers(0, 1000),
            st.booleans(),  # live first, finished in a later poll
            st.sampled_from((FINAL, CLOSED | DESTROYED, PREEXISTING | CLOSED | DESTROYED)),
        ),
        max_size=15,
    ),
    # the naming calls that raise: fewer than NAMING_ATTEMPTS, so that none is given up on
    st.sets(st.integers(0, 40), max_size=NAMING_ATTEMPTS - 1),
    st.booleans(),  # naming keys
)
def test_naming_that_raises_loses_and_doubles_nothing(connections, fail_at, keys) -> None:
    """Whatever naming calls raise (each socket's fewer times than it takes to give up on
    it), an accountant whose applies raised ends, a few polls later, with the families of
    one whose naming never failed, and nothing unattributed."""
    accountants = [
        Accountant(load_catalogue([]), FailingCalls(fail_at, keys=keys)),
        Accountant(load_catalogue([]), FailingCalls(set(), keys=keys)),
    ]
    polls = []
    next_id = 0
    for number, sent, received, live_first, ended in connections:
        renumbered = []
        for view in loopback_pair(number, sent=sent, received=received):
            next_id += 1
            renumbered.append(dataclasses.replace(view, socket_id=next_id, flags=ended))
        if live_first:  # live, it has the flags it ends with but CLOSED and DESTROYED
            flags = SocketFlag(ended & ~(CLOSED | DESTROYED))
            polls.append(poll(live=[dataclasses.replace(s, flags=flags) for s in renumbered]))
        polls.append(poll(finished=renumbered))
    polls += [poll() for _ in range(8)]
    for accountant in accountants:
        for one in polls:
            with contextlib.suppress(OSError):  # the pipeline logs it and polls again
                accountant.apply(one)
    snapshots = [
        [(f.name, f.label_names, dict(f.samples)) for f in a.families()] for a in accountants
    ]
    assert snapshots[0] == snapshots[1]
    assert [unattributed(a) for a in accountants] == [(0, 0), (0, 0)]


def test_a_live_peer_of_a_finished_socket_whose_naming_raised_stays_in_the_peer_index() -> None:
    """Only finished records are carried to the next apply with a failed one: its live
    peer stays in the index, where the next polls find it."""
    client, server = loopback_pair(0, sent=5, received=7)
    live_server = dataclasses.replace(server, flags=OPENED)
    accountant = Accountant(load_catalogue([]), FailingCalls({2}))
    accountant.apply(poll(live=[live_server]))  # held: its local peer is not seen yet
    with pytest.raises(OSError, match="lookup 2 failed"):  # the server named, then not curl
        accountant.apply(poll(live=[live_server], finished=[client]))
    assert accountant._peers.peer_of(client) is live_server
    accountant.apply(poll(live=[live_server]))
    assert accountant._peers.peer_of(client) is live_server
    received = labelled(accountant, "istio_tcp_received_bytes_total")
    assert sorted(value for _, value in received) == [5, 5]  # client -> server, each end


def test_a_finished_socket_no_naming_can_name_is_given_up_on_and_its_bytes_unattributed() -> None:
    """One record whose naming always raises must not stop accounting: the other sockets
    of its poll are counted at once, and after NAMING_ATTEMPTS applies that raised its bytes
    are counted unattributed (its open and close are not counted) and applies succeed."""

    class NeverNamesSocket1(CountingEnricher):
        def attributes(self, sample, peers, *, final):
            if sample.socket_id == 1:
                raise OSError("lookup failed")
            return super().attributes(sample, peers, final=final)

    accountant = Accountant(load_catalogue([]), NeverNamesSocket1(keys=False))
    client, server = loopback_pair(0, sent=5, received=7)
    other = loopback_pair(1, sent=100, received=1)
    for attempt in range(NAMING_ATTEMPTS):
        with pytest.raises(OSError, match="lookup failed"):
            accountant.apply(poll(finished=[client, server, *other] if attempt == 0 else []))
    accountant.apply(poll())
    received = labelled(accountant, "istio_tcp_received_bytes_total")
    by_reporter = {labels["reporter"]: value for labels, value in received}
    assert by_reporter == {"source": 105, "destination": 100}  # socket 1 is nginx's
    assert unattributed(accountant) == (7, 5)  # what socket 1 wrote and read
    assert accountant.stats().tracked_sockets == 0


def test_a_reloaded_catalogue_that_reads_ports_stops_naming_by_key(tmp_path) -> None:
    path = tmp_path / "ports.yaml"
    path.write_text(
        "metrics:\n  - name: by_client_port\n    value: connection.received.bytes\n"
        "    reporters: [source]\n    dimensions:\n      port: source.port\n"
    )
    accountant = Accountant(load_catalogue([]), CountingEnricher())
    accountant.apply(poll(finished=loopback_pair(0, sent=5, received=0)))
    accountant.replace_catalogue(load_catalogue([path]))
    pairs = [loopback_pair(n, sent=n, received=0) for n in (1, 2)]
    accountant.apply(poll(finished=[s for pair in pairs for s in pair]))
    assert sorted(labelled(accountant, "by_client_port"), key=lambda item: item[1]) == [
        ({"port": "41001"}, 1), ({"port": "41002"}, 2),
    ]  # fmt: skip

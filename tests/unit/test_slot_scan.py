"""The poll's scan of the memory-mapped slots (agent/ebpf/tracing.py _SlotTable): bytes the
kernel counted in a slot reach the slot owner's sample by their difference, without any
mark; only chunks whose bytes changed are read; a slot whose owner changed while it was
read is skipped, and no count is ever lowered."""

from __future__ import annotations

from agent.ebpf.decoding import SLOT
from agent.ebpf.tracing import _SlotTable
from agent.model import Endpoint, Role, SocketFlag, SocketSample

SK = 0xFFFF_8880_1234_5600
SLOTS = 512  # four chunks of 128


def _sample(socket_id: int, sent: int, received: int, slot: tuple[int, int]) -> SocketSample:
    """A live sample whose counters include ``slot`` (sent, received) from its slot."""
    sample = SocketSample(
        socket_id,
        sent,
        received,
        Endpoint("198.18.0.1", 40000 + socket_id),
        Endpoint("198.18.0.2", 80),
        Role.CLIENT,
        SocketFlag.OPENED,
    )
    sample.entry_sent, sample.entry_received = sent - slot[0], received - slot[1]
    return sample


def _empty_table() -> tuple[bytearray, _SlotTable]:
    """A scan over a buffer of SLOTS free slots (the buffer stands in for the mapping)."""
    buffer = bytearray(SLOTS * SLOT.size)
    return buffer, _SlotTable(buffer, SLOTS)


def _put(buffer: bytearray, index: int, socket_id: int, sent: int, received: int) -> None:
    SLOT.pack_into(buffer, index * SLOT.size, SK + 64 * index if socket_id else 0, socket_id,
                   sent, received, 0, 0)  # fmt: skip


def test_a_slot_adds_what_it_counted_since_the_samples_last_read() -> None:
    buffer, table = _empty_table()
    # 5 sent before the socket had slot 3, 100 in the slot when its entry was read
    sample = _sample(7, 105, 42, (100, 40))
    _put(buffer, 3, 7, 100, 40)
    assert table.scan({7: sample}) == []  # the slot says what the sample already has
    _put(buffer, 3, 7, 150, 41)
    assert table.scan({7: sample}) == [sample]
    assert (sample.sent_bytes, sample.received_bytes) == (155, 43)
    assert (sample.entry_sent, sample.entry_received) == (5, 2)  # unchanged
    assert table.scan({7: sample}) == []  # nothing moved since
    assert (sample.sent_bytes, sample.received_bytes) == (155, 43)


def test_a_sample_read_before_its_socket_had_a_slot_gets_all_the_slot_counted() -> None:
    buffer, table = _empty_table()
    sample = _sample(9, 3, 0, (0, 0))  # its entry was read with no slot yet
    _put(buffer, 200, 9, 30, 12)
    assert table.scan({9: sample}) == [sample]
    assert (sample.sent_bytes, sample.received_bytes) == (33, 12)


def test_only_chunks_that_changed_are_read() -> None:
    buffer, table = _empty_table()
    _put(buffer, 0, 1, 10, 0)  # chunk 0
    _put(buffer, 300, 2, 20, 0)  # chunk 2
    assert table._moved_chunks() == [0, 1, 2, 3]  # the first scan reads everything
    assert table._moved_chunks() == []
    _put(buffer, 300, 2, 21, 0)
    assert table._moved_chunks() == [2]
    table.forget()
    assert table._moved_chunks() == [0, 1, 2, 3]


def test_an_owner_without_a_sample_is_left_to_its_entrys_read() -> None:
    """Slot 5's socket has no sample yet (its entry, marked when it was tracked, is read
    later with the slot folded in): the scan passes it by, and once the sample exists only
    what the slot counts after that read is added. A free slot (id 0) next to it, whose
    counters were not zeroed yet, is never anyone's."""
    buffer, table = _empty_table()
    _put(buffer, 4, 0, 500, 500)
    _put(buffer, 5, 11, 70, 0)
    assert table.scan({}) == []
    sample = _sample(11, 70, 0, (70, 0))  # read from its entry: 0 own + 70 in the slot
    assert table.scan({11: sample}) == []  # nothing moved since: not counted again
    _put(buffer, 5, 11, 75, 0)
    _put(buffer, 4, 0, 900, 900)
    assert table.scan({11: sample}) == [sample]
    assert (sample.sent_bytes, sample.received_bytes) == (75, 0)


def test_a_count_never_goes_down() -> None:
    buffer, table = _empty_table()
    sample = _sample(7, 100, 100, (100, 100))
    _put(buffer, 3, 7, 90, 120)  # a read that tore low in one counter
    assert table.scan({7: sample}) == []
    assert (sample.sent_bytes, sample.received_bytes) == (100, 100)


class _OwnerChangesAfterTheCounters:
    """The array's u64 words, as the scan reads them: ids, sent, received, ids again - and
    the second read of the ids finds slot ``index`` handed to socket ``later``."""

    def __init__(self, words: memoryview, index: int, later: int) -> None:
        self._words, self._index, self._later, self.reads = words, index, later, 0

    def __getitem__(self, key: slice) -> memoryview | _Column:
        self.reads += 1
        column = self._words[key]
        if self.reads % 4 == 0:  # the ids, read again after the counters
            values = column.tolist()
            values[self._index] = self._later
            return _Column(values)
        return column


class _Column(list):
    def tolist(self) -> list[int]:
        return list(self)


def test_a_slot_whose_owner_changed_while_it_was_read_is_skipped() -> None:
    """Slot 3 read as socket 7's, its counters read, then found socket 8's (7 was retired
    and the slot handed on between the reads): the counters may be 8's, so 7 gets nothing
    from them (7's final record carries its last counts)."""
    buffer, table = _empty_table()
    sample = _sample(7, 10, 10, (10, 10))
    _put(buffer, 3, 7, 999, 999)
    table._words = _OwnerChangesAfterTheCounters(table._words, 3, 8)  # type: ignore[assignment]
    assert table.scan({7: sample}) == []
    assert (sample.sent_bytes, sample.received_bytes) == (10, 10)


def test_a_table_smaller_than_a_chunk_in_a_page_rounded_mapping() -> None:
    """Two slots in a 4 KiB mapping (the rest of the page is not slots)."""
    buffer = bytearray(4096)
    table = _SlotTable(buffer, 2)
    sample = _sample(5, 0, 0, (0, 0))
    _put(buffer, 1, 5, 8, 9)
    buffer[2 * SLOT.size + 8] = 1  # past the slots: never read as one
    assert table.scan({5: sample}) == [sample]
    assert (sample.sent_bytes, sample.received_bytes) == (8, 9)


def test_batch_entries_are_decoded_in_slot_order() -> None:
    """Entries with slots 3, 0 (none), 1 -> the one without a slot, then slot 1, then 3;
    of a subset, only those."""
    from agent.ebpf.decoding import SockInfo, slot_column
    from agent.ebpf.tracing import _in_slot_order

    entries = []
    for slot in (3, 0, 1):
        info = SockInfo()
        info.slot = slot
        entries.append(bytes(info))
    raw = memoryview(b"".join(entries))
    assert list(slot_column(raw)) == [3, 0, 1]
    assert _in_slot_order(raw) == [1, 2, 0]
    assert _in_slot_order(raw, [0, 2]) == [2, 0]

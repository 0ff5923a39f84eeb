"""Kernel map sizes: the hot path's slot array is a power of two, twice the sockets."""

from __future__ import annotations

import pytest

from agent.ebpf.tracing import Capacities


@pytest.mark.parametrize(
    ("sockets", "slots"), [(65536, 131072), (1024, 2048), (1000, 2048), (3, 8), (1, 2)]
)
def test_slots_default_to_twice_the_sockets_rounded_up_to_a_power_of_two(sockets, slots) -> None:
    assert Capacities(sockets=sockets).slots == slots


def test_slots_may_be_given() -> None:
    assert Capacities(sockets=1024, slots=2).slots == 2


@pytest.mark.parametrize("slots", [3, 1, 6144, -4])
def test_slots_that_are_not_a_power_of_two_are_refused(slots) -> None:
    with pytest.raises(ValueError, match=f"slots must be a power of two >= 2, not {slots}"):
        Capacities(slots=slots)

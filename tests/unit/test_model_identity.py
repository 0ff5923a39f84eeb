"""PeerIdentity.at_address: the same peer at another address, every other field kept."""

from __future__ import annotations

import dataclasses

from agent.model import PeerIdentity


def test_at_address_keeps_every_field_but_the_address() -> None:
    """Each field gets a value of its own, so a field the method forgets (or one added to
    the class later and not to the method) makes the two differ."""
    values: dict[str, object] = {}
    for number, field in enumerate(dataclasses.fields(PeerIdentity)):
        if field.name == "port":
            values[field.name] = 8000 + number
        elif field.name == "labels":
            values[field.name] = {"app": "web", "version": "v2"}
        else:
            values[field.name] = f"{field.name}-{number}"
    identity = PeerIdentity(**values)  # type: ignore[arg-type]
    moved = identity.at_address("198.18.0.9", 41000)
    assert moved == dataclasses.replace(identity, ip="198.18.0.9", port=41000)
    assert (moved.ip, moved.port) == ("198.18.0.9", 41000)
    assert moved.labels is identity.labels
    assert (identity.ip, identity.port) != (moved.ip, moved.port)  # the original is untouched

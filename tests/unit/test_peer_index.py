"""The accountant's peer index (agent.accounting._Peers) against a plain model: sockets by
4-tuple in the order they were put, the peer of a socket being another socket at the
reversed tuple - one in the same network namespace first, else the earliest put."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.accounting import _Peers
from agent.model import Endpoint, Role, SocketFlag, SocketSample

ENDS = (Endpoint("127.0.0.1", 80), Endpoint("127.0.0.1", 41000), Endpoint("198.18.0.2", 80))


def _sample(socket_id: int, local: int, remote: int, netns: int) -> SocketSample:
    return SocketSample(
        socket_id, 0, 0, ENDS[local], ENDS[remote], Role.CLIENT, SocketFlag.OPENED, netns
    )


class _Model:
    def __init__(self) -> None:
        self.by_tuple: dict[tuple[Endpoint, Endpoint], list[SocketSample]] = {}

    def put(self, sample: SocketSample) -> None:
        kept = self.by_tuple.setdefault((sample.local, sample.remote), [])
        kept[:] = [s for s in kept if s.socket_id != sample.socket_id] + [sample]

    def remove(self, sample: SocketSample) -> None:
        kept = self.by_tuple.get((sample.local, sample.remote), [])
        kept[:] = [s for s in kept if s.socket_id != sample.socket_id]

    def peer_of(self, sample: SocketSample) -> SocketSample | None:
        others = [s for s in self.by_tuple.get((sample.remote, sample.local), [])
                  if s.socket_id != sample.socket_id]  # fmt: skip
        same_netns = [s for s in others if s.netns == sample.netns]
        return (same_netns or others or [None])[0]


operations = st.lists(
    st.tuples(
        st.sampled_from(("put", "remove")),
        st.integers(1, 6),  # socket id
        st.integers(0, 2),  # local end
        st.integers(0, 2),  # remote end
        st.integers(1, 3),  # network namespace
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_the_peer_index_answers_as_the_model(steps) -> None:
    """Every 4-tuple holds one socket or several (the same tuple in other namespaces, or a
    socket id put again with another namespace); after each put or remove, every socket's
    peer is the model's."""
    index, model = _Peers(), _Model()
    seen: list[SocketSample] = []
    for operation, socket_id, local, remote, netns in steps:
        sample = _sample(socket_id, local, remote, netns)
        getattr(index, operation)(sample)
        getattr(model, operation)(sample)
        seen.append(sample)
        for probe in seen:
            assert index.peer_of(probe) == model.peer_of(probe), (operation, probe)


def test_a_lone_socket_and_its_peer() -> None:
    """``peer_of(client 127.0.0.1:41000 -> 127.0.0.1:80)`` is the server socket; a socket is
    never its own peer, and a removed one is no one's."""
    client, server = _sample(1, 1, 0, 7), _sample(2, 0, 1, 7)
    index = _Peers([client, server])
    assert (index.peer_of(client), index.peer_of(server)) == (server, client)
    looped = _sample(3, 0, 0, 7)  # 127.0.0.1:80 -> itself
    index.put(looped)
    assert index.peer_of(looped) is None
    index.remove(server)
    assert index.peer_of(client) is None

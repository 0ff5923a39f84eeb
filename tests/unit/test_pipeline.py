"""The poll loop: a poll that raises is logged, counted and survived; a bad reload is refused."""

from __future__ import annotations

import logging
import threading

from agent.accounting import Accountant
from agent.metrics.catalogue import load_catalogue
from agent.metrics.problems import ConfigError, ConfigProblem
from agent.model import KernelCounters, KernelPoll, SocketFlag
from agent.pipeline import Agent
from tests.support.fakes import FakeEnricher, sample


class FlakyKernel:
    """Polls return the scripted results; an Exception instance is raised instead."""

    backend = "fake"

    def __init__(self, script: list[KernelPoll | Exception]) -> None:
        self.script = list(script)

    def poll(self) -> KernelPoll:
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def map_usage(self) -> dict[str, tuple[int, int]]:
        return {"socks": (1, 1024), "closed": (0, 1024)}


def poll_of(*samples, finished=()) -> KernelPoll:
    return KernelPoll(KernelCounters(), tuple(samples), tuple(finished))


def received(agent: Agent) -> int:
    return sum(
        sum(family.samples.values())
        for family in agent.accountant.families()
        if family.name == "istio_tcp_received_bytes_total"
    )


def make_agent(kernel: FlakyKernel, loader=None) -> Agent:
    accountant = Accountant(load_catalogue([]), FakeEnricher({1: "web"}))
    return Agent(kernel, accountant, interval=1.0, catalogue_loader=loader)


def test_missed_lifecycle_events_are_exported_and_never_go_down() -> None:
    def missed(n: int) -> KernelPoll:
        return KernelPoll(KernelCounters(lifecycle_events_missed=n), (), ())

    agent = make_agent(FlakyKernel([missed(0), missed(2), missed(1), missed(3)]))
    seen = []
    for _ in range(4):
        assert agent.poll_once()
        metric = {m.name: m for m in agent.self_metrics()}["tcpacct_lifecycle_events_missed_total"]
        assert metric.kind == "counter"
        seen.append(list(metric.samples))
    assert seen == [[({}, 0)], [({}, 2)], [({}, 2)], [({}, 3)]]


def test_a_failing_poll_is_counted_logged_and_the_next_poll_counts_everything(caplog) -> None:
    kernel = FlakyKernel(
        [
            poll_of(sample(1, sent=100)),
            OSError(5, "injected: BPF map read failed"),
            poll_of(sample(1, sent=250)),
        ]
    )
    agent = make_agent(kernel)
    assert agent.poll_once()
    with caplog.at_level(logging.ERROR, logger="agent.pipeline"):
        assert not agent.poll_once()
    assert "poll failed" in caplog.text and "injected" in caplog.text
    assert agent.poll_once()
    assert (agent.stats.polls, agent.stats.errors) == (3, 1)
    assert received(agent) == 250  # client writes are the connection's received bytes
    errors = {m.name: m.samples for m in agent.self_metrics()}["tcpacct_poll_errors_total"]
    assert list(errors) == [({}, 1)]


def test_run_survives_failures_and_stops_on_the_event() -> None:
    stop = threading.Event()
    script: list[KernelPoll | Exception] = [RuntimeError("injected")] * 3
    script.append(poll_of(sample(1, sent=7, flags=SocketFlag.OPENED)))

    class StoppingKernel(FlakyKernel):
        def poll(self) -> KernelPoll:
            if len(self.script) == 1:
                stop.set()
            return super().poll()

    agent = make_agent(StoppingKernel(script))
    agent.interval = 0.01
    agent.run(stop)
    assert (agent.stats.polls, agent.stats.errors) == (4, 3)
    assert received(agent) == 7
    assert agent.readiness().ok


def test_a_bad_reload_keeps_the_running_definitions() -> None:
    def broken():
        raise ConfigError((ConfigProblem("m.yaml", "metric x", 3, 7, "bad"),))

    agent = make_agent(FlakyKernel([poll_of(sample(1, sent=5))]), loader=broken)
    agent.poll_once()
    before = [d.name for d in agent.accountant.definitions()]
    assert not agent.reload()
    assert [d.name for d in agent.accountant.definitions()] == before
    assert agent.stats.reloads == {"success": 0, "failure": 1}
    assert received(agent) == 5


def test_not_ready_before_the_first_poll_and_not_live_when_polls_stop() -> None:
    now = [100.0]
    kernel = FlakyKernel([poll_of()])
    accountant = Accountant(load_catalogue([]), FakeEnricher())
    agent = Agent(kernel, accountant, interval=10.0, clock=lambda: now[0])
    assert not agent.readiness().ok and agent.liveness().ok
    agent.poll_once()
    assert agent.readiness().ok
    now[0] += 59.0
    assert agent.liveness().ok  # stale after max(60 s, 6 intervals) without a good poll
    now[0] += 2.0
    stale = agent.liveness()
    assert not stale.ok and "no successful poll" in stale.detail

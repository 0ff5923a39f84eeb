"""The benchmark's results writer and comparisons, from fake measurements (no timing)."""

from __future__ import annotations

import json
import time

import pytest

from bench.accuracy import compare, exact_fraction, sums
from bench.figures import Figure, Omitted, Target, figure_from_dict
from bench.iperf import parse_report
from bench.reporting import number, why, write_results
from bench.stats import paired_difference, paired_ratio, summarise
from bench.tcplife import lost_samples, parse_rows
from bench.workloads import Moved

MACHINE = {"nproc": 2, "memory_mib": 1024, "kernel": "6.18.0", "python": "3.11", "bcc": "0.26"}


def _ratio_figure(
    key: str, on: float, off: float, rounds: list[float], details: dict[str, object]
) -> Figure:
    """A ratio figure held to the 0.99 target: ``on``/``off`` medians, its pairs' ratios
    ``rounds``, and ``details``."""
    return Figure(
        key=key,
        title=key.split(".")[1],
        unit="1/s",
        method="fake",
        on=summarise([on]),
        off=summarise([off]),
        ratio=summarise(rounds),
        target=Target("ratio", ">=", 0.99, ">= 0.99"),
        details=details,
    )


def _churn_figure(**details: object) -> Figure:
    """The churn figure as measure_datapath leaves it: 100 us a connection agent-off, 0.9
    kept, the 0.99 target, and ``details``."""
    return _ratio_figure("datapath.churn_per_s.tracepoint", 9000.0, 10000.0, [0.9], details)


def test_summary_and_pairs() -> None:
    spread = summarise([4.0, 1.0, 3.0, 2.0])
    assert (spread.median, spread.min, spread.max, spread.q1, spread.q3) == (
        2.5, 1.0, 4.0, 1.75, 3.25,
    )  # fmt: skip
    assert paired_ratio([110.0, 90.0], [100.0, 100.0]).rounds == (1.1, 0.9)
    assert paired_difference([180.0, 175.0], [60.0, 58.0]).rounds == (120.0, 117.0)


def test_target_verdicts() -> None:
    assert Target("added", "<=", 120).verdict(165.0) == (False, 45.0)
    assert Target("ratio", ">=", 0.95).verdict(0.97) == (True, 0.0)
    assert Target("ratio", ">=", 0.95).verdict(0.90)[0] is False


def test_an_every_round_target_is_missed_by_one_inexact_round() -> None:
    """Eight runs, one of them not exact: "100 % exact counts in every run" is missed (the
    median alone would read 1) and the reason names the check."""
    exact = Target("value", ">=", 1.0, "100 % exact counts in every run", every_round=True)
    figure = Figure(
        key="accuracy.churn.tracepoint",
        title="Accuracy under churn",
        unit="fraction of runs exact",
        method="fake",
        value=summarise([1.0] * 6 + [0.0, 1.0]),
        target=exact,
        details={"mismatches": [
            {"round": 6, "check": "server sockets seen", "expected": 12000, "got": 11999},
        ]},
    )  # fmt: skip
    assert figure.verdict() == (False, 1.0)
    assert figure_from_dict(figure.key, figure.as_dict()).verdict() == (False, 1.0)
    assert why(figure) == (
        "1 check(s) not exact: round 6: server sockets seen expected 12000, got 11999"
    )
    assert Target("value", ">=", 1.0).verdict(figure.value.median) == (True, 0.0)


def test_writer_produces_documented_keys(tmp_path) -> None:
    figures = [
        Figure(
            key="datapath.send_recv_ns_per_call.tracepoint",
            title="send/recv",
            unit="ns",
            method="fake",
            on=summarise([300.0, 310.0]),
            off=summarise([100.0, 110.0]),
            ratio=paired_ratio([300.0, 310.0], [100.0, 110.0]),
            added=paired_difference([300.0, 310.0], [100.0, 110.0]),
            target=Target("added", "<=", 120, "<= 120 ns"),
        ),
        Figure(
            key="cost.ready_s",
            title="ready",
            unit="s",
            method="fake",
            value=summarise([0.5, 0.7, 0.6]),
            target=Target("value", "<=", 1.0, "<= 1 s"),
        ),
    ]
    omitted = [Omitted("k8s.cache", "Kubernetes cache", "not usable")]
    json_path, md_path = write_results(
        tmp_path, figures, omitted, MACHINE, "2026-01-01T00:00:00+00:00"
    )
    document = json.loads(json_path.read_text())
    assert set(document) == {"machine", "date", "figures", "omitted"}
    assert document["machine"] == MACHINE
    send_recv = document["figures"]["datapath.send_recv_ns_per_call.tracepoint"]
    assert set(send_recv) == {
        "title", "unit", "on", "off", "ratio", "added", "target", "method",
    }  # fmt: skip
    assert send_recv["added"]["median"] == 200.0
    assert send_recv["target"] == {
        "of": "added", "op": "<=", "bound": 120, "text": "<= 120 ns", "every_round": False,
        "met": False, "missed_by": 80.0,
    }  # fmt: skip
    assert document["figures"]["cost.ready_s"]["value"]["rounds"] == [0.5, 0.7, 0.6]
    assert document["figures"]["cost.ready_s"]["target"]["met"] is True
    assert document["omitted"] == {
        "k8s.cache": {"title": "Kubernetes cache", "reason": "not usable"}
    }
    text = md_path.read_text()
    assert "1 of 2 targets met." in text
    assert "**missed by 80 ns**, 1.67x the bound" in text
    assert "not measured in this run: not usable" in text


def test_number_formatting() -> None:
    assert [number(1234.5), number(0.98765), number(12.345), number(float("nan"))] == [
        "1234", "0.988", "12.3", "n/a",
    ]  # fmt: skip


def _socket(role: str, local: int, remote: int, sent: int, received: int) -> dict:
    return {
        "role": role,
        "local": ["127.0.0.1", local],
        "remote": ["127.0.0.1", remote],
        "sent": sent,
        "received": received,
    }


def test_accuracy_compare_exact_and_off_by_one() -> None:
    moved = Moved(
        "rr", 80, 1.0, 10, client_sent=640, client_received=640, server_sent=640,
        server_received=640,
        tcp_info={"client_acked": 641, "client_received": 640},
        sequence_octets={"client_acked": 1},
    )  # fmt: skip
    sockets = [_socket("client", 5000, 80, 640, 640), _socket("server", 80, 5000, 640, 640)]
    service = {
        "istio_tcp_received_bytes_total": {"source": 640, "destination": 640},
        "istio_tcp_sent_bytes_total": {"source": 640, "destination": 640},
        "istio_tcp_connections_opened_total": {"source": 1, "destination": 1},
        "istio_tcp_connections_closed_total": {"source": 1, "destination": 1},
    }
    report = {"sockets": sockets, "services": {"127.0.0.1:80": service}}
    checks = compare(moved, report)
    assert all(c["exact"] for c in checks), [c for c in checks if not c["exact"]]
    sockets[1] = _socket("server", 80, 5000, 640, 639)
    wrong = [c["check"] for c in compare(moved, report) if not c["exact"]]
    assert wrong == [
        "tracer server_received = bytes moved",
        "accountant received{destination} = server reads",
    ]
    assert exact_fraction([checks, compare(moved, report)]) == 0.5
    assert sums(sockets, 80, data_client_port=5001)["client_sockets"] == 0


def test_iperf_report_adds_the_cookie() -> None:
    report = {
        "start": {"connected": [{"local_port": 5000}]},
        "end": {"sum_sent": {"bytes": 10}, "sum_received": {"bytes": 8, "seconds": 1.0}},
    }
    moved = parse_report(report, 9000, 1.0)
    assert (moved.client_sent, moved.server_received, moved.data_client_port) == (47, 45, 5000)


def test_tcplife_rows_and_lost_samples() -> None:
    text = (
        "PID,COMM,IP,LADDR,LPORT,RADDR,RPORT,TX_KB,RX_KB,MS\n"
        "7,nc,4,127.0.0.1,80,127.0.0.1,5000,2,0,0.10\n"
        "garbage\n"
    )
    rows = parse_rows(text)
    assert [(r.pid, r.local_port, r.remote_port, r.tx_kb, r.rx_kb) for r in rows] == [
        (7, 80, 5000, 2, 0)
    ]
    assert lost_samples("Possibly lost 12 samples\nPossibly lost 3 samples\n") == 15


def test_rotating_rounds_start_with_each_mode_in_turn() -> None:
    from bench.datapath import rotating

    rounds = list(rotating(("off", "hooks", "agent"), 3))
    assert rounds == [
        (0, "off"), (0, "hooks"), (0, "agent"),
        (1, "hooks"), (1, "agent"), (1, "off"),
        (2, "agent"), (2, "off"), (2, "hooks"),
    ]  # fmt: skip


def test_shuffled_rounds_hold_every_mode_once_in_orders_of_their_own() -> None:
    from bench.datapath import shuffled

    rounds = list(shuffled(("off", "a", "b", "c"), 12))
    assert rounds == list(shuffled(("off", "a", "b", "c"), 12))  # seeded
    orders = [tuple(mode for number, mode in rounds if number == n) for n in range(12)]
    assert all(sorted(order) == ["a", "b", "c", "off"] for order in orders)
    before_off = {order[order.index("off") - 1] for order in orders if order[0] != "off"}
    assert len(before_off) > 1  # "off" does not always follow the same mode


def test_churn_why_weighs_the_kernel_counters_against_the_budget() -> None:
    from bench.reporting import why

    churn = _churn_figure(
        hooks_only_ratio=0.91,
        agent_over_hooks=0.95,
        bpf_us_per_connection=6.0,
        program_runs_per_connection=30.0,
        dispatch_ns_per_run=100.0,  # 30 runs x 100 ns = 3 us
    )
    text = why(churn)
    assert "runs tcpacct's programs 30 times" in text
    assert "6.0 us inside them" in text
    assert "~3.0 us of dispatch (100 ns per run" in text
    assert "= 9.0 us on a connection's 100 us agent-off" in text
    assert "which alone would leave ~0.917" in text  # 100 / 109
    assert "0.99 leaves 1.0 us per connection" in text
    assert "hooks alone (maps emptied, nothing decoded) keep 0.910" in text
    # 100 us / 0.91 - 100 us = 9.9 us, against the 9.0 us counted
    assert text.endswith(
        "; the hooks-only rounds lost 9.9 us a connection, 1.1x the programs' counted run "
        "time and dispatch"
    )
    assert "short alternating blocks" not in text  # no blocks measured: none are told
    without = _churn_figure(**{
        "hooks_only_ratio": 0.91, "agent_over_hooks": 0.95,
    })  # fmt: skip
    assert why(without).endswith("both cost here")
    noisy = _churn_figure(**{
        **churn.details, "dispatch_ns_per_run": -338.0,
    })  # fmt: skip
    text = why(noisy)
    assert "~0.0 us of dispatch (the empty program's -338 ns per run is noise" in text
    assert "= 6.0 us on a connection's 100 us agent-off" in text
    assert "which alone would leave ~0.943" in text  # 100 / 106
    assert "lost 9.9 us a connection, 1.6x" in text  # against 6.0 us: no dispatch taken
    timed = _churn_figure(**{
        **churn.details, "hooks_added_wall_us": 8.04, "hooks_added_busy_us": 12.96,
    })  # fmt: skip
    assert why(timed).endswith(
        "1.1x the programs' counted run time and dispatch; per triplet, their wall time grew "
        "8.0 us a connection and the two CPUs' busy time 13.0 us (less their idle residency: "
        "both ends, softirqs, the probe)"
    )


def test_a_reports_service_totals_are_counted_from_the_rounds_mark() -> None:
    """A listener's ephemeral port can be one an earlier workload's server had: the
    accountant's series for it already holds that workload's counts (one 120000-byte
    connection, as a churn round found), so a round's totals are taken from its mark."""
    from agent.accounting import AccountingStats, FamilySnapshot
    from bench.probe import SERVICE_LABEL, ProbedAgent

    labels = ("reporter", SERVICE_LABEL)
    totals = {("source", "127.0.0.1:80"): 120_000}

    class Accountant:
        def families(self):
            return [FamilySnapshot("istio_tcp_received_bytes_total", "", labels, dict(totals))]

        def stats(self):
            return AccountingStats(0, 0, 0, 0, 0, 0, 0)

    agent = ProbedAgent(tracer=None, accountant=Accountant(), interval=0)  # type: ignore[arg-type]
    agent.report({0}, mark=True)
    totals[("source", "127.0.0.1:80")] += 768_000  # this round's workload
    services = agent.report({80})["services"]
    assert services == {"127.0.0.1:80": {"istio_tcp_received_bytes_total": {"source": 768_000}}}


def test_a_round_with_a_missed_lifecycle_event_is_not_exact() -> None:
    """The accuracy checks include the agent's own loss counters, each against the round's
    mark: one lifecycle event missed during the round makes it inexact, one missed before
    it does not."""
    from bench.datapath import LIFECYCLE_CHECK, _unchanged

    mark = {"lifecycle_events_missed": 2, "unattributed": [0, 64]}
    same = _unchanged(LIFECYCLE_CHECK, mark, dict(mark), "lifecycle_events_missed")
    assert (same["expected"], same["got"], same["exact"]) == (2, 2, True)
    report = {"lifecycle_events_missed": 3, "unattributed": [0, 64]}
    missed = _unchanged(LIFECYCLE_CHECK, mark, report, "lifecycle_events_missed")
    assert (missed["expected"], missed["got"], missed["exact"]) == (2, 3, False)
    spilled = _unchanged("u", mark, {"unattributed": [64, 64]}, "unattributed")
    assert (spilled["expected"], spilled["got"], spilled["exact"]) == (64, 128, False)


def test_the_probes_poller_survives_a_poll_that_raises_and_reports_it() -> None:
    """A periodic poll that raises is kept in ``poller_errors`` (an accuracy check reads
    them) and the poller goes on polling, as the agent's does."""
    import threading

    from agent.model import KernelCounters, KernelPoll
    from bench.probe import ProbedAgent

    polled = threading.Event()

    class Tracer:
        calls = 0

        def poll(self) -> KernelPoll:
            self.calls += 1
            if self.calls == 1:
                raise OSError(5, "injected")
            if self.calls >= 3:
                polled.set()
            return KernelPoll(KernelCounters(), (), ())

    class Accountant:
        def apply(self, poll: KernelPoll) -> None:
            pass

    agent = ProbedAgent(Tracer(), Accountant(), interval=0.01, drain_period=0)  # type: ignore[arg-type]
    agent.start_poller()
    try:
        assert polled.wait(10.0)
    finally:
        agent.stop.set()
        assert agent.thread is not None
        agent.thread.join(5.0)
    assert agent.poller_errors == ["OSError: [Errno 5] injected"]
    assert len(agent.poller_cpu) >= 2


def test_the_probe_drains_the_closed_map_as_the_agent_does() -> None:
    """Between polls the probe's drainer empties the kernel's closed map every drain period,
    as the agent's (decoded while accounting, raw in hooks-only rounds, not at all while
    detached), and its thread CPU counts in the next poll's figure."""
    import threading

    from bench.probe import ProbedAgent

    drained, discarded = threading.Event(), threading.Event()

    class Reader:
        def take(self) -> memoryview:
            discarded.set()
            return memoryview(b"")

        def release(self) -> None:
            pass

    class Tracer:
        _lock = threading.Lock()
        _finished = Reader()
        drains = 0

        def drain(self) -> int:
            self.drains += 1
            sum(range(20_000))  # some CPU for the figure
            drained.set()
            return 0

    tracer = Tracer()
    agent = ProbedAgent(tracer, None, interval=3600.0, drain_period=0.01)  # type: ignore[arg-type]
    agent.start_poller()
    try:
        assert drained.wait(10.0)
        assert not discarded.is_set()
        agent.accounting = False
        assert discarded.wait(10.0)
        agent.attached.clear()
        time.sleep(0.05)  # a drain under way ends
        drains = tracer.drains
        time.sleep(0.1)
        assert tracer.drains == drains, "a detached probe drains nothing"
    finally:
        agent.stop.set()
        assert agent.drainer is not None
        agent.drainer.join(5.0)
    assert agent._take_drain_cpu() > 0
    assert agent._take_drain_cpu() == 0
    assert agent.poller_errors == []


def test_k8s_accounting_polls_are_new_connections_whose_ends_mirror_each_other() -> None:
    """bench.k8s_cache's accounting figure must measure sockets the accountant has never
    seen: ids of consecutive polls must not overlap, and each client's peer is its server."""
    from agent.model import Role
    from bench.k8s_cache import CONNECTIONS_PER_POLL, finished_pairs

    polls = [finished_pairs(number) for number in (0, 1)]
    ids = [s.socket_id for poll in polls for s in poll]
    assert len(ids) == len(set(ids)) == 4 * CONNECTIONS_PER_POLL
    client, server = polls[1][0], polls[1][1]
    assert (client.role, server.role) == (Role.CLIENT, Role.SERVER)
    assert (client.local, client.remote) == (server.remote, server.local)
    assert server.local.port == 8080


def test_churn_why_tells_the_short_blocks_interval() -> None:
    from bench.reporting import why

    churn = _churn_figure(
        hooks_only_ratio=0.91,
        agent_over_hooks=0.95,
        blocks_mean=0.9312,
        blocks_low=0.9104,
        blocks_high=0.9525,
        blocks_pairs=64,
    )
    assert (
        "; in 64 short alternating blocks the whole agent keeps 0.931 (95 % interval 0.910-0.953)"
    ) in why(churn)
    churn.details.update(blocks_empty_mean=0.9712, blocks_empty_low=0.9655, blocks_empty_high=0.977)
    assert (
        "keeps 0.931 (95 % interval 0.910-0.953) and an empty program on its hooks 0.971 "
        "(0.966-0.977)"
    ) in why(churn)
    churn.details.update(
        blocks_lean_mean=0.951, blocks_lean_low=0.94, blocks_lean_high=0.962,
        blocks_empty_lean_mean=0.99, blocks_empty_lean_low=0.978, blocks_empty_lean_high=1.002,
    )  # fmt: skip
    assert (
        "(0.966-0.977); without its state-change hooks (entries made at the first byte) the "
        "hooks keep 0.951 (0.940-0.962), an empty program where that variant attaches 0.990 "
        "(0.978-1.002)"
    ) in why(churn)
    churn.details.update(
        blocks_empty_data_mean=0.995, blocks_empty_data_low=0.983, blocks_empty_data_high=1.007,
        blocks_no_twins_mean=0.962, blocks_no_twins_low=0.95, blocks_no_twins_high=0.975,
        blocks_no_twins_over_hooks_mean=1.014, blocks_no_twins_over_hooks_low=1.001,
        blocks_no_twins_over_hooks_high=1.027,
        blocks_off_again_mean=1.002, blocks_off_again_low=0.99, blocks_off_again_high=1.014,
    )  # fmt: skip
    assert (
        "an empty program on its hooks 0.971 (0.966-0.977), on the data tracepoints alone "
        "0.995 (0.983-1.007); without its state-change hooks"
    ) in why(churn)
    assert (
        "(0.978-1.002); without the lifecycle handlers' recursion twins the hooks keep 0.962 "
        "(0.950-0.975), 1.014 (1.001-1.027) of the whole hooks'; nothing attached, twice, "
        "reads 1.002 (0.990-1.014)"
    ) in why(churn)


def test_ratio_interval_is_the_geometric_mean_of_the_pairs() -> None:
    from bench.stats import ratio_interval

    same = ratio_interval([100.0, 200.0, 50.0], [100.0, 200.0, 50.0])
    assert (same.mean, same.low, same.high, same.pairs) == (1.0, 1.0, 1.0, 3)
    # ratios 0.5 and 2: their logs cancel; the interval is exp(+-2 x sd / sqrt(2))
    wide = ratio_interval([50.0, 200.0], [100.0, 100.0])
    assert round(wide.mean, 9) == 1.0
    assert round(wide.low * wide.high, 9) == 1.0 and wide.low < 0.5 < 2 < wide.high
    try:
        ratio_interval([1.0], [1.0])
    except ValueError as error:
        assert "need 2+ pairs" in str(error)
    else:
        raise AssertionError("one pair gave an interval")


@pytest.mark.parametrize("backend", ["tracepoint", "fentry"])
def test_churn_blocks_switch_every_block_and_pair_each_mode(monkeypatch, backend) -> None:
    """Every block is preceded by its mode's switch; each server takes whole sets; the
    ratios pair each set's blocks; the empty programs and the two variants (tracepoint
    backend only) are on only in their blocks, the empty programs with tcpacct detached, the
    lean variant without its state-change hooks, no_twins without the recursion twins (fake
    probe, programs and churn: no timing). The fake probe attaches only when detached, as
    the real one does."""
    import contextlib

    import bench.datapath as datapath

    requests: list[dict] = []
    probe_state: list[tuple[bool, tuple[str, ...]] | None] = [None]  # (accounting, without)
    empty_on: list[tuple[str, ...]] = []
    closed: list[bool] = []
    six = ("inet_sock_set_state", "inet_sock_set_state", "tcp_destroy_sock")

    class FakeProbe:
        def request(self, command: dict) -> dict:
            requests.append(command)
            if command["cmd"] == "detach":
                probe_state[0] = None
            elif command["cmd"] == "attach":
                accounting = command.get("accounting", True)
                held = probe_state[0]
                without = tuple(command.get("without", ())) if held is None else held[1]
                probe_state[0] = (accounting, without)
            return {"ok": True}

    class FakeEmptyHooks:
        @contextlib.contextmanager
        def attached(self, hooks):
            empty_on.append(tuple(hooks))
            try:
                yield
            finally:
                empty_on.pop()

        def close(self) -> None:
            closed.append(True)

    rate_of = {"off": 100.0, "empty": 98.0, "hooks": 90.0, "agent": 95.0, "lean": 93.0}
    rate_of.update(empty_lean=99.0, empty_data=99.5, no_twins=91.8)
    empty_modes = {
        six: "empty",
        ("tcp_destroy_sock",): "empty_lean",
        ("sock_send_length", "sock_recv_length"): "empty_data",
    }
    variant_of = {
        ("inet_sock_set_state",): "lean",
        ("on_set_state_nested", "on_destroy_nested"): "no_twins",
    }
    servers: list[int] = []

    def fake_blocks(blocks, connections, size, client_cpu, server_cpu, before_block):
        servers.append(blocks)
        rates = []
        for block in range(blocks):
            before_block(block)
            state = probe_state[0]
            if empty_on:
                assert state is None and len(empty_on) == 1
                mode = empty_modes[empty_on[0]]
            elif state is None:
                rates.append(100.0)  # off or off_again
                continue
            elif state[1]:
                assert state[0] is False
                mode = variant_of[state[1]]
            else:
                mode = "agent" if state[0] else "hooks"
            rates.append(rate_of[mode])
        return rates

    monkeypatch.setattr(datapath, "churn_blocks", fake_blocks)
    monkeypatch.setattr(datapath, "EmptyHooks", FakeEmptyHooks)
    monkeypatch.setattr(datapath, "tcpacct_attachments", lambda: six)
    plan = datapath.DatapathPlan(churn_block_sets=5, churn_sets_per_server=2)
    figure = datapath.measure_churn_blocks(FakeProbe(), plan, backend)
    modes = 9 if backend == "tracepoint" else 3
    assert servers == [2 * modes, 2 * modes, modes]
    assert figure.ratio.rounds == (0.95,) * 5
    assert figure.details["hooks_ratio"]["rounds"] == [0.9] * 5
    assert round(figure.details["interval_95"]["mean"], 9) == 0.95
    if backend == "tracepoint":
        d = figure.details
        assert d["empty_ratio"]["rounds"] == [0.98] * 5
        assert round(d["empty_interval_95"]["mean"], 9) == 0.98
        assert round(d["agent_over_empty_interval_95"]["mean"], 9) == round(95 / 98, 9)
        assert round(d["lean_interval_95"]["mean"], 9) == 0.93
        assert round(d["empty_lean_interval_95"]["mean"], 9) == 0.99
        assert round(d["lean_over_empty_lean_interval_95"]["mean"], 9) == round(93 / 99, 9)
        assert round(d["empty_data_interval_95"]["mean"], 9) == 0.995
        assert round(d["no_twins_interval_95"]["mean"], 9) == 0.918
        assert round(d["no_twins_over_hooks_interval_95"]["mean"], 9) == round(91.8 / 90, 9)
        assert d["off_again_interval_95"]["mean"] == 1.0
        assert d["variants_without"]["no_twins"] == ["on_set_state_nested", "on_destroy_nested"]
        assert closed == [True]
    else:
        assert "empty_ratio" not in figure.details and closed == []
    assert empty_on == []  # the empty programs detached at the end
    assert requests[-1] == {"cmd": "attach"}  # the agent left on, as it was found


def test_why_of_a_missed_ratio_tells_its_interval() -> None:
    """A missed ratio target with its pairs' interval: whether the bound lies inside it."""
    from bench.reporting import why

    def iperf(low: float, high: float, rounds: list[float]) -> Figure:
        interval = {"mean": 0.959, "low": low, "high": high, "pairs": 16}
        key = "datapath.iperf3_128k_gbps.tracepoint"
        return _ratio_figure(key, 19.0, 20.0, rounds, {"interval_95": interval})

    assert why(iperf(0.921, 1.004, [0.95, 0.96, 0.97])) == (
        "the 16 pairs' geometric mean 0.959, 95 % interval 0.921-1.004, holds the bound 0.99"
    )
    spread = why(iperf(0.931, 0.979, [0.51, 0.96, 1.07]))
    assert spread.startswith("per-round ratios disagree")
    assert spread.endswith("95 % interval 0.931-0.979, lies wholly on one side of the bound 0.99")

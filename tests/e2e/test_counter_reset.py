"""Agent SIGKILLed and restarted while traffic flows: Prometheus sees one normal counter reset.

Local mode on loopback (the restart is what is tested, not the labels): a real Prometheus
scrapes the agent every second; the agent is killed with SIGKILL between two connections'
worth of traffic and started again on the same port. Prometheus must see exactly one reset
of the connection's series, the value before the kill equal to the bytes moved then, and the
value after equal to the bytes moved after the restart (the new agent counts from its start).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.processes import AgentProcess
from tests.e2e.prometheus_server import PrometheusServer, free_loopback_port
from tests.support.harness import connect_pair, exchange, listener, service_of


def wait_value(
    prometheus: PrometheusServer, expression: str, want: float, deadline: float = 30.0
) -> float:
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        result = prometheus.query(expression)
        last = result[0][1] if result else None
        if last == want:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{expression} = {last}, expected {want}")


@pytest.mark.usefixtures("e2e_prerequisites")
def test_sigkill_and_restart_is_a_normal_counter_reset_in_prometheus(tmp_path) -> None:
    port = free_loopback_port()
    arguments = ["--interval", "1", "--no-kubernetes", "--log-level", "warning"]
    agent = AgentProcess(port, arguments, tmp_path / "agent-1.log")
    restarted = AgentProcess(port, arguments, tmp_path / "agent-2.log")
    with (
        PrometheusServer(tmp_path / "prometheus", f"127.0.0.1:{port}") as prometheus,
        listener() as lsock,
    ):
        try:
            agent.start()
            agent.wait_ready()
            prometheus.wait_target_up()
            service = service_of(lsock.getsockname())
            series = (
                f'istio_tcp_received_bytes_total{{destination_service="{service}",'
                f'reporter="source"}}'
            )
            client, server = connect_pair(lsock)
            exchange(client, server, 50_000, 10)
            wait_value(prometheus, series, 50_000)

            assert agent.process is not None
            agent.process.send_signal(signal.SIGKILL)
            agent.process.wait(timeout=10)
            agent.process = None
            exchange(client, server, 7_000, 10)  # while no agent runs: not counted by anyone
            restarted.start()
            restarted.wait_ready()
            exchange(client, server, 3_000, 10)  # counted by the new agent, from its start
            wait_value(prometheus, series, 3_000)
            assert [v for _, v in prometheus.query(f"resets({series}[5m])")] == [1.0]
            assert [v for _, v in prometheus.query(f"max_over_time({series}[5m])")] == [50_000]
            client.close()
            server.close()
        finally:
            agent.stop()
            assert restarted.stop() == 0

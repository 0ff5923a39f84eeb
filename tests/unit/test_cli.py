"""``tcpacct run`` flag validation and environment twins, without starting anything.

``agent.cli._run`` (where privileged work begins) is replaced by a recorder, and
``agent.wiring.build_agent`` by a tripwire, so no test here can load BPF or bind a port.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent import cli, wiring
from agent.settings import Settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "metrics"


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Settings that reached ``_run`` (a valid command line)."""
    calls: list[Settings] = []

    def record(settings: Settings) -> int:
        calls.append(settings)
        return 0

    def tripwire(settings: Settings) -> None:
        raise AssertionError("build_agent must not run in unit tests")

    monkeypatch.setattr(cli, "_run", record)
    monkeypatch.setattr(wiring, "build_agent", tripwire)
    for name in ("INTERVAL", "LISTEN", "BACKEND", "LOG_LEVEL", "MAX_SOCKETS", "CONFIG",
                 "KUBERNETES", "KUBECONFIG", "NODE_NAME", "TLS_CERT", "TLS_KEY", "BASIC_AUTH",
                 "BEARER_TOKEN", "PROC_ROOT", "CGROUP_ROOT", "BTF_PATH", "MAX_SERIES",
                 "SERIES_TTL", "COMPILE_CACHE"):
        monkeypatch.delenv(f"TCPACCT_{name}", raising=False)
    monkeypatch.delenv("NODE_NAME", raising=False)
    return calls


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, args, env=env)


def refused(result: Result, started: list[Settings]) -> str:
    """The error text of a refused command line (exit 2, nothing started)."""
    assert result.exit_code == 2, result.output
    assert started == []
    return result.output.split("Error: ", 1)[1].strip()


# -- refused before anything starts ---------------------------------------------------------------

AT_LEAST = "the report interval must be at least 1 s"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.5", f"--interval '0.5': {AT_LEAST}"),
        ("abc", "--interval 'abc': expected seconds, e.g. 10, 1.5s or 1m"),
        ("-1", f"--interval '-1': {AT_LEAST}"),
        ("nan", "--interval 'nan': not a finite duration"),
        ("0", f"--interval '0': {AT_LEAST}"),
    ],
)
def test_bad_interval_flag(started, value: str, message: str) -> None:
    error = refused(invoke(["run", "--interval", value]), started)
    assert error == f"Invalid value for '--interval': {message}"


@pytest.mark.parametrize("value", ["0.5", "abc", "-1", "nan"])
def test_bad_interval_from_the_environment(started, value: str) -> None:
    error = refused(invoke(["run"], env={"TCPACCT_INTERVAL": value}), started)
    assert f"--interval {value!r}:" in error


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bad", "--listen 'bad': expected HOST:PORT, e.g. 0.0.0.0:9437"),
        ("0.0.0.0:99999", "--listen '0.0.0.0:99999': port must be 1-65535"),
        ("host.example:80", "--listen 'host.example:80': 'host.example' is not an IP address "
                            "(or localhost)"),
    ],
)
def test_bad_listen(started, value: str, message: str) -> None:
    assert refused(invoke(["run", "--listen", value]), started) == (
        f"Invalid value for '--listen': {message}"
    )
    assert message in refused(invoke(["run"], env={"TCPACCT_LISTEN": value}), started)


def test_half_tls_config_is_refused(started, tmp_path: Path) -> None:
    message = "--tls-cert and --tls-key go together: give both or neither"
    cert = str(tmp_path / "cert.pem")
    assert refused(invoke(["run", "--tls-cert", cert]), started) == message
    assert refused(invoke(["run"], env={"TCPACCT_TLS_KEY": cert}), started) == message


def test_basic_auth_and_bearer_together_are_refused(started) -> None:
    result = invoke(["run", "--basic-auth", "u:p", "--bearer-token", "t"])
    assert refused(result, started) == "choose one of --basic-auth and --bearer-token, not both"


@pytest.mark.parametrize("value", ["nocolon", ":pw", "user:"])
def test_malformed_basic_auth(started, value: str) -> None:
    assert refused(invoke(["run", "--basic-auth", value]), started) == (
        "Invalid value for '--basic-auth': --basic-auth: expected USER:PASSWORD"
    )


def test_unknown_backend(started) -> None:
    error = refused(invoke(["run"], env={"TCPACCT_BACKEND": "uprobe"}), started)
    assert error.startswith("Invalid value for '--backend': 'uprobe' is not one of")


def test_bad_map_capacity(started) -> None:
    assert refused(invoke(["run", "--max-sockets", "10"]), started) == (
        "Invalid value for '--max-sockets': --max-sockets 10: must be between 1024 and 4194304"
    )


def test_bad_log_level(started) -> None:
    error = refused(invoke(["run", "--log-level", "trace"]), started)
    assert error.startswith("Invalid value for '--log-level': 'trace' is not one of")


def test_bad_series_budget_and_ttl(started) -> None:
    assert refused(invoke(["run", "--max-series", "5"]), started) == (
        "Invalid value for '--max-series': --max-series 5: at least 10"
    )
    assert refused(invoke(["run"], env={"TCPACCT_SERIES_TTL": "30s"}), started) == (
        "Invalid value for '--series-ttl': --series-ttl '30s': at least 1m (or 0 to disable)"
    )


def test_bad_niceness(started) -> None:
    assert refused(invoke(["run", "--nice", "-1"]), started) == (
        "--nice -1: must be 0-19 (the agent only ever lowers its own priority)"
    )
    error = refused(invoke(["run"], env={"TCPACCT_NICE": "low"}), started)
    assert error == "Invalid value for '--nice': 'low' is not a valid integer."


def test_niceness_becomes_a_setting(started) -> None:
    assert invoke(["run"], env={"TCPACCT_NICE": "0"}).exit_code == 0
    assert invoke(["run", "--nice", "19"]).exit_code == 0
    assert [settings.nice for settings in started] == [0, 19]


def test_series_budget_and_ttl_become_settings(started) -> None:
    result = invoke(["run", "--max-series", "500"], env={"TCPACCT_SERIES_TTL": "0"})
    assert result.exit_code == 0, result.output
    assert (started[0].max_series, started[0].series_ttl) == (500, 0.0)


# -- valid command lines reach _run with the right settings ---------------------------------------


def test_defaults(started) -> None:
    result = invoke(["run"])
    assert result.exit_code == 0, result.output
    assert started == [Settings()]


def test_flags_become_settings(started, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    result = invoke([
        "run", "--listen", "[::1]:9000", "--interval", "2m", "--backend", "tracepoint",
        "--log-level", "debug", "--max-sockets", "2048", "--tls-cert", str(cert),
        "--tls-key", str(key), "--basic-auth", "prom:s3:cret", "--proc-root", "/host/proc",
        "--no-kubernetes",
    ])
    assert result.exit_code == 0, result.output
    assert started == [
        Settings(
            listen_host="::1", listen_port=9000, interval=120.0, backend="tracepoint",
            log_level="debug", max_sockets=2048, max_closed=2048, tls_cert=cert, tls_key=key,
            basic_auth=("prom", "s3:cret"), proc_root=Path("/host/proc"), kubernetes=False,
        )
    ]


def test_environment_twins_become_settings(started) -> None:
    result = invoke(["run"], env={
        "TCPACCT_INTERVAL": "1.5s",
        "TCPACCT_LISTEN": "127.0.0.1:19437",
        "TCPACCT_BACKEND": "kprobe",
        "TCPACCT_MAX_SOCKETS": "4096",
        "TCPACCT_CONFIG": "a.yaml:b.yaml",  # README: `:`-separated
        "TCPACCT_KUBERNETES": "true",
        "TCPACCT_BEARER_TOKEN": "t0ken",
        "NODE_NAME": "node-7",
        "TCPACCT_BTF_PATH": "/host/sys/kernel/btf/vmlinux",
        "TCPACCT_COMPILE_CACHE": "/var/lib/tcpacct/bpf",
    })
    assert result.exit_code == 0, result.output
    assert started == [
        Settings(
            listen_host="127.0.0.1", listen_port=19437, interval=1.5, backend="kprobe",
            max_sockets=4096, max_closed=4096, config_files=(Path("a.yaml"), Path("b.yaml")),
            kubernetes=True, bearer_token="t0ken", node_name="node-7",
            btf_path=Path("/host/sys/kernel/btf/vmlinux"),
            compile_cache=Path("/var/lib/tcpacct/bpf"),
        )
    ]


def test_flag_wins_over_its_environment_twin(started) -> None:
    result = invoke(["run", "--interval", "30"], env={"TCPACCT_INTERVAL": "0.1"})
    assert result.exit_code == 0, result.output
    assert started[0].interval == 30.0


# -- _run's own checks that come before anything privileged --------------------------------------


def test_unprivileged_user_is_told_to_use_sudo(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cli, "_has_bpf_capabilities", lambda: False)

    def tripwire(settings: Settings) -> None:
        raise AssertionError("build_agent must not run")

    monkeypatch.setattr(wiring, "build_agent", tripwire)
    assert cli._run(Settings()) == 1
    assert capsys.readouterr().err == (
        "tcpacct: needs root (or CAP_BPF and CAP_PERFMON) to load BPF programs; run with sudo\n"
    )


def test_invalid_metric_config_exits_2_before_loading_bpf(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)

    def tripwire(settings: Settings) -> None:
        raise AssertionError("build_agent must not run")

    monkeypatch.setattr(wiring, "build_agent", tripwire)
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics:\n  - name: 'not a name'\n")
    assert cli._run(Settings(config_files=(bad,))) == 2
    assert capsys.readouterr().err.startswith("tcpacct: invalid metric config:\n")


# -- config validate --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tcp-metrics.yaml", "tcp-metrics-native.yaml",
                                  "tcp-metrics-crd.yaml"])
def test_config_validate_accepts_a_fixture_file(name: str) -> None:
    result = invoke(["config", "validate", str(FIXTURES / name)])
    assert (result.exit_code, result.output) == (
        0,
        "ok: 1 file(s) valid; metrics: istio_tcp_sent_bytes_total, "
        "istio_tcp_received_bytes_total, istio_tcp_connections_opened_total, "
        "istio_tcp_connections_closed_total, istio_mongo_sent_bytes, "
        "istio_mongo_received_bytes\n",
    )


def test_config_validate_refuses_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics:\n  - name: 'not a name'\n")
    result = invoke(["config", "validate", str(bad)])
    assert result.exit_code == 1
    assert str(bad) in result.output

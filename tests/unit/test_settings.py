"""Settings: flag parsing with user-facing messages, and the frozen Settings object."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.settings import (
    Settings,
    SettingsError,
    parse_capacity,
    parse_duration,
    parse_interval,
    parse_listen,
    parse_max_series,
    parse_ttl,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:9437", ("0.0.0.0", 9437)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:9437", ("::1", 9437)),
        ("[2001:db8::5]:65535", ("2001:db8::5", 65535)),
        (":9437", ("0.0.0.0", 9437)),
        ("localhost:8080", ("localhost", 8080)),
        ("  198.18.0.1:80  ", ("198.18.0.1", 80)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9437", "--listen '9437': expected HOST:PORT, e.g. 0.0.0.0:9437"),
        ("0.0.0.0:", "--listen '0.0.0.0:': expected HOST:PORT, e.g. 0.0.0.0:9437"),
        ("0.0.0.0:http", "--listen '0.0.0.0:http': expected HOST:PORT, e.g. 0.0.0.0:9437"),
        ("0.0.0.0:-1", "--listen '0.0.0.0:-1': expected HOST:PORT, e.g. 0.0.0.0:9437"),
        ("0.0.0.0:0", "--listen '0.0.0.0:0': port must be 1-65535"),
        ("0.0.0.0:65536", "--listen '0.0.0.0:65536': port must be 1-65535"),
        ("example.com:80", "--listen 'example.com:80': 'example.com' is not an IP address "
                           "(or localhost)"),
        ("300.1.1.1:80", "--listen '300.1.1.1:80': '300.1.1.1' is not an IP address "
                         "(or localhost)"),
    ],
)
def test_parse_listen_refuses(text: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_listen(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10", 10.0),
        ("1", 1.0),
        ("1.5", 1.5),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1500ms", 1.5),
        (" 30S ", 30.0),
        ("1h", 3600.0),
        ("3600", 3600.0),
        (5, 5.0),
        (2.5, 2.5),
    ],
)
def test_parse_interval(text: str | float, seconds: float) -> None:
    assert parse_interval(text) == seconds


AT_LEAST = "the report interval must be at least 1 s"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5", f"--interval '0.5': {AT_LEAST}"),
        ("0", f"--interval '0': {AT_LEAST}"),
        ("-1", f"--interval '-1': {AT_LEAST}"),
        ("999ms", f"--interval '999ms': {AT_LEAST}"),
        ("nan", "--interval 'nan': not a finite duration"),
        ("inf", "--interval 'inf': not a finite duration"),
        ("-inf", "--interval '-inf': not a finite duration"),
        ("3601", "--interval '3601': at most 3600 s"),
        ("abc", "--interval 'abc': expected seconds, e.g. 10, 1.5s or 1m"),
        ("", "--interval '': expected seconds, e.g. 10, 1.5s or 1m"),
        ("2h", "--interval '2h': at most 3600 s"),
        ("10d", "--interval '10d': expected seconds, e.g. 10, 1.5s or 1m"),
        ("s", "--interval 's': expected seconds, e.g. 10, 1.5s or 1m"),
    ],
)
def test_parse_interval_refuses(text: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_interval(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "value"),
    [("1024", 1024), ("65536", 65536), (" 4194304 ", 4194304), (2048, 2048)],
)
def test_parse_capacity(text: str | int, value: int) -> None:
    assert parse_capacity(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1023", "--max-sockets 1023: must be between 1024 and 4194304"),
        ("4194305", "--max-sockets 4194305: must be between 1024 and 4194304"),
        ("-5", "--max-sockets -5: must be between 1024 and 4194304"),
        ("64k", "--max-sockets '64k': expected a whole number"),
        ("1e4", "--max-sockets '1e4': expected a whole number"),
    ],
)
def test_parse_capacity_refuses(text: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_capacity(text)
    assert str(caught.value) == message


def test_parse_capacity_names_the_flag_it_parses() -> None:
    with pytest.raises(SettingsError, match=r"^--max-closed 10: "):
        parse_capacity("10", flag="--max-closed")


def test_settings_defaults() -> None:
    settings = Settings()
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 9437)
    assert (settings.interval, settings.backend, settings.log_level) == (10.0, "auto", "info")
    assert (settings.max_sockets, settings.max_closed) == (65536, 65536)
    assert settings.proc_root == Path("/proc")
    assert settings.cgroup_root == Path("/sys/fs/cgroup")
    assert settings.btf_path == Path("/sys/kernel/btf/vmlinux")
    assert (settings.tls_cert, settings.tls_key) == (None, None)
    assert (settings.basic_auth, settings.bearer_token) == (None, None)
    assert settings.nice == 10


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.interval = 1.0  # type: ignore[misc]


def test_settings_repr_hides_secrets() -> None:
    text = repr(Settings(basic_auth=("prom", "s3cret")))
    assert "s3cret" not in text
    assert "prom" not in text
    assert "hunter2" not in repr(Settings(bearer_token="hunter2"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "uprobe"}, "--backend 'uprobe': choose one of auto, tracepoint, fentry, "
                                "kprobe"),
        ({"log_level": "trace"}, "--log-level 'trace': one of debug, info, warning, error"),
        ({"tls_cert": Path("c.pem")}, "--tls-cert and --tls-key go together: give both or "
                                      "neither"),
        ({"tls_key": Path("k.pem")}, "--tls-cert and --tls-key go together: give both or "
                                     "neither"),
        ({"basic_auth": ("u", "p"), "bearer_token": "t"},
         "choose one of --basic-auth and --bearer-token, not both"),
        ({"nice": 20}, "--nice 20: must be 0-19 (the agent only ever lowers its own priority)"),
        ({"nice": -5}, "--nice -5: must be 0-19 (the agent only ever lowers its own priority)"),
    ],
)
def test_settings_refuse_inconsistent_values(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(**kwargs)
    assert str(caught.value) == message


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("0", 0.0), ("-3", -3.0), ("1.5h", 5400.0), (7, 7.0)],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text, "--x") == seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600.0), ("60", 60.0), ("1h", 3600.0), ("0", 0.0), ("0s", 0.0), ("off", 0.0)],
)
def test_parse_ttl(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("59", "--series-ttl '59': at least 1m (or 0 to disable)"),
        ("-1m", "--series-ttl '-1m': at least 1m (or 0 to disable)"),
        ("nan", "--series-ttl 'nan': not a finite duration"),
        ("soon", "--series-ttl 'soon': expected seconds, e.g. 10, 1.5s or 1m"),
    ],
)
def test_parse_ttl_refuses(text: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_ttl(text)
    assert str(caught.value) == message


def test_parse_max_series() -> None:
    assert parse_max_series("10") == 10
    assert parse_max_series(" 10000 ") == 10000
    with pytest.raises(SettingsError) as caught:
        parse_max_series("9")
    assert str(caught.value) == "--max-series 9: at least 10"
    with pytest.raises(SettingsError) as caught:
        parse_max_series("lots")
    assert str(caught.value) == "--max-series 'lots': expected a whole number"

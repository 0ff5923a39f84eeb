"""One frozen settings object for ``tcpacct run``; every flag has a ``TCPACCT_*`` env twin.

Parsing functions raise :class:`SettingsError` with a message fit for the user.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path

BACKEND_CHOICES = ("auto", "tracepoint", "fentry", "kprobe")
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_INTERVAL_SECONDS = 1.0
MAX_INTERVAL_SECONDS = 3600.0
MIN_MAP_CAPACITY = 1024
MAX_MAP_CAPACITY = 4_194_304
MAX_NICE = 19  # agent.priority


class SettingsError(ValueError):
    """A flag, env var or file setting that cannot be used; the message says why."""


def parse_listen(text: str) -> tuple[str, int]:
    """``"0.0.0.0:9437"`` -> ``("0.0.0.0", 9437)``; ``"[::1]:9437"`` -> ``("::1", 9437)``;
    ``":9437"`` -> ``("0.0.0.0", 9437)``."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise SettingsError(f"--listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:9437")
    port = int(port_text)
    if not 0 < port < 65536:
        raise SettingsError(f"--listen {text!r}: port must be 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise SettingsError(
                f"--listen {text!r}: {host!r} is not an IP address (or localhost)"
            ) from None
    return host, port


def parse_duration(text: str | float, flag: str) -> float:
    """Seconds from ``"10"``, ``"1.5s"``, ``"250ms"`` or ``"2m"`` -> 10.0, 1.5, 0.25, 120.0."""
    raw = str(text).strip().lower()
    scale = 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if raw.endswith(suffix):
            raw, scale = raw[: -len(suffix)], factor
            break
    try:
        seconds = float(raw) * scale
    except ValueError:
        raise SettingsError(f"{flag} {text!r}: expected seconds, e.g. 10, 1.5s or 1m") from None
    if not math.isfinite(seconds):
        raise SettingsError(f"{flag} {text!r}: not a finite duration")
    return seconds


def parse_interval(text: str | float) -> float:
    """Report interval in seconds: ``"10"`` -> 10.0, ``"1.5s"`` -> 1.5, ``"2m"`` -> 120.0.

    At least 1 s (as Istio's); smaller, negative, NaN or malformed values are refused.
    """
    seconds = parse_duration(text, "--interval")
    if seconds < MIN_INTERVAL_SECONDS:
        raise SettingsError(
            f"--interval {text!r}: the report interval must be at least {MIN_INTERVAL_SECONDS:g} s"
        )
    if seconds > MAX_INTERVAL_SECONDS:
        raise SettingsError(f"--interval {text!r}: at most {MAX_INTERVAL_SECONDS:g} s")
    return seconds


def parse_capacity(text: str | int, flag: str = "--max-sockets") -> int:
    """A BPF map capacity: ``"65536"`` -> 65536, within [1024, 4194304]."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise SettingsError(f"{flag} {text!r}: expected a whole number") from None
    if not MIN_MAP_CAPACITY <= value <= MAX_MAP_CAPACITY:
        raise SettingsError(
            f"{flag} {value}: must be between {MIN_MAP_CAPACITY} and {MAX_MAP_CAPACITY}"
        )
    return value


def parse_max_series(text: str | int) -> int:
    """Series budget: ``"10000"`` -> 10000 (at least 10)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise SettingsError(f"--max-series {text!r}: expected a whole number") from None
    if value < 10:
        raise SettingsError(f"--max-series {value}: at least 10")
    return value


def parse_ttl(text: str | float) -> float:
    """Series TTL: ``"10m"`` -> 600.0; at least 1 minute, ``"0"`` disables expiry (-> 0.0)."""
    if str(text).strip() in ("0", "0s", "off"):
        return 0.0
    seconds = parse_duration(text, "--series-ttl")
    if seconds < 60:
        raise SettingsError(f"--series-ttl {text!r}: at least 1m (or 0 to disable)")
    return seconds


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``tcpacct run`` is configured with."""

    listen_host: str = "0.0.0.0"
    listen_port: int = 9437
    interval: float = 10.0
    backend: str = "auto"
    log_level: str = "info"
    max_sockets: int = 65536
    max_closed: int = 65536
    config_files: tuple[Path, ...] = ()
    kubernetes: bool | None = None  # None: decide from the environment
    kubeconfig: Path | None = None
    node_name: str | None = None
    cluster_name: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    proc_root: Path = Path("/proc")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    btf_path: Path = Path("/sys/kernel/btf/vmlinux")
    compile_cache: Path = Path("/var/cache/tcpacct/bpf")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    bearer_token: str | None = field(default=None, repr=False)
    max_series: int = 10000
    series_ttl: float = 600.0
    nice: int = 10  # the agent's threads' niceness (agent.priority)

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise SettingsError(
                f"--backend {self.backend!r}: choose one of {', '.join(BACKEND_CHOICES)}"
            )
        if not 0 <= self.nice <= MAX_NICE:
            raise SettingsError(
                f"--nice {self.nice}: must be 0-{MAX_NICE} (the agent only ever lowers its "
                "own priority)"
            )
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"--log-level {self.log_level!r}: one of {', '.join(LOG_LEVELS)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key go together: give both or neither")
        if self.basic_auth is not None and self.bearer_token is not None:
            raise SettingsError("choose one of --basic-auth and --bearer-token, not both")

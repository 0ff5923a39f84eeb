"""The ``tcpacct`` command: ``run``, ``check``, ``top``, ``config validate|show``.

Every ``run`` flag has a ``TCPACCT_*`` environment twin (``--interval`` ↔
``TCPACCT_INTERVAL``). Bad input exits 2 with a message that says what to change; a run that
cannot start (no privileges, no usable backend, port taken) exits 1 saying why.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from agent.settings import (
    BACKEND_CHOICES,
    LOG_LEVELS,
    Settings,
    SettingsError,
    parse_capacity,
    parse_interval,
    parse_listen,
    parse_max_series,
    parse_ttl,
)

log = logging.getLogger("tcpacct")


def _env(name: str) -> str:
    return f"TCPACCT_{name}"


def _parsed(parse: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except SettingsError as error:
            raise click.BadParameter(str(error), ctx=ctx, param=param) from None

    return callback


def _basic_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SettingsError("--basic-auth: expected USER:PASSWORD")
    return user, password


BACKEND_OPTION = click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default="auto",
    show_default=True,
    envvar=_env("BACKEND"),
    help="Kernel hooks; auto takes the first that works here.",
)
PROC_ROOT_OPTION = click.option(
    "--proc-root",
    type=click.Path(path_type=Path, file_okay=False),
    default="/proc",
    show_default=True,
    envvar=_env("PROC_ROOT"),
    help="The host's /proc.",
)
CGROUP_ROOT_OPTION = click.option(
    "--cgroup-root",
    type=click.Path(path_type=Path, file_okay=False),
    default="/sys/fs/cgroup",
    show_default=True,
    envvar=_env("CGROUP_ROOT"),
    help="The host's cgroup tree.",
)
BTF_PATH_OPTION = click.option(
    "--btf-path",
    type=click.Path(path_type=Path, dir_okay=False),
    default="/sys/kernel/btf/vmlinux",
    show_default=True,
    envvar=_env("BTF_PATH"),
    help="The running kernel's BTF (struct layouts).",
)
COMPILE_CACHE_OPTION = click.option(
    "--compile-cache",
    type=click.Path(path_type=Path, file_okay=False),
    default="/var/cache/tcpacct/bpf",
    show_default=True,
    envvar=_env("COMPILE_CACHE"),
    help="Where the compiled BPF program is kept between starts (tracepoint backend).",
)
KUBECONFIG_OPTION = click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=_env("KUBECONFIG"),
    help="Kubeconfig file (outside a cluster).",
)
KUBERNETES_OPTION = click.option(
    "--kubernetes/--no-kubernetes",
    default=None,
    envvar=_env("KUBERNETES"),
    help="Force Kubernetes mode on or off (default: on in a cluster or with --kubeconfig).",
)
CONFIG_OPTION = click.option(
    "--config",
    "config_files",
    multiple=True,
    envvar=_env("CONFIG"),
    type=click.Path(path_type=Path, dir_okay=False),
    help="Metric definitions (native or Istio Mixer YAML); repeatable.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tcpacct")
def main() -> None:
    """tcpacct: exact per-socket TCP byte accounting with eBPF, as Istio metrics."""


@main.command()
@click.option(
    "--listen",
    default="0.0.0.0:9437",
    show_default=True,
    envvar=_env("LISTEN"),
    callback=_parsed(parse_listen),
    help="Address of /metrics, /healthz, /readyz.",
)
@click.option(
    "--interval",
    default="10",
    show_default=True,
    envvar=_env("INTERVAL"),
    callback=_parsed(parse_interval),
    help="Report interval: how often the kernel maps are read (>= 1 s).",
)
@BACKEND_OPTION
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    envvar=_env("LOG_LEVEL"),
)
@click.option(
    "--max-sockets",
    default="65536",
    show_default=True,
    envvar=_env("MAX_SOCKETS"),
    callback=_parsed(parse_capacity),
    help="Capacity of the kernel's socket map (and of its closed-socket map).",
)
@CONFIG_OPTION
@click.option(
    "--max-series",
    default="10000",
    show_default=True,
    envvar=_env("MAX_SERIES"),
    callback=_parsed(parse_max_series),
    help="Series budget; new label sets past it fold into '~other'.",
)
@click.option(
    "--series-ttl",
    default="10m",
    show_default=True,
    envvar=_env("SERIES_TTL"),
    callback=_parsed(parse_ttl),
    help="Expire series idle this long with no live connection (0: never).",
)
@click.option(
    "--nice",
    default=10,
    show_default=True,
    type=int,
    envvar=_env("NICE"),
    help="Niceness of the agent's threads (0-19): its polls yield the CPU to workloads.",
)
@KUBERNETES_OPTION
@KUBECONFIG_OPTION
@click.option(
    "--node-name",
    envvar=[_env("NODE_NAME"), "NODE_NAME"],
    help="This node's name (the DaemonSet sets NODE_NAME).",
)
@click.option(
    "--cluster-name",
    default="Kubernetes",
    show_default=True,
    envvar=_env("CLUSTER_NAME"),
    help="Value of the *_cluster labels.",
)
@click.option(
    "--trust-domain",
    default="cluster.local",
    show_default=True,
    envvar=_env("TRUST_DOMAIN"),
    help="SPIFFE trust domain of *_principal labels.",
)
@PROC_ROOT_OPTION
@CGROUP_ROOT_OPTION
@BTF_PATH_OPTION
@COMPILE_CACHE_OPTION
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=_env("TLS_CERT"),
    help="Serve HTTPS with this certificate (with --tls-key).",
)
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), envvar=_env("TLS_KEY"))
@click.option(
    "--basic-auth",
    envvar=_env("BASIC_AUTH"),
    callback=_parsed(_basic_auth),
    help="USER:PASSWORD required on /metrics.",
)
@click.option(
    "--bearer-token",
    envvar=_env("BEARER_TOKEN"),
    help="Token required on /metrics (Authorization: Bearer ...).",
)
def run(**options: Any) -> None:
    """Count TCP bytes per socket in the kernel and serve them as Prometheus metrics."""
    host, port = options.pop("listen")
    try:
        settings = Settings(
            listen_host=host,
            listen_port=port,
            max_closed=options["max_sockets"],
            config_files=tuple(options.pop("config_files")),
            **{k: v for k, v in options.items() if k != "max_closed"},
        )
    except SettingsError as error:
        raise click.UsageError(str(error)) from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(_run(settings))


def _fail(message: str) -> int:
    click.echo(f"tcpacct: {message}", err=True)
    return 1


def _run(settings: Settings) -> int:
    from agent.ebpf.backends import BackendUnavailable
    from agent.ebpf.btf import BtfError
    from agent.ebpf.headers import HeadersError
    from agent.metrics.catalogue import load_catalogue
    from agent.metrics.problems import ConfigError
    from agent.wiring import build_agent

    if os.geteuid() != 0 and not _has_bpf_capabilities():
        return _fail("needs root (or CAP_BPF and CAP_PERFMON) to load BPF programs; run with sudo")
    try:
        load_catalogue(settings.config_files)
    except ConfigError as error:
        click.echo(f"tcpacct: invalid metric config:\n{error}", err=True)
        return 2
    try:
        running = build_agent(settings)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return _fail(
                f"cannot listen on {settings.listen_host}:{settings.listen_port}: "
                "address already in use (choose another with --listen)"
            )
        return _fail(f"cannot start: {error}")
    except (BackendUnavailable, BtfError, HeadersError) as error:
        return _fail(f"cannot load the kernel side: {error}")
    stop = threading.Event()

    def on_stop(signum: int, _frame: object) -> None:
        log.info("signal %s: detaching and exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(
        signal.SIGHUP, lambda *_: threading.Thread(target=running.agent.reload, daemon=True).start()
    )
    log.info(
        "tcpacct %s: backend %s, interval %gs, serving http%s://%s:%d/metrics",
        "run",
        running.agent.kernel.backend,
        settings.interval,
        "s" if settings.tls_cert else "",
        settings.listen_host,
        running.port,
    )
    try:
        running.agent.run(stop)
    finally:
        running.close()
    log.info("stopped; every BPF program detached")
    return 0


def _has_bpf_capabilities() -> bool:
    """CAP_BPF (39) and CAP_PERFMON (38) in the effective set, from /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return bool(caps & (1 << 39)) and bool(caps & (1 << 38))
    except OSError:
        pass
    return False


@main.command()
@BTF_PATH_OPTION
@CGROUP_ROOT_OPTION
@KUBECONFIG_OPTION
@KUBERNETES_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def check(
    btf_path: Path,
    cgroup_root: Path,
    kubeconfig: Path | None,
    kubernetes: bool | None,
    as_json: bool,
) -> None:
    """Preflight: kernel, BTF, lockdown, headers, which backends load here, capabilities,
    cgroups, conntrack, Kubernetes. Exit 0 only if `run` can work; each failure says how to
    fix it."""
    from agent.preflight import passed, render, run_checks

    logging.basicConfig(level="ERROR")
    findings = run_checks(
        btf_path=btf_path, cgroup_root=cgroup_root, kubeconfig=kubeconfig, kubernetes=kubernetes
    )
    click.echo(render(findings, as_json))
    sys.exit(0 if passed(findings) else 1)


@main.command()
@click.option(
    "--interval",
    default="1",
    show_default=True,
    callback=_parsed(parse_interval),
    help="Refresh interval (>= 1 s).",
)
@click.option("--once", is_flag=True, help="Print one snapshot after one interval and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: JSON for scripts.")
@click.option(
    "--sort", type=click.Choice(["total", "tx", "rx"]), default="total", show_default=True
)
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True)
@BACKEND_OPTION
@PROC_ROOT_OPTION
def top(
    interval: float, once: bool, as_json: bool, sort: str, limit: int, backend: str, proc_root: Path
) -> None:
    """Live view of connections and workload pairs with bytes/s in both directions."""
    from agent.ebpf.backends import BackendUnavailable
    from agent.live import RateTracker, run_top
    from agent.wiring import open_counting

    logging.basicConfig(level="ERROR")
    if as_json and not once:
        raise click.UsageError("--json needs --once (a live view is not JSON)")
    if os.geteuid() != 0 and not _has_bpf_capabilities():
        sys.exit(_fail("needs root (or CAP_BPF and CAP_PERFMON); run with sudo"))
    try:
        tracer, accountant = open_counting(
            Settings(backend=backend, proc_root=proc_root, interval=interval)
        )
    except BackendUnavailable as error:
        sys.exit(_fail(f"cannot load the kernel side: {error}"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run_top(
            tracer,
            RateTracker(accountant),
            interval=interval,
            once=once,
            as_json=as_json,
            sort=sort,
            limit=limit,
            stop=stop,
        )
    except KeyboardInterrupt:
        pass
    finally:
        tracer.close()


@main.group()
def config() -> None:
    """Check and show metric definitions."""


@config.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
def config_validate(files: tuple[Path, ...]) -> None:
    """Exit 0 if every FILE is a valid metric config, else print each problem and exit 1."""
    from agent.metrics.catalogue import validate_files

    problems = validate_files(list(files))
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        sys.exit(1)
    from agent.metrics.catalogue import load_catalogue

    catalogue = load_catalogue(list(files))
    for warning in catalogue.warnings:
        click.echo(f"warning: {warning}", err=True)
    names = ", ".join(d.name for d in catalogue.definitions())
    click.echo(f"ok: {len(files)} file(s) valid; metrics: {names}")


@config.command("show")
@CONFIG_OPTION
def config_show(config_files: tuple[Path, ...]) -> None:
    """Print the effective metric definitions (built-ins plus --config files) as YAML."""
    from agent.metrics.catalogue import load_catalogue, render
    from agent.metrics.problems import ConfigError

    try:
        catalogue = load_catalogue(list(config_files))
    except ConfigError as error:
        click.echo(str(error), err=True)
        sys.exit(1)
    click.echo(render(catalogue), nl=False)


if __name__ == "__main__":
    main()

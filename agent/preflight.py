"""``tcpacct check``: can ``tcpacct run`` work on this machine, and if not, what to do.

Each check reports ok/warn/fail, what it found and, when not ok, how to fix it. The exit code
is 0 only when every *required* check passed (privileges, BTF, headers, a backend that loads
and attaches); warnings (no conntrack, Kubernetes unreachable in local mode) do not block.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

CAPABILITIES = {
    21: "CAP_SYS_ADMIN",
    12: "CAP_NET_ADMIN",
    19: "CAP_SYS_PTRACE",
    38: "CAP_PERFMON",
    39: "CAP_BPF",
}


@dataclass(frozen=True, slots=True)
class Finding:
    name: str
    status: str  # "ok", "warn", "fail"
    detail: str
    fix: str = ""
    required: bool = True


def _effective_capabilities(proc_self: Path) -> int:
    for line in (proc_self / "status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(proc_self: Path = Path("/proc/self")) -> Finding:
    caps = _effective_capabilities(proc_self)
    have = [name for bit, name in sorted(CAPABILITIES.items()) if caps & (1 << bit)]
    if os.geteuid() == 0 or (caps & (1 << 39) and caps & (1 << 38)):
        return Finding("privileges", "ok", f"uid {os.geteuid()}, capabilities: {', '.join(have)}")
    return Finding(
        "privileges",
        "fail",
        f"uid {os.geteuid()} without CAP_BPF and CAP_PERFMON",
        "run as root (sudo tcpacct check) or grant CAP_BPF and CAP_PERFMON",
    )


def check_kernel() -> Finding:
    uname = os.uname()
    return Finding(
        "kernel", "ok", f"{uname.sysname} {uname.release} {uname.machine}", required=False
    )


def check_lockdown(security: Path = Path("/sys/kernel/security/lockdown")) -> Finding:
    try:
        text = security.read_text().strip()
    except OSError:
        return Finding(
            "lockdown", "ok", "no lockdown LSM interface (not locked down)", required=False
        )
    active = text[text.find("[") + 1 : text.find("]")] if "[" in text else text
    status = "warn" if active != "none" else "ok"
    return Finding(
        "lockdown",
        status,
        f"lockdown: {active}",
        "kprobes/fentry may be refused; the tracepoint backend still works on >= 6.3"
        if status == "warn"
        else "",
        required=False,
    )


def check_btf(btf_path: Path) -> Finding:
    from agent.ebpf.btf import Btf, BtfError
    from agent.ebpf.offsets import kernel_layout

    try:
        layout = kernel_layout(Btf.from_path(btf_path))
    except BtfError as error:
        return Finding(
            "btf",
            "fail",
            str(error),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y, or pass --btf-path",
        )
    return Finding(
        "btf",
        "ok",
        f"{btf_path}: sock_common.skc_dport at {layout.OFF_SKC_DPORT}, "
        f"sock.sk_protocol at {layout.OFF_SK_PROTOCOL}, "
        f"inet_sock.inet_sport at {layout.OFF_INET_SPORT}",
    )


def check_headers() -> Finding:
    from agent.ebpf.headers import HeadersError, choose_headers

    try:
        choice = choose_headers()
    except HeadersError as error:
        return Finding(
            "headers",
            "fail",
            str(error),
            "apt-get install linux-headers-amd64 (any version: layouts come from BTF)",
        )
    return Finding("headers", "ok", f"{choice.how}: {choice.path}")


def check_backends(btf_path: Path) -> list[Finding]:
    from agent.ebpf.backends import BACKENDS, BackendUnavailable
    from agent.ebpf.tracing import Capacities, open_tracer

    findings = []
    working = []
    for name in BACKENDS:
        try:
            tracer = open_tracer(
                name,
                btf_path=btf_path,
                capacities=Capacities(sockets=1024, closed=1024, listeners=64),
            )
        except BackendUnavailable as error:
            findings.append(Finding(f"backend {name}", "warn", error.reason, required=False))
            continue
        except Exception as error:
            findings.append(Finding(f"backend {name}", "warn", str(error), required=False))
            continue
        tracer.close()
        working.append(name)
        findings.append(Finding(f"backend {name}", "ok", "loads and attaches", required=False))
    if working:
        findings.append(Finding("backend auto", "ok", f"would use {working[0]}"))
    else:
        findings.append(
            Finding(
                "backend auto",
                "fail",
                "no backend loads here",
                "use Linux >= 6.3 (tracepoint), or a kernel with BPF "
                "trampolines (fentry) or kprobes; see each backend above",
            )
        )
    return findings


def check_cgroups(cgroup_root: Path) -> Finding:
    if (cgroup_root / "cgroup.controllers").exists():
        layout = "unified (cgroup v2)"
    elif (cgroup_root / "unified").is_dir():
        layout = "hybrid (cgroup v1 controllers + v2 at unified/)"
    elif cgroup_root.is_dir():
        layout = "legacy (cgroup v1)"
    else:
        return Finding(
            "cgroups",
            "warn",
            f"{cgroup_root} missing",
            "mount the host's cgroup tree (pods are found by cgroup)",
            required=False,
        )
    return Finding("cgroups", "ok", f"{cgroup_root}: {layout}", required=False)


def check_conntrack() -> Finding:
    try:
        from agent.resolve.conntrack import ConntrackResolver

        resolver = ConntrackResolver()
        problem = resolver.check()
        resolver.close()
    except Exception as error:
        problem = str(error)
    if problem:
        return Finding(
            "conntrack",
            "warn",
            f"netlink conntrack not readable: {problem}",
            "needs CAP_NET_ADMIN and the nf_conntrack module; without it ClusterIP "
            "connections name the Service but not the backend pod",
            required=False,
        )
    return Finding("conntrack", "ok", "netlink conntrack readable", required=False)


def check_kubernetes(kubeconfig: Path | None, wanted: bool | None) -> Finding:
    from agent.k8s.client import api_client, in_cluster_available

    if wanted is False or (wanted is None and kubeconfig is None and not in_cluster_available()):
        return Finding(
            "kubernetes", "ok", "local mode (not in a cluster, no --kubeconfig)", required=False
        )
    try:
        api = api_client(str(kubeconfig) if kubeconfig else None)
        version = api.call_api(
            "/version",
            "GET",
            response_type="object",
            _return_http_data_only=True,
            _request_timeout=5,
        )
    except Exception as error:
        return Finding(
            "kubernetes",
            "fail",
            f"API server not reachable: {error}",
            "check --kubeconfig / the ServiceAccount; the agent still counts and "
            "labels 'unknown' until it can reach the API",
            required=False,
        )
    return Finding(
        "kubernetes",
        "ok",
        f"API server reachable ({version.get('gitVersion', '?')})",
        required=False,
    )


def run_checks(
    *,
    btf_path: Path,
    cgroup_root: Path,
    kubeconfig: Path | None,
    kubernetes: bool | None,
    backends: Callable[[Path], list[Finding]] = check_backends,
) -> list[Finding]:
    findings = [
        check_kernel(),
        check_privileges(),
        check_lockdown(),
        check_btf(btf_path),
        check_headers(),
    ]
    if findings[1].status == "ok":
        findings.extend(backends(btf_path))
    findings.extend(
        [check_cgroups(cgroup_root), check_conntrack(), check_kubernetes(kubeconfig, kubernetes)]
    )
    return findings


def passed(findings: list[Finding]) -> bool:
    return not any(f.status == "fail" and f.required for f in findings)


def render(findings: list[Finding], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(
            {"ok": passed(findings), "checks": [asdict(f) for f in findings]}, indent=2
        )
    lines = []
    for finding in findings:
        lines.append(f"{finding.status.upper():4}  {finding.name:18} {finding.detail}")
        if finding.fix:
            lines.append(f"      {'':18} fix: {finding.fix}")
    lines.append("run can work here" if passed(findings) else "run cannot work here (see FAIL)")
    return "\n".join(lines)

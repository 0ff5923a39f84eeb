"""A node with pods, made of network namespaces, for privileged tests (needs root).

The root namespace plays the node: it holds a bridge; each "pod" is a network namespace with
a veth pair whose host end is on the bridge. Every pod gets a /24 (and a /64) of its own,
with its gateway on the bridge, so that pod-to-pod and pod-to-ClusterIP traffic is *routed*
through the node — where kube-proxy-style DNAT (an nftables table of the lab's own) and
conntrack see both directions, as on a real node, with no bridge netfilter needed. The node
routes, so ``net.ipv4.ip_forward`` (and IPv6 forwarding when asked) is switched on while labs
are open and restored after the last one closes.

Addresses: pods ``198.18.<n>.2`` (gateway ``198.18.<n>.1``), IPv6 ``2001:db8:<lab>:<n>::2``;
ClusterIPs from ``198.19.0.0/16`` / ``2001:db8:ffff::/64`` (the caller picks them).

Usage::

    with NetLab(pods=3, ipv6=True) as lab:
        client, backend0, backend1 = lab.pods
        lab.add_cluster_ip("198.19.7.10", 80, [(backend0, 8080), (backend1, 8080)])
        server = backend0.spawn([sys.executable, "-m", "http.server", "8080"])
        ...

Everything the lab made (namespaces, links, the nft table, processes it spawned, cgroups)
is removed on exit, also when the test fails; processes are ended by PID.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_forwarding_lock = threading.Lock()
_forwarding_users = 0
_forwarding_saved: dict[str, str] = {}
FORWARDING = {
    4: "/proc/sys/net/ipv4/ip_forward",
    6: "/proc/sys/net/ipv6/conf/all/forwarding",
}


def require_tools() -> list[str]:
    """Names of missing tools the lab needs (``ip``, ``nft``); empty when all are there."""
    return [tool for tool in ("ip", "nft") if shutil.which(tool) is None]


def run(argv: Sequence[str], *, input_text: str | None = None) -> str:
    """Runs a command, raising with its stderr when it fails."""
    completed = subprocess.run(
        list(argv), input=input_text, capture_output=True, text=True, timeout=30, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {completed.stderr.strip()}")
    return completed.stdout


def _enable_forwarding(ipv6: bool) -> None:
    global _forwarding_users
    with _forwarding_lock:
        if _forwarding_users == 0:
            _forwarding_saved.clear()
        for version in (4, 6) if ipv6 else (4,):
            path = FORWARDING[version]
            if path not in _forwarding_saved:
                _forwarding_saved[path] = Path(path).read_text().strip()
            Path(path).write_text("1\n")
        _forwarding_users += 1


def _other_labs_exist() -> bool:
    """Whether a lab of another process still has its bridge up (it needs forwarding)."""
    try:
        links = run(["ip", "-o", "link", "show", "type", "bridge"])
    except RuntimeError:
        return False
    return any(": tcpbr" in line for line in links.splitlines())


def _restore_forwarding() -> None:
    global _forwarding_users
    with _forwarding_lock:
        _forwarding_users -= 1
        if _forwarding_users == 0 and not _other_labs_exist():
            for path, value in _forwarding_saved.items():
                with contextlib.suppress(OSError):
                    Path(path).write_text(value + "\n")
            _forwarding_saved.clear()


@dataclass
class Pod:
    """One pod: a network namespace with one address per family."""

    name: str  # the namespace's name (``ip netns``)
    index: int
    ipv4: str
    gateway4: str
    ipv6: str | None = None
    gateway6: str | None = None
    host_link: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def netns_inode(self) -> int:
        """The namespace's inode: what the kernel reports as a socket's netns."""
        return os.stat(self.netns_path).st_ino

    def exec(self, argv: Sequence[str], *, input_text: str | None = None) -> str:
        """Runs a command inside the pod and returns its output."""
        return run(["ip", "netns", "exec", self.name, *argv], input_text=input_text)

    def spawn(self, argv: Sequence[str], **popen: object) -> subprocess.Popen:
        """Starts a process inside the pod (``ip netns exec`` execs it: same PID). The lab
        ends it on exit."""
        options: dict[str, object] = {
            "stdin": subprocess.PIPE,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "text": True,
        }
        options.update(popen)
        process = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **options)
        self.processes.append(process)
        return process


@dataclass
class ClusterIp:
    address: str
    port: int
    backends: list[tuple[Pod, int]]

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4


class NetLab:
    """Builds the node and ``pods`` pods on enter, removes everything on exit."""

    def __init__(self, pods: int = 2, *, ipv6: bool = False, subnet: int | None = None) -> None:
        self.count = pods
        self.ipv6 = ipv6
        self.tag = secrets.token_hex(3)
        self.bridge = f"tcpbr{self.tag}"
        self.table = f"tcpacct_test_{self.tag}"
        self.subnet = subnet
        self.pods: list[Pod] = []
        self.cluster_ips: list[ClusterIp] = []
        self._made_table = False
        self._forwarding = False
        self._cgroups: list[PodCgroup] = []
        self._processes: list[subprocess.Popen] = []

    # -- building ----------------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _free_subnet(self) -> int:
        """A third octet ``n`` such that no 198.18.n.x /24 of ``count`` pods is in use."""
        used = run(["ip", "-4", "-o", "addr", "show"])
        taken = {
            int(part.split(".")[2])
            for part in used.split()
            if part.startswith("198.18.") and part.count(".") == 3
        }
        start = self.subnet if self.subnet is not None else 16 + secrets.randbelow(180)
        for base in [start, *range(16, 250 - self.count)]:
            if all(base + i not in taken for i in range(self.count)):
                return base
        raise RuntimeError("no free 198.18.x.0/24 subnets for a lab")

    def _build(self) -> None:
        self._forwarding = True
        _enable_forwarding(self.ipv6)
        base = self._free_subnet()
        lab6 = secrets.randbelow(0xFFFE) + 1
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "link", "set", self.bridge, "up"])
        for index in range(self.count):
            octet = base + index
            pod = Pod(
                name=f"tcpacct-{self.tag}-{index}",
                index=index,
                ipv4=f"198.18.{octet}.2",
                gateway4=f"198.18.{octet}.1",
                host_link=f"tcpv{self.tag}{index}",
            )
            if self.ipv6:
                pod.ipv6 = f"2001:db8:{lab6:x}:{index + 1:x}::2"
                pod.gateway6 = f"2001:db8:{lab6:x}:{index + 1:x}::1"
            self.pods.append(pod)
            self._add_pod(pod)
        self._write_table()  # NAT chains make the node's conntrack track every connection
        self._resolve_neighbours()

    def _resolve_neighbours(self, timeout: float = 3.0) -> None:
        """Has the node learn every pod's link address before a test connects.

        A first SYN forwarded while neighbour discovery is still pending may pass the NAT
        rules twice, which would skew the round-robin split of a ClusterIP.
        """
        addresses = [pod.ipv4 for pod in self.pods]
        addresses += [pod.ipv6 for pod in self.pods if pod.ipv6 is not None]
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.sendto(b"\0", (address, 9))  # discard port: nothing answers
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            table = run(["ip", "neigh", "show", "dev", self.bridge])
            learned = {
                line.split()[0]
                for line in table.splitlines()
                if line and "lladdr" in line
            }
            if all(address in learned for address in addresses):
                return
            time.sleep(0.02)
        raise RuntimeError(f"the node did not learn the pods' link addresses: {addresses}")

    def _add_pod(self, pod: Pod) -> None:
        run(["ip", "netns", "add", pod.name])
        inner = f"tcpp{self.tag}{pod.index}"
        run(["ip", "link", "add", pod.host_link, "type", "veth", "peer", "name", inner])
        run(["ip", "link", "set", inner, "netns", pod.name])
        run(["ip", "link", "set", pod.host_link, "master", self.bridge, "up"])
        run(["ip", "addr", "add", f"{pod.gateway4}/24", "dev", self.bridge])
        pod.exec(["ip", "link", "set", "lo", "up"])
        pod.exec(["ip", "link", "set", inner, "name", "eth0"])
        pod.exec(["ip", "addr", "add", f"{pod.ipv4}/24", "dev", "eth0"])
        if pod.ipv6 is not None:
            run(["ip", "-6", "addr", "add", f"{pod.gateway6}/64", "dev", self.bridge, "nodad"])
            pod.exec(["ip", "-6", "addr", "add", f"{pod.ipv6}/64", "dev", "eth0", "nodad"])
        pod.exec(["ip", "link", "set", "eth0", "up"])
        pod.exec(["ip", "route", "add", "default", "via", pod.gateway4])
        if pod.ipv6 is not None:
            pod.exec(["ip", "-6", "route", "add", "default", "via", str(pod.gateway6)])

    def add_cluster_ip(self, address: str, port: int, backends: Sequence[tuple[Pod, int]]) -> None:
        """DNATs ``address:port`` to the backends in the node, as kube-proxy does, taking
        them in turn (``numgen inc``): the first connection goes to backends[0], the next to
        backends[1], ... — so a test knows the split exactly."""
        cluster_ip = ClusterIp(address, port, list(backends))
        self.cluster_ips.append(cluster_ip)
        self._write_table()

    def _write_table(self) -> None:
        lines = [f"table inet {self.table} {{"]
        dispatch = []
        for number, cluster_ip in enumerate(self.cluster_ips):
            family = "ip" if cluster_ip.family == 4 else "ip6"
            choices = []
            for slot, (pod, target_port) in enumerate(cluster_ip.backends):
                target = pod.ipv4 if family == "ip" else pod.ipv6
                if target is None:
                    raise ValueError(f"pod {pod.name} has no IPv6 address")
                chain = f"svc{number}_ep{slot}"
                shown = target if family == "ip" else f"[{target}]"
                rule = f"meta l4proto tcp dnat {family} to {shown}:{target_port}"
                lines.append(f"  chain {chain} {{ {rule}; }}")
                choices.append(f"{slot} : jump {chain}")
            dispatch.append(
                f"    {family} daddr {cluster_ip.address} tcp dport {cluster_ip.port} "
                f"numgen inc mod {len(choices)} vmap {{ {', '.join(choices)} }}"
            )
        lines.append("  chain services {")
        lines.extend(dispatch)
        lines.append("  }")
        for hook in ("prerouting", "output"):  # from pods, and from the node itself
            lines.append(f"  chain {hook} {{ type nat hook {hook} priority -100; jump services; }}")
        # A ``ct`` match has the node track every connection of both families (a nat chain
        # alone enables conntrack for IPv4 only), as kube-proxy's rules do on a real node.
        lines.append(
            "  chain tracking { type filter hook prerouting priority -150; ct state new accept; }"
        )
        # ... but not loopback: other tests' localhost connections must not fill the
        # node's conntrack table (entries of connections that close after the lab is gone
        # would stay ESTABLISHED for days).
        for hook, match in (("prerouting", "iif"), ("output", "oif")):
            lines.append(
                f'  chain untracked_{hook} {{ type filter hook {hook} priority raw; '
                f'{match} "lo" notrack; }}'
            )
        lines.append("}")
        if self._made_table:
            run(["nft", "delete", "table", "inet", self.table])
        run(["nft", "-f", "-"], input_text="\n".join(lines) + "\n")
        self._made_table = True

    def diagnostics(self) -> str:
        """What a failing test should show: forwarding, the NAT table, conntrack entries and
        neighbours of the lab's addresses."""
        prefixes = tuple(pod.gateway4.rsplit(".", 1)[0] + "." for pod in self.pods)
        prefixes += tuple(pod.gateway6[:-1] for pod in self.pods if pod.gateway6)
        parts = [f"{path}={Path(path).read_text().strip()}" for path in FORWARDING.values()]
        for argv in (
            ["nft", "list", "table", "inet", self.table],
            ["ip", "neigh", "show", "dev", self.bridge],
            ["conntrack", "-L", "-f", "ipv4"],
            ["conntrack", "-L", "-f", "ipv6"],
        ):
            try:
                text = run(argv)
            except (RuntimeError, OSError) as error:
                text = str(error)
            if argv[0] == "conntrack":
                text = "\n".join(line for line in text.splitlines() if any(
                    prefix in line for prefix in prefixes))
            parts.append(f"$ {' '.join(argv)}\n{text}")
        return "\n".join(parts)

    # -- processes and cgroups ---------------------------------------------------------------

    def spawn_on_node(self, argv: Sequence[str], **popen: object) -> subprocess.Popen:
        """Starts a process in the node's namespace (a host-network pod); ended on exit."""
        options: dict[str, object] = {
            "stdin": subprocess.PIPE,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "text": True,
        }
        options.update(popen)
        process = subprocess.Popen(list(argv), **options)
        self._processes.append(process)
        return process

    def pod_cgroup(self, pod_uid: str, container_id: str) -> PodCgroup:
        """A kubelet-style cgroup for a pod's container; removed on exit."""
        cgroup = PodCgroup(pod_uid, container_id)
        cgroup.create()
        self._cgroups.append(cgroup)
        return cgroup

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        processes = [p for pod in self.pods for p in pod.processes] + self._processes
        for process in processes:
            _end(process)
        for cgroup in reversed(self._cgroups):
            cgroup.remove()
        self._cgroups.clear()
        if self._made_table:
            with contextlib.suppress(RuntimeError):
                run(["nft", "delete", "table", "inet", self.table])
            self._made_table = False
        for pod in self.pods:
            with contextlib.suppress(RuntimeError):
                run(["ip", "netns", "del", pod.name])
            with contextlib.suppress(RuntimeError):
                run(["ip", "link", "del", pod.host_link])  # gone with the namespace, usually
        with contextlib.suppress(RuntimeError):
            run(["ip", "link", "del", self.bridge])
        if self._forwarding:
            self._forwarding = False
            _restore_forwarding()


class LineReader:
    """Lines a process prints, read on a thread, so a test can wait with a bound.

    ``select`` on a text stream is unreliable (lines may already sit in Python's buffer).
    """

    def __init__(self, stream) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        try:
            for line in stream:
                self._lines.put(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        self._lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line, ``None`` at end of output; raises ``queue.Empty`` on timeout."""
        return self._lines.get(timeout=timeout)


_readers: dict[int, LineReader] = {}


def read_line(
    process: subprocess.Popen,
    timeout: float = 20.0,
    context: Callable[[], str] | None = None,
) -> str:
    """The next line ``process`` prints; ``AssertionError`` (with its stderr and what
    ``context()`` says, e.g. ``lab.diagnostics``) if it ends or prints nothing in time."""
    reader = _readers.get(id(process))
    if reader is None:
        reader = _readers[id(process)] = LineReader(process.stdout)
    try:
        line = reader.next(timeout)
    except queue.Empty:
        line = None
        problem = f"no output within {timeout}s"
    else:
        problem = "process ended early"
    if line is None:
        if process.poll() is None:
            process.kill()
        errors = process.stderr.read() if process.stderr else ""
        raise AssertionError(f"{problem}: {errors}\n{context() if context else ''}")
    return line


def _end(process: subprocess.Popen) -> None:
    """Ends one process we started, by its PID: close stdin, terminate, then kill."""
    if process.poll() is None:
        with contextlib.suppress(OSError):
            if process.stdin:
                process.stdin.close()
        try:
            process.wait(1)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(3)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    _readers.pop(id(process), None)


class PodCgroup:
    """``kubepods/besteffort/pod<uid>/<container id>`` in every writable cgroup hierarchy
    (the v2 root, or under cgroup v1 the ``unified``, ``systemd`` and ``pids`` ones), so that
    ``/proc/<pid>/cgroup`` of a process moved in names the pod as the kubelet's would."""

    def __init__(self, pod_uid: str, container_id: str, root: str | Path = "/sys/fs/cgroup"):
        self.relative = Path("kubepods") / "besteffort" / f"pod{pod_uid}" / container_id
        self.root = Path(root)
        self.created: list[Path] = []

    def hierarchies(self) -> list[Path]:
        if (self.root / "cgroup.procs").exists():
            return [self.root]
        return [
            self.root / name
            for name in ("unified", "systemd", "pids")
            if (self.root / name / "cgroup.procs").exists()
        ]

    def create(self) -> None:
        for hierarchy in self.hierarchies():
            path = hierarchy
            for part in self.relative.parts:
                path = path / part
                if not path.exists():
                    path.mkdir()
                    self.created.append(path)

    def add(self, pid: int) -> None:
        for hierarchy in self.hierarchies():
            (hierarchy / self.relative / "cgroup.procs").write_text(f"{pid}\n")

    def remove(self) -> None:
        for path in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        self.created.clear()


@contextlib.contextmanager
def lab(pods: int = 2, *, ipv6: bool = False) -> Iterator[NetLab]:
    """``with lab(3) as node: ...`` — the same as ``with NetLab(3) as node``."""
    with NetLab(pods, ipv6=ipv6) as built:
        yield built

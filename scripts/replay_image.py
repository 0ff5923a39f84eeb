"""Build and run the tcpacct image without a container engine (root, Debian host).

    sudo .venv/bin/python scripts/replay_image.py build /var/tmp/tcpacct-image
    sudo .venv/bin/python scripts/replay_image.py run /var/tmp/tcpacct-image [--usr-src DIR]

``build`` stands a ``debootstrap --variant=minbase bookworm`` root in for ``FROM
debian:bookworm-slim`` and replays the Dockerfile's RUN, COPY (through .dockerignore),
WORKDIR and ENV instructions into it; RUN steps run chrooted in a private mount namespace.

``run`` starts the image the way daemonset/daemonset.yaml does: the DaemonSet's host paths
bind-mounted read-only at its mount paths, the root file system read-only, tmpfs for its
emptyDirs, the ConfigMap's metrics.yaml at /etc/tcpacct, the host's pid and network
namespaces, a capability bounding set of exactly its ``capabilities.add``, and its args (with
``--no-kubernetes`` for ``--kubernetes``, as there is no API server here, and a loopback
``--listen``). It then waits for /readyz, moves 300000 bytes client -> server and 1000 back
over loopback, checks that both reporters' istio_tcp_received_bytes_total series say exactly
300000 after one report interval, and stops the agent with SIGTERM, which must exit 0.
``--usr-src DIR`` stands in for a node's /usr/src (an empty directory: a node without kernel
headers). Every mount lives in a private mount namespace and goes away with its process.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.unit.test_dockerfile import dockerignore, ignored, parse_dockerfile  # noqa: E402

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
LISTEN_PORT = 19437
# bookworm-slim's apt sources.
SOURCES = (f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n"
           f"deb http://deb.debian.org/debian-security {SUITE}-security main\n")


def in_private_mounts(script: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``sh -c script`` in a new mount namespace whose mounts do not propagate back."""
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                             script], env=env)


def build(root: Path) -> None:
    if not (root / "usr/bin").is_dir():
        subprocess.run(["unshare", "--mount", "--propagation", "private", "debootstrap",
                        "--variant=minbase", SUITE, str(root), MIRROR], check=True)
    (root / "etc/apt/sources.list").write_text(SOURCES)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    # pip inside trusts what the host's pip trusts (the host may reach PyPI through a proxy).
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "host-ca.crt")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive", "PIP_CERT": "/host-ca.crt"}
    image: dict[str, Any] = {"env": {}, "entrypoint": [], "cmd": []}
    workdir = "/"
    patterns = dockerignore()
    for keyword, arguments in parse_dockerfile((REPO / "Dockerfile").read_text()):
        print(f"replay: {keyword} {arguments[:100]}", flush=True)
        if keyword == "RUN":
            script = (f"mount -t proc proc {root}/proc; mount --rbind /dev {root}/dev; "
                      f"mount -t sysfs sysfs {root}/sys; exec chroot {root} /bin/sh -ec "
                      + shlex.quote(f"cd {shlex.quote(workdir)} && {arguments}"))
            if in_private_mounts(script, env).wait() != 0:
                raise SystemExit(f"replay: RUN failed: {arguments}")
        elif keyword == "WORKDIR":
            workdir = arguments
            (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, destination = shlex.split(arguments)
            target = root / workdir.lstrip("/") / destination
            for source in sources:
                copy_context(REPO / source, target, patterns)
        elif keyword == "ENV":
            for pair in shlex.split(arguments):
                name, value = pair.split("=", 1)
                value = value.replace("$PATH", env["PATH"])
                env[name] = image["env"][name] = value
        elif keyword in ("ENTRYPOINT", "CMD"):
            image[keyword.lower()] = json.loads(arguments)
    (root / "replayed-image.json").write_text(json.dumps(image, indent=2))
    print(f"replay: image in {root}: {image['entrypoint'] + image['cmd']}")


def copy_context(source: Path, target: Path, patterns: list[str]) -> None:
    """COPY of a file or a directory's contents, leaving out what .dockerignore ignores."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        if ignored(path.relative_to(REPO).as_posix(), patterns):
            continue
        if source.is_file():
            out = target / source.name if target.is_dir() else target
        else:
            out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out)


def manifest(name: str, kind: str) -> dict[str, Any]:
    documents = yaml.safe_load_all((REPO / "daemonset" / name).read_text())
    return next(doc for doc in documents if doc and doc["kind"] == kind)


def run(root: Path, usr_src: Path | None) -> int:
    image = json.loads((root / "replayed-image.json").read_text())
    pod = manifest("daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir = Path(tempfile.mkdtemp(prefix="tcpacct-configmap-"))
    for key, text in manifest("configmap.yaml", "ConfigMap")["data"].items():
        (config_dir / key).write_text(text)
    mounts = []  # (source or None for tmpfs, path in the container, read-only)
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            source = volume["hostPath"]["path"]
            if source == "/usr/src" and usr_src is not None:
                source = str(usr_src)
            if os.path.exists(source):
                mounts.append((source, mount["mountPath"], mount.get("readOnly", False)))
        elif "configMap" in volume:
            mounts.append((str(config_dir), mount["mountPath"], True))
        elif "emptyDir" in volume:
            mounts.append((None, mount["mountPath"], False))
    steps = [f"mount --bind {root} {root}", f"mount -t proc proc {root}/proc",
             f"mount --rbind /dev {root}/dev", f"mount -t sysfs -o ro sysfs {root}/sys"]
    for source, path, read_only in mounts:
        where = root / path.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        if source is None:
            steps.append(f"mount -t tmpfs tmpfs {where}")
        else:
            steps.append(f"mount --rbind {source} {where}")
            if read_only:
                steps.append(f"mount -o remount,bind,ro {where}")
    steps.append(f"mount -o remount,bind,ro {root}")  # readOnlyRootFilesystem
    args = [a for a in container["args"] if a != "--kubernetes"]
    args += ["--no-kubernetes", f"--listen=127.0.0.1:{LISTEN_PORT}"]
    if container.get("command"):
        raise SystemExit("replay: the DaemonSet overrides the image's ENTRYPOINT")
    argv = image["entrypoint"] + args
    environment = dict(image["env"]) | {"NODE_NAME": "replay-node"}
    added = container["securityContext"]["capabilities"]["add"]
    bounding = ",".join(["-all", *(f"+{cap.lower()}" for cap in added)])
    inner = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()),
             "/usr/bin/setpriv", f"--bounding-set={bounding}", "--", *argv]
    print("replay: in the container:", shlex.join(argv), flush=True)
    agent = in_private_mounts(" && ".join(steps) + f" && exec chroot {root} " + shlex.join(inner))
    exact: list[str] = []
    try:
        if not wait_ready(agent):
            print(f"replay: not ready; agent exited {agent.poll()}")
            return 1
        move_bytes(300000, 1000)
        time.sleep(11)  # one report interval (--interval=10) and a little
        print("replay: /healthz", fetch("/healthz")[0])
        body = fetch("/metrics")[1].splitlines()
        for line in body:
            if line.startswith(("tcpacct_backend_info", "tcpacct_build_info",
                                "tcpacct_unattributed_bytes_total")):
                print("  ", line)
        exact = [line for line in body if line.startswith("istio_tcp_received_bytes_total")
                 and line.rsplit(" ", 1)[1] in ("300000", "300000.0")]
        print(f"replay: istio_tcp_received_bytes_total series of exactly 300000: {len(exact)}"
              " (expected 2: the source and the destination reporter)")
        for line in body:
            if line.startswith(("tcpacct_held_back_sockets", "tcpacct_tracked_sockets")):
                print("  ", line)
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGTERM)
        try:
            code = agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            code = agent.wait()
        print(f"replay: exit code after SIGTERM: {code}")
        shutil.rmtree(config_dir)
    return 0 if code == 0 and len(exact) == 2 else 1


def fetch(path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{LISTEN_PORT}{path}"
    with urllib.request.urlopen(url, timeout=15) as response:
        return response.status, response.read().decode()


def wait_ready(agent: subprocess.Popen[bytes], seconds: float = 90) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and agent.poll() is None:
        try:
            return fetch("/readyz")[0] == 200
        except OSError:
            time.sleep(0.5)
    return False


def move_bytes(request: int, response: int) -> None:
    """One loopback connection: ``request`` bytes client -> server, ``response`` back."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            client.sendall(b"q" * request)
            received = 0
            while received < request:
                received += len(peer.recv(65536))
            peer.sendall(b"r" * response)
            received = 0
            while received < response:
                received += len(client.recv(65536))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "run"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--usr-src", type=Path, help="stand-in for the node's /usr/src")
    options = parser.parse_args()
    if options.action == "build":
        build(options.root.resolve())
        return 0
    return run(options.root.resolve(), options.usr_src)


if __name__ == "__main__":
    raise SystemExit(main())

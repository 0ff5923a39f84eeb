"""The image recipe: bookworm with Debian's bcc, and an ENTRYPOINT/CMD that is the command line
the DaemonSet runs and that the console script in pyproject.toml provides.

There is no container engine here, so the Dockerfile is parsed, not built: instructions with
their continuation lines joined, exec-form (JSON) ENTRYPOINT/CMD decoded, and .dockerignore
applied the way the Docker builder does (last matching pattern wins; a pattern matches a path
or any of its parent directories).
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = "/opt/tcpacct/.venv/bin"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """Instructions as (KEYWORD, arguments), comments dropped and continuations joined.

    ``"FROM a\\nRUN x \\\\\\n  && y\\n"`` -> ``[("FROM", "a"), ("RUN", "x && y")]``.
    """
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def arguments_of(keyword: str) -> list[str]:
    return [arguments for kw, arguments in dockerfile() if kw == keyword]


def exec_form(keyword: str) -> list[str]:
    """The JSON array of the (last) ENTRYPOINT or CMD; shell form is refused."""
    *_, arguments = arguments_of(keyword)
    value = json.loads(arguments)
    assert isinstance(value, list), f"{keyword} must be in exec form (a JSON array)"
    return value


def image_argv() -> list[str]:
    return exec_form("ENTRYPOINT") + exec_form("CMD")


def apt_installed_packages() -> set[str]:
    """Package names after ``apt-get install`` in RUN lines (options skipped)."""
    packages: set[str] = set()
    for command in arguments_of("RUN"):
        for step in command.split("&&"):
            words = shlex.split(step)
            if words[:2] == ["apt-get", "install"]:
                packages.update(w for w in words[2:] if not w.startswith("-"))
    return packages


def daemonset_container() -> dict[str, Any]:
    documents = yaml.safe_load_all((REPO / "daemonset" / "daemonset.yaml").read_text())
    (daemonset,) = [doc for doc in documents if doc and doc["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = "# c\nFROM a:b\nRUN x \\\n  # inner\n  && y\nCMD [\"run\"]\n"
    assert parse_dockerfile(text) == [("FROM", "a:b"), ("RUN", "x && y"), ("CMD", '["run"]')]


def test_base_image_is_debian_bookworm() -> None:
    assert arguments_of("FROM") == ["debian:bookworm-slim"]


def test_bcc_and_fallback_headers_come_from_debian() -> None:
    assert {"python3-bpfcc", "python3-venv", "linux-headers-amd64"} <= apt_installed_packages()


def test_entrypoint_is_the_console_script_and_cmd_its_run_command() -> None:
    from agent.cli import main

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint, command = image_argv()
    assert scripts[entrypoint] == "agent.cli:main"
    assert command in main.commands
    assert image_argv() == ["tcpacct", "run"]


def test_daemonset_runs_the_image_entrypoint_with_run_first() -> None:
    """No ``command`` override: the pod runs ENTRYPOINT + args, and args keep CMD's command."""
    container = daemonset_container()
    assert "command" not in container
    pod_argv = exec_form("ENTRYPOINT") + container["args"]
    assert pod_argv[: len(image_argv())] == image_argv()


def test_entrypoint_resolves_to_the_venv_that_sees_bcc() -> None:
    run_lines = " ".join(arguments_of("RUN"))
    assert f"/usr/bin/python3 -m venv --system-site-packages {Path(VENV_BIN).parent}" in run_lines
    (env,) = arguments_of("ENV")
    assert f"PATH={VENV_BIN}:$PATH" in env.split()
    assert "PYTHONDONTWRITEBYTECODE=1" in env.split()  # the root filesystem is read-only


def copied_sources() -> list[str]:
    """``COPY agent ./agent`` -> ``["agent"]`` (every source of every COPY)."""
    sources = []
    for arguments in arguments_of("COPY"):
        *these, _destination = shlex.split(arguments)
        sources.extend(these)
    return sources


def test_copied_sources_exist_and_include_the_bpf_programs() -> None:
    from agent.ebpf.tracing import BPF_DIR

    for source in copied_sources():
        assert (REPO / source).exists(), source
    # The agent reads bpf/*.c at run time from beside its package.
    assert BPF_DIR.relative_to(REPO).as_posix() in copied_sources()
    assert "agent" in copied_sources()


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent directory decides.

    ``ignored("agent/cli.py", ["*", "!agent/"])`` -> False; ``ignored("tests/x.py", ...)`` -> True.
    """
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        cleaned = pattern.removeprefix("!").strip("/")
        if cleaned.startswith("**/"):
            matches = any(fnmatch.fnmatch(PurePosixPath(c).name, cleaned[3:])
                          for c in candidates)
        else:
            matches = any(fnmatch.fnmatch(c, cleaned) for c in candidates)
        if matches:
            verdict = not negated
    return verdict


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_sends_what_is_copied_and_nothing_else() -> None:
    patterns = dockerignore()
    for source in copied_sources():
        assert not ignored(source, patterns), source
    assert not ignored("agent/cli.py", patterns)
    assert not ignored("bpf/common.h", patterns)
    for path in (".venv/bin/python", ".git/HEAD", "tests/unit/test_dockerfile.py",
                 "agent/__pycache__/cli.cpython-311.pyc", "bench/run.py"):
        assert ignored(path, patterns), path


def test_image_headers_leave_usr_src_free_for_the_hosts() -> None:
    """The DaemonSet mounts the node's /usr/src over /usr/src, so the image keeps its own
    headers elsewhere."""
    mounts = {m["mountPath"] for m in daemonset_container()["volumeMounts"]}
    assert "/usr/src" in mounts
    steps = [step.strip() for command in arguments_of("RUN") for step in command.split("&&")]
    assert "mv /usr/src /opt/tcpacct/usr/src" in steps

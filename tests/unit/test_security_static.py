"""Static checks of the agent's code: no shell-outs, host files opened read-only.

One process is started on purpose: the BPF compiler child (agent/ebpf/compiling.py runs
``python -m agent.ebpf.compiling`` with a fixed argument list, no shell), so LLVM stays out
of the agent. Anything else that starts a process fails here.

The agent runs with kernel privileges on every node; these read its source (ast) so that a
change that starts a process or opens a host file for writing fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"
PROCESS_STARTERS = {
    ("subprocess", None), ("os", "system"), ("os", "popen"), ("os", "execv"),
    ("os", "execvp"), ("os", "spawnv"), ("pty", "spawn"),
}
# Files the agent writes on purpose: its own cache of merged kernel headers (symlinks) and
# its compile cache (agent/ebpf/compiled.py, through a temporary file and a rename).
WRITERS_ALLOWED = {"agent/ebpf/headers.py", "agent/ebpf/compiled.py"}
PROCESS_STARTER_ALLOWED = "agent/ebpf/compiling.py"


def sources() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(AGENT.rglob("*.py")):
        out.append((str(path.relative_to(AGENT.parent)), ast.parse(path.read_text())))
    return out


def test_the_agent_starts_no_processes() -> None:
    found = []
    for name, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(name, a.name) for a in node.names if a.name in ("subprocess", "pty")]
            elif isinstance(node, ast.ImportFrom) and node.module in ("subprocess", "pty"):
                found.append((name, node.module))
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr) in PROCESS_STARTERS
            ):
                found.append((name, f"{node.value.id}.{node.attr}"))
    assert found == [(PROCESS_STARTER_ALLOWED, "subprocess")]


def test_the_one_process_started_is_the_compiler_child_without_a_shell() -> None:
    tree = dict(sources())[PROCESS_STARTER_ALLOWED]
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "subprocess"
    ]
    assert len(calls) == 1
    (call,) = calls
    argv = call.args[0]
    assert isinstance(argv, ast.List)
    assert ast.unparse(argv) == "[sys.executable, '-m', 'agent.ebpf.compiling']"
    assert "shell" not in {keyword.arg for keyword in call.keywords}


def test_files_are_opened_read_only() -> None:
    """open()/Path.open() only with a read mode; write_text/write_bytes nowhere."""
    found = []
    for name, tree in sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("write_text", "write_bytes") and name not in WRITERS_ALLOWED:
                found.append((name, node.lineno, called))
            if called == "open":
                modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                modes += [k.value.value for k in node.keywords
                          if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                if isinstance(func, ast.Attribute) and node.args[:1]:  # Path.open(mode)
                    modes = [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
                if any(set(str(m)) & set("wax+") for m in modes):
                    found.append((name, node.lineno, f"open mode {modes}"))
    assert found == []

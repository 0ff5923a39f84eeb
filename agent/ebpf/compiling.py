"""Compile a BPF program with bcc into a :class:`CompiledProgram` — in a child process.

bcc compiles with LLVM and clang inside the calling process: ~90 MiB of mapped libraries
and tens of MiB of heap that would stay with the agent for its whole life. The agent runs
this module as a short-lived child instead (``python -m agent.ebpf.compiling``, a JSON
request on stdin), which writes the compiled program to the compile cache and exits; the
agent loads it with :mod:`agent.ebpf.loading`.

Request: ``{"source": "bpf/tcpacct.c", "cflags": ["-DMAX_SOCKETS=65536", ...],
"functions": ["on_send", ...], "maps": ["socks", ...], "out": "/var/cache/.../<key>.json"}``.
Exit status 0 and the file written, or 1 with the reason on stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from agent.ebpf.compiled import CompiledProgram, MapSpec, write_cached

COMPILE_TIMEOUT = 300.0


def compile_program(
    source: Path, cflags: list[str], functions: list[str], maps: list[str]
) -> CompiledProgram:
    """Compile ``source`` and take out the instructions of ``functions`` and the specs of
    ``maps`` (the maps are created by bcc in this process; their fds are in the code)."""
    from bcc import BPF, lib

    bpf = BPF(src_file=str(source), cflags=cflags)
    try:
        specs = []
        for name in maps:
            table = bpf[name]
            specs.append(
                MapSpec(
                    name=name,
                    map_type=int(table.ttype),
                    key_size=ctypes.sizeof(table.Key),
                    # bcc's Leaf of a per-CPU map is the array of every CPU's values;
                    # the map's value size is one CPU's (sLeaf).
                    value_size=ctypes.sizeof(getattr(table, "sLeaf", table.Leaf)),
                    max_entries=int(table.max_entries),
                    flags=int(table.flags),
                    compiled_fd=int(table.map_fd),
                )
            )
        code = {name: bytes(bpf.dump_func(name)) for name in functions}
        license = (lib.bpf_module_license(bpf.module) or b"GPL").decode()
    finally:
        bpf.cleanup()
    return CompiledProgram(tuple(specs), code, license)


def compile_in_child(
    source: Path,
    cflags: list[str],
    functions: list[str],
    maps: list[str],
    out: Path,
    *,
    timeout: float = COMPILE_TIMEOUT,
) -> None:
    """Run :func:`compile_program` in a child Python and write its result to ``out``.

    Raises RuntimeError with the child's last lines of output when it fails (a compile
    error names the line of the C source).
    """
    request = {
        "source": str(source),
        "cflags": cflags,
        "functions": functions,
        "maps": maps,
        "out": str(out),
    }
    package_root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    try:
        child = subprocess.run(
            [sys.executable, "-m", "agent.ebpf.compiling"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"compiling {source.name} took over {timeout:g} s") from None
    if child.returncode != 0:
        lines = (child.stderr or child.stdout).strip().splitlines()
        raise RuntimeError(f"Failed to compile {source.name}: " + "\n".join(lines[-25:]))


def main() -> int:
    try:
        request = json.loads(sys.stdin.read())
        program = compile_program(
            Path(request["source"]), request["cflags"], request["functions"], request["maps"]
        )
        write_cached(Path(request["out"]), program)
    except Exception as error:  # everything goes to the parent as text
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

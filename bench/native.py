"""Small C helpers of the benchmark, compiled with gcc on first use and cached.

>>> compiled(Path("bench/loops.c"))   # doctest: +SKIP
PosixPath('/root/.cache/tcpacct-bench/loops-3f2a9c0d1e4b5a67')

A binary is named after its source's stem and a hash of the source, the compiler flags and
the compiler's version, so an edited source or another gcc never runs a stale binary; the
cache directory is ``$TCPACCT_BENCH_CACHE``, else ``$XDG_CACHE_HOME/tcpacct-bench``, else
``~/.cache/tcpacct-bench``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

CFLAGS = ("-O2", "-Wall", "-Wextra")


def cache_dir() -> Path:
    if explicit := os.environ.get("TCPACCT_BENCH_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tcpacct-bench"


def binary_name(stem: str, source: bytes, flags: Sequence[str], compiler: str) -> str:
    """``loops-<16 hex digits>``: changes with the source, the flags or the compiler."""
    digest = hashlib.sha256()
    for part in (source, "\0".join(flags).encode(), compiler.encode()):
        digest.update(len(part).to_bytes(8, "little") + part)
    return f"{stem}-{digest.hexdigest()[:16]}"


def compiled(source: Path, flags: Sequence[str] = CFLAGS, cc: str = "gcc") -> Path:
    """The binary of ``source`` (``cc flags -o BINARY source``), compiled if not cached."""
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    directory = cache_dir()
    binary = directory / binary_name(source.stem, source.read_bytes(), flags, version)
    if binary.exists():
        return binary
    directory.mkdir(parents=True, exist_ok=True)
    # compile beside the target, then rename: a concurrent or interrupted build never
    # leaves a half-written binary under the final name
    fd, partial = tempfile.mkstemp(prefix=f".{binary.name}.", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *flags, "-o", partial, str(source)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cc} {source.name} failed:\n{result.stderr.strip()}")
        os.replace(partial, binary)
    finally:
        Path(partial).unlink(missing_ok=True)
    return binary

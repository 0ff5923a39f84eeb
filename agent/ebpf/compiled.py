"""A compiled BPF program as data: its maps and the instructions of each function.

bcc compiles C into instructions whose map references are the fds of maps it created in the
compiling process. Kept with those maps' specs, the instructions can be loaded by another
process (:mod:`agent.ebpf.loading`) without bcc or LLVM: create the maps again, rewrite the
fds, load. Stored as one JSON file per cache key in the compile cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMAT = 2  # 2: per-CPU maps keep one CPU's value size (format 1 kept all CPUs')


@dataclass(frozen=True, slots=True)
class MapSpec:
    """``MapSpec("socks", 1, 8, 104, 65536, 0, 5)``: a hash map of 8-byte keys and 104-byte
    values, whose fd was 5 in the compiling process."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    compiled_fd: int


@dataclass(frozen=True, slots=True)
class CompiledProgram:
    maps: tuple[MapSpec, ...]
    functions: dict[str, bytes]  # function name -> instructions (8 bytes each)
    license: str = "GPL"

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "license": self.license,
                "maps": [vars_of(spec) for spec in self.maps],
                "functions": {
                    name: base64.b64encode(code).decode() for name, code in self.functions.items()
                },
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CompiledProgram:
        """Raises ValueError for anything but a complete file of this format."""
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
            return cls(
                maps=tuple(MapSpec(**spec) for spec in data["maps"]),
                functions={
                    name: base64.b64decode(code) for name, code in data["functions"].items()
                },
                license=data["license"],
            )
        except (KeyError, TypeError, json.JSONDecodeError, binascii.Error) as error:
            raise ValueError(f"not a compiled program: {error}") from None


def vars_of(spec: MapSpec) -> dict[str, object]:
    return {name: getattr(spec, name) for name in MapSpec.__slots__}


def cache_key(source: bytes, cflags: list[str], *parts: str) -> str:
    """What a compile depends on, hashed: the source, its cflags (struct offsets from BTF
    among them), and e.g. the kernel release, headers and bcc version.

    ``cache_key(b"int x;", ["-DA=1"], "6.1.0")`` -> 24 hex digits.
    """
    digest = hashlib.sha256(source)
    for part in (*cflags, "\0", *parts):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:24]


def read_cached(path: Path) -> CompiledProgram | None:
    """The program cached at ``path``, or None when there is none, it is unreadable, or it
    could have been written by someone else: instructions loaded into the kernel are only
    taken from a file this user owns that nobody else may write (nor its directory)."""
    try:
        for owned in (path, path.parent):
            info = owned.stat()
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                return None
        return CompiledProgram.from_json(path.read_text())
    except (OSError, ValueError):
        return None


def write_cached(path: Path, program: CompiledProgram) -> None:
    """Atomically (write then rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as out:
        out.write(program.to_json())
    os.replace(out.name, path)

"""Load a :class:`CompiledProgram` with bpf(2) alone: maps, programs, raw tracepoints.

``LoadedProgram(compiled)`` creates the maps again, rewrites the map fds in each function's
instructions, loads every function as a raw-tracepoint program and attaches them on
request (``attach(hooks)``: anything with ``target``, the tracepoint, and ``function``).
Nothing of bcc or LLVM is in the process. Every fd is closed by :meth:`close`
(closing an attachment's fd detaches it; the kernel frees programs and maps with their
last fd).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterable, Mapping

from agent.ebpf.backends import Hook
from agent.ebpf.compiled import CompiledProgram
from agent.ebpf.syscalls import (
    BPF_PROG_TYPE_RAW_TRACEPOINT,
    create_map,
    load_program,
    open_raw_tracepoint,
    relocate_map_fds,
)


class LoadedProgram:
    def __init__(self, compiled: CompiledProgram) -> None:
        self.map_fds: dict[str, int] = {}
        self._programs: dict[str, int] = {}
        self._attached: dict[tuple[str, str], int] = {}  # (tracepoint, function) -> link fd
        try:
            for spec in compiled.maps:
                self.map_fds[spec.name] = create_map(
                    spec.map_type,
                    spec.key_size,
                    spec.value_size,
                    spec.max_entries,
                    spec.flags,
                    spec.name,
                )
            new_fd_of = {spec.compiled_fd: self.map_fds[spec.name] for spec in compiled.maps}
            for name, code in compiled.functions.items():
                try:
                    instructions = relocate_map_fds(code, new_fd_of)
                except KeyError as fd:
                    raise RuntimeError(
                        f"{name} refers to map fd {fd}, not in the program"
                    ) from None
                try:
                    self._programs[name] = load_program(
                        name, BPF_PROG_TYPE_RAW_TRACEPOINT, instructions, compiled.license
                    )
                except OSError as error:
                    raise OSError(error.errno, f"loading {name}: {error.strerror}") from None
        except BaseException:
            self.close()
            raise

    @property
    def program_fds(self) -> Mapping[str, int]:
        """Each loaded function's program fd, by function name."""
        return types.MappingProxyType(self._programs)

    def attach(self, hooks: Iterable[Hook]) -> None:
        for hook in hooks:
            if (hook.target, hook.function) in self._attached:
                raise RuntimeError(f"{hook.function} is attached to {hook.target} already")
            fd = open_raw_tracepoint(hook.target, self._programs[hook.function])
            self._attached[(hook.target, hook.function)] = fd

    def detach(self, hooks: Iterable[Hook]) -> None:
        for hook in hooks:
            fd = self._attached.pop((hook.target, hook.function), None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        """Detach everything, then free programs and maps; safe to call twice."""
        for group in (self._attached, self._programs, self.map_fds):
            for fd in group.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            group.clear()

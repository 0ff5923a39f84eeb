"""Kernel headers for bcc to compile with.

bcc needs *some* kernel headers (its helpers include them); their version need not match the
running kernel because tcpacct takes every struct layout from BTF. Where bcc would look
(``/lib/modules/$(uname -r)/build``) there is often nothing — containers, and kernels
without a headers package. Then the newest installed Debian-style headers are merged (by
symlinks) into one tree in a cache directory, and bcc is pointed at it with
``BCC_KERNEL_SOURCE``.

Debian splits headers in two: ``linux-headers-X-amd64`` (generated files, .config) and
``linux-headers-X-common`` (the sources); ``/lib/modules/X/source`` names the second.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

KCONFIG = "include/linux/kconfig.h"


class HeadersError(Exception):
    """No kernel headers bcc can compile with."""


@dataclass(frozen=True, slots=True)
class HeadersChoice:
    """Where bcc's headers come from: ``how`` says why, ``path`` is what bcc uses."""

    how: str
    path: Path


def overlay(destination: Path, sources: list[Path]) -> None:
    """Merge directory trees by symlinks: a name in one source only (or not a directory in
    all) links to the first source that has it; directories present in all merge recursively.

    ``overlay(d, [amd64, common])``: ``d/include/generated -> amd64/include/generated``,
    ``d/include/linux -> common/include/linux``.
    """
    destination.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[Path]] = {}
    for source in sources:
        for entry in sorted(source.iterdir()):
            names.setdefault(entry.name, []).append(entry)
    for name, paths in names.items():
        target = destination / name
        if len(paths) > 1 and all(p.is_dir() for p in paths):
            overlay(target, paths)
        elif not target.exists() and not target.is_symlink():
            target.symlink_to(paths[0])


def _version_key(path: Path) -> tuple[int, ...]:
    """``linux-headers-6.1.0-56-amd64`` -> ``(6, 1, 0, 56)``."""
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def _split_pair(build: Path, modules_root: Path) -> list[Path]:
    """The build tree plus its sources (Debian's ``-common``), if split."""
    if (build / KCONFIG).is_file():
        return [build]
    version = build.name.removeprefix("linux-headers-")
    source_link = modules_root / version / "source"
    if source_link.is_dir():
        return [build, source_link.resolve()]
    common = build.with_name(re.sub(r"-[a-z0-9_]+$", "-common", build.name))
    return [build, common] if common.is_dir() else [build]


def choose_headers(
    release: str | None = None,
    *,
    modules_root: Path = Path("/lib/modules"),
    src_roots: tuple[Path, ...] = (Path("/usr/src"), Path("/opt/tcpacct/usr/src")),
    kheaders: Path = Path("/sys/kernel/kheaders.tar.xz"),
    cache_dir: Path = Path("/var/cache/tcpacct/kernel-headers"),
    environ: dict[str, str] | None = None,
) -> HeadersChoice:
    """Find headers for bcc; set up a merged tree when needed. Does not touch os.environ."""
    environ = os.environ if environ is None else environ
    release = release or os.uname().release
    if environ.get("BCC_KERNEL_SOURCE"):
        path = Path(environ["BCC_KERNEL_SOURCE"])
        if not (path / KCONFIG).is_file():
            raise HeadersError(f"BCC_KERNEL_SOURCE={path} has no {KCONFIG}")
        return HeadersChoice("BCC_KERNEL_SOURCE", path)
    running = modules_root / release
    if (running / "build" / KCONFIG).is_file() or (running / "source" / KCONFIG).is_file():
        return HeadersChoice(f"headers of the running kernel {release}", running / "build")
    if kheaders.is_file():
        return HeadersChoice(f"the kernel's own {kheaders}", kheaders)
    # The node's headers first (/usr/src, mounted from the host in the DaemonSet), then the
    # image's own fallback copy (the Dockerfile keeps Debian's under /opt/tcpacct/usr/src).
    candidates = [
        build
        for src_root in src_roots
        for build in sorted(
            (
                p
                for p in src_root.glob("linux-headers-*")
                if (p / "include").is_dir() and not p.name.endswith("-common")
            ),
            key=_version_key,
            reverse=True,
        )
    ]
    for build in candidates:
        trees = _split_pair(build, modules_root)
        if not any((tree / KCONFIG).is_file() for tree in trees):
            continue
        if len(trees) == 1:
            return HeadersChoice(f"{build.name} (struct layouts from BTF)", build)
        merged = cache_dir / build.name
        if not (merged / KCONFIG).is_file():
            overlay(merged, trees)
        return HeadersChoice(f"{build.name} merged with its sources (layouts from BTF)", merged)
    raise HeadersError(
        f"no kernel headers for bcc: nothing at {running}/build, no {kheaders}, and no "
        f"linux-headers-* in {', '.join(map(str, src_roots))}; install them "
        "(Debian: apt-get install linux-headers-amd64)"
    )


def apply_headers(choice: HeadersChoice, environ: dict[str, str] | None = None) -> None:
    """Point bcc at the chosen headers (only needed for a tree it would not find itself)."""
    environ = os.environ if environ is None else environ
    if choice.path.is_dir() and not choice.how.startswith("headers of the running kernel"):
        environ["BCC_KERNEL_SOURCE"] = str(choice.path)

"""The machine a run was taken on: CPUs, memory, kernel, interpreter and bcc versions."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``"model name\\t: AMD EPYC 7B13\\n"`` -> ``"AMD EPYC 7B13"``; "" when not found."""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
    except OSError:
        return ""
    return match.group(1).strip() if match else ""


def memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``"MemTotal:       24684000 kB"`` -> ``24105``."""
    match = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.MULTILINE)
    return int(match.group(1)) // 1024 if match else 0


def bcc_version() -> str:
    """Version of Debian's python3-bpfcc, read with dpkg (bench never imports bcc itself)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def describe_machine(proc_root: Path = Path("/proc")) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(proc_root / "cpuinfo"),
        "memory_mib": memory_mib(proc_root / "meminfo"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bcc": bcc_version(),
    }

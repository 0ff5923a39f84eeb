"""The agent yields the CPU to the node's workloads: its threads run at a lower priority.

Nothing the agent does is urgent within milliseconds: a poll may start late, and the
kernel keeps every byte and every finished socket until it does (up to the closed map's
capacity, past which finished sockets' bytes are counted as unattributed, never dropped).
At niceness 10 a thread gets about a tenth of a CPU that a nice-0 thread also wants, and
all of a CPU that nothing else wants. Measured on the bench's churn (client and server
processes pinned to the two CPUs, the agent's poller competing with them): beyond what its
kernel hooks cost, the agent's user space took 4-8 % of the connection rate at niceness 0
and none measurable at 10 (README "Benchmarks").

Niceness only weighs threads against others in the same CPU cgroup. In a Kubernetes pod,
what weighs the agent against other pods is its CPU request (the DaemonSet's 50m).

``yield_cpu(10)`` in a process with three threads at niceness 0 -> 3 (each now at 10).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.settings import MAX_NICE

log = logging.getLogger(__name__)


def yield_cpu(nice: int, tasks: Path = Path("/proc/self/task")) -> int:
    """Set every thread of this process to niceness ``nice`` (0-19) unless it is already
    that low in priority; threads started later inherit their creator's. Returns how many
    threads were changed. A thread that cannot be changed (it exited meanwhile, or the
    system refuses) is logged and left as it is: the agent runs on either way."""
    if not 0 <= nice <= MAX_NICE:
        raise ValueError(f"niceness {nice}: must be 0-{MAX_NICE}")
    changed = 0
    for entry in tasks.iterdir():
        tid = int(entry.name)
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) >= nice:
                continue
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError as error:
            log.warning("could not set thread %d to niceness %d: %s", tid, nice, error)
            continue
        changed += 1
    return changed

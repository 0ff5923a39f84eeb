"""Resolving kernel facts to owners: pid -> container/pod (cgroups), netns inode -> pod,
and connection tuples -> their NAT translation (conntrack over netlink).

Every filesystem root is a parameter (``proc_root="/proc"``) so a DaemonSet can read the
host's through ``/host/proc`` and unit tests can read fixture trees.
"""

from __future__ import annotations

from agent.lazy_exports import lazy_exports

# Names re-exported lazily (PEP 562): local mode imports agent.resolve.listening and
# .processes only, not pyroute2 through .conntrack.
_HOMES = {
    "CgroupResolver": "agent.resolve.cgroups",
    "ContainerRef": "agent.resolve.cgroups",
    "parse_cgroup_file": "agent.resolve.cgroups",
    "ConntrackResolver": "agent.resolve.conntrack",
    "NetnsResolver": "agent.resolve.netns",
}

__getattr__ = lazy_exports(__name__, _HOMES)


__all__ = [
    "CgroupResolver",
    "ConntrackResolver",
    "ContainerRef",
    "NetnsResolver",
    "parse_cgroup_file",
]

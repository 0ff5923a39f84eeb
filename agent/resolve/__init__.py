"""Resolving kernel facts to owners: pid -> container/pod (cgroups), netns inode -> pod,
and connection tuples -> their NAT translation (conntrack over netlink).

Every filesystem root is a parameter (``proc_root="/proc"``) so a DaemonSet can read the
host's through ``/host/proc`` and unit tests can read fixture trees.
"""

from agent.resolve.cgroups import CgroupResolver, ContainerRef, parse_cgroup_file
from agent.resolve.conntrack import ConntrackResolver
from agent.resolve.netns import NetnsResolver

__all__ = [
    "CgroupResolver",
    "ConntrackResolver",
    "ContainerRef",
    "NetnsResolver",
    "parse_cgroup_file",
]

"""Struct offsets the BPF programs need, read from the running kernel's BTF, as cflags.

>>> kernel_layout(Btf.from_path("/sys/kernel/btf/vmlinux")).cflags()[:2]   # doctest: +SKIP
['-DOFF_SKC_DADDR=0', '-DOFF_SKC_RCV_SADDR=4']
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from agent.ebpf.btf import Btf, BtfError


@dataclass(frozen=True, slots=True)
class KernelLayout:
    """Byte offsets from a ``struct sock *`` (or a ``struct net *`` for the netns inode)."""

    OFF_SKC_DADDR: int
    OFF_SKC_RCV_SADDR: int
    OFF_SKC_DPORT: int
    OFF_SKC_FAMILY: int
    OFF_SKC_NET: int
    OFF_SKC_V6_DADDR: int
    OFF_SKC_V6_RCV_SADDR: int
    OFF_SK_PROTOCOL: int
    OFF_INET_SPORT: int
    OFF_NET_NS_INUM: int

    def cflags(self) -> list[str]:
        return [f"-D{field.name}={getattr(self, field.name)}" for field in fields(self)]


def _expect_size(btf: Btf, struct: str, member: str, size: int) -> int:
    found = btf.member(struct, member)
    if found.size != size:
        raise BtfError(f"{struct}.{member} is {found.size} bytes here, expected {size}")
    return found.offset


def kernel_layout(btf: Btf) -> KernelLayout:
    """Offsets of the socket fields tcpacct reads, checked for the sizes the BPF code assumes."""
    common = btf.member("sock", "__sk_common").offset  # 0 on every kernel so far; not assumed
    net_pointer = btf.member("possible_net_t", "net").offset
    return KernelLayout(
        OFF_SKC_DADDR=common + _expect_size(btf, "sock_common", "skc_daddr", 4),
        OFF_SKC_RCV_SADDR=common + _expect_size(btf, "sock_common", "skc_rcv_saddr", 4),
        OFF_SKC_DPORT=common + _expect_size(btf, "sock_common", "skc_dport", 2),
        OFF_SKC_FAMILY=common + _expect_size(btf, "sock_common", "skc_family", 2),
        OFF_SKC_NET=common + btf.member("sock_common", "skc_net").offset + net_pointer,
        OFF_SKC_V6_DADDR=common + _expect_size(btf, "sock_common", "skc_v6_daddr", 16),
        OFF_SKC_V6_RCV_SADDR=common + _expect_size(btf, "sock_common", "skc_v6_rcv_saddr", 16),
        OFF_SK_PROTOCOL=_expect_size(btf, "sock", "sk_protocol", 2),
        OFF_INET_SPORT=_expect_size(btf, "inet_sock", "inet_sport", 2),
        OFF_NET_NS_INUM=btf.member("net", "ns").offset + _expect_size(btf, "ns_common", "inum", 4),
    )

"""Every backend compiles on this machine; the ones this kernel cannot run say why.

This kernel (6.18, locked down) runs only the tracepoint backend: fentry is refused (EPERM)
and kprobes are not built in. Their runtime proof is the stock-kernel VM tier (tests/vm).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.ebpf.backends import BackendUnavailable
from agent.ebpf.tracing import Capacities, compile_only, open_tracer


@pytest.mark.parametrize("backend", ["tracepoint", "fentry", "kprobe"])
def test_every_backend_compiles(backend: str) -> None:
    """compile_only raises on a compile error; a load refusal comes back as a reason."""
    outcome = compile_only(backend)
    assert outcome == "loaded" or "refused" in outcome


def test_a_backend_this_kernel_lacks_names_what_is_missing() -> None:
    if Path("/sys/bus/event_source/devices/kprobe").exists():
        pytest.skip("this kernel has kprobes: nothing is missing")
    with pytest.raises(BackendUnavailable) as caught:
        open_tracer("kprobe", capacities=Capacities(sockets=1024, closed=1024, listeners=64))
    assert "kprobes are not built into this kernel" in str(caught.value)


def test_auto_names_every_backend_it_tried_when_none_works(tmp_path: Path) -> None:
    """A BTF without the tracepoints and a /sys without kprobes: auto explains each."""
    from tests.support.btf_blob import mini_kernel

    writer, _ = mini_kernel()
    btf = tmp_path / "vmlinux"
    btf.write_bytes(writer.bytes())
    with pytest.raises(BackendUnavailable) as caught:
        open_tracer("auto", btf_path=btf, sys_root=tmp_path)
    text = str(caught.value)
    assert "no backend works here" in text
    for backend in ("tracepoint", "fentry", "kprobe"):
        assert f"backend {backend}:" in text

"""Smoke check run inside the stock-kernel VM: kprobes and fentry attach and count exactly.

Independent of the agent: a bcc program with a kretprobe on ``tcp_sendmsg`` (bytes sent =
its return value) and fentry (``KFUNC_PROBE``) on ``tcp_recvmsg`` + ``tcp_cleanup_rbuf`` (bytes
received = the running ``copied`` total of one receive call, counted once), restricted to this
process, counts a 1 MiB loopback transfer. The receiver's first read is a 256 KiB MSG_WAITALL
read against a writer sending 4 KiB pieces, so ``tcp_cleanup_rbuf`` sees several running totals
within one call. Prints one JSON line and exits 0 when both counts equal the bytes moved:

    $ sudo .venv/bin/python tests/vm/guest_smoke.py
    {"kernel": "6.1.0-56-amd64", "moved": 1048576, "sent": 1048576, "received": 1048576, ...}
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import threading

from bcc import BPF

TOTAL_BYTES = 1 << 20
FIRST_READ = 256 << 10
PIECE = 4096

PROGRAM = r"""
#include <uapi/linux/ptrace.h>

struct sock;                        /* only passed around: no kernel header needed (fast build) */

BPF_ARRAY(totals, u64, 2);          /* [0] bytes sent, [1] bytes received */
BPF_HASH(receiving, u64, u64);      /* thread -> bytes already counted in its current recvmsg */

static __always_inline bool ours(void)
{
    return (bpf_get_current_pid_tgid() >> 32) == TARGET_TGID;
}

static __always_inline void add(int index, u64 bytes)
{
    u64 *total = totals.lookup(&index);
    if (total)
        __sync_fetch_and_add(total, bytes);
}

int tcp_sendmsg_return(struct pt_regs *ctx)
{
    int sent = PT_REGS_RC(ctx);
    if (ours() && sent > 0)
        add(0, sent);
    return 0;
}

KFUNC_PROBE(tcp_recvmsg, struct sock *sk)
{
    u64 thread = bpf_get_current_pid_tgid(), zero = 0;
    if (ours())
        receiving.update(&thread, &zero);
    return 0;
}

KFUNC_PROBE(tcp_cleanup_rbuf, struct sock *sk, int copied)
{
    u64 thread = bpf_get_current_pid_tgid();
    u64 *counted;
    if (!ours() || copied <= 0)
        return 0;
    counted = receiving.lookup(&thread);
    if (counted && copied > *counted) {
        add(1, copied - *counted);
        *counted = copied;
    }
    return 0;
}
"""


def move_bytes() -> int:
    """Send TOTAL_BYTES over loopback (4 KiB pieces) and read them back; return bytes read."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        writer = socket.create_connection(listener.getsockname())
        reader, _ = listener.accept()

        def write() -> None:
            with writer:
                for offset in range(0, TOTAL_BYTES, PIECE):
                    writer.sendall(b"x" * min(PIECE, TOTAL_BYTES - offset))

        thread = threading.Thread(target=write)
        thread.start()
        with reader:
            received = len(reader.recv(FIRST_READ, socket.MSG_WAITALL))
            while chunk := reader.recv(65536):
                received += len(chunk)
        thread.join(timeout=60)
    return received


def main() -> int:
    if not BPF.support_kfunc():
        print(json.dumps({"error": "this kernel has no fentry (KFUNC_PROBE) support"}))
        return 1
    bpf = BPF(text=PROGRAM, cflags=[f"-DTARGET_TGID={os.getpid()}"])
    bpf.attach_kretprobe(event="tcp_sendmsg", fn_name="tcp_sendmsg_return")
    moved = move_bytes()
    totals = bpf["totals"]
    report = {
        "kernel": platform.release(),
        "moved": moved,
        "sent": totals[0].value,
        "received": totals[1].value,
        "kfunc": True,
    }
    bpf.cleanup()
    print(json.dumps(report))
    return 0 if report["sent"] == report["received"] == moved == TOTAL_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())

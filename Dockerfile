# tcpacct node agent image: Debian bookworm's bcc (python3-bpfcc) plus this package.
# Build from the repository root:  docker build -t tcpacct:0.1.0 .
FROM debian:bookworm-slim

# python3-bpfcc: bcc and its Python bindings (Debian's build for /usr/bin/python3).
# linux-headers-amd64: headers for bcc to compile with when the node has none. Any version
#   will do: struct layouts come from the node's BTF (/sys/kernel/btf/vmlinux), never from
#   headers. They move to /opt/tcpacct/usr/src because the DaemonSet mounts the node's
#   /usr/src (where /lib/modules/$(uname -r)/build points) over /usr/src.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc linux-headers-amd64 \
 && mkdir -p /opt/tcpacct/usr \
 && mv /usr/src /opt/tcpacct/usr/src \
 && mkdir /usr/src \
 && rm -rf /var/lib/apt/lists/*

# The package runs from its source tree, as `make run` does: the BPF C sources are read at
# run time from bpf/ beside agent/. The venv sees bcc through --system-site-packages.
# Byte-code is compiled here: at run time the root filesystem is read-only.
WORKDIR /opt/tcpacct
COPY pyproject.toml ./
COPY agent ./agent
COPY bpf ./bpf
RUN /usr/bin/python3 -m venv --system-site-packages /opt/tcpacct/.venv \
 && /opt/tcpacct/.venv/bin/pip install --no-cache-dir -e . \
 && /opt/tcpacct/.venv/bin/python -m compileall -q agent \
 && /opt/tcpacct/.venv/bin/python -c "import bcc, agent"

ENV PATH=/opt/tcpacct/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Root for BPF; the DaemonSet grants capabilities, not `privileged: true`.
USER 0
EXPOSE 9437
ENTRYPOINT ["tcpacct"]
CMD ["run"]

#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 machine, run as root by `make setup`
# (and so by `make run` and `make test`). Quick when nothing is missing.
#   - Debian packages: bcc (python3-bpfcc), kernel headers for bcc to compile
#     with (any version: struct layouts come from BTF, never from headers),
#     bpftool, nftables, conntrack, iproute2, Prometheus (end-to-end tests).
#   - .venv made from /usr/bin/python3 with --system-site-packages (sees bcc),
#     with the package installed in it (editable) plus its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(python3-bpfcc python3-venv linux-headers-amd64 bpftool nftables conntrack iproute2
          prometheus iperf3 bpfcc-tools qemu-system-x86 debootstrap e2fsprogs gcc libc6-dev
          util-linux curl)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $EUID -ne 0 ]]; then
    echo "setup: Debian packages missing (${missing[*]}); run as root: sudo make setup" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # prometheus would start a system service on :9090; tests run their own.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  if systemctl is-active --quiet prometheus 2>/dev/null; then systemctl stop prometheus || true; fi
fi

stamp=.venv/.installed
if [[ ! -x .venv/bin/python || ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: preparing .venv"
  [[ -x .venv/bin/python ]] || /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
.venv/bin/python -c "import bcc" 2>/dev/null || {
  echo "setup: .venv cannot import bcc (python3-bpfcc); recreate it: rm -rf .venv && sudo make setup" >&2
  exit 1
}

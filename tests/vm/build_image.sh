#!/usr/bin/env bash
# Build (once) the Debian bookworm image the stock-kernel test tier boots, and print its
# directory. Run as root; `make test-vm` and tests/vm/test_stock_kernel.py call it.
#
#   $ sudo tests/vm/build_image.sh
#   /var/cache/tcpacct-vm/bookworm-3f0c1a9e5b7d2c41
#
# That directory holds vmlinuz, initrd.img, rootfs.ext4 (the root file system; runs boot it
# through a qemu snapshot, so it is never written), kernel-release and a `complete` marker.
# It is keyed by a hash of this recipe (this script without its comments + guest-init): editing
# either builds a new image next to the old one; images unused for 7 days are removed after a
# build. Two runs that race take a lock; the second waits and reuses the first's image.
#
# The guest: debootstrap --variant=minbase of bookworm from the host's own apt mirrors, Debian's
# stock kernel (linux-image-amd64) with its matching headers (bcc compiles against them), python3
# and python3-bpfcc (the same Debian 3.11 as the host, so the host's .venv, shared over 9p at the
# same path, runs unchanged), iproute2, kmod, udev, nftables, conntrack, procps, bpftool; a
# trimmed initramfs that only knows virtio disks, ext4 and 9p; and /sbin/tcpacct-vm-init as PID 1.
#
# Environment: TCPACCT_VM_CACHE (default /var/cache/tcpacct-vm), TCPACCT_VM_LOCK_TIMEOUT
# (seconds to wait for another build, default 1800).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${TCPACCT_VM_CACHE:-/var/cache/tcpacct-vm}
lock_timeout=${TCPACCT_VM_LOCK_TIMEOUT:-1800}
suite=bookworm
guest_packages=(linux-image-amd64 linux-headers-amd64 initramfs-tools python3 python3-bpfcc
                iproute2 kmod udev nftables conntrack procps bpftool)
initramfs_modules=(virtio_pci virtio_blk ext4 9pnet_virtio 9p)

# Comment lines of this script do not change the image, so they do not change the hash.
recipe_hash=$( (grep -v '^[[:space:]]*#' "$here/build_image.sh"; cat "$here/guest-init") \
  | sha256sum | cut -c1-16)
image_dir=$cache_root/$suite-$recipe_hash

log() { echo "build_image: $*" >&2; }

# Every suite of $suite that the host's apt is configured with ("URI SUITE" lines), e.g.
#   http://deb.debian.org/debian/ bookworm
#   http://deb.debian.org/debian-security/ bookworm-security
host_debian_sources() {
  apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' 2>/dev/null \
    | awk -v s="$suite" '$3 == "deb" && ($2 == s || index($2, s "-") == 1) { print $1, $2 }' \
    | sort -u
}

build() { # into $1 (an empty directory on the cache's file system)
  local out=$1 root=$1/root sources mirror
  sources=$(host_debian_sources)
  mirror=$(awk -v s="$suite" '$2 == s { print $1; exit }' <<<"$sources")
  if [[ -z $mirror ]]; then
    mirror=http://deb.debian.org/debian/
    sources="$mirror $suite"$'\n'"http://deb.debian.org/debian-security/ $suite-security"
  fi
  log "debootstrap $suite from $mirror"
  # Mounts debootstrap makes in the target stay in a private mount namespace (as below).
  unshare --mount --propagation private -- \
    debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || { tail -n 30 "$out/debootstrap.log" >&2; return 1; }

  awk '{ print "deb", $1, $2, "main" }' <<<"$sources" >"$root/etc/apt/sources.list"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"  # start no services
  chmod +x "$root/usr/sbin/policy-rc.d"
  mkdir -p "$root/etc/initramfs-tools/conf.d"
  echo "MODULES=list" >"$root/etc/initramfs-tools/conf.d/tcpacct-vm.conf"
  printf '%s\n' "${initramfs_modules[@]}" >>"$root/etc/initramfs-tools/modules"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  echo tcpacct-vm >"$root/etc/hostname"

  log "installing ${guest_packages[*]}"
  # A private mount namespace: the chroot's /proc and /dev vanish with it, even on failure.
  unshare --mount --propagation private -- /bin/bash -euo pipefail -c '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
    chroot "$root" apt-get update -q
    chroot "$root" apt-get install -y -q --no-install-recommends "$@"
    chroot "$root" apt-get clean
  ' build "$root" "${guest_packages[@]}" >"$out/install.log" 2>&1 \
    || { tail -n 30 "$out/install.log" >&2; return 1; }

  rm -f "$root/usr/sbin/policy-rc.d"
  install -m 0755 "$here/guest-init" "$root/sbin/tcpacct-vm-init"
  rm -rf "$root"/usr/share/{doc,man,info,locale}/* "$root"/var/lib/apt/lists/* \
         "$root"/var/cache/apt/*.bin "$root"/var/log/*.log

  local release
  release=$(basename "$(ls -d "$root"/lib/modules/*/ | head -n 1)")
  [[ -d $root/usr/src/linux-headers-$release ]] \
    || { log "no headers matching kernel $release in the guest"; return 1; }
  # Drivers for hardware the VM does not have (~250 MB); net/, fs/, virtio stay.
  local modules=$root/lib/modules/$release/kernel
  rm -rf "$modules"/sound "$modules"/drivers/{gpu,media,infiniband,scsi,staging,usb,hid,input} \
         "$modules"/drivers/{iio,mmc,bluetooth,isdn,mtd,hwmon,video,ata,platform,net/wireless}
  rm -rf "$modules"/drivers/net/ethernet
  chroot "$root" depmod -a "$release"
  echo "$release" >"$out/kernel-release"
  cp "$root/boot/vmlinuz-$release" "$out/vmlinuz"
  cp "$root/boot/initrd.img-$release" "$out/initrd.img"

  local size_mb
  size_mb=$(( $(du -sm "$root" | cut -f1) * 5 / 4 + 256 ))  # room for what tests write
  log "rootfs.ext4: ${size_mb} MB for kernel $release"
  mkfs.ext4 -q -L tcpacct-vm -d "$root" "$out/rootfs.ext4" "${size_mb}M"
  rm -rf "$root"
  rm -f "$out"/*.log
  touch "$out/complete"
}

if [[ ! -f $image_dir/complete ]]; then
  [[ $EUID -eq 0 ]] || { log "needs root (debootstrap, chroot): sudo $0"; exit 1; }
  for tool in debootstrap mkfs.ext4 unshare flock; do
    command -v "$tool" >/dev/null \
      || { log "$tool is missing; run: sudo make setup"; exit 1; }
  done
  mkdir -p "$cache_root"
  exec {lock_fd}>"$cache_root/.$suite-$recipe_hash.lock"
  flock -w "$lock_timeout" "$lock_fd" \
    || { log "another build holds the lock for over ${lock_timeout}s"; exit 1; }
  if [[ ! -f $image_dir/complete ]]; then  # nobody built it while we waited
    work=$cache_root/.building-$suite-$recipe_hash
    rm -rf "$work" "$image_dir"
    mkdir -p "$work"
    trap 'rm -rf "$work"' EXIT
    start=$SECONDS
    build "$work"
    mv "$work" "$image_dir"
    trap - EXIT
    log "built $image_dir in $((SECONDS - start)) s"
    touch "$image_dir/last-used"
    # Images of older recipes that no run has used for a week (0.8 GB each).
    find "$cache_root" -mindepth 2 -maxdepth 2 -name last-used -mtime +7 -printf '%h\n' \
      | while read -r stale; do
          [[ $stale != "$image_dir" ]] || continue
          log "removing $stale (unused for 7 days)"
          rm -rf "$stale" "$cache_root/.$(basename "$stale").lock"
        done
  fi
fi
touch "$image_dir/last-used" 2>/dev/null || true  # read-only cache: still usable
echo "$image_dir"

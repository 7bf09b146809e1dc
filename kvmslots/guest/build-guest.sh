#!/usr/bin/env bash
# Build the tiny guest that kvmslots' test VMs (kvm_test_vm, TestVM) boot under QEMU.
#
# Why a real guest: only a running guest OS acknowledges an ACPI hot-unplug, so
# only with one does `device_del` end in DEVICE_DELETED. Debian's cloud kernel
# has ACPI PCI hotplug built in (no modules needed) and boots in seconds under
# TCG; busybox-static gives a shell. Both come from Debian packages fetched
# with `apt-get download` and unpacked with `dpkg -x`: nothing is installed on
# the host and no root filesystem image is needed.
#
# This script ships inside the kvmslots package; `kvmslots guest build [DIR]`
# runs it (a checkout also has the wrapper runtime/build-guest.sh).
#
# Usage: build-guest.sh [--force] [--work DIR] [OUTPUT_DIR]
#   OUTPUT_DIR defaults to $KVMSLOTS_GUEST_DIR, else $XDG_CACHE_HOME/kvmslots/guest
#   (~/.cache/kvmslots/guest): the directories kvmslots looks in.
#   Writes OUTPUT_DIR/vmlinuz and OUTPUT_DIR/initramfs.cpio.gz.
#   --work DIR: where downloaded packages are kept (a cache, DIR/debs); default
#   $XDG_CACHE_HOME/kvmslots/guest-work. Nothing else is left there.
#   Re-running is cheap: nothing is rebuilt while the outputs are newer than
#   the packages, the guest's init and this script. --force rebuilds anyway.
# Needs: apt-get (after `apt-get update`), dpkg, cpio, gzip. Run as root for
# /dev/console in the image (otherwise /init copes without it).
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_home=${XDG_CACHE_HOME:-}
[[ "$cache_home" == /* ]] || cache_home=${HOME:?build-guest.sh: neither XDG_CACHE_HOME nor HOME is set}/.cache
force=0
out=""
work=""
while (( $# )); do
    case "$1" in
        --force) force=1 ;;
        --work) (( $# >= 2 )) || { echo "build-guest.sh: --work needs a directory" >&2; exit 2; }
                work=$2; shift ;;
        --work=*) work=${1#--work=} ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build-guest.sh: unknown option $1" >&2; exit 2 ;;
        *) [[ -z "$out" ]] || { echo "build-guest.sh: one output dir only" >&2; exit 2; }
           out=$1 ;;
    esac
    shift
done
out=${out:-${KVMSLOTS_GUEST_DIR:-$cache_home/kvmslots/guest}}
work=${work:-$cache_home/kvmslots/guest-work}
init_script=$here/init

for tool in apt-get apt-cache dpkg cpio gzip; do
    command -v "$tool" >/dev/null || { echo "build-guest.sh: '$tool' is required" >&2; exit 1; }
done
[[ -s "$init_script" ]] || { echo "build-guest.sh: the guest's init is missing: $init_script" >&2; exit 1; }

umask 022
mkdir -p "$out" "$work/debs"
out=$(cd "$out" && pwd)
work=$(cd "$work" && pwd)

# Everything temporary lives in one directory per run, so that concurrent
# builds sharing a work dir never see each other's half-done files.
scratch=$(mktemp -d "$work/.build.XXXXXX")
tmp_img="" tmp_kernel=""
trap 'rm -rf "$scratch"; rm -f "$tmp_img" "$tmp_kernel"' EXIT

# The metapackage always points at the current ABI's real kernel package.
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
if [[ -z "$kernel_pkg" ]]; then
    echo "build-guest.sh: cannot resolve linux-image-cloud-amd64 (run 'apt-get update' first)" >&2
    exit 1
fi

# Fetch a package's current .deb into work/debs unless that exact file is
# there already; print its path. The download lands in the scratch dir and is
# moved into place whole, so an interrupted download is never taken for a
# cached package.
fetch() {
    local pkg=$1 file
    file=$(apt-get download --print-uris "$pkg" | awk 'NR == 1 { print $2 }')
    [[ -n "$file" ]] || { echo "build-guest.sh: apt-get cannot download $pkg" >&2; return 1; }
    if [[ ! -s "$work/debs/$file" ]]; then
        echo "build-guest.sh: downloading $pkg" >&2
        mkdir -p "$scratch/download"
        # Root's download into a dir the _apt user cannot write to is fine
        # but noisy; the sandbox buys nothing for a download we only unpack.
        (cd "$scratch/download" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
        [[ -s "$scratch/download/$file" ]] \
            || { echo "build-guest.sh: apt-get download $pkg did not produce $file" >&2; return 1; }
        mv -f "$scratch/download/$file" "$work/debs/$file"
    fi
    printf '%s\n' "$work/debs/$file"
}

kernel_deb=$(fetch "$kernel_pkg")
busybox_deb=$(fetch busybox-static)
inputs=("$kernel_deb" "$busybox_deb" "$init_script" "${BASH_SOURCE[0]}")

up_to_date() {
    local target=$1 input
    [[ -s "$target" ]] || return 1
    for input in "${inputs[@]}"; do
        [[ "$target" -nt "$input" ]] || return 1
    done
}

if (( ! force )) && up_to_date "$out/vmlinuz" && up_to_date "$out/initramfs.cpio.gz"; then
    echo "build-guest.sh: up to date ($kernel_pkg)"
else
    dpkg -x "$kernel_deb" "$scratch/kernel"
    dpkg -x "$busybox_deb" "$scratch/busybox"

    vmlinuz=$(find "$scratch/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
    [[ -n "$vmlinuz" ]] || { echo "build-guest.sh: no vmlinuz-* in $kernel_deb" >&2; exit 1; }

    root=$scratch/initramfs
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,root,tmp}
    chmod 1777 "$root/tmp"
    install -m 0755 "$scratch/busybox/bin/busybox" "$root/bin/busybox"
    # One symlink per applet, at the path busybox itself lists (bin/sh, ...).
    "$root/bin/busybox" --list-full | while read -r applet; do
        [[ -e "$root/$applet" || -L "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
    done
    install -m 0755 "$init_script" "$root/init"
    # The kernel opens /dev/console for init before anything is mounted.
    mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null \
        || echo "build-guest.sh: note: not root, image has no /dev/console (init still works)" >&2

    tmp_img=$(mktemp "$out/.initramfs.XXXXXX")
    tmp_kernel=$(mktemp "$out/.vmlinuz.XXXXXX")
    (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -9n >"$tmp_img"
    cp "$vmlinuz" "$tmp_kernel"
    chmod 0644 "$tmp_img" "$tmp_kernel"
    mv -f "$tmp_kernel" "$out/vmlinuz"
    mv -f "$tmp_img" "$out/initramfs.cpio.gz"
    tmp_img="" tmp_kernel=""
    echo "build-guest.sh: built from $kernel_pkg and $(basename "$busybox_deb")"
fi

echo "kernel:    $out/vmlinuz"
echo "initramfs: $out/initramfs.cpio.gz"

#!/usr/bin/env bash
# Build the guests that kvmslots' test VMs (kvm_test_vm, TestVM) boot under QEMU.
#
# Why a real guest: only a running guest OS acknowledges an ACPI hot-unplug, so
# only with one does `device_del` end in DEVICE_DELETED. Debian's cloud kernel
# has ACPI PCI hotplug built in (no modules needed) and boots in seconds under
# TCG; busybox-static gives a shell. Both come from Debian packages fetched
# with `apt-get download` and unpacked with `dpkg -x`: nothing is installed on
# the host and no root filesystem image is needed.
#
# --passthrough builds the second guest instead (TestVM(mode="passthrough")),
# into OUTPUT_DIR/passthrough: the same kernel, an initramfs that only mounts
# the root disk (virtio-blk, whose modules it loads), and that root disk as an
# ext4 image made with `mke2fs -d` (no root mount needed): python3,
# qemu-system-x86_64, nvme-cli and busybox with every library they need (the
# dependency closure of those Debian packages, as apt resolves it for an empty
# system, downloaded with `apt-get install --download-only` and unpacked with
# `dpkg -x`), the kernel's vfio modules, and the Python standard library
# compiled to .pyc (the image is mounted read-only). kvmslots itself is not in
# the image: the test VM hands the guest its own copy at each start, so the
# image survives any change of the checkout.
#
# This script ships inside the kvmslots package; `kvmslots guest build [DIR]`
# (`--passthrough`) runs it (a checkout also has the wrapper runtime/build-guest.sh).
#
# Usage: build-guest.sh [--force] [--passthrough] [--work DIR] [OUTPUT_DIR]
#   OUTPUT_DIR defaults to $KVMSLOTS_GUEST_DIR, else $XDG_CACHE_HOME/kvmslots/guest
#   (~/.cache/kvmslots/guest): the directories kvmslots looks in.
#   Writes OUTPUT_DIR/vmlinuz and OUTPUT_DIR/initramfs.cpio.gz; with --passthrough
#   OUTPUT_DIR/passthrough/{vmlinuz,initramfs.cpio.gz,rootfs.ext4,packages.txt}.
#   --work DIR: where downloaded packages are kept (a cache, DIR/debs); default
#   $XDG_CACHE_HOME/kvmslots/guest-work. Nothing else is left there.
#   Re-running is cheap: nothing is rebuilt while the outputs are newer than
#   the packages, the guest's init and this script. --force rebuilds anyway.
# Needs: apt-get (after `apt-get update`), dpkg, cpio, gzip; --passthrough also
# mke2fs (e2fsprogs >= 1.43). Run as root for /dev/console in the images
# (otherwise /init copes without it).
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_home=${XDG_CACHE_HOME:-}
[[ "$cache_home" == /* ]] || cache_home=${HOME:?build-guest.sh: neither XDG_CACHE_HOME nor HOME is set}/.cache
force=0
passthrough=0
out=""
work=""
while (( $# )); do
    case "$1" in
        --force) force=1 ;;
        --passthrough) passthrough=1 ;;
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

tools=(apt-get apt-cache dpkg cpio gzip)
(( ! passthrough )) || tools+=(dpkg-deb mke2fs)
for tool in "${tools[@]}"; do
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
tmp_files=()
trap 'rm -rf "$scratch"; rm -f "${tmp_files[@]}"' EXIT

# The metapackage always points at the current ABI's real kernel package.
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
if [[ -z "$kernel_pkg" ]]; then
    echo "build-guest.sh: cannot resolve linux-image-cloud-amd64 (run 'apt-get update' first)" >&2
    exit 1
fi

# --- shared steps ----------------------------------------------------------------

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

# up_to_date TARGET INPUT...: TARGET exists and is newer than every input.
up_to_date() {
    local target=$1 input
    shift
    [[ -s "$target" ]] || return 1
    for input in "$@"; do
        [[ "$target" -nt "$input" ]] || return 1
    done
}

# install_busybox ROOT BUSYBOX: put BUSYBOX at ROOT/bin/busybox (unless there)
# and one symlink per applet at the path busybox itself lists (bin/sh, ...),
# where no other file is.
install_busybox() {
    local root=$1 busybox=$2 applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin}
    [[ -x "$root/bin/busybox" ]] || install -m 0755 "$busybox" "$root/bin/busybox"
    "$busybox" --list-full | while read -r applet; do
        [[ -e "$root/$applet" || -L "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
    done
}

# add_guest_init ROOT: the guest's /init, the directories it mounts on and
# (as root) /dev/console, which the kernel opens for init before anything is mounted.
add_guest_init() {
    local root=$1
    mkdir -p "$root"/{dev,proc,sys,root,tmp}
    chmod 1777 "$root/tmp"
    install -m 0755 "$init_script" "$root/init"
    [[ -e "$root/dev/console" ]] || mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null \
        || echo "build-guest.sh: note: not root, image has no /dev/console (init still works)" >&2
}

# pack_initramfs ROOT OUTPUT: a gzip'd newc cpio of ROOT, files owned by root.
pack_initramfs() {
    (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -9n >"$2"
}

# add_modules KERNEL_TREE VERSION ROOT MODULE...: copy MODULEs and what they
# depend on from the unpacked kernel package into ROOT/lib/modules/VERSION
# and index them there, for busybox's modprobe. The kernel package has no
# modules.dep (its postinst runs depmod); busybox's depmod makes one.
add_modules() {
    local tree=$1 version=$2 root=$3 module path
    shift 3
    local from=$tree/lib/modules/$version to=$root/lib/modules/$version
    [[ -s "$from/modules.dep" ]] || "$busybox" depmod -b "$tree" "$version"
    mkdir -p "$to"
    cp "$from/modules.builtin" "$from/modules.order" "$to/"
    for module in "$@"; do
        # modules.dep: "kernel/path/name.ko: every dependency, in load order"
        path=$(awk -v want="$module" '{ name = $1; sub(/:$/, "", name); n = split(name, parts, "/"); base = parts[n];
                sub(/\.ko$/, "", base); gsub(/-/, "_", base); w = want; gsub(/-/, "_", w) }
              base == w { sub(/:$/, "", $1); print; exit }' "$from/modules.dep")
        [[ -n "$path" ]] || { echo "build-guest.sh: kernel module $module is not in $version" >&2; return 1; }
        for path in $path; do
            mkdir -p "$to/$(dirname "$path")"
            cp "$from/$path" "$to/$path"
        done
    done
    "$busybox" depmod -b "$root" "$version"
}

# publish TMP FINAL: move a finished file into place.
publish() {
    chmod 0644 "$1"
    mv -f "$1" "$2"
}

kernel_deb=$(fetch "$kernel_pkg")
busybox_deb=$(fetch busybox-static)
dpkg -x "$busybox_deb" "$scratch/busybox"
busybox=$scratch/busybox/bin/busybox

# --- the tiny guest (default) -------------------------------------------------------

build_tiny() {
    local inputs=("$kernel_deb" "$busybox_deb" "$init_script" "${BASH_SOURCE[0]}")
    if (( ! force )) && up_to_date "$out/vmlinuz" "${inputs[@]}" && up_to_date "$out/initramfs.cpio.gz" "${inputs[@]}"
    then
        echo "build-guest.sh: up to date ($kernel_pkg)"
    else
        dpkg -x "$kernel_deb" "$scratch/kernel"
        local vmlinuz root=$scratch/initramfs tmp_img tmp_kernel
        vmlinuz=$(find "$scratch/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
        [[ -n "$vmlinuz" ]] || { echo "build-guest.sh: no vmlinuz-* in $kernel_deb" >&2; exit 1; }

        mkdir -p "$root"
        install_busybox "$root" "$busybox"
        add_guest_init "$root"

        tmp_img=$(mktemp "$out/.initramfs.XXXXXX") && tmp_files+=("$tmp_img")
        tmp_kernel=$(mktemp "$out/.vmlinuz.XXXXXX") && tmp_files+=("$tmp_kernel")
        pack_initramfs "$root" "$tmp_img"
        cp "$vmlinuz" "$tmp_kernel"
        publish "$tmp_kernel" "$out/vmlinuz"
        publish "$tmp_img" "$out/initramfs.cpio.gz"
        echo "build-guest.sh: built from $kernel_pkg and $(basename "$busybox_deb")"
    fi
    echo "kernel:    $out/vmlinuz"
    echo "initramfs: $out/initramfs.cpio.gz"
}

# --- the passthrough guest (--passthrough) ---------------------------------------------

#: What the root filesystem holds; apt adds every dependency (no Recommends).
#: usr-is-merged satisfies init-system-helpers' "usrmerge | usr-is-merged"
#: without usrmerge, which would pull in perl.
rootfs_packages=(python3 qemu-system-x86 nvme-cli busybox-static usr-is-merged)
#: Kernel modules of the root filesystem (vfio, loaded by the tests) and of the initramfs (the root disk).
rootfs_modules=(vfio-pci vfio_iommu_type1)
initramfs_modules=(virtio_pci virtio_blk)
#: Unpacked but never used by a guest without users or a display.
rootfs_prune=(usr/share/doc usr/share/man usr/share/info usr/share/locale usr/share/lintian usr/share/bug
              usr/share/doc-base usr/share/bash-completion usr/share/iso-codes usr/share/xml/iso-codes)

# apt_for_empty_system ARGS...: apt-get as if nothing were installed (an
# empty dpkg status), keeping downloads in work/debs. Nothing is installed
# and the host's own package state is neither read nor locked.
apt_for_empty_system() {
    : >"$scratch/status"
    LC_ALL=C apt-get -q -o Dir::State::status="$scratch/status" -o Dir::Cache::archives="$work/debs/" \
        -o APT::Install-Recommends=false -o APT::Install-Suggests=false -o APT::Sandbox::User=root "$@"
}

build_passthrough() {
    local target=$out/passthrough
    mkdir -p "$target"

    # The dependency closure, as "package version arch" lines ("Inst libc6 (2.36-9 Debian:12 [amd64]) []").
    local closure
    closure=$(apt_for_empty_system install -s "${rootfs_packages[@]}" \
        | sed -nE 's/^Inst ([^ ]+) \(([^ ]+) .*\[([^]]+)\]\).*/\1 \2 \3/p')
    [[ -n "$closure" ]] || { echo "build-guest.sh: apt resolved nothing for ${rootfs_packages[*]}" >&2; exit 1; }
    local missing=0 pkg version arch file debs=()
    while read -r pkg version arch; do
        file=$work/debs/${pkg}_${version//:/%3a}_${arch}.deb
        debs+=("$file")
        [[ -s "$file" ]] || missing=$((missing + 1))
    done <<<"$closure"
    if (( missing )); then
        echo "build-guest.sh: downloading $missing of ${#debs[@]} packages" >&2
        apt_for_empty_system -qq install --download-only -y "${rootfs_packages[@]}" >&2
    fi
    for file in "${debs[@]}"; do
        [[ -s "$file" ]] || { echo "build-guest.sh: apt did not download $file" >&2; exit 1; }
    done

    local inputs=("$kernel_deb" "${debs[@]}" "$init_script" "${BASH_SOURCE[0]}") name
    local outputs=(vmlinuz initramfs.cpio.gz rootfs.ext4 packages.txt) fresh=1
    for name in "${outputs[@]}"; do
        up_to_date "$target/$name" "${inputs[@]}" || fresh=0
    done
    if (( ! force && fresh )); then
        echo "build-guest.sh: up to date ($kernel_pkg, ${#debs[@]} packages)"
    else
        local started=$SECONDS vmlinuz kver
        dpkg -x "$kernel_deb" "$scratch/kernel"
        vmlinuz=$(find "$scratch/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
        [[ -n "$vmlinuz" ]] || { echo "build-guest.sh: no vmlinuz-* in $kernel_deb" >&2; exit 1; }
        kver=${vmlinuz##*/vmlinuz-}

        # Stage 1: busybox, the virtio modules and the init that switches to the root disk.
        local initrd=$scratch/initramfs
        mkdir -p "$initrd/newroot"
        install_busybox "$initrd" "$busybox"
        add_guest_init "$initrd"
        add_modules "$scratch/kernel" "$kver" "$initrd" "${initramfs_modules[@]}"

        # The root filesystem: every package of the closure, unpacked.
        local root=$scratch/rootfs
        mkdir -p "$root"
        for file in "${debs[@]}"; do
            dpkg-deb -x "$file" "$root"
        done
        for name in "${rootfs_prune[@]}"; do
            rm -rf "${root:?}/$name"
        done
        install_busybox "$root" "$root/bin/busybox"  # sh, modprobe, ... where Debian has nothing
        add_guest_init "$root"
        mkdir -p "$root"/{run,var/tmp,usr/local}
        add_modules "$scratch/kernel" "$kver" "$root" "${rootfs_modules[@]}"
        # No package's maintainer script ran, so write what they would have.
        printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
        printf 'root:x:0:\n' >"$root/etc/group"
        printf 'kvmslots-passthrough\n' >"$root/etc/hostname"
        # Byte-compile the standard library with the image's own python (run
        # here through the image's loader), as Debian's postinst would: on a
        # read-only root every import would compile it again otherwise.
        local libs=$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu
        if ! env -i PYTHONHOME="$root/usr" "$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$libs" \
            "$root/usr/bin/python3" -m compileall -q -j 0 -s "$root" -p / \
            -x '/test/|/tests/|idlelib|tkinter|turtledemo' "$root/usr/lib/python3."* "$root/usr/lib/python3/dist-packages" \
            >&2; then
            echo "build-guest.sh: note: could not byte-compile the image's python here; the guest will compile on import" >&2
        fi

        # An ext4 image of the tree, made without mounting anything. No journal:
        # the guest mounts it read-only. Room for the tree plus a fifth.
        local used_kb inodes tmp_fs tmp_img tmp_kernel tmp_list
        used_kb=$(du -sk "$root" | cut -f1)
        inodes=$(( $(find "$root" | wc -l) + 4096 ))
        tmp_fs=$(mktemp "$target/.rootfs.XXXXXX") && tmp_files+=("$tmp_fs")
        mke2fs -q -F -t ext4 -O ^has_journal -m 0 -b 4096 -N "$inodes" -L kvmslots-root \
            -E root_owner=0:0 -d "$root" "$tmp_fs" "$(( used_kb * 6 / 5 / 1024 + 32 ))M"

        tmp_img=$(mktemp "$target/.initramfs.XXXXXX") && tmp_files+=("$tmp_img")
        tmp_kernel=$(mktemp "$target/.vmlinuz.XXXXXX") && tmp_files+=("$tmp_kernel")
        tmp_list=$(mktemp "$target/.packages.XXXXXX") && tmp_files+=("$tmp_list")
        pack_initramfs "$initrd" "$tmp_img"
        cp "$vmlinuz" "$tmp_kernel"
        { echo "$kernel_pkg $(dpkg-deb -f "$kernel_deb" Version) amd64"; echo "$closure"; } >"$tmp_list"
        publish "$tmp_kernel" "$target/vmlinuz"
        publish "$tmp_img" "$target/initramfs.cpio.gz"
        publish "$tmp_fs" "$target/rootfs.ext4"
        publish "$tmp_list" "$target/packages.txt"  # last: it marks a complete build
        echo "build-guest.sh: built the passthrough guest from $kernel_pkg and ${#debs[@]} packages" \
             "($(( used_kb / 1024 )) MB unpacked, $(( SECONDS - started )) s)"
    fi
    echo "kernel:    $target/vmlinuz"
    echo "initramfs: $target/initramfs.cpio.gz"
    echo "rootfs:    $target/rootfs.ext4"
}

if (( passthrough )); then
    build_passthrough
else
    build_tiny
fi

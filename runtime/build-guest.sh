#!/usr/bin/env bash
# Build the test guest for this checkout: runtime/out/{vmlinuz,initramfs.cpio.gz}
# (with --passthrough the passthrough guest: runtime/out/passthrough/).
#
# The recipe itself ships in the package (kvmslots/guest/build-guest.sh and
# kvmslots/guest/init; an installed kvmslots runs it as `kvmslots guest build`).
# This wrapper only keeps a checkout's old defaults: OUTPUT_DIR defaults to
# $KVMSLOTS_GUEST_DIR, else runtime/out, and downloaded packages are cached in
# runtime/work/debs.
#
# Usage: runtime/build-guest.sh [--force] [--passthrough] [OUTPUT_DIR]   (--help: the recipe's own help)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
recipe=$(cd "$here/../kvmslots/guest" && pwd)/build-guest.sh
args=(--work "$here/work")
given=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
                   echo; echo "The recipe ($recipe):"; exec bash "$recipe" --help ;;
        -*) ;;
        *) given=1 ;;
    esac
done
(( given )) || [[ -n "${KVMSLOTS_GUEST_DIR:-}" ]] || args+=("$here/out")
# Unpacked trees the recipe used to leave in runtime/work (it now unpacks into a scratch dir).
rm -rf "$here/work/kernel" "$here/work/busybox" "$here/work/initramfs"
exec bash "$recipe" "${args[@]}" "$@"

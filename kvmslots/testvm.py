"""Disposable QEMU VMs for kvmslots' tests (and for users' own CI).

Why real VMs: PCI hot-unplug on a ``pc`` machine is a conversation. QMP
``device_del`` only *asks*; QEMU removes the device (and emits
``DEVICE_DELETED``) once the guest OS has acknowledged the ACPI eject. A
hotplug manager therefore cannot be tested against a mock or a paused QEMU:
removal would never complete. This module gives two kinds of throw-away VM:

* ``mode="guest"`` boots a tiny Linux (Debian's cloud kernel + a busybox
  initramfs, built by ``kvmslots guest build``) that really acknowledges
  ACPI unplug, and drives its shell over the serial console, so a test can
  also check what the guest sees in ``/sys/bus/pci/devices``.
* ``mode="qtest"`` runs no guest code at all; the test plays the guest through
  QEMU's qtest protocol. It can perform the guest's eject itself
  (:meth:`TestVM.acpi_eject`) or withhold it, to test an unplug the guest never
  acknowledges. (Debian's QEMU ships no ``qtest`` accelerator, so this mode is
  TCG with the CPUs stopped by ``-S``: no firmware or guest code ever runs.)
* ``mode="passthrough"`` boots the second guest (``kvmslots guest build
  --passthrough``) on a ``q35`` machine with an emulated IOMMU (``intel-iommu``,
  interrupt remapping on) and an SR-IOV capable NVMe controller, so that host
  PCI passthrough - virtual functions, IOMMU groups, ``vfio-pci`` - runs on a
  real kernel; with ``numa=True`` it also has two NUMA nodes and a second
  SR-IOV NVMe on node 1 (behind a ``pxb-pcie``), so NUMA affinity is tested
  on the kernel's own ``numa_node``. Its root filesystem has python3, ``qemu-system-x86_64`` and
  ``nvme-cli``; this kvmslots (and its dependencies) is handed to it at every
  start on a read-only disk, so the guest always runs the code under test.
  :meth:`TestVM.run_script` runs a script there and returns its output and
  exit status.

Both use TCG unless KVM is asked for (``accel="kvm"`` or ``KVMSLOTS_ACCEL=kvm``),
because nested KVM guests hang on the machines this project is built on.
Every VM is torn down on :meth:`TestVM.stop`, on garbage collection, at
interpreter exit, and - through ``PR_SET_PDEATHSIG`` - even when the Python
process is killed outright: a test run never leaves a QEMU behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kvmslots.errors import GuestBootTimeout, GuestFilesMissing, InvalidSlot, TestVMError
from kvmslots.guest import BUILD_COMMAND, GUEST_DIR_ENV, PASSTHROUGH_SUBDIR, default_guest_dir
from kvmslots.monitor import RunsQmp

__all__ = [
    "TestVM",
    "find_guest_files",
    "qemu_binary",
    "parse_pci_addresses",
    "slots_on_bus",
    "KERNEL_NAME",
    "INITRAMFS_NAME",
    "ROOTFS_NAME",
    "PASSTHROUGH_SUBDIR",
    "GUEST_PYTHON_PACKAGES",
    "find_passthrough_files",
    "sriov_nvme_args",
    "numa_args",
    "SRIOV_SERIAL",
    "NUMA_SRIOV_SERIAL",
    "NUMA_PXB_BUS",
    "write_python_tar",
    "migrate_qemu",
]

KERNEL_NAME = "vmlinuz"
INITRAMFS_NAME = "initramfs.cpio.gz"
#: The passthrough guest's root disk image, in the ``passthrough`` subdirectory of the guest directory.
ROOTFS_NAME = "rootfs.ext4"
#: The passthrough guest's package list (written last by the recipe); names the guest's python.
PACKAGES_NAME = "packages.txt"
#: What the passthrough guest gets of this host's Python at every start: kvmslots and what it imports.
GUEST_PYTHON_PACKAGES = ("kvmslots", "qemu.qmp", "bitarray", "tenacity")
#: A source checkout's guest (``bash runtime/build-guest.sh``), looked in before the per-user one.
#: Only a checkout has ``runtime/build-guest.sh`` next to the package; an installed kvmslots has none.
_CHECKOUT_RUNTIME = Path(__file__).resolve().parent.parent / "runtime"

#: ACPI PCI hotplug eject register of the i440FX ``pc`` machine (0xae00 + 8).
PC_ACPI_EJECT_PORT = 0xAE08
_MODES = ("guest", "qtest", "passthrough")
_CONSOLE_MODES = ("guest", "passthrough")  # modes with a booted guest and a shell on the console
_DEFAULT_MACHINE = {"guest": "pc", "qtest": "pc", "passthrough": "q35,kernel-irqchip=split"}
_DEFAULT_MEMORY_MB = {"guest": 256, "qtest": 256, "passthrough": 1024}
_DEFAULT_BOOT_TIMEOUT = {"guest": 60.0, "qtest": 60.0, "passthrough": 180.0}
#: Serial of the passthrough guest's SR-IOV NVMe controller (:func:`sriov_nvme_args`), at 00:02.0.
SRIOV_SERIAL = "kvmslots-sriov"
#: Serial of the SR-IOV NVMe controller that ``numa=True`` puts on NUMA node 1 (:func:`numa_args`).
NUMA_SRIOV_SERIAL = "kvmslots-sriov-node1"
#: The first bus number of the ``pxb-pcie`` expander on NUMA node 1; its root port's bus is the next.
NUMA_PXB_BUS = 0x80
#: Serials of the passthrough guest's virtio disks; its /init finds them by these.
_ROOT_SERIAL = "kvmslots-root"
_PYTHON_SERIAL = "kvmslots-python"
#: Where the passthrough guest keeps the scripts run_script sends (a tmpfs).
_SCRIPT_DIR = "/run/kvmslots-scripts"
#: busybox ash's line editor takes lines of up to 1024 bytes (CONFIG_FEATURE_EDITING_MAX_LEN);
#: a longer command line is cut, and the shell waits for the rest of a quote that never comes.
_CONSOLE_LINE_MAX = 1000
_SCRIPT_CHUNK = 768  # base64 characters per console line while sending a script

#: Enables $1 virtual functions of the SR-IOV NVMe controller with serial $2 and brings them
#: up, the way QEMU 7.2's docs/system/devices/nvme.rst describes: a secondary controller (VF)
#: stays offline, and no driver can use it, until the primary gave it flexible queue (VQ) and
#: interrupt (VI) resources and set it online with the Virtualization Management command
#: (nvme-cli `virt-mgmt`: -r 0 VQ / 1 VI, -a 8 assign, -a 9 online, -a 7 offline). VFs are
#: created with driver autoprobe off, so the nvme driver does not fail on them while they are
#: offline; once online they are probed, with autoprobe back on. Prints the VFs' addresses.
_ENABLE_NVME_VFS = r"""
set -eu
count=$1 serial=$2
ctrl= pf=
for c in /sys/class/nvme/nvme*; do
    # the controller's serial, without the spaces that pad it to 20 bytes
    [ "$(sed 's/ *$//' "$c/serial" 2>/dev/null)" = "$serial" ] && [ ! -e "$c/device/physfn" ] || continue
    ctrl=/dev/${c##*/} pf=$(readlink -f "$c/device")
done
[ -n "$ctrl" ] || { echo "no NVMe controller with serial $serial (is it a physical function?)"; exit 2; }
caps=$(nvme primary-ctrl-caps "$ctrl")
vq=$(echo "$caps" | awk '$1 == "vqfrsm" { print $3 }')
vi=$(echo "$caps" | awk '$1 == "vifrsm" { print $3 }')
if [ "$(cat "$pf/sriov_numvfs")" != 0 ]; then echo 0 >"$pf/sriov_numvfs"; fi
[ "$count" -gt 0 ] || exit 0
echo 0 >"$pf/sriov_drivers_autoprobe"
echo "$count" >"$pf/sriov_numvfs"
# "SCID ... : 0x0001" then "VFN ... : 0x0001" for each secondary controller
nvme list-secondary "$ctrl" | awk '$1 == "SCID" { scid = $NF } $1 == "VFN" { print scid, $NF }' |
while read -r scid vfn; do
    [ $((vfn)) -le "$count" ] || continue
    nvme virt-mgmt "$ctrl" -c $((scid)) -a 7 >/dev/null 2>&1 || true  # offline, if it was online
    nvme virt-mgmt "$ctrl" -c $((scid)) -r 0 -a 8 -n "$vq" >/dev/null
    nvme virt-mgmt "$ctrl" -c $((scid)) -r 1 -a 8 -n "$vi" >/dev/null
    nvme virt-mgmt "$ctrl" -c $((scid)) -a 9 >/dev/null
done
echo 1 >"$pf/sriov_drivers_autoprobe"
for link in "$pf"/virtfn*; do
    vf=$(basename "$(readlink -f "$link")")
    echo "$vf" >/sys/bus/pci/drivers_probe
    tries=0
    until [ -e "$link/driver" ]; do
        tries=$((tries + 1))
        [ "$tries" -le 200 ] || { echo "$vf: no driver took it"; exit 3; }
        sleep 0.05
    done
    echo "VF $vf"
done
"""
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
_STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
_PROBE_INTERVAL = 0.5  # seconds between readiness probes on the console

_PCI_ADDRESS = re.compile(r"([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")


# --- locating the pieces --------------------------------------------------------


async def migrate_qemu(
    source: RunsQmp, target: RunsQmp, uri: str, *, return_path: bool = True, timeout: float = 120.0
) -> dict[str, Any]:
    """Live-migrate over QMP, as a lifecycle manager does, and return the source's last ``query-migrate``.

    The target must have been started with ``-incoming defer`` (``TestVM(incoming="defer")``):
    it gets ``migrate-incoming`` *uri*, the source ``migrate`` *uri*; then the source is polled
    until the status is ``completed``, ``failed`` or ``cancelled``, or *timeout* seconds passed
    (the answer then still says ``active``).  ``return-path`` is set on both ends unless
    *return_path* is false: without it a source says ``completed`` even when the target then
    refuses the state.
    """
    if return_path:
        for qemu in (source, target):
            await qemu.execute(
                "migrate-set-capabilities", {"capabilities": [{"capability": "return-path", "state": True}]}
            )
    await target.execute("migrate-incoming", {"uri": uri})
    await source.execute("migrate", {"uri": uri})
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await source.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.01)


def find_guest_files(guest_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Return ``(kernel, initramfs)`` of the test guest.

    Looked for in the first of: the argument, ``$KVMSLOTS_GUEST_DIR``; when
    neither is given, a source checkout's ``runtime/out`` (for developers, if
    it holds a guest), then the per-user ``$XDG_CACHE_HOME/kvmslots/guest``
    (``~/.cache/kvmslots/guest``), where ``kvmslots guest build`` puts it. A
    directory someone named explicitly is the only one looked in: it must not
    be silently replaced by another guest. The error names the command that
    builds the guest where it was looked for.
    """
    kernel, initramfs = _find_files(guest_dir, (KERNEL_NAME, INITRAMFS_NAME), "", BUILD_COMMAND)
    return kernel, initramfs


def find_passthrough_files(guest_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path, Path]:
    """Return ``(kernel, initramfs, rootfs)`` of the passthrough guest.

    They live in the ``passthrough`` subdirectory of the guest directory, which
    is looked for as :func:`find_guest_files` does (``guest_dir`` names the
    guest directory, not the subdirectory). ``kvmslots guest build
    --passthrough`` builds them there.
    """
    kernel, initramfs, rootfs = _find_files(
        guest_dir, (KERNEL_NAME, INITRAMFS_NAME, ROOTFS_NAME, PACKAGES_NAME), PASSTHROUGH_SUBDIR,
        f"{BUILD_COMMAND} --passthrough",
    )[:3]
    return kernel, initramfs, rootfs


def _find_files(
    guest_dir: str | os.PathLike[str] | None, names: Sequence[str], subdir: str, build_command: str
) -> list[Path]:
    """``names`` in ``<guest directory>/<subdir>`` of the first guest directory that has them all."""
    if guest_dir is not None:
        candidates, origin = [Path(guest_dir)], "the guest_dir argument"
    elif os.environ.get(GUEST_DIR_ENV):
        candidates, origin = [Path(os.environ[GUEST_DIR_ENV])], f"${GUEST_DIR_ENV}"
    else:
        candidates, origin = [default_guest_dir()], "the default location"
        if (_CHECKOUT_RUNTIME / "build-guest.sh").is_file() and (_CHECKOUT_RUNTIME / "out").is_dir():
            candidates.insert(0, _CHECKOUT_RUNTIME / "out")
    for directory in candidates:
        paths = [directory / subdir / name for name in names]
        if all(path.is_file() for path in paths):
            return paths
    directory = candidates[-1]  # the one the build command writes when given no directory
    missing = [path for path in (directory / subdir / name for name in names) if not path.is_file()]
    also = "".join(f"; also looked in {other / subdir if subdir else other}" for other in candidates[:-1])
    named = guest_dir is not None or bool(os.environ.get(GUEST_DIR_ENV))
    command = f"{build_command} {shlex.quote(str(directory))}" if named else build_command
    what = "passthrough guest" if subdir else "test guest"
    raise GuestFilesMissing(
        f"{what} not built: missing {', '.join(map(str, missing))} (from {origin}{also}). "
        f"Build it with: {command}"
    )


def qemu_binary() -> str:
    """Return the QEMU executable: ``$KVMSLOTS_QEMU`` or ``qemu-system-x86_64`` on PATH."""
    wanted = os.environ.get("KVMSLOTS_QEMU") or "qemu-system-x86_64"
    found = shutil.which(wanted)
    if found is None:
        source = "$KVMSLOTS_QEMU" if os.environ.get("KVMSLOTS_QEMU") else "PATH"
        raise TestVMError(
            f"QEMU not found: {wanted!r} (from {source}) is not an executable. "
            "Install it with: apt-get install qemu-system-x86"
        )
    return found


# --- pure helpers (unit tested without QEMU) --------------------------------------


def parse_pci_addresses(text: str) -> set[str]:
    """Pick the PCI addresses (``0000:00:05.0``) out of ``ls`` output.

    Anything else on the console (a prompt, a stray kernel line) is ignored
    rather than trusted, since the console is a shared byte stream.
    """
    return {word for word in text.split() if _PCI_ADDRESS.fullmatch(word)}


def slots_on_bus(addresses: Iterable[str], bus: int = 0, domain: int = 0) -> set[int]:
    """Slots of ``bus`` (in ``domain``) that hold at least one function."""
    slots = set()
    for address in addresses:
        match = _PCI_ADDRESS.fullmatch(address)
        if match and int(match[1], 16) == domain and int(match[2], 16) == bus:
            slots.add(int(match[3], 16))
    return slots


def sriov_nvme_args(
    max_vfs: int = 4, *, addr: int = 2, bus: str | None = None, serial: str = SRIOV_SERIAL
) -> list[str]:
    """QEMU arguments for an SR-IOV capable NVMe controller (QEMU >= 7.1) at slot ``addr``.

    The controller (QEMU id and serial ``serial``, default ``kvmslots-sriov``
    in NVM subsystem ``kvmslots-subsys``; another serial gets a subsystem of its
    own, ``<serial>-subsys``, so the guest sees independent devices rather than
    two controllers of one subsystem) can enable ``max_vfs`` virtual functions, at functions
    1..max_vfs of its own slot. ``addr`` 0 needs a ``bus`` (slot 0 of
    ``pcie.0`` is the host bridge; a ``pcie-root-port``'s bus has slot 0 only).
    It has no namespace, so the guest sees no disk
    on it. Each secondary controller (VF) can get 4 flexible queues (the admin
    queue and 3 I/O queues) and 2 flexible interrupts; the primary keeps 4
    queues and 4 interrupts of its own. QEMU 7.2 starts with no flexible
    resource assigned to anyone (``nvme primary-ctrl-caps``: ``vqrfap`` and
    ``virfap`` 0), and a VF stays offline - no driver can use it - until
    ``nvme virt-mgmt`` gave it resources and set it online
    (:meth:`TestVM.enable_nvme_vfs` does that).
    """
    if isinstance(max_vfs, bool) or not isinstance(max_vfs, int) or not 1 <= max_vfs <= 7:
        raise ValueError(f"max_vfs must be 1..7 (VFs sit in functions 1..7 of the PF's slot), not {max_vfs!r}")
    if isinstance(addr, bool) or not isinstance(addr, int) or not (0 if bus else 1) <= addr < 32:
        raise InvalidSlot(f"addr must be a slot in {0 if bus else 1}..31, not {addr!r}")
    if not isinstance(serial, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,19}", serial):
        raise ValueError(f"serial must be 1..20 letters, digits and '-' (an NVMe serial number), not {serial!r}")
    subsys, nqn = ("kvmslots-subsys", "kvmslots") if serial == SRIOV_SERIAL else (f"{serial}-subsys", serial)
    where = f"addr={addr:#x}" + (f",bus={bus}" if bus else "")
    return [
        "-device", f"nvme-subsys,id={subsys},nqn={nqn}",
        "-device", f"nvme,id={serial},serial={serial},subsys={subsys},{where},"
                   f"sriov_max_vfs={max_vfs},sriov_vq_flexible={4 * max_vfs},sriov_vi_flexible={2 * max_vfs},"
                   f"max_ioqpairs={4 * max_vfs + 3},msix_qsize={2 * max_vfs + 4}",
    ]  # fmt: skip


def numa_args(memory_mb: int, cpus: int, sriov_max_vfs: int | None = 4) -> list[str]:
    """QEMU arguments for two NUMA nodes and an SR-IOV NVMe controller on node 1 (a q35 machine).

    Node 0 gets the first half of the CPUs and ``memory_mb // 2`` MiB, node 1
    the rest, each from a ``memory-backend-ram`` (QEMU 7.2 refuses the older
    ``-numa node,mem=`` on current machine types). A ``pxb-pcie`` expander
    bridge with ``numa_node=1`` (buses from :data:`NUMA_PXB_BUS`, at slot 5 of
    ``pcie.0``) holds a ``pcie-root-port`` and, behind it, the controller of
    :func:`sriov_nvme_args` with serial :data:`NUMA_SRIOV_SERIAL` (none when
    ``sriov_max_vfs`` is None). QEMU writes the expander's node into ACPI
    (``_PXM``), so the guest kernel puts the controller and its VFs on node 1,
    as a host firmware does for a device in the second socket's root complex;
    devices on ``pcie.0`` keep node -1 (no ``_PXM``), as on a host whose
    firmware does not tell. Every piece works under TCG and KVM alike.

    QEMU puts a ``-device`` that names no ``bus`` on the PCI bus created last,
    so a PCI device given after these arguments needs a ``bus=`` (``pcie.0``,
    or a root port of its own): the expander's bus takes bridges only.
    """
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 2:
        raise ValueError(f"two NUMA nodes need at least 2 CPUs, not {cpus!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(f"two NUMA nodes need at least 64 MiB, not {memory_mb!r}")
    half, first = memory_mb // 2, cpus // 2
    port = "kvmslots-node1-port"
    return [
        "-object", f"memory-backend-ram,id=kvmslots-node0-mem,size={half}M",
        "-object", f"memory-backend-ram,id=kvmslots-node1-mem,size={memory_mb - half}M",
        "-numa", f"node,nodeid=0,cpus=0{f'-{first - 1}' if first > 1 else ''},memdev=kvmslots-node0-mem",
        "-numa", f"node,nodeid=1,cpus={first}{f'-{cpus - 1}' if cpus - first > 1 else ''},memdev=kvmslots-node1-mem",
        "-device", f"pxb-pcie,id=kvmslots-node1-pxb,bus_nr={NUMA_PXB_BUS},numa_node=1,bus=pcie.0,addr=0x5",
        # chassis 200: away from the small numbers callers give their own root ports
        "-device", f"pcie-root-port,id={port},bus=kvmslots-node1-pxb,chassis=200,addr=0x0",
        *(sriov_nvme_args(sriov_max_vfs, addr=0, bus=port, serial=NUMA_SRIOV_SERIAL) if sriov_max_vfs else []),
    ]  # fmt: skip


def _guest_python(packages_txt: Path) -> str | None:
    """``"3.11"`` when the passthrough guest's package list names ``python3.11``; None when unknown."""
    try:
        text = packages_txt.read_text()
    except OSError:
        return None
    match = re.search(r"^python(3\.\d+) ", text, re.MULTILINE)
    return match[1] if match else None


def write_python_tar(
    path: Path, packages: Sequence[str] = GUEST_PYTHON_PACKAGES, *, guest_python: str | None = None
) -> list[str]:
    """Write a tar of the host's ``packages`` (import names) to ``path``, laid out as in site-packages.

    ``qemu.qmp`` goes in as ``qemu/qmp/...`` and so on; ``__pycache__`` is
    left out. Returns the names written. A package with compiled extension
    modules cannot run on another Python minor version, so when
    ``guest_python`` (``"3.11"``) differs from this interpreter's and a package
    has one, :class:`TestVMError` says so.
    """
    import importlib.util
    import sys
    import tarfile

    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    names: list[str] = []

    def skip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        base = info.name.rsplit("/", 1)[-1]
        if base == "__pycache__" or base.endswith((".pyc", ".pyo")):
            return None
        if guest_python and guest_python != here and base.endswith(".so"):
            raise TestVMError(
                f"{info.name} is compiled for Python {here}, the passthrough guest runs Python {guest_python}: "
                f"run the tests with Python {guest_python}, or pass python_packages without it"
            )
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in packages:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise TestVMError(f"cannot hand {name!r} to the passthrough guest: no such package here")
            source = Path(next(iter(spec.submodule_search_locations)))
            tar.add(source, arcname=name.replace(".", "/"), filter=skip)
            names.append(name)
    return names


def _chardev_path(path: Path) -> str:
    """Quote a path for a QEMU ``key=value,...`` option (commas are doubled)."""
    return str(path).replace(",", ",,")


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` making the child get SIGKILL when its parent dies.

    prctl is resolved here, in the parent, so the child only makes one call.
    The death signal fires when the *thread* that forked exits: start VMs from
    a thread that outlives them (normally the main thread).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# --- cleanup state, kept apart from TestVM so weakref.finalize can own it -------------


@dataclass
class _Resources:
    proc: subprocess.Popen[bytes] | None = None
    sockets: list[socket.socket] = field(default_factory=list)
    socket_files: list[Path] = field(default_factory=list)
    private_dir: Path | None = None
    logs: list[IO[bytes]] = field(default_factory=list)  # open files to close


def _release(res: _Resources) -> None:
    """Tear everything down; safe on partial state and at interpreter exit."""
    for sock in res.sockets:
        with contextlib.suppress(OSError):
            sock.close()
    proc = res.proc
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for log in res.logs:
        log.close()
    for path in res.socket_files:
        path.unlink(missing_ok=True)
    if res.private_dir is not None:
        shutil.rmtree(res.private_dir, ignore_errors=True)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.replace("\r", "").splitlines()[-lines:]) or "(no output)"


# --- the VM -----------------------------------------------------------------------


class TestVM:
    """A disposable QEMU VM: `-machine pc`, TCG by default, QMP on a unix socket, never left behind.

    Tests talk QMP to :attr:`qmp_path` themselves (QEMU serves one QMP client
    at a time, so this class never holds that socket). Use it as a context
    manager or call :meth:`start`/:meth:`stop`. A VM is started at most once.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        mode: str = "guest",
        machine: str | None = None,
        accel: str | None = None,
        memory_mb: int | None = None,
        extra_args: Sequence[str] = (),
        guest_dir: str | os.PathLike[str] | None = None,
        boot_timeout: float | None = None,
        cpus: int = 1,
        sriov_max_vfs: int | None = 4,
        numa: bool = False,
        python_packages: Sequence[str] = GUEST_PYTHON_PACKAGES,
        incoming: str | None = None,
    ) -> None:
        """Prepare (but do not start) a VM.

        ``workdir`` receives the logs (``qemu.log``, ``console.log``,
        ``qtest.log``); when None a private temporary directory is used and
        removed on :meth:`stop`. Sockets always live in a private 0700
        directory under the system temp dir, because unix socket paths are
        limited to 107 bytes and a caller's workdir may be deeper than that.

        ``machine`` defaults to ``pc``, in passthrough mode to
        ``q35,kernel-irqchip=split`` (what interrupt remapping needs under
        KVM); ``memory_mb`` to 256 (passthrough: 1024, for the QEMU it runs);
        ``boot_timeout`` to 60 s (passthrough: 180 s). Passthrough mode only:
        ``sriov_max_vfs`` sizes the SR-IOV NVMe controller of
        :func:`sriov_nvme_args` at slot 2 (None: no such controller, bring
        devices in ``extra_args``), and ``python_packages`` are the host's
        packages handed to the guest (:func:`write_python_tar`). ``numa=True``
        gives the guest two NUMA nodes and a second SR-IOV NVMe controller
        (serial :data:`NUMA_SRIOV_SERIAL`, also ``sriov_max_vfs``) behind a
        ``pxb-pcie`` on node 1, at ``0000:81:00.0`` (:func:`numa_args`); it
        takes at least 2 CPUs, so ``cpus`` below 2 becomes 2. It is opt-in
        because it adds PCI functions that tests of the default topology would
        otherwise see.

        ``incoming`` starts QEMU as a live migration target (``-incoming
        <incoming>``; :attr:`migration_uri` is a private unix socket for it):
        :meth:`start` then returns once QEMU is up, as the guest runs only
        after the migration, and :meth:`wait_for_shell` waits for it there.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        memory_mb = _DEFAULT_MEMORY_MB[mode] if memory_mb is None else memory_mb
        if memory_mb < 16:
            raise ValueError(f"memory_mb too small: {memory_mb}")
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise ValueError(f"cpus must be a positive integer, not {cpus!r}")
        self.mode = mode
        self.machine = machine or _DEFAULT_MACHINE[mode]
        self.accel = accel or os.environ.get("KVMSLOTS_ACCEL") or "tcg"
        self.memory_mb = memory_mb
        if numa and mode != "passthrough":
            raise ValueError(f"numa=True is for passthrough mode (a q35 guest with an IOMMU), not {mode} mode")
        self.numa = bool(numa)
        self.cpus = max(cpus, 2) if numa else cpus  # one CPU per node at least
        self.extra_args = tuple(str(arg) for arg in extra_args)
        if incoming is not None and (not isinstance(incoming, str) or not incoming or incoming.startswith("-")):
            raise ValueError(f"incoming must be a QEMU -incoming value such as unix:/path, not {incoming!r}")
        self.incoming = incoming
        self.boot_timeout = _DEFAULT_BOOT_TIMEOUT[mode] if boot_timeout is None else boot_timeout
        self.kernel: Path | None = None
        self.initramfs: Path | None = None
        self.rootfs: Path | None = None
        self.sriov_args = sriov_nvme_args(sriov_max_vfs) if mode == "passthrough" and sriov_max_vfs else []
        self.numa_args = numa_args(memory_mb, self.cpus, sriov_max_vfs) if numa else []
        self.python_packages = tuple(python_packages)
        self.guest_python: str | None = None
        if mode == "guest":  # fail before creating anything
            self.kernel, self.initramfs = find_guest_files(guest_dir)
        elif mode == "passthrough":
            self.kernel, self.initramfs, self.rootfs = find_passthrough_files(guest_dir)
            self.guest_python = _guest_python(self.rootfs.parent / PACKAGES_NAME)

        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _release, self._res)
        private = Path(tempfile.mkdtemp(prefix="kvmslots-vm-"))  # mode 0700
        self._res.private_dir = private
        if workdir is None:
            self.workdir = private
        else:
            self.workdir = Path(workdir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = private / "qmp.sock"
        self.console_path = private / "console.sock"
        self.qtest_path = private / "qtest.sock"
        self.python_tar_path = private / "python.tar"
        #: A private unix socket for a migration to (``incoming=vm.migration_uri``) or from this VM.
        self.migration_path = private / "migrate.sock"
        self._res.socket_files += [self.qmp_path, self.console_path, self.qtest_path, self.migration_path]
        if len(os.fsencode(self.console_path)) > _SUN_PATH_MAX:
            self._finalizer()
            raise TestVMError(f"socket path too long for AF_UNIX: {self.console_path} (set TMPDIR shorter)")
        self.qemu_log_path = self.workdir / "qemu.log"
        self.console_log_path = self.workdir / "console.log"
        self.qtest_log_path = self.workdir / "qtest.log"

        self.pid: int | None = None  # kept after stop() so callers can check it is gone
        self.command: list[str] = []
        self._console: socket.socket | None = None
        self._console_buf = bytearray()
        self._console_log: IO[bytes] | None = None
        self._qtest: socket.socket | None = None
        self._qtest_buf = bytearray()
        self._tokens = itertools.count(1)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<TestVM {self.mode} {self.machine}/{self.accel} pid={self.pid} {state} {self.workdir}>"

    # --- lifecycle -----------------------------------------------------------------

    def qemu_command(self) -> list[str]:
        """The QEMU command line this VM runs (built fresh; for logs and debugging)."""
        cmd = [
            qemu_binary(),
            "-name", "kvmslots-testvm",
            "-machine", self.machine,
            "-accel", self.accel,
            "-m", str(self.memory_mb),
            *(["-smp", str(self.cpus)] if self.cpus != 1 else []),
            "-no-user-config",
            "-no-reboot",
            "-display", "none",
            "-monitor", "none",
            "-qmp", f"unix:{_chardev_path(self.qmp_path)},server=on,wait=off",
        ]  # fmt: skip
        # QEMU's default devices stay: a default `pc` has the host bridge in
        # slot 0, PIIX3 ISA/IDE/ACPI in 1, VGA in 2 and an e1000 NIC in 3,
        # so the slots a test sees taken are the ones a real default VM has.
        if self.mode == "guest":
            assert self.kernel is not None and self.initramfs is not None
            cmd += [
                "-kernel", str(self.kernel),
                "-initrd", str(self.initramfs),
                "-append", "console=ttyS0 panic=-1 quiet",
                "-chardev", f"socket,id=ser,path={_chardev_path(self.console_path)},server=on,wait=off",
                "-serial", "chardev:ser",
            ]  # fmt: skip
        elif self.mode == "passthrough":
            assert self.kernel is not None and self.initramfs is not None and self.rootfs is not None
            # No default NIC or VGA: every PCI function there is one the test placed. The IOMMU
            # comes first (QEMU wants it before the devices behind it); iommu=pt gives the
            # guest's own drivers identity-mapped DMA (cheap under TCG), while a function bound
            # to vfio-pci still gets a translated domain of its own, as on a production host.
            # The disks are virtio-blk, whose DMA bypasses the IOMMU (no iommu_platform).
            cmd += [
                "-nodefaults",
                "-device", "intel-iommu,intremap=on",
                *self.sriov_args,
                "-drive", f"file={_chardev_path(self.rootfs)},if=none,id={_ROOT_SERIAL},format=raw,readonly=on",
                "-device", f"virtio-blk-pci,drive={_ROOT_SERIAL},serial={_ROOT_SERIAL},addr=0x3",
                "-drive", f"file={_chardev_path(self.python_tar_path)},if=none,id={_PYTHON_SERIAL},"
                          "format=raw,readonly=on",
                "-device", f"virtio-blk-pci,drive={_PYTHON_SERIAL},serial={_PYTHON_SERIAL},addr=0x4",
                # after every device that names no bus: QEMU puts such a device on the newest
                # PCI bus, which would be the expander's (it takes bridges only)
                *self.numa_args,
                "-kernel", str(self.kernel),
                "-initrd", str(self.initramfs),
                "-append", f"console=ttyS0 panic=-1 quiet intel_iommu=on iommu=pt kvmslots.root={_ROOT_SERIAL}",
                "-chardev", f"socket,id=ser,path={_chardev_path(self.console_path)},server=on,wait=off",
                "-serial", "chardev:ser",
            ]  # fmt: skip
        else:
            # -S: CPUs never run, so no firmware pokes the hardware behind the test's back.
            cmd += [
                "-S",
                "-qtest", f"unix:{_chardev_path(self.qtest_path)},server=on,wait=off",
                "-qtest-log", str(self.qtest_log_path),
            ]  # fmt: skip
        if self.incoming is not None:
            cmd += ["-incoming", self.incoming]
        return cmd + list(self.extra_args)

    @property
    def migration_uri(self) -> str:
        """``unix:<migration_path>``: a migration URI both QEMUs of a test can use."""
        return f"unix:{self.migration_path}"

    def start(self) -> TestVM:
        """Start QEMU and wait until the VM can be driven.

        Guest mode returns once the guest's shell answers on the console;
        qtest mode once the qtest and QMP sockets are up. Any failure stops
        the VM before the error propagates, so nothing is left running.
        """
        if not self._finalizer.alive:
            raise TestVMError("this TestVM was stopped; create a new one")
        if self._res.proc is not None:
            raise TestVMError("this TestVM is already started")
        try:
            if self.mode == "passthrough":
                write_python_tar(self.python_tar_path, self.python_packages, guest_python=self.guest_python)
            self._launch()
            deadline = time.monotonic() + self.boot_timeout
            if self.mode in _CONSOLE_MODES:
                self._console = self._connect(self.console_path, deadline)
                if self.incoming is None:  # a migration target's guest runs only once the state arrived
                    self._wait_for_shell(deadline)
            else:
                self._qtest = self._connect(self.qtest_path, deadline)
            self._wait_for_file(self.qmp_path, deadline)
            for path in self._res.socket_files:  # QEMU creates them per umask; the dir is 0700 anyway
                if path.exists():
                    path.chmod(0o600)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL), reap it and remove sockets and private files.

        Idempotent. No QMP ``quit`` is sent: the caller may hold the one QMP
        connection, and a signal works even when QEMU is wedged.
        """
        self._console = self._qtest = None
        self._finalizer()

    def __enter__(self) -> TestVM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def is_running(self) -> bool:
        """Whether the QEMU process is alive."""
        proc = self._res.proc
        return proc is not None and proc.poll() is None

    def _launch(self) -> None:
        self.command = self.qemu_command()
        log = open(self.qemu_log_path, "ab")  # noqa: SIM115 - closed by _release
        self._res.logs.append(log)
        log.write(("$ " + shlex.join(self.command) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - needed for PR_SET_PDEATHSIG
        )
        self._res.proc = proc
        self.pid = proc.pid

    def _check_alive(self) -> None:
        proc = self._res.proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise TestVMError(
                f"QEMU exited (status {code}); its output ({self.qemu_log_path}):\n{_tail(self.qemu_log_path)}"
            )

    def _wait_for_file(self, path: Path, deadline: float) -> None:
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TestVMError(f"QEMU did not create {path} in time")
            time.sleep(0.01)

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        """Connect to a socket QEMU serves, retrying until QEMU has created it."""
        while True:
            self._check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise TestVMError(f"could not connect to QEMU's socket {path}") from None
                time.sleep(0.01)
                continue
            self._res.sockets.append(sock)
            return sock

    # --- guest mode: the serial console ---------------------------------------------------

    def _require(self, *modes: str) -> None:
        if self.mode not in modes:
            raise TestVMError(f"only available in {' mode or '.join(modes)} mode (this VM is in {self.mode} mode)")
        if not self.is_running():
            raise TestVMError("the VM is not running")

    def _read_console(self, pattern: re.Pattern[bytes], deadline: float) -> re.Match[bytes] | None:
        """Read the console until ``pattern`` matches the buffer or the deadline passes.

        On a match, the buffer is consumed up to its end. Everything read is
        appended to ``console.log``.
        """
        sock = self._console
        assert sock is not None
        if self._console_log is None:
            self._console_log = open(self.console_log_path, "ab")  # noqa: SIM115 - closed by _release
            self._res.logs.append(self._console_log)
        while True:
            # Match a bytes copy: the match must survive trimming the buffer.
            match = pattern.search(bytes(self._console_buf))
            if match:
                del self._console_buf[: match.end()]
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(min(remaining, 0.2))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                self._check_alive()
                raise TestVMError("QEMU closed the serial console")
            self._console_log.write(data)
            self._console_log.flush()
            self._console_buf += data

    def wait_for_shell(self, timeout: float | None = None) -> None:
        """Wait until the guest's shell answers (after a migration into this VM, say)."""
        self._require(*_CONSOLE_MODES)
        self._wait_for_shell(time.monotonic() + (self.boot_timeout if timeout is None else timeout))

    def _wait_for_shell(self, deadline: float) -> None:
        """Probe the console with markers until the shell answers one.

        Output from before we connected is lost (the socket is wait=off), so
        readiness can only be seen by asking. Probes sent while the kernel
        boots may be truncated or answered late; each has its own number, and
        :meth:`run` ignores everything before its own begin marker.
        """
        sent: set[bytes] = set()
        answer = re.compile(rb"@@(\d+)R\r?\n")
        while True:
            self._check_alive()
            token = next(self._tokens)
            sent.add(str(token).encode())
            assert self._console is not None
            try:
                self._console.sendall(f"echo @@$(({token}+0))R\n".encode())
            except TimeoutError:  # a hung guest stops reading its console: the buffers are full
                pass  # the deadline below says GuestBootTimeout, with the console's tail
            step = min(deadline, time.monotonic() + _PROBE_INTERVAL)
            while (match := self._read_console(answer, step)) is not None:
                if match[1] in sent:
                    return
            if time.monotonic() >= deadline:
                raise GuestBootTimeout(
                    f"the guest shell did not answer within {self.boot_timeout:g}s "
                    f"(accel {self.accel}). Console ({self.console_log_path}):\n"
                    f"{_tail(self.console_log_path)}\nQEMU output:\n{_tail(self.qemu_log_path, 10)}"
                )

    def run(self, command: str, timeout: float = 10.0, *, check: bool = False) -> str:
        """Run a shell command in the guest and return its output (stdout and stderr).

        The command is wrapped as ``echo @@$((N+0))B; eval '<command>'; echo
        @@$((N+0))E$?``: the terminal echoes the line back, but only the
        shell's expansion prints ``@@NB``/``@@NE``, so the output between them
        is the command's and nothing else. With ``check=True`` a non-zero
        exit status raises :class:`TestVMError`. The command runs in the
        console's shell itself (``cd`` and variables stay); :meth:`run_script`
        runs one in a shell of its own.
        """
        output, status = self.run_status(command, timeout)
        if check and status != 0:
            raise TestVMError(f"guest command {command!r} exited {status}: {output.strip()}")
        return output

    def run_status(self, command: str, timeout: float = 10.0) -> tuple[str, int]:
        """:meth:`run`, returning ``(output, exit status)``."""
        self._require(*_CONSOLE_MODES)
        assert self._console is not None
        token = next(self._tokens)
        line = f"echo @@$(({token}+0))B; eval {shlex.quote(command)}; echo @@$(({token}+0))E$?\n"
        if len(line.encode()) > _CONSOLE_LINE_MAX:
            raise TestVMError(
                f"guest command of {len(command.encode())} bytes is too long for the guest console's line "
                f"editor (busybox ash, 1024 bytes a line); send it with run_script"
            )
        self._console.sendall(line.encode())
        pattern = re.compile(rb"@@%dB\r?\n(.*?)@@%dE(\d+)\r?\n" % (token, token), re.DOTALL)
        match = self._read_console(pattern, time.monotonic() + timeout)
        if match is None:
            raise TestVMError(
                f"guest command {command!r} did not finish within {timeout:g}s; console so far:\n"
                + self._console_buf.decode(errors="replace")[-2000:]
            )
        return match[1].decode(errors="replace").replace("\r\n", "\n"), int(match[2])

    def run_script(
        self, text: str, timeout: float = 60.0, *, interpreter: str = "sh", check: bool = False
    ) -> tuple[str, int]:
        """Run ``text`` as a script in the guest; return ``(output, exit status)``.

        The script is copied into the guest (base64, in short console lines, so
        any byte and any length survive the terminal) and run by
        ``interpreter`` (``"sh"``, ``"python3"``, ...) in a process of its own
        with stdin from ``/dev/null``: ``exit 3`` (or ``sys.exit(3)``) ends the
        script only, and the status is the script's own. Output is stdout and
        stderr as they interleave on the console. ``check=True`` raises
        :class:`TestVMError` on a non-zero status. Processes the script leaves
        in the background keep writing to the same console.
        """
        self._require(*_CONSOLE_MODES)
        token = next(self._tokens)
        path = f"{_SCRIPT_DIR}/{token}"
        encoded = base64.b64encode(text.encode()).decode()
        self.run(f"mkdir -p {_SCRIPT_DIR} && : >{path}.b64", check=True)
        for start in range(0, len(encoded), _SCRIPT_CHUNK):
            self.run(f"echo {encoded[start:start + _SCRIPT_CHUNK]} >>{path}.b64", check=True)
        self.run(f"base64 -d {path}.b64 >{path} && rm {path}.b64", check=True)
        command = f"{interpreter} {path} </dev/null"
        output, status = self.run_status(command, timeout)
        if check and status != 0:
            raise TestVMError(f"guest script ({interpreter}) exited {status}: {output.strip()[-2000:]}")
        return output, status

    def enable_nvme_vfs(self, count: int, *, serial: str = SRIOV_SERIAL, timeout: float = 60.0) -> list[str]:
        """Enable ``count`` VFs of the SR-IOV NVMe controller (:func:`sriov_nvme_args`); return their addresses.

        Passthrough mode. The VFs come up online, bound to the guest's
        ``nvme`` driver, each in an IOMMU group of its own. VFs enabled
        before are disabled first (the kernel changes ``sriov_numvfs`` only
        from 0); ``count=0`` just disables them.
        """
        self._require("passthrough")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, not {count!r}")
        script = f"set -- {count} {shlex.quote(serial)}\n" + _ENABLE_NVME_VFS
        output, status = self.run_script(script, timeout)
        if status != 0:
            raise TestVMError(f"enabling {count} NVMe VFs failed (exit status {status}): {output.strip()}")
        return [line.split()[1] for line in output.splitlines() if line.startswith("VF ")]

    def guest_pci_devices(self) -> set[str]:
        """PCI functions the guest kernel knows, e.g. ``{"0000:00:05.0", ...}``."""
        return parse_pci_addresses(self.run("ls -1 /sys/bus/pci/devices", check=True))

    def guest_pci_slots(self, bus: int = 0) -> set[int]:
        """Slots of ``bus`` where the guest sees at least one function."""
        return slots_on_bus(self.guest_pci_devices(), bus)

    def wait_guest_pci(self, predicate: Callable[[set[str]], bool], timeout: float = 10.0) -> set[str]:
        """Poll the guest's PCI devices until ``predicate`` holds; return them.

        Needed because the guest handles hotplug asynchronously: QMP returns
        before the guest kernel has rescanned the bus.
        """
        deadline = time.monotonic() + timeout
        while True:
            devices = self.guest_pci_devices()
            if predicate(devices):
                return devices
            if time.monotonic() > deadline:
                raise TestVMError(
                    f"guest PCI devices did not reach the expected state in {timeout:g}s: {sorted(devices)}"
                )
            time.sleep(0.1)

    # --- qtest mode -----------------------------------------------------------------------

    def qtest(self, line: str, timeout: float = 5.0) -> str:
        """Send one qtest command and return its reply line (e.g. ``"OK"``).

        Asynchronous ``IRQ ...`` lines are skipped. A ``FAIL``/``ERR`` reply
        raises :class:`TestVMError`, since a test helper should fail loudly.
        """
        self._require("qtest")
        sock = self._qtest
        assert sock is not None
        if "\n" in line:
            raise ValueError("one qtest command per call")
        sock.sendall(line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._qtest_buf:
                raw, _, rest = self._qtest_buf.partition(b"\n")
                self._qtest_buf[:] = rest
                reply = raw.decode(errors="replace").strip()
                if reply.startswith("IRQ"):
                    continue
                if reply.startswith(("FAIL", "ERR")):
                    raise TestVMError(f"qtest {line!r}: {reply}")
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TestVMError(f"qtest {line!r}: no reply within {timeout:g}s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                self._check_alive()
                raise TestVMError("QEMU closed the qtest socket")
            self._qtest_buf += data

    def acpi_eject(self, slot: int) -> None:
        """Play the guest's ACPI eject of ``slot`` on bus 0 of the ``pc`` machine.

        Writes ``1 << slot`` to the PIIX4 hotplug eject register, as QEMU's
        own ``qpci_unplug_acpi_device_test`` does; QEMU then finishes a pending
        ``device_del`` and emits ``DEVICE_DELETED``.
        """
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= 31:
            raise InvalidSlot(f"slot must be an integer in 0..31, not {slot!r}")
        if not (self.machine == "pc" or self.machine.startswith("pc-i440fx")):
            raise TestVMError(f"acpi_eject knows the i440FX 'pc' machine only, not {self.machine!r}")
        self.qtest(f"outl {PC_ACPI_EJECT_PORT:#x} {1 << slot:#x}")

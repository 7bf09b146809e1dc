"""Ganeti runtime files against a real QEMU: the slots and ids kvmslots records are the ones QEMU shows.

For each runtime file in tests/data/ganeti/ (Ganeti's own test data and files built from the
shapes its source writes; both layouts), QEMU is started with the command line the file holds
(``kvmslots.ganeti.command_line``: the runtime's own options plus the NIC and disk options Ganeti
appends at start), made harmless here: the ``-device`` options (driver, id, bus, addr, MAC) stay
exactly as Ganeti builds them, only what Ganeti opens on a node is replaced (NIC backends by
``-netdev user``, disks by small raw images, sockets and the pid file by nothing), ``-daemonize``
goes, ``-balloon`` (gone from QEMU 7.2) becomes ``-device virtio-balloon`` as Ganeti 2.16's own
upgrade does it, and QEMU runs TCG with -S (no guest code).  Then ``query-pci`` must show every
recorded device at its slot under its id, every device QEMU placed itself must sit on a slot the
mask keeps, ``reconcile`` must confirm every record, and a hot add must land on a slot Ganeti
would not hand out.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmslots import DeviceSpec, DeviceState, Monitor, Store, hot_add, reconcile
from kvmslots.capabilities import binary_machines
from kvmslots.ganeti import GanetiRuntime, command_line, parse_runtime, record_ganeti_vm
from kvmslots.testvm import qemu_binary

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "ganeti"
FILES = [
    "upstream-2.15.2-kvm_runtime.json",
    "upstream-3.1.1-kvm_runtime.json",
    "upgraded-2.16-runtime.json",
    "node-2.15-runtime.json",
    "node-3.1-runtime.json",
    "node-3.1-scsi-runtime.json",
]
RNG_UUID = "2f6b1c4a-8e3d-4b7a-9c5e-1d2f3a4b5c6d"
#: Options whose value names a host file or socket on a Ganeti node: not wanted here.
_DROP_WITH_VALUE = {"-pidfile", "-monitor", "-serial", "-vnc", "-D"}


def load(name: str, vm: str) -> GanetiRuntime:
    """The runtime file as VM *vm*.  Ganeti's upstream test data names machine ``pc-1.1``, which
    QEMU 7.2 no longer has: those files are read as ``pc`` (same i440FX slot layout)."""
    text = (DATA / name).read_text()
    machines = binary_machines(qemu_binary())
    text = re.sub(r'("-machine",\s*")([^",]+)', lambda m: m[0] if m[2] in machines else f"{m[1]}pc", text)
    return parse_runtime(text, vm, source=str(DATA / name))


def local_argv(argv: list[str], sockets: Path, qmp: Path) -> list[str]:
    """Ganeti's command line, runnable here (see the module docstring); -device options untouched."""
    out = [qemu_binary()]
    args = iter(argv[1:])
    for arg in args:
        if arg == "-daemonize":
            continue
        if arg in _DROP_WITH_VALUE:
            next(args)
            continue
        if arg == "-balloon":
            model, *rest = next(args).split(",")
            out += ["-device", ",".join([f"{model}-balloon", *rest])]
            continue
        if arg == "-machine":
            parts = [p for p in next(args).split(",") if p != "accel=kvm"]
            out += ["-machine", ",".join(parts)]
            continue
        if arg == "-chardev":
            value = re.sub(r"path=[^,]*", f"path={sockets / 'chardev.sock'}", next(args))
            out += ["-chardev", value]
            continue
        out.append(arg)
    return out + [
        "-accel", "tcg", "-S", "-display", "none", "-serial", "none", "-monitor", "none",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip


@contextlib.contextmanager
def ganeti_qemu(rt: GanetiRuntime, tmp_path: Path) -> Iterator[Path]:
    """QEMU running the instance's command line; yields its QMP socket; always stopped."""
    images = {}
    for index, (disk, _link, _uri) in enumerate(rt.disks):
        image = tmp_path / f"disk{index}.img"
        image.write_bytes(b"")
        with image.open("r+b") as handle:
            handle.truncate(1 << 20)
        images[disk["uuid"]] = str(image)
    sockets = Path(tempfile.mkdtemp(prefix="kvmslots-ganeti-"))  # short: AF_UNIX paths are 107 bytes at most
    qmp = sockets / "qmp.sock"
    argv = local_argv(command_line(rt, disk_files=images), sockets, qmp)
    log_path = tmp_path / "qemu.log"
    with log_path.open("wb") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not qmp.exists():
                if proc.poll() is not None:
                    pytest.fail(f"QEMU exited ({proc.returncode}):\n{log_path.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"QEMU made no QMP socket in 30s:\n{log_path.read_text()}")
                time.sleep(0.02)
            yield qmp
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            shutil.rmtree(sockets, ignore_errors=True)


async def _check(rt: GanetiRuntime, qmp: Path, store: Store) -> None:
    vm = rt.vm.name
    ours = {d.qemu_id for d in rt.devices}
    async with Monitor(qmp) as mon:
        view = await mon.pci()
        # every recorded device: at its slot of pci.0 (bus 0), function 0, under the id Ganeti gave it
        for dev in rt.devices:
            found = view.find(dev.qemu_id)
            assert found is not None, f"QEMU has no {dev.qemu_id}: {[f.qdev_id for f in view.functions]}"
            assert (found.bus, found.slot, found.function) == (0, dev.slot, 0), dev.qemu_id
        # what the command line placed explicitly is where the runtime says
        for slot in rt.foreign:
            assert view.at(0, slot), f"nothing at slot {slot} ({rt.foreign[slot]})"
        # everything else on the bus (QEMU's built-ins, balloon, guest agent, SCSI controller, USB)
        # sits on a slot the mask keeps: kvmslots will never hand those out
        for function in view.functions:
            if function.bus == 0 and function.qdev_id not in ours:
                assert rt.vm.mask[function.slot] == "1", (function.slot, function.qdev_id, rt.vm.mask)
        # devices Ganeti did not put on a PCI slot of their own still exist (e.g. the SCSI disk)
        for skip in rt.skipped:
            hvinfo = (rt.disks[skip.index][0] if skip.kind == "disk" else rt.nics[skip.index]).get("hvinfo") or {}
            if "id" in hvinfo:
                assert view.has(hvinfo["id"])

        record_ganeti_vm(store, rt)
        assert {d.state for d in store.devices(vm)} <= {DeviceState.PLANNED}
        report = await reconcile(store, mon, vm)
        assert sorted(report.attached) == sorted(ours)
        assert not (report.misplaced or report.lost or report.released or report.not_running)
        assert {d.qemu_id: d.state for d in store.devices(vm)} == {i: DeviceState.ATTACHED for i in ours}

        # a hot add takes the first slot Ganeti would not hand out either
        taken = set(rt.builtin) | set(rt.reserved) | set(rt.foreign) | set(rt.booked) | {d.slot for d in rt.devices}
        added = await hot_add(store, mon, vm, DeviceSpec(RNG_UUID, "rng", "virtio-rng-pci"))
        assert added.slot == min(set(range(32)) - taken)
        found = (await mon.pci()).find(added.qemu_id)
        assert found is not None and found.slot == added.slot


@pytest.mark.parametrize("name", FILES, ids=lambda n: n.removesuffix(".json"))
def test_ganeti_runtime_in_real_qemu(tmp_path, name):
    rt = load(name, "ganeti-vm")
    assert rt.devices
    with ganeti_qemu(rt, tmp_path) as qmp, Store(tmp_path / "state") as store:
        asyncio.run(_check(rt, qmp, store))


# --- a booted guest: the instance moves under kvmslots, then hot-plug and unplug confirmed by it ----


GUEST_WAIT = 30.0


def device_options(argv: list[str]) -> list[str]:
    """The instance's devices and their backends (-device, -netdev, -drive, -chardev), as the runtime gives them."""
    out: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-device", "-netdev", "-drive", "-chardev"):
            out += [arg, next(args)]
    return out


@pytest.mark.parametrize("name", ["node-2.15-runtime.json", "node-3.1-runtime.json"], ids=["2.15", "3.1"])
def test_ganeti_instance_in_a_booted_guest_is_taken_over_then_hotplugged(tmp_path, name):
    from kvmslots import hot_del
    from kvmslots.testvm import TestVM

    rt = load(name, "ganeti-vm")
    images = {}
    for index, (disk, _link, _uri) in enumerate(rt.disks):
        image = tmp_path / f"disk{index}.img"
        with image.open("wb") as handle:
            handle.truncate(1 << 20)
        images[disk["uuid"]] = str(image)
    sockets = Path(tempfile.mkdtemp(prefix="kvmslots-ganeti-"))
    argv = local_argv(command_line(rt, disk_files=images), sockets, sockets / "unused.sock")
    try:
        with TestVM(tmp_path / "vm", machine=rt.vm.machine, extra_args=device_options(argv)) as vm, \
                Store(tmp_path / "state") as store:
            seen = vm.guest_pci_devices()
            for dev in rt.devices:  # the guest sees Ganeti's devices where the runtime put them
                assert f"0000:00:{dev.slot:02x}.0" in seen, (dev.qemu_id, sorted(seen))

            async def take_over_and_hotplug():
                async with Monitor(vm.qmp_path) as mon:
                    record_ganeti_vm(store, rt)
                    report = await reconcile(store, mon, rt.vm.name)
                    assert sorted(report.attached) == sorted(d.qemu_id for d in rt.devices)
                    added = await hot_add(store, mon, rt.vm.name, DeviceSpec(RNG_UUID, "rng", "virtio-rng-pci"))
                    vm.wait_guest_pci(lambda s: f"0000:00:{added.slot:02x}.0" in s, GUEST_WAIT)
                    nic = next(d for d in rt.devices if d.dev_type == "nic")
                    removed = await hot_del(store, mon, rt.vm.name, nic.uuid, timeout=GUEST_WAIT)
                    assert removed.removed  # found by the id Ganeti gave it; the guest ejected it
                    vm.wait_guest_pci(lambda s: f"0000:00:{nic.slot:02x}.0" not in s, GUEST_WAIT)
                    assert (await hot_del(store, mon, rt.vm.name, RNG_UUID, timeout=GUEST_WAIT)).removed
                    return nic

            nic = asyncio.run(take_over_and_hotplug())
            left = {d.qemu_id for d in store.devices(rt.vm.name)}
            assert left == {d.qemu_id for d in rt.devices} - {nic.qemu_id}
    finally:
        shutil.rmtree(sockets, ignore_errors=True)

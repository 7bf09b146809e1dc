"""A demo on a disposable VM: ``python3 -m kvmslots.demo``.

It boots the tiny test guest with a boot plan, hot-adds devices next to one
placed behind kvmslots' back, hot-removes some, and prints what QEMU and the
guest see at each step, so a newcomer can watch the whole life cycle in a few
seconds.  Nothing is left behind: the VM and the state directory are temporary.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import DeviceSpec, Monitor, Store, VMSpec, hot_add, hot_del, plan_boot, reconcile
from .errors import KvmSlotsError
from .testvm import TestVM


def _say(text: str) -> None:
    print(text, flush=True)


def _guest_slots(vm: TestVM) -> str:
    return " ".join(str(s) for s in sorted(vm.guest_pci_slots()))


async def _live(vm: TestVM, store: Store) -> None:
    async with Monitor(vm.qmp_path) as mon:
        report = await reconcile(store, mon, "demo")
        _say(f"reconcile after boot: attached {report.attached}")

        foreign = "stranger"
        await mon.execute("device_add", {"driver": "pci-testdev", "id": foreign, "addr": "0x7"})
        _say(f"raw QMP added {foreign!r} at slot 7 behind kvmslots' back")

        added = []
        for n, (kind, driver) in enumerate([("rng", "virtio-rng-pci"), ("test", "pci-testdev"), ("nic", "e1000")]):
            start = time.perf_counter()
            device = await hot_add(store, mon, "demo", DeviceSpec(str(uuid.uuid4()), kind, driver))
            ms = (time.perf_counter() - start) * 1000
            _say(f"hot_add {driver:15} -> {device.qemu_id} at slot {device.slot} ({ms:.1f} ms, verified in query-pci)")
            added.append(device)
        vm.wait_guest_pci(lambda seen: all(f"0000:00:{d.slot:02x}.0" in seen for d in added))
        _say(f"guest sees slots: {_guest_slots(vm)}")

        for device in added[:2]:
            start = time.perf_counter()
            result = await hot_del(store, mon, "demo", device.uuid, timeout=10)
            ms = (time.perf_counter() - start) * 1000
            _say(f"hot_del {device.qemu_id}: {result.status} ({ms:.1f} ms, DEVICE_DELETED)")
        vm.wait_guest_pci(lambda seen: all(f"0000:00:{d.slot:02x}.0" not in seen for d in added[:2]))
        _say(f"guest sees slots: {_guest_slots(vm)}")

        again = await hot_add(store, mon, "demo", DeviceSpec(str(uuid.uuid4()), "rng", "virtio-rng-pci"))
        _say(f"hot_add reuses the first freed slot: {again.qemu_id}")
        report = await reconcile(store, mon, "demo")
        _say(f"reconcile: unknown live devices {[u['qdev_id'] for u in report.unknown]}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kvmslots-demo-") as tmp:
        with Store(Path(tmp) / "state") as store:
            devices = [
                DeviceSpec(str(uuid.uuid4()), "nic", "virtio-net-pci", {"mac": "52:54:00:12:34:56"}),
                DeviceSpec(str(uuid.uuid4()), "rng", "virtio-rng-pci"),
            ]
            plan = asyncio.run(plan_boot(store, VMSpec("demo"), devices))
            _say("boot plan: qemu-system-x86_64 ... " + " ".join(plan.qemu_args))
            try:
                start = time.perf_counter()
                with TestVM(Path(tmp) / "vm", extra_args=plan.qemu_args) as vm:
                    _say(f"guest booted in {time.perf_counter() - start:.1f} s (TCG); it sees slots: {_guest_slots(vm)}")
                    asyncio.run(_live(vm, store))
                    _say("exported state (migration document):")
                    _say(json.dumps(store.export_vm("demo"), indent=2))
            except KvmSlotsError as exc:
                _say(f"demo failed: {type(exc).__name__}: {exc}")
                return 1
    _say("demo done: the VM is stopped and its state removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

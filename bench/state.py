"""State at scale: 1000 VMs x 8 devices, against the same operations on a single VM."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from kvmslots import DeviceSpec, Monitor, Store, VMSpec, plan_boot, reconcile
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.fakehost import sriov_topology
from kvmslots.pci.tracker import PciDevTracker
from kvmslots.testvm import TestVM

from .common import emit, note, timed

VMS = 1000
DEVICES_PER_VM = 8
DRIVERS = ("virtio-net-pci", "virtio-rng-pci", "pci-testdev", "e1000")


def _specs() -> list[DeviceSpec]:
    return [DeviceSpec(str(uuid.uuid4()), "dev", DRIVERS[i % len(DRIVERS)]) for i in range(DEVICES_PER_VM)]


def _plan(store: Store, name: str) -> float:
    return timed(lambda: asyncio.run(plan_boot(store, VMSpec(name), _specs())))


def run() -> None:
    whitelist = Whitelist.from_config([{"vendor_id": "8086"}])
    with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp:
        tmp_path = Path(tmp)
        note(f"state: planning {VMS} VMs x {DEVICES_PER_VM} devices ...")
        with Store(tmp_path / "one") as one:
            single = [_plan(one, f"solo{n}") for n in range(10)]
        with Store(tmp_path / "big") as big:
            at_scale = [_plan(big, f"vm{n:04d}") for n in range(VMS)]
            emit(f"state.plan_boot: per VM while planning {VMS} VMs x {DEVICES_PER_VM} devices", at_scale, single)
            emit(f"state.plan_boot: all {VMS} VMs", [sum(at_scale)], None, unit="s")
            tracker = PciDevTracker(big, whitelist)
            tracker.update_devices_from_hypervisor_resources(sriov_topology(pfs=64, vfs_per_pf=64, plain=0))

        note("state: reconcile one VM among 1000 (qtest VM) ...")
        with TestVM(tmp_path / "vm", mode="qtest") as vm:

            async def reconcile_rounds(store: Store, name: str, rounds: int) -> list[float]:
                samples = []
                async with Monitor(vm.qmp_path) as mon:
                    for _ in range(rounds):
                        start = time.perf_counter()
                        await reconcile(store, mon, name)
                        samples.append(time.perf_counter() - start)
                return samples

            with Store(tmp_path / "lonely") as lonely:
                asyncio.run(plan_boot(lonely, VMSpec("vm0500"), _specs()))
                alone = asyncio.run(reconcile_rounds(lonely, "vm0500", 30))
            with Store(tmp_path / "big") as big:
                crowded = asyncio.run(reconcile_rounds(big, "vm0500", 30))
            emit(f"state.reconcile: one VM among {VMS} vs the only VM", crowded, alone)

        note("state: restart with 1000 VMs and 4096 host devices ...")

        def reopen(path: Path) -> None:
            with Store(path) as store:
                PciDevTracker(store, whitelist)
                store.vms()

        (tmp_path / "empty").mkdir()
        empty = [timed(lambda: reopen(tmp_path / "empty")) for _ in range(10)]
        full = [timed(lambda: reopen(tmp_path / "big")) for _ in range(10)]
        emit(f"state.restart: reopen with {VMS} VMs + 4096 host devices vs an empty state", full, empty)

"""Adopting VMs kvmslots did not start, on real QEMU: then hot-plug and unplug through kvmslots.

Each VM here is started by hand, as another manager would (plain ``-device``
options with ids of its own choosing), with a booted guest that acknowledges
the hot-plug and the eject.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from kvmslots import DeviceSpec, DeviceState, Monitor, Store, hot_add, hot_del, reconcile
from kvmslots.cli import main
from kvmslots.hotplug.adopt import adopt
from kvmslots.testvm import TestVM

GUEST_WAIT = 30.0
UNPLUG_WAIT = 30.0


def uid(n: int) -> str:
    return str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000))


def u8(n: int) -> str:
    return uid(n)[:8]


def addr(bus: int, slot: int, function: int = 0) -> str:
    return f"0000:{bus:02x}:{slot:02x}.{function}"


def run(coro):
    return asyncio.run(coro)


PC_ARGS = [
    "-device", f"virtio-rng-pci,id=rng-{u8(1)}-pci-5,bus=pci.0,addr=0x5",
    "-device", f"pci-testdev,id=dev-{u8(2)}-pci-6,bus=pci.0,addr=0x6",
    "-device", f"pci-testdev,id=dev-{u8(3)}-pci-9,bus=pci.0,addr=0x7",  # moved since its id was made
    "-device", "virtio-rng-pci,id=stranger,bus=pci.0,addr=0x8",          # someone else's
    "-device", "pci-testdev,bus=pci.0,addr=0x9",                         # no id at all
    "-device", "pci-testdev,id=dev-deadbeef-pci-10,bus=pci.0,addr=0xa",  # our pattern, not our UUID
    "-device", "pci-bridge,id=br0,chassis_nr=3,bus=pci.0,addr=0x1e",
    "-device", f"pci-testdev,id=dev-{u8(4)}-pci-3,bus=br0,addr=0x3",
]


def test_adopt_a_pc_vm_started_by_hand_then_hotplug_through_kvmslots(tmp_path: Path) -> None:
    uuids = [uid(1), {"uuid": uid(2), "type": "dev"}, uid(3), uid(4)]
    (tmp_path / "uuids.json").write_text(json.dumps(uuids))
    with TestVM(tmp_path / "vm", extra_args=PC_ARGS) as vm, Store(tmp_path / "state") as store:
        # the CLI first: an unknown VM says what to run
        assert main(["--state", str(tmp_path / "state"), "show", "web1"]) == 1
        assert main(["--state", str(tmp_path / "state"), "--json", "adopt", "web1", "--qmp", str(vm.qmp_path),
                     "--uuids", str(tmp_path / "uuids.json")]) == 0
        devices = {d.qemu_id: d for d in store.devices("web1")}
        assert sorted(devices) == sorted([f"rng-{u8(1)}-pci-5", f"dev-{u8(2)}-pci-6", f"dev-{u8(3)}-pci-9",
                                          f"dev-{u8(4)}-pci-3"])
        assert devices[f"dev-{u8(3)}-pci-9"].slot == 7  # kept under the id QEMU knows
        assert devices[f"dev-{u8(4)}-pci-3"].bus == "br0"
        assert {d.state for d in devices.values()} == {DeviceState.ATTACHED}
        assert [c.id for c in store.controllers("web1")] == ["br0"]
        spec = store.get_vm("web1")
        for slot in (8, 9, 10):  # someone else's devices: their slots are never handed out
            assert spec.mask[slot] == "1"

        async def second_look_and_hotplug():
            async with Monitor(vm.qmp_path) as mon:
                again = await adopt(store, mon, "web1", {uid(n): None for n in (1, 2, 3, 4)})
                assert not again.created and again.differences == []
                checked = await reconcile(store, mon, "web1")
                assert not checked.changed and checked.misplaced == [] and checked.unknown == []

                added = await hot_add(store, mon, "web1", DeviceSpec(uid(10), "dev", "pci-testdev"))
                assert added.bus == "pci.0" and added.slot not in (5, 6, 7, 8, 9, 10, 0x1E)
                vm.wait_guest_pci(lambda seen: addr(0, added.slot) in seen, GUEST_WAIT)
                behind = await hot_add(store, mon, "web1", DeviceSpec(uid(11), "dev", "pci-testdev", bus="br0"))
                assert behind.bus == "br0" and behind.slot != 3  # the adopted bridge is ours to use
                removed = await hot_del(store, mon, "web1", uid(1), timeout=UNPLUG_WAIT)  # an adopted device
                assert removed.removed
                vm.wait_guest_pci(lambda seen: addr(0, 5) not in seen, GUEST_WAIT)
                moved = await hot_del(store, mon, "web1", uid(3), timeout=UNPLUG_WAIT)  # found by its given id
                assert moved.removed
                return added, behind

        added, behind = run(second_look_and_hotplug())
        left = {d.uuid for d in store.devices("web1")}
        assert left == {uid(2), uid(4), added.uuid, behind.uuid}


Q35_ARGS = [
    "-nic", "none",
    "-device", "pcie-root-port,id=rp1,chassis=1,port=1,bus=pcie.0,addr=0x2.0,multifunction=on",
    "-device", "pcie-root-port,id=rp2,chassis=2,port=2,bus=pcie.0,addr=0x2.1",
    "-device", "pcie-root-port,id=rp3,chassis=3,port=3,bus=pcie.0,addr=0x2.2",
    "-device", f"virtio-rng-pci,id=rng-{u8(1)}-pci-0,bus=rp1,addr=0x0",
    "-device", "virtio-rng-pci,id=theirs,bus=rp3,addr=0x0",
]


def test_adopt_a_q35_vm_started_by_hand_and_use_its_spare_port(tmp_path: Path) -> None:
    with TestVM(tmp_path / "vm", machine="q35", extra_args=Q35_ARGS) as vm, Store(tmp_path / "state") as store:

        async def scenario():
            async with Monitor(vm.qmp_path) as mon:
                report = await adopt(store, mon, "db1", [uid(1)])
                assert report.created and report.machine.startswith("pc-q35")
                assert report.controllers == ["rp1", "rp2", "rp3"]
                assert report.devices == [f"rng-{u8(1)}-pci-0"]
                assert any("theirs" in f for f in report.foreign)
                added = await hot_add(store, mon, "db1", DeviceSpec(uid(10), "rng", "virtio-rng-pci"))
                assert (added.bus, added.slot) == ("rp2", 0)  # the one free port; rp3 holds someone else's
                view = await mon.query_pci()
                vm.wait_guest_pci(lambda seen: addr(view.bus_number("rp2"), 0) in seen, GUEST_WAIT)
                removed = await hot_del(store, mon, "db1", uid(1), timeout=UNPLUG_WAIT)
                assert removed.removed

        run(scenario())
        assert [d.uuid for d in store.devices("db1")] == [uid(10)]

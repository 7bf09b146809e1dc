"""Failures around placement that a real QEMU will not produce on demand (fault injection only):
a group add cut off before its function 0, a view that fails after QEMU took a device, records
from an older kvmslots, an imported chassis numbering with gaps, a refused unplug of a planned device."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid as uuidlib

import pytest
from fakes import FakeQemu, Q35Fake

from kvmslots import DeviceGroup, DeviceSpec, Store, VMSpec
from kvmslots.errors import (
    DeviceAddFailed,
    HotplugError,
    InvalidName,
    MonitorConnectionLost,
    StateConflict,
    UnknownVM,
)
from kvmslots.hotplug import hot_add, hot_add_group, hot_del, plan_boot, reconcile
from kvmslots.model import Controller, DeviceState


def uid(n: int) -> str:
    return str(uuidlib.UUID(int=(n << 96) | n))


def nic(n: int) -> DeviceSpec:
    return DeviceSpec(uid(n), "nic", "virtio-net-pci")


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state") as s:
        yield s


def q35(store: Store, ports: int = 2) -> Q35Fake:
    plan = asyncio.run(plan_boot(store, VMSpec("vm1", "q35", hotplug_ports=ports), []))
    return Q35Fake({c.id: (c.slot, c.function, c.chassis) for c in plan.controllers})


class CutOff(Q35Fake):
    """The connection drops at the n-th device_add, before QEMU reads it."""

    def __init__(self, ports, lose_on: int) -> None:
        super().__init__(ports)
        self.lose_on, self.adds, self.up = lose_on, 0, True

    async def pci(self, *, placement_only: bool = False):
        if not self.up:
            raise MonitorConnectionLost("fake: down")
        return await super().pci(placement_only=placement_only)

    async def device_add(self, arguments):
        self.adds += 1
        if self.adds == self.lose_on:
            self.up = False
            raise MonitorConnectionLost("fake: dropped before QEMU read the command")
        await super().device_add(arguments)


def test_a_group_cut_off_before_function_0_is_undone_by_reconcile_not_attached(store):
    ports = q35(store).ports
    qemu = CutOff(ports, lose_on=2)  # function 1 goes in, function 0 never arrives
    with pytest.raises(DeviceAddFailed, match="as far as QEMU allowed"):
        asyncio.run(hot_add_group(store, qemu, "vm1", DeviceGroup((nic(1), nic(2)))))
    assert list(qemu.devices) == [f"nic-{uid(2)[:8]}-pci-0"]  # QEMU holds function 1, the guest sees nothing
    assert {d.state for d in store.devices("vm1")} == {DeviceState.ATTACHING}
    qemu.up = True
    report = asyncio.run(reconcile(store, qemu, "vm1"))
    assert report.attached == [] and sorted(report.released) == sorted(f"nic-{uid(n)[:8]}-pci-0" for n in (1, 2))
    assert qemu.devices == {} and store.devices("vm1") == []
    group = asyncio.run(hot_add_group(store, qemu, "vm1", DeviceGroup((nic(1), nic(2)))))  # the same group again
    assert [d.function for d in group] == [0, 1]


def test_a_view_that_fails_after_qemu_took_the_device_does_not_release_its_slot(store):
    qemu = q35(store)
    qemu.fail_view_after_add = True
    with pytest.raises(DeviceAddFailed):
        asyncio.run(hot_add(store, qemu, "vm1", nic(1)))
    # QEMU has it: never "refused", never forgotten while QEMU holds it; it was taken out again
    assert qemu.devices == {} and store.devices("vm1") == []


def test_a_refusal_judged_on_the_kept_view_gets_one_fresh_look(store):
    qemu = q35(store, ports=1)
    qemu.numbered = False  # before the firmware ran: the port is refused, and that view is kept
    with pytest.raises(HotplugError, match="firmware"):
        asyncio.run(hot_add(store, qemu, "vm1", nic(1)))
    qemu.numbered = True  # the guest booted meanwhile: the same connection now succeeds
    assert asyncio.run(hot_add(store, qemu, "vm1", nic(1))).bus == "pcie-port-1"


def test_a_refused_unplug_of_a_planned_device_leaves_it_planned(store):
    asyncio.run(plan_boot(store, VMSpec("vm1"), [nic(1)]))
    qemu = FakeQemu(devices={f"nic-{uid(1)[:8]}-pci-4": 4}, refuse_del="Bus 'pci.0' does not support hotplugging")
    with pytest.raises(HotplugError) as info:
        asyncio.run(hot_del(store, qemu, "vm1", uid(1)))
    assert "hotplugging" in info.value.qemu_message
    assert store.get_device("vm1", uid(1)).state is DeviceState.PLANNED


def test_an_imported_chassis_numbering_with_gaps_still_plans_and_grows(store, tmp_path):
    first = Controller.bridge(1, "pci.0", 31)
    nested = Controller("pci-bridge-3", "pci-bridge", "pci-bridge-1", 31, 0, 3)
    document = {
        "format": "kvmslots.vm-state", "version": 2,
        "vm": {"name": "vm1", "machine": "pc", "mask": "1" * 31 + "0", "bus_masks": {"pci-bridge-1": "1" * 31 + "0"},
               "hotplug_ports": 4, "spare_bridge": False},
        "controllers": [nested.to_json(), first.to_json()], "devices": [],
    }
    store.import_vm(document)
    plan = asyncio.run(plan_boot(store, "vm1", [DeviceSpec(uid(n), "dev", "pci-testdev") for n in range(1, 34)]))
    assert [c.chassis for c in plan.controllers][:2] == [1, 3] and plan.controllers[2].chassis == 4
    again = asyncio.run(plan_boot(store, "vm1", [DeviceSpec(uid(n), "dev", "pci-testdev") for n in range(1, 34)]))
    assert again.qemu_args == plan.qemu_args
    with Store(tmp_path / "other") as other:
        other.import_vm(store.export_vm("vm1"))  # its own export imports again


def test_a_controller_of_an_unknown_kind_is_a_typed_error():
    with pytest.raises(InvalidName, match="kind"):
        Controller("pcie-port-1", "bogus", "pcie.0", 2, 0, 1)  # type: ignore[arg-type]


def test_a_vm_an_older_kvmslots_stored_with_another_machine_can_still_be_deleted(tmp_path):
    state = tmp_path / "s"
    with Store(state) as s:
        s.define_vm(VMSpec("vm1"))
    conn = sqlite3.connect(state / "kvmslots.sqlite3")
    conn.execute("UPDATE vms SET machine = 'ubuntu'")  # 0.2.0 took any machine name
    conn.commit()
    conn.close()
    with Store(state) as s:
        assert s.has_vm("vm1") and s.vms() == ["vm1"]
        with pytest.raises(StateConflict, match="ubuntu") as info:
            s.get_vm("vm1")
        assert "delete" in str(info.value)
        s.delete_vm("vm1")
        assert s.vms() == []
        with pytest.raises(UnknownVM):
            s.delete_vm("vm1")

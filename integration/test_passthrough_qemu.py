"""Passthrough on real QEMU, with this machine's own PCI devices (discovered through sysfs).

No test here binds a device to vfio-pci: the host's real devices (its disk, its NIC) must stay
with their drivers.  So QEMU cannot open the host device, which is exactly the failure to prove:
device_add fails, and the host device and the guest slot are both free again.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kvmslots import DeviceAddFailed, Monitor, Store, VMSpec, hot_add, plan_boot
from kvmslots.passthrough import HostDevices, PassthroughSpec
from kvmslots.pci.device import PciStatus
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.discovery import discover_sysfs
from kvmslots.pci.request import get_pci_requests_from_flavor, parse_aliases
from kvmslots.pci.tracker import PciDevTracker


@pytest.fixture
def host_side(tmp_path):
    devices = discover_sysfs("/sys")
    assert devices, "this machine shows no PCI devices in /sys/bus/pci/devices"
    target = devices[-1]
    store = Store(tmp_path / "state")
    store.define_vm(VMSpec("vm1"))
    # the operator's own formats, as written in nova.conf and a flavor
    tracker = PciDevTracker(store, Whitelist.from_config([f'{{"address": "{target["address"]}"}}']))
    tracker.update_devices_from_hypervisor_resources(devices)
    aliases = parse_aliases([{"name": "hostdev", "vendor_id": target["vendor_id"],
                              "product_id": target["product_id"], "device_type": target["dev_type"]}])
    [req] = get_pci_requests_from_flavor({"extra_specs": {"pci_passthrough:alias": "hostdev:1"}}, aliases)
    yield store, tracker, target["address"], req
    store.close()


def test_a_host_device_qemu_cannot_open_fails_in_device_add_and_leaves_everything_free(qtest_vm, host_side):
    store, tracker, address, req = host_side
    spec = PassthroughSpec(str(uuid.uuid4()), req)

    async def scenario():
        async with Monitor(qtest_vm.qmp_path) as mon:
            with pytest.raises(DeviceAddFailed) as info:
                await hot_add(store, mon, "vm1", spec, host=HostDevices(tracker))
            view = await mon.query_pci()
            return info.value, view

    error, view = asyncio.run(scenario())
    assert error.qemu_message and "vfio" in error.qemu_message.lower()
    assert address in str(error)
    assert tracker.get_device(address).status is PciStatus.AVAILABLE
    assert tracker.get_device(address).instance_uuid is None
    assert store.devices("vm1") == []  # the slot is free
    assert not [f for f in view.functions if f.qdev_id.startswith("hostdev-")]


def test_a_cold_plugged_host_device_is_planned_with_its_claimed_address_and_slot(host_side):
    store, tracker, address, req = host_side
    spec = PassthroughSpec(str(uuid.uuid4()), req)
    plan = asyncio.run(plan_boot(store, "vm1", [spec], host=HostDevices(tracker)))
    [device] = plan.devices
    assert plan.qemu_args == [
        "-device", f"vfio-pci,id=hostdev-{spec.uuid[:8]}-pci-4,bus=pci.0,addr=0x4,host={address}"]
    held = tracker.get_device(address)
    assert (held.status, held.instance_uuid, held.request_id) == (PciStatus.CLAIMED, "vm1", spec.uuid)

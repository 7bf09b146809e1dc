"""Passthrough in the slot manager: host device and guest slot move together, or not at all."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from fakes import FakeQemu
from pcihost import host, plain_addr, request

from kvmslots import DeviceAddFailed, DeviceSpec, Store, VMSpec, hot_add, hot_del, plan_boot, reconcile
from kvmslots.errors import DeviceExists, HostBindError, InvalidPciRequest, PciDeviceRequestFailed, SlotOccupied
from kvmslots.passthrough import HostDevices, PassthroughSpec
from kvmslots.pci.device import PciStatus
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.tracker import PciDevTracker


def run(coro):
    return asyncio.run(coro)


def dev_uuid(n: int) -> str:
    return str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000))


class RecordingBinder:
    """Records binder calls (the real binders need a host kernel; see integration tests)."""

    def __init__(self, fail_detach: bool = False):
        self.calls: list[str] = []
        self.fail_detach = fail_detach

    def detach(self, address: str) -> None:
        self.calls.append(f"detach {address}")
        if self.fail_detach:
            raise HostBindError(f"fake: cannot bind {address} to vfio-pci")

    def reattach(self, address: str) -> None:
        self.calls.append(f"reattach {address}")

    def driver(self, address: str) -> str | None:
        return None


@pytest.fixture
def env(tmp_path):
    store = Store(tmp_path / "state")
    store.define_vm(VMSpec("vm1"))
    tracker = PciDevTracker(store, Whitelist.from_config([{"vendor_id": "8086"}]))
    tracker.update_devices_from_hypervisor_resources(host(pfs=1, vfs=2, plain=2))
    binder = RecordingBinder()
    return store, tracker, HostDevices(tracker, binder), binder


def gpu(n=1, **kw):
    return PassthroughSpec(dev_uuid(n), request("type-PCI"), **kw)


def test_hot_add_claims_plugs_vfio_and_allocates(env):
    store, tracker, hostdevs, binder = env
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", gpu(), host=hostdevs))
    assert device.qemu_id == f"hostdev-{dev_uuid(1)[:8]}-pci-4"
    assert device.driver == "vfio-pci" and device.props["host"] == plain_addr(0)
    assert qemu.calls == [f"device_add {device.qemu_id}"]
    held = tracker.get_device(plain_addr(0))
    assert (held.status, held.instance_uuid, held.request_id) == (PciStatus.ALLOCATED, "vm1", device.uuid)
    assert binder.calls == [f"detach {plain_addr(0)}"]


def test_a_failed_device_add_frees_host_device_and_slot(env):
    store, tracker, hostdevs, binder = env
    qemu = FakeQemu(refuse_add="vfio 0000:0a:00.0: failed to open /dev/vfio/40: No such file or directory")
    with pytest.raises(DeviceAddFailed) as info:
        run(hot_add(store, qemu, "vm1", gpu(), host=hostdevs))
    assert "/dev/vfio" in info.value.qemu_message
    assert tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE
    assert store.devices("vm1") == []
    assert binder.calls == [f"detach {plain_addr(0)}", f"reattach {plain_addr(0)}"]


def test_a_failed_bind_takes_no_slot(env):
    store, tracker, _, _ = env
    hostdevs = HostDevices(tracker, RecordingBinder(fail_detach=True))
    with pytest.raises(HostBindError):
        run(hot_add(store, FakeQemu(), "vm1", gpu(), host=hostdevs))
    assert tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE and store.devices("vm1") == []


def test_a_taken_slot_frees_the_claim(env):
    store, tracker, hostdevs, _ = env
    with pytest.raises(SlotOccupied):
        run(hot_add(store, FakeQemu(devices={"stranger": 7}), "vm1", gpu(slot=7), host=hostdevs))
    assert tracker.pci_stats.free_count() == 5


def test_no_free_host_device_is_a_typed_error_and_takes_no_slot(env):
    store, tracker, hostdevs, _ = env
    qemu = FakeQemu()
    run(hot_add(store, qemu, "vm1", gpu(1), host=hostdevs))
    run(hot_add(store, qemu, "vm1", gpu(2), host=hostdevs))
    with pytest.raises(PciDeviceRequestFailed):
        run(hot_add(store, qemu, "vm1", gpu(3), host=hostdevs))
    assert len(store.devices("vm1")) == 2


def test_host_device_goes_back_only_after_qemu_released_it(env):
    store, tracker, hostdevs, binder = env
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", gpu(), host=hostdevs))
    qemu.guest_acks = False
    assert run(hot_del(store, qemu, "vm1", device.uuid, timeout=0.01, host=hostdevs)).pending
    assert tracker.get_device(plain_addr(0)).status is PciStatus.ALLOCATED  # QEMU may still hold it
    assert binder.calls == [f"detach {plain_addr(0)}"]
    qemu.eject(device.qemu_id)
    report = run(reconcile(store, qemu, "vm1", host=hostdevs))
    assert report.released == [device.qemu_id]
    assert tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE
    assert binder.calls[-1] == f"reattach {plain_addr(0)}"


def test_hot_del_confirmed_frees_the_host_device(env):
    store, tracker, hostdevs, binder = env
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", gpu(), host=hostdevs))
    assert run(hot_del(store, qemu, "vm1", device.uuid, host=hostdevs)).removed
    assert tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE
    assert binder.calls == [f"detach {plain_addr(0)}", f"reattach {plain_addr(0)}"]


def test_an_undo_the_guest_has_not_confirmed_keeps_the_host_device(env):
    store, tracker, hostdevs, binder = env
    qemu = FakeQemu(misplace_by=1, guest_acks=False)
    with pytest.raises(DeviceAddFailed, match="stays reserved"):
        run(hot_add(store, qemu, "vm1", gpu(), host=hostdevs))
    assert tracker.get_device(plain_addr(0)).status is PciStatus.CLAIMED
    assert binder.calls == [f"detach {plain_addr(0)}"]


def test_boot_plan_claims_and_emits_vfio_arguments_and_is_stable(env):
    store, tracker, hostdevs, _ = env
    nic = DeviceSpec(dev_uuid(9), "nic", "e1000")
    plan = run(plan_boot(store, "vm1", [nic, gpu()], host=hostdevs))
    assert plan.qemu_args[3] == f"vfio-pci,id=hostdev-{dev_uuid(1)[:8]}-pci-5,bus=pci.0,addr=0x5,host={plain_addr(0)}"
    assert tracker.get_device(plain_addr(0)).status is PciStatus.CLAIMED
    assert run(plan_boot(store, "vm1", [nic, gpu()], host=hostdevs)).qemu_args == plan.qemu_args
    assert tracker.pci_stats.free_count() == 4  # the same host device, not a second claim
    run(plan_boot(store, "vm1", [nic], host=hostdevs))  # dropped from the VM: back to the host
    assert tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE


def test_a_failed_boot_plan_frees_the_claims_it_made(env):
    store, tracker, hostdevs, _ = env
    clash = DeviceSpec(dev_uuid(9), "nic", "e1000", slot=6)
    with pytest.raises(SlotOccupied):
        run(plan_boot(store, "vm1", [clash, gpu(slot=6)], host=hostdevs))
    assert tracker.pci_stats.free_count() == 5


def test_reconcile_after_boot_allocates_cold_plugged_host_devices(env):
    store, tracker, hostdevs, _ = env
    plan = run(plan_boot(store, "vm1", [gpu()], host=hostdevs))
    qemu = FakeQemu(devices={plan.devices[0].qemu_id: plan.devices[0].slot})  # QEMU booted with it
    assert run(reconcile(store, qemu, "vm1", host=hostdevs)).attached == [plan.devices[0].qemu_id]
    assert tracker.get_device(plain_addr(0)).status is PciStatus.ALLOCATED


def test_passthrough_specs_are_validated():
    with pytest.raises(InvalidPciRequest):
        PassthroughSpec(dev_uuid(1), request("type-PCI", count=2))
    with pytest.raises(InvalidPciRequest):
        PassthroughSpec(dev_uuid(1), request("type-PCI"), props={"host": "0000:00:01.0"})
    with pytest.raises(InvalidPciRequest, match="HostDevices"):
        run(hot_add(None, FakeQemu(), "vm1", gpu()))  # type: ignore[arg-type]


@pytest.mark.parametrize("cells", [(), (-1,), (1, 1), ("1",), (True,), "01"])
def test_numa_cells_must_be_distinct_node_numbers(cells):
    with pytest.raises(InvalidPciRequest, match="numa_cells"):
        PassthroughSpec(dev_uuid(1), request("type-PCI"), numa_cells=cells)


def test_hot_add_claims_on_the_vms_numa_cells_as_novas_policy_says(env):
    store, tracker, hostdevs, binder = env  # plain devices: plain_addr(0) on node 0, plain_addr(1) on node 1
    qemu = FakeQemu()
    pinned = PassthroughSpec(dev_uuid(1), request("type-PCI", policy="required"), numa_cells=[1])
    device = run(hot_add(store, qemu, "vm1", pinned, host=hostdevs))
    assert device.props["host"] == plain_addr(1) and tracker.get_device(plain_addr(1)).numa_node == 1
    # node 1 has no plain device left: 'required' refuses before any slot is taken, 'preferred' goes elsewhere
    before = store.devices("vm1")
    with pytest.raises(PciDeviceRequestFailed):
        run(hot_add(store, qemu, "vm1", PassthroughSpec(dev_uuid(2), request("type-PCI", policy="required"),
                                                        numa_cells=(1,)), host=hostdevs))
    assert store.devices("vm1") == before and tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE
    other = run(hot_add(store, qemu, "vm1", PassthroughSpec(dev_uuid(3), request("type-PCI", policy="preferred"),
                                                           numa_cells=(1,)), host=hostdevs))
    assert other.props["host"] == plain_addr(0)


class OrderCheckingBinder(RecordingBinder):
    """Asserts that a device is given back to the host while the tracker still holds it."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def reattach(self, address: str) -> None:
        assert self.tracker.get_device(address).status is not PciStatus.AVAILABLE, "freed before given back"
        super().reattach(address)


def test_the_host_device_is_given_back_before_it_is_free_for_others(env):
    store, tracker, _, _ = env
    hostdevs = HostDevices(tracker, OrderCheckingBinder(tracker))
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", gpu(), host=hostdevs))
    assert run(hot_del(store, qemu, "vm1", device.uuid, host=hostdevs)).removed
    assert tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE


def test_reconcile_allocates_a_claim_a_crash_left_behind(env):
    store, tracker, hostdevs, _ = env
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", gpu(), host=hostdevs))
    # as if the process died after committing 'attached' but before allocating
    tracker.free_device(plain_addr(0), "vm1")
    tracker.claim_instance("vm1", [gpu().request])
    assert tracker.get_device(plain_addr(0)).status is PciStatus.CLAIMED
    run(reconcile(store, qemu, "vm1", host=hostdevs))
    assert tracker.get_device(plain_addr(0)).status is PciStatus.ALLOCATED
    assert device.props["host"] == plain_addr(0)


def test_a_uuid_already_in_use_claims_nothing(env):
    store, tracker, hostdevs, binder = env
    run(hot_add(store, FakeQemu(), "vm1", DeviceSpec(dev_uuid(1), "nic", "e1000")))
    with pytest.raises(DeviceExists):
        run(hot_add(store, FakeQemu(), "vm1", gpu(1), host=hostdevs))
    assert tracker.pci_stats.free_count() == 5 and binder.calls == []


def test_a_removed_passthrough_device_can_come_back_while_another_stays(env):
    store, tracker, hostdevs, _ = env
    qemu = FakeQemu()
    a = run(hot_add(store, qemu, "vm1", gpu(1), host=hostdevs))
    run(hot_add(store, qemu, "vm1", gpu(2), host=hostdevs))
    assert run(hot_del(store, qemu, "vm1", a.uuid, host=hostdevs)).removed
    assert run(hot_add(store, qemu, "vm1", gpu(1), host=hostdevs)).uuid == a.uuid


def test_passthrough_records_are_never_dropped_without_the_tracker(env):
    store, tracker, hostdevs, _ = env
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", gpu(), host=hostdevs))
    with pytest.raises(InvalidPciRequest, match="host="):
        run(hot_del(store, qemu, "vm1", device.uuid))
    with pytest.raises(InvalidPciRequest, match="host="):
        run(reconcile(store, qemu, "vm1"))
    with pytest.raises(InvalidPciRequest, match="host="):
        run(plan_boot(store, "vm1", []))
    assert [d.qemu_id for d in store.devices("vm1")] == [device.qemu_id]


def test_any_binder_failure_frees_the_claim(env):
    store, tracker, _, _ = env

    class Exploding(RecordingBinder):
        def detach(self, address):
            raise KeyboardInterrupt  # not even an Exception

    with pytest.raises(KeyboardInterrupt):
        run(hot_add(store, FakeQemu(), "vm1", gpu(), host=HostDevices(tracker, Exploding())))
    assert tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE


def test_slot_manager_passthrough(tmp_path):
    from kvmslots import SlotManager

    with SlotManager(tmp_path / "s") as manager:
        tracker = manager.use_host_devices([{"vendor_id": "8086"}])
        tracker.update_devices_from_hypervisor_resources(host(pfs=0, vfs=0, plain=1))
        plan = manager.plan_boot(VMSpec("vm1"), [gpu()])
        assert plan.qemu_args[1].endswith(f"host={plain_addr(0)}")
        manager.plan_boot("vm1", [])
        assert tracker.get_device(plain_addr(0)).status is PciStatus.AVAILABLE


def test_reconcile_frees_a_claim_whose_guest_device_was_never_recorded(env):
    store, tracker, hostdevs, binder = env
    qemu = FakeQemu()
    kept = run(hot_add(store, qemu, "vm1", gpu(1), host=hostdevs))
    hostdevs.claim("vm1", gpu(2))  # as if the process died right after the claim (and the bind)
    flavor = tracker.claim_instance("vm1", [request("type-VF")])  # a flavor claim is not ours to judge
    report = run(reconcile(store, qemu, "vm1", host=hostdevs))
    assert report.host_freed == [plain_addr(1)]
    assert tracker.get_device(plain_addr(1)).status is PciStatus.AVAILABLE
    assert binder.calls[-1] == f"reattach {plain_addr(1)}"
    assert tracker.get_device(kept.props["host"]).status is PciStatus.ALLOCATED
    assert tracker.get_device(flavor[0].address).status is PciStatus.CLAIMED


def test_reconcile_frees_host_devices_of_released_records_even_when_qemu_fails_it_later(env):
    """Records reconcile already released must free their host devices, even if a later step
    (re-sending an unplug that never reached QEMU) loses QEMU."""
    from kvmslots import DeviceState, MonitorConnectionLost

    store, tracker, hostdevs, _ = env
    qemu = FakeQemu()
    a = run(hot_add(store, qemu, "vm1", gpu(1), host=hostdevs))
    b = run(hot_add(store, qemu, "vm1", gpu(2), host=hostdevs))
    del qemu.devices[a.qemu_id]  # someone removed A behind our back: reconcile releases it
    with store.transaction() as txn:  # B: a detach that died before its device_del
        txn.set_state("vm1", b.uuid, DeviceState.DETACHING)
    qemu.lose_during_del_wait = True
    with pytest.raises(MonitorConnectionLost):
        run(reconcile(store, qemu, "vm1", host=hostdevs))
    assert tracker.get_device(a.props["host"]).status is PciStatus.AVAILABLE
    assert tracker.get_device(b.props["host"]).status is PciStatus.ALLOCATED  # QEMU may still hold it


def test_a_passthrough_device_on_q35_boots_and_hot_adds_behind_a_root_port(env):
    from fakes import Q35Fake

    store, tracker, devices, binder = env
    plan = run(plan_boot(store, VMSpec("vm2", "q35", hotplug_ports=1), [gpu(1)], host=devices))
    [device] = plan.devices
    assert (device.driver, device.bus, device.slot) == ("vfio-pci", "pcie-port-1", 0)
    qemu = Q35Fake({c.id: (c.slot, c.function, c.chassis) for c in plan.controllers})
    qemu.devices[device.qemu_id] = (device.bus, 0, 0)
    added = run(hot_add(store, qemu, "vm2", gpu(2), host=devices))
    assert (added.bus, added.slot) == ("pcie-port-2", 0)
    assert [d.address for d in tracker.get_instance_pci_devs("vm2", dev_uuid(2))] == [added.props["host"]]

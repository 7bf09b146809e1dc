"""The slot manager against real QEMU: a booted guest for round trips, qtest for a silent guest."""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid

import pytest

import kvmslots
from kvmslots import (
    DeviceAddFailed,
    DeviceSpec,
    InvalidBus,
    Monitor,
    SlotManager,
    SlotOccupied,
    Store,
    VMSpec,
    hot_add,
    hot_del,
    plan_boot,
    reconcile,
)
from kvmslots.testvm import TestVM


def uid(n: int) -> str:
    return str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000 | n))


def guest_addr(slot: int, bus: int = 0) -> str:
    return f"0000:{bus:02x}:{slot:02x}.0"


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state") as s:
        s.define_vm(VMSpec("vm1"))
        yield s


async def raw_qmp(path, command, arguments=None):
    from qemu.qmp import QMPClient

    qmp = QMPClient("raw-test")
    await qmp.connect(str(path))
    try:
        return await qmp.execute(command, arguments)
    finally:
        await qmp.disconnect()


def test_boot_plan_is_what_the_guest_sees(tmp_path):
    devices = [
        DeviceSpec(uid(1), "nic", "virtio-net-pci", {"mac": "52:54:00:12:34:56"}),
        DeviceSpec(uid(2), "rng", "virtio-rng-pci"),
        DeviceSpec(uid(3), "test", "pci-testdev"),
    ]
    with Store(tmp_path / "state") as store:
        plan = asyncio.run(plan_boot(store, VMSpec("vm1"), devices))
        assert [d.slot for d in plan.devices] == [4, 5, 6]
        assert plan.qemu_args[1] == f"virtio-net-pci,id=nic-{uid(1)[:8]}-pci-4,bus=pci.0,addr=0x4,mac=52:54:00:12:34:56"
        with TestVM(tmp_path / "vm", extra_args=plan.qemu_args) as vm:
            seen = vm.guest_pci_devices()
            for device in plan.devices:
                assert guest_addr(device.slot) in seen

            async def check():
                async with Monitor(vm.qmp_path) as mon:
                    view = await mon.query_pci()
                    for device in plan.devices:
                        live = view.find(device.qemu_id)
                        assert (live.bus, live.slot) == (0, device.slot)
                    report = await reconcile(store, mon, "vm1")
                    assert sorted(report.attached) == sorted(d.qemu_id for d in plan.devices)
                    assert report.unknown == []  # slots 0-3 are masked, the rest are ours
                    assert await mon.info_pci() == view  # the HMP fallback reads the same occupancy

            asyncio.run(check())
        again = asyncio.run(plan_boot(store, "vm1", devices))
        assert again.qemu_args == plan.qemu_args


def test_five_hot_adds_and_removes_round_trip_in_a_guest(guest_vm, store):
    specs = [DeviceSpec(uid(10 + i), "rng" if i % 2 else "test", "virtio-rng-pci" if i % 2 else "pci-testdev")
             for i in range(5)]

    async def add_all():
        async with Monitor(guest_vm.qmp_path) as mon:
            return [await hot_add(store, mon, "vm1", spec) for spec in specs]

    added = asyncio.run(add_all())
    assert [d.slot for d in added] == [4, 5, 6, 7, 8]
    assert [d.qemu_id for d in added] == [kvmslots.device_id(s.dev_type, s.uuid, 4 + i) for i, s in enumerate(specs)]
    want = {guest_addr(d.slot) for d in added}
    guest_vm.wait_guest_pci(lambda seen: want <= seen)

    async def remove_all():
        async with Monitor(guest_vm.qmp_path) as mon:
            return [await hot_del(store, mon, "vm1", d.uuid, timeout=30) for d in added]

    results = asyncio.run(remove_all())
    assert all(r.removed for r in results), results  # each confirmed by its DEVICE_DELETED
    guest_vm.wait_guest_pci(lambda seen: not (want & seen))
    assert store.devices("vm1") == []

    async def add_again():
        async with Monitor(guest_vm.qmp_path) as mon:
            return await hot_add(store, mon, "vm1", DeviceSpec(uid(30), "rng", "virtio-rng-pci"))

    assert asyncio.run(add_again()).slot == 4  # the freed slots are reused
    guest_vm.wait_guest_pci(lambda seen: guest_addr(4) in seen)


def test_a_device_added_behind_our_back_is_never_collided(qtest_vm, store):
    asyncio.run(raw_qmp(qtest_vm.qmp_path, "device_add", {"driver": "pci-testdev", "id": "stranger", "addr": "0x4"}))

    async def scenario():
        async with Monitor(qtest_vm.qmp_path) as mon:
            first = await hot_add(store, mon, "vm1", DeviceSpec(uid(1), "test", "pci-testdev"))
            with pytest.raises(SlotOccupied, match="stranger"):
                await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "test", "pci-testdev", slot=4))
            report = await reconcile(store, mon, "vm1")
            return first, report

    first, report = asyncio.run(scenario())
    assert first.slot == 5
    assert [u["qdev_id"] for u in report.unknown] == ["stranger"]


class RacingMonitor(Monitor):
    """A real monitor; right after we read the PCI view, raw QMP takes a slot (a real race, real QEMU error)."""

    def __init__(self, path, slot):
        super().__init__(path)
        self.slot = slot

    async def pci(self, **kw):
        view = await super().pci(**kw)
        if self.slot is not None:
            await self.execute(
                "device_add", {"driver": "pci-testdev", "id": f"racer{self.slot}", "addr": hex(self.slot)}
            )
            self.slot = None
        return view


def test_device_add_failures_leave_no_reservation(qtest_vm, store):
    async def scenario():
        async with Monitor(qtest_vm.qmp_path) as mon:
            with pytest.raises(DeviceAddFailed) as bad_driver:
                await hot_add(store, mon, "vm1", DeviceSpec(uid(1), "test", "nosuch-dev"))
            assert "not a valid device model name" in bad_driver.value.qemu_message
            # an id QEMU already has (placed by raw QMP at another slot)
            taken_id = kvmslots.device_id("test", uid(2), 4)
            await mon.execute("device_add", {"driver": "pci-testdev", "id": taken_id, "addr": "0x9"})
            with pytest.raises(DeviceAddFailed) as dup:
                await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "test", "pci-testdev"))
            assert "Duplicate device ID" in dup.value.qemu_message
            with pytest.raises(InvalidBus):
                await hot_add(store, mon, "vm1", DeviceSpec(uid(3), "test", "pci-testdev", bus="nosuch"))
            assert store.devices("vm1") == []
        async with RacingMonitor(qtest_vm.qmp_path, 10) as mon:
            with pytest.raises(DeviceAddFailed) as taken:
                await hot_add(store, mon, "vm1", DeviceSpec(uid(4), "test", "pci-testdev", slot=10))
            assert "slot 10 function 0 not available" in taken.value.qemu_message
            assert store.devices("vm1") == []
        async with RacingMonitor(qtest_vm.qmp_path, 4) as mon:  # a free choice just picks again
            assert (await hot_add(store, mon, "vm1", DeviceSpec(uid(5), "test", "pci-testdev"))).slot == 5
        assert [d.slot for d in store.devices("vm1")] == [5]

    asyncio.run(scenario())


def test_silent_guest_leaves_the_unplug_pending_until_the_eject(qtest_vm, store):
    async def scenario():
        async with Monitor(qtest_vm.qmp_path) as mon:
            device = await hot_add(store, mon, "vm1", DeviceSpec(uid(1), "test", "pci-testdev"))
            result = await hot_del(store, mon, "vm1", device.uuid, timeout=1.0)
            assert result.pending
            other = await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "test", "pci-testdev"))
            assert other.slot != device.slot  # never reused while the removal is unconfirmed
            again = await hot_del(store, mon, "vm1", device.uuid, timeout=0.5)  # 'already in the process of unplug'
            assert again.pending
            report = await reconcile(store, mon, "vm1")
            assert report.pending == [device.qemu_id]
            return device

    device = asyncio.run(scenario())
    qtest_vm.acpi_eject(device.slot)  # the test plays the guest's eject

    async def after():
        async with Monitor(qtest_vm.qmp_path) as mon:
            report = await reconcile(store, mon, "vm1")
            assert report.released == [device.qemu_id]
            reused = await hot_add(store, mon, "vm1", DeviceSpec(uid(3), "test", "pci-testdev"))
            assert reused.slot == device.slot

    asyncio.run(after())


def _add_in_process(state_dir: str, qmp: str, n: int) -> tuple[str, int]:
    with SlotManager(state_dir, connect_timeout=120) as manager:
        device = manager.hot_add("vm1", DeviceSpec(uid(100 + n), "test", "pci-testdev"), qmp=qmp)
        return device.qemu_id, device.slot


def test_eight_processes_hot_adding_at_once_get_distinct_slots(guest_vm, tmp_path):
    state_dir = tmp_path / "shared-state"
    with SlotManager(state_dir) as manager:
        manager.define_vm(VMSpec("vm1"))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        results = pool.starmap(_add_in_process, [(str(state_dir), str(guest_vm.qmp_path), n) for n in range(8)])
    slots = sorted(slot for _, slot in results)
    assert slots == list(range(4, 12))

    async def verify():
        async with Monitor(guest_vm.qmp_path) as mon:
            return await mon.query_pci()

    view = asyncio.run(verify())
    for qemu_id, slot in results:
        assert (view.find(qemu_id).bus, view.find(qemu_id).slot) == (0, slot)
    guest_vm.wait_guest_pci(lambda seen: {guest_addr(s) for s in slots} <= seen)


def test_monitor_waits_for_a_socket_that_appears_late(tmp_path):
    vm = TestVM(tmp_path / "late", mode="qtest")

    async def scenario():
        async def start_later():
            await asyncio.sleep(1.0)
            await asyncio.to_thread(vm.start)

        starter = asyncio.create_task(start_later())
        async with Monitor(vm.qmp_path, connect_timeout=60) as mon:
            view = await mon.query_pci()
        await starter
        return view

    try:
        assert 0 in asyncio.run(scenario())
    finally:
        vm.stop()


def test_a_pending_unplug_is_finished_by_the_event_or_a_later_hot_del(qtest_vm, store):
    async def scenario():
        async with Monitor(qtest_vm.qmp_path) as mon:
            a = await hot_add(store, mon, "vm1", DeviceSpec(uid(1), "test", "pci-testdev"))
            b = await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "test", "pci-testdev"))
            assert (await hot_del(store, mon, "vm1", a.uuid, timeout=0.2)).pending
            assert (await hot_del(store, mon, "vm1", b.uuid, timeout=0.2)).pending
            # nothing ejected yet: the watcher gives up after its timeout and releases nothing
            assert await kvmslots.watch_unplugs(store, mon, "vm1", timeout=0.3) == []
            watcher = asyncio.create_task(kvmslots.watch_unplugs(store, mon, "vm1", timeout=30))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(qtest_vm.acpi_eject, a.slot)  # DEVICE_DELETED arrives while watching
            await asyncio.sleep(0.5)
            await asyncio.to_thread(qtest_vm.acpi_eject, b.slot)
            released = await watcher
            assert released == [a.qemu_id, b.qemu_id]
            assert store.devices("vm1") == []

            c = await hot_add(store, mon, "vm1", DeviceSpec(uid(3), "test", "pci-testdev"))
            assert c.slot == a.slot
            assert (await hot_del(store, mon, "vm1", c.uuid, timeout=0.2)).pending
        qtest_vm.acpi_eject(c.slot)  # ejected while nobody listened
        async with Monitor(qtest_vm.qmp_path) as mon:
            assert (await hot_del(store, mon, "vm1", c.uuid, timeout=1)).removed  # verified absent
        assert store.devices("vm1") == []

    asyncio.run(scenario())


def test_hot_add_behind_a_pci_bridge_uses_that_bus_map(tmp_path):
    bridge = ["-device", "pci-bridge,id=br1,chassis_nr=1,bus=pci.0,addr=0x1f"]
    mask = "1111" + "0" * 27 + "1"  # the VM's owner reserves the bridge's slot on pci.0
    with Store(tmp_path / "state") as store, TestVM(tmp_path / "vm", extra_args=bridge) as vm:
        store.define_vm(VMSpec("vm1", mask=mask))

        async def scenario():
            async with Monitor(vm.qmp_path) as mon:
                behind = await hot_add(store, mon, "vm1", DeviceSpec(uid(1), "rng", "virtio-rng-pci", bus="br1"))
                root = await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "rng", "virtio-rng-pci"))
                view = await mon.query_pci()
                report = await reconcile(store, mon, "vm1")
                assert report.unknown == [] and report.misplaced == []
                assert (await hot_del(store, mon, "vm1", behind.uuid, timeout=30)).removed
                return behind, root, view

        behind, root, view = asyncio.run(scenario())
        assert (behind.bus, behind.slot) == ("br1", 1)  # slot 0 of a pci-bridge is reserved
        assert root.slot == 4
        bus_number = view.bus_number("br1")
        assert bus_number > 0 and view.find(behind.qemu_id).bus == bus_number
        vm.wait_guest_pci(lambda seen: guest_addr(1, bus_number) not in seen and guest_addr(4) in seen)
        assert [d.qemu_id for d in store.devices("vm1")] == [root.qemu_id]


def _crash_during(state_dir: str, qmp: str, command: str, when: str, n: int, remove_first: bool) -> None:
    """Child process: hot add (and maybe hot remove) a device, dying right before/after one QMP command."""
    import os

    class CrashingMonitor(Monitor):
        async def execute(self, cmd, arguments=None):
            if cmd == command and when == "before":
                os._exit(9)
            result = await super().execute(cmd, arguments)
            if cmd == command and when == "after":
                os._exit(9)
            return result

    async def go():
        with Store(state_dir) as store:
            async with CrashingMonitor(qmp) as mon:
                device = await hot_add(store, mon, "vm1", DeviceSpec(uid(n), "rng", "virtio-rng-pci"))
                if remove_first:
                    await hot_del(store, mon, "vm1", device.uuid, timeout=30)

    asyncio.run(go())


@pytest.mark.parametrize(
    "command,when,remove_first,expect_state,expect_report",
    [
        ("device_add", "before", False, "attaching", "released"),  # intent persisted, nothing done
        ("device_add", "after", False, "attaching", "attached"),  # QEMU took it, never verified
        ("device_del", "after", True, "detaching", "released"),  # unplug asked, never confirmed
    ],
)
def test_a_crash_between_steps_is_repaired_by_reconcile(
    guest_vm, tmp_path, command, when, remove_first, expect_state, expect_report
):
    state_dir = tmp_path / "state"
    with Store(state_dir) as store:
        store.define_vm(VMSpec("vm1"))
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(
        target=_crash_during, args=(str(state_dir), str(guest_vm.qmp_path), command, when, 1, remove_first)
    )
    child.start()
    child.join(120)
    assert child.exitcode == 9
    with Store(state_dir) as store:
        [device] = store.devices("vm1")
        assert device.state.value == expect_state

        async def restart():
            async with Monitor(guest_vm.qmp_path) as mon:
                if expect_state == "detaching":  # let the guest finish the eject it was asked for
                    for _ in range(100):
                        if (await mon.query_pci()).find(device.qemu_id) is None:
                            break
                        await asyncio.sleep(0.1)
                report = await reconcile(store, mon, "vm1")
                nxt = await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "rng", "virtio-rng-pci"))
                return report, nxt

        report, nxt = asyncio.run(restart())
        assert getattr(report, expect_report) == [device.qemu_id]
        if expect_report == "attached":
            assert store.get_device("vm1", device.uuid).state.value == "attached"
            assert nxt.slot == device.slot + 1
        else:
            assert nxt.slot == device.slot  # the slot came back only once QEMU showed it free


def test_devices_behind_an_unnumbered_bridge_are_never_taken_for_removed(tmp_path):
    """With -S (no firmware yet) query-pci lists no devices behind bridges; qom-list still has them."""
    bridge = ["-device", "pci-bridge,id=br1,chassis_nr=1,bus=pci.0,addr=0x1f"]
    mask = "1111" + "0" * 27 + "1"
    with Store(tmp_path / "state") as store:
        plan = asyncio.run(plan_boot(store, VMSpec("vm1", mask=mask),
                                     [DeviceSpec(uid(1), "rng", "virtio-rng-pci", bus="br1")]))
        with TestVM(tmp_path / "vm", mode="qtest", extra_args=bridge + plan.qemu_args) as vm:

            async def scenario():
                async with Monitor(vm.qmp_path) as mon:
                    assert (await mon.query_pci()).find(plan.devices[0].qemu_id) is None
                    report = await reconcile(store, mon, "vm1")
                    assert report.unverified == [plan.devices[0].qemu_id]
                    assert report.lost == [] and report.released == []
                    with pytest.raises(kvmslots.BusNotHotpluggable, match="firmware"):
                        await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "rng", "virtio-rng-pci", bus="br1"))

            asyncio.run(scenario())
        assert [d.qemu_id for d in store.devices("vm1")] == [plan.devices[0].qemu_id]


def test_q35_root_port_takes_its_one_slot_and_the_guest_sees_it(tmp_path):
    port = ["-device", "pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0,addr=0x10"]
    with Store(tmp_path / "state") as store, TestVM(tmp_path / "vm", machine="q35", extra_args=port) as vm:
        store.define_vm(VMSpec("vm1", machine="q35"))

        async def scenario():
            async with Monitor(vm.qmp_path) as mon:
                first = await hot_add(store, mon, "vm1", DeviceSpec(uid(1), "rng", "virtio-rng-pci", bus="rp1"))
                with pytest.raises(kvmslots.SlotsExhausted):
                    await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "rng", "virtio-rng-pci", bus="rp1"))
                return first, (await mon.query_pci()).bus_number("rp1")

        first, bus_number = asyncio.run(scenario())
        assert (first.bus, first.slot) == ("rp1", 0)
        vm.wait_guest_pci(lambda seen: guest_addr(0, bus_number) in seen, timeout=30)
        assert [d.slot for d in store.devices("vm1")] == [0]


def test_a_batch_of_16_devices_lands_in_the_guest(guest_vm, store):
    specs = [DeviceSpec(uid(200 + n), "test", "pci-testdev") for n in range(16)]

    async def batch():
        async with Monitor(guest_vm.qmp_path) as mon:
            return await kvmslots.hot_add_many(store, mon, "vm1", specs)

    devices = asyncio.run(batch())
    assert [d.slot for d in devices] == list(range(4, 20))
    guest_vm.wait_guest_pci(lambda seen: {guest_addr(s) for s in range(4, 20)} <= seen)

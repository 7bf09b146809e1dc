"""The state store and boot planning (real SQLite; no QEMU needed)."""

import asyncio
import json
import multiprocessing
import os
import stat
import uuid
from pathlib import Path

import pytest

import kvmslots
from kvmslots import (
    DeviceExists,
    DeviceSpec,
    DeviceState,
    InvalidMask,
    SlotOccupied,
    StateConflict,
    StateImportError,
    Store,
    UnknownVM,
    VMSpec,
    plan_boot,
)
from kvmslots.errors import SlotReserved, SlotsExhausted


def uid(n: int) -> str:
    return str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000))


def specs(*names, **kw):
    return [DeviceSpec(uid(i + 1), "nic" if "net" in n else "dev", n, **kw) for i, n in enumerate(names)]


def plan(store, vm, devices):
    return asyncio.run(plan_boot(store, vm, devices))


@pytest.fixture
def store(state_location):
    with Store(state_location) as s:
        yield s


def test_state_dir_and_database_are_private(tmp_path):
    Store(tmp_path / "state").close()
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "kvmslots.sqlite3").st_mode) == 0o600


def test_plan_boot_assigns_first_free_and_is_reproducible(store):
    devices = specs("virtio-net-pci", "virtio-rng-pci", "pci-testdev")
    first = plan(store, VMSpec("vm1"), devices)
    assert [d.slot for d in first.devices] == [4, 5, 6]
    assert first.qemu_args[:2] == ["-device", f"virtio-net-pci,id=nic-{uid(1)[:8]}-pci-4,bus=pci.0,addr=0x4"]
    again = plan(store, "vm1", devices)
    assert again.qemu_args == first.qemu_args
    # reordering the list does not move anybody: stored slots win
    assert plan(store, "vm1", list(reversed(devices))).qemu_args[-2:] == first.qemu_args[:2]
    assert {d.state for d in store.devices("vm1")} == {DeviceState.PLANNED}


def test_plan_boot_keeps_slots_when_a_device_is_added_or_dropped(store):
    a, b, c = specs("virtio-net-pci", "virtio-rng-pci", "pci-testdev")
    plan(store, VMSpec("vm1"), [a, b, c])
    result = plan(store, "vm1", [a, c])
    assert [d.slot for d in result.devices] == [4, 6] and [d.uuid for d in result.dropped] == [b.uuid]
    d = DeviceSpec(uid(9), "disk", "virtio-blk-pci", {"drive": "d,1"})
    result = plan(store, "vm1", [a, c, d])
    assert [x.slot for x in result.devices] == [4, 6, 5]
    assert result.qemu_args[-1].endswith(",addr=0x5,drive=d,,1")  # QEMU's ',' escaping


def test_plan_boot_requested_slot_errors(store):
    a, b = specs("virtio-net-pci", "virtio-rng-pci")
    with pytest.raises(SlotReserved):
        plan(store, VMSpec("vm1"), [DeviceSpec(a.uuid, "nic", a.driver, slot=2)])
    with pytest.raises(SlotOccupied, match="Slot 7 occupied"):
        plan(store, VMSpec("vm1"),
             [DeviceSpec(a.uuid, "nic", a.driver, slot=7), DeviceSpec(b.uuid, "dev", b.driver, slot=7)])
    assert store.vms() == []  # nothing half-written
    plan(store, VMSpec("vm1"), [a])
    with pytest.raises(StateConflict, match="stored at slot 4"):
        plan(store, "vm1", [DeviceSpec(a.uuid, "nic", a.driver, slot=9)])
    # the mask now reserves the stored slot
    with pytest.raises(SlotReserved):
        plan(store, VMSpec("vm1", mask="11111" + "0" * 27), [a])
    assert store.get_vm("vm1").mask == kvmslots.DEFAULT_PCI_RESERVATIONS


def test_plan_boot_exhaustion_and_duplicates(store):
    pinned = [DeviceSpec(uid(i + 1), "dev", "pci-testdev", bus="pci.0") for i in range(29)]
    with pytest.raises(SlotsExhausted):  # pinned to pci.0: no bridge can help
        plan(store, VMSpec("vm1"), pinned)
    many = [DeviceSpec(uid(i + 1), "dev", "pci-testdev") for i in range(29)]
    with pytest.raises(DeviceExists):
        plan(store, VMSpec("vm1"), [many[0], many[0]])
    assert store.vms() == []


def test_unknown_vm(store):
    with pytest.raises(UnknownVM):
        plan(store, "ghost", [])


def test_export_import_round_trip(tmp_path, store):
    devices = specs("virtio-net-pci", "virtio-rng-pci")
    original = plan(store, VMSpec("vm1", mask="1111" + "0" * 27 + "1"), devices)
    doc = json.dumps(store.export_vm("vm1"))
    with Store(tmp_path / "target") as target:
        target.import_vm(doc)
        assert target.export_vm("vm1") == json.loads(doc)
        assert plan(target, "vm1", devices).qemu_args == original.qemu_args
        with pytest.raises(StateConflict):
            target.import_vm(doc)
        target.import_vm(doc, replace=True)


def _mutations():
    def m(path, value):
        def apply(doc):
            node = doc
            for key in path[:-1]:
                node = node[key]
            if value is KeyError:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        return apply

    return {
        "format": m(["format"], "ganeti-runtime"),
        "version": m(["version"], 4),
        "extra key": m(["surprise"], 1),
        "no devices": m(["devices"], KeyError),
        "bad mask": m(["vm", "mask"], "111"),
        "bad name": m(["vm", "name"], "../etc"),
        "bad uuid": m(["devices", 0, "uuid"], "xyz"),
        "bad slot": m(["devices", 0, "slot"], 40),
        "masked slot": m(["devices", 0, "slot"], 1),
        "id mismatch": m(["devices", 0, "id"], "nic-00000000-pci-9"),
        "bad state": m(["devices", 0, "state"], "zombie"),
        "bad type": m(["devices", 0, "type"], "Nic"),
        "reserved prop": m(["devices", 0, "props"], {"addr": "0x9"}),
        "devices not list": m(["devices"], {}),
        "dup slot": lambda doc: doc["devices"].append(dict(doc["devices"][1], uuid=uid(77),
                                                           id=f"dev-{uid(77)[:8]}-pci-{doc['devices'][1]['slot']}")),
        "dup uuid": lambda doc: doc["devices"].append(dict(doc["devices"][0])),
    }


@pytest.mark.parametrize("name", list(_mutations()))
def test_corrupted_or_foreign_import_changes_nothing(tmp_path, store, name):
    plan(store, VMSpec("vm1"), specs("virtio-net-pci", "virtio-rng-pci"))
    doc = store.export_vm("vm1")
    with Store(tmp_path / "target") as target:
        plan(target, VMSpec("vm1", mask="1" * 8 + "0" * 24), [])
        before = target.export_vm("vm1")
        bad = json.loads(json.dumps(doc))
        _mutations()[name](bad)
        with pytest.raises(StateImportError):
            target.import_vm(bad, replace=True)
        assert target.export_vm("vm1") == before


@pytest.mark.parametrize("blob", [b"\x00\xff", "{not json", "[]", "null", '{"format": "kvmslots.vm-state"}'])
def test_garbage_import(store, blob):
    with pytest.raises(StateImportError):
        store.import_vm(blob)
    assert store.vms() == []


def test_bad_vm_specs():
    with pytest.raises(InvalidMask):
        VMSpec("vm1", mask="1" * 31)
    with pytest.raises(kvmslots.InvalidName):
        VMSpec("vm/1")
    with pytest.raises(kvmslots.InvalidProperty):
        DeviceSpec(uid(1), "nic", "virtio-net-pci", {"id": "x"})
    with pytest.raises(kvmslots.InvalidProperty):
        DeviceSpec(uid(1), "nic", "virtio-net-pci", {"mac": "52:54:00:00:00:01\n"})
    with pytest.raises(kvmslots.InvalidDriver):
        DeviceSpec(uid(1), "nic", "virtio-net-pci,addr=0x2")


def _reserve_worker(state_dir, n, queue):
    from kvmslots.model import Device
    from kvmslots.slots import SlotMap

    with Store(state_dir) as store:
        for i in range(4):
            with store.transaction() as txn:
                vm = txn.get_vm("vm1")
                slot_map = SlotMap(vm.mask)
                slot_map.occupy(d.slot for d in txn.devices("vm1"))
                spec = DeviceSpec(uid(100 + n * 10 + i), "dev", "pci-testdev")
                slot = slot_map.reserve()
                txn.add_device("vm1", Device.from_spec(spec, "pci.0", slot, DeviceState.ATTACHING))
            queue.put(slot)


def test_processes_never_take_the_same_slot(state_location):
    with Store(state_location) as store:
        store.define_vm(VMSpec("vm1"))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_reserve_worker, args=(state_location, n, queue)) for n in range(6)]
    for p in procs:
        p.start()
    slots = [queue.get(timeout=60) for _ in range(24)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(slots) == list(range(4, 28))


def test_vm_lock_excludes_others_and_dies_with_its_holder(state_location):
    sqlite = not state_location.startswith("postgresql://")

    async def scenario():
        with Store(state_location) as a, Store(state_location) as b:
            async with a.vm_lock("vm1"):
                with pytest.raises(kvmslots.VMBusy):
                    async with b.vm_lock("vm1", timeout=0.2):
                        pass
                async with b.vm_lock("vm2", timeout=0.2):  # other VMs are not blocked
                    pass
            async with b.vm_lock("vm1", timeout=0.2):
                pass
            async with a.vm_lock("vm1"):  # one Store object does not take a VM's lock twice either
                with pytest.raises(kvmslots.VMBusy):
                    async with a.vm_lock("vm1", timeout=0.2):
                        pass

    asyncio.run(scenario())
    ctx = multiprocessing.get_context("spawn")
    holder = ctx.Process(target=_lock_and_die, args=(state_location,))
    holder.start()
    holder.join(60)
    assert holder.exitcode == 9

    async def after_crash():
        with Store(state_location) as s:
            async with s.vm_lock("vm1", timeout=5):  # the server (or the kernel) dropped the dead holder's lock
                if sqlite:
                    lock_file = s.state_dir / "locks" / "vm1.lock"
                    assert stat.S_IMODE(os.stat(lock_file).st_mode) == 0o600

    asyncio.run(after_crash())
    if sqlite:
        assert not (Path(state_location) / "locks" / "vm1.lock").exists()  # released: nothing left behind


def _lock_and_die(state_dir):
    async def hold():
        with Store(state_dir) as s:
            async with s.vm_lock("vm1"):
                os._exit(9)

    asyncio.run(hold())


def test_ids_that_would_collide_across_buses_are_refused_typed(store):
    a = str(uuid.UUID("9f3c2a1b-0000-4000-8000-000000000001"))
    b = str(uuid.UUID("9f3c2a1b-0000-4000-8000-000000000002"))  # same first group
    vm = VMSpec("vm1", bus_masks={"br1": "1" + "0" * 31})
    with pytest.raises(DeviceExists, match="collide"):
        plan(store, vm, [DeviceSpec(a, "nic", "e1000", slot=5), DeviceSpec(b, "dev", "pci-testdev", bus="br1", slot=5)])
    vm_doc = {k: vm.to_json()[k] for k in ("name", "machine", "mask", "bus_masks")}
    doc = {"format": "kvmslots.vm-state", "version": 1, "vm": vm_doc, "devices": [
        {"uuid": a, "type": "nic", "driver": "e1000", "props": {}, "bus": "pci.0", "slot": 5, "state": "planned",
         "id": "nic-9f3c2a1b-pci-5"},
        {"uuid": b, "type": "dev", "driver": "pci-testdev", "props": {}, "bus": "br1", "slot": 5, "state": "planned",
         "id": "dev-9f3c2a1b-pci-5"}]}
    with pytest.raises(StateImportError, match="collide"):
        store.import_vm(doc)
    assert store.vms() == []


@pytest.mark.parametrize("props", [{"romfile": "/etc/passwd"}, {"x-pcie-lnksta-dllla": True}, {"sysfsdev": "/sys/x"},
                                   {"host": "0000:04:00.0"}])
def test_properties_that_reach_host_resources_are_refused(props):
    with pytest.raises(kvmslots.InvalidProperty, match="host"):
        DeviceSpec(uid(1), "nic", "e1000", props)


def test_raw_vfio_devices_must_go_through_the_tracker(store):
    raw = DeviceSpec(uid(1), "hostdev", "vfio-pci", {"host": "0000:04:00.0"})
    with pytest.raises(kvmslots.InvalidDriver, match="PassthroughSpec"):
        plan(store, VMSpec("vm1"), [raw])
    assert store.vms() == []


def test_nil_uuid_and_bad_bus_masks():
    with pytest.raises(kvmslots.InvalidUUID):
        kvmslots.device_id("nic", "00000000-0000-0000-0000-000000000000", 5)
    for bad in (None, "ab", [1]):
        with pytest.raises(kvmslots.ValidationError):
            VMSpec("vm1", bus_masks=bad)


def test_store_refuses_odd_paths_with_typed_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(kvmslots.StateError):
        Store(tmp_path / "file")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "kvmslots.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(kvmslots.StateError):
        Store(tmp_path / "corrupt")
    deep = "[" * 100000 + "]" * 100000
    with Store(tmp_path / "ok") as store, pytest.raises(StateImportError):
        store.import_vm(deep)


def test_define_and_import_wait_for_the_vm_lock(tmp_path):
    async def scenario():
        with Store(tmp_path / "s") as a, Store(tmp_path / "s") as b:
            async with a.vm_lock("vm1"):
                with pytest.raises(kvmslots.VMBusy):
                    with b.vm_lock_sync("vm1", timeout=0.2):
                        pass
            b.define_vm(VMSpec("vm1"))

    asyncio.run(scenario())

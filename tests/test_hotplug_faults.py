"""hot_add / hot_del / reconcile under injected faults: nothing leaks, nothing is lost."""

import asyncio
import uuid

import pytest
from fakes import FakeQemu, ReconnectingFakeQemu

import kvmslots
from kvmslots import (
    DeviceAddFailed,
    DeviceSpec,
    DeviceState,
    SlotOccupied,
    Store,
    UnplugGuestError,
    VerificationFailed,
    VMSpec,
    hot_add,
    hot_del,
    reconcile,
)
from kvmslots.errors import DeviceExists, HotplugError, StateConflict, UnknownDevice


def run(coro):
    return asyncio.run(coro)


def spec(n: int, **kw) -> DeviceSpec:
    return DeviceSpec(str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000)), "dev", "pci-testdev", **kw)


@pytest.fixture
def store(state_location):
    with Store(state_location) as s:
        s.define_vm(VMSpec("vm1"))
        yield s


def states(store):
    return {d.qemu_id: d.state.value for d in store.devices("vm1")}


def test_happy_path_and_foreign_device_is_never_collided(store):
    qemu = FakeQemu(devices={"stranger": 4})
    device = run(hot_add(store, qemu, "vm1", spec(1)))
    assert device.slot == 5 and device.state is DeviceState.ATTACHED
    assert qemu.devices[device.qemu_id] == 5
    with pytest.raises(SlotOccupied, match="stranger"):
        run(hot_add(store, qemu, "vm1", spec(2, slot=4)))
    with pytest.raises(DeviceExists):
        run(hot_add(store, qemu, "vm1", spec(1)))


def test_qemu_refusal_releases_the_slot_and_carries_the_message(store):
    qemu = FakeQemu(refuse_add="'nosuch-dev' is not a valid device model name")
    with pytest.raises(DeviceAddFailed) as info:
        run(hot_add(store, qemu, "vm1", spec(1)))
    assert info.value.qemu_message == "'nosuch-dev' is not a valid device model name"
    assert states(store) == {}
    assert run(hot_add(store, qemu, "vm1", spec(1))).slot == 4


def test_slot_taken_behind_our_back_between_view_and_add_is_retried(store):
    qemu = FakeQemu()
    original = qemu.pci

    async def racing_view(**kw):
        view = await original(**kw)
        qemu.devices.setdefault("sneaky", 4)  # raw QMP adds a device right after we looked
        return view

    qemu.pci = racing_view
    device = run(hot_add(store, qemu, "vm1", spec(1)))
    assert device.slot == 5


def test_lost_connection_after_add_is_undone_after_reconnect(store):
    qemu = ReconnectingFakeQemu(lose_after_add=True)
    with pytest.raises(DeviceAddFailed, match="connection lost"):
        run(hot_add(store, qemu, "vm1", spec(1)))
    assert qemu.devices == {} and states(store) == {}


def test_lost_connection_before_add_releases_the_slot(store):
    qemu = ReconnectingFakeQemu(lose_before_add=True)
    with pytest.raises(DeviceAddFailed):
        run(hot_add(store, qemu, "vm1", spec(1)))
    assert qemu.devices == {} and states(store) == {}


def test_lost_connection_without_reconnect_leaves_attaching_for_reconcile(store):
    qemu = FakeQemu(lose_after_add=True)
    with pytest.raises(DeviceAddFailed, match="attaching"):
        run(hot_add(store, qemu, "vm1", spec(1)))
    assert list(states(store).values()) == ["attaching"]
    qemu.connected = True
    # the slot is not handed out again while the outcome is unknown
    assert run(hot_add(store, qemu, "vm1", spec(2))).slot == 5
    report = run(reconcile(store, qemu, "vm1"))
    assert report.attached == [f"dev-{spec(1).uuid[:8]}-pci-4"]
    assert set(states(store).values()) == {"attached"}


def test_failed_verification_removes_the_device_again(store):
    qemu = FakeQemu(misplace_by=1)
    with pytest.raises(VerificationFailed, match="slot 5"):
        run(hot_add(store, qemu, "vm1", spec(1)))
    assert qemu.devices == {} and states(store) == {}


def test_failed_verification_with_a_silent_guest_keeps_the_slot(store):
    qemu = FakeQemu(misplace_by=1, guest_acks=False)
    with pytest.raises(VerificationFailed, match="stays reserved"):
        run(hot_add(store, qemu, "vm1", spec(1)))
    assert list(states(store).values()) == ["detaching"]
    qemu.eject(next(iter(qemu.pending)))
    assert run(reconcile(store, qemu, "vm1")).released and states(store) == {}


def test_hot_del_pending_then_reconcile(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", spec(1)))
    qemu.guest_acks = False
    result = run(hot_del(store, qemu, "vm1", device.uuid, timeout=0.01))
    assert result.pending and states(store) == {device.qemu_id: "detaching"}
    assert run(hot_add(store, qemu, "vm1", spec(2))).slot == 5  # the pending slot is not reused
    assert run(reconcile(store, qemu, "vm1")).pending == [device.qemu_id]
    qemu.eject(device.qemu_id)
    report = run(reconcile(store, qemu, "vm1"))
    assert report.released == [device.qemu_id]
    assert run(hot_add(store, qemu, "vm1", spec(3))).slot == 4


def test_hot_del_guest_refusal_keeps_the_device_attached(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", spec(1)))
    qemu.guest_refuses = True
    with pytest.raises(UnplugGuestError) as refused:
        run(hot_del(store, qemu, "vm1", device.uuid))
    assert states(store) == {device.qemu_id: "attached"}
    facts = refused.value.facts()
    assert (facts["vm"], facts["uuid"], facts["device_id"], facts["slot"]) == ("vm1", device.uuid, device.qemu_id, 4)


def test_hot_del_qemu_refuses_says_which_device_and_keeps_it(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", spec(1)))
    qemu.refuse_del = "device_del not allowed while migrating"
    with pytest.raises(HotplugError) as refused:
        run(hot_del(store, qemu, "vm1", device.uuid))
    assert states(store) == {device.qemu_id: "attached"}
    error = refused.value
    assert (error.vm, error.uuid, error.device_id, error.bus, error.slot, error.state) == (
        "vm1", device.uuid, device.qemu_id, "pci.0", 4, "attached")
    assert error.qemu_message == "device_del not allowed while migrating"


def test_hot_del_of_a_device_qemu_lost_releases_it(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", spec(1)))
    del qemu.devices[device.qemu_id]
    assert run(hot_del(store, qemu, "vm1", device.uuid)).removed
    assert states(store) == {}
    with pytest.raises(UnknownDevice):
        run(hot_del(store, qemu, "vm1", device.uuid))


def test_hot_del_refuses_a_device_being_attached(store):
    qemu = FakeQemu(lose_after_add=True)
    with pytest.raises(DeviceAddFailed):
        run(hot_add(store, qemu, "vm1", spec(1)))
    qemu.connected = True
    with pytest.raises(StateConflict):
        run(hot_del(store, qemu, "vm1", spec(1).uuid))


def test_reconcile_reports_lost_and_unknown(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", spec(1)))
    del qemu.devices[device.qemu_id]
    qemu.devices["stranger"] = 9
    report = run(reconcile(store, qemu, "vm1"))
    assert report.lost == [device.qemu_id]
    assert [u["qdev_id"] for u in report.unknown] == ["stranger"]
    assert states(store) == {}


def test_a_cancelled_hot_add_is_undone(store):
    qemu = FakeQemu(add_delay=1.0)

    async def cancel_midway():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(hot_add(store, qemu, "vm1", spec(1)), timeout=0.1)

    run(cancel_midway())
    assert qemu.devices == {} and states(store) == {}  # QEMU's copy removed, slot released


def test_a_refused_undo_keeps_the_slot_and_says_why(store):
    qemu = FakeQemu(misplace_by=1, refuse_del="Bus 'pci.0' does not support hotplugging")
    with pytest.raises(VerificationFailed) as info:
        run(hot_add(store, qemu, "vm1", spec(1)))
    assert "undoing it failed too" in str(info.value)
    assert "does not support hotplugging" in info.value.qemu_message
    assert list(states(store).values()) == ["attaching"]


def test_reconcile_never_releases_a_device_qemu_has_but_cannot_place(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", spec(1)))
    qemu.hidden.add(device.qemu_id)  # e.g. behind a bridge after a reset, before the firmware ran
    report = run(reconcile(store, qemu, "vm1"))
    assert report.unverified == [device.qemu_id] and report.lost == []
    assert states(store) == {device.qemu_id: "attached"}


def test_batch_hot_add_takes_first_free_slots_in_one_go(store):
    qemu = FakeQemu(devices={"stranger": 5})
    devices = run(kvmslots.hot_add_many(store, qemu, "vm1", [spec(n) for n in range(1, 5)]))
    assert [d.slot for d in devices] == [4, 6, 7, 8]
    assert set(states(store).values()) == {"attached"}


def test_a_batch_that_fails_midway_is_undone_in_reverse(store):
    qemu = FakeQemu(refuse_add="'nosuch' is not a valid device model name", refuse_nth_add=3)
    with pytest.raises(DeviceAddFailed) as info:
        run(kvmslots.hot_add_many(store, qemu, "vm1", [spec(n) for n in range(1, 5)]))
    assert info.value.qemu_message == "'nosuch' is not a valid device model name"
    assert qemu.devices == {} and states(store) == {}
    assert [c.split()[0] for c in qemu.calls] == ["device_add"] * 3 + ["device_del"] * 2
    assert qemu.calls[-1].endswith("-pci-4")  # reverse order: the first one added goes last


def test_a_batch_with_a_misplaced_device_is_undone(store):
    qemu = FakeQemu(misplace_by=10)
    with pytest.raises(VerificationFailed):
        run(kvmslots.hot_add_many(store, qemu, "vm1", [spec(1), spec(2)]))
    assert qemu.devices == {} and states(store) == {}

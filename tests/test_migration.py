"""Live migration's records, on both backends: what the source refuses, what the target writes,
and when each side lets go.  The round trips themselves run on real QEMU in
``integration/test_migration_qemu.py``; the monitors here only inject what a real QEMU will not
produce on demand (a migration QEMU still calls 'active', a target that lacks a device)."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from fakes import FakeQemu
from pcihost import host, request

from kvmslots import DeviceSpec, DeviceState, Store, VMSpec, hot_add, plan_boot, reconcile
from kvmslots.errors import (
    MigrationError,
    MigrationIncomplete,
    MigrationMismatch,
    MigrationRefused,
    StateConflict,
    StateImportError,
    UnknownVM,
)
from kvmslots.hotplug.migrate import (
    IncomingConfirmed,
    abort_incoming,
    confirm_incoming,
    outgoing,
    parse_migration,
    plan_incoming,
    release_outgoing,
)
from kvmslots.passthrough import HostDevices, PassthroughSpec
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.tracker import PciDevTracker


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def uid(n: int) -> str:
    return str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000 | n))


def rng(n: int) -> DeviceSpec:
    return DeviceSpec(uid(n), "rng", "virtio-rng-pci")


@dataclass
class MigratingQemu(FakeQemu):
    """A QEMU whose :meth:`answering` face also answers ``query-migrate`` and ``query-status`` as told."""

    migration: str = "completed"
    status: str = "running"

    @property
    def answering(self) -> Answering:
        return Answering(self)


@dataclass
class Answering:
    """The monitor of a :class:`MigratingQemu` that takes QMP commands (the plain fake takes none, so
    that hot add does not probe it)."""

    qemu: MigratingQemu
    executed: list[str] = field(default_factory=list)

    async def pci(self, *, placement_only: bool = False) -> Any:
        return await self.qemu.pci(placement_only=placement_only)

    async def device_add(self, arguments: Any) -> None:
        await self.qemu.device_add(arguments)

    async def device_del(self, qdev_id: str, timeout: float, on_sent: Any = None, *, also: Any = ()) -> bool:
        return await self.qemu.device_del(qdev_id, timeout, on_sent, also=also)

    async def execute(self, command: str, arguments: Any = None) -> Any:
        self.executed.append(command)
        if command == "query-migrate":
            return {"status": self.qemu.migration} if self.qemu.migration else {}
        if command == "query-status":
            return {"status": self.qemu.status, "running": self.qemu.status == "running"}
        raise AssertionError(f"unexpected QMP command {command}")


@pytest.fixture
def source(state_location: str, tmp_path: Any) -> Any:
    """A running pc VM with a booted device and a hot-added one, its QEMU, and a second store (the target)."""
    src = Store(state_location)
    dst = Store(tmp_path / "target")
    qemu = MigratingQemu()
    plan = run(plan_boot(src, VMSpec("vm1"), [rng(1)]))
    qemu.devices[plan.devices[0].qemu_id] = plan.devices[0].slot
    run(reconcile(src, qemu, "vm1"))
    run(hot_add(src, qemu, "vm1", rng(2)))
    yield src, dst, qemu
    src.close()
    dst.close()


def target_qemu(document: dict[str, Any]) -> MigratingQemu:
    """The target QEMU as started from the plan: every device where the document puts it."""
    qemu = MigratingQemu()
    for device in document["state"]["devices"]:
        qemu.devices[device["id"]] = device["slot"]
    return qemu


# --- the source ------------------------------------------------------------------------------


def test_outgoing_describes_what_qemu_runs_and_changes_nothing(source: Any) -> None:
    src, _, qemu = source
    qemu.devices["nic0"] = 9  # the manager's own NIC: reported, for the target's command line
    before = src.export_vm("vm1")
    doc = run(outgoing(src, qemu, "vm1"))
    assert doc["format"] == "kvmslots-migration" and doc["version"] == 1
    assert doc["state"] == before == src.export_vm("vm1")
    assert [d["state"] for d in doc["state"]["devices"]] == ["attached", "attached"]
    assert [(u["slot"], u["qdev_id"]) for u in doc["unmanaged"]] == [(9, "nic0")]
    json.dumps(doc)  # a document travels as JSON


def test_a_device_in_flight_is_refused_by_name(source: Any) -> None:
    src, _, qemu = source
    device = src.devices("vm1")[1]
    with src.transaction() as txn:
        txn.set_state("vm1", device.uuid, DeviceState.DETACHING)
    before = src.export_vm("vm1")
    with pytest.raises(MigrationRefused) as refused:
        run(outgoing(src, qemu, "vm1"))
    assert refused.value.reason == "in_flight" and refused.value.devices == [device.qemu_id]
    assert refused.value.vm == "vm1" and device.qemu_id in str(refused.value) and "detaching" in str(refused.value)
    assert isinstance(refused.value, MigrationError)
    assert src.export_vm("vm1") == before


def test_a_record_qemu_does_not_show_is_refused(source: Any) -> None:
    src, _, qemu = source
    gone = src.devices("vm1")[0]
    del qemu.devices[gone.qemu_id]  # someone removed it behind our back
    with pytest.raises(MigrationRefused) as refused:
        run(outgoing(src, qemu, "vm1"))
    assert refused.value.reason == "not_running" and refused.value.devices == [gone.qemu_id]
    assert "reconcile" in str(refused.value)


def test_a_passthrough_device_is_refused_with_novas_way_out(tmp_path: Any) -> None:
    with Store(tmp_path / "state") as store:
        store.define_vm(VMSpec("vm1"))
        tracker = PciDevTracker(store, Whitelist.from_config([{"vendor_id": "8086"}]))
        tracker.update_devices_from_hypervisor_resources(host(pfs=1, vfs=2, plain=2))

        class Binder:
            def detach(self, address: str) -> None: ...
            def reattach(self, address: str) -> None: ...
            def driver(self, address: str) -> str | None:
                return None

        qemu = MigratingQemu()
        gpu = run(hot_add(store, qemu, "vm1", PassthroughSpec(uid(7), request("type-PCI")),
                          host=HostDevices(tracker, Binder())))  # fmt: skip
        run(hot_add(store, qemu, "vm1", rng(8)))
        with pytest.raises(MigrationRefused) as refused:
            run(outgoing(store, qemu, "vm1"))
        assert refused.value.reason == "passthrough" and refused.value.devices == [gone_id := gpu.qemu_id]
        text = str(refused.value)
        assert gone_id in text and "update_pci_for_migration" in text and "unplug" in text
        assert store.get_device("vm1", uid(7)).state is DeviceState.ATTACHED  # nothing changed


# --- the document ----------------------------------------------------------------------------


def test_parse_migration_refuses_every_malformed_document(source: Any) -> None:
    src, dst, qemu = source
    good = run(outgoing(src, qemu, "vm1"))

    def bad(change: Any) -> str:
        doc = copy.deepcopy(good)
        change(doc)
        with pytest.raises(StateImportError) as refused:
            plan_incoming(dst, doc)
        assert not dst.has_vm("vm1")  # nothing written
        return str(refused.value)

    assert "not valid JSON" in str(pytest.raises(StateImportError, parse_migration, "{").value)
    assert "migration document" in bad(lambda d: d.update(format="kvmslots-runtime"))
    assert "version" in bad(lambda d: d.update(version=True))
    assert "version" in bad(lambda d: d.update(version=2))
    assert "exactly" in bad(lambda d: d.update(extra=1))
    assert "exactly" in bad(lambda d: d.pop("store"))
    assert "store" in bad(lambda d: d.update(store=""))
    assert "unmanaged" in bad(lambda d: d.update(unmanaged={}))
    assert "in flight" in bad(lambda d: d["state"]["devices"][0].update(state="attaching"))
    assert "does not match" in bad(lambda d: d["state"]["devices"][0].update(slot=9))  # parse_export's own checks
    assert "vfio-pci" in bad(lambda d: d["state"]["devices"][0].update(driver="vfio-pci",
                                                                      props={"host": "0000:01:00.0"}))


@pytest.mark.parametrize("incoming", ["", "-S", "unix:/x\n-S", None])
def test_an_incoming_value_that_is_not_one_is_refused(source: Any, incoming: Any) -> None:
    src, dst, qemu = source
    with pytest.raises(StateImportError):
        plan_incoming(dst, run(outgoing(src, qemu, "vm1")), incoming=incoming)
    assert not dst.has_vm("vm1")


# --- the target ------------------------------------------------------------------------------


def test_the_target_plans_the_same_devices_then_confirms_them(source: Any) -> None:
    src, dst, qemu = source
    doc = run(outgoing(src, qemu, "vm1"))
    plan = plan_incoming(dst, doc, incoming="unix:/run/m.sock")
    assert plan.qemu_args == [
        "-device", f"virtio-rng-pci,id=rng-{uid(1)[:8]}-pci-4,bus=pci.0,addr=0x4",
        "-device", f"virtio-rng-pci,id=rng-{uid(2)[:8]}-pci-5,bus=pci.0,addr=0x5",
        "-incoming", "unix:/run/m.sock",
    ]  # fmt: skip
    assert [d.state for d in dst.devices("vm1")] == [DeviceState.PLANNED] * 2
    target = target_qemu(doc)
    target.status = "inmigrate"
    with pytest.raises(MigrationIncomplete) as early:
        run(confirm_incoming(dst, target.answering, doc))
    assert early.value.state == "inmigrate"
    assert [d.state for d in dst.devices("vm1")] == [DeviceState.PLANNED] * 2
    target.status = "running"
    done = run(confirm_incoming(dst, target.answering, doc))
    assert done.report is not None and sorted(done.report.attached) == sorted(done.devices)
    assert sorted(done.devices) == sorted(d["id"] for d in doc["state"]["devices"])
    assert done.to_json() == {"format": "kvmslots-migration-confirmation", "version": 1, "vm": "vm1",
                              "store": dst.identity, "devices": list(done.devices)}
    assert [d.state for d in dst.devices("vm1")] == [DeviceState.ATTACHED] * 2
    with pytest.raises(StateConflict):  # confirmed: no longer an incoming plan to drop
        abort_incoming(dst, doc)
    with pytest.raises(StateConflict):  # and a second plan for the same VM is refused
        plan_incoming(dst, doc)


def test_a_target_without_a_device_is_not_confirmed(source: Any) -> None:
    src, dst, qemu = source
    doc = run(outgoing(src, qemu, "vm1"))
    plan_incoming(dst, doc)
    target = target_qemu(doc)
    missing = doc["state"]["devices"][1]["id"]
    del target.devices[missing]
    with pytest.raises(MigrationMismatch) as mismatch:
        run(confirm_incoming(dst, target.answering, doc))
    assert mismatch.value.devices == [missing]
    assert abort_incoming(dst, doc) and not dst.has_vm("vm1")
    with pytest.raises(UnknownVM):
        abort_incoming(dst, doc)


def test_controllers_come_parents_first_whatever_the_document_order(tmp_path: Any) -> None:
    with Store(tmp_path / "a") as src, Store(tmp_path / "b") as dst:
        plan = run(plan_boot(src, VMSpec("vm1"), [rng(n) for n in range(1, 60)]))  # pci.0 and a bridge fill up
        assert len(plan.controllers) >= 2
        qemu = MigratingQemu()
        qemu.builtin = {}
        doc = {"format": "kvmslots-migration", "version": 1, "store": src.identity, "state": src.export_vm("vm1"),
               "unmanaged": []}
        doc["state"]["controllers"].reverse()
        incoming = plan_incoming(dst, doc)
        seen = {"pci.0"}
        for controller in incoming.controllers:
            assert controller.bus in seen
            seen.add(controller.id)


# --- the source lets go ----------------------------------------------------------------------


def confirmed(doc: dict[str, Any], store: Store) -> IncomingConfirmed:
    """What the target's confirm_incoming returns (its own flow is tested above)."""
    return IncomingConfirmed("vm1", store.identity, tuple(d["id"] for d in doc["state"]["devices"]))


def test_the_source_keeps_its_records_until_qemu_says_completed(source: Any) -> None:
    src, dst, qemu = source
    doc = run(outgoing(src, qemu, "vm1"))
    done = confirmed(doc, dst)
    for status in ("active", "failed", "cancelled", ""):
        qemu.migration = status
        with pytest.raises(MigrationIncomplete) as waiting:
            run(release_outgoing(src, qemu.answering, doc, done))
        assert waiting.value.state == (status or None) and waiting.value.vm == "vm1"
        assert src.has_vm("vm1")
    qemu.migration = "completed"
    released = run(release_outgoing(src, qemu.answering, json.dumps(doc), json.dumps(done.to_json())))
    assert [d.uuid for d in released] == [uid(1), uid(2)]
    assert not src.has_vm("vm1")


def test_a_confirmation_for_another_vm_or_device_set_releases_nothing(source: Any) -> None:
    src, dst, qemu = source
    doc = run(outgoing(src, qemu, "vm1"))
    done = confirmed(doc, dst)
    with pytest.raises(MigrationMismatch):
        run(release_outgoing(src, qemu.answering, doc, IncomingConfirmed("vm2", dst.identity, done.devices)))
    with pytest.raises(MigrationMismatch) as fewer:
        run(release_outgoing(src, qemu.answering, doc, IncomingConfirmed("vm1", dst.identity, done.devices[:1])))
    assert fewer.value.devices == [done.devices[1]]
    for bad in ("{", {"format": "kvmslots-migration-confirmation"}, {**done.to_json(), "devices": "all"},
                {**done.to_json(), "version": True}):
        with pytest.raises(StateImportError):
            run(release_outgoing(src, qemu.answering, doc, bad))
    assert len(src.devices("vm1")) == 2 and qemu.answering.executed == []


def test_a_device_added_after_the_document_keeps_the_source(source: Any) -> None:
    src, dst, qemu = source
    doc = run(outgoing(src, qemu, "vm1"))
    late = run(hot_add(src, qemu, "vm1", rng(3)))
    with pytest.raises(MigrationMismatch) as mismatch:
        run(release_outgoing(src, qemu.answering, doc, confirmed(doc, dst)))
    assert mismatch.value.devices == [late.qemu_id]
    assert len(src.devices("vm1")) == 3


# --- one store on both ends (hosts on one PostgreSQL state; two QEMUs of one host) ------------


def test_a_store_shared_by_source_and_target_keeps_its_records_throughout(source: Any) -> None:
    src, _, qemu = source
    doc = run(outgoing(src, qemu, "vm1"))
    assert doc["store"] == src.identity
    again = Store(src.location if src.shared else src.state_dir)  # another connection, the same database
    try:
        assert again.identity == src.identity
        before = again.export_vm("vm1")
        plan = plan_incoming(again, doc)  # nothing written: the records are already here
        assert [d.qemu_id for d in plan.devices] == [d["id"] for d in doc["state"]["devices"]]
        assert again.export_vm("vm1") == before
        assert abort_incoming(again, doc) == [] and again.export_vm("vm1") == before  # the source's, kept
        done = run(confirm_incoming(again, target_qemu(doc).answering, doc))
        assert done.report is not None and not done.report.changed and done.store == src.identity
        assert run(release_outgoing(src, qemu.answering, doc, done)) == []  # kept: they describe the target now
        assert again.export_vm("vm1") == before
        run(hot_add(src, qemu, "vm1", rng(3)))
        with pytest.raises(MigrationMismatch) as stale:  # a document older than the shared records
            plan_incoming(again, doc)
        assert stale.value.devices == [f"rng-{uid(3)[:8]}-pci-6"]
    finally:
        again.close()


def test_different_stores_have_different_identities(state_location: str, tmp_path: Any) -> None:
    with Store(state_location) as one, Store(tmp_path / "other") as two:
        assert one.identity != two.identity
        assert one.identity.split(":")[0] == ("postgresql" if one.shared else "sqlite")

"""Reconcile: compare our records with QEMU's live view and repair what a crash or a lost event left."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import QemuCommandError, UnplugGuestError
from ..model import Device, DeviceState
from ..monitor import KeepsConnectionFacts, MonitorLike, validate_timeout
from ..passthrough import HostDevices
from ..pciview import PciOccupancy
from ..store import Store, Transaction
from ..topology import Topology
from .common import UnplugRecorder, forget_all, group_of, log, removed_from_view, require_host, topology, unplug_taken


@dataclass
class ReconcileReport:
    """What :func:`reconcile` found and repaired; lists of QEMU ids unless said."""

    vm: str
    attached: list[str] = field(default_factory=list)  # attaching/planned and present -> attached
    released: list[str] = field(default_factory=list)  # attaching or detaching and gone -> slot freed
    lost: list[str] = field(default_factory=list)  # attached but gone -> slot freed (someone removed it)
    pending: list[str] = field(default_factory=list)  # detaching, still present, QEMU has the unplug request
    resent: list[str] = field(default_factory=list)  # detaching but device_del never reached QEMU: sent now
    # (a resent unplug the guest confirms within reconcile's unplug_wait is also in ``released``)
    restored: list[str] = field(default_factory=list)  # detaching, QEMU refuses the unplug: back to attached
    not_running: list[str] = field(default_factory=list)  # planned and absent (VM not booted with it yet)
    misplaced: list[str] = field(default_factory=list)  # present at another bus/slot than recorded
    unverified: list[str] = field(default_factory=list)  # QEMU has it but shows it on no bus right now
    host_freed: list[str] = field(default_factory=list)  # host devices claimed for a guest device never recorded
    unknown: list[dict[str, Any]] = field(default_factory=list)  # live devices we did not place

    @property
    def changed(self) -> bool:
        """Did reconcile change a record (``attached``, ``released``, ``lost``, ``resent``, ``restored``)?
        The lists that only report (``pending``, ``misplaced``, ``unknown``, ...) do not count."""
        return bool(self.attached or self.released or self.lost or self.resent or self.restored)

    def to_json(self) -> dict[str, Any]:
        """Every list under its field name, as ``reconcile --json`` prints it."""
        return {
            "vm": self.vm,
            "attached": self.attached,
            "released": self.released,
            "lost": self.lost,
            "pending": self.pending,
            "resent": self.resent,
            "restored": self.restored,
            "not_running": self.not_running,
            "misplaced": self.misplaced,
            "unverified": self.unverified,
            "host_freed": self.host_freed,
            "unknown": self.unknown,
        }


async def reconcile(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    *,
    host: HostDevices | None = None,
    unplug_wait: float = 0.0,
) -> ReconcileReport:
    """Compare our records with QEMU's live view and repair what a crash or a lost event left.

    ===========================  ===========================  ====================================
    record                       QEMU                         action (report list)
    ===========================  ===========================  ====================================
    planned / attaching          present at its slot          -> attached (``attached``)
    planned                      absent                       none (``not_running``)
    attaching                    absent                       slot freed (``released``)
    attached                     absent                       slot freed (``lost``)
    detaching                    absent                       slot freed (``released``)
    detaching, unplug requested  present                      none, the guest decides (``pending``)
    detaching, never sent        present                      ``device_del`` sent now (``resent``)
    detaching, never sent        present, unplug refused      -> attached (``restored``)
    attaching group              function 0 absent, others    they are unplugged (``resent``, then
                                 present                      ``released`` once QEMU confirms)
    any                          present elsewhere            none (``misplaced``)
    any                          on no bus (unnumbered)       none (``unverified``)
    ===========================  ===========================  ====================================

    "Never sent" is a detach that died between recording ``detaching`` and
    QEMU taking its ``device_del``: the user asked for the removal, so it is
    finished (and confirmed if the guest ejects within *unplug_wait* seconds).
    Live devices we do not know are reported (``unknown``; hot_add treats
    their slots as taken anyway).  It holds the VM's lock, so an operation
    still under way in another process is never mistaken for one a crash left
    behind.  With *host*, passthrough devices follow: released ones free their
    host device, newly attached ones turn their host claim into an allocation.
    """
    unplug_wait = validate_timeout(unplug_wait, "unplug_wait")
    async with store.vm_lock(vm):
        before = {d.qemu_id: d for d in store.devices(vm)}
        require_host(vm, before.values(), host, "reconcile")
        view = await monitor.pci()
        if isinstance(monitor, KeepsConnectionFacts):
            monitor.placement_view = view  # the freshest view there is
        report, unsent = _reconcile_view(store, vm, view)
        try:
            for group, taken in unsent:
                await _resend_unplug(store, monitor, vm, group, taken, unplug_wait, report)
        finally:  # records already released free their host devices even if QEMU fails us now
            if host is not None:
                for qid in report.released + report.lost:
                    host.release_guest_device(vm, before[qid])
                # every passthrough device QEMU has must hold an allocation, including one whose
                # process died between committing 'attached' and allocating
                for device in store.devices(vm):
                    if device.state is DeviceState.ATTACHED:
                        host.allocate_guest_device(vm, device)
                report.host_freed = host.free_orphan_claims(vm, {d.uuid for d in store.devices(vm)})
        return report


class Live(str, enum.Enum):
    """What QEMU shows of one recorded device."""

    PRESENT = "present"  # at the bus, slot and function we recorded
    ABSENT = "absent"  # QEMU does not have it at all
    ELSEWHERE = "elsewhere"  # QEMU has it at another place
    UNPLACED = "unplaced"  # QEMU has it but shows it on no bus (an unnumbered bridge, a paused VM)


class Action(str, enum.Enum):
    """What :func:`reconcile` does with one record; each value names the report list it lands in."""

    ATTACH = "attached"  # -> attached
    NOT_RUNNING = "not_running"  # nothing to do: the VM was not booted with it yet
    RELEASE = "released"  # forget the record, slot free
    LOSE = "lost"  # forget the record: someone removed it
    PENDING = "pending"  # the guest decides
    RESEND = "resent"  # device_del never reached QEMU: send it now (decided outside the transaction)
    MISPLACED = "misplaced"  # report only
    UNVERIFIED = "unverified"  # report only


#: The table of :func:`reconcile`: (record state, unplug requested, what QEMU shows) -> action.
#: ``None`` for "requested" means either.
_TABLE: dict[tuple[DeviceState, bool | None, Live], Action | None] = {
    **{(state, None, Live.PRESENT): Action.ATTACH for state in (DeviceState.PLANNED, DeviceState.ATTACHING)},
    (DeviceState.ATTACHED, None, Live.PRESENT): None,  # as recorded
    (DeviceState.PLANNED, None, Live.ABSENT): Action.NOT_RUNNING,
    (DeviceState.ATTACHING, None, Live.ABSENT): Action.RELEASE,
    (DeviceState.ATTACHED, None, Live.ABSENT): Action.LOSE,
    (DeviceState.DETACHING, None, Live.ABSENT): Action.RELEASE,
    (DeviceState.DETACHING, True, Live.PRESENT): Action.PENDING,
    (DeviceState.DETACHING, False, Live.PRESENT): Action.RESEND,
    **{(state, None, Live.ELSEWHERE): Action.MISPLACED for state in DeviceState},
    **{(state, None, Live.UNPLACED): Action.UNVERIFIED for state in DeviceState},
}


def _action(state: DeviceState, requested: bool, live: Live) -> Action | None:
    key = (state, requested, live)
    return _TABLE[key] if key in _TABLE else _TABLE[(state, None, live)]


def _reconcile_view(
    store: Store, vm: str, view: PciOccupancy
) -> tuple[ReconcileReport, list[tuple[list[Device], list[Device]]]]:
    """The table of :func:`reconcile`, in one transaction; returns the detaching slots whose unplug
    never reached QEMU (they need QEMU again, outside the transaction)."""
    report = ReconcileReport(vm)
    unsent: list[tuple[list[Device], list[Device]]] = []
    with store.transaction() as txn:
        vm_spec = txn.get_vm(vm)
        topo = topology(txn, vm_spec, view)
        devices = txn.devices(vm)
        requested = txn.unplug_requested(vm)
        orphans = _orphan_groups(devices, view, topo)
        for group in orphans:  # a group add that died before function 0: undone, not promoted
            for device in group:
                txn.set_state(vm, device.uuid, DeviceState.DETACHING)
            detaching = [d.with_state(DeviceState.DETACHING) for d in group]
            unsent.append((detaching, [d for d in detaching if live_state(d, view, topo) is Live.PRESENT]))
        orphaned = {d.uuid for group in orphans for d in group}
        for device in devices:
            if device.uuid in orphaned:
                continue
            action = _action(device.state, device.uuid in requested, live_state(device, view, topo))
            if action is Action.RESEND:
                group = group_of(devices, device)
                if group[0] is device:  # a slot is unplugged once, through its function 0
                    unsent.append((group, group))
            elif action is not None:
                _apply(txn, vm, device, action, report)
        report.unknown = unknown_devices(topo, devices, view)
    return report, unsent


def _orphan_groups(devices: Sequence[Device], view: PciOccupancy, topo: Topology) -> list[list[Device]]:
    """Groups still ``attaching`` whose function 0 QEMU does not have but some other function it has.

    A hot add plugs function 0 last; a process that died before it leaves functions the guest can
    never see (it finds a slot by its function 0).  They are not attached: reconcile unplugs them.
    """
    orphans = []
    for device in devices:
        if not (device.function == 0 and device.multifunction and device.state is DeviceState.ATTACHING):
            continue
        group = group_of(devices, device)
        if live_state(device, view, topo) is Live.ABSENT and any(
            live_state(d, view, topo) is Live.PRESENT for d in group[1:]
        ):
            orphans.append(group)
    return orphans


def live_state(device: Device, view: PciOccupancy, topo: Topology) -> Live:
    """Where QEMU's live view has the recorded device, against its record (shared with migration's checks)."""
    live = view.find(device.qemu_id)
    if live is None:
        return Live.UNPLACED if view.has(device.qemu_id) else Live.ABSENT
    if (live.bus, live.slot, live.function) != (topo.number(device.bus), device.slot, device.function):
        return Live.ELSEWHERE
    return Live.PRESENT


def _apply(txn: Transaction, vm: str, device: Device, action: Action, report: ReconcileReport) -> None:
    if action is Action.ATTACH:
        txn.set_state(vm, device.uuid, DeviceState.ATTACHED)
    elif action in (Action.RELEASE, Action.LOSE):
        txn.remove_device(vm, device.uuid)
    getattr(report, action.value).append(device.qemu_id)


async def _resend_unplug(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    group: list[Device],
    taken: list[Device],
    wait: float,
    report: ReconcileReport,
) -> None:
    """Finish a detach whose ``device_del`` never reached QEMU (the process died first), or undo
    an orphaned group add (*taken*: the functions QEMU has; without their function 0 they are
    unplugged one by one)."""
    first = group[0]
    recorder = UnplugRecorder(store, vm, [d.uuid for d in group])
    try:
        deleted = await unplug_taken(monitor, taken, wait, recorder)
    except (QemuCommandError, UnplugGuestError) as exc:
        if isinstance(exc, QemuCommandError) and exc.error_class == "DeviceNotFound":
            deleted = True
        else:  # QEMU or the guest will not unplug it (e.g. a bus without hotplug): it stays, and is ours
            log.warning("Unplug of %s refused during reconcile: %s", first.qemu_id, exc.qemu_message)
            report.restored += _restore_detaching(store, vm, group)
            return
    if recorder.sent and not recorder.already:
        report.resent += [d.qemu_id for d in group]  # said even when the eject follows at once
    if deleted:
        forget_all(store, vm, [d.with_state(DeviceState.DETACHING) for d in group])
        removed_from_view(monitor, [d.qemu_id for d in group])
        report.released += [d.qemu_id for d in group]
    elif recorder.already:
        report.pending += [d.qemu_id for d in group]


def _restore_detaching(store: Store, vm: str, group: list[Device]) -> list[str]:
    """Back to ``attached``: the members still stored as ``detaching`` (a member released earlier in
    the same pass is not brought back)."""
    restored = []
    with store.transaction() as txn:
        for device in group:
            current = txn.find_device(vm, device.uuid)
            if current is not None and current.state is DeviceState.DETACHING:
                txn.set_state(vm, device.uuid, DeviceState.ATTACHED)
                restored.append(device.qemu_id)
    return restored


def unknown_devices(topo: Topology, devices: Sequence[Device], view: PciOccupancy) -> list[dict[str, Any]]:
    """Live functions nobody told us about: not our devices or controllers, not the machine's built-ins."""
    ours = {device.qemu_id for device in devices} | {c.id for c in topo.controllers}
    unknown = []
    for function in view.functions:
        if function.qdev_id and function.qdev_id in ours:
            continue
        if topo.is_builtin(function.bus, function.slot):
            continue
        unknown.append(
            {
                "bus": function.bus,
                "slot": function.slot,
                "function": function.function,
                "qdev_id": function.qdev_id,
                "description": function.description,
            }
        )
    return unknown

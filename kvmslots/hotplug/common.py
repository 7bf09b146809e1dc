"""What boot, add, remove and reconcile share: records, the topology they place through, undo helpers."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Iterable, Mapping, Sequence

from ..devid import coerce_props, is_passthrough_driver
from ..errors import DeviceExists, InvalidDriver, InvalidPciRequest, QemuCommandError, StateError
from ..model import Controller, Device, DeviceGroup, DeviceSpec, DeviceState, VMSpec
from ..monitor import KeepsConnectionFacts, MonitorLike, TypesProperties
from ..passthrough import HostDevices, PassthroughSpec, is_passthrough
from ..pciview import PciFunction, PciOccupancy
from ..store import Store, Transaction
from ..topology import Topology

log = logging.getLogger("kvmslots.hotplug")

#: How often a hot add chooses again when a slot it chose was taken behind its back meanwhile.
RACE_RETRIES = 3
#: QEMU's message when device_add hits a taken slot (``PCI: slot 5 function 0 not available for ...``).
SLOT_TAKEN_TEXT = "not available for"

Unit = DeviceSpec | DeviceGroup


def device_arguments(controllers: Iterable[Controller], devices: Iterable[Device]) -> list[str]:
    """``-device`` arguments for QEMU's command line: the controllers first (a device's bus must exist
    before it; they come parents first), then the devices."""
    args: list[str] = []
    for controller in controllers:
        args += ["-device", controller.device_option()]
    for device in devices:
        args += ["-device", device.device_option()]
    return args


def members(unit: Unit) -> tuple[DeviceSpec, ...]:
    """The specs of a unit: a group's members in function order, or the one device."""
    return unit.members if isinstance(unit, DeviceGroup) else (unit,)


def unit_devices(unit: Unit, bus: str, slot: int, state: DeviceState) -> list[Device]:
    """The records of a placed unit: one device, or a group's functions 0.. (0 with multifunction)."""
    if isinstance(unit, DeviceSpec):
        return [Device.from_spec(unit, bus, slot, state)]
    return [
        Device.from_spec(spec, bus, slot, state, function, multifunction=function == 0)
        for function, spec in enumerate(unit.members)
    ]


def check_unique_uuids(units: Iterable[Unit]) -> None:
    """Refuse a device list that names one UUID twice (within a group or across units) with
    :class:`DeviceExists`, before anything is reserved."""
    seen: set[str] = set()
    for unit in units:
        for spec in members(unit):
            if spec.uuid in seen:
                raise DeviceExists(f"Device UUID {spec.uuid} is listed twice")
            seen.add(spec.uuid)


def check_unique_ids(devices: Sequence[Device]) -> None:
    """Refuse records of which two would get one QEMU id (same type, first UUID group and slot) with
    :class:`DeviceExists`."""
    seen: set[str] = set()
    for device in devices:
        if device.qemu_id in seen:
            raise DeviceExists(
                f"Two devices would get the id {device.qemu_id} (same type, first UUID group and slot)"
            )
        seen.add(device.qemu_id)


def group_of(devices: Iterable[Device], device: Device) -> list[Device]:
    """*device* and the other functions of its multifunction slot (function 0 first)."""
    if not device.in_group:
        return [device]
    same = [d for d in devices if d.bus == device.bus and d.slot == device.slot and d.in_group]
    return sorted(same, key=lambda d: d.function)


def topology(
    txn: Transaction,
    vm: VMSpec,
    view: PciOccupancy | None = None,
    hotplug: Mapping[str, str | None] | None = None,
) -> Topology:
    """The VM's topology with every holder applied: mask, controllers, our records, QEMU's view."""
    topo = Topology(vm, txn.controllers(vm.name))
    if view is not None:  # first, so that buses QEMU shows get their kind (a port has one slot) from QEMU
        topo.occupy_live(view)
    topo.occupy_devices(txn.devices(vm.name))
    for bus, reason in (hotplug or {}).items():
        topo.set_hotplug(bus, reason)
    return topo


def require_host(vm: str, devices: Iterable[Device], host: HostDevices | None, what: str) -> None:
    """Passthrough records must not be dropped without freeing their host devices."""
    if host is None and any(is_passthrough(d) for d in devices):
        raise InvalidPciRequest(f"VM {vm!r} has passthrough devices: {what} needs host=HostDevices(tracker)")


def refuse_raw_passthrough(spec: DeviceSpec | PassthroughSpec | DeviceGroup) -> None:
    """A host device reaches a guest only through the tracker (PassthroughSpec), never directly."""
    for member in spec.members if isinstance(spec, DeviceGroup) else (spec,):
        if isinstance(member, DeviceSpec) and is_passthrough_driver(member.driver):
            raise InvalidDriver(
                f"Driver {member.driver!r} passes a host device through: use PassthroughSpec so the tracker claims it"
            )


async def typed(monitor: MonitorLike, spec: DeviceSpec) -> DeviceSpec:
    """*spec* with text values of integer properties turned into integers, as QEMU types them.

    Only asked of QEMU (``device-list-properties``, once per model and
    connection) when some text value has a digit in it; everything else stays
    the text it was given as.  A model QEMU does not know is left to
    ``device_add`` to refuse, with QEMU's own message.
    """
    numbers = any(isinstance(v, str) and any(c.isdigit() for c in v) for v in spec.props.values())
    if not numbers or not isinstance(monitor, TypesProperties):
        return spec
    try:
        types = await monitor.property_types(spec.driver)
    except QemuCommandError:
        return spec
    return replace(spec, props=coerce_props(spec.props, types))


async def typed_unit(monitor: MonitorLike, unit: Unit) -> Unit:
    """:func:`typed` for a unit: every member of a group typed, the group's place kept."""
    if isinstance(unit, DeviceSpec):
        return await typed(monitor, unit)
    return replace(unit, members=tuple([await typed(monitor, m) for m in unit.members]))


def describe_live(functions: list[PciFunction]) -> str:
    """What QEMU shows at a place, for messages: the first function's description and id (*functions* empty: a
    generic name)."""
    if not functions:
        return "a device QEMU shows"
    first = functions[0]
    name = f"id {first.qdev_id!r}" if first.qdev_id else "no id"
    return f"{first.description or 'a device'} in QEMU ({name})"


def find(store: Store, vm: str, uuid: str) -> Device | None:
    """The record of device *uuid* of *vm*, read in a read transaction of its own; None when there is none
    (also when the VM is not stored)."""
    with store.reading() as txn:
        return txn.find_device(vm, uuid)


def forget_all(store: Store, vm: str, devices: Iterable[Device]) -> list[Device]:
    """Release records' slots in one transaction, but only records still as we saw them (a caller
    acting on an older read never deletes a newer record); returns those released."""
    with store.transaction() as txn:
        return [d for d in devices if txn.remove_device(vm, d.uuid, expect=d)]


def restore(store: Store, vm: str, uuids: Iterable[str], state: DeviceState, *, unplug_requested: bool = False) -> None:
    """Put the records of *uuids* back into *state* in one transaction (how an undo returns them to where they
    were); a change the state machine refuses is :class:`InvalidTransition` and changes nothing."""
    with store.transaction() as txn:
        for uuid in uuids:
            txn.set_state(vm, uuid, state, unplug_requested=unplug_requested)


class UnplugRecorder:
    """The ``on_sent`` callback of ``device_del``: records that QEMU has the unplug request.

    It never raises: QEMU already has the request, so a database that is busy
    or failing at this moment must not turn a sent unplug into an error that
    says nothing was changed.  The record then only lacks the flag, and
    :func:`reconcile` asks QEMU again (which answers "already in the process
    of unplug").  For a multifunction slot every function is marked.
    """

    def __init__(self, store: Store, vm: str, uuids: str | Sequence[str]) -> None:
        self.store, self.vm = store, vm
        self.uuids = [uuids] if isinstance(uuids, str) else list(uuids)
        self.sent = False
        self.already = False

    def __call__(self, already: bool) -> None:
        self.sent, self.already = True, already
        try:
            with self.store.transaction() as txn:
                for uuid in self.uuids:
                    txn.set_state(self.vm, uuid, DeviceState.DETACHING, unplug_requested=True)
        except StateError as exc:
            log.warning("QEMU has the unplug of %s in %s but it could not be recorded: %s", self.uuids, self.vm, exc)


async def unplug(
    monitor: MonitorLike, qdev_id: str, timeout: float, on_sent: UnplugRecorder, also: Sequence[str] = ()
) -> bool:
    """``device_del`` and its wait; *also* (the other functions of a slot) only when there are any,
    so monitors written before multifunction slots keep working for single devices."""
    if also:
        return await monitor.device_del(qdev_id, timeout, on_sent, also=also)
    return await monitor.device_del(qdev_id, timeout, on_sent)


async def unplug_taken(monitor: MonitorLike, taken: list[Device], timeout: float, recorder: UnplugRecorder) -> bool:
    """Remove what QEMU has of one slot; True when every removal is confirmed.

    An id QEMU does not know (``DeviceNotFound``) counts as removed.
    """
    zero = next((d for d in taken if d.function == 0), None)
    if zero is not None:
        others = [d.qemu_id for d in taken if d is not zero]
        return await _device_del(monitor, zero.qemu_id, timeout, recorder, others)
    done = True
    for device in reversed(taken):  # functions without their function 0: the guest never saw them
        done = await _device_del(monitor, device.qemu_id, timeout, recorder, []) and done
    return done


async def _device_del(
    monitor: MonitorLike, qdev_id: str, timeout: float, recorder: UnplugRecorder, also: list[str]
) -> bool:
    try:
        return await unplug(monitor, qdev_id, timeout, recorder, also)
    except QemuCommandError as exc:
        if exc.error_class != "DeviceNotFound":
            raise
        return True


def removed_from_view(monitor: MonitorLike, qdev_ids: Iterable[str]) -> None:
    """Keep the connection's placement view true after a confirmed removal (see :mod:`.add`)."""
    if isinstance(monitor, KeepsConnectionFacts) and monitor.placement_view is not None:
        monitor.placement_view = monitor.placement_view.without(set(qdev_ids))


def arguments_in_plug_order(devices: Sequence[Device]) -> list[dict[str, Any]]:
    """A group's ``device_add`` arguments, function 0 last: QEMU tells the guest when it arrives."""
    return [d.qmp_arguments() for d in sorted(devices, key=lambda d: (d.function == 0, d.function))]

"""Adopt a running VM that kvmslots did not start: register it from what QEMU shows.

Neither Ganeti nor Proxmox can take over a VM it did not boot; a team moving
to kvmslots has many.  :func:`adopt` reads the VM's live state over QMP (the
machine type from the capability probe, ``query-pci`` for every function and
bridge, QOM for each device's model and each port's or bridge's chassis
number) and records:

* every ``pcie-root-port`` and ``pci-bridge`` with an id and a valid chassis
  number, as a controller: its bus becomes usable for hot add;
* every device whose id is ``<type>-<uuid8>-pci-<slot>`` and whose uuid8 is
  the first group of a UUID the caller names (``uuids``), as that device,
  ``attached``; if it is not at the slot its id says, the id is kept as given;
* everything else as foreign: its slot is reserved in the VM's masks, so it is
  never handed out, today or after the VM is next planned.

Nothing is written until the whole picture is checked (:func:`check_records`).
A VM that is already stored is not changed: adopting twice is a no-op, and
where the records and QEMU disagree the differences are reported (run
:func:`~kvmslots.hotplug.reconcile` to repair what it can).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from ..capabilities import probe
from ..devid import is_passthrough_driver, parse_device_id, uuid8, validate_dev_type, validate_uuid
from ..errors import InvalidDeviceId, QemuCommandError, QemuIncompatible, StateImportError, ValidationError
from ..model import Controller, ControllerKind, Device, DeviceState, VMSpec
from ..monitor import MonitorLike, RunsQmp
from ..pciview import PCIE_PORT_IDS, PciFunction, PciOccupancy
from ..slots import NUM_SLOTS
from ..store import Store
from ..topology import check_records

__all__ = ["AdoptReport", "adopt", "parse_uuids"]

log = logging.getLogger(__name__)

#: QEMU's pci-bridge (vendor, device): the bridges whose chassis_nr kvmslots can read.
_PCI_BRIDGE_IDS = frozenset({(0x1B36, 0x0001)})
_CHASSIS_PROPERTY = {ControllerKind.PCIE_ROOT_PORT: "chassis", ControllerKind.PCI_BRIDGE: "chassis_nr"}


@dataclass
class AdoptReport:
    """What :func:`adopt` found and recorded (ids and ``bus:slot.function`` places)."""

    vm: str
    machine: str
    #: False when the VM was already stored (then nothing was written).
    created: bool
    devices: list[str] = field(default_factory=list)
    controllers: list[str] = field(default_factory=list)
    #: Functions recorded as someone else's (their slots are reserved), as ``bus:slot.function id``.
    foreign: list[str] = field(default_factory=list)
    #: Where an already stored VM's records disagree with QEMU (nothing was changed for them).
    differences: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as ``adopt --json`` prints it: every field, the lists as recorded."""
        return {
            "vm": self.vm, "machine": self.machine, "created": self.created, "devices": self.devices,
            "controllers": self.controllers, "foreign": self.foreign, "differences": self.differences,
        }


def parse_uuids(document: Any) -> dict[str, str | None]:
    """``--uuids``: a JSON list of UUIDs, or of ``{"uuid": ..., "type": ...}`` objects; uuid -> type (None: any).

    :class:`StateImportError` names the first bad entry; two UUIDs sharing
    their first group are refused, since a device id could not tell them apart.
    """
    if not isinstance(document, list):
        raise StateImportError(
            "The UUID list must be a JSON list of UUIDs or of {\"uuid\": ..., \"type\": ...} objects"
        )
    found: dict[str, str | None] = {}
    for index, entry in enumerate(document):
        where = f"uuids[{index}]"
        try:
            if isinstance(entry, Mapping):
                unknown = set(entry) - {"uuid", "type"}
                if unknown or "uuid" not in entry:
                    raise ValidationError(
                        f"an object has 'uuid' and optionally 'type', got keys {sorted(map(str, entry))}"
                    )
                uuid, dev_type = validate_uuid(entry["uuid"]), entry.get("type")
                if dev_type is not None:
                    validate_dev_type(dev_type)
            else:
                uuid, dev_type = validate_uuid(entry), None
        except ValidationError as exc:
            raise StateImportError(f"Bad entry {where}: {exc}") from None
        if any(uuid8(other) == uuid8(uuid) for other in found):
            raise StateImportError(f"{where}: {uuid} shares its first group with another UUID of the list")
        found[uuid] = dev_type
    return found


async def adopt(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    uuids: Mapping[str, str | None] | Iterable[str] = (),
    *,
    mask: str = "",
    reserve_slots: int | None = None,
) -> AdoptReport:
    """Register running VM *vm* from its live state (see the module's docstring).

    *uuids* are the device UUIDs the caller knows (a mapping to their device
    types, or just UUIDs); *mask* or *reserve_slots* reserve root-bus slots
    on top of what QEMU shows taken (default: the machine's built-ins).
    """
    known = dict(uuids) if isinstance(uuids, Mapping) else {validate_uuid(u): None for u in uuids}
    caps = await probe(monitor)
    machine = caps.machine if caps is not None else None
    if machine is None:
        raise QemuIncompatible(
            f"Cannot adopt VM {vm!r}: QEMU does not say its machine type (qom-get /machine type failed)"
        )
    view = await monitor.pci()
    async with store.vm_lock(vm):
        spec, controllers, devices, foreign = await _picture(monitor, vm, machine, view, known, mask, reserve_slots)
        report = AdoptReport(vm, spec.machine, created=False)
        report.controllers = [c.id for c in controllers]
        report.devices = [d.qemu_id for d in devices]
        report.foreign = foreign
        with store.transaction() as txn:
            stored = txn.find_vm(vm)
            if stored is not None:
                report.differences = _differences(
                    stored, txn.controllers(vm), txn.devices(vm), spec, controllers, devices
                )
                return report
            try:
                check_records(spec, controllers, devices)
            except (ValidationError, ValueError) as exc:
                raise StateImportError(f"VM {vm!r} as QEMU shows it cannot be recorded: {exc}") from None
            txn.put_vm(spec)
            for controller in controllers:
                txn.add_controller(vm, controller)
            for device in devices:
                txn.add_device(vm, device)
        report.created = True
    log.info("Adopted VM %s: %d device(s), %d controller(s), %d foreign function(s)",
             vm, len(devices), len(controllers), len(foreign))
    return report


async def _picture(
    monitor: MonitorLike,
    vm: str,
    machine: str,
    view: PciOccupancy,
    known: Mapping[str, str | None],
    mask: str,
    reserve_slots: int | None,
) -> tuple[VMSpec, list[Controller], list[Device], list[str]]:
    """The VM as QEMU shows it: its spec (masks with the foreign slots), controllers and devices."""
    base = VMSpec(vm, machine, mask, reserve_slots=reserve_slots)
    names = {0: base.root_bus}
    for function in view.functions:  # bridges and ports name the bus behind them after their id
        if function.secondary_bus and function.qdev_id:
            names[function.secondary_bus] = function.qdev_id
    by_uuid8 = {uuid8(u): u for u in known}
    controllers: list[Controller] = []
    devices: list[Device] = []
    reserved: dict[str, set[int]] = {}
    foreign: list[str] = []
    chassis_seen: set[int] = set()
    for function in sorted(view.functions, key=lambda f: (f.bus, f.slot, f.function)):
        bus = names.get(function.bus)
        where = f"{bus or f'bus {function.bus}'}:{function.slot:#x}.{function.function}"
        if bus is None:  # behind a bridge the firmware has not numbered: nothing to record on it
            foreign.append(f"{where} {function.qdev_id or function.description}")
            continue
        controller = await _controller(monitor, function, bus, chassis_seen)
        if controller is not None:
            controllers.append(controller)
            chassis_seen.add(controller.chassis)
            continue
        device = await _device(monitor, function, bus, known, by_uuid8)
        if device is not None:
            devices.append(device)
            continue
        reserved.setdefault(bus, set()).add(function.slot)
        foreign.append(f"{where} {function.qdev_id or function.description or '(no id)'}")
    _mark_groups(devices)
    root_mask = _with_slots(base.mask, reserved.pop(base.root_bus, set()))
    bus_masks = {bus: _with_slots(base.bus_masks.get(bus, ""), slots) for bus, slots in reserved.items()}
    return VMSpec(vm, machine, root_mask, bus_masks, hotplug_ports=0), controllers, devices, foreign


async def _controller(
    monitor: MonitorLike, function: PciFunction, bus: str, chassis_seen: set[int]
) -> Controller | None:
    """A port or bridge with an id and a readable, unused chassis number; None for anything else."""
    if function.secondary_bus is None or not function.qdev_id:
        return None
    ids = (function.vendor, function.device)
    kind = (
        ControllerKind.PCIE_ROOT_PORT if ids in PCIE_PORT_IDS
        else ControllerKind.PCI_BRIDGE if ids in _PCI_BRIDGE_IDS
        else None
    )
    if kind is None:
        return None
    chassis = await _qom(monitor, function.qdev_id, _CHASSIS_PROPERTY[kind])
    if not isinstance(chassis, int) or isinstance(chassis, bool) or chassis in chassis_seen:
        return None
    try:
        return Controller(function.qdev_id, kind, bus, function.slot, function.function, chassis)
    except ValidationError as exc:
        log.info("Not adopting %s as a %s: %s", function.qdev_id, kind, exc)
        return None


async def _device(
    monitor: MonitorLike,
    function: PciFunction,
    bus: str,
    known: Mapping[str, str | None],
    by_uuid8: Mapping[str, str],
) -> Device | None:
    """One of the caller's devices (its id names a known UUID); None for anyone else's."""
    if not function.qdev_id or function.secondary_bus is not None:
        return None
    try:
        dev_type, first, slot = parse_device_id(function.qdev_id)
    except InvalidDeviceId:
        return None
    uuid = by_uuid8.get(first)
    if uuid is None or known[uuid] not in (None, dev_type):
        return None
    driver = await _qom(monitor, function.qdev_id, "type")
    if not isinstance(driver, str) or is_passthrough_driver(driver):
        # a host device belongs to its host's tracker: it is reserved here, never recorded as ours
        return None
    given = None if slot == function.slot else function.qdev_id  # an id that no longer says its slot
    try:
        return Device(uuid, dev_type, driver, {}, bus, function.slot, DeviceState.ATTACHED, function.function,
                      False, given)
    except ValidationError as exc:
        log.info("Not adopting %s: %s", function.qdev_id, exc)
        return None


def _mark_groups(devices: list[Device]) -> None:
    """Function 0 of a slot that has other functions is a multifunction group's head."""
    shared = {(d.bus, d.slot) for d in devices if d.function != 0}
    for index, device in enumerate(devices):
        if device.function == 0 and (device.bus, device.slot) in shared:
            devices[index] = replace(device, multifunction=True)


async def _qom(monitor: MonitorLike, qdev_id: str, prop: str) -> Any:
    if not isinstance(monitor, RunsQmp):
        return None
    try:
        return await monitor.execute("qom-get", {"path": f"/machine/peripheral/{qdev_id}", "property": prop})
    except QemuCommandError:
        return None


def _with_slots(mask: str, slots: set[int]) -> str:
    bits = list(mask or "0" * NUM_SLOTS)
    for slot in slots:
        bits[slot] = "1"
    return "".join(bits)


def _differences(
    stored: VMSpec,
    stored_controllers: list[Controller],
    stored_devices: list[Device],
    live: VMSpec,
    controllers: list[Controller],
    devices: list[Device],
) -> list[str]:
    """How the records of an adopted VM differ from what QEMU shows now."""
    found: list[str] = []
    if stored.family is not live.family:
        found.append(f"machine: stored {stored.machine}, QEMU runs {live.machine}")
    live_devices = {d.qemu_id: d for d in devices}
    for device in stored_devices:
        now = live_devices.pop(device.qemu_id, None)
        if now is None:
            found.append(f"{device.qemu_id}: {device.state.value} in the records, not in QEMU")
        elif (now.bus, now.slot, now.function) != (device.bus, device.slot, device.function):
            found.append(
                f"{device.qemu_id}: recorded at {device.bus}:{device.slot:#x}.{device.function}, "
                f"QEMU has it at {now.bus}:{now.slot:#x}.{now.function}"
            )
    found += [f"{qemu_id}: in QEMU, not in the records" for qemu_id in sorted(live_devices)]
    stored_ids = {c.id for c in stored_controllers}
    live_ids = {c.id for c in controllers}
    found += [f"{c}: recorded controller QEMU does not have" for c in sorted(stored_ids - live_ids)]
    found += [f"{c}: controller in QEMU, not in the records" for c in sorted(live_ids - stored_ids)]
    return found


"""Boot planning: every device of a VM about to start gets its bus, slot and id, and is persisted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import InvalidPciRequest, StateConflict
from ..model import Controller, Device, DeviceGroup, DeviceSpec, DeviceState, VMSpec
from ..passthrough import HostDevices, PassthroughSpec, is_passthrough
from ..store import Store
from ..topology import Topology
from .common import (
    Unit,
    check_unique_ids,
    check_unique_uuids,
    device_arguments,
    members,
    refuse_raw_passthrough,
    require_host,
    unit_devices,
)


@dataclass(frozen=True)
class BootPlan:
    """The result of :func:`plan_boot`: devices with slots, the controllers they sit behind, QEMU's arguments."""

    vm: VMSpec
    devices: tuple[Device, ...]
    dropped: tuple[Device, ...] = ()
    controllers: tuple[Controller, ...] = ()

    @property
    def qemu_args(self) -> list[str]:
        """``["-device", "pcie-root-port,...", "-device", "virtio-net-pci,id=nic-9f3c2a1b-pci-0,bus=...", ...]``.

        Controllers come first (a device's bus must exist before it), parents before children.
        """
        return device_arguments(self.controllers, self.devices)


async def plan_boot(
    store: Store,
    vm: VMSpec | str,
    devices: Sequence[DeviceSpec | DeviceGroup | PassthroughSpec],
    *,
    host: HostDevices | None = None,
) -> BootPlan:
    """Give every device of a VM that is about to boot its place, and persist the plan.

    A device keeps the bus and slot stored for it (or those its spec asks
    for); a stored place that the mask reserves or another device holds is an
    error.  The others are placed by machine type, in the order given: on
    ``pc`` the first free slot of ``pci.0``, then of the bridges (a full bus
    gives its last slot to a new ``pci-bridge``); on ``q35`` each device gets
    its own ``pcie-root-port`` at slot 0, and ``hotplug_ports`` spare ports
    are kept.  A :class:`DeviceGroup` takes one slot as functions 0-7.  The
    list is the VM's whole device set: stored devices not in it are dropped
    (controllers stay, so ids and numbers never change).  Planning the same
    devices again gives the same places, ids and arguments.

    A :class:`PassthroughSpec` keeps the host device it already holds, or
    claims one through *host*; its ``-device vfio-pci,...,host=<address>``
    argument is emitted like any other.  If planning fails, the claims it
    made are freed again.
    """
    name = vm if isinstance(vm, str) else vm.name
    async with store.vm_lock(name):
        stored = {d.uuid: d for d in store.devices(name)} if store.has_vm(name) else {}
        require_host(name, stored.values(), host, "plan_boot")
        units: list[Unit] = []
        new_claims: list[str] = []
        try:
            for spec in devices:
                refuse_raw_passthrough(spec)
                if isinstance(spec, PassthroughSpec):
                    address = _host_for_boot(name, spec, stored.get(spec.uuid), host, new_claims)
                    units.append(spec.guest_spec(address))
                else:
                    units.append(spec)
            plan = _plan_boot(store, vm, units)
        except BaseException:
            for address in new_claims:
                assert host is not None
                host.release(name, address)
            raise
        if host is not None:
            for device in plan.dropped:
                host.release_guest_device(name, device)
        return plan


def _host_for_boot(
    vm: str, spec: PassthroughSpec, stored: Device | None, host: HostDevices | None, new_claims: list[str]
) -> str:
    """The host address a passthrough device boots with: the one it holds, or a new claim."""
    if host is None:
        raise InvalidPciRequest(
            f"Passthrough device {spec.uuid} needs host=HostDevices(tracker) to claim a host device"
        )
    if stored is not None and is_passthrough(stored):
        address = str(stored.props["host"])
        held = host.tracker.get_instance_pci_devs(vm, spec.uuid)
        if [d.address for d in held] == [address]:
            return address
    address = host.claim(vm, spec).address
    new_claims.append(address)
    return address


def _stored_place(unit: Unit, stored: dict[str, Device]) -> tuple[str, int] | None:
    """Where the unit already is, if it is stored as the same shape (and where its spec does not say otherwise)."""
    found = [stored.get(spec.uuid) for spec in members(unit)]
    if any(d is None for d in found):
        return None
    first = found[0]
    assert first is not None
    if unit.bus is not None and unit.bus != first.bus:
        return None
    if isinstance(unit, DeviceGroup):
        shape = [(d.bus, d.slot, d.function) for d in found if d is not None]
        if shape != [(first.bus, first.slot, f) for f in range(len(found))] or not first.multifunction:
            return None
    elif first.in_group:
        return None
    if unit.slot is not None and unit.slot != first.slot:
        raise StateConflict(
            f"Device {unit.uuid} asks for slot {unit.slot} but is stored at slot {first.slot} ({first.qemu_id})"
        )
    return first.bus, first.slot


def _plan_boot(store: Store, vm: VMSpec | str, units: list[Unit]) -> BootPlan:
    check_unique_uuids(units)
    with store.transaction() as txn:
        if isinstance(vm, str):
            vm = txn.get_vm(vm)
        else:
            old = txn.find_vm(vm.name)
            if old is not None and old.family is not vm.family and (txn.devices(vm.name) or txn.controllers(vm.name)):
                raise StateConflict(
                    f"VM {vm.name!r} is planned for a {old.machine!r} machine; its slots mean nothing on "
                    f"{vm.machine!r}: delete the VM's state first to plan it afresh"
                )
        stored = {device.uuid: device for device in txn.devices(vm.name)}
        controllers = txn.controllers(vm.name)
        topo = Topology(vm, controllers)
        places: dict[int, tuple[str, int]] = {}
        for index, unit in enumerate(units):  # first the units whose place is fixed
            fixed = _stored_place(unit, stored)
            if fixed is None and unit.bus is not None and unit.slot is not None:
                fixed = (unit.bus, unit.slot)
            if fixed is not None:
                place = topo.place(len(members(unit)), bus=fixed[0], slot=fixed[1], holder=unit.uuid)
                places[index] = (place.bus, place.slot)
        topo.ensure_spare_bridge()
        remaining = len(units) - len(places)
        for index, unit in enumerate(units):  # then the rest, in order
            if index not in places:
                place = topo.place(
                    len(members(unit)), bus=unit.bus, slot=unit.slot, remaining=remaining, holder=unit.uuid
                )
                places[index] = (place.bus, place.slot)
                remaining -= 1
        topo.ensure_spare_ports()
        planned = [d for i, unit in enumerate(units) for d in unit_devices(unit, *places[i], DeviceState.PLANNED)]
        check_unique_ids(planned)
        kept = {d.uuid for d in planned}
        dropped = [device for uuid, device in stored.items() if uuid not in kept]
        txn.put_vm(vm)
        for device in stored.values():
            txn.remove_device(vm.name, device.uuid)
        known = {c.id for c in controllers}
        for controller in topo.controllers:
            if controller.id not in known:
                txn.add_controller(vm.name, controller)
        for device in planned:
            txn.add_device(vm.name, device)
    return BootPlan(vm, tuple(planned), tuple(dropped), tuple(topo.controllers))

"""Where a device goes: the VM's PCI buses, what holds each slot and function, and how to grow.

Every caller that places or checks a device (boot planning, hot add, show,
import, reconcile) builds one :class:`Topology` and asks it, so they cannot
disagree.  A topology is made of :class:`Bus` objects:

============  =================  ==========================  ===============================
kind          where              usable slots                hotplug
============  =================  ==========================  ===============================
pci-root      ``pci.0`` (pc)     the VM's mask (not 0-3)     ACPI, unless QEMU turned it off
pcie-root     ``pcie.0`` (q35)   the mask (not 0, 1, 0x1f)   never: devices go behind ports
pci-bridge    a bridge's bus     1-31                        SHPC or ACPI, when numbered
root port     a port's bus       0 only                      native PCIe or ACPI
============  =================  ==========================  ===============================

Each bus keeps a :class:`~kvmslots.slots.SlotMap` (Ganeti 2.10's hv_kvm 32-slot
bitarray: a slot is taken when any of its functions is) and, per slot, which
functions are held and by whom.  Occupancy comes from three sources that
are all applied before anything is chosen: the VM's masks, our records
(devices and the controllers we planned) and QEMU's live ``query-pci``.

Growth is explicit and only at boot: on ``pc`` a full bus gives its last free
slot to a ``pci-bridge`` (bridges take the highest free slot, devices the
lowest, so a bridge never moves a device); on ``q35`` every device gets its
own ``pcie-root-port``, packed eight to a slot of ``pcie.0`` as functions (as
libvirt does), and spare ports are kept for hotplug.  QEMU cannot hot-plug a
port into ``pcie.0``, so a hot add never grows: it takes a free port or a
free hotpluggable slot, or fails with an error that says what to plan.

Pure: no I/O.  The hotplug capability of each bus (what QEMU says at run
time) is handed in by the caller (:mod:`kvmslots.capabilities`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .errors import (
    BusNotHotpluggable,
    InvalidBus,
    InvalidSlot,
    NoHotplugPort,
    SlotOccupied,
    SlotReserved,
    SlotsExhausted,
)
from .model import (
    MAX_FUNCTION,
    PCIE_ROOT_BUS,
    ROOT_BUS,
    Controller,
    ControllerKind,
    Device,
    Machine,
    VMSpec,
)
from .pciview import PCIE_PORT_IDS, PciOccupancy
from .slots import NUM_SLOTS, SlotMap

__all__ = ["BusKind", "Bus", "Topology", "Placement", "check_records", "PCIE_PORT_RESERVATIONS", "NO_HOTPLUG_PCIE_ROOT"]

#: Below a PCIe port only slot 0 exists for the guest (QEMU accepts others; the guest never sees them).
PCIE_PORT_RESERVATIONS = "0" + "1" * (NUM_SLOTS - 1)
FUNCTIONS = MAX_FUNCTION + 1


class BusKind(str, enum.Enum):
    """The kinds of bus a topology has; the module docstring's table says what each offers."""

    PCI_ROOT = "pci-root"
    PCIE_ROOT = "pcie-root"
    PCI_BRIDGE = "pci-bridge"
    PCIE_ROOT_PORT = "pcie-root-port"

    def __str__(self) -> str:
        return self.value


NO_HOTPLUG_PCIE_ROOT = "pcie.0 takes no hotplug on q35; devices are hot-plugged behind a pcie-root-port"


@dataclass
class Bus:
    """One PCI bus: its kind, its slots and functions, and whether hot add may use it.

    ``number`` is the bus number QEMU shows (None before boot or when QEMU
    does not have the bus; 0 for a bridge the firmware has not numbered).
    ``no_hotplug`` is why hot add must not use it, or None when it may.
    """

    name: str
    kind: BusKind
    slots: SlotMap
    controller: Controller | None = None
    number: int | None = None
    no_hotplug: str | None = None
    functions: dict[int, dict[int, str]] = field(default_factory=dict)

    def holder(self, slot: int) -> str | None:
        """Who holds *slot* (the holder of its lowest function: a QEMU id, or QEMU's description of a device
        without one); None when none of its functions is held (a masked slot has no holder)."""
        held = self.functions.get(slot)
        return None if not held else held[min(held)]

    def take(self, slot: int, function: int, holder: str) -> None:
        """Mark one function held (by us or by what QEMU shows); taking it twice is fine."""
        self.slots.occupy([slot])
        self.functions.setdefault(slot, {}).setdefault(function, holder)

    def free_functions(self, slot: int) -> list[int]:
        """The functions of *slot* nobody holds, lowest first."""
        held = self.functions.get(slot, {})
        return [f for f in range(FUNCTIONS) if f not in held]

    def free_slots(self) -> list[int]:
        """The slots neither masked nor held, lowest first."""
        return [s for s in range(NUM_SLOTS) if self.slots.is_free(s)]

    @property
    def is_port(self) -> bool:
        """Is this the bus below a ``pcie-root-port`` (where only slot 0 exists)?"""
        return self.kind is BusKind.PCIE_ROOT_PORT

    def check_hotplug(self, vm: str | None = None) -> None:
        """Raise :class:`BusNotHotpluggable` (naming *vm*) saying why hot add must not use this bus, if it
        must not."""
        if self.no_hotplug is not None:
            raise BusNotHotpluggable(self.name, self.no_hotplug, vm=vm)


@dataclass(frozen=True)
class Placement:
    """Where a device (or a multifunction group, as functions 0, 1, ...) goes."""

    bus: str
    slot: int


class Topology:
    """A VM's buses, built from its spec and stored controllers, then filled with what holds slots."""

    def __init__(self, vm: VMSpec, controllers: Iterable[Controller] = ()) -> None:
        self.vm = vm
        self.family = vm.family
        self.buses: dict[str, Bus] = {}
        self.controllers: list[Controller] = []
        root_kind = BusKind.PCI_ROOT if self.family is Machine.I440FX else BusKind.PCIE_ROOT
        root = Bus(vm.root_bus, root_kind, SlotMap(vm.mask, bus=vm.root_bus), number=None)
        if root_kind is BusKind.PCIE_ROOT:
            root.no_hotplug = NO_HOTPLUG_PCIE_ROOT
        self.buses[root.name] = root
        pending = sorted(controllers, key=lambda c: c.chassis)
        while pending:  # parents first, whatever their chassis numbers (an import may bring any)
            ready = [c for c in pending if c.bus in self.buses]
            if not ready:
                self._attach(pending[0])  # raises: its parent bus exists nowhere
            for controller in ready:
                self._attach(controller)
            pending = [c for c in pending if c not in ready]

    # -- structure -------------------------------------------------------------------------
    @property
    def root(self) -> Bus:
        """The root bus: ``pci.0`` on ``pc``, ``pcie.0`` on ``q35``."""
        return self.buses[self.vm.root_bus]

    def _attach(self, controller: Controller) -> Bus:
        parent = self.buses.get(controller.bus)
        if parent is None:
            raise InvalidBus(f"{controller.id} sits on bus {controller.bus!r}, which VM {self.vm.name!r} does not have")
        if controller.id in self.buses:
            raise InvalidBus(f"VM {self.vm.name!r} has two buses named {controller.id!r}")
        if controller.kind is ControllerKind.PCIE_ROOT_PORT and self.family is not Machine.Q35:
            raise InvalidBus(f"{controller.id}: pcie-root-port needs a q35 machine, not {self.vm.machine!r}")
        if controller.kind is ControllerKind.PCI_BRIDGE and self.family is not Machine.I440FX:
            raise InvalidBus(f"{controller.id}: kvmslots adds pci-bridges to 'pc' machines only")
        held = parent.functions.get(controller.slot, {})
        if parent.slots.is_masked(controller.slot):
            raise SlotReserved(controller.slot, parent.name)
        if controller.function in held or (held and not self._ports_only(held)):
            raise SlotOccupied(controller.slot, parent.holder(controller.slot), parent.name)
        parent.take(controller.slot, controller.function, controller.id)
        kind = _bus_kind(controller.kind)
        bus = Bus(controller.id, kind, self._slot_map(controller.id, kind), controller)
        self.buses[bus.name] = bus
        self.controllers.append(controller)
        return bus

    def _slot_map(self, name: str, kind: BusKind) -> SlotMap:
        """The reservations of a bridge's or port's bus: the VM's mask for it (below a port, only slot 0)."""
        if kind is BusKind.PCIE_ROOT_PORT:
            return SlotMap(_port_mask(self.vm.bus_masks.get(name)), bus=name)
        return SlotMap(self.vm.mask_for(name), bus=name)

    def bus(self, name: str) -> Bus:
        """The bus named *name*; a bus kvmslots did not plan (a caller's own bridge) is added on first use."""
        found = self.buses.get(name)
        if found is None:
            found = self.buses[name] = Bus(name, BusKind.PCI_BRIDGE, self._slot_map(name, BusKind.PCI_BRIDGE))
        return found

    def ports(self) -> list[Bus]:
        """The ``pcie-root-port`` buses kvmslots planned (not ports only QEMU shows), by chassis number,
        parents first."""
        return [b for b in self.buses.values() if b.is_port and b.controller is not None]

    def bridges(self) -> list[Bus]:
        """The ``pci-bridge`` buses kvmslots planned (not a caller's own bridges, nor those only QEMU shows),
        parents first."""
        return [b for b in self.buses.values() if b.kind is BusKind.PCI_BRIDGE and b.controller is not None]

    def _next_chassis(self) -> int:
        # above every number in use: a new bridge's chassis is always higher than its parent's
        chassis = max((c.chassis for c in self.controllers), default=0) + 1
        if chassis > 255:
            raise SlotsExhausted(None, "a VM has at most 255 ports and bridges", vm=self.vm.name)
        return chassis

    # -- occupancy ------------------------------------------------------------------------
    def occupy_devices(self, devices: Iterable[Device]) -> None:
        """Our records hold their slots and functions, whatever their state."""
        for device in devices:
            self.bus(device.bus).take(device.slot, device.function, device.qemu_id)

    def occupy_live(self, view: PciOccupancy) -> None:
        """What QEMU shows holds its slots too; buses learn their numbers (and foreign bridges appear)."""
        names = {0: self.root.name}
        self.root.number = 0
        present: set[str] = set()
        for function in view.functions:
            if function.secondary_bus is None or not function.qdev_id:
                continue
            bus = self.buses.get(function.qdev_id)
            if bus is None:  # someone else's bridge or port
                is_port = (function.vendor, function.device) in PCIE_PORT_IDS
                kind = BusKind.PCIE_ROOT_PORT if is_port else BusKind.PCI_BRIDGE
                bus = self.buses[function.qdev_id] = Bus(function.qdev_id, kind, self._slot_map(function.qdev_id, kind))
            bus.number = function.secondary_bus
            present.add(bus.name)
            if function.secondary_bus:
                names[function.secondary_bus] = bus.name
            elif bus.no_hotplug is None:
                bus.no_hotplug = (
                    f"the firmware has not numbered the bus of {bus.name} yet (bus number 0), so a device "
                    "behind it could not be verified; it is usable once the guest has booted"
                )
        for bus in self.buses.values():
            if bus.controller is not None and bus.name not in present and bus.no_hotplug is None:
                bus.no_hotplug = f"QEMU has no {bus.controller.kind} {bus.name!r}: the VM was not booted with this plan"
        for function in view.functions:
            name = names.get(function.bus)
            if name is not None:
                self.buses[name].take(function.slot, function.function, function.qdev_id or function.description)

    def set_hotplug(self, bus: str, reason: str | None) -> None:
        """What QEMU says about *bus*: None when it takes hotplug, else why not.  A reason found
        already (an unnumbered bus, a bus QEMU lacks, pcie.0) stays."""
        if bus in self.buses and reason is not None and self.buses[bus].no_hotplug is None:
            self.buses[bus].no_hotplug = reason

    def number(self, bus: str) -> int | None:
        """The bus number QEMU gave *bus* (0 for a bridge not numbered yet), known once :meth:`occupy_live`
        ran; None before, and for a bus QEMU does not show or the topology lacks."""
        found = self.buses.get(bus)
        return None if found is None else found.number

    # -- choosing -----------------------------------------------------------------------------
    def place(
        self,
        functions: int = 1,
        *,
        bus: str | None = None,
        slot: int | None = None,
        hotplug: bool = False,
        remaining: int = 1,
        holder: str = "a new device",
    ) -> Placement:
        """Choose and take a slot for a device (``functions`` 1) or a group of that many functions.

        ``bus``/``slot`` ask for a place; otherwise the machine's policy picks
        one.  ``hotplug`` limits the choice to buses that take hotplug and
        never grows; at boot (``hotplug`` false) a full ``pc`` bus gets a
        bridge and a ``q35`` device its own new port.  ``remaining`` is how
        many devices still wait to be placed, this one included (a bus with
        one free slot left gives it to a bridge only if more than one does).
        """
        if bus is not None:
            target = self.buses.get(bus)
            if target is None and hotplug:
                raise InvalidBus(f"VM {self.vm.name!r} has no PCI bus named {bus!r} (QEMU does not show one)")
            if target is None:  # a bus the caller adds to the VM itself (its own bridge)
                target = self.bus(bus)
            if hotplug:
                target.check_hotplug(self.vm.name)
            chosen = self._slot_on(target, slot)
            return self._take(target, chosen, functions, holder)
        if slot is not None:
            return self.place(functions, bus=self.vm.root_bus, slot=slot, hotplug=hotplug, holder=holder)
        if self.family is Machine.Q35:
            return self._place_q35(functions, hotplug, holder)
        return self._place_pc(functions, hotplug, remaining, holder)

    def _slot_on(self, bus: Bus, slot: int | None) -> int:
        if bus.is_port and slot not in (None, 0):
            raise InvalidSlot(
                f"Only slot 0 exists behind a pcie-root-port ({bus.name}); QEMU would accept slot {slot} "
                "but the guest would never see the device"
            )
        if slot is None:
            return bus.slots.first_free()
        if bus.slots.is_masked(slot):
            raise SlotReserved(slot, bus.name)
        if not bus.slots.is_free(slot):
            raise SlotOccupied(slot, bus.holder(slot), bus.name)
        return slot

    def _take(self, bus: Bus, slot: int, functions: int, holder: str) -> Placement:
        for function in range(functions):
            bus.take(slot, function, holder)
        return Placement(bus.name, slot)

    def _place_q35(self, functions: int, hotplug: bool, holder: str) -> Placement:
        refused: list[tuple[str, str]] = []
        for port in self.ports():
            if not port.slots.is_free(0):
                continue
            if hotplug and port.no_hotplug is not None:
                refused.append((port.name, port.no_hotplug))
                continue
            return self._take(port, 0, functions, holder)
        if hotplug:
            if refused:
                raise BusNotHotpluggable(refused[0][0], _refusal(refused), vm=self.vm.name)
            raise NoHotplugPort(self.vm.name, len(self.ports()))
        port = self._attach(self.add_port())
        return self._take(port, 0, functions, holder)

    def _place_pc(self, functions: int, hotplug: bool, remaining: int, holder: str) -> Placement:
        chain = [self.root, *self.bridges()]
        refused: list[tuple[str, str]] = []
        for index, bus in enumerate(chain):
            free = bus.free_slots()
            if not free:
                continue
            if hotplug:
                if bus.no_hotplug is not None:
                    refused.append((bus.name, bus.no_hotplug))
                    continue
                return self._take(bus, free[0], functions, holder)
            last = index == len(chain) - 1
            if last and len(free) == 1 and remaining > 1:  # grow: the last slot goes to a bridge
                bridge = self._attach(self.add_bridge(bus.name))
                return self._take(bridge, bridge.slots.first_free(), functions, holder)
            return self._take(bus, free[0], functions, holder)
        if hotplug and refused:
            reason = _refusal(refused)
            if len(chain) > len(refused):  # "every other bus is full" only when there were others
                reason += " (and every other bus is full)"
            raise BusNotHotpluggable(refused[0][0], reason, vm=self.vm.name)
        hint = "plan the VM with spare_bridge (--spare-bridge) and boot it again" if hotplug else None
        raise SlotsExhausted(None if len(chain) > 1 else self.root.name, hint, vm=self.vm.name)

    def _ports_only(self, held: dict[int, str]) -> bool:
        """Are all functions of a slot held by our root ports (which share slots, eight to one)?"""
        ports = {c.id for c in self.controllers if c.kind is ControllerKind.PCIE_ROOT_PORT}
        return all(holder in ports for holder in held.values())

    # -- growing (boot only) ---------------------------------------------------------------
    def add_port(self) -> Controller:
        """A new ``pcie-root-port``: the next function of our last port slot, else a new slot of pcie.0."""
        chassis = self._next_chassis()
        root = self.root
        port_slots = sorted({p.controller.slot for p in self.ports() if p.controller is not None})
        for slot in reversed(port_slots):
            held = root.functions.get(slot, {})
            if self._ports_only(held):
                free = [f for f in root.free_functions(slot) if f > max(held, default=-1)]
                if free:
                    return Controller.port(chassis, slot, free[0])
            break
        try:
            slot = root.slots.first_free()
        except SlotsExhausted:
            raise SlotsExhausted(
                root.name, "pcie.0 has no slot left for another pcie-root-port", vm=self.vm.name
            ) from None
        return Controller.port(chassis, slot, 0)

    def add_bridge(self, parent: str) -> Controller:
        """A new ``pci-bridge`` on *parent*, at its highest free slot (devices fill from the lowest)."""
        bus = self.buses[parent]
        free = bus.free_slots()
        if not free:
            raise SlotsExhausted(parent, vm=self.vm.name)
        return Controller.bridge(self._next_chassis(), parent, free[-1])

    def ensure_spare_bridge(self) -> None:
        """At boot on ``pc`` with ``spare_bridge``: one bridge before the devices are placed, so it takes
        the highest free slot (the one it would take anyway) and hot add has room once ``pci.0`` is full."""
        if self.family is not Machine.I440FX or not self.vm.spare_bridge or self.bridges():
            return
        parent = self.root if self.root.free_slots() else None
        if parent is None:
            raise SlotsExhausted(self.root.name, "no slot is left for the spare bridge", vm=self.vm.name)
        self._attach(self.add_bridge(parent.name))

    def ensure_spare_ports(self) -> None:
        """At boot on ``q35``: keep ``hotplug_ports`` ports free (ports cannot be hot-plugged into pcie.0)."""
        if self.family is not Machine.Q35:
            return
        free = sum(1 for p in self.ports() if p.slots.is_free(0))
        for _ in range(self.vm.hotplug_ports - free):
            self._attach(self.add_port())

    # -- reading ------------------------------------------------------------------------------
    def walk(self) -> Iterator[Bus]:
        """Buses in order: the root, then ports and bridges by chassis, then foreign ones."""
        return iter(self.buses.values())

    def is_builtin(self, bus_number: int, slot: int) -> bool:
        """Is (bus, slot) masked, i.e. a machine built-in QEMU shows that no one needs to report?"""
        for bus in self.buses.values():
            if bus.number == bus_number and bus.number is not None:
                return bus.slots.is_masked(slot) and not bus.is_port
        return False


def _bus_kind(kind: ControllerKind) -> BusKind:
    return BusKind.PCIE_ROOT_PORT if kind is ControllerKind.PCIE_ROOT_PORT else BusKind.PCI_BRIDGE


def _refusal(refused: list[tuple[str, str]]) -> str:
    """Why hot add found no bus: one refused bus is named once, several each with its reason."""
    if len(refused) == 1:
        return refused[0][1]
    return "; ".join(f"{name}: {why}" for name, why in refused)


def _port_mask(configured: str | None) -> str:
    if configured is None:
        return PCIE_PORT_RESERVATIONS
    return "".join("1" if "1" in pair else "0" for pair in zip(configured, PCIE_PORT_RESERVATIONS))


def check_records(vm: VMSpec, controllers: Iterable[Controller], devices: Iterable[Device]) -> Topology:
    """Do stored controllers and devices fit *vm*?  The topology they make, or a typed error.

    Every bus must exist for the machine (a caller's own bridge is accepted),
    nothing may sit on a masked slot or behind a root port at a slot other
    than 0, and a slot is shared only by the functions of one group.  Used
    where records come from outside (import) or the VM changes (define_vm).
    """
    topology = Topology(vm, controllers)
    grouped: dict[tuple[str, int], bool] = {}
    other_root = {ROOT_BUS, PCIE_ROOT_BUS} - {vm.root_bus}
    for device in devices:
        if device.bus in other_root:
            raise InvalidBus(f"{device.qemu_id} is on {device.bus}, which a {vm.machine!r} machine does not have")
        bus = topology.bus(device.bus)
        if bus.is_port and device.slot != 0:
            topology._slot_on(bus, device.slot)
        if bus.slots.is_masked(device.slot):
            raise SlotReserved(device.slot, bus.name)
        held = bus.functions.get(device.slot, {})
        key = (bus.name, device.slot)
        if device.function in held or (held and not (grouped.get(key) and device.in_group)):
            raise SlotOccupied(device.slot, bus.holder(device.slot), bus.name)
        grouped[key] = device.in_group
        bus.take(device.slot, device.function, device.qemu_id)
    return topology

"""Value objects shared by the store, the monitor and the orchestration.

:class:`DeviceSpec` is what a lifecycle manager asks for (validated on
construction, so a bad spec never reaches the database or QEMU);
:class:`DeviceGroup` is several of them sharing one slot as functions 0-7;
:class:`Device` is what is stored, with a bus, slot, function and state;
:class:`Controller` is a ``pcie-root-port`` or ``pci-bridge`` kvmslots added
to make room; :class:`VMSpec` is a VM's name, machine type, reservations and
how much room it keeps for hotplug.

Device states follow the two-phase rule: ``planned`` (slot chosen for boot),
``attaching`` (slot taken, ``device_add`` may be under way), ``attached``
(verified in QEMU), ``detaching`` (``device_del`` sent, removal not yet
confirmed: the slot stays taken).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ._shown import shown
from .devid import (
    PropValue,
    device_id,
    validate_bus,
    validate_dev_type,
    validate_driver,
    validate_props,
    validate_qemu_id,
    validate_uuid,
    validate_vm_name,
)
from .errors import InvalidFunction, InvalidMask, InvalidName, UnsupportedMachine, ValidationError
from .slots import DEFAULT_PCI_RESERVATIONS, reservation_mask, validate_mask, validate_slot

__all__ = [
    "DeviceState",
    "TRANSITIONS",
    "DeviceSpec",
    "DeviceGroup",
    "Device",
    "Controller",
    "ControllerKind",
    "Machine",
    "machine_family",
    "VMSpec",
    "ROOT_BUS",
    "PCIE_ROOT_BUS",
    "BRIDGE_RESERVATIONS",
    "Q35_RESERVATIONS",
    "DEFAULT_HOTPLUG_PORTS",
    "MAX_HOTPLUG_PORTS",
    "qemu_option_value",
    "validate_function",
]

_MACHINE_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
# "pc", "pc-i440fx-7.2", the old "pc-1.3"; "q35", "pc-q35-7.2".
_I440FX_RE = re.compile(r"pc|pc-i440fx-[0-9]+\.[0-9]+|pc-[0-9]+\.[0-9]+")
_Q35_RE = re.compile(r"q35|pc-q35-[0-9]+\.[0-9]+")

#: The root bus of QEMU's ``pc`` machine, where ACPI hotplug works.
ROOT_BUS = "pci.0"
#: The root bus of ``q35``: PCI Express, no hotplug on it (devices go behind root ports).
PCIE_ROOT_BUS = "pcie.0"
#: Default mask of a bus behind a ``pci-bridge``: slot 0 is not usable there.
BRIDGE_RESERVATIONS = "1" + "0" * 31
#: ``q35``'s built-in devices on ``pcie.0``: host bridge (0), VGA (1), ICH9 LPC/SATA/SMBus (0x1f).
Q35_RESERVATIONS = "11" + "0" * 29 + "1"
#: Spare ``pcie-root-port`` devices a q35 plan keeps for hotplug unless told otherwise (as libvirt's
#: advice and Proxmox's fixed ports do: a q35 VM without one can never take a hot add).
DEFAULT_HOTPLUG_PORTS = 4
#: ``pcie.0`` has 29 free slots of 8 ports each; chassis numbers are 8 bits.
MAX_HOTPLUG_PORTS = 128
MAX_FUNCTION = 7


class Machine(str, enum.Enum):
    """The machine families kvmslots knows how to place devices on."""

    I440FX = "i440fx"  # "pc": conventional PCI root bus pci.0, ACPI hotplug on it
    Q35 = "q35"  # PCI Express root bus pcie.0, hotplug only behind root ports

    def __str__(self) -> str:
        return self.value

    @property
    def root_bus(self) -> str:
        """The family's root bus: ``pci.0`` (i440FX) or ``pcie.0`` (q35)."""
        return ROOT_BUS if self is Machine.I440FX else PCIE_ROOT_BUS

    @property
    def default_mask(self) -> str:
        """The root-bus mask of the family's built-in devices (``pc``: slots 0-3; ``q35``: 0, 1 and 0x1f),
        used when a VM gives none."""
        return DEFAULT_PCI_RESERVATIONS if self is Machine.I440FX else Q35_RESERVATIONS


def machine_family(machine: object) -> Machine:
    """The family of a machine type name (``pc``, ``pc-i440fx-7.2``, ``q35``, ``pc-q35-7.2``).

    Anything else (``microvm``, ``isapc``, a typo) is refused: its PCI
    layout is not one kvmslots can promise slots on.
    """
    if not isinstance(machine, str) or not _MACHINE_RE.fullmatch(machine):
        raise UnsupportedMachine(
            f"Machine type must look like 'pc', 'q35', 'pc-i440fx-7.2' or 'pc-q35-7.2', got {shown(machine)}", machine
        )
    if _I440FX_RE.fullmatch(machine):
        return Machine.I440FX
    if _Q35_RE.fullmatch(machine):
        return Machine.Q35
    raise UnsupportedMachine(
        f"Machine type {machine!r} is not supported: kvmslots places devices on 'pc' (i440FX) and 'q35' "
        "machines and their versioned names (pc-i440fx-X.Y, pc-q35-X.Y)",
        machine,
    )


def validate_function(value: object) -> int:
    """A PCI function number, 0-7 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FUNCTION:
        raise InvalidFunction(f"PCI function must be an integer 0-{MAX_FUNCTION}, got {shown(value)}")
    return value


class DeviceState(str, enum.Enum):
    """Where a device is in its life; see the module docstring."""

    PLANNED = "planned"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"

    def __str__(self) -> str:
        return self.value


#: The guest-device state machine, enforced in one place (``Transaction.set_state``).  A device
#: enters as ``planned`` (boot plan) or ``attaching`` (hot add) and leaves by being removed from
#: the store, which only a confirmed removal or a verified absence does.
TRANSITIONS: Mapping[DeviceState, frozenset[DeviceState]] = {
    DeviceState.PLANNED: frozenset({DeviceState.ATTACHED, DeviceState.DETACHING}),  # seen running / unplug
    DeviceState.ATTACHING: frozenset({DeviceState.ATTACHED, DeviceState.DETACHING}),  # verified / undo
    DeviceState.ATTACHED: frozenset({DeviceState.DETACHING}),  # hot_del
    # unplug request recorded again / refused (back to attached, or to planned for a device that was
    # never seen running) / an undo the guest refused
    DeviceState.DETACHING: frozenset(
        {DeviceState.DETACHING, DeviceState.ATTACHED, DeviceState.PLANNED, DeviceState.ATTACHING}
    ),
}


@dataclass(frozen=True)
class DeviceSpec:
    """A device a caller wants in a VM: identity, QEMU model and properties.

    ``bus`` and ``slot`` are optional: set them to ask for a specific place
    (e.g. one kept in the caller's own config); otherwise placement chooses
    (the root bus, a bridge or a root port, by machine type) and the first
    free slot there is taken.
    """

    uuid: str
    dev_type: str
    driver: str
    props: Mapping[str, PropValue] = field(default_factory=dict)
    bus: str | None = None
    slot: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "uuid", validate_uuid(self.uuid))
        validate_dev_type(self.dev_type)
        validate_driver(self.driver)
        object.__setattr__(self, "props", validate_props(self.props, self.driver))
        if self.bus is not None:
            validate_bus(self.bus)
        if self.slot is not None:
            validate_slot(self.slot)


@dataclass(frozen=True)
class DeviceGroup:
    """Devices that share one slot as functions 0, 1, ... in the order given (a multifunction slot).

    Each member keeps its own UUID and so its own id.  Function 0 is plugged
    with ``multifunction=on``; QEMU tells the guest about the slot when
    function 0 arrives, so hot add plugs it last, and removing function 0
    removes the whole slot.  ``bus``/``slot`` place the whole group; members
    must not name their own.
    """

    members: tuple[DeviceSpec, ...]
    bus: str | None = None
    slot: int | None = None

    def __post_init__(self) -> None:
        members = tuple(self.members) if isinstance(self.members, (list, tuple)) else self.members
        if not isinstance(members, tuple) or not all(isinstance(m, DeviceSpec) for m in members):
            raise InvalidFunction("A device group is a list of DeviceSpec")
        if not 2 <= len(members) <= MAX_FUNCTION + 1:
            raise InvalidFunction(f"A multifunction group has 2-{MAX_FUNCTION + 1} devices, got {len(members)}")
        if len({m.uuid for m in members}) != len(members):
            raise InvalidFunction("A device UUID appears twice in one multifunction group")
        for member in members:
            if member.bus is not None or member.slot is not None:
                raise InvalidFunction(
                    f"Device {member.uuid} is in a group: give bus/slot to the group, not to its members"
                )
        object.__setattr__(self, "members", members)
        if self.bus is not None:
            validate_bus(self.bus)
        if self.slot is not None:
            validate_slot(self.slot)

    @property
    def uuid(self) -> str:
        """The group is known by its function 0's UUID."""
        return self.members[0].uuid


@dataclass(frozen=True)
class Device:
    """A device as stored: the spec plus its bus, slot, function and state.

    ``multifunction`` marks function 0 of a group (QEMU's ``multifunction=on``).
    ``given_id`` is the QEMU id another manager gave the device before
    kvmslots took the VM over (Ganeti 2.16+ names devices without their
    slot); None for every device kvmslots placed, whose id it derives.
    """

    uuid: str
    dev_type: str
    driver: str
    props: Mapping[str, PropValue]
    bus: str
    slot: int
    state: DeviceState
    function: int = 0
    multifunction: bool = False
    given_id: str | None = None

    def __post_init__(self) -> None:
        if self.given_id is not None:
            validate_qemu_id(self.given_id)

    @classmethod
    def from_spec(
        cls,
        spec: DeviceSpec,
        bus: str,
        slot: int,
        state: DeviceState,
        function: int = 0,
        multifunction: bool = False,
        given_id: str | None = None,
    ) -> "Device":
        """The record of *spec* placed at *bus*, *slot* and *function* in *state* (its props copied)."""
        return cls(
            spec.uuid, spec.dev_type, spec.driver, dict(spec.props), bus, slot, state, function, multifunction, given_id
        )

    @property
    def qemu_id(self) -> str:
        """The id QEMU knows the device by: the reproducible one, rebuilt from the stored slot,
        unless another manager gave it one (``given_id``)."""
        if self.given_id is not None:
            return self.given_id
        return device_id(self.dev_type, self.uuid, self.slot)

    @property
    def in_group(self) -> bool:
        """Part of a multifunction slot (function 0 with ``multifunction=on``, or any other function)."""
        return self.multifunction or self.function != 0

    @property
    def addr(self) -> str:
        """The ``addr`` property QEMU takes: ``0x5``, or ``0x5.1`` in a multifunction slot."""
        return f"{self.slot:#x}.{self.function}" if self.in_group else f"{self.slot:#x}"

    def facts(self, vm: str) -> dict[str, Any]:
        """What an error about this device carries (see :class:`~kvmslots.errors.KvmSlotsError`)."""
        return {"vm": vm, "uuid": self.uuid, "device_id": self.qemu_id, "bus": self.bus, "slot": self.slot,
                "state": self.state.value}

    def with_state(self, state: DeviceState) -> "Device":
        """A copy in *state*; the stored record changes only through ``set_state``."""
        return replace(self, state=state)

    def qmp_arguments(self) -> dict[str, Any]:
        """``device_add`` arguments as QMP JSON (never an HMP string)."""
        args: dict[str, Any] = {"driver": self.driver, "id": self.qemu_id, "bus": self.bus, "addr": self.addr}
        if self.multifunction:
            args["multifunction"] = True
        args.update(self.props)
        return args

    def device_option(self) -> str:
        """The value of a ``-device`` command-line option for this device."""
        parts = [self.driver, f"id={self.qemu_id}", f"bus={self.bus}", f"addr={self.addr}"]
        if self.multifunction:
            parts.append("multifunction=on")
        parts += [f"{key}={qemu_option_value(value)}" for key, value in self.props.items()]
        return ",".join(parts)

    def to_json(self) -> dict[str, Any]:
        """The record as an export document holds it, with ``id`` (as QEMU knows it) and ``id_given`` (whether
        another manager gave that id)."""
        return {
            "uuid": self.uuid,
            "type": self.dev_type,
            "driver": self.driver,
            "props": dict(self.props),
            "bus": self.bus,
            "slot": self.slot,
            "function": self.function,
            "multifunction": self.multifunction,
            "state": self.state.value,
            "id": self.qemu_id,
            "id_given": self.given_id is not None,
        }


class ControllerKind(str, enum.Enum):
    """The controllers kvmslots adds to make room: both give a new bus named after their id."""

    PCIE_ROOT_PORT = "pcie-root-port"  # q35: one slot (0) below it, hotpluggable
    PCI_BRIDGE = "pci-bridge"  # pc: 31 slots (1-31) below it

    def __str__(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        """What ``plan --json`` calls it: ``port`` or ``bridge``."""
        return "port" if self is ControllerKind.PCIE_ROOT_PORT else "bridge"


@dataclass(frozen=True)
class Controller:
    """A root port or bridge kvmslots planned, at ``bus``/``slot``/``function`` of its parent.

    ``chassis`` is its number (``chassis`` and ``port`` of a root port,
    ``chassis_nr`` of a bridge): unique in the VM and stored, so the same VM
    boots with the same ids and numbers every time.  Its id is also the name
    of the bus it provides.
    """

    id: str
    kind: ControllerKind
    bus: str
    slot: int
    function: int
    chassis: int

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", ControllerKind(self.kind))
        except ValueError:
            kinds = ", ".join(k.value for k in ControllerKind)
            raise InvalidName(f"Controller kind must be one of {kinds}, got {shown(self.kind)}") from None
        validate_bus(self.id)
        validate_bus(self.bus)
        validate_slot(self.slot)
        validate_function(self.function)
        if isinstance(self.chassis, bool) or not isinstance(self.chassis, int) or not 1 <= self.chassis <= 255:
            raise InvalidName(f"Chassis number must be 1-255, got {shown(self.chassis)}")

    @classmethod
    def port(cls, chassis: int, slot: int, function: int) -> "Controller":
        """The ``pcie-root-port`` numbered *chassis* at *slot* and *function* of ``pcie.0``, with id (and bus
        name) ``pcie-port-<chassis>``."""
        return cls(f"pcie-port-{chassis}", ControllerKind.PCIE_ROOT_PORT, PCIE_ROOT_BUS, slot, function, chassis)

    @classmethod
    def bridge(cls, chassis: int, bus: str, slot: int) -> "Controller":
        """The ``pci-bridge`` numbered *chassis* at *slot* of *bus*, with id (and bus name)
        ``pci-bridge-<chassis>``."""
        return cls(f"pci-bridge-{chassis}", ControllerKind.PCI_BRIDGE, bus, slot, 0, chassis)

    @property
    def addr(self) -> str:
        """The ``addr`` QEMU takes: ``0x2.3`` for a root port (eight ports share a slot as functions),
        ``0x1f`` for a bridge."""
        if self.kind is ControllerKind.PCIE_ROOT_PORT:
            return f"{self.slot:#x}.{self.function}"
        return f"{self.slot:#x}"

    def qmp_arguments(self) -> dict[str, Any]:
        """``device_add`` arguments as QMP JSON, with the chassis number; a root port at function 0 also gets
        ``multifunction``, so that up to eight ports share its slot."""
        args: dict[str, Any] = {"driver": self.kind.value, "id": self.id, "bus": self.bus, "addr": self.addr}
        if self.kind is ControllerKind.PCIE_ROOT_PORT:
            if self.function == 0:
                args["multifunction"] = True  # up to 8 ports share one slot of pcie.0
            args.update(chassis=self.chassis, port=self.chassis)
        else:
            args["chassis_nr"] = self.chassis
        return args

    def device_option(self) -> str:
        """The value of a ``-device`` command-line option for this controller."""
        args = self.qmp_arguments()
        parts = [str(args.pop("driver"))]
        parts += [f"{key}={qemu_option_value(value)}" for key, value in args.items()]
        return ",".join(parts)

    def to_json(self) -> dict[str, Any]:
        """The controller as an export document holds it."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "bus": self.bus,
            "slot": self.slot,
            "function": self.function,
            "chassis": self.chassis,
        }


def qemu_option_value(value: PropValue) -> str:
    """Render a property for QEMU's option syntax, where a literal ',' is written ',,'."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class VMSpec:
    """A VM's identity, reservations and the room it keeps for hotplug.

    ``mask`` reserves slots on the root bus; empty means the machine's
    built-in devices (``pc``: 0-3, ``1111`` as in Ganeti 2.10's hv_kvm; ``q35``: 0, 1 and
    0x1f).  ``reserve_slots`` N is Ganeti's shorthand for a mask of the first
    N slots.  ``bus_masks`` may give masks for other buses (bridges), which
    otherwise get :data:`BRIDGE_RESERVATIONS`.  ``hotplug_ports`` (q35) is how
    many free ``pcie-root-port`` devices a boot plan keeps for hot add;
    ``spare_bridge`` (pc) plans a ``pci-bridge`` up front so hot add has room
    once ``pci.0`` is full.
    """

    name: str
    machine: str = "pc"
    mask: str = ""
    bus_masks: Mapping[str, str] = field(default_factory=dict)
    hotplug_ports: int = DEFAULT_HOTPLUG_PORTS
    spare_bridge: bool = False
    reserve_slots: int | None = None

    def __post_init__(self) -> None:
        validate_vm_name(self.name)
        family = machine_family(self.machine)
        if self.reserve_slots is not None:
            if self.mask:
                raise InvalidMask("Give a reservation mask or reserve_slots, not both")
            object.__setattr__(self, "mask", reservation_mask(self.reserve_slots))
            object.__setattr__(self, "reserve_slots", None)  # folded into the mask: one source of truth
        if not self.mask:
            object.__setattr__(self, "mask", family.default_mask)
        validate_mask(self.mask)
        if not isinstance(self.bus_masks, Mapping):
            raise InvalidMask(f"bus_masks must map bus ids to masks, got {type(self.bus_masks).__name__}")
        masks = {}
        for bus, mask in self.bus_masks.items():
            masks[validate_bus(bus)] = validate_mask(mask)
        object.__setattr__(self, "bus_masks", masks)
        ports = self.hotplug_ports
        if isinstance(ports, bool) or not isinstance(ports, int) or not 0 <= ports <= MAX_HOTPLUG_PORTS:
            raise ValidationError(f"hotplug_ports must be an integer 0-{MAX_HOTPLUG_PORTS}, got {shown(ports)}")
        if not isinstance(self.spare_bridge, bool):
            raise ValidationError(f"spare_bridge must be true or false, got {shown(self.spare_bridge)}")
        if self.spare_bridge and family is Machine.Q35:
            raise UnsupportedMachine(
                "spare_bridge is for 'pc' machines; a q35 VM keeps hotplug_ports instead", self.machine
            )

    @property
    def family(self) -> Machine:
        """The family of ``machine``, which decides the root bus and how devices are placed."""
        return machine_family(self.machine)

    @property
    def root_bus(self) -> str:
        """``pci.0`` on ``pc``, ``pcie.0`` on ``q35``."""
        return self.family.root_bus

    def mask_for(self, bus: str) -> str:
        """The reservation mask of *bus* (bridges: slot 0; see :mod:`kvmslots.topology` for ports)."""
        if bus == self.root_bus:
            return self.mask
        return self.bus_masks.get(bus, BRIDGE_RESERVATIONS)

    def to_json(self) -> dict[str, Any]:
        """The VM as an export document holds it (``reserve_slots`` is already folded into ``mask``)."""
        return {
            "name": self.name,
            "machine": self.machine,
            "mask": self.mask,
            "bus_masks": dict(self.bus_masks),
            "hotplug_ports": self.hotplug_ports,
            "spare_bridge": self.spare_bridge,
        }


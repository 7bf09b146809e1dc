"""Value objects shared by the store, the monitor and the orchestration.

:class:`DeviceSpec` is what a lifecycle manager asks for (validated on
construction, so a bad spec never reaches the database or QEMU);
:class:`Device` is what is stored, with a slot and a state;
:class:`VMSpec` is a VM's name, machine type and reservation masks.

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

from .devid import (
    PropValue,
    device_id,
    validate_bus,
    validate_dev_type,
    validate_driver,
    validate_props,
    validate_uuid,
    validate_vm_name,
)
from ._shown import shown
from .errors import InvalidMask, InvalidName
from .slots import DEFAULT_PCI_RESERVATIONS, validate_mask, validate_slot

__all__ = [
    "DeviceState",
    "DeviceSpec",
    "Device",
    "VMSpec",
    "ROOT_BUS",
    "BRIDGE_RESERVATIONS",
    "qemu_option_value",
]

_MACHINE_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")

#: The root bus of QEMU's ``pc`` machine, where ACPI hotplug works.
ROOT_BUS = "pci.0"
#: Default mask of a bus behind a ``pci-bridge``: slot 0 is not usable there.
BRIDGE_RESERVATIONS = "1" + "0" * 31


class DeviceState(str, enum.Enum):
    """Where a device is in its life; see the module docstring."""

    PLANNED = "planned"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class DeviceSpec:
    """A device a caller wants in a VM: identity, QEMU model and properties.

    ``slot`` is optional: set it to ask for a specific slot (e.g. one kept in
    the caller's own config); otherwise the first free slot is taken.
    """

    uuid: str
    dev_type: str
    driver: str
    props: Mapping[str, PropValue] = field(default_factory=dict)
    bus: str = ROOT_BUS
    slot: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "uuid", validate_uuid(self.uuid))
        validate_dev_type(self.dev_type)
        validate_driver(self.driver)
        object.__setattr__(self, "props", validate_props(self.props, self.driver))
        validate_bus(self.bus)
        if self.slot is not None:
            validate_slot(self.slot)


@dataclass(frozen=True)
class Device:
    """A device as stored: the spec plus its slot and state."""

    uuid: str
    dev_type: str
    driver: str
    props: Mapping[str, PropValue]
    bus: str
    slot: int
    state: DeviceState

    @classmethod
    def from_spec(cls, spec: DeviceSpec, slot: int, state: DeviceState) -> "Device":
        return cls(spec.uuid, spec.dev_type, spec.driver, dict(spec.props), spec.bus, slot, state)

    @property
    def qemu_id(self) -> str:
        """The reproducible QEMU id, rebuilt from the stored slot."""
        return device_id(self.dev_type, self.uuid, self.slot)

    @property
    def addr(self) -> str:
        """The ``addr`` property QEMU takes (slot, function 0)."""
        return f"{self.slot:#x}"

    def with_state(self, state: DeviceState) -> "Device":
        return replace(self, state=state)

    def qmp_arguments(self) -> dict[str, Any]:
        """``device_add`` arguments as QMP JSON (never an HMP string)."""
        args: dict[str, Any] = {"driver": self.driver, "id": self.qemu_id, "bus": self.bus, "addr": self.addr}
        args.update(self.props)
        return args

    def device_option(self) -> str:
        """The value of a ``-device`` command-line option for this device."""
        parts = [self.driver, f"id={self.qemu_id}", f"bus={self.bus}", f"addr={self.addr}"]
        parts += [f"{key}={qemu_option_value(value)}" for key, value in self.props.items()]
        return ",".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "type": self.dev_type,
            "driver": self.driver,
            "props": dict(self.props),
            "bus": self.bus,
            "slot": self.slot,
            "state": self.state.value,
            "id": self.qemu_id,
        }


def qemu_option_value(value: PropValue) -> str:
    """Render a property for QEMU's option syntax, where a literal ',' is written ',,'."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class VMSpec:
    """A VM's identity and reservations.

    ``mask`` reserves slots on the root bus; ``bus_masks`` may give masks for
    other buses (bridges), which otherwise get :data:`BRIDGE_RESERVATIONS`.
    """

    name: str
    machine: str = "pc"
    mask: str = DEFAULT_PCI_RESERVATIONS
    bus_masks: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_vm_name(self.name)
        if not isinstance(self.machine, str) or not _MACHINE_RE.fullmatch(self.machine):
            raise InvalidName(f"Machine type must look like 'pc' or 'pc-i440fx-7.2', got {shown(self.machine)}")
        validate_mask(self.mask)
        if not isinstance(self.bus_masks, Mapping):
            raise InvalidMask(f"bus_masks must map bus ids to masks, got {type(self.bus_masks).__name__}")
        masks = {}
        for bus, mask in self.bus_masks.items():
            masks[validate_bus(bus)] = validate_mask(mask)
        object.__setattr__(self, "bus_masks", masks)

    def mask_for(self, bus: str) -> str:
        """The reservation mask of *bus*."""
        if bus == ROOT_BUS:
            return self.mask
        return self.bus_masks.get(bus, BRIDGE_RESERVATIONS)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "machine": self.machine, "mask": self.mask, "bus_masks": dict(self.bus_masks)}


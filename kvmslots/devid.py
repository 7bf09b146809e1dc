"""Reproducible QEMU device ids: ``<type>-<uuid8>-pci-<slot>``.

QEMU addresses devices by their ``id``; to remove a device later we must be
able to rebuild that id from what we stored, without asking QEMU.  The id is
made of the device type, the first group of the device's UUID and its slot,
e.g. ``nic-9f3c2a1b-pci-5``.  Everything that goes in is validated so an id is
always a legal QEMU id and two devices of one VM cannot share one.

Also here: validation of the other names that end up in QEMU arguments (VM
names, bus ids, driver names, extra properties).  These never reach an HMP
command line; they travel as QMP JSON or as ``-device`` option values.
"""

from __future__ import annotations

import re
import uuid as _uuid
from typing import Mapping

from ._shown import shown
from .errors import (
    InvalidBus,
    InvalidDeviceId,
    InvalidDeviceType,
    InvalidDriver,
    InvalidName,
    InvalidProperty,
    InvalidUUID,
)
from .slots import NUM_SLOTS, validate_slot

__all__ = [
    "device_id",
    "parse_device_id",
    "uuid8",
    "validate_uuid",
    "validate_dev_type",
    "validate_vm_name",
    "validate_bus",
    "validate_qemu_id",
    "validate_driver",
    "validate_props",
    "coerce_props",
    "is_passthrough_driver",
    "PropValue",
]

PropValue = str | int | bool

_DEV_TYPE_RE = re.compile(r"[a-z][a-z0-9]*")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_DEVICE_ID_RE = re.compile(r"([a-z][a-z0-9]*)-([0-9a-f]{8})-pci-(0|[1-9][0-9]?)")
_VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# QEMU ids: a letter, then letters, digits, '-', '.', '_' (qemu's id_wellformed).
_QEMU_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")
_DRIVER_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_PROP_NAME_RE = re.compile(r"[a-z][A-Za-z0-9_.-]{0,63}")
#: Properties kvmslots sets itself; a caller giving them would break the id/slot contract.
RESERVED_PROPS = frozenset({"id", "bus", "addr", "driver", "multifunction"})
#: Properties that make QEMU open host files, devices or descriptors: never from a caller.
#: ``host`` (the host PCI address of vfio-pci) is set only by kvmslots' passthrough path.
HOST_ACCESS_PROPS = frozenset({"romfile", "sysfsdev", "host", "vhostdev", "vhostfd", "vhostfds", "fd"})
#: Option names that make QEMU print help and exit instead of creating the device.
HELP_WORDS = frozenset({"help", "?"})
#: Drivers that hand a host device to the guest (the whole vfio family and the legacy
#: KVM assignment): only through the passthrough path.  See :func:`is_passthrough_driver`.
PASSTHROUGH_DRIVERS = frozenset({"vfio-pci", "vfio-pci-nohotplug", "pci-assign", "kvm-pci-assign"})
MAX_DEV_TYPE = 16
#: Integer property values must fit QEMU's widest integer types (int64 / uint64).
MIN_PROP_INT = -(1 << 63)
MAX_PROP_INT = (1 << 64) - 1
#: Ranges of QEMU's integer property types (``device-list-properties`` names them).
INT_PROP_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (MIN_PROP_INT, (1 << 63) - 1),
    "int": (MIN_PROP_INT, (1 << 63) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, MAX_PROP_INT),
    "size": (0, MAX_PROP_INT),
}
_ASCII_INT_RE = re.compile(r"-?[0-9]+")


def is_passthrough_driver(driver: object) -> bool:
    """Does *driver* hand a host device to the guest?  Matched by family (``vfio-*``), so a
    variant such as ``vfio-pci-nohotplug`` is never taken for an ordinary device."""
    if not isinstance(driver, str):
        return False
    return driver in PASSTHROUGH_DRIVERS or driver == "vfio" or driver.startswith("vfio-")


def validate_uuid(value: object) -> str:
    """Return the canonical lowercase form of a UUID string, or raise :class:`InvalidUUID`."""
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise InvalidUUID(f"Not a UUID (8-4-4-4-12 hex digits): {shown(value)}")
    parsed = _uuid.UUID(value)
    if parsed.int in (0, (1 << 128) - 1):
        raise InvalidUUID(f"The nil or max UUID does not identify a device: {shown(value)}")
    return str(parsed)


def uuid8(value: str) -> str:
    """The first dash-separated group of a UUID, lowercase."""
    return validate_uuid(value).split("-", 1)[0]


def validate_dev_type(value: object) -> str:
    """A device type is ``[a-z][a-z0-9]*`` (no dash: the id must parse back)."""
    if not isinstance(value, str) or not _DEV_TYPE_RE.fullmatch(value) or len(value) > MAX_DEV_TYPE:
        raise InvalidDeviceType(
            f"Device type must match [a-z][a-z0-9]* (at most {MAX_DEV_TYPE} characters), got {shown(value)}"
        )
    return value


def device_id(dev_type: str, uuid: str, slot: int) -> str:
    """Build the QEMU id of a device: ``device_id("nic", "9F3C2A1B-...", 5) == "nic-9f3c2a1b-pci-5"``."""
    return f"{validate_dev_type(dev_type)}-{uuid8(uuid)}-pci-{validate_slot(slot)}"


def parse_device_id(text: object) -> tuple[str, str, int]:
    """Split a device id into ``(dev_type, uuid8, slot)``; :class:`InvalidDeviceId` otherwise."""
    if not isinstance(text, str):
        raise InvalidDeviceId(f"Device id must be a string, got {type(text).__name__}")
    match = _DEVICE_ID_RE.fullmatch(text)
    if not match or len(match.group(1)) > MAX_DEV_TYPE:
        raise InvalidDeviceId(f"Not a kvmslots device id (<type>-<uuid8>-pci-<slot>): {shown(text)}")
    slot = int(match.group(3))
    if slot >= NUM_SLOTS:
        raise InvalidDeviceId(f"Slot {slot} out of range 0-{NUM_SLOTS - 1} in device id {shown(text)}")
    return match.group(1), match.group(2), slot


def validate_vm_name(value: object) -> str:
    """VM names become file names and log keys: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``."""
    if not isinstance(value, str) or not _VM_NAME_RE.fullmatch(value):
        raise InvalidName(f"VM name must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}, got {shown(value)}")
    return value


def validate_bus(value: object) -> str:
    """A bus is named by its QEMU id (``pci.0``, or a bridge's id)."""
    if not isinstance(value, str) or not _QEMU_ID_RE.fullmatch(value):
        raise InvalidBus(f"PCI bus must be a QEMU bus id such as 'pci.0', got {shown(value)}")
    return value


def validate_qemu_id(value: object) -> str:
    """A QEMU device id kvmslots did not make (given by another manager, e.g. Ganeti 2.16+):
    ``[A-Za-z][A-Za-z0-9._-]{0,127}``, as QEMU itself requires of ids."""
    if not isinstance(value, str) or not _QEMU_ID_RE.fullmatch(value):
        raise InvalidDeviceId(f"QEMU device id must match [A-Za-z][A-Za-z0-9._-]{{0,127}}, got {shown(value)}")
    return value


def validate_driver(value: object) -> str:
    """A QEMU device model name such as ``virtio-net-pci`` or ``vfio-pci``."""
    if not isinstance(value, str) or not _DRIVER_RE.fullmatch(value):
        raise InvalidDriver(f"QEMU driver must match [a-z][a-z0-9_.-]*, got {shown(value)}")
    if value in HELP_WORDS:
        raise InvalidDriver(f"{shown(value)} is not a device model: QEMU would print its device list and exit")
    return value


def validate_props(props: Mapping[str, object] | None, driver: str | None = None) -> dict[str, PropValue]:
    """Extra ``-device`` properties: safe names, scalar values, none of the reserved ones.

    Properties that reach host files or devices (``romfile``, ``sysfsdev``,
    experimental ``x-*``) are refused: a caller must not be able to expose a
    host file to a guest through kvmslots.  ``host`` is accepted only for a
    passthrough driver, whose address the tracker chose.
    """
    if props is None:
        return {}
    if not isinstance(props, Mapping):
        raise InvalidProperty(f"Device properties must be a mapping, got {type(props).__name__}")
    clean: dict[str, PropValue] = {}
    for name, value in props.items():
        if not isinstance(name, str) or not _PROP_NAME_RE.fullmatch(name):
            raise InvalidProperty(f"Bad device property name {shown(name)}")
        if name in RESERVED_PROPS:
            raise InvalidProperty(f"Device property {shown(name)} is set by kvmslots and cannot be given")
        if name in HELP_WORDS:
            raise InvalidProperty(f"Device property {shown(name)} makes QEMU print help and exit instead of starting")
        passthrough = driver is not None and is_passthrough_driver(driver)
        if name.startswith("x-") or (name in HOST_ACCESS_PROPS and not (name == "host" and passthrough)):
            raise InvalidProperty(
                f"Device property {shown(name)} gives the guest access to host resources and is not accepted"
                + ("; use a PassthroughSpec for host PCI devices" if name in ("host", "sysfsdev") else "")
            )
        if isinstance(value, str):
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
                raise InvalidProperty(f"Device property {shown(name)} has a control character")
        elif not isinstance(value, (bool, int)):
            raise InvalidProperty(
                f"Device property {shown(name)} must be a string, integer or boolean, got {type(value).__name__}"
            )
        elif not isinstance(value, bool) and not MIN_PROP_INT <= value <= MAX_PROP_INT:
            raise InvalidProperty(
                f"Device property {shown(name)} is out of QEMU's integer range ({MIN_PROP_INT} to {MAX_PROP_INT})"
            )
        clean[name] = value
    return clean


def coerce_props(props: Mapping[str, PropValue], types: Mapping[str, str]) -> dict[str, PropValue]:
    """Turn text values into integers where QEMU says the property is an integer.

    *types* maps property names to QEMU's type names (``device-list-properties``).
    Only ASCII decimal digits (with an optional minus sign) count as a number,
    checked against the type's range; every other value, and every value of a
    property that is not an integer, stays exactly the text it was: ``serial=007``
    is sent as ``"007"``.  Without this, QEMU would read ``"010"`` as octal 8.
    Other ASCII text for an integer property (``0x10``, ``4K`` for a size) is
    left for QEMU to read; non-ASCII digits such as ``"١٢"`` or ``"²"`` are refused.
    """
    out: dict[str, PropValue] = {}
    for name, value in props.items():
        kind = types.get(name)
        if isinstance(value, str) and kind in INT_PROP_RANGES and not value.isascii():
            raise InvalidProperty(
                f"Device property {shown(name)} ({kind}) must be written with ASCII digits, got {shown(value)}"
            )
        if isinstance(value, str) and kind in INT_PROP_RANGES and _ASCII_INT_RE.fullmatch(value):
            low, high = INT_PROP_RANGES[kind]
            number = int(value, 10) if len(value) <= 21 else None  # never int() a 5000-digit text
            if number is None or not low <= number <= high:
                raise InvalidProperty(f"Device property {shown(name)} ({kind}) must be {low} to {high}, got {value}")
            out[name] = number
        else:
            out[name] = value
    return out

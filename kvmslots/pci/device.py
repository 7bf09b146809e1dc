"""Host PCI device records and their state machine (Nova's ``PciDevice``).

A host device is ``available`` until an instance claims it (``claimed``),
then ``allocated`` when the instance really uses it, and ``available`` again
when freed.  SR-IOV ties devices together: while a PF is taken its VFs
cannot be (``unclaimable`` / ``unavailable``), and while any VF is taken its
PF cannot be.  Devices the host no longer reports are ``removed``, then
``deleted`` (their record goes).

Every transition checks first and changes after: a wrong state or a wrong
owner raises a typed error and leaves the device, its parent and its
children exactly as they were.  The PF/VF links (``parent`` /
``children``) are kept by the tracker; this module only follows them.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .._shown import shown
from ..errors import InvalidDevicesJson, PciDeviceInvalidOwner, PciDeviceInvalidStatus, ValidationError
from .address import DEV_TYPE_PCI, DEV_TYPE_PF, DEV_TYPE_VF, DEV_TYPES, canonical_address, validate_pci_id

__all__ = [
    "PciStatus",
    "PciDevice",
    "device_from_hypervisor",
    "hypervisor_record",
    "has_32bit_domain",
    "HYPERVISOR_FIELDS",
    "ASSIGNED",
]

log = logging.getLogger(__name__)


class PciStatus(str, enum.Enum):
    """Where a host device is in its life (Nova's statuses; see the module docstring).  Only ``available``
    devices are in the pools; ``claimed`` and ``allocated`` ones belong to an instance."""

    AVAILABLE = "available"
    CLAIMED = "claimed"
    ALLOCATED = "allocated"
    REMOVED = "removed"
    DELETED = "deleted"
    UNCLAIMABLE = "unclaimable"
    UNAVAILABLE = "unavailable"

    def __str__(self) -> str:
        return self.value


#: States in which a device belongs to an instance.
ASSIGNED = frozenset({PciStatus.CLAIMED, PciStatus.ALLOCATED})
_PARENT_OK = frozenset({PciStatus.AVAILABLE, PciStatus.UNCLAIMABLE, PciStatus.UNAVAILABLE})
_ALLOCATABLE = frozenset({PciStatus.AVAILABLE, PciStatus.CLAIMED})
#: States a VF may wrongly be left in under an available PF (Nova bug 1969496): tolerated on a PF claim.
_HELD_BY_PARENT = frozenset({PciStatus.UNCLAIMABLE, PciStatus.UNAVAILABLE})
_WIDE_DOMAIN_RE = re.compile(r"\s*([0-9a-fA-F]{5,16}):[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}\.[0-7]\s*")
_NUMA_TEXT_RE = re.compile(r"\s*(-?[0-9]{1,10})\s*")


def has_32bit_domain(address: object) -> bool:
    """Is *address* a PCI address whose domain needs more than 16 bits (``10000:00:02.0``)?

    Such domains exist (devices behind Intel VMD) but cannot be assigned to a
    guest; Nova skips them when it syncs.
    """
    if not isinstance(address, str):
        return False
    match = _WIDE_DOMAIN_RE.fullmatch(address)
    return match is not None and int(match.group(1), 16) > 0xFFFF

#: The keys of a hypervisor device record (Nova's ``pci_passthrough_devices`` JSON).
HYPERVISOR_FIELDS = (
    "address",
    "vendor_id",
    "product_id",
    "dev_type",
    "parent_addr",
    "numa_node",
    "iommu_group",
    "dev_id",
    "label",
    "devname",
    "parent_devname",
)


@dataclass(eq=False)
class PciDevice:
    """One host PCI function as the tracker knows it."""

    address: str
    vendor_id: str
    product_id: str
    dev_type: str = DEV_TYPE_PCI
    parent_addr: str | None = None
    numa_node: int | None = None
    iommu_group: int | None = None
    dev_id: str | None = None
    label: str | None = None
    devname: str | None = None
    parent_devname: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    status: PciStatus = PciStatus.AVAILABLE
    instance_uuid: str | None = None
    request_id: str | None = None
    #: New hypervisor values parked while the device is assigned (applied when freed).
    stale: dict[str, Any] | None = None
    #: The host stopped reporting it while it was assigned: removed once freed.
    vanished: bool = False
    parent: PciDevice | None = field(default=None, repr=False)
    children: list[PciDevice] = field(default_factory=list, repr=False)

    # -- views ----------------------------------------------------------------
    @property
    def is_available(self) -> bool:
        """Free for a claim (``available``, no owner)."""
        return self.status is PciStatus.AVAILABLE

    def hypervisor_values(self) -> dict[str, Any]:
        """The properties that come from the hypervisor (compared on every sync)."""
        return {name: getattr(self, name) for name in HYPERVISOR_FIELDS}

    def record(self) -> dict[str, Any]:
        """Everything that defines the device's state (what is persisted and compared)."""
        values = self.hypervisor_values()
        values.update(
            tags=dict(self.tags),
            status=self.status.value,
            instance_uuid=self.instance_uuid,
            request_id=self.request_id,
            stale=self.stale,
            vanished=self.vanished,
        )
        return values

    # -- transitions ----------------------------------------------------------
    def claim(self, instance_uuid: str, request_id: str | None = None) -> list[PciDevice]:
        """available -> claimed; a PF makes its VFs unclaimable, a VF its PF. Returns changed devices."""
        if self.status is not PciStatus.AVAILABLE:  # (checked inline first: claims are a hot path)
            self._require({PciStatus.AVAILABLE}, "claim")
        changed: list[PciDevice] = []
        if self.dev_type == DEV_TYPE_PF:
            busy = [vf for vf in self.children if not vf.is_available]
            in_use = [vf.address for vf in busy if vf.status not in _HELD_BY_PARENT]
            if in_use:
                raise PciDeviceInvalidStatus(f"Cannot claim PF {self.address}: its VFs {in_use} are not available")
            if busy:
                # Nova bug 1969496: an available PF with an unclaimable/unavailable VF is inconsistent
                # but harmless; Nova logs it and claims the PF, whose free then makes every VF available.
                log.warning(
                    "Some child device of parent %s is in an inconsistent state. Inconsistent children with "
                    "state: %s", self.address, ",".join(f"{vf.address} - {vf.status.value}" for vf in busy),
                )
            changed += _set_status(self.children, PciStatus.UNCLAIMABLE)
        elif self.dev_type == DEV_TYPE_VF and self.parent is not None:
            if self.parent.status not in _PARENT_OK:
                self.parent._require(_PARENT_OK, f"claim its VF {self.address}")
            if self.parent.is_available:
                changed += _set_status([self.parent], PciStatus.UNCLAIMABLE)
        self.status, self.instance_uuid, self.request_id = PciStatus.CLAIMED, instance_uuid, request_id
        return changed + [self]

    def allocate(self, instance_uuid: str, request_id: str | None = None) -> list[PciDevice]:
        """available, or claimed by the same instance -> allocated; PF/VF relatives -> unavailable."""
        if self.status not in _ALLOCATABLE:
            self._require(_ALLOCATABLE, "allocate")
        if self.status is PciStatus.CLAIMED and self.instance_uuid != instance_uuid:
            raise PciDeviceInvalidOwner(
                f"Device {self.address} is claimed by {self.instance_uuid}, not {instance_uuid}"
            )
        changed: list[PciDevice] = []
        if self.dev_type == DEV_TYPE_PF:
            busy = [vf.address for vf in self.children if vf.status not in (PciStatus.AVAILABLE, PciStatus.UNCLAIMABLE)]
            if busy:
                raise PciDeviceInvalidStatus(f"Cannot allocate PF {self.address}: its VFs {busy} are in use")
            changed += _set_status(self.children, PciStatus.UNAVAILABLE)
        elif self.dev_type == DEV_TYPE_VF and self.parent is not None:
            if self.parent.status not in _PARENT_OK:
                self.parent._require(_PARENT_OK, f"allocate its VF {self.address}")
            if self.parent.status is not PciStatus.UNAVAILABLE:
                changed += _set_status([self.parent], PciStatus.UNAVAILABLE)
        if self.status is PciStatus.AVAILABLE:
            self.request_id = request_id
        self.status, self.instance_uuid = PciStatus.ALLOCATED, instance_uuid
        return changed + [self]

    def free(self, instance_uuid: str | None = None) -> list[PciDevice]:
        """claimed/allocated -> available; a PF frees its VFs, a VF its PF once no sibling is in use."""
        if self.status not in ASSIGNED:
            self._require(ASSIGNED, "free")
        if instance_uuid is not None and self.instance_uuid != instance_uuid:
            raise PciDeviceInvalidOwner(f"Device {self.address} belongs to {self.instance_uuid}, not {instance_uuid}")
        changed: list[PciDevice] = []
        if self.dev_type == DEV_TYPE_PF:
            changed += _set_status(
                [vf for vf in self.children if vf.status in (PciStatus.UNCLAIMABLE, PciStatus.UNAVAILABLE)],
                PciStatus.AVAILABLE,
            )
        elif self.dev_type == DEV_TYPE_VF and self.parent is not None:
            parent = self.parent
            if parent.status in _HELD_BY_PARENT and _siblings_free(self, parent.children):
                changed += _set_status([parent], PciStatus.AVAILABLE)
        self.status, self.instance_uuid, self.request_id = PciStatus.AVAILABLE, None, None
        return changed + [self]

    def remove(self) -> None:
        """A device the host stopped reporting: only when nobody owns it."""
        self._require(_PARENT_OK, "remove")
        if self.instance_uuid is not None:
            raise PciDeviceInvalidOwner(f"Device {self.address} is owned by {self.instance_uuid}; cannot remove it")
        self.status = PciStatus.REMOVED

    def _require(self, allowed: Iterable[PciStatus], action: str) -> None:
        if self.status not in allowed:
            wanted = ", ".join(sorted(s.value for s in allowed))
            raise PciDeviceInvalidStatus(
                f"Cannot {action}: device {self.address} is {self.status.value} (needs {wanted})"
            )


def _siblings_free(device: PciDevice, children: list[PciDevice], available: PciStatus = PciStatus.AVAILABLE) -> bool:
    """Is every device of *children* but *device* available?  (A PF may have hundreds of VFs, and
    every free of one of them asks: the loop stops at the first busy one, and compares identities.)"""
    for child in children:
        if child.status is not available and child is not device:
            return False
    return True


def _set_status(devices: Iterable[PciDevice], status: PciStatus) -> list[PciDevice]:
    changed = []
    for device in devices:
        if device.status is not status:
            device.status = status
            changed.append(device)
    return changed


def device_from_hypervisor(raw: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> PciDevice:
    """Validate one record of the hypervisor's JSON device list into a :class:`PciDevice`."""
    return PciDevice(**hypervisor_record(raw), tags=dict(tags or {}))


def hypervisor_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one record of the hypervisor's JSON device list: its :data:`HYPERVISOR_FIELDS`, in
    their canonical form (the one place that knows a record's rules, for the tracker and for
    :mod:`~kvmslots.pci.discovery`).  :class:`~kvmslots.errors.InvalidDevicesJson` names what is wrong.
    """
    if not isinstance(raw, Mapping):
        raise InvalidDevicesJson(f"Each device must be a JSON object, got {type(raw).__name__}")
    where = f"device {shown(raw.get('address'))}"
    unknown = set(raw) - set(HYPERVISOR_FIELDS) - {"compute_node_id", "numa_node", "extra_info", "capabilities"}
    if unknown:
        names = sorted(key if isinstance(key, str) else shown(key) for key in unknown)
        raise InvalidDevicesJson(f"{where} has unknown keys: {', '.join(names)}")
    try:
        address = canonical_address(raw.get("address"))
        vendor_id = validate_pci_id(raw.get("vendor_id"), f"{where}: vendor_id", InvalidDevicesJson)
        product_id = validate_pci_id(raw.get("product_id"), f"{where}: product_id", InvalidDevicesJson)
    except ValidationError as exc:
        raise InvalidDevicesJson(str(exc)) from None
    dev_type = raw.get("dev_type", DEV_TYPE_PCI)
    if dev_type not in DEV_TYPES:
        raise InvalidDevicesJson(f"{where}: dev_type must be one of {', '.join(DEV_TYPES)}, got {shown(dev_type)}")
    parent_addr = raw.get("parent_addr")
    if dev_type == DEV_TYPE_VF:
        if parent_addr is None:
            raise InvalidDevicesJson(f"{where}: a type-VF needs parent_addr")
        try:
            parent_addr = canonical_address(parent_addr)
        except ValidationError as exc:
            raise InvalidDevicesJson(f"{where}: parent_addr: {exc}") from None
        if parent_addr == address:
            raise InvalidDevicesJson(f"{where}: a VF cannot be its own parent")
    elif parent_addr is not None:
        raise InvalidDevicesJson(f"{where}: only a type-VF has a parent_addr")
    record: dict[str, Any] = {
        "address": address,
        "vendor_id": vendor_id,
        "product_id": product_id,
        "dev_type": dev_type,
        "parent_addr": parent_addr,
        "numa_node": _optional_int(_numa_number(raw.get("numa_node")), f"{where}: numa_node", allow_negative_one=True),
        "iommu_group": _optional_int(raw.get("iommu_group"), f"{where}: iommu_group"),
    }
    for key in ("dev_id", "label", "devname", "parent_devname"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value or len(value) > 64):
            raise InvalidDevicesJson(f"{where}: {key} must be a short string, got {shown(value)}")
        record[key] = value
    if dev_type != DEV_TYPE_VF:
        record["parent_devname"] = None
    return record


def _numa_number(value: object) -> object:
    """Nova's ``numa_node`` is an IntegerField: a decimal text (``"1"``) is coerced to its number."""
    if isinstance(value, str):
        match = _NUMA_TEXT_RE.fullmatch(value)
        if match:
            return int(match.group(1))
    return value


def _optional_int(value: object, what: str, allow_negative_one: bool = False) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidDevicesJson(f"{what} must be an integer or null, got {shown(value)}")
    if allow_negative_one and value == -1:
        return None
    if not 0 <= value < 1 << 31:
        raise InvalidDevicesJson(f"{what} must be 0 .. 2**31-1, got {shown(value)}")
    return value

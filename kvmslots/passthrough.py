"""Host PCI passthrough in the slot manager: claim, bind, plug, allocate; and back.

A passthrough device is a guest device with driver ``vfio-pci`` whose
``host`` property is a host PCI address chosen by the tracker.  The order of
a hot add is: claim a host device for the VM (tracker), bind it to vfio-pci
(binder, when one is given), take a guest slot and ``device_add`` it, then
allocate the claim.  Any failure undoes in reverse: the guest slot is
released and the host device is freed (and handed back to its host driver).

The reverse order holds on removal: the host device is freed and given back
to the host only after QEMU confirmed the removal (``DEVICE_DELETED`` or
verified absence), never while QEMU may still hold it.  The link between
the guest device and the host device is the tracker's request id, which is
the guest device's UUID, and the ``host`` property stored with the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Mapping

from .devid import PropValue, validate_uuid
from .errors import HostBindError, InvalidPciRequest, PciError
from .model import Device, DeviceSpec
from .pci.binding import HostBinder
from .pci.device import PciDevice, PciStatus
from .pci.request import SOURCE_PASSTHROUGH, InstancePciRequest
from .pci.tracker import PciDevTracker

__all__ = ["PassthroughSpec", "HostDevices", "PASSTHROUGH_DRIVER", "PASSTHROUGH_TYPE"]

log = logging.getLogger(__name__)

PASSTHROUGH_DRIVER = "vfio-pci"
PASSTHROUGH_TYPE = "hostdev"


@dataclass(frozen=True)
class PassthroughSpec:
    """A guest device backed by one host PCI device that a request (alias) picks.

    The request's ``count`` must be 1 (one guest device per host device);
    its ``request_id`` becomes the device UUID, so the tracker can always
    tell which host device answers which guest device.  ``numa_cells`` are
    the host NUMA nodes the VM's cells are pinned to (Nova's instance NUMA
    topology; None: the VM has none): the request's ``numa_policy``
    (``required``, ``legacy``, ``preferred``, ``socket``) then decides which
    host devices may serve, as in Nova's claim.
    """

    uuid: str
    request: InstancePciRequest
    bus: str | None = None  # None: placed by machine type, as any device (a root port on q35)
    slot: int | None = None
    props: Mapping[str, PropValue] = field(default_factory=dict)
    numa_cells: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "uuid", validate_uuid(self.uuid))
        if self.numa_cells is not None:
            cells = self.numa_cells
            if isinstance(cells, (str, bytes)) or not all(
                type(cell) is int and cell >= 0 for cell in cells
            ) or not cells or len(set(cells)) != len(cells):  # fmt: skip
                raise InvalidPciRequest(
                    f"numa_cells must be distinct host NUMA node numbers (0, 1, ...), got {cells!r}"
                )
            object.__setattr__(self, "numa_cells", tuple(cells))
        if self.request.count != 1:
            raise InvalidPciRequest(
                f"A passthrough device takes exactly one host device, the request asks for {self.request.count}"
            )
        if "host" in self.props:
            raise InvalidPciRequest("The host address of a passthrough device is chosen by the tracker, not given")
        object.__setattr__(self, "request", replace(self.request, request_id=self.uuid, source=SOURCE_PASSTHROUGH))
        # validates bus, slot and props the same way as any guest device
        self.guest_spec("0000:00:00.0")

    def guest_spec(self, host_address: str) -> DeviceSpec:
        """The guest device for a claimed host device."""
        props = {**dict(self.props), "host": host_address}
        return DeviceSpec(self.uuid, PASSTHROUGH_TYPE, PASSTHROUGH_DRIVER, props, self.bus, self.slot)


@dataclass
class HostDevices:
    """The host side of passthrough: the tracker, and optionally a binder to vfio-pci."""

    tracker: PciDevTracker
    binder: HostBinder | None = None

    def claim(self, vm: str, spec: PassthroughSpec) -> PciDevice:
        """Claim one host device for *spec* (on its NUMA cells' terms) and bind it to vfio-pci; all or nothing."""
        cells = None if spec.numa_cells is None else list(spec.numa_cells)
        [device] = self.tracker.claim_instance(vm, [spec.request], numa_cells=cells)
        if self.binder is not None:
            try:
                self.binder.detach(device.address)
            except BaseException:
                self.tracker.free_device(device.address, vm)
                raise
        return device

    def allocate(self, vm: str, host_address: str) -> None:
        """Turn *vm*'s claim on the host device at *host_address* into an allocation (once QEMU has the
        device); the tracker refuses, with a :class:`PciError`, a device another VM holds."""
        self.tracker.allocate_device(host_address, vm)

    def release(self, vm: str, host_address: str) -> None:
        """Give the host device back to its driver, then free it (QEMU must have let go of it).

        In this order, because once it is free another VM may claim it and bind it to vfio-pci:
        a late reattach would then pull it from under that VM.
        """
        if self.binder is not None:
            try:
                self.binder.reattach(host_address)
            except HostBindError as exc:  # still on vfio-pci; a later claim's detach finds it there
                log.error("Host device %s could not be given back to its driver: %s", host_address, exc)
        self.tracker.free_device(host_address, vm)

    def release_guest_device(self, vm: str, device: Device) -> None:
        """After QEMU confirmed *device* gone: free its host device, if it is a passthrough one.

        The guest side is already settled, so a tracker that disagrees (the
        host device is unknown or owned by someone else) is logged, not raised.
        """
        if not is_passthrough(device):
            return
        try:
            self.release(vm, str(device.props["host"]))
        except PciError as exc:
            log.error("Guest device %s is gone but its host device could not be freed: %s", device.qemu_id, exc)

    def allocate_guest_device(self, vm: str, device: Device) -> None:
        """QEMU shows *device* present: its host device's claim becomes an allocation."""
        if not is_passthrough(device):
            return
        host = str(device.props["host"])
        try:
            held = self.tracker.get_device(host)
            if held.status is PciStatus.CLAIMED and held.instance_uuid == vm:
                self.allocate(vm, host)
        except PciError as exc:
            log.error("Guest device %s is present but its host device %s is not claimed for %s: %s",
                      device.qemu_id, host, vm, exc)


    def free_orphan_claims(self, vm: str, guest_uuids: set[str]) -> list[str]:
        """Free passthrough claims of *vm* that no guest device record points to.

        Only a crash between the claim and the guest record leaves one; QEMU
        cannot hold such a device (device_add is sent only after the record
        exists), so it goes back to the host.
        """
        orphans = [
            r.request_id for r in self.tracker.instance_requests(vm)
            if r.source == SOURCE_PASSTHROUGH and r.request_id not in guest_uuids
        ]
        freed: list[str] = []
        for request_id in orphans:
            for device in self.tracker.get_instance_pci_devs(vm, request_id):
                if device.status is PciStatus.CLAIMED:
                    log.warning("Freeing host device %s: claimed for %s's device %s, which was never recorded",
                                device.address, vm, request_id)
                    self.release(vm, device.address)
                    freed.append(device.address)
        return freed


def holds_host_device(device: Device, host_address: str) -> bool:
    """Is *device* the passthrough guest device of that host device?"""
    return is_passthrough(device) and device.props.get("host") == host_address


def is_passthrough(device: Device) -> bool:
    """Is *device* a passthrough guest device (``vfio-pci`` with a ``host`` address the tracker holds)?"""
    return device.driver == PASSTHROUGH_DRIVER and isinstance(device.props.get("host"), str)

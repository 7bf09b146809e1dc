"""Hand a host PCI function to vfio-pci and give it back, behind one interface.

:class:`HostBinder` is what the orchestration uses; two implementations:

* :class:`SysfsBinder` drives the kernel directly: ``driver_override`` +
  ``unbind`` + ``drivers_probe`` under ``/sys`` (what ``driverctl`` and
  libvirt do themselves);
* :class:`LibvirtBinder` asks libvirt (``virNodeDeviceDetachFlags(..., "vfio")``
  / ``virNodeDeviceReAttach``), which also keeps libvirt's own bookkeeping of
  "managed" devices right.  libvirt-python is imported lazily.

Ordering contract: :meth:`HostBinder.reattach` must only be called after QEMU
has released the device -- after its ``DEVICE_DELETED`` event for a hot
unplug, or after the QEMU process exited.  Giving a function back to its host
driver while a guest still has it mapped through VFIO is unsafe (the host
driver would program a device the guest is still using).  This module does
not check that; the hotplug orchestration guarantees it.

vfio-pci works per IOMMU group: the kernel opens a group for QEMU only when
every other member has no driver or one that leaves DMA to its owner
(``driver_managed_dma`` in the kernel: vfio-pci and its vendor variants,
pci-stub, pcieport).  The binders act on one function and never unbind its
neighbours, since choosing what to take from the host is the caller's
business; :meth:`SysfsBinder.detach` checks the group first and raises
:class:`~kvmslots.errors.IommuGroupNotViable` (naming the members in the way
and their drivers) before it changes anything, rather than handing QEMU a
function it could not open.

Addresses are validated with :func:`~kvmslots.pci.address.parse_address`
before any path is built, so nothing outside ``<root>/bus/pci`` can be touched
(:class:`~kvmslots.errors.InvalidPciAddress`); every other failure is a
:class:`~kvmslots.errors.HostBindError` naming the device and the file (or
carrying libvirt's message).
"""

from __future__ import annotations

import errno
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import HostBindError, IommuGroupNotViable
from .address import PciAddress, parse_address
from .discovery import _connection, _import_libvirt, _libvirt_message

__all__ = ["DMA_OWNER_DRIVERS", "VFIO_DRIVER", "HostBinder", "LibvirtBinder", "SysfsBinder", "leaves_dma_to_owner"]

VFIO_DRIVER = "vfio-pci"
#: Drivers the kernel lets share an IOMMU group with vfio-pci (they set ``driver_managed_dma``):
#: they do no DMA through the group's default domain.  pcieport drives PCIe ports (bridges).
DMA_OWNER_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub", "pcieport"})
#: Vendor variants of vfio-pci (``mlx5_vfio_pci``, ``hisi_acc_vfio_pci``, ...) end in one of these.
_VFIO_VARIANT_SUFFIXES = ("_vfio_pci", "-vfio-pci")


def leaves_dma_to_owner(driver: str | None) -> bool:
    """Whether a group member bound to ``driver`` (None: no driver) lets vfio take the group.

    The kernel's rule (``iommu_group_claim_dma_owner``): a group can be given to
    a vfio user only while no member is bound to a driver that uses the
    group's default DMA domain.
    """
    return driver is None or driver in DMA_OWNER_DRIVERS or driver.endswith(_VFIO_VARIANT_SUFFIXES)


@runtime_checkable
class HostBinder(Protocol):
    """Binds host PCI functions to vfio-pci and back (addresses ``dddd:bb:ss.f``)."""

    def detach(self, address: str) -> None:
        """Unbind the function from its host driver and bind it to vfio-pci."""

    def reattach(self, address: str) -> None:
        """Give the function back to its host driver (only after QEMU released it)."""

    def driver(self, address: str) -> str | None:
        """The driver the function is bound to now, or None."""


class SysfsBinder:
    """:class:`HostBinder` through sysfs (``root`` is where sysfs is mounted)."""

    def __init__(self, root: str | Path = "/sys") -> None:
        self.root = Path(root)
        self.bus = self.root / "bus" / "pci"

    # -- paths and raw I/O ----------------------------------------------------

    def _device(self, address: str) -> tuple[PciAddress, Path]:
        addr = parse_address(address)  # InvalidPciAddress before any path is built
        path = self.bus / "devices" / str(addr)
        if not path.exists():
            raise HostBindError(f"PCI device {addr} not found ({path} does not exist)")
        return addr, path

    def _write(self, addr: PciAddress, path: Path, text: str) -> None:
        """One write(2) of ``text`` to an existing sysfs attribute (never creates files)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            raise HostBindError(f"PCI device {addr}: cannot open {path}: {exc.strerror or exc}") from exc
        try:
            os.write(fd, text.encode())
        except OSError as exc:
            raise HostBindError(f"PCI device {addr}: writing {text.strip()!r} to {path} failed: "
                                f"{exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    def _driver(self, addr: PciAddress, path: Path) -> str | None:
        return self._link_name(addr, path / "driver")

    def _link_name(self, addr: PciAddress, link: Path) -> str | None:
        """The last component of a sysfs symlink's target (a driver's or a group's name); None when absent."""
        try:
            return os.path.basename(os.readlink(link).rstrip("/"))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise HostBindError(f"PCI device {addr}: {link} is not a symlink") from exc
            raise HostBindError(f"PCI device {addr}: cannot read {link}: {exc.strerror or exc}") from exc

    def _group(self, addr: PciAddress, path: Path) -> tuple[int | None, dict[str, str | None]]:
        """The function's IOMMU group number and its other members with their drivers.

        ``(None, {})`` when the function has no ``iommu_group`` link (no IOMMU:
        vfio-pci itself will refuse it).  Members are read from the group's
        ``devices`` directory, where the kernel lists every device of the group.
        """
        link = path / "iommu_group"
        name = self._link_name(addr, link)
        if name is None:
            return None, {}
        if not name.isdigit():
            raise HostBindError(f"PCI device {addr}: {link} points to {name!r}, not an IOMMU group number")
        members_dir = link / "devices"
        try:
            names = sorted(os.listdir(members_dir))
        except OSError as exc:
            raise HostBindError(f"PCI device {addr}: cannot list {members_dir}: {exc.strerror or exc}") from exc
        # each member's driver link (under .../iommu_group/devices/<member>/, so errors name the group)
        return int(name), {m: self._link_name(addr, members_dir / m / "driver") for m in names if m != str(addr)}

    # -- HostBinder -------------------------------------------------------------

    def driver(self, address: str) -> str | None:
        """The driver the function is bound to now (its ``driver`` link), or None; :class:`HostBindError` when
        the device does not exist."""
        addr, path = self._device(address)
        return self._driver(addr, path)

    def group_blockers(self, address: str) -> dict[str, str]:
        """Other members of the function's IOMMU group whose driver keeps vfio from taking the group.

        Maps each member's address to its driver; empty when the group is
        viable (or the function has no IOMMU group).  What
        :meth:`detach` checks before it changes anything.
        """
        addr, path = self._device(address)
        return _blocking(self._group(addr, path)[1])

    def detach(self, address: str) -> None:
        """``driver_override`` = vfio-pci, unbind from the host driver, ``drivers_probe``.

        First the IOMMU group: if another member is bound to a driver that
        does DMA (:func:`leaves_dma_to_owner`), QEMU could not open the group,
        so :class:`~kvmslots.errors.IommuGroupNotViable` is raised with the
        function still on its own driver and nothing written.  The check is
        not a lock: a driver binding a member afterwards makes QEMU refuse the
        group instead (``device_add`` fails, and the hot add is undone).

        If the function does not end up bound to vfio-pci (vfio-pci not loaded,
        the device refuses), the override is cleared and the function probed
        again so the host driver gets it back, then :class:`HostBindError`.
        """
        addr, path = self._device(address)
        group, others = self._group(addr, path)
        blocking = _blocking(others)
        if group is not None and blocking:
            raise IommuGroupNotViable(str(addr), group, blocking)
        override = path / "driver_override"
        self._write(addr, override, VFIO_DRIVER)
        current = self._driver(addr, path)
        if current == VFIO_DRIVER:
            return
        if current is not None:
            self._write(addr, path / "driver" / "unbind", str(addr))
        self._write(addr, self.bus / "drivers_probe", str(addr))
        now = self._driver(addr, path)
        if now == VFIO_DRIVER:
            return
        restored = ""
        try:  # best effort: let the host driver have it back
            self._write(addr, override, "\n")
            self._write(addr, self.bus / "drivers_probe", str(addr))
        except HostBindError as exc:
            restored = f"; restoring the host driver failed too: {exc}"
        raise HostBindError(
            f"PCI device {addr}: {path / 'driver'} points to {now or 'no driver'} after writing "
            f"{self.bus / 'drivers_probe'}, not {VFIO_DRIVER} (is the vfio-pci module loaded?){restored}"
        )

    def reattach(self, address: str) -> None:
        """Unbind from vfio-pci, clear ``driver_override``, ``drivers_probe``.

        Call only after QEMU released the device (``DEVICE_DELETED``).  A
        function that has no host driver afterwards is fine; one still bound
        to vfio-pci raises :class:`HostBindError`.
        """
        addr, path = self._device(address)
        if self._driver(addr, path) == VFIO_DRIVER:
            self._write(addr, path / "driver" / "unbind", str(addr))
        self._write(addr, path / "driver_override", "\n")
        self._write(addr, self.bus / "drivers_probe", str(addr))
        if self._driver(addr, path) == VFIO_DRIVER:
            raise HostBindError(
                f"PCI device {addr}: {path / 'driver'} still points to {VFIO_DRIVER} after "
                f"unbinding and clearing {path / 'driver_override'}"
            )


def _blocking(members: dict[str, str | None]) -> dict[str, str]:
    """The members (address -> driver) whose driver keeps vfio from taking their IOMMU group."""
    return {member: driver for member, driver in members.items() if driver and not leaves_dma_to_owner(driver)}


class LibvirtBinder:
    """:class:`HostBinder` through libvirt's node device API.

    ``conn_or_uri`` is an open read-write ``virConnect`` (left open) or a URI
    (a read-write connection is opened per call and closed after; read-only
    connections cannot detach).  libvirt errors become :class:`HostBindError`
    with libvirt's message -- e.g. the test driver's "this function is not
    supported by the connection driver: virNodeDeviceDetachFlags".
    """

    def __init__(self, conn_or_uri: Any) -> None:
        self.conn_or_uri = conn_or_uri

    def _call(self, address: str, action: str, op: str) -> Any:
        addr = parse_address(address)
        libvirt = _import_libvirt(HostBindError)
        with _connection(libvirt, self.conn_or_uri, False, HostBindError) as conn:
            try:
                dev = conn.nodeDeviceLookupByName(addr.dev_id)
                if op == "detach":
                    return dev.detachFlags("vfio", 0)  # libvirt names the backend, not the driver
                if op == "reattach":
                    return dev.reAttach()
                return dev.XMLDesc(0)
            except libvirt.libvirtError as exc:
                raise HostBindError(
                    f"PCI device {addr} ({addr.dev_id}): {action} failed: {_libvirt_message(exc)}"
                ) from exc

    def detach(self, address: str) -> None:
        """Bind the function to vfio-pci through libvirt (``virNodeDeviceDetachFlags``, backend ``vfio``);
        libvirt's refusal is :class:`HostBindError` with its message."""
        self._call(address, "libvirt detach to vfio", "detach")

    def reattach(self, address: str) -> None:
        """Give the function back to its host driver through libvirt (``virNodeDeviceReAttach``); only after
        QEMU released it."""
        self._call(address, "libvirt reattach to the host driver", "reattach")

    def driver(self, address: str) -> str | None:
        """The driver libvirt's node device XML names, or None when it names none."""
        xml = self._call(address, "reading the node device XML", "xml")
        try:
            name = ET.fromstring(xml).findtext("driver/name")
        except ET.ParseError as exc:
            raise HostBindError(f"PCI device {address}: malformed node device XML: {exc}") from exc
        return name.strip() if name and name.strip() else None

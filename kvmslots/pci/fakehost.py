"""Fake hosts for tests: one PCI topology rendered as a sysfs tree and as libvirt test XML.

A topology is a list of device records in the format that
:mod:`kvmslots.pci.discovery` returns.  :func:`build_sysfs_tree` writes it as a
sysfs-like directory tree, :func:`libvirt_test_xml` as a document for
libvirt's test driver (``test:///abs/path.xml``).  Discovering either gives the
topology back, which is how the two discovery paths are checked against each
other.  :func:`sriov_topology` makes a typical SR-IOV host.

Besides the record keys, a device dict may carry ``"driver"`` (the name of the
host driver the function is bound to; sysfs only, libvirt's test driver drops
``<driver>``) and ``"sriov_totalvfs"`` (a PF's VF capacity; default: its number
of VFs, at least 1).

Quirks of libvirt's test driver that the XML respects: the ``computer`` device
needs ``<hardware><uuid>``; ``<domain>``/``<bus>``/``<slot>``/``<function>``
must be decimal; an ``<iommuGroup>`` without ``<address>`` children and a
``<numa node='-1'/>`` are dropped, so groups list their members and unknown
NUMA nodes are left out.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidDevicesJson, ValidationError
from .address import (
    DEV_TYPE_PCI,
    DEV_TYPE_PF,
    DEV_TYPE_VF,
    DEV_TYPES,
    PciAddress,
    parse_address,
)
from .discovery import PciRecord, make_record, with_parent_devnames

__all__ = ["TEST_HOST_UUID", "build_sysfs_tree", "libvirt_test_xml", "sriov_topology"]

TEST_HOST_UUID = "6f3c1a52-8b0e-4d57-9a41-2c7d5e0b9f13"

_VF_OFFSET = 0x80  # first VF's routing id offset from its PF (devfn 10.0), like many NICs


# --- topology ---------------------------------------------------------------------

def sriov_topology(pfs: int = 2, vfs_per_pf: int = 8, plain: int = 2) -> list[PciRecord]:
    """An SR-IOV host: ``pfs`` PFs (8086:1521) with ``vfs_per_pf`` VFs (8086:1520) each,
    and ``plain`` ordinary functions (8086:0443), sorted by address.

    PF ``i`` sits at ``0000:<4 + i*span>:00.0`` and its VFs follow from devfn
    ``10.0`` on (spilling onto the next buses for many VFs, as real SR-IOV
    routing ids do); PFs alternate between NUMA nodes 0 and 1, VFs inherit
    their PF's node; plain functions sit at ``0000:00:03.0`` onward with NUMA 0
    or unknown.  Every function has its own IOMMU group; PFs and VFs have
    network interface names.
    """
    if pfs < 0 or vfs_per_pf < 0 or plain < 0:
        raise ValueError("counts must not be negative")
    if plain > 0x1F - 3 + 1:
        raise ValueError(f"at most {0x1F - 3 + 1} plain devices")
    span = 1 + (_VF_OFFSET + vfs_per_pf - 1) // 256 if vfs_per_pf else 1
    first_bus = 4
    if pfs and first_bus + pfs * span - 1 > 0xFF:
        raise ValueError(f"{pfs} PFs with {vfs_per_pf} VFs each do not fit in 256 buses")
    devices: list[PciRecord] = []
    group = 0
    for i in range(plain):
        group += 1
        devices.append(make_record(
            PciAddress(0, 0, 3 + i, 0), "8086", "0443", DEV_TYPE_PCI,
            numa_node=None if i % 2 else 0, iommu_group=group,
        ))
    for p in range(pfs):
        bus = first_bus + p * span
        pf = PciAddress(0, bus, 0, 0)
        numa = p % 2
        group += 1
        devices.append(make_record(
            pf, "8086", "1521", DEV_TYPE_PF, numa_node=numa, iommu_group=group,
            devname=f"enp{bus}s0f0",
        ))
        for v in range(vfs_per_pf):
            rid = _VF_OFFSET + v
            vf = PciAddress(0, bus + rid // 256, (rid % 256) >> 3, rid & 7)
            group += 1
            devices.append(make_record(
                vf, "8086", "1520", DEV_TYPE_VF, numa_node=numa, parent_addr=pf,
                iommu_group=group, devname=f"enp{bus}s0f0v{v}",
            ))
    devices.sort(key=lambda d: parse_address(d["address"]))
    return with_parent_devnames(devices)


def _checked(devices: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], dict[str, list[str]]]:
    """Validate a topology; return it sorted by address and each PF's VFs (sorted)."""
    by_addr: dict[PciAddress, Mapping[str, Any]] = {}
    for index, dev in enumerate(devices):
        try:
            addr = parse_address(dev["address"])
        except (KeyError, TypeError) as exc:
            raise InvalidDevicesJson(f"device #{index} has no address") from exc
        except ValidationError as exc:
            raise InvalidDevicesJson(f"device #{index}: {exc}") from exc
        if addr in by_addr:
            raise InvalidDevicesJson(f"address {addr} appears twice")
        if dev.get("dev_type") not in DEV_TYPES:
            raise InvalidDevicesJson(f"{addr}: dev_type must be one of {DEV_TYPES}, got {dev.get('dev_type')!r}")
        for key in ("vendor_id", "product_id"):
            value = dev.get(key)
            if not isinstance(value, str) or len(value) != 4 or any(c not in "0123456789abcdef" for c in value):
                raise InvalidDevicesJson(f"{addr}: {key} must be 4 lowercase hex digits, got {value!r}")
        for key in ("numa_node", "iommu_group"):
            value = dev.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidDevicesJson(f"{addr}: {key} must be a non-negative integer or None, got {value!r}")
        by_addr[addr] = dev
    children: dict[str, list[str]] = {str(a): [] for a, d in by_addr.items() if d["dev_type"] == DEV_TYPE_PF}
    for addr, dev in sorted(by_addr.items()):
        if dev["dev_type"] == DEV_TYPE_VF:
            try:
                parent = str(parse_address(dev.get("parent_addr")))
            except ValidationError as exc:
                raise InvalidDevicesJson(f"VF {addr}: bad parent_addr: {exc}") from exc
            if parent not in children:
                raise InvalidDevicesJson(f"VF {addr}: parent {parent} is not a PF of the topology")
            children[parent].append(str(addr))
    return [by_addr[a] for a in sorted(by_addr)], children


def _total_vfs(dev: Mapping[str, Any], vfs: list[str]) -> int:
    return int(dev.get("sriov_totalvfs") or max(len(vfs), 1))


def _mac(address: str, devname: str) -> str:
    digest = hashlib.sha256(f"{address}/{devname}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


# --- sysfs ------------------------------------------------------------------------

def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _link(link: Path, target: Path) -> None:
    """A relative symlink (keeps the tree relocatable, like sysfs's own links)."""
    os.symlink(os.path.relpath(target, link.parent), link)


def build_sysfs_tree(
    root: str | Path, devices: Sequence[Mapping[str, Any]], *, symlinks: bool = True
) -> Path:
    """Write a sysfs-like tree for ``devices`` under ``root`` and return ``root``.

    With ``symlinks`` (default) the device directories live under
    ``devices/pci<domain>:00/`` and ``bus/pci/devices/<addr>`` are symlinks to
    them, as on a real host; without, ``bus/pci/devices/<addr>`` are plain
    directories.  Each device gets ``vendor``, ``device``, ``class``,
    ``numa_node``, ``driver_override`` (``(null)``), an ``iommu_group`` link to
    ``kernel/iommu_groups/<n>``, ``physfn``/``virtfn<i>`` links and, for PFs,
    ``sriov_totalvfs``/``sriov_numvfs``; ``net/<devname>/`` when named; a
    ``driver`` link to ``bus/pci/drivers/<name>/`` (with ``bind``/``unbind``
    files) when the dict names one.  ``bus/pci/drivers_probe`` and the
    ``vfio-pci`` driver directory always exist.
    """
    root = Path(root)
    ordered, children = _checked(devices)
    bus_dir = root / "bus" / "pci"
    dev_links = bus_dir / "devices"
    dev_links.mkdir(parents=True, exist_ok=True)
    drivers = bus_dir / "drivers"
    groups_dir = root / "kernel" / "iommu_groups"
    groups_dir.mkdir(parents=True, exist_ok=True)
    _write(bus_dir / "drivers_probe", "")

    def driver_dir(name: str) -> Path:
        path = drivers / name
        if not path.is_dir():
            path.mkdir(parents=True)
            for file in ("bind", "unbind", "new_id", "remove_id"):
                _write(path / file, "")
        return path

    driver_dir("vfio-pci")

    def device_dir(address: str) -> Path:
        if symlinks:
            return root / "devices" / f"pci{address[:4]}:00" / address
        return dev_links / address

    for dev in ordered:
        address = str(parse_address(dev["address"]))
        path = device_dir(address)
        path.mkdir(parents=True)
        if symlinks:
            _link(dev_links / address, path)
        _write(path / "vendor", f"0x{dev['vendor_id']}\n")
        _write(path / "device", f"0x{dev['product_id']}\n")
        _write(path / "class", "0x020000\n" if dev["dev_type"] != DEV_TYPE_PCI else "0x0b4000\n")
        numa = dev.get("numa_node")
        _write(path / "numa_node", f"{-1 if numa is None else numa}\n")
        _write(path / "driver_override", "(null)\n")
        group = dev.get("iommu_group")
        if group is not None:
            group_path = groups_dir / str(group)
            (group_path / "devices").mkdir(parents=True, exist_ok=True)
            _link(path / "iommu_group", group_path)
            _link(group_path / "devices" / address, path)
        if dev["dev_type"] == DEV_TYPE_VF:
            _link(path / "physfn", device_dir(str(parse_address(dev["parent_addr"]))))
        if dev["dev_type"] == DEV_TYPE_PF:
            vfs = children[address]
            _write(path / "sriov_totalvfs", f"{_total_vfs(dev, vfs)}\n")
            _write(path / "sriov_numvfs", f"{len(vfs)}\n")
            for index, vf in enumerate(vfs):
                _link(path / f"virtfn{index}", device_dir(vf))
        devname = dev.get("devname")
        if devname:
            (path / "net" / devname).mkdir(parents=True)
            _write(path / "net" / devname / "address", _mac(address, devname) + "\n")
        driver = dev.get("driver")
        if driver:
            _link(path / "driver", driver_dir(driver))
    return root


# --- libvirt test driver -------------------------------------------------------------

def _address_element(parent: ET.Element, tag: str, address: str) -> None:
    a = parse_address(address)
    ET.SubElement(parent, tag, {
        "domain": f"0x{a.domain:04x}", "bus": f"0x{a.bus:02x}",
        "slot": f"0x{a.slot:02x}", "function": f"0x{a.function:x}",
    })


def libvirt_test_xml(devices: Sequence[Mapping[str, Any]], *, host_uuid: str = TEST_HOST_UUID) -> str:
    """A ``<node>`` document for libvirt's test driver holding ``devices`` as node devices.

    Write it to a file and open ``test:///<absolute path>``.  PCI functions
    become ``pci_dddd_bb_ss_f`` devices under ``computer``; a PF carries
    ``<capability type='virt_functions'>`` listing its VFs, a VF
    ``<capability type='phys_function'>`` with its PF's address; a named
    interface becomes a ``net`` device whose parent is the function.
    """
    ordered, children = _checked(devices)
    node = ET.Element("node")
    computer = ET.SubElement(node, "device")
    ET.SubElement(computer, "name").text = "computer"
    system = ET.SubElement(computer, "capability", {"type": "system"})
    hardware = ET.SubElement(system, "hardware")
    ET.SubElement(hardware, "vendor").text = "kvmslots"
    ET.SubElement(hardware, "uuid").text = host_uuid

    members: dict[int, list[str]] = {}
    for dev in ordered:
        if dev.get("iommu_group") is not None:
            members.setdefault(dev["iommu_group"], []).append(str(parse_address(dev["address"])))

    nets: list[tuple[str, str, str]] = []
    for dev in ordered:
        addr = parse_address(dev["address"])
        address = str(addr)
        element = ET.SubElement(node, "device")
        ET.SubElement(element, "name").text = addr.dev_id
        ET.SubElement(element, "parent").text = "computer"
        cap = ET.SubElement(element, "capability", {"type": "pci"})
        ET.SubElement(cap, "class").text = "0x020000" if dev["dev_type"] != DEV_TYPE_PCI else "0x0b4000"
        ET.SubElement(cap, "domain").text = str(addr.domain)
        ET.SubElement(cap, "bus").text = str(addr.bus)
        ET.SubElement(cap, "slot").text = str(addr.slot)
        ET.SubElement(cap, "function").text = str(addr.function)
        ET.SubElement(cap, "product", {"id": f"0x{dev['product_id']}"})
        ET.SubElement(cap, "vendor", {"id": f"0x{dev['vendor_id']}"})
        if dev["dev_type"] == DEV_TYPE_VF:
            phys = ET.SubElement(cap, "capability", {"type": "phys_function"})
            _address_element(phys, "address", dev["parent_addr"])
        elif dev["dev_type"] == DEV_TYPE_PF:
            vfs = children[address]
            virt = ET.SubElement(cap, "capability", {
                "type": "virt_functions", "maxCount": str(_total_vfs(dev, vfs)),
            })
            for vf in vfs:
                _address_element(virt, "address", vf)
        group = dev.get("iommu_group")
        if group is not None:
            group_el = ET.SubElement(cap, "iommuGroup", {"number": str(group)})
            for member in members[group]:
                _address_element(group_el, "address", member)
        if dev.get("numa_node") is not None:
            ET.SubElement(cap, "numa", {"node": str(dev["numa_node"])})
        if dev.get("devname"):
            nets.append((addr.dev_id, address, dev["devname"]))

    for parent, address, devname in nets:
        mac = _mac(address, devname)
        element = ET.SubElement(node, "device")
        ET.SubElement(element, "name").text = f"net_{devname}_{mac.replace(':', '_')}"
        ET.SubElement(element, "parent").text = parent
        cap = ET.SubElement(element, "capability", {"type": "net"})
        ET.SubElement(cap, "interface").text = devname
        ET.SubElement(cap, "address").text = mac

    ET.indent(node)
    return ET.tostring(node, encoding="unicode") + "\n"


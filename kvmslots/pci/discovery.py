"""List the host's PCI functions in Nova's hypervisor device format.

Two sources give the same list for the same host:

* :func:`discover_sysfs` walks ``<root>/bus/pci/devices`` (no dependency);
* :func:`discover_libvirt` asks libvirt's node device API through
  libvirt-python (imported lazily: the rest of kvmslots works without it).

Each function is one record, sorted by address::

    {"dev_id": "pci_0000_04_00_3", "address": "0000:04:00.3",
     "vendor_id": "8086", "product_id": "1521", "numa_node": 0,
     "label": "label_8086_1521", "dev_type": "type-PF", "iommu_group": 12}

plus ``"parent_addr"`` (the PF's address) for VFs and ``"devname"`` where a
network interface name is known.  ``numa_node`` and ``iommu_group`` are
``None`` when unknown (the kernel's ``-1``).

Classification follows libvirt (and so Nova): a function with a
``phys_function`` (sysfs: a ``physfn`` link) is a VF; one with a
``virt_functions`` capability is a PF even when no VF is enabled -- in sysfs
that is any ``virtfn*`` link or a ``sriov_totalvfs`` above 0 (libvirt does not
report ``virt_functions`` for a device whose ``sriov_totalvfs`` is 0).
Everything else is ``type-PCI``.

The network interface name comes from ``<dev>/net/<ifname>`` (or
``<dev>/virtio*/net/<ifname>`` for virtio-net, where libvirt reports the
interface as a child of the PCI function too); with several, the first by
name.  libvirt reports it as a ``net`` node device whose parent is the PCI
function.

A function in a 32-bit PCI domain (``10000:00:02.0``, behind Intel VMD)
cannot be assigned to a guest and has no place in Nova's address format: it
is skipped with a warning (as Nova's tracker skips it), and so is a VF whose
PF lives in such a domain.

The pure helpers :func:`record_from_sysfs` and :func:`record_from_nodedev_xml`
turn raw sysfs values / node device XML into a record without any I/O.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DiscoveryError, InvalidPciAddress
from .address import DEV_TYPE_PCI, DEV_TYPE_PF, DEV_TYPE_VF, MAX_DOMAIN, PciAddress, parse_address
from .device import has_32bit_domain, hypervisor_record

__all__ = [
    "PciRecord",
    "SysfsFieldError",
    "discover_libvirt",
    "discover_sysfs",
    "interface_from_nodedev_xml",
    "make_record",
    "parse_sysfs_id",
    "record_from_nodedev_xml",
    "record_from_sysfs",
]

PciRecord = dict[str, Any]
T = TypeVar("T")
log = logging.getLogger(__name__)

_HEX_ID_RE = re.compile(r"[0-9a-fA-F]{1,4}")

_VIR_ERR_NO_NODE_DEVICE = 53  # libvirt's VIR_ERR_NO_NODE_DEVICE (stable ABI value)
#: A record's keys in the order discovery lists them; the optional ones only where known.
_RECORD_KEYS = ("dev_id", "address", "vendor_id", "product_id", "numa_node", "label", "dev_type", "parent_addr",
                "iommu_group", "devname")
_OPTIONAL_KEYS = frozenset({"parent_addr", "devname"})


# --- records -----------------------------------------------------------------

def _pci_id(value: str, what: str) -> str:
    """``0x8086`` / ``8086`` / ``0X8086`` -> ``8086``; ValueError when not a 16-bit hex id."""
    text = value.strip()
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    if not _HEX_ID_RE.fullmatch(text):
        raise ValueError(f"{what} must be a 16-bit hex id, got {value!r}")
    return f"{int(text, 16):04x}"


def make_record(
    address: PciAddress | str,
    vendor_id: str,
    product_id: str,
    dev_type: str,
    *,
    numa_node: int | None = None,
    parent_addr: PciAddress | str | None = None,
    iommu_group: int | None = None,
    devname: str | None = None,
) -> PciRecord:
    """One device record in Nova's format (ids normalised to 4 lowercase hex digits), checked by the
    tracker's own rules (:func:`~kvmslots.pci.device.hypervisor_record`).

    Raises :class:`ValueError` (:class:`InvalidPciAddress` for addresses,
    :class:`~kvmslots.errors.InvalidDevicesJson` for the rest) on bad input.
    """
    addr = address if isinstance(address, PciAddress) else parse_address(address)
    vendor = _pci_id(vendor_id, "vendor id")
    product = _pci_id(product_id, "product id")
    record = hypervisor_record({
        "dev_id": addr.dev_id,
        "address": str(addr),
        "vendor_id": vendor,
        "product_id": product,
        "numa_node": None if numa_node is not None and numa_node < 0 else numa_node,
        "label": f"label_{vendor}_{product}",
        "dev_type": dev_type,
        "parent_addr": None if parent_addr is None else str(parent_addr),
        "iommu_group": iommu_group,
        "devname": devname or None,
    })
    return {key: record[key] for key in _RECORD_KEYS if key not in _OPTIONAL_KEYS or record[key] is not None}


def with_parent_devnames(records: list[PciRecord]) -> list[PciRecord]:
    """Give each VF its PF's interface name as ``parent_devname``.

    Nova's usual SR-IOV ``device_spec`` names the PF's netdev
    (``{"devname": "enp4s0f0", "physical_network": ...}``) and means its VFs.
    """
    pf_names = {r["address"]: r["devname"] for r in records if r["dev_type"] == DEV_TYPE_PF and r.get("devname")}
    for record in records:
        parent_name = pf_names.get(record.get("parent_addr", ""))
        if record["dev_type"] == DEV_TYPE_VF and parent_name:
            record["parent_devname"] = parent_name
    return records


# --- sysfs -------------------------------------------------------------------

def parse_sysfs_id(text: str, what: str = "id") -> str:
    """A sysfs ``vendor``/``device`` file's content (``0x8086\\n``) -> ``8086``."""
    return _pci_id(text, what)


class SysfsFieldError(ValueError):
    """A malformed value in one sysfs file; ``field`` is the file's name."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def _field(field: str, parse: Callable[[str], T], text: str) -> T:
    try:
        return parse(text)
    except ValueError as exc:
        raise SysfsFieldError(field, f"{exc} (content {text!r})") from None


def _int_value(text: str) -> int:
    return int(text.strip(), 10)


def _link_address(target: str) -> PciAddress:
    return parse_address(os.path.basename(target.rstrip("/")))


def _link_number(target: str) -> int:
    return int(os.path.basename(target.rstrip("/")), 10)


def record_from_sysfs(
    address: str,
    *,
    vendor: str,
    device: str,
    numa_node: str | None = None,
    iommu_group_link: str | None = None,
    physfn_link: str | None = None,
    sriov_totalvfs: str | None = None,
    has_virtfn: bool = False,
    net_names: Iterable[str] = (),
) -> PciRecord:
    """Build a record from the raw values of one sysfs device directory (pure).

    ``vendor``/``device``/``numa_node``/``sriov_totalvfs`` are file contents;
    the ``*_link`` arguments are symlink targets (only their basenames matter);
    ``has_virtfn`` tells whether any ``virtfn*`` link exists; ``net_names`` are
    the interface names under ``net/``.  A malformed value raises
    :class:`SysfsFieldError` (a :class:`ValueError`) naming the sysfs file.
    """
    addr = parse_address(address)
    vendor_id = _field("vendor", lambda t: parse_sysfs_id(t, "vendor id"), vendor)
    product_id = _field("device", lambda t: parse_sysfs_id(t, "device id"), device)
    numa = None if numa_node is None else _field("numa_node", _int_value, numa_node)
    group = None if iommu_group_link is None else _field("iommu_group", _link_number, iommu_group_link)
    total = 0 if sriov_totalvfs is None else _field("sriov_totalvfs", _int_value, sriov_totalvfs)
    parent: PciAddress | None = None
    if physfn_link is not None:
        parent = _field("physfn", _link_address, physfn_link)
        dev_type = DEV_TYPE_VF
    elif has_virtfn or total > 0:
        dev_type = DEV_TYPE_PF
    else:
        dev_type = DEV_TYPE_PCI
    names = sorted(n for n in net_names if n)
    return make_record(
        addr,
        vendor_id,
        product_id,
        dev_type,
        numa_node=numa,
        parent_addr=parent,
        iommu_group=group,
        devname=names[0] if names else None,
    )


class _Vanished(Exception):
    """The device directory disappeared while we read it (hot unplug)."""


class _WideDomain(DiscoveryError):
    """A function (or its PF) in a 32-bit PCI domain: not assignable, skipped by the discoverers."""


def _warn_skipped(what: str) -> None:
    log.warning("Skipping PCI device %s: its PCI domain is above ffff (a 32-bit domain, e.g. behind Intel VMD, "
                "cannot be assigned to a guest)", what)


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _readlink_optional(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # exists but is not a symlink
            raise ValueError(f"{path} is not a symlink") from None
        raise


def _list_optional(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _net_names(dev: Path) -> list[str]:
    names = _list_optional(dev / "net")
    if names:
        return names
    for child in _list_optional(dev):
        if child.startswith("virtio"):
            names.extend(_list_optional(dev / child / "net"))
    return names


def _sysfs_device(dev: Path, name: str) -> PciRecord:
    """Read one device directory; ``_Vanished`` if it went away, else DiscoveryError."""
    current = dev
    try:
        current = dev / "vendor"
        vendor = current.read_text()
        current = dev / "device"
        device = current.read_text()
        current = dev / "numa_node"
        numa = _read_optional(current)
        current = dev / "iommu_group"
        group = _readlink_optional(current)
        current = dev / "physfn"
        physfn = _readlink_optional(current)
        current = dev / "sriov_totalvfs"
        total = _read_optional(current)
        current = dev
        has_virtfn = any(e.startswith("virtfn") for e in _list_optional(dev))
        current = dev / "net"
        net = _net_names(dev)
    except OSError as exc:
        if not dev.exists():
            raise _Vanished() from None
        raise DiscoveryError(f"cannot read {current}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a file where a symlink belongs
        if not dev.exists():
            raise _Vanished() from None
        raise DiscoveryError(f"malformed sysfs entry {current}: {exc}") from exc
    if physfn is not None and has_32bit_domain(os.path.basename(physfn.rstrip("/"))):
        raise _WideDomain(f"{dev}: its PF {physfn} is in a 32-bit PCI domain")
    try:
        return record_from_sysfs(
            name,
            vendor=vendor,
            device=device,
            numa_node=numa,
            iommu_group_link=group,
            physfn_link=physfn,
            sriov_totalvfs=total,
            has_virtfn=has_virtfn,
            net_names=net,
        )
    except SysfsFieldError as exc:
        raise DiscoveryError(f"malformed sysfs entry {dev / exc.field}: {exc}") from exc
    except ValueError as exc:
        raise DiscoveryError(f"malformed sysfs entry {dev}: {exc}") from exc


def discover_sysfs(root: str | Path = "/sys") -> list[PciRecord]:
    """The host's PCI functions read from ``<root>/bus/pci/devices`` (sorted by address).

    Entries may be symlinks (a real sysfs) or plain directories (a test tree).
    A device that disappears during the walk (hot unplug) is skipped; any other
    unreadable or malformed entry raises :class:`DiscoveryError` naming the path.
    """
    devices_dir = Path(root) / "bus" / "pci" / "devices"
    try:
        names = os.listdir(devices_dir)
    except OSError as exc:
        raise DiscoveryError(f"cannot list {devices_dir}: {exc.strerror or exc}") from exc
    found: dict[PciAddress, PciRecord] = {}
    for name in names:
        dev = devices_dir / name
        if has_32bit_domain(name):
            _warn_skipped(str(dev))
            continue
        try:
            addr = parse_address(name)
        except InvalidPciAddress as exc:
            raise DiscoveryError(f"malformed sysfs entry {dev}: {exc}") from exc
        try:
            record = _sysfs_device(dev, name)
        except _Vanished:
            continue
        except _WideDomain:
            _warn_skipped(f"{dev} (its PF)")
            continue
        if addr in found:
            raise DiscoveryError(f"two sysfs entries for PCI address {addr} under {devices_dir}")
        found[addr] = record
    return with_parent_devnames([found[a] for a in sorted(found)])


# --- libvirt -------------------------------------------------------------------

def _xml_int(text: str | None, what: str) -> int:
    """libvirt writes numbers in decimal, but accepts and sometimes shows ``0x`` hex."""
    if text is None or not text.strip():
        raise ValueError(f"missing {what}")
    value = text.strip()
    try:
        if value[:2] in ("0x", "0X"):
            return int(value, 16)  # int() accepts the 0x prefix with base 16
        return int(value, 10)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a number") from None


def _xml_address(element: ET.Element, what: str) -> PciAddress:
    """An ``<address domain= bus= slot= function=>`` element."""
    try:
        return PciAddress(
            _xml_int(element.get("domain"), f"{what} domain"),
            _xml_int(element.get("bus"), f"{what} bus"),
            _xml_int(element.get("slot"), f"{what} slot"),
            _xml_int(element.get("function"), f"{what} function"),
        )
    except InvalidPciAddress as exc:
        raise ValueError(f"{what}: {exc}") from None


def _parse_xml(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DiscoveryError(f"malformed node device XML: {exc}") from exc
    if root.tag != "device":
        raise DiscoveryError(f"node device XML has root <{root.tag}>, expected <device>")
    return root


def record_from_nodedev_xml(xml: str, devname: str | None = None) -> PciRecord:
    """A libvirt PCI node device's ``XMLDesc()`` -> record (pure).

    :class:`DiscoveryError` when the XML is malformed or not a PCI device.
    """
    root = _parse_xml(xml)
    name = (root.findtext("name") or "?").strip()
    cap = root.find("capability[@type='pci']")
    if cap is None:
        raise DiscoveryError(f"node device {name} has no <capability type='pci'>")
    try:
        domain = _xml_int(cap.findtext("domain"), "domain")
        if domain > MAX_DOMAIN:
            raise _WideDomain(f"node device {name} is in the 32-bit PCI domain {domain:x}")
        addr = PciAddress(
            domain,
            _xml_int(cap.findtext("bus"), "bus"),
            _xml_int(cap.findtext("slot"), "slot"),
            _xml_int(cap.findtext("function"), "function"),
        )
        vendor = cap.find("vendor")
        product = cap.find("product")
        if vendor is None or vendor.get("id") is None:
            raise ValueError("missing <vendor id=...>")
        if product is None or product.get("id") is None:
            raise ValueError("missing <product id=...>")
        numa: int | None = None
        numa_el = cap.find("numa")
        if numa_el is not None and numa_el.get("node") is not None:
            numa = _xml_int(numa_el.get("node"), "numa node")  # -1 (unknown) -> None in make_record
        group: int | None = None
        group_el = cap.find("iommuGroup")
        if group_el is not None:
            group = _xml_int(group_el.get("number"), "iommuGroup number")
        dev_type = DEV_TYPE_PCI
        parent: PciAddress | None = None
        for sub in cap.findall("capability"):
            kind = sub.get("type")
            if kind == "phys_function":
                pf = sub.find("address")
                if pf is None:
                    raise ValueError("<capability type='phys_function'> without <address>")
                if _xml_int(pf.get("domain"), "phys_function address domain") > MAX_DOMAIN:
                    raise _WideDomain(f"node device {name}: its PF is in a 32-bit PCI domain")
                parent = _xml_address(pf, "phys_function address")
                dev_type = DEV_TYPE_VF
            elif kind == "virt_functions" and dev_type != DEV_TYPE_VF:
                dev_type = DEV_TYPE_PF
        return make_record(
            addr,
            vendor.get("id", ""),
            product.get("id", ""),
            dev_type,
            numa_node=numa,
            parent_addr=parent,
            iommu_group=group,
            devname=devname,
        )
    except ValueError as exc:  # includes InvalidPciAddress
        raise DiscoveryError(f"malformed node device {name}: {exc}") from exc


def interface_from_nodedev_xml(xml: str) -> tuple[str, str] | None:
    """A ``net`` node device's XML -> ``(parent device name, interface name)``, or None (pure)."""
    root = _parse_xml(xml)
    cap = root.find("capability[@type='net']")
    parent = (root.findtext("parent") or "").strip()
    if cap is None or not parent:
        return None
    ifname = (cap.findtext("interface") or "").strip()
    return (parent, ifname) if ifname else None


def _import_libvirt(error: type[Exception]) -> Any:
    try:
        import libvirt  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError as exc:
        raise error(
            "libvirt-python is not installed (pip install 'kvmslots[libvirt]'; "
            "building it needs libvirt-dev and pkg-config)"
        ) from exc
    return libvirt


def _libvirt_message(exc: BaseException) -> str:
    getter = getattr(exc, "get_error_message", None)
    message = getter() if callable(getter) else None
    return str(message or exc)


@contextmanager
def _connection(libvirt: Any, conn_or_uri: Any, read_only: bool, error: type[Exception]) -> Iterator[Any]:
    """Yield a connection: the caller's object, or one opened on a URI and closed after."""
    if not isinstance(conn_or_uri, str):
        yield conn_or_uri
        return
    try:
        conn = libvirt.openReadOnly(conn_or_uri) if read_only else libvirt.open(conn_or_uri)
    except libvirt.libvirtError as exc:
        raise error(f"cannot connect to libvirt at {conn_or_uri}: {_libvirt_message(exc)}") from exc
    if conn is None:  # very old bindings returned None instead of raising
        raise error(f"cannot connect to libvirt at {conn_or_uri}")
    try:
        yield conn
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def _is_gone(exc: BaseException) -> bool:
    getter = getattr(exc, "get_error_code", None)
    return callable(getter) and getter() == _VIR_ERR_NO_NODE_DEVICE


def discover_libvirt(conn_or_uri: Any) -> list[PciRecord]:
    """The host's PCI functions from libvirt's node devices (sorted by address).

    ``conn_or_uri`` is an open ``virConnect`` (left open) or a URI such as
    ``qemu:///system`` or ``test:///abs/path.xml`` (opened read-only and
    closed).  libvirt errors become :class:`DiscoveryError` carrying
    libvirt's message.  A device that disappears between listing and reading
    (hot unplug) is skipped.
    """
    libvirt = _import_libvirt(DiscoveryError)
    with _connection(libvirt, conn_or_uri, True, DiscoveryError) as conn:
        def descriptions(capability: int) -> list[str]:
            """XML of every node device with *capability*; one that vanishes meanwhile is skipped."""
            found: list[str] = []
            for dev in conn.listAllDevices(capability):
                try:
                    found.append(dev.XMLDesc(0))
                except libvirt.libvirtError as exc:
                    if not _is_gone(exc):
                        raise
            return found

        try:
            pci_xml = descriptions(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV)
            net_xml = descriptions(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_NET)
        except libvirt.libvirtError as exc:
            raise DiscoveryError(f"libvirt node device listing failed: {_libvirt_message(exc)}") from exc

    interfaces: dict[str, list[str]] = {}
    for xml in net_xml:
        pair = interface_from_nodedev_xml(xml)
        if pair is not None:
            interfaces.setdefault(pair[0], []).append(pair[1])

    found: dict[PciAddress, PciRecord] = {}
    for xml in pci_xml:
        name = (_parse_xml(xml).findtext("name") or "").strip()
        names = sorted(interfaces.get(name, ()))
        try:
            record = record_from_nodedev_xml(xml, devname=names[0] if names else None)
        except _WideDomain:
            _warn_skipped(f"node device {name}")
            continue
        addr = parse_address(record["address"])
        if addr in found:
            raise DiscoveryError(f"libvirt reports PCI address {addr} twice")
        found[addr] = record
    return with_parent_devnames([found[a] for a in sorted(found)])

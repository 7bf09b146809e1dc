"""Host PCI discovery and binding without libvirt: fake sysfs trees and literal XML.

The sysfs binder has no kernel behind a fake tree, so these tests check only
what is honest: which files it writes, in which order, and that it reports a
driver link that did not change (fault injection).  Real libvirt-python is
exercised in ``integration/test_pci_discovery.py``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmslots.errors import (
    DiscoveryError,
    HostBindError,
    InvalidDevicesJson,
    InvalidPciAddress,
    IommuGroupNotViable,
)
from kvmslots.pci.address import DEV_TYPE_PCI, DEV_TYPE_PF, DEV_TYPE_VF, parse_address
from kvmslots.pci.binding import HostBinder, LibvirtBinder, SysfsBinder, leaves_dma_to_owner
from kvmslots.pci.discovery import (
    discover_sysfs,
    interface_from_nodedev_xml,
    make_record,
    record_from_nodedev_xml,
    record_from_sysfs,
    with_parent_devnames,
)
from kvmslots.pci.fakehost import build_sysfs_tree, libvirt_test_xml, sriov_topology

PF = "0000:04:00.0"
VF = "0000:04:10.3"


# --- topology and sysfs discovery ---------------------------------------------------

def test_sriov_topology_shape() -> None:
    topo = sriov_topology(pfs=2, vfs_per_pf=8, plain=2)
    assert len(topo) == 2 + 2 * 8 + 2
    assert [d["address"] for d in topo] == sorted((d["address"] for d in topo), key=parse_address)
    pfs = [d for d in topo if d["dev_type"] == DEV_TYPE_PF]
    vfs = [d for d in topo if d["dev_type"] == DEV_TYPE_VF]
    plain = [d for d in topo if d["dev_type"] == DEV_TYPE_PCI]
    assert len(pfs) == 2 and len(vfs) == 16 and len(plain) == 2
    for pf in pfs:
        assert sum(vf["parent_addr"] == pf["address"] for vf in vfs) == 8
    assert all("parent_addr" not in d for d in pfs + plain)
    assert {d["numa_node"] for d in plain} == {0, None}
    pf0 = pfs[0]
    assert pf0 == {
        "dev_id": "pci_0000_04_00_0", "address": PF, "vendor_id": "8086", "product_id": "1521",
        "numa_node": 0, "label": "label_8086_1521", "dev_type": DEV_TYPE_PF, "iommu_group": 3,
        "devname": "enp4s0f0",
    }


def test_sriov_topology_many_vfs_spill_onto_next_buses() -> None:
    topo = sriov_topology(pfs=3, vfs_per_pf=300, plain=0)
    addresses = [d["address"] for d in topo]
    assert len(set(addresses)) == len(topo) == 3 + 900
    for d in topo:
        parse_address(d["address"])
    assert "0000:05:00.0" in addresses  # VF 128 of the first PF: routing id 0x80 + 128 = 0x100
    with pytest.raises(ValueError):
        sriov_topology(pfs=200, vfs_per_pf=300)


@pytest.mark.parametrize("symlinks", [True, False], ids=["symlinks", "plain-dirs"])
def test_sysfs_discovery_gives_the_topology_back(tmp_path: Path, symlinks: bool) -> None:
    topo = sriov_topology(pfs=2, vfs_per_pf=8, plain=2)
    root = build_sysfs_tree(tmp_path / "sys", topo, symlinks=symlinks)
    assert discover_sysfs(root) == topo
    assert discover_sysfs(str(root)) == topo


def test_pf_without_enabled_vfs_is_still_a_pf(tmp_path: Path) -> None:
    topo = [
        make_record("0000:81:00.0", "8086", "1572", DEV_TYPE_PF, numa_node=1, iommu_group=40),
        make_record("0000:81:00.1", "8086", "1572", DEV_TYPE_PCI, numa_node=1, iommu_group=41),
    ]
    root = build_sysfs_tree(tmp_path, topo)
    assert discover_sysfs(root) == topo
    assert (root / "bus/pci/devices/0000:81:00.0/sriov_totalvfs").read_text() == "1\n"
    # libvirt reports no virt_functions capability when the device can have no VF
    (root / "bus/pci/devices/0000:81:00.0/sriov_totalvfs").write_text("0\n")
    assert discover_sysfs(root)[0]["dev_type"] == DEV_TYPE_PCI


def test_devname_from_virtio_child(tmp_path: Path) -> None:
    topo = [make_record("0000:00:03.0", "1af4", "1041", DEV_TYPE_PCI)]
    root = build_sysfs_tree(tmp_path, topo)
    (root / "bus/pci/devices/0000:00:03.0/virtio0/net/eth0").mkdir(parents=True)
    assert discover_sysfs(root)[0]["devname"] == "eth0"


def _tree(tmp_path: Path) -> Path:
    return build_sysfs_tree(tmp_path / "sys", sriov_topology(pfs=1, vfs_per_pf=2, plain=1))


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("vendor", "0xzz86\n"),
        ("vendor", "\n"),
        ("device", "0x123456\n"),
        ("numa_node", "zero\n"),
        ("sriov_totalvfs", "many\n"),
    ],
)
def test_malformed_file_names_the_path(tmp_path: Path, file: str, content: str) -> None:
    root = _tree(tmp_path)
    target = root / "bus/pci/devices" / PF / file
    target.write_text(content)
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs(root)
    assert str(target) in str(info.value)


def test_missing_vendor_file(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    target = root / "bus/pci/devices" / PF / "vendor"
    target.unlink()
    with pytest.raises(DiscoveryError, match="cannot read .*vendor"):
        discover_sysfs(root)


@pytest.mark.parametrize(
    ("link", "target"),
    [("iommu_group", "../../kernel/iommu_groups/abc"), ("physfn", "../0000:04:00.9")],
)
def test_malformed_links(tmp_path: Path, link: str, target: str) -> None:
    root = _tree(tmp_path)
    path = root / "bus/pci/devices" / "0000:04:10.0" / link
    if path.is_symlink():
        path.unlink()
    os.symlink(target, path)
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs(root)
    assert str(path) in str(info.value)


def test_regular_file_where_a_link_belongs(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    path = root / "bus/pci/devices" / PF / "iommu_group"
    path.unlink()
    path.write_text("3\n")
    with pytest.raises(DiscoveryError, match="iommu_group"):
        discover_sysfs(root)


def test_bad_entry_name_and_missing_directory(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "bus/pci/devices/not-an-address").mkdir()
    with pytest.raises(DiscoveryError, match="not-an-address"):
        discover_sysfs(root)
    with pytest.raises(DiscoveryError, match="cannot list"):
        discover_sysfs(tmp_path / "nowhere")


def test_device_unplugged_during_walk_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = sriov_topology(pfs=1, vfs_per_pf=2, plain=1)
    root = build_sysfs_tree(tmp_path / "sys", topo)
    # the kernel removed the device directory, the bus link is still listed
    os.symlink("../../../devices/pci0000:00/0000:00:1f.0", root / "bus/pci/devices/0000:00:1f.0")
    # and a name that was listed and is gone entirely by the time it is read
    real_listdir = os.listdir

    def listdir(path: str | os.PathLike[str]) -> list[str]:
        names = real_listdir(path)
        return names + ["0000:00:1e.0"] if str(path).endswith("bus/pci/devices") else names

    monkeypatch.setattr(os, "listdir", listdir)  # the same os module discovery uses
    assert discover_sysfs(root) == topo


def test_record_from_sysfs_pure() -> None:
    rec = record_from_sysfs(
        "0000:04:10.3", vendor="0x8086\n", device="0x1520\n", numa_node="-1\n",
        iommu_group_link="../../../../kernel/iommu_groups/17", physfn_link="../0000:04:00.0",
    )
    assert rec == {
        "dev_id": "pci_0000_04_10_3", "address": VF, "vendor_id": "8086", "product_id": "1520",
        "numa_node": None, "label": "label_8086_1520", "dev_type": DEV_TYPE_VF,
        "parent_addr": PF, "iommu_group": 17,
    }
    pf = record_from_sysfs(PF, vendor="0x8086", device="0x1521", numa_node="1", has_virtfn=True,
                           net_names=["eth1", "eth0"])
    assert (pf["dev_type"], pf["numa_node"], pf["iommu_group"], pf["devname"]) == (DEV_TYPE_PF, 1, None, "eth0")
    with pytest.raises(ValueError, match="vendor"):
        record_from_sysfs(PF, vendor="intel", device="0x1521")


# --- node device XML --------------------------------------------------------------

PF_XML = """
<device>
  <name>pci_0000_04_00_0</name>
  <path>/sys/devices/pci0000:00/0000:00:02.0/0000:04:00.0</path>
  <parent>pci_0000_00_02_0</parent>
  <driver><name>igb</name></driver>
  <capability type='pci'>
    <class>0x020000</class>
    <domain>0</domain>
    <bus>4</bus>
    <slot>0</slot>
    <function>0</function>
    <product id='0x1521'>I350 Gigabit Network Connection</product>
    <vendor id='0x8086'>Intel Corporation</vendor>
    <capability type='virt_functions' maxCount='7'/>
    <iommuGroup number='12'>
      <address domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </iommuGroup>
    <numa node='1'/>
    <pci-express><link validity='cap' port='0' speed='5' width='4'/></pci-express>
  </capability>
</device>
"""

VF_XML = """
<device>
  <name>pci_0000_04_10_3</name>
  <capability type='pci'>
    <domain>0x0000</domain>
    <bus>0x04</bus>
    <slot>0x10</slot>
    <function>0x3</function>
    <product id='0x1520'/>
    <vendor id='0x8086'/>
    <capability type='phys_function'>
      <address domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </capability>
    <numa node='-1'/>
  </capability>
</device>
"""


def test_pf_xml_with_empty_virt_functions() -> None:
    assert record_from_nodedev_xml(PF_XML) == {
        "dev_id": "pci_0000_04_00_0", "address": PF, "vendor_id": "8086", "product_id": "1521",
        "numa_node": 1, "label": "label_8086_1521", "dev_type": DEV_TYPE_PF, "iommu_group": 12,
    }


def test_vf_xml_hex_numbers_and_unknown_numa() -> None:
    assert record_from_nodedev_xml(VF_XML, devname="enp4s16f3") == {
        "dev_id": "pci_0000_04_10_3", "address": VF, "vendor_id": "8086", "product_id": "1520",
        "numa_node": None, "label": "label_8086_1520", "dev_type": DEV_TYPE_VF,
        "parent_addr": PF, "iommu_group": None, "devname": "enp4s16f3",
    }


def test_plain_xml() -> None:
    xml = PF_XML.replace("<capability type='virt_functions' maxCount='7'/>", "")
    rec = record_from_nodedev_xml(xml)
    assert rec["dev_type"] == DEV_TYPE_PCI and "parent_addr" not in rec


@pytest.mark.parametrize(
    ("xml", "match"),
    [
        ("<device><name>x", "malformed node device XML"),
        ("<node/>", "expected <device>"),
        ("<device><name>net_eth0</name><capability type='net'/></device>", "no <capability type='pci'>"),
        (PF_XML.replace("<vendor id='0x8086'>Intel Corporation</vendor>", ""), "vendor"),
        (PF_XML.replace("id='0x1521'", "id='0x15210'"), "product id"),
        (PF_XML.replace("<slot>0</slot>", "<slot>40</slot>"), "slot"),
        (PF_XML.replace("<bus>4</bus>", "<bus>four</bus>"), "pci_0000_04_00_0"),
        (PF_XML.replace("<bus>4</bus>", ""), "bus"),
        (VF_XML.replace("<address domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>", ""),
         "phys_function"),
        (VF_XML.replace("function='0x0'", "function='0x9'"), "phys_function address"),
        (PF_XML.replace("<iommuGroup number='12'>", "<iommuGroup number='x'>"), "iommuGroup"),
    ],
)
def test_malformed_xml(xml: str, match: str) -> None:
    with pytest.raises(DiscoveryError, match=match):
        record_from_nodedev_xml(xml)


def test_interface_from_net_xml() -> None:
    xml = """<device><name>net_eth0_52_54_00_12_34_56</name><parent>pci_0000_04_00_0</parent>
      <capability type='net'><interface>eth0</interface><address>52:54:00:12:34:56</address>
      </capability></device>"""
    assert interface_from_nodedev_xml(xml) == ("pci_0000_04_00_0", "eth0")
    assert interface_from_nodedev_xml(PF_XML) is None


def test_libvirt_test_xml_renders_the_topology() -> None:
    """Pure check of the fake host XML: each PCI <device> parses back to its record."""
    topo = sriov_topology(pfs=2, vfs_per_pf=8, plain=2)
    root = ET.fromstring(libvirt_test_xml(topo))
    assert root.tag == "node"
    computer = root.find("device[name='computer']")
    assert computer is not None and computer.findtext("capability/hardware/uuid")
    nets = {d.findtext("parent"): d.findtext("capability/interface")
            for d in root.findall("device") if d.find("capability[@type='net']") is not None}
    parsed = [
        record_from_nodedev_xml(ET.tostring(d, encoding="unicode"), devname=nets.get(d.findtext("name")))
        for d in root.findall("device") if d.find("capability[@type='pci']") is not None
    ]
    assert with_parent_devnames(parsed) == topo


def test_fakehost_rejects_bad_topologies(tmp_path: Path) -> None:
    pf = make_record(PF, "8086", "1521", DEV_TYPE_PF)
    orphan = make_record(VF, "8086", "1520", DEV_TYPE_VF, parent_addr="0000:09:00.0")
    with pytest.raises(InvalidDevicesJson, match="twice"):
        libvirt_test_xml([pf, pf])
    with pytest.raises(InvalidDevicesJson, match="not a PF"):
        build_sysfs_tree(tmp_path, [pf, orphan])
    with pytest.raises(InvalidDevicesJson, match="vendor_id"):
        libvirt_test_xml([{**pf, "vendor_id": "0x8086"}])


# --- sysfs binder (fault injection: no kernel behind the tree) --------------------------

def _bound_tree(tmp_path: Path, driver: str | None) -> Path:
    pf = make_record(PF, "8086", "1521", DEV_TYPE_PF, iommu_group=3)
    vf = make_record(VF, "8086", "1520", DEV_TYPE_VF, parent_addr=PF, iommu_group=4)
    if driver:
        vf["driver"] = driver
    return build_sysfs_tree(tmp_path / "sys", [pf, vf])


def _recording(binder: SysfsBinder, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str]]:
    writes: list[tuple[Path, str]] = []
    real = binder._write

    def write(addr: object, path: Path, text: str) -> None:
        writes.append((path.resolve(), text))
        real(addr, path, text)  # type: ignore[arg-type]

    monkeypatch.setattr(binder, "_write", write)
    return writes


def _snapshot(root: Path) -> dict[str, object]:
    state: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                state[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                state[str(path)] = ("file", path.read_bytes(), path.stat().st_mtime_ns)
    return state


def test_sysfs_binder_detach_writes_in_order_and_reports_unchanged_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _bound_tree(tmp_path, "igbvf")
    binder = SysfsBinder(root)
    assert isinstance(binder, HostBinder)
    assert binder.driver(VF) == "igbvf"
    writes = _recording(binder, monkeypatch)
    dev = (root / "bus/pci/devices" / VF).resolve()
    probe = (root / "bus/pci/drivers_probe").resolve()
    with pytest.raises(HostBindError) as info:
        binder.detach(VF)
    assert writes == [
        (dev / "driver_override", "vfio-pci"),
        ((root / "bus/pci/drivers/igbvf/unbind").resolve(), VF),
        (probe, VF),
        # the link did not move: clear the override and let the host driver have it back
        (dev / "driver_override", "\n"),
        (probe, VF),
    ]
    message = str(info.value)
    assert VF in message and "igbvf" in message and "vfio-pci" in message and "drivers_probe" in message
    assert (root / "bus/pci/drivers/igbvf/unbind").read_text() == VF
    assert (dev / "driver_override").read_text() == "\n"


def test_sysfs_binder_detach_unbound_device_skips_unbind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _bound_tree(tmp_path, None)
    binder = SysfsBinder(root)
    assert binder.driver(VF) is None
    writes = _recording(binder, monkeypatch)
    with pytest.raises(HostBindError, match="no driver"):
        binder.detach(VF)
    assert [p.name for p, _ in writes] == ["driver_override", "drivers_probe", "driver_override", "drivers_probe"]


def test_sysfs_binder_detach_already_on_vfio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _bound_tree(tmp_path, "vfio-pci")
    binder = SysfsBinder(root)
    writes = _recording(binder, monkeypatch)
    binder.detach(VF)
    assert [(p.name, t) for p, t in writes] == [("driver_override", "vfio-pci")]


def test_sysfs_binder_reattach_writes_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _bound_tree(tmp_path, "vfio-pci")
    binder = SysfsBinder(root)
    writes = _recording(binder, monkeypatch)
    dev = (root / "bus/pci/devices" / VF).resolve()
    with pytest.raises(HostBindError, match="still points to vfio-pci"):
        binder.reattach(VF)
    assert writes == [
        ((root / "bus/pci/drivers/vfio-pci/unbind").resolve(), VF),
        (dev / "driver_override", "\n"),
        ((root / "bus/pci/drivers_probe").resolve(), VF),
    ]


def test_sysfs_binder_write_failure_names_device_and_file(tmp_path: Path) -> None:
    root = _bound_tree(tmp_path, "igbvf")
    override = root / "bus/pci/devices" / VF / "driver_override"
    override.unlink()  # the kernel has no driver_override for this device
    with pytest.raises(HostBindError) as info:
        SysfsBinder(root).detach(VF)
    assert VF in str(info.value) and "driver_override" in str(info.value)
    assert not override.exists()  # never created
    with pytest.raises(HostBindError, match="not found"):
        SysfsBinder(root).detach("0000:09:00.0")


# --- sysfs binder: IOMMU group viability ---------------------------------------------

BRIDGE, OURS, OTHER = "0000:05:00.0", "0000:06:01.0", "0000:06:02.0"


def _shared_group_tree(tmp_path: Path, other_driver: str | None, ours: str = "nvme") -> Path:
    """Two functions behind a PCIe-to-PCI bridge: the bridge and both share IOMMU group 7."""
    bridge = make_record(BRIDGE, "1b36", "000e", DEV_TYPE_PCI, iommu_group=7)
    mine = {**make_record(OURS, "1b36", "0010", DEV_TYPE_PCI, iommu_group=7), "driver": ours}
    other = make_record(OTHER, "1b36", "0010", DEV_TYPE_PCI, iommu_group=7)
    if other_driver:
        other["driver"] = other_driver
    return build_sysfs_tree(tmp_path / "sys", [bridge, mine, other])


@pytest.mark.parametrize(
    ("driver", "leaves"),
    [(None, True), ("vfio-pci", True), ("pci-stub", True), ("pcieport", True), ("mlx5_vfio_pci", True),
     ("hisi_acc_vfio_pci", True), ("nvme", False), ("igbvf", False), ("ahci", False), ("shpchp", False)],
)
def test_which_drivers_leave_dma_to_the_groups_owner(driver: str | None, leaves: bool) -> None:
    assert leaves_dma_to_owner(driver) is leaves


def test_detach_refuses_a_function_whose_group_has_a_member_on_a_dma_driver_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _shared_group_tree(tmp_path, "nvme")
    binder = SysfsBinder(root)
    writes = _recording(binder, monkeypatch)
    before = _snapshot(tmp_path)
    assert binder.group_blockers(OURS) == {OTHER: "nvme"}
    with pytest.raises(IommuGroupNotViable) as info:
        binder.detach(OURS)
    error = info.value
    assert isinstance(error, HostBindError)  # what the hot add's undo and callers already catch
    assert (error.address, error.iommu_group, error.blocking) == (OURS, 7, {OTHER: "nvme"})
    assert error.facts() == {"address": OURS, "iommu_group": 7, "blocking": {OTHER: "nvme"}}
    assert f"{OTHER} (driver nvme)" in str(error) and "group 7" in str(error)
    assert BRIDGE not in str(error)  # no driver: not in the way
    assert writes == [] and _snapshot(tmp_path) == before
    assert binder.driver(OURS) == "nvme"


def test_a_function_already_on_vfio_pci_in_a_group_that_is_not_viable_is_refused_too(tmp_path: Path) -> None:
    root = _shared_group_tree(tmp_path, "nvme", ours="vfio-pci")
    with pytest.raises(IommuGroupNotViable, match=OTHER):
        SysfsBinder(root).detach(OURS)  # QEMU could not open it either


@pytest.mark.parametrize("other_driver", [None, "vfio-pci", "pci-stub", "pcieport", "mlx5_vfio_pci"])
def test_detach_goes_ahead_when_every_other_member_leaves_dma_to_the_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_driver: str | None
) -> None:
    root = _shared_group_tree(tmp_path, other_driver, ours="vfio-pci")
    binder = SysfsBinder(root)
    assert binder.group_blockers(OURS) == {}
    writes = _recording(binder, monkeypatch)
    binder.detach(OURS)
    assert [(p.name, t) for p, t in writes] == [("driver_override", "vfio-pci")]


def test_detach_of_a_host_driver_bound_function_in_a_viable_group_writes_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _shared_group_tree(tmp_path, "vfio-pci")
    binder = SysfsBinder(root)
    writes = _recording(binder, monkeypatch)
    with pytest.raises(HostBindError, match="drivers_probe") as info:  # no kernel moves the link here
        binder.detach(OURS)
    assert not isinstance(info.value, IommuGroupNotViable)
    assert [p.name for p, _ in writes] == ["driver_override", "unbind", "drivers_probe", "driver_override",
                                           "drivers_probe"]


def test_a_function_without_an_iommu_group_is_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_sysfs_tree(tmp_path / "sys", [{**make_record(OURS, "1b36", "0010", DEV_TYPE_PCI), "driver": "nvme"}])
    binder = SysfsBinder(root)
    assert binder.group_blockers(OURS) == {}
    writes = _recording(binder, monkeypatch)
    with pytest.raises(HostBindError) as info:
        binder.detach(OURS)
    assert not isinstance(info.value, IommuGroupNotViable) and writes[0][0].name == "driver_override"


@pytest.mark.parametrize(
    "address",
    ["../../../../etc/passwd", "0000:04:10.3/../../..", "0000:04:10.8", "0000:04:20.0", "", "pci_0000_04_10_3"],
)
def test_bad_address_rejected_before_any_file_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    root = _bound_tree(tmp_path, "igbvf")
    binder = SysfsBinder(root)
    writes = _recording(binder, monkeypatch)
    before = _snapshot(tmp_path)
    for call in (binder.detach, binder.reattach, binder.driver, binder.group_blockers):
        with pytest.raises(InvalidPciAddress):
            call(address)
    with pytest.raises(InvalidPciAddress):
        LibvirtBinder("test:///default").detach(address)
    assert writes == []
    assert _snapshot(tmp_path) == before

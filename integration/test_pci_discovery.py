"""Host PCI discovery through the real libvirt-python binding and the real sysfs.

These tests FAIL (never skip) when libvirt-python is missing: install it with
``apt-get install libvirt-dev pkg-config`` and ``pip install '.[libvirt]'``
(``.ci/install`` does both).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvmslots.errors import DiscoveryError, HostBindError
from kvmslots.pci.address import DEV_TYPE_PF, DEV_TYPE_VF, DEV_TYPES, parse_address
from kvmslots.pci.binding import HostBinder, LibvirtBinder
from kvmslots.pci.discovery import discover_libvirt, discover_sysfs
from kvmslots.pci.fakehost import build_sysfs_tree, libvirt_test_xml, sriov_topology


@pytest.fixture
def libvirt() -> ModuleType:
    try:
        import libvirt as module  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError as exc:  # pragma: no cover - the point is to fail loudly
        pytest.fail(f"libvirt-python is not installed ({exc}); run .ci/install", pytrace=False)
    assert isinstance(module, ModuleType)
    return module


@pytest.fixture
def topology() -> list[dict[str, Any]]:
    return sriov_topology(pfs=2, vfs_per_pf=8, plain=2)


@pytest.fixture
def test_uri(tmp_path: Path, topology: list[dict[str, Any]]) -> str:
    path = (tmp_path / "node.xml").absolute()
    path.write_text(libvirt_test_xml(topology))
    return f"test://{path}"  # test:///abs/path.xml


def test_libvirt_and_sysfs_discovery_agree(
    libvirt: ModuleType, tmp_path: Path, topology: list[dict[str, Any]], test_uri: str
) -> None:
    from_libvirt = discover_libvirt(test_uri)
    from_sysfs = discover_sysfs(build_sysfs_tree(tmp_path / "sys", topology))
    assert from_libvirt == from_sysfs
    assert from_libvirt == topology
    assert sum(d["dev_type"] == DEV_TYPE_PF for d in from_libvirt) == 2
    assert sum(d["dev_type"] == DEV_TYPE_VF for d in from_libvirt) == 16
    assert len(from_libvirt) == 20


def test_discover_libvirt_on_an_open_connection_leaves_it_open(
    libvirt: ModuleType, topology: list[dict[str, Any]], test_uri: str
) -> None:
    conn = libvirt.openReadOnly(test_uri)
    try:
        assert discover_libvirt(conn) == topology
        assert conn.isAlive()
        assert discover_libvirt(conn) == topology
    finally:
        conn.close()


def test_discover_libvirt_errors_carry_libvirts_message(libvirt: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="failed to parse xml document"):
        discover_libvirt(f"test://{tmp_path.absolute()}/missing.xml")


def test_real_sysfs() -> None:
    records = discover_sysfs("/sys")
    assert records, "this VM has PCI devices"
    addresses = [parse_address(r["address"]) for r in records]
    assert addresses == sorted(addresses)
    for rec, addr in zip(records, addresses):
        assert rec["address"] == str(addr) and rec["dev_id"] == addr.dev_id
        assert re.fullmatch(r"[0-9a-f]{4}", rec["vendor_id"]) and re.fullmatch(r"[0-9a-f]{4}", rec["product_id"])
        assert rec["label"] == f"label_{rec['vendor_id']}_{rec['product_id']}"
        assert rec["dev_type"] in DEV_TYPES
        assert rec["numa_node"] is None or rec["numa_node"] >= 0
        assert rec["iommu_group"] is None or rec["iommu_group"] >= 0
        if rec["dev_type"] == DEV_TYPE_VF:
            parse_address(rec["parent_addr"])
        else:
            assert "parent_addr" not in rec


def test_libvirt_binder_on_the_test_driver_raises_host_bind_error(libvirt: ModuleType, test_uri: str) -> None:
    binder = LibvirtBinder(test_uri)
    assert isinstance(binder, HostBinder)
    assert binder.driver("0000:04:10.0") is None  # the test driver drops <driver>
    with pytest.raises(HostBindError, match="not supported by the connection driver"):
        binder.detach("0000:04:10.0")
    with pytest.raises(HostBindError, match="not supported by the connection driver"):
        binder.reattach("0000:04:10.0")
    with pytest.raises(HostBindError, match="no node device with matching name 'pci_0000_09_00_0'"):
        binder.detach("0000:09:00.0")


def test_libvirt_binder_on_a_read_only_connection(libvirt: ModuleType, test_uri: str) -> None:
    conn = libvirt.openReadOnly(test_uri)
    try:
        with pytest.raises(HostBindError, match="read only"):
            LibvirtBinder(conn).detach("0000:04:10.0")
    finally:
        conn.close()

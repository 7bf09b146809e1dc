"""Passthrough end to end on a real kernel, as a lifecycle manager on that host would drive it.

One passthrough guest (``TestVM(mode="passthrough")``: q35, ``intel-iommu``, an SR-IOV NVMe at
00:02.0) is booted for the module. Python scripts run inside it (``run_script(...,
interpreter="python3")``) with this checkout's kvmslots:

1. ``discover_sysfs`` finds the PF and its VFs (real ``physfn``/``virtfn`` links, IOMMU groups)
   and a ``PciDevTracker`` (SQLite in the guest's tmpfs) pools them as Nova does;
2. ``kvmslots host claim`` picks a VF through an alias; ``SysfsBinder`` binds it to vfio-pci
   through ``driver_override`` and ``/dev/vfio/<group>`` appears;
3. ``hot_add`` of a ``PassthroughSpec`` into a QEMU with stopped CPUs inside the guest (``pc``,
   qtest: the test plays the guest's ACPI eject) plugs ``vfio-pci,host=<VF>`` at the planned slot;
   ``hot_del`` removes it, the VF goes back to ``nvme`` and the claim is freed;
4. faults, each a typed error with the host device back on its driver and nothing claimed: the
   IOMMU group busy in another QEMU, ``device_add`` refused by QEMU, a VF that disappears.

NUMA nodes and an IOMMU group shared with a function on a host driver need a guest with more
devices (``numa=True``): ``test_passthrough_topology.py``.

Each guest script times its steps (``time.perf_counter``); ``-s`` shows them, and every test
writes them to ``timings.json`` in its ``tmp_path``.

``LibvirtBinder`` runs against libvirt's ``test://`` driver on the host (no guest): see the last
section for what that can and cannot show.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guestscripts
import pytest
from guestscripts import prelude

from kvmslots.testvm import TestVM

PF = "0000:00:02.0"
NUM_VFS = 3
TIMINGS: dict[str, dict[str, float]] = {}


# --- the guest and the scripts it runs ----------------------------------------------------


@pytest.fixture(scope="module")
def pt_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestVM]:
    workdir = tmp_path_factory.mktemp("passthrough-flow")
    started = time.perf_counter()
    with TestVM(workdir, mode="passthrough") as vm:
        TIMINGS["guest"] = {"boot": round(time.perf_counter() - started, 3)}
        yield vm
    guestscripts.report_timings("passthrough flow", workdir, TIMINGS)


@pytest.fixture(scope="module")
def vfs(pt_vm: TestVM) -> list[str]:
    started = time.perf_counter()
    found = pt_vm.enable_nvme_vfs(NUM_VFS)
    TIMINGS["guest"]["enable_vfs"] = round(time.perf_counter() - started, 3)
    assert found == [f"0000:00:02.{n}" for n in range(1, NUM_VFS + 1)]
    return found


#: Shared by every script: one state directory on the guest's tmpfs, the operator's files, timing.
PRELUDE = prelude("/tmp/kvmslots-flow", r"""
STATE = BASE + "/state"
PF = "0000:00:02.0"
for name, data in (("device_spec.json", SPEC), ("aliases.json", ALIASES)):
    with open(f"{BASE}/{name}", "w") as f:
        json.dump(data, f)

def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "kvmslots", "--state", STATE, "--json", *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"kvmslots {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return json.loads(proc.stdout)

def status(tracker, address):
    tracker.refresh()
    try:
        dev = tracker.get_device(address)
    except KvmSlotsError:
        return None
    return [dev.status.value, dev.instance_uuid]

class TimedBinder(SysfsBinder):
    def detach(self, address):
        with step("bind"):
            return super().detach(address)

    def reattach(self, address):
        with step("reattach"):
            return super().reattach(address)

class TimedHost(HostDevices):
    def claim(self, vm, spec):
        with step("claim+bind"):
            return super().claim(vm, spec)

    def release(self, vm, host_address):
        with step("reattach+free"):
            return super().release(vm, host_address)

""")


def run_py(vm: TestVM, name: str, body: str, tmp_path: Path, timeout: float = 180.0) -> dict[str, Any]:
    """Run PRELUDE + body in the guest (:func:`guestscripts.run_py`); its RESULT."""
    return guestscripts.run_py(vm, PRELUDE, name, body, tmp_path, TIMINGS, timeout)


# --- 1. discover and pool -----------------------------------------------------------------

DISCOVER = r"""
import shutil
shutil.rmtree(STATE, ignore_errors=True)
with step("discover"):
    devices = discover_sysfs()
store = Store(STATE)
tracker = PciDevTracker(store, Whitelist.from_config(SPEC))
with step("sync"):
    report = tracker.update_devices_from_hypervisor_resources(devices)
result["pools"] = [[p.dev_type, p.parent_addr, p.count] for p in tracker.pci_stats.pools]
store.close()
result["records"] = [d for d in devices if d["address"].startswith("0000:00:02.")]
virtfns = sorted(link(f"/sys/bus/pci/devices/{PF}/{name}")
                 for name in os.listdir(f"/sys/bus/pci/devices/{PF}") if name.startswith("virtfn"))
result["links"] = {d["address"]: [link(f"/sys/bus/pci/devices/{d['address']}/physfn"), virtfns,
                                  group_of(d["address"])]
                   for d in result["records"]}
result["report"] = report.to_json()
with step("cli host pools"):
    result["cli_pools"] = cli("host", "pools")
result["devices"] = cli("host", "devices")
"""


def test_discover_sysfs_and_the_tracker_pool_the_pf_and_its_vfs(pt_vm: TestVM, vfs: list[str], tmp_path: Path) -> None:
    result = run_py(pt_vm, "1-discover", DISCOVER, tmp_path)
    records = {r["address"]: r for r in result["records"]}
    assert set(records) == {PF, *vfs}
    assert records[PF]["dev_type"] == "type-PF" and records[PF].get("parent_addr") is None
    groups = set()
    for vf in vfs:
        record = records[vf]
        assert (record["dev_type"], record["parent_addr"]) == ("type-VF", PF)
        assert (record["vendor_id"], record["product_id"]) == ("1b36", "0010")
        physfn, virtfns, group = result["links"][vf]
        assert physfn == PF and vf in virtfns  # the kernel's own links agree
        assert record["iommu_group"] == int(group)
        groups.add(group)
    assert len(groups) == NUM_VFS and str(records[PF]["iommu_group"]) not in groups
    assert sorted(result["report"]["added"]) == sorted([PF, *vfs])
    pools = {(dev_type, parent): count for dev_type, parent, count in result["pools"]}
    assert pools == {("type-PF", None): 1, ("type-VF", PF): NUM_VFS}  # VFs pooled by their PF
    assert sorted((p["dev_type"], p["count"]) for p in result["cli_pools"]) == [("type-PF", 1), ("type-VF", NUM_VFS)]
    assert {d["status"] for d in result["devices"]} == {"available"}


# --- 2. claim through an alias, bind to vfio-pci -------------------------------------------

CLAIM_BIND = r"""
with step("claim (cli host claim)"):
    [vf] = cli("host", "claim", "cli-vm", "--request", "nvmevf:1", "--aliases", f"{BASE}/aliases.json")
result["vf"], result["before"] = vf, driver(vf)
result["claimed"] = {d["address"]: [d["status"], d["instance"]] for d in cli("host", "devices")}
binder = SysfsBinder()
with step("bind"):
    binder.detach(vf)
group = group_of(vf)
result["bound"], result["group"] = driver(vf), group
result["dev_vfio"] = os.path.exists(f"/dev/vfio/{group}")
result["override"] = open(f"/sys/bus/pci/devices/{vf}/driver_override").read().strip()
with step("reattach"):
    binder.reattach(vf)
result["back"] = driver(vf)
result["override_after"] = open(f"/sys/bus/pci/devices/{vf}/driver_override").read().strip()
result["dev_vfio_after"] = os.path.exists(f"/dev/vfio/{group}")
with step("free (cli host free)"):
    result["freed"] = cli("host", "free", "cli-vm")
result["after"] = {d["address"]: [d["status"], d["instance"]] for d in cli("host", "devices")}
"""


def test_host_claim_picks_a_vf_and_sysfs_binder_hands_it_to_vfio_pci(
    pt_vm: TestVM, vfs: list[str], tmp_path: Path
) -> None:
    result = run_py(pt_vm, "2-claim", CLAIM_BIND, tmp_path)
    vf = result["vf"]
    assert vf in vfs
    assert result["claimed"][vf] == ["claimed", "cli-vm"]
    assert result["claimed"][PF][0] == "unclaimable"  # a PF with a VF in use is not handed out
    assert (result["before"], result["bound"], result["back"]) == ("nvme", "vfio-pci", "nvme")
    assert (result["override"], result["override_after"]) == ("vfio-pci", "(null)")  # reattach cleared it
    assert result["dev_vfio"], f"/dev/vfio/{result['group']} did not appear"
    assert result["freed"] == [vf]
    assert {s for s, _ in result["after"].values()} == {"available"}


# --- 3. hot_add / hot_del into a QEMU inside the guest ------------------------------------

HOT_ROUND_TRIP = r"""
store = Store(STATE)
store.define_vm(VMSpec("vm1"))
tracker = PciDevTracker(store, Whitelist.from_config(SPEC))
with step("discover+sync"):
    tracker.update_devices_from_hypervisor_resources(discover_sysfs())
host = TimedHost(tracker, TimedBinder())
spec = PassthroughSpec(str(uuid.uuid4()), request())
with step("nested qemu start"):
    vm = TestVM(mode="qtest").start()

async def main():
    async with Monitor(vm.qmp_path) as mon:
        with step("hot_add total"):
            device = await hot_add(store, mon, "vm1", spec, host=host)
        vf = device.props["host"]
        result["vf"], result["slot"], result["qemu_id"] = vf, device.slot, device.qemu_id
        result["bound"], result["dev_vfio"] = driver(vf), os.path.exists(f"/dev/vfio/{group_of(vf)}")
        result["held"] = status(tracker, vf)
        result["plugged"] = [[f.address, f.qdev_id, f.vendor, f.device] for f in (await mon.query_pci()).functions]
        result["stored"] = [[d.qemu_id, d.state.value] for d in store.devices("vm1")]
        try:  # QEMU cannot migrate a host device: refused by name, with Nova's way out
            await outgoing(store, mon, "vm1")
        except MigrationRefused as exc:
            result["migration"] = [exc.reason, exc.devices, "update_pci_for_migration" in str(exc)]
        with step("hot_del total"):
            task = asyncio.ensure_future(hot_del(store, mon, "vm1", spec.uuid, timeout=20, host=host))
            with step("wait before the eject"):
                await asyncio.sleep(0.3)  # device_del is pending: play the guest's ACPI eject
            vm.acpi_eject(device.slot)
            removed = await task
        result["removed"] = removed.removed
        result["after"] = [f.qdev_id for f in (await mon.query_pci()).functions]
        result["back"], result["freed"] = driver(vf), status(tracker, vf)
        result["stored_after"] = [d.qemu_id for d in store.devices("vm1")]
try:
    asyncio.run(main())
finally:
    vm.stop()
    store.close()
s = result["steps"]
s["claim"] = round(s["claim+bind"] - s["bind"], 4)
s["plug (device_add+verify)"] = round(s["hot_add total"] - s["claim+bind"], 4)
s["unplug (device_del+eject)"] = round(s["hot_del total"] - s["wait before the eject"] - s["reattach+free"], 4)
"""


def test_hot_add_plugs_the_vf_at_the_planned_slot_and_hot_del_gives_it_back(
    pt_vm: TestVM, vfs: list[str], tmp_path: Path
) -> None:
    result = run_py(pt_vm, "3-hotplug", HOT_ROUND_TRIP, tmp_path)
    vf, slot = result["vf"], result["slot"]
    assert vf in vfs and slot == 4  # pc: slots 0-3 are the machine's own, the mask keeps them
    assert result["bound"] == "vfio-pci" and result["dev_vfio"]
    assert result["held"] == ["allocated", "vm1"]
    assert [f"00:{slot:02x}.0", result["qemu_id"], 0x1B36, 0x0010] in result["plugged"]
    assert result["qemu_id"].startswith("hostdev-")
    assert result["stored"] == [[result["qemu_id"], "attached"]]
    assert result["migration"] == ["passthrough", [result["qemu_id"]], True]  # a live migration is refused
    assert result["removed"] is True and result["qemu_id"] not in result["after"]
    assert result["back"] == "nvme"
    assert result["freed"] == ["available", None]
    assert result["stored_after"] == []


# --- 4. faults -------------------------------------------------------------------------------

GROUP_BUSY = r"""
# ICH9's 00:1f.x share IOMMU group 4. Another QEMU (not ours) holds 00:1f.2 through vfio:
# the group is then bound to that QEMU's container, and ours cannot open 00:1f.3.
OTHER, OURS = "0000:00:1f.2", "0000:00:1f.3"
result["group"] = [group_of(OTHER), group_of(OURS)]
result["before"] = driver(OURS)
store = Store(BASE + "/state-ich9")
store.define_vm(VMSpec("vm1"))
tracker = PciDevTracker(store, Whitelist.from_config([{"address": OURS}]))
tracker.update_devices_from_hypervisor_resources(discover_sysfs())
aliases = [{"name": "smbus", "vendor_id": "8086", "product_id": "2930", "device_type": "type-PCI"}]
host = TimedHost(tracker, TimedBinder())
spec = PassthroughSpec(str(uuid.uuid4()), request("smbus:1", aliases))
SysfsBinder().detach(OTHER)
with step("other qemu start (holds 00:1f.2)"):
    other = TestVM(mode="qtest", extra_args=["-device", f"vfio-pci,host={OTHER},id=other"]).start()
vm = TestVM(mode="qtest").start()

async def main():
    async with Monitor(vm.qmp_path) as mon:
        try:
            with step("hot_add refused"):
                await hot_add(store, mon, "vm1", spec, host=host)
        except KvmSlotsError as exc:
            result["error"] = [type(exc).__name__, str(exc), getattr(exc, "qemu_message", None)]
        result["pci"] = [f.qdev_id for f in (await mon.query_pci()).functions]
try:
    asyncio.run(main())
finally:
    vm.stop()
    other.stop()
    SysfsBinder().reattach(OTHER)
result["after"], result["override"] = driver(OURS), open(f"/sys/bus/pci/devices/{OURS}/driver_override").read().strip()
result["tracked"] = status(tracker, OURS)
result["stored"] = [d.qemu_id for d in store.devices("vm1")]
store.close()
"""


def test_a_function_whose_iommu_group_is_in_use_elsewhere_fails_typed_and_is_given_back(
    pt_vm: TestVM, tmp_path: Path
) -> None:
    result = run_py(pt_vm, "4a-group", GROUP_BUSY, tmp_path)
    assert result["group"][0] == result["group"][1]
    kind, message, qemu_message = result["error"]
    assert kind == "DeviceAddFailed", message
    assert "0000:00:1f.3" in message and qemu_message and "busy" in qemu_message.lower(), message
    assert result["after"] == result["before"] and result["override"] == "(null)"
    assert result["tracked"] == ["available", None]
    assert result["stored"] == [] and not [q for q in result["pci"] if q.startswith("hostdev-")]


QEMU_REFUSES = r"""
store = Store(STATE)
store.define_vm(VMSpec("vm2"))
tracker = PciDevTracker(store, Whitelist.from_config(SPEC))
tracker.update_devices_from_hypervisor_resources(discover_sysfs())
host = TimedHost(tracker, TimedBinder())
# display=on: QEMU opens the VF through VFIO, then refuses it (an NVMe function has no display)
spec = PassthroughSpec(str(uuid.uuid4()), request(), props={"display": "on"})
vm = TestVM(mode="qtest").start()

async def main():
    async with Monitor(vm.qmp_path) as mon:
        try:
            with step("hot_add refused"):
                await hot_add(store, mon, "vm2", spec, host=host)
        except KvmSlotsError as exc:
            result["error"] = [type(exc).__name__, str(exc), getattr(exc, "qemu_message", None)]
        result["pci"] = [f.qdev_id for f in (await mon.query_pci()).functions]
try:
    asyncio.run(main())
finally:
    vm.stop()
result["drivers"] = {a: driver(a) for a in os.listdir("/sys/bus/pci/devices") if a.startswith("0000:00:02.")}
result["tracked"] = {d.address: [d.status.value, d.instance_uuid] for d in tracker.all_devs}
result["stored"] = [d.qemu_id for d in store.devices("vm2")]
store.close()
"""


def test_device_add_refused_by_qemu_fails_typed_with_the_vf_back_on_nvme_and_free(
    pt_vm: TestVM, vfs: list[str], tmp_path: Path
) -> None:
    result = run_py(pt_vm, "4c-refused", QEMU_REFUSES, tmp_path)
    kind, message, qemu_message = result["error"]
    assert kind == "DeviceAddFailed", message
    assert qemu_message and "display" in qemu_message, message
    assert set(result["drivers"].values()) == {"nvme"}
    assert {s for s, _ in result["tracked"].values()} == {"available"}
    assert result["stored"] == [] and not [q for q in result["pci"] if q.startswith("hostdev-")]


VANISH_CLAIM = r"""
store = Store(STATE)
tracker = PciDevTracker(store, Whitelist.from_config(SPEC))
tracker.update_devices_from_hypervisor_resources(discover_sysfs())
[dev] = tracker.claim_instance("vm-gone", [request()])
result["claimed"] = dev.address
store.close()
"""

VANISH_AFTER = r"""
result["vfs_left"] = sorted(a for a in os.listdir("/sys/bus/pci/devices") if a.startswith("0000:00:02."))
store = Store(STATE)
store.define_vm(VMSpec("vm3"))
tracker = PciDevTracker(store, Whitelist.from_config(SPEC))  # not synced yet: it still lists the VFs
host = TimedHost(tracker, TimedBinder())
spec = PassthroughSpec(str(uuid.uuid4()), request())
vm = TestVM(mode="qtest").start()

async def main():
    async with Monitor(vm.qmp_path) as mon:
        try:
            with step("hot_add of a vanished VF"):
                await hot_add(store, mon, "vm3", spec, host=host)
        except KvmSlotsError as exc:
            result["error"] = [type(exc).__name__, str(exc)]
try:
    asyncio.run(main())
finally:
    vm.stop()
result["tracked_before_sync"] = {d.address: [d.status.value, d.instance_uuid] for d in tracker.all_devs}
with step("discover+sync"):
    report = tracker.update_devices_from_hypervisor_resources(discover_sysfs())
result["report"] = report.to_json()
claimed = tracker.get_device(CLAIMED)
result["kept"] = [claimed.status.value, claimed.instance_uuid, claimed.vanished]
result["stored"] = [d.qemu_id for d in store.devices("vm3")]
tracker.free_instance("vm-gone")
result["tracked_after_free"] = sorted(d.address for d in tracker.all_devs)
store.close()
"""


def test_a_vf_that_disappears_while_claimed_is_kept_until_freed_and_hot_add_of_it_fails_typed(
    pt_vm: TestVM, vfs: list[str], tmp_path: Path
) -> None:
    claimed = run_py(pt_vm, "4b-vanish", VANISH_CLAIM, tmp_path)["claimed"]
    assert claimed in vfs
    started = time.perf_counter()
    try:
        assert pt_vm.enable_nvme_vfs(0) == []  # sriov_numvfs=0 under the claim
        disable = round(time.perf_counter() - started, 3)
        result = run_py(pt_vm, "4b-vanish", f"CLAIMED = {claimed!r}\n" + VANISH_AFTER, tmp_path)
    finally:
        assert pt_vm.enable_nvme_vfs(NUM_VFS) == vfs
    TIMINGS["4b-vanish"]["sriov_numvfs=0"] = disable
    (tmp_path / "timings.json").write_text(json.dumps(TIMINGS["4b-vanish"], indent=2))
    assert result["vfs_left"] == [PF]
    kind, message = result["error"]
    assert kind == "HostBindError" and "not found" in message, message
    others = sorted(set(vfs) - {claimed})
    # the failed hot_add claimed one of the other (vanished) VFs and freed it again
    assert {a: s for a, s in result["tracked_before_sync"].items() if a in others} == {
        a: ["available", None] for a in others
    }
    assert result["report"]["kept"] == [claimed] and sorted(result["report"]["removed"]) == others
    assert result["kept"] == ["claimed", "vm-gone", True]
    assert result["stored"] == []
    assert result["tracked_after_free"] == [PF]  # freed: the vanished VF is gone from the tracker


# --- LibvirtBinder, on the host, against libvirt's test driver -------------------------------
#
# What the test driver can show: the node device lookup by address (pci_dddd_bb_ss_f), reading
# the node device XML (driver()), libvirt's errors turned into HostBindError naming the device,
# and the orchestration's undo when the binder refuses (claim freed, nothing plugged).
# What it cannot: virNodeDeviceDetachFlags / virNodeDeviceReAttach are not implemented by the
# test driver ("this function is not supported by the connection driver"), and its XML drops
# <driver>, so an actual detach to vfio, libvirt's "managed" bookkeeping, its own IOMMU group
# checks and a driver name other than None need a running libvirtd (qemu:///system) on a host
# with an IOMMU -- e.g. libvirtd inside the passthrough guest, which its root file system lacks.


@pytest.fixture
def libvirt_uri(tmp_path: Path) -> str:
    from kvmslots.pci.fakehost import libvirt_test_xml, sriov_topology

    path = (tmp_path / "node.xml").absolute()
    path.write_text(libvirt_test_xml(sriov_topology(pfs=1, vfs_per_pf=2, plain=1)))
    return f"test://{path}"


def test_libvirt_binder_on_the_test_driver_reads_devices_and_types_what_it_cannot_do(libvirt_uri: str) -> None:
    from kvmslots.errors import HostBindError, InvalidPciAddress
    from kvmslots.pci.binding import HostBinder, LibvirtBinder
    from kvmslots.pci.discovery import discover_libvirt

    binder = LibvirtBinder(libvirt_uri)
    assert isinstance(binder, HostBinder)
    devices = discover_libvirt(libvirt_uri)
    vf = next(d["address"] for d in devices if d["dev_type"] == "type-VF")
    assert binder.driver(vf) is None  # the test driver keeps no <driver>
    for action in (binder.detach, binder.reattach):
        with pytest.raises(HostBindError, match=rf"{vf}.*not supported"):
            action(vf)
    with pytest.raises(HostBindError, match="0000:00:1e.7"):
        binder.driver("0000:00:1e.7")  # no such node device
    with pytest.raises(InvalidPciAddress):
        binder.detach("../../etc")


def test_hot_add_with_a_libvirt_binder_that_cannot_detach_frees_the_claim(
    libvirt_uri: str, tmp_path: Path, qtest_vm: TestVM
) -> None:
    from kvmslots import Monitor, Store, VMSpec, hot_add
    from kvmslots.errors import HostBindError
    from kvmslots.passthrough import HostDevices, PassthroughSpec
    from kvmslots.pci.binding import LibvirtBinder
    from kvmslots.pci.devspec import Whitelist
    from kvmslots.pci.discovery import discover_libvirt
    from kvmslots.pci.request import get_pci_requests_from_flavor, parse_aliases
    from kvmslots.pci.tracker import PciDevTracker

    devices = discover_libvirt(libvirt_uri)
    vf = next(d for d in devices if d["dev_type"] == "type-VF")
    store = Store(tmp_path / "state")
    try:
        store.define_vm(VMSpec("vm1"))
        tracker = PciDevTracker(
            store, Whitelist.from_config([{"vendor_id": vf["vendor_id"], "product_id": vf["product_id"]}])
        )
        tracker.update_devices_from_hypervisor_resources(devices)
        aliases = parse_aliases(
            [{"name": "vf", "vendor_id": vf["vendor_id"], "product_id": vf["product_id"], "device_type": "type-VF"}]
        )
        [req] = get_pci_requests_from_flavor({"extra_specs": {"pci_passthrough:alias": "vf:1"}}, aliases)
        spec = PassthroughSpec(str(uuid.uuid4()), req)

        async def scenario() -> list[str]:
            async with Monitor(qtest_vm.qmp_path) as mon:
                with pytest.raises(HostBindError, match="not supported"):
                    await hot_add(store, mon, "vm1", spec, host=HostDevices(tracker, LibvirtBinder(libvirt_uri)))
                return [f.qdev_id for f in (await mon.query_pci()).functions]

        functions = asyncio.run(scenario())
        assert not [q for q in functions if q.startswith("hostdev-")]
        assert {d.status.value for d in tracker.all_devs} == {"available"}
        assert store.devices("vm1") == []
    finally:
        store.close()

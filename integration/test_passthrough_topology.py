"""Passthrough on a real kernel, part two: NUMA nodes and an IOMMU group shared with a host driver.

One passthrough guest is booted for the module with ``TestVM(mode="passthrough", numa=True)``:
two NUMA nodes (one CPU and 512 MiB each), the default SR-IOV NVMe at 00:02.0 on ``pcie.0``
(no ``_PXM``: the kernel says node -1) and a second one at 81:00.0 behind a ``pxb-pcie`` expander
with ``numa_node=1`` (the kernel reads node 1 from ACPI ``_PXM``). ``extra_args`` add two plain
(non SR-IOV) NVMe controllers behind a ``pcie-pci-bridge``: conventional PCI behind a PCIe-to-PCI
bridge shares one requester id, so the kernel puts the bridge and both controllers in one IOMMU
group, and both controllers are bound to the guest's built-in ``nvme`` driver.

Inside it, with this checkout's kvmslots:

1. ``discover_sysfs`` reports ``numa_node`` 1 for the PF behind the expander and its VFs, None
   for the devices on ``pcie.0``; the tracker's pools and ``kvmslots host pools`` carry it;
2. claims with Nova's NUMA affinity policies (``required``, ``legacy``, ``preferred``) pick or
   refuse devices by the kernel's own node numbers; a VF on node 1 goes through vfio-pci into a
   QEMU inside the guest and back (the expander's devices have IOMMU groups of their own);
3. ``SysfsBinder`` refuses (``IommuGroupNotViable``) to bind a controller whose group partner is
   on ``nvme``, through ``hot_add``, leaving it on ``nvme`` and the claim freed; once the partner
   is unbound the same hot add goes through.

It is a module (and a guest) of its own because these devices would change what the tests of the
default topology see; the boot costs about as much as one of their tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guestscripts
import pytest
from guestscripts import prelude

from kvmslots.testvm import NUMA_PXB_BUS, NUMA_SRIOV_SERIAL, TestVM

PF0 = "0000:00:02.0"  # on pcie.0: no NUMA node
PF1 = f"0000:{NUMA_PXB_BUS + 1:02x}:00.0"  # behind the pxb-pcie on node 1
PORT1 = f"0000:{NUMA_PXB_BUS:02x}:00.0"  # the expander's pcie-root-port
NUM_VFS = 2
#: Two plain NVMe controllers behind a pcie-pci-bridge (behind a root port at 00:06.0): one IOMMU group.
BRIDGE, PAIR_A, PAIR_B = "0000:01:00.0", "0000:02:01.0", "0000:02:02.0"
SHARED_GROUP_ARGS = [
    "-device", "pcie-root-port,id=pair-port,bus=pcie.0,chassis=1,addr=0x6",
    "-device", "pcie-pci-bridge,id=pair-bridge,bus=pair-port,addr=0x0",
    "-device", "nvme,id=pair-a,serial=kvmslots-pair-a,bus=pair-bridge,addr=0x1",
    "-device", "nvme,id=pair-b,serial=kvmslots-pair-b,bus=pair-bridge,addr=0x2",
]  # fmt: skip
TIMINGS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def numa_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestVM]:
    workdir = tmp_path_factory.mktemp("passthrough-topology")
    started = time.perf_counter()
    with TestVM(workdir, mode="passthrough", numa=True, extra_args=SHARED_GROUP_ARGS) as vm:
        TIMINGS["guest"] = {"boot": round(time.perf_counter() - started, 3)}
        yield vm
    guestscripts.report_timings("passthrough topology", workdir, TIMINGS)


@pytest.fixture(scope="module")
def vfs(numa_vm: TestVM) -> dict[str, list[str]]:
    started = time.perf_counter()
    found = {PF0: numa_vm.enable_nvme_vfs(NUM_VFS), PF1: numa_vm.enable_nvme_vfs(NUM_VFS, serial=NUMA_SRIOV_SERIAL)}
    TIMINGS["guest"]["enable_vfs (both PFs)"] = round(time.perf_counter() - started, 3)
    assert found == {pf: [f"{pf[:-1]}{n}" for n in range(1, NUM_VFS + 1)] for pf in (PF0, PF1)}
    return found


PRELUDE = prelude("/tmp/kvmslots-topology", r"""
def fresh_state(name):
    shutil.rmtree(f"{BASE}/{name}", ignore_errors=True)
    return f"{BASE}/{name}"

def cli(state, *args):
    proc = subprocess.run([sys.executable, "-m", "kvmslots", "--state", state, "--json", *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"kvmslots {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return json.loads(proc.stdout)

def statuses(tracker):
    tracker.refresh()
    return {d.address: [d.status.value, d.instance_uuid] for d in tracker.all_devs}

""")


def run_py(vm: TestVM, name: str, body: str, tmp_path: Path, timeout: float = 180.0) -> dict[str, Any]:
    """Run PRELUDE + body in the guest (:func:`guestscripts.run_py`); its RESULT."""
    return guestscripts.run_py(vm, PRELUDE, name, body, tmp_path, TIMINGS, timeout)


# --- 1. the kernel's NUMA nodes, as discover_sysfs and the tracker report them -----------------


def test_the_guest_has_two_numa_nodes_and_the_expanders_devices_are_on_node_1(
    numa_vm: TestVM, vfs: dict[str, list[str]]
) -> None:
    assert numa_vm.run("cat /sys/devices/system/node/online", check=True).strip() == "0-1"
    cpus = numa_vm.run("cat /sys/devices/system/node/node0/cpulist /sys/devices/system/node/node1/cpulist", check=True)
    assert cpus.split() == ["0", "1"]
    assert "pci_bus 0000:80: on NUMA node 1" in numa_vm.run("dmesg", check=True)  # read from ACPI _PXM
    rows = numa_vm.run(
        "for d in /sys/bus/pci/devices/*; do echo ${d##*/} $(cat $d/numa_node) $(basename $(readlink $d/iommu_group))"
        " $(ls $d/iommu_group/devices | wc -l); done", check=True,
    )  # fmt: skip
    facts = {address: (node, group, int(size)) for address, node, group, size in map(str.split, rows.splitlines())}
    node1 = [PORT1, PF1, *vfs[PF1]]
    assert sorted(a for a, (node, _, _) in facts.items() if node == "1") == node1
    assert {facts[a][0] for a in [PF0, *vfs[PF0], BRIDGE, PAIR_A, PAIR_B]} == {"-1"}
    # intel-iommu behind the expander: the port, the PF and each VF in a group of their own
    assert len({facts[a][1] for a in node1}) == len(node1) and {facts[a][2] for a in node1} == {1}
    # the PCIe-to-PCI bridge and both controllers behind it share one group, and nothing else is in it
    assert facts[BRIDGE][1] == facts[PAIR_A][1] == facts[PAIR_B][1] and facts[PAIR_A][2] == 3
    drivers = numa_vm.run(
        f"for a in {PAIR_A} {PAIR_B}; do basename $(readlink /sys/bus/pci/devices/$a/driver); done", check=True
    )
    assert drivers.split() == ["nvme", "nvme"]


DISCOVER = r"""
state = fresh_state("discover")
with step("discover"):
    devices = discover_sysfs()
result["records"] = {d["address"]: d for d in devices}
with Store(state) as store:
    tracker = PciDevTracker(store, Whitelist.from_config(SPEC))
    with step("sync"):
        tracker.update_devices_from_hypervisor_resources(devices)
    result["pools"] = [[p.dev_type, p.parent_addr, p.numa_node, p.count] for p in tracker.pci_stats.pools]
    result["tracked"] = {d.address: d.numa_node for d in tracker.all_devs}
with step("cli host pools"):
    result["cli_pools"] = cli(state, "host", "pools")
"""


def test_discover_sysfs_and_the_tracker_pools_carry_the_kernels_numa_node(
    numa_vm: TestVM, vfs: dict[str, list[str]], tmp_path: Path
) -> None:
    result = run_py(numa_vm, "1-discover", DISCOVER, tmp_path)
    records = result["records"]
    assert (records[PF1]["dev_type"], records[PF1]["numa_node"]) == ("type-PF", 1)
    for vf in vfs[PF1]:
        assert (records[vf]["dev_type"], records[vf]["parent_addr"], records[vf]["numa_node"]) == ("type-VF", PF1, 1)
    for address in [PF0, *vfs[PF0], PAIR_A, PAIR_B]:
        assert records[address]["numa_node"] is None, address  # the kernel's -1: not known
    assert records[PORT1]["numa_node"] == 1 and records[BRIDGE]["numa_node"] is None
    assert (records[PAIR_A]["dev_type"], records[PAIR_A]["iommu_group"]) == ("type-PCI", records[PAIR_B]["iommu_group"])
    pools = sorted(map(tuple, result["pools"]), key=repr)
    assert pools == sorted([
        ("type-PCI", None, None, 2),  # the pair
        ("type-PF", None, None, 1), ("type-PF", None, 1, 1),  # one pool per node
        ("type-VF", PF0, None, NUM_VFS), ("type-VF", PF1, 1, NUM_VFS),
    ], key=repr)  # fmt: skip
    cli_pools = sorted(((p["dev_type"], p["numa_node"], p["count"]) for p in result["cli_pools"]), key=repr)
    assert cli_pools == sorted(
        [("type-PCI", None, 2), ("type-PF", None, 1), ("type-PF", 1, 1), ("type-VF", None, 2), ("type-VF", 1, 2)],
        key=repr,
    )
    assert {a: n for a, n in result["tracked"].items() if n is not None} == {PF1: 1, **dict.fromkeys(vfs[PF1], 1)}


# --- 2. NUMA affinity on the kernel's numbers ----------------------------------------------------

NUMA_CLAIMS = r"""
# Nova's NUMA affinity: an instance whose cells are on host node(s) `cells` asks for one VF.
with Store(fresh_state("numa")) as store:
    tracker = PciDevTracker(store, Whitelist.from_config(SPEC))
    tracker.update_devices_from_hypervisor_resources(discover_sysfs())
    node = {d.address: d.numa_node for d in tracker.all_devs}
    claims = []

    def claim(policy, cells):
        before = statuses(tracker)
        vm = f"vm-{len(claims)}"
        try:
            with step(f"claim {len(claims) + 1} {policy} {cells}"):
                [dev] = tracker.claim_instance(vm, [request(policy=policy)], numa_cells=cells)
            claims.append([policy, cells, dev.address, node[dev.address]])
        except KvmSlotsError as exc:
            claims.append([policy, cells, error_facts(exc), statuses(tracker) == before])

    claim("required", [1])   # a VF on node 1
    claim("required", [0])   # node 0 has none: refused, even with VFs of no node free
    claim("legacy", [0])     # legacy takes a VF of no NUMA node (00:02.x) ...
    claim("preferred", [0])  # ... and so does preferred, first
    claim("legacy", [0])     # no VF of no node left: legacy refuses the one on node 1
    claim("preferred", [0])  # preferred takes it
    claim("required", [1])   # node 1 has none left
    result["claims"] = claims
    result["held"] = {a: s for a, s in statuses(tracker).items() if s[0] != "available"}
"""


def test_claims_follow_novas_numa_affinity_on_the_kernels_numa_nodes(
    numa_vm: TestVM, vfs: dict[str, list[str]], tmp_path: Path
) -> None:
    result = run_py(numa_vm, "2-numa", NUMA_CLAIMS, tmp_path)
    claims = result["claims"]
    got = [(policy, cells, outcome if isinstance(outcome, str) else outcome["type"], extra)
           for policy, cells, outcome, extra in claims]  # fmt: skip
    node0_vfs, node1_vfs = vfs[PF0], vfs[PF1]
    assert got[0] == ("required", [1], node1_vfs[0], 1)
    assert got[1] == ("required", [0], "PciDeviceRequestFailed", True)  # and nothing changed
    assert got[2] == ("legacy", [0], node0_vfs[0], None)
    assert got[3] == ("preferred", [0], node0_vfs[1], None)
    assert got[4] == ("legacy", [0], "PciDeviceRequestFailed", True)
    assert got[5] == ("preferred", [0], node1_vfs[1], 1)
    assert got[6] == ("required", [1], "PciDeviceRequestFailed", True)
    refused = claims[1][2]
    assert "PciError" in refused["bases"] and "policy required, NUMA cells [0]" in refused["message"]
    assert set(result["held"]) == {*node0_vfs, *node1_vfs, PF0, PF1}  # the PFs: unclaimable, VFs in use
    assert {s for s, _ in result["held"].values()} == {"claimed", "unclaimable"}


NODE1_ROUND_TRIP = r"""
# Every NVMe VF is handed out; the VM's one NUMA cell is pinned to host node 1 and the flavor's
# policy is 'required' (PassthroughSpec.numa_cells, as Nova's claim takes the instance's NUMA
# topology): hot_add picks a VF on node 1, which goes to vfio-pci, into a QEMU inside the guest,
# and back.  Pinned to node 0 (whose VFs have no node) the same request is refused first.
store = Store(fresh_state("node1"))
store.define_vm(VMSpec("vm1"))
tracker = PciDevTracker(store, Whitelist.from_config(SPEC))
tracker.update_devices_from_hypervisor_resources(discover_sysfs())
host = HostDevices(tracker, SysfsBinder())
spec = PassthroughSpec(str(uuid.uuid4()), request(policy="required"), numa_cells=(1,))
elsewhere = PassthroughSpec(str(uuid.uuid4()), request(policy="required"), numa_cells=(0,))
with step("nested qemu start"):
    vm = TestVM(mode="qtest").start()

async def main():
    async with Monitor(vm.qmp_path) as mon:
        try:
            await hot_add(store, mon, "vm1", elsewhere, host=host)
        except KvmSlotsError as exc:
            result["node0"] = [type(exc).__name__, str(exc), [d.qemu_id for d in store.devices("vm1")],
                               sorted(a for a, (s, _) in statuses(tracker).items() if s == "claimed")]
        with step("hot_add"):
            device = await hot_add(store, mon, "vm1", spec, host=host)
        vf = device.props["host"]
        result["vf"], result["numa"] = vf, tracker.get_device(vf).numa_node
        result["bound"], result["dev_vfio"] = driver(vf), os.path.exists(f"/dev/vfio/{group_of(vf)}")
        result["plugged"] = [[f.address, f.qdev_id] for f in (await mon.query_pci()).functions]
        result["qemu_id"] = device.qemu_id
        with step("hot_del"):
            task = asyncio.ensure_future(hot_del(store, mon, "vm1", spec.uuid, timeout=20, host=host))
            await asyncio.sleep(0.3)  # device_del is pending: play the guest's ACPI eject
            vm.acpi_eject(device.slot)
            result["removed"] = (await task).removed
        result["back"], result["freed"] = driver(vf), statuses(tracker)[vf]
try:
    asyncio.run(main())
finally:
    vm.stop()
    store.close()
"""


def test_a_vf_on_node_1_goes_through_vfio_pci_into_a_qemu_and_back(
    numa_vm: TestVM, vfs: dict[str, list[str]], tmp_path: Path
) -> None:
    result = run_py(numa_vm, "2-node1-vfio", NODE1_ROUND_TRIP, tmp_path)
    kind, message, stored, claimed = result["node0"]
    assert kind == "PciDeviceRequestFailed" and "policy required, NUMA cells [0]" in message
    assert stored == [] and claimed == []  # refused before any slot or host device was taken
    assert result["vf"] in vfs[PF1] and result["numa"] == 1
    assert result["bound"] == "vfio-pci" and result["dev_vfio"]
    assert ["00:04.0", result["qemu_id"]] in result["plugged"]
    assert result["removed"] is True
    assert (result["back"], result["freed"]) == ("nvme", ["available", None])


# --- 3. an IOMMU group shared with a function on a host driver ------------------------------------

GROUP_NOT_VIABLE = r"""
A, B = "0000:02:01.0", "0000:02:02.0"
result["groups"] = [group_of(A), group_of(B)]
result["blockers"] = SysfsBinder().group_blockers(A)
store = Store(fresh_state("pair"))
store.define_vm(VMSpec("vm1"))
tracker = PciDevTracker(store, Whitelist.from_config([{"address": A}]))  # only A is handed out
tracker.update_devices_from_hypervisor_resources(discover_sysfs())
aliases = [{"name": "nvme", "vendor_id": "1b36", "product_id": "0010", "device_type": "type-PCI"}]
host = HostDevices(tracker, SysfsBinder())
vm = TestVM(mode="qtest").start()

async def attempt(mon, name):
    spec = PassthroughSpec(str(uuid.uuid4()), request("nvme:1", aliases))
    try:
        with step(name):
            device = await hot_add(store, mon, "vm1", spec, host=host)
    except KvmSlotsError as exc:
        return {"error": error_facts(exc)}
    outcome = {"bound": driver(A), "plugged": [f.qdev_id for f in (await mon.query_pci()).functions],
               "qemu_id": device.qemu_id, "held": statuses(tracker)[A]}
    task = asyncio.ensure_future(hot_del(store, mon, "vm1", spec.uuid, timeout=20, host=host))
    await asyncio.sleep(0.3)
    vm.acpi_eject(device.slot)
    outcome["removed"] = (await task).removed
    return outcome

async def main():
    async with Monitor(vm.qmp_path) as mon:
        result["refused"] = await attempt(mon, "hot_add refused")
        result["after_refusal"] = {
            "drivers": [driver(A), driver(B)], "held": statuses(tracker)[A],
            "stored": [d.qemu_id for d in store.devices("vm1")],
            "override": open(f"/sys/bus/pci/devices/{A}/driver_override").read().strip(),
            "plugged": [f.qdev_id for f in (await mon.query_pci()).functions]}
        with open(f"/sys/bus/pci/devices/{B}/driver/unbind", "w") as f:  # the operator frees the group
            f.write(B)
        result["blockers_after_unbind"] = SysfsBinder().group_blockers(A)
        result["accepted"] = await attempt(mon, "hot_add accepted")
try:
    asyncio.run(main())
finally:
    vm.stop()
    with open("/sys/bus/pci/drivers_probe", "w") as f:  # B back to nvme
        f.write(B)
try:
    result["end"] = [driver(A), driver(B), statuses(tracker)[A]]
finally:
    store.close()
"""


def test_a_function_whose_group_partner_is_on_a_host_driver_is_refused_typed_until_the_partner_lets_go(
    numa_vm: TestVM, tmp_path: Path
) -> None:
    result = run_py(numa_vm, "3-group", GROUP_NOT_VIABLE, tmp_path)
    group = result["groups"][0]
    assert result["groups"] == [group, group]
    assert result["blockers"] == {PAIR_B: "nvme"}  # the bridge, without a driver, is not in the way
    error = result["refused"]["error"]
    assert error["type"] == "IommuGroupNotViable" and "HostBindError" in error["bases"], error
    assert error["facts"] == {"address": PAIR_A, "iommu_group": int(group), "blocking": {PAIR_B: "nvme"}}
    assert f"{PAIR_B} (driver nvme)" in error["message"]
    after = result["after_refusal"]
    assert after["drivers"] == ["nvme", "nvme"] and after["override"] == "(null)"  # nothing was touched
    assert after["held"] == ["available", None] and after["stored"] == []  # the claim was freed
    assert not [q for q in after["plugged"] if q.startswith("hostdev-")]
    assert result["blockers_after_unbind"] == {}
    accepted = result["accepted"]
    assert "error" not in accepted, accepted
    assert accepted["bound"] == "vfio-pci" and accepted["held"] == ["allocated", "vm1"]
    assert accepted["qemu_id"] in accepted["plugged"] and accepted["removed"] is True
    assert result["end"] == ["nvme", "nvme", ["available", None]]

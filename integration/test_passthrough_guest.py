"""The passthrough guest: an emulated IOMMU, SR-IOV and vfio-pci on a real kernel.

One guest (``TestVM(mode="passthrough")``, built by ``kvmslots guest build
--passthrough`` / ``runtime/build-guest.sh --passthrough``) is booted for the
module: a q35 machine with ``intel-iommu`` (interrupt remapping on) and an
SR-IOV capable NVMe controller at 00:02.0. Inside it the tests enable virtual
functions, read them with kvmslots' own ``discover_sysfs``, hand one to
``vfio-pci`` with ``SysfsBinder`` and give it to a QEMU that runs inside the
guest with its CPUs stopped (kvmslots' own ``TestVM``, qtest mode), then back.

Like every test here they FAIL, never skip, when the guest is not built.
Run with ``-s`` to see how long each step takes.
"""

from __future__ import annotations

import json
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmslots import guest
from kvmslots.errors import GuestFilesMissing, InvalidSlot
from kvmslots.testvm import TestVM, find_passthrough_files, sriov_nvme_args, write_python_tar

PF = "0000:00:02.0"
TIMINGS: dict[str, float] = {}


# --- pure parts (no QEMU) ------------------------------------------------------------


def test_sriov_nvme_args_size_the_flexible_resources_per_vf() -> None:
    args = sriov_nvme_args(2)
    assert args[:2] == ["-device", "nvme-subsys,id=kvmslots-subsys,nqn=kvmslots"]
    nvme = dict(item.partition("=")[::2] for item in args[3].split(",")[1:])
    assert nvme["sriov_max_vfs"] == "2" and nvme["addr"] == "0x2"
    # 4 queues (admin + 3 I/O) and 2 interrupts per VF; the primary keeps 4 and 4 of its own
    assert (nvme["sriov_vq_flexible"], nvme["sriov_vi_flexible"]) == ("8", "4")
    assert int(nvme["max_ioqpairs"]) + 1 - int(nvme["sriov_vq_flexible"]) == 4
    assert int(nvme["msix_qsize"]) - int(nvme["sriov_vi_flexible"]) == 4
    with pytest.raises(ValueError, match="1..7"):
        sriov_nvme_args(8)
    with pytest.raises(InvalidSlot):
        sriov_nvme_args(2, addr=0)


def test_python_tar_holds_kvmslots_and_its_imports_without_bytecode(tmp_path: Path) -> None:
    path = tmp_path / "python.tar"
    write_python_tar(path, guest_python=f"{sys.version_info[0]}.{sys.version_info[1]}")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        owners = {(member.uid, member.gid) for member in tar.getmembers()}
    assert "kvmslots/pci/discovery.py" in names and "qemu/qmp/__init__.py" in names
    assert "tenacity/__init__.py" in names and "bitarray/__init__.py" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert owners == {(0, 0)}
    assert path.stat().st_size % 512 == 0  # a whole number of sectors: the guest reads it as a disk


def test_passthrough_files_are_looked_for_in_the_guest_dirs_subdirectory(tmp_path: Path) -> None:
    with pytest.raises(GuestFilesMissing, match=r"passthrough guest not built.*guest build --passthrough /x"):
        find_passthrough_files("/x")
    built = tmp_path / "passthrough"
    built.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4", "packages.txt"):
        (built / name).write_text(name)
    assert find_passthrough_files(tmp_path) == (
        built / "vmlinuz", built / "initramfs.cpio.gz", built / "rootfs.ext4")
    assert guest.passthrough_dir(tmp_path) == built


def test_passthrough_command_line(tmp_path: Path) -> None:
    built = tmp_path / "passthrough"
    built.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"):
        (built / name).write_text(name)
    (built / "packages.txt").write_text("python3.11 3.11.2-6 amd64\n")
    vm = TestVM(mode="passthrough", guest_dir=tmp_path, accel="tcg")
    try:
        command = vm.qemu_command()
        assert vm.guest_python == "3.11"
    finally:
        vm.stop()
    joined = " ".join(command)
    assert "-machine q35,kernel-irqchip=split" in joined and "-m 1024" in joined
    assert command.index("intel-iommu,intremap=on") < command.index(sriov_nvme_args(4)[3])
    assert "intel_iommu=on iommu=pt" in joined and "kvmslots.root=kvmslots-root" in joined
    assert f"file={built / 'rootfs.ext4'},if=none,id=kvmslots-root,format=raw,readonly=on" in joined


FAKE_RECIPE = """#!/usr/bin/env bash
# Stands in for build-guest.sh: records its arguments, writes the passthrough guest's files.
printf '%s\\n' "$@" >"$FAKE_LOG"
out=${@: -1}/passthrough
mkdir -p "$out"
for name in vmlinuz initramfs.cpio.gz rootfs.ext4 packages.txt; do echo "$name" >"$out/$name"; done
"""


def test_guest_build_passthrough_runs_the_recipe_with_its_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from kvmslots.cli import Output

    recipe = tmp_path / "recipe" / "build-guest.sh"
    recipe.parent.mkdir()
    recipe.write_text(FAKE_RECIPE)
    (recipe.parent / "init").write_text("#!/bin/sh\n")
    monkeypatch.setattr(guest, "BUILD_SCRIPT", recipe)
    monkeypatch.setattr(guest, "INIT_SCRIPT", recipe.parent / "init")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "args"))
    parser = argparse.ArgumentParser(prog="kvmslots")
    parser.add_argument("--json", action="store_true")
    guest.add_guest_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["--json", "guest", "build", "--passthrough", "-q", "--work-dir", "/w", str(tmp_path)])
    assert args.func(args, None, Output(True)) == 0
    assert (tmp_path / "args").read_text().split() == ["--work", "/w", "--passthrough", str(tmp_path)]
    built = tmp_path / "passthrough"
    assert json.loads(capsys.readouterr().out) == {
        "directory": str(built), "kernel": str(built / "vmlinuz"),
        "initramfs": str(built / "initramfs.cpio.gz"), "rootfs": str(built / "rootfs.ext4"),
    }  # fmt: skip
    (built / "rootfs.ext4").unlink()
    monkeypatch.setattr(guest, "BUILD_SCRIPT", recipe.parent / "half.sh")
    (recipe.parent / "half.sh").write_text("#!/bin/sh\n")
    with pytest.raises(guest.GuestBuildFailed, match="did not write vmlinuz, initramfs.cpio.gz, rootfs.ext4"):
        guest.build_passthrough_guest(tmp_path / "other")


# --- in the guest ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pt_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestVM]:
    started = time.monotonic()
    with TestVM(tmp_path_factory.mktemp("passthrough-vm"), mode="passthrough") as vm:
        TIMINGS["boot (QEMU start to shell)"] = time.monotonic() - started
        yield vm
    print("\npassthrough guest timings:")
    for step, seconds in TIMINGS.items():
        print(f"  {step:<48} {seconds:6.2f} s")


@pytest.fixture(scope="module")
def vfs(pt_vm: TestVM) -> list[str]:
    started = time.monotonic()
    found = pt_vm.enable_nvme_vfs(2)
    TIMINGS["enable 2 VFs (virt-mgmt, online, nvme probe)"] = time.monotonic() - started
    return found


def timed(step: str, vm: TestVM, script: str, timeout: float = 120.0, interpreter: str = "sh") -> str:
    started = time.monotonic()
    output, status = vm.run_script(script, timeout, interpreter=interpreter)
    TIMINGS[step] = time.monotonic() - started
    assert status == 0, output
    return output


def test_run_script_returns_output_and_the_scripts_own_exit_status(pt_vm: TestVM) -> None:
    output, status = pt_vm.run_script("echo one; echo two >&2; exit 3")
    assert (output, status) == ("one\ntwo\n", 3)
    assert pt_vm.run_status("echo still here") == ("still here\n", 0)  # the console's shell lives on
    text = "".join(f"print(str({i}) * 3, end='')\n" for i in range(400)) + "import sys; sys.exit(7)\n"
    output, status = pt_vm.run_script(text, interpreter="python3")  # ~10 kB through the console
    assert status == 7 and output == "".join(str(i) * 3 for i in range(400))


def test_the_guest_has_an_iommu_with_interrupt_remapping_and_an_sriov_pf(pt_vm: TestVM) -> None:
    dmesg = pt_vm.run("dmesg", check=True)
    assert "DMAR: IOMMU enabled" in dmesg
    assert "DMAR-IR: Enabled IRQ remapping" in dmesg
    assert "Default domain type: Passthrough" in dmesg  # iommu=pt
    groups = pt_vm.run("ls /sys/kernel/iommu_groups", check=True).split()
    assert len(groups) >= 4
    assert pt_vm.run(f"cat /sys/bus/pci/devices/{PF}/sriov_totalvfs", check=True).strip() == "4"
    assert pt_vm.run(f"readlink /sys/bus/pci/devices/{PF}/driver", check=True).strip().endswith("/nvme")


def test_virtual_functions_come_up_with_physfn_links_groups_and_the_nvme_driver(
    pt_vm: TestVM, vfs: list[str]
) -> None:
    assert vfs == ["0000:00:02.1", "0000:00:02.2"]
    script = "".join(
        f"cd /sys/bus/pci/devices/{vf}; echo {vf} $(basename $(readlink physfn)) $(basename $(readlink driver))"
        f" $(basename $(readlink iommu_group)) $(basename $(readlink ../{PF}/virtfn{index}))\n"
        for index, vf in enumerate(vfs)
    )
    rows = [line.split() for line in timed("read VF links", pt_vm, script).splitlines()]
    groups = set()
    for (vf, physfn, driver, group, virtfn), expected in zip(rows, vfs):
        assert (vf, physfn, driver, virtfn) == (expected, PF, "nvme", expected)
        groups.add(group)
    assert len(groups) == 2  # a group of its own each


def test_discover_sysfs_in_the_guest_finds_the_pf_and_its_vfs(pt_vm: TestVM, vfs: list[str]) -> None:
    timed("python3 -c pass", pt_vm, "python3 -c pass")
    output = timed(
        "import kvmslots + discover_sysfs (python3)", pt_vm,
        "import json, kvmslots\nfrom kvmslots.pci.discovery import discover_sysfs\n"
        "print(json.dumps(discover_sysfs()))\n", interpreter="python3",
    )  # fmt: skip
    records = {record["address"]: record for record in json.loads(output.strip().splitlines()[-1])}
    assert records[PF]["dev_type"] == "type-PF"
    assert (records[PF]["vendor_id"], records[PF]["product_id"]) == ("1b36", "0010")
    for vf in vfs:
        assert records[vf]["dev_type"] == "type-VF"
        assert records[vf]["parent_addr"] == PF
        assert isinstance(records[vf]["iommu_group"], int)
        assert records[vf]["numa_node"] is None  # no NUMA topology (numa=True adds one): the kernel says -1
    assert len({records[a]["iommu_group"] for a in [PF, *vfs]}) == 3


VFIO_ROUND_TRIP = """
import asyncio, json, os, subprocess, time
from kvmslots import Monitor
from kvmslots.pci.binding import SysfsBinder
from kvmslots.testvm import TestVM

vf = {vf!r}
steps = {{}}
def step(name, started):
    steps[name] = round(time.monotonic() - started, 3)

t = time.monotonic()
subprocess.run(["modprobe", "-a", "vfio-pci", "vfio_iommu_type1"], check=True)
step("modprobe vfio-pci vfio_iommu_type1", t)
binder = SysfsBinder()
before = binder.driver(vf)
t = time.monotonic()
binder.detach(vf)
step("SysfsBinder.detach (driver_override, unbind, probe)", t)
group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{{vf}}/iommu_group"))
facts = {{"before": before, "bound": binder.driver(vf), "group": group,
          "dev_vfio": os.path.exists(f"/dev/vfio/{{group}}")}}

# Cold plug, as the brief's command line: a q35 QEMU with stopped CPUs takes the VF at start.
t = time.monotonic()
with TestVM(mode="qtest", machine="q35", extra_args=["-nodefaults", "-device", f"vfio-pci,host={{vf}},id=cold"]) as vm:
    step("nested QEMU start with vfio-pci (q35, -S)", t)
    async def cold():
        async with Monitor(vm.qmp_path) as mon:
            return [(f.address, f.qdev_id, f.vendor, f.device) for f in (await mon.query_pci()).functions]
    facts["cold"] = asyncio.run(cold())

# Hot plug into a pc QEMU with stopped CPUs, unplug with the guest's ACPI eject played by qtest.
t = time.monotonic()
with TestVM(mode="qtest") as vm:
    step("nested QEMU start (pc, -S)", t)
    async def hot():
        async with Monitor(vm.qmp_path) as mon:
            t = time.monotonic()
            await mon.device_add({{"driver": "vfio-pci", "host": vf, "id": "hostdev0", "bus": "pci.0", "addr": "0x5"}})
            step("device_add vfio-pci", t)
            plugged = [(f.address, f.qdev_id, f.vendor, f.device) for f in (await mon.query_pci()).functions]
            t = time.monotonic()
            task = asyncio.ensure_future(mon.device_del("hostdev0", 20))
            await asyncio.sleep(0.2)
            vm.acpi_eject(5)
            deleted = await task
            step("device_del + ACPI eject -> DEVICE_DELETED", t)
            after = [f.qdev_id for f in (await mon.query_pci()).functions]
            return plugged, deleted, after
    facts["hot"], facts["deleted"], facts["after"] = asyncio.run(hot())

t = time.monotonic()
binder.reattach(vf)
step("SysfsBinder.reattach", t)
facts["back"] = binder.driver(vf)
facts["steps"] = steps
print(json.dumps(facts))
"""


def test_a_vf_bound_to_vfio_pci_is_taken_by_a_qemu_inside_the_guest_and_given_back(
    pt_vm: TestVM, vfs: list[str]
) -> None:
    vf = vfs[0]
    output = timed("vfio round trip script (total)", pt_vm, VFIO_ROUND_TRIP.format(vf=vf), 300, "python3")
    facts = json.loads(output.strip().splitlines()[-1])
    for name, seconds in facts["steps"].items():
        TIMINGS[f"  in guest: {name}"] = seconds
    assert (facts["before"], facts["bound"], facts["back"]) == ("nvme", "vfio-pci", "nvme")
    assert facts["dev_vfio"], f"/dev/vfio/{facts['group']} did not appear"
    assert ["00:01.0", "cold", 0x1B36, 0x0010] in facts["cold"]  # q35: first free slot
    assert ["00:05.0", "hostdev0", 0x1B36, 0x0010] in facts["hot"]
    assert facts["deleted"] is True and "hostdev0" not in facts["after"]
    assert not pt_vm.run("ls /dev/vfio", check=True).split().count(facts["group"])  # group closed again


def test_vfs_can_be_disabled_and_enabled_again(pt_vm: TestVM, vfs: list[str]) -> None:
    started = time.monotonic()
    assert pt_vm.enable_nvme_vfs(0) == []
    TIMINGS["disable VFs (sriov_numvfs=0)"] = time.monotonic() - started
    assert pt_vm.run("ls /sys/bus/pci/devices/ | grep -c 0000:00:02", check=True).strip() == "1"
    assert pt_vm.enable_nvme_vfs(3) == ["0000:00:02.1", "0000:00:02.2", "0000:00:02.3"]
    assert pt_vm.enable_nvme_vfs(2) == vfs  # as the other tests found them

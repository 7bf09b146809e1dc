"""Ganeti KVM runtime files as kvmslots state (kvmslots.ganeti; no QEMU needed).

The files in tests/data/ganeti/ are Ganeti's own test data and files built from the shapes its
source writes (see the README there): the 2.10-2.15 layout (``pci``, ids
``hot<type>-<uuid8>-pci-<slot>``) and the 2.16+ layout (``hvinfo`` with ``id``, ``bus``, ``addr``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from kvmslots import DeviceState, StateConflict, StateImportError, Store, ValidationError
from kvmslots.errors import GanetiRuntimeError
from kvmslots.ganeti import (
    LAYOUT_NEW,
    LAYOUT_OLD,
    GanetiRuntime,
    cmd_import_ganeti,
    command_line,
    export_document,
    parse_runtime,
    read_runtime,
    record_ganeti_vm,
    validate_runtime,
)
from kvmslots.store import parse_export

DATA = Path(__file__).resolve().parent / "data" / "ganeti"
UP_OLD = DATA / "upstream-2.15.2-kvm_runtime.json"
UP_NEW = DATA / "upstream-3.1.1-kvm_runtime.json"
UPGRADED = DATA / "upgraded-2.16-runtime.json"
NODE_OLD = DATA / "node-2.15-runtime.json"
NODE_NEW = DATA / "node-3.1-runtime.json"
NODE_SCSI = DATA / "node-3.1-scsi-runtime.json"

NIC = "003fc157-66a8-4e6d-8b7e-ec4f69751396"
DISK0 = "7c079136-2573-4112-82d0-0d3d2aa90d8f"
DISK1 = "9f5c5bd4-6f60-480b-acdc-9bb1a4b7df79"


def mask(*slots: int) -> str:
    return "".join("1" if s in slots else "0" for s in range(32))


def placed(runtime: GanetiRuntime) -> dict[str, tuple[str, str, int]]:
    return {d.uuid: (d.qemu_id, d.driver, d.slot) for d in runtime.devices}


def load(path: Path) -> list[Any]:
    return json.loads(path.read_text())


def dump(tmp_path: Path, data: Any, name: str = "inst.runtime") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) + "\n")  # as Ganeti's serializer.DumpJson writes it
    return path


# --------------------------------------------------------------------------- both layouts, as Ganeti wrote them


def test_upstream_2_15_file_is_the_old_layout():
    rt = read_runtime(UP_OLD, "inst2")
    assert rt.layout == LAYOUT_OLD
    assert rt.instance == "xen-test-inst2"
    assert rt.vm.name == "inst2" and rt.vm.machine == "pc-1.1"
    # the old _GenerateDeviceKVMId: hotplug target (hotnic/hotdisk), uuid8, "pci", slot
    assert placed(rt) == {
        NIC: ("hotnic-003fc157-pci-6", "virtio-net-pci", 6),
        DISK0: ("hotdisk-7c079136-pci-4", "virtio-blk-pci", 4),
        DISK1: ("hotdisk-9f5c5bd4-pci-5", "virtio-blk-pci", 5),
    }
    # "-balloon virtio" without an address: QEMU places the balloon, Ganeti 2.10.0 reserved "1111"
    assert rt.vm.mask == mask(0, 1, 2, 3)
    assert rt.reserved == (0, 1, 2, 3) and not rt.foreign and not rt.unmasked
    assert all(d.bus == "pci.0" and d.function == 0 for d in rt.devices)
    assert rt.device("nic", 0).props == {"mac": "aa:00:00:bf:2f:16"}


def test_upstream_3_1_file_is_the_new_layout():
    rt = read_runtime(UP_NEW, "inst2")
    assert rt.layout == LAYOUT_NEW
    assert placed(rt) == {
        NIC: ("nic-003fc157-66a8-4e6d", "virtio-net-pci", 8),
        DISK0: ("disk-7c079136-2573-4112", "virtio-blk-pci", 9),
        DISK1: ("disk-9f5c5bd4-6f60-480b", "virtio-blk-pci", 10),
    }
    # no kvm_pci_reservations in these (older) hvparams: Ganeti 2.16+ reserves 12; its own devices
    # sit on 8-10, which therefore are recorded devices, not mask bits
    assert rt.reserved == tuple(range(12))
    assert rt.unmasked == (8, 9, 10)
    assert rt.vm.mask == mask(*(set(range(12)) - {8, 9, 10}))
    assert not any(d.id_is_derived for d in rt.devices)
    assert rt.device("disk", 1).hvinfo == {"driver": "virtio-blk-pci", "id": "disk-9f5c5bd4-6f60-480b",
                                           "bus": "pci.0", "addr": "0xa"}


def test_the_two_upstream_files_hold_the_same_instance_in_two_layouts():
    old, new = read_runtime(UP_OLD, "a"), read_runtime(UP_NEW, "b")
    assert {d.uuid for d in old.devices} == {d.uuid for d in new.devices} == {NIC, DISK0, DISK1}
    assert old.kvm_cmd == new.kvm_cmd and old.hvparams == new.hvparams


def test_a_2_16_upgraded_file_keeps_the_old_ids_and_slots():
    """What Ganeti 2.16+ saves after reading a 2.15 file: hvinfo with the hot... ids."""
    old, upgraded = read_runtime(UP_OLD, "a"), read_runtime(UPGRADED, "a")
    assert upgraded.layout == LAYOUT_NEW
    assert placed(upgraded) == placed(old)
    assert upgraded.vm.mask == mask(*(set(range(12)) - {4, 5, 6}))
    assert upgraded.unmasked == (4, 5, 6)


def test_node_2_15_file_e1000_nics_and_an_explicit_balloon():
    rt = read_runtime(NODE_OLD, "inst1")
    assert rt.vm.machine == "pc-i440fx-2.1"
    assert {d.qemu_id: (d.driver, d.slot) for d in rt.devices} == {
        "hotdisk-5b1f0c2e-pci-4": ("virtio-blk-pci", 4),
        "hotnic-8e2a4c6d-pci-5": ("e1000", 5),  # nic_type e1000: the model is the hvparam
        "hotnic-c4d3e2f1-pci-6": ("e1000", 6),
    }
    assert rt.reserved == (0, 1, 2)
    assert rt.foreign == {3: "-balloon virtio,id=balloon,bus=pci.0,addr=0x3"}
    assert rt.vm.mask == mask(0, 1, 2, 3)
    assert "balloon" in rt.foreign_ids


def test_node_3_1_file_devices_after_the_reservations():
    rt = read_runtime(NODE_NEW, "test2")
    assert rt.vm.machine == "pc-i440fx-7.2"  # "-machine pc-i440fx-7.2,accel=kvm"
    assert placed(rt) == {
        "8db0f07a-f486-481e-b254-4c90123f61f9": ("disk-8db0f07a-f486-481e", "virtio-blk-pci", 12),
        "4564e5d5-8df4-40ec-8dee-b5b0d6067495": ("nic-4564e5d5-8df4-40ec", "virtio-net-pci", 13),
    }
    assert rt.vm.mask == mask(*range(12)) and not rt.unmasked
    assert "qga0" in rt.foreign_ids and not rt.foreign  # the guest agent is placed by QEMU (below 12)


def test_node_3_1_scsi_disk_is_skipped_and_the_nic_recorded():
    rt = read_runtime(NODE_SCSI, "test3")
    assert [(d.qemu_id, d.slot) for d in rt.devices] == [("nic-4564e5d5-8df4-40ec", 12)]
    [skip] = rt.skipped
    assert (skip.kind, skip.index, skip.booked) == ("disk", 0, None)
    assert "scsi.0" in skip.reason


def test_pretty_printed_and_one_line_files_read_the_same(tmp_path):
    one_line = dump(tmp_path, load(UP_NEW))
    assert read_runtime(one_line, "x").devices == read_runtime(UP_NEW, "x").devices


def test_a_file_from_before_ganeti_2_8_has_no_disks_entry(tmp_path):
    cmd, nics, hv, _ = load(UP_OLD)
    rt = read_runtime(dump(tmp_path, [cmd, nics, hv]), "x")
    assert [d.qemu_id for d in rt.devices] == ["hotnic-003fc157-pci-6"]
    assert rt.disks == ()


def test_parse_runtime_takes_text_and_bytes():
    text = UP_OLD.read_text()
    assert parse_runtime(text, "x").devices == parse_runtime(text.encode(), "x").devices
    assert parse_runtime(text, "x").source == "<text>"


# --------------------------------------------------------------------------- Ganeti's reservations, mirrored


def test_kvm_pci_reservations_sets_the_mask(tmp_path):
    data = load(NODE_NEW)
    data[2]["kvm_pci_reservations"] = 16  # the disk (12) and NIC (13) now sit inside the reservation
    rt = read_runtime(dump(tmp_path, data), "x")
    assert rt.reserved == tuple(range(16)) and rt.unmasked == (12, 13)
    assert rt.vm.mask == mask(*(set(range(16)) - {12, 13}))
    data[2]["kvm_pci_reservations"] = 4
    assert read_runtime(dump(tmp_path, data), "x").vm.mask == mask(0, 1, 2, 3)


def test_old_layout_reserves_sound_card_and_scsi_controller_slots(tmp_path):
    """2.11-2.15: "111", then a slot for a PCI sound card and one for the SCSI controller (both
    placed by QEMU), then the balloon's explicit one; disks and NICs after them."""
    cmd, nics, hv, disks = load(NODE_OLD)
    hv.update(soundhw="ac97", disk_type="scsi")
    cmd[cmd.index("-balloon") + 1] = "virtio,id=balloon,bus=pci.0,addr=0x5"
    disks[0][0]["pci"] = 6
    nics[0]["pci"], nics[1]["pci"] = 7, 8
    rt = read_runtime(dump(tmp_path, [cmd, nics, hv, disks]), "x")
    assert rt.reserved == (0, 1, 2, 3, 4)
    assert rt.foreign == {5: "-balloon virtio,id=balloon,bus=pci.0,addr=0x5"}
    # the disk is on if=scsi: not a PCI device, but Ganeti booked slot 6 for it
    [skip] = rt.skipped
    assert skip.booked == 6 and "if=scsi" in skip.reason
    assert rt.booked == {6: "disk 0 (5b1f0c2e-9d84-4a3b-b7e6-1c2d3e4f5a6b)"}
    assert [(d.qemu_id, d.slot) for d in rt.devices] == [("hotnic-8e2a4c6d-pci-7", 7), ("hotnic-c4d3e2f1-pci-8", 8)]
    assert rt.vm.mask == mask(0, 1, 2, 3, 4, 5, 6)


def test_new_layout_booked_slot_of_an_ide_disk_stays_reserved(tmp_path):
    data = load(NODE_NEW)
    data[2]["disk_type"] = "ide"
    data[3][0][0]["hvinfo"]["driver"] = "ide"  # 3.x: hvinfo on pci.0, but the disk is an ide-hd
    rt = read_runtime(dump(tmp_path, data), "x")
    assert [d.qemu_id for d in rt.devices] == ["nic-4564e5d5-8df4-40ec"]
    assert rt.booked == {12: "disk 0 (8db0f07a-f486-481e-b254-4c90123f61f9)"}
    assert rt.vm.mask == mask(*range(13))
    assert "ide-hd,drive=disk-8db0f07a-f486-481e" in command_line(rt)


def test_isa_nics_and_nics_without_a_slot_are_skipped(tmp_path):
    cmd, nics, hv, disks = load(NODE_OLD)
    hv["nic_type"] = "ne2k_isa"
    rt = read_runtime(dump(tmp_path, [cmd, nics, hv, disks]), "x")
    assert [d.kind for d in rt.devices] == ["disk"]
    assert [(s.index, s.booked) for s in rt.skipped] == [(0, 5), (1, 6)]
    cmd, nics, hv, disks = load(UP_NEW)
    nics[0]["hvinfo"] = {}  # 2.16+: "Non paravirtual NICs hvinfo is empty"
    del disks[1][0]["hvinfo"]  # and a device with neither pci nor hvinfo
    rt = read_runtime(dump(tmp_path, [cmd, nics, hv, disks]), "x")
    assert [d.qemu_id for d in rt.devices] == ["disk-7c079136-2573-4112"]
    assert [(s.kind, s.index) for s in rt.skipped] == [("nic", 0), ("disk", 1)]


def test_machine_type_from_the_command_line(tmp_path):
    cmd, nics, hv, disks = load(NODE_OLD)
    i = cmd.index("-machine")
    for given, machine in [("pc-i440fx-2.1,accel=kvm", "pc-i440fx-2.1"), ("type=pc,accel=kvm", "pc"), ("pc", "pc")]:
        cmd[i + 1] = given
        assert read_runtime(dump(tmp_path, [cmd, nics, hv, disks]), "x").vm.machine == machine
    cmd[i] = "-M"  # Ganeti with a QEMU that has no -machine
    cmd[i + 1] = "pc-1.0"
    assert read_runtime(dump(tmp_path, [cmd, nics, hv, disks]), "x").vm.machine == "pc-1.0"
    del cmd[i:i + 2]
    rt = read_runtime(dump(tmp_path, [cmd, nics, hv, disks]), "x")
    assert rt.vm.machine == "pc" and any("no machine type" in note for note in rt.notes)


# --------------------------------------------------------------------------- bad files: typed errors


def _edit(path: Path, change: Callable[[list[Any]], Any]) -> Callable[[Path], Path]:
    """A file made by changing *path*'s data in place (whatever *change* returns is ignored)."""

    def make(tmp_path: Path) -> Path:
        data = copy.deepcopy(load(path))
        change(data)
        return dump(tmp_path, data)

    return make


def _whole(path: Path, build: Callable[[list[Any]], Any]) -> Callable[[Path], Path]:
    """A file holding what *build* makes of *path*'s data."""
    return lambda tmp_path: dump(tmp_path, build(copy.deepcopy(load(path))))


def _text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inst.runtime"
    path.write_text(text)
    return path


def _set(obj: dict[str, Any], **values: Any) -> None:
    obj.update(values)


def _dup_slot(d: list[Any]) -> None:
    d[3][1][0]["hvinfo"]["addr"] = "0x8"


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not JSON": (lambda p: _text(p, '[["/usr/bin/kvm"'), "not valid JSON"),
    "an object": (_whole(UP_OLD, lambda d: {"kvm_cmd": d[0]}), "must be a JSON list"),
    "five items": (_whole(UP_OLD, lambda d: d + [[]]), "must be a JSON list"),
    "empty command": (_whole(UP_OLD, lambda d: [[]] + d[1:]), "non-empty list"),
    "command with a list": (_edit(UP_OLD, lambda d: d[0].append(["x"])), "must be text or a number"),
    "NICs not a list": (_whole(UP_OLD, lambda d: [d[0], {}, d[2], d[3]]), "NICs (item 2)"),
    "hvparams a list": (_whole(UP_OLD, lambda d: [d[0], d[1], [], d[3]]), "hypervisor parameters"),
    "disk not a triple": (_edit(UP_OLD, lambda d: d[3][0].pop()), "triple"),
    "bad UUID": (_edit(UP_OLD, lambda d: _set(d[1][0], uuid="003fc157-66a8-4e6d")), "Not a UUID"),
    "UUID twice": (_edit(UP_OLD, lambda d: _set(d[3][0][0], uuid=NIC)), "belongs to both"),
    "slot 32": (_edit(UP_OLD, lambda d: _set(d[1][0], pci=32)), "integer 0-31"),
    "slot as text": (_edit(UP_OLD, lambda d: _set(d[1][0], pci="6")), "integer 0-31"),
    "slot true": (_edit(UP_OLD, lambda d: _set(d[1][0], pci=True)), "integer 0-31"),
    "two at one slot (old)": (_edit(UP_OLD, lambda d: _set(d[1][0], pci=4)), "both at slot 4"),
    "slot of the ISA bridge": (_edit(UP_OLD, lambda d: _set(d[1][0], pci=1)), "built-in"),
    "no nic_type": (_edit(UP_OLD, lambda d: d[2].pop("nic_type")), "have no nic_type"),
    "bad MAC": (_edit(UP_OLD, lambda d: _set(d[1][0], mac="aa:00:00:bf:2f")), "bad MAC"),
    "the balloon's slot": (_edit(NODE_OLD, lambda d: _set(d[1][0], pci=3)), "command line gives to -balloon"),
    "decimal addr": (_edit(UP_NEW, lambda d: _set(d[1][0]["hvinfo"], addr="8")), "hex text"),
    "addr 0x20": (_edit(UP_NEW, lambda d: _set(d[1][0]["hvinfo"], addr="0x20")), "out of range"),
    "addr with a function": (_edit(UP_NEW, lambda d: _set(d[1][0]["hvinfo"], addr="0x8.1")), "hex text"),
    "hvinfo without id": (_edit(UP_NEW, lambda d: d[1][0]["hvinfo"].pop("id")), "no 'id'"),
    "unknown bus": (_edit(UP_NEW, lambda d: _set(d[1][0]["hvinfo"], bus="pci.1")), "bus 'pci.1'"),
    "two at one slot (new)": (_edit(UP_NEW, _dup_slot), "both at slot 8"),
    "id of another UUID": (_edit(UP_NEW, lambda d: _set(d[1][0]["hvinfo"], id="nic-deadbeef-66a8-4e6d")),
                           "not the id Ganeti gives it"),
    "old id, other slot": (_edit(UPGRADED, lambda d: _set(d[1][0]["hvinfo"], id="hotnic-003fc157-pci-7")),
                           "says slot 7"),
    "old id, other device": (_edit(UPGRADED, lambda d: _set(d[1][0]["hvinfo"], id="hotnic-7c079136-pci-6")),
                             "names another device"),
    "id QEMU refuses": (_edit(UP_NEW, lambda d: _set(d[1][0]["hvinfo"], id="nic 003fc157")), "QEMU device id"),
    "id of a -device": (_edit(NODE_NEW, lambda d: _set(d[1][0]["hvinfo"], id="qga0")), "qga0"),
    "reservations 33": (_edit(NODE_NEW, lambda d: _set(d[2], kvm_pci_reservations=33)), "kvm_pci_reservations"),
    "reservations text": (_edit(NODE_NEW, lambda d: _set(d[2], kvm_pci_reservations="12")), "kvm_pci_reservations"),
    "q35": (_edit(NODE_NEW, lambda d: d[0].__setitem__(d[0].index("-machine") + 1, "pc-q35-7.2")), "no pci.0"),
    "microvm": (_edit(NODE_NEW, lambda d: d[0].__setitem__(d[0].index("-machine") + 1, "microvm")), "not supported"),
    "two -device at one addr": (_edit(NODE_NEW, lambda d: d[0].extend(["-device", "virtio-rng-pci,addr=0xe",
                                                                       "-device", "i6300esb,addr=0xe"])),
                                "both at slot 14"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_runtime_files_raise_a_typed_error_naming_the_file(tmp_path, case):
    make, phrase = BAD[case]
    path = make(tmp_path)
    with pytest.raises(GanetiRuntimeError) as info:
        read_runtime(path, "vm1")
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert phrase in str(info.value)
    assert isinstance(info.value, StateImportError) and isinstance(info.value, ValidationError)


def test_errors_about_ids_name_them(tmp_path):
    with pytest.raises(GanetiRuntimeError) as info:
        read_runtime(_edit(UP_NEW, _dup_slot)(tmp_path), "vm1")
    assert set(info.value.ids) == {"disk-9f5c5bd4-6f60-480b", "nic-003fc157-66a8-4e6d"}
    # and carry the facts every kvmslots error has: the VM and the device at fault
    facts = info.value.facts()
    assert facts["vm"] == "vm1" and facts["slot"] == 8 and facts["bus"] == "pci.0"
    assert facts["device_id"] == "disk-9f5c5bd4-6f60-480b" and facts["uuid"] == DISK1
    assert facts["path"].endswith("inst.runtime")
    with pytest.raises(GanetiRuntimeError) as info:
        read_runtime(_whole(UP_OLD, lambda d: d + [[]])(tmp_path), "vm1")
    assert info.value.vm == "vm1" and info.value.device_id is None


def test_unreadable_file_and_bad_vm_name(tmp_path):
    with pytest.raises(GanetiRuntimeError, match="Cannot read Ganeti runtime file"):
        read_runtime(tmp_path / "missing.runtime", "vm1")
    (tmp_path / "latin1").write_bytes(b"\xff\xfe")
    with pytest.raises(GanetiRuntimeError, match="not UTF-8"):
        read_runtime(tmp_path / "latin1", "vm1")
    with pytest.raises(GanetiRuntimeError, match="VM name"):
        read_runtime(UP_OLD, "../etc")


def test_validate_runtime_checks_a_result_object_whole():
    rt = read_runtime(UP_NEW, "vm1")
    nic = rt.device("nic", 0)
    def with_nic(**changes):
        return dataclasses.replace(rt, devices=(dataclasses.replace(nic, **changes),) + rt.devices[1:])

    tampered = [
        (with_nic(slot=3), "says|not the id|mask"),
        (dataclasses.replace(rt, vm=dataclasses.replace(rt.vm, mask=mask(0, 1, 2))), "is not Ganeti's reservations"),
        (with_nic(driver="vfio-pci"), "passthrough"),
        (with_nic(function=1), "function 1"),
        (with_nic(uuid=NIC.upper()), "canonical"),
        (dataclasses.replace(rt, devices=rt.devices + (nic,)), "belongs to both|given twice"),
    ]
    for bad, phrase in tampered:
        with pytest.raises(GanetiRuntimeError, match=phrase):
            validate_runtime(bad)
    assert validate_runtime(rt) is rt


# --------------------------------------------------------------------------- the command line


def test_command_line_old_layout_device_options_as_ganeti_2_15_builds_them():
    rt = read_runtime(UP_OLD, "x")
    argv = command_line(rt, disk_files={DISK0: "/tmp/d0.img"})
    assert argv[: len(rt.kvm_cmd)] == list(rt.kvm_cmd) and "1024" in argv  # -m 1024 is a number in the file
    tail = argv[len(rt.kvm_cmd):]
    assert tail == [
        "-netdev", "user,id=hotnic-003fc157-pci-6",
        "-device", ("virtio-net-pci,mac=aa:00:00:bf:2f:16,id=hotnic-003fc157-pci-6,bus=pci.0,addr=0x6,"
                    "netdev=hotnic-003fc157-pci-6"),
        "-device", "virtio-blk-pci,drive=hotdisk-7c079136-pci-4,id=hotdisk-7c079136-pci-4,bus=pci.0,addr=0x4",
        "-drive", "file=/tmp/d0.img,format=raw,if=none,id=hotdisk-7c079136-pci-4",
        "-device", "virtio-blk-pci,drive=hotdisk-9f5c5bd4-pci-5,id=hotdisk-9f5c5bd4-pci-5,bus=pci.0,addr=0x5",
        "-drive", "file=/var/run/ganeti/instance-disks/xen-test-inst2:1,format=raw,if=none,id=hotdisk-9f5c5bd4-pci-5",
    ]  # fmt: skip


def test_command_line_new_layout_device_options_from_hvinfo(tmp_path):
    rt = read_runtime(UP_NEW, "x")
    tail = command_line(rt, netdev="tap")[len(rt.kvm_cmd):]
    assert tail[:4] == [
        "-netdev", "tap,id=nic-003fc157-66a8-4e6d",
        "-device", ("virtio-net-pci,id=nic-003fc157-66a8-4e6d,bus=pci.0,addr=0x8,netdev=nic-003fc157-66a8-4e6d,"
                    "mac=aa:00:00:bf:2f:16"),
    ]  # fmt: skip
    assert "virtio-blk-pci,id=disk-7c079136-2573-4112,bus=pci.0,addr=0x9,drive=disk-7c079136-2573-4112" in tail
    cmd, _, hv, disks = load(UP_NEW)
    disks[0][0]["params"]["access"] = "userspace"  # Ganeti opens the URI then, not the link
    no_nics = read_runtime(dump(tmp_path, [cmd, [], hv, disks]), "x")
    argv = command_line(no_nics, disk_files={"9F5C5BD4-6F60-480B-ACDC-9BB1A4B7DF79": "/tmp/a,b.img"})
    assert argv[len(cmd):len(cmd) + 2] == ["-net", "none"]
    assert "file=rbd://123451214123/,format=raw,if=none,id=disk-7c079136-2573-4112" in argv
    assert "file=/tmp/a,,b.img,format=raw,if=none,id=disk-9f5c5bd4-6f60-480b" in argv


# --------------------------------------------------------------------------- recording: all or nothing


@pytest.mark.parametrize("path", [UP_OLD, UP_NEW, UPGRADED, NODE_OLD, NODE_NEW, NODE_SCSI], ids=lambda p: p.stem)
def test_record_keeps_every_id_as_qemu_knows_it(state_location, path):
    rt = read_runtime(path, "vm1")
    with Store(state_location) as store:
        vm = record_ganeti_vm(store, rt)
        assert vm == rt.vm and store.get_vm("vm1") == rt.vm
        stored = {d.uuid: d for d in store.devices("vm1")}
        assert {u: (d.qemu_id, d.driver, d.slot) for u, d in stored.items()} == placed(rt)
        assert all(d.state is DeviceState.PLANNED and d.dev_type in ("nic", "disk") for d in stored.values())
        assert all(d.given_id == d.qemu_id for d in stored.values())  # no Ganeti id is kvmslots' own form
        assert stored.keys() == {d.uuid for d in rt.devices}
        # and the state moves like any other: export, import elsewhere, same ids
        document = store.export_vm("vm1")
    assert [d.qemu_id for d in parse_export(document)[2]] == [d.qemu_id for d in store_order(rt, document)]


def store_order(rt: GanetiRuntime, document: dict[str, Any]) -> list[Any]:
    by_uuid = {d.uuid: d for d in rt.devices}
    return [by_uuid[raw["uuid"]] for raw in document["devices"]]


def test_export_document_marks_given_ids():
    document = export_document(read_runtime(UP_NEW, "vm1"))
    assert {(d["id"], d["id_given"], d["type"], d["state"]) for d in document["devices"]} == {
        ("nic-003fc157-66a8-4e6d", True, "nic", "planned"),
        ("disk-7c079136-2573-4112", True, "disk", "planned"),
        ("disk-9f5c5bd4-6f60-480b", True, "disk", "planned"),
    }
    assert document["controllers"] == [] and document["vm"]["mask"] == read_runtime(UP_NEW, "vm1").vm.mask


def test_record_writes_nothing_when_the_runtime_does_not_validate(tmp_path):
    rt = read_runtime(UP_NEW, "vm1")
    bad = dataclasses.replace(rt, devices=rt.devices + (dataclasses.replace(rt.devices[0], index=5),))
    with Store(tmp_path / "state") as store:
        with pytest.raises(GanetiRuntimeError):
            record_ganeti_vm(store, bad)
        assert not store.has_vm("vm1") and store.vms() == []


def test_an_existing_vm_is_kept_unless_replaced(tmp_path):
    with Store(tmp_path / "state") as store:
        record_ganeti_vm(store, read_runtime(UP_OLD, "vm1"))
        with pytest.raises(StateConflict):
            record_ganeti_vm(store, read_runtime(UP_NEW, "vm1"))
        assert {d.qemu_id for d in store.devices("vm1")} == {"hotnic-003fc157-pci-6", "hotdisk-7c079136-pci-4",
                                                             "hotdisk-9f5c5bd4-pci-5"}
        record_ganeti_vm(store, read_runtime(UP_NEW, "vm1"), replace=True)
        assert {d.qemu_id for d in store.devices("vm1")} == {"nic-003fc157-66a8-4e6d", "disk-7c079136-2573-4112",
                                                             "disk-9f5c5bd4-6f60-480b"}


# --------------------------------------------------------------------------- the CLI function


class _Out:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.emitted: list[tuple[Any, str]] = []

    def emit(self, data: Any, text: Any) -> None:
        self.emitted.append((data, text() if callable(text) else text))


def _args(runtime: Path | str, vm: str | None, replace: bool = False) -> argparse.Namespace:
    # as the import subparser gives them: the VM arrives in the positional "file"
    return argparse.Namespace(ganeti_runtime=str(runtime), file=vm, replace=replace)


def test_cmd_import_ganeti_records_and_reports(tmp_path):
    out = _Out(as_json=False)
    with Store(tmp_path / "state") as store:
        assert cmd_import_ganeti(_args(NODE_SCSI, "test3"), store, out) == 0
        assert [d.qemu_id for d in store.devices("test3")] == ["nic-4564e5d5-8df4-40ec"]
    data, text = out.emitted[0]
    assert data["layout"] == LAYOUT_NEW and data["vm"]["name"] == "test3"
    assert data["devices"][0]["id"] == "nic-4564e5d5-8df4-40ec" and data["devices"][0]["slot"] == 12
    assert data["skipped"][0]["kind"] == "disk"
    json.dumps(data)
    assert "nic-4564e5d5-8df4-40ec" in text and "pci.0 slot 12" in text and "reconcile test3" in text


def test_cmd_import_ganeti_bad_file_writes_nothing(tmp_path):
    bad = _edit(UP_NEW, _dup_slot)(tmp_path)
    with Store(tmp_path / "state") as store:
        with pytest.raises(GanetiRuntimeError):
            cmd_import_ganeti(_args(bad, "vm1"), store, _Out(True))
        with pytest.raises(GanetiRuntimeError, match="name the VM"):
            cmd_import_ganeti(_args(UP_NEW, None), store, _Out(True))
        assert store.vms() == []


def test_cmd_import_ganeti_reads_stdin(tmp_path, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(UP_OLD.read_text()))
    with Store(tmp_path / "state") as store:
        assert cmd_import_ganeti(_args("-", "vm1"), store, _Out(True)) == 0
        assert len(store.devices("vm1")) == 3

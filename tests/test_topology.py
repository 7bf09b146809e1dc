"""Placement for pc and q35: what a lifecycle manager gets from plan_boot, hot add's choices, the
state machine, schema 3 and export v2.  The same behaviours on real guests are in
integration/test_topology_qemu.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid as uuidlib

import pytest

import kvmslots
from kvmslots import DeviceGroup, DeviceSpec, Store, VMSpec
from kvmslots.capabilities import (
    QemuCapabilities,
    check_capabilities,
    parse_info_version,
    parse_machine_help,
    same_machine,
)
from kvmslots.cli import main
from kvmslots.errors import (
    BusNotHotpluggable,
    InvalidFunction,
    InvalidSlot,
    InvalidTransition,
    MachineMismatch,
    NoHotplugPort,
    QemuCommandMissing,
    QemuTooOld,
    SlotsExhausted,
    StateConflict,
    UnsupportedMachine,
)
from kvmslots.hotplug import plan_boot
from kvmslots.model import Controller, DeviceState
from kvmslots.pciview import PciFunction, PciOccupancy
from kvmslots.topology import Topology


def uid(n: int) -> str:
    return str(uuidlib.UUID(int=(n << 96) | n))


def plan(store, vm, devices):
    return asyncio.run(plan_boot(store, vm, devices))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state") as s:
        yield s


def rng(n: int, **kw) -> DeviceSpec:
    return DeviceSpec(uid(n), "rng", "virtio-rng-pci", **kw)


# --- machine types -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pc", "q35", "pc-i440fx-7.2", "pc-q35-7.2", "pc-1.3", "pc-q35-2.10"])
def test_known_machine_names_are_accepted(name):
    assert VMSpec("vm1", name).machine == name


@pytest.mark.parametrize("name", ["microvm", "isapc", "none", "q36", "PC", "pc-q35", "", 35])
def test_other_machine_names_are_refused_typed(name):
    with pytest.raises(UnsupportedMachine) as info:
        VMSpec("vm1", name)
    assert info.value.machine == name


def test_each_machine_reserves_its_built_in_devices():
    assert VMSpec("a", "pc").mask == "1111" + "0" * 28
    q35 = VMSpec("a", "q35").mask
    assert [s for s, bit in enumerate(q35) if bit == "1"] == [0, 1, 31]
    assert VMSpec("a", "q35", reserve_slots=3).mask == "111" + "0" * 29  # Ganeti's kvm_pci_reservations
    assert VMSpec("a", reserve_slots=0).mask == "0" * 32
    with pytest.raises(kvmslots.InvalidMask):
        VMSpec("a", reserve_slots=33)
    with pytest.raises(kvmslots.InvalidMask):
        VMSpec("a", mask="1" * 32, reserve_slots=2)


def test_the_machine_help_parser_resolves_aliases():
    text = (
        "Supported machines are:\n"
        "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
        "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n"
        "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
        "pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n"
    )
    assert parse_machine_help(text) == {
        "pc": "pc-i440fx-7.2", "pc-i440fx-7.2": "pc-i440fx-7.2", "q35": "pc-q35-7.2", "pc-q35-7.2": "pc-q35-7.2"
    }


# --- pc: bridges ------------------------------------------------------------------------------


def test_forty_devices_on_pc_get_a_bridge_at_the_last_root_slot(store):
    devices = [rng(i + 1) for i in range(40)]
    first = plan(store, VMSpec("vm1"), devices)
    [bridge] = first.controllers
    assert (bridge.id, bridge.bus, bridge.slot, bridge.chassis) == ("pci-bridge-1", "pci.0", 31, 1)
    on_root = [d.slot for d in first.devices if d.bus == "pci.0"]
    behind = [d.slot for d in first.devices if d.bus == "pci-bridge-1"]
    assert on_root == list(range(4, 31)) and behind == list(range(1, 14))
    # the bridge comes before the devices behind it on QEMU's command line
    assert first.qemu_args[1].startswith("pci-bridge,id=pci-bridge-1,bus=pci.0,addr=0x1f,chassis_nr=1")
    assert plan(store, "vm1", devices).qemu_args == first.qemu_args  # the same every time


def test_exactly_a_full_root_bus_needs_no_bridge(store):
    assert plan(store, VMSpec("vm1"), [rng(i + 1) for i in range(28)]).controllers == ()


def test_a_spare_bridge_is_planned_up_front(store):
    result = plan(store, VMSpec("vm1", spare_bridge=True), [rng(i + 1) for i in range(28)])
    [bridge] = result.controllers
    assert bridge.slot == 31
    assert [d.slot for d in result.devices if d.bus == "pci-bridge-1"] == [1]  # 27 on pci.0, one behind


def test_spare_bridge_is_for_pc_only():
    with pytest.raises(UnsupportedMachine):
        VMSpec("vm1", "q35", spare_bridge=True)


# --- q35: root ports ----------------------------------------------------------------------------


def test_q35_gives_every_device_its_own_port_and_keeps_spares(store):
    result = plan(store, VMSpec("vm1", "q35", hotplug_ports=2), [rng(1), rng(2), rng(3)])
    ports = result.controllers
    assert [(p.id, p.slot, p.function, p.chassis) for p in ports] == [
        (f"pcie-port-{n}", 2, n - 1, n) for n in range(1, 6)
    ]
    assert [(d.bus, d.slot) for d in result.devices] == [("pcie-port-1", 0), ("pcie-port-2", 0), ("pcie-port-3", 0)]
    assert "multifunction=on" in ports[0].device_option() and "multifunction" not in ports[1].device_option()
    assert "chassis=1" in ports[0].device_option()
    assert result.devices[0].device_option() == f"virtio-rng-pci,id=rng-{uid(1)[:8]}-pci-0,bus=pcie-port-1,addr=0x0"


def test_q35_ports_are_stable_and_grow_into_the_next_slot(store):
    first = plan(store, VMSpec("vm1", "q35"), [rng(i + 1) for i in range(4)])  # 4 devices + 4 spares
    assert [(p.slot, p.function) for p in first.controllers] == [(2, f) for f in range(8)]
    again = plan(store, "vm1", [rng(i + 1) for i in range(5)])  # one more: a spare is used, a new spare added
    assert again.controllers[:8] == first.controllers
    assert [(p.slot, p.function) for p in again.controllers[8:]] == [(3, 0)]
    assert again.devices[4].bus == "pcie-port-5"
    assert store.controllers("vm1") == list(again.controllers)


def test_only_slot_0_exists_behind_a_root_port(store):
    plan(store, VMSpec("vm1", "q35"), [])
    with pytest.raises(InvalidSlot, match="slot 0"):
        plan(store, "vm1", [rng(1, bus="pcie-port-1", slot=1)])


def test_replanning_a_vm_for_another_machine_family_is_refused(store):
    plan(store, VMSpec("vm1", "q35"), [rng(1)])
    with pytest.raises(StateConflict, match="q35"):
        plan(store, VMSpec("vm1", "pc"), [rng(1)])


# --- multifunction groups -----------------------------------------------------------------------


def test_a_group_shares_one_slot_as_functions(store):
    result = plan(store, VMSpec("vm1"), [rng(1), DeviceGroup((rng(2), rng(3), rng(4))), rng(5)])
    assert [(d.slot, d.function, d.multifunction) for d in result.devices] == [
        (4, 0, False), (5, 0, True), (5, 1, False), (5, 2, False), (6, 0, False)
    ]
    args = [d.device_option() for d in result.devices]
    assert "addr=0x5.0,multifunction=on" in args[1] and args[2].endswith("addr=0x5.1")
    assert plan(store, "vm1", [rng(1), DeviceGroup((rng(2), rng(3), rng(4))), rng(5)]).devices == result.devices


@pytest.mark.parametrize("members", [(), ("one",), tuple(range(9))])
def test_a_group_has_two_to_eight_members(members):
    with pytest.raises(InvalidFunction):
        DeviceGroup(tuple(rng(i + 1) for i in range(len(members))))


def test_group_members_take_no_place_of_their_own():
    with pytest.raises(InvalidFunction, match="group"):
        DeviceGroup((rng(1, slot=5), rng(2)))


# --- hot add choices (the live view as QEMU reports it) --------------------------------------------


def _topology(vm, controllers, view, devices=()):
    topo = Topology(vm, controllers)
    topo.occupy_live(view)
    topo.occupy_devices(devices)
    return topo


def _port_view(ports, taken=()):
    functions = [PciFunction(0, p.slot, p.function, p.id, 0x1B36, 0x000C, "PCI bridge", secondary_bus=n + 1)
                 for n, p in enumerate(ports)]
    functions += [PciFunction(n + 1, 0, 0, f"dev{n}") for n, _ in enumerate(ports) if n in taken]
    return PciOccupancy(functions)


def test_hot_add_on_q35_takes_the_first_free_port_and_never_grows():
    vm = VMSpec("vm1", "q35", hotplug_ports=2)
    ports = [Controller.port(1, 2, 0), Controller.port(2, 2, 1)]
    topo = _topology(vm, ports, _port_view(ports, taken={0}))
    assert topo.place(hotplug=True).bus == "pcie-port-2"
    with pytest.raises(NoHotplugPort) as info:
        topo.place(hotplug=True)
    assert info.value.ports == 2 and "--hotplug-ports" in str(info.value)
    assert len(topo.controllers) == 2


def test_hot_add_on_q35_refuses_pcie_0_itself():
    topo = _topology(VMSpec("vm1", "q35"), [], PciOccupancy())
    with pytest.raises(BusNotHotpluggable) as info:
        topo.place(slot=5, hotplug=True)
    assert info.value.bus == "pcie.0"


def test_hot_add_on_pc_goes_behind_the_bridge_when_pci_0_is_full():
    vm = VMSpec("vm1", spare_bridge=True)
    bridge = Controller.bridge(1, "pci.0", 31)
    functions = [PciFunction(0, s, 0, f"d{s}") for s in range(4, 31)]
    functions.append(PciFunction(0, 31, 0, bridge.id, 0x1B36, 0x0001, "PCI bridge", secondary_bus=1))
    topo = _topology(vm, [bridge], PciOccupancy(functions))
    place = topo.place(hotplug=True)
    assert (place.bus, place.slot, topo.number(place.bus)) == ("pci-bridge-1", 1, 1)


def test_hot_add_skips_a_bus_qemu_says_takes_no_hotplug_and_says_why():
    vm = VMSpec("vm1")
    topo = _topology(vm, [], PciOccupancy())
    topo.set_hotplug("pci.0", "ACPI PCI hotplug is off on pci.0")
    with pytest.raises(BusNotHotpluggable) as info:
        topo.place(hotplug=True)
    assert info.value.bus == "pci.0" and "ACPI" in info.value.reason


def test_an_unnumbered_bridge_is_not_used_for_hotplug():
    bridge = Controller.bridge(1, "pci.0", 31)
    view = PciOccupancy(
        [PciFunction(0, s, 0, f"d{s}") for s in range(4, 31)]
        + [PciFunction(0, 31, 0, bridge.id, 0x1B36, 0x0001, "PCI bridge", secondary_bus=0)]
    )
    topo = _topology(VMSpec("vm1"), [bridge], view)
    with pytest.raises(BusNotHotpluggable, match="firmware"):
        topo.place(hotplug=True)


def test_pc_hot_add_without_room_names_the_spare_bridge():
    topo = _topology(VMSpec("vm1"), [], PciOccupancy([PciFunction(0, s, 0, f"d{s}") for s in range(4, 32)]))
    with pytest.raises(SlotsExhausted, match="spare.bridge"):
        topo.place(hotplug=True)


# --- the capability checks -------------------------------------------------------------------


def test_capability_refusals_carry_their_facts():
    caps = QemuCapabilities((7, 2, 22), frozenset({"device_add", "device_del"}), "pc-i440fx-7.2")
    check_capabilities(caps, VMSpec("vm1", "pc"))
    with pytest.raises(QemuTooOld) as old:
        check_capabilities(QemuCapabilities((6, 2, 0), caps.commands, caps.machine), VMSpec("vm1"))
    assert old.value.version == (6, 2, 0) and old.value.minimum == (7, 2, 0)
    with pytest.raises(QemuCommandMissing) as missing:
        check_capabilities(QemuCapabilities(caps.version, frozenset({"device_add"}), caps.machine), VMSpec("vm1"))
    assert missing.value.command == "device_del"
    with pytest.raises(MachineMismatch) as other:
        check_capabilities(caps, VMSpec("vm1", "q35"))
    assert (other.value.vm, other.value.planned, other.value.running) == ("vm1", "q35", "pc-i440fx-7.2")


def test_unversioned_plans_match_any_version_of_their_family():
    assert same_machine("pc", "pc-i440fx-7.1") and same_machine("q35", "pc-q35-7.2")
    assert not same_machine("pc-q35-7.1", "pc-q35-7.2") and not same_machine("pc", "pc-q35-7.2")


def test_hmp_version_text_is_parsed_as_the_seed_did():
    # as Ganeti 2.10's hv_kvm reads HMP `info version`
    assert parse_info_version("7.2.22Debian 1:7.2+dfsg-7+deb12u18+b3\r\n") == (7, 2, 22)
    assert parse_info_version("QEMU 2.5.0") == (2, 5, 0)
    assert parse_info_version("no version here") is None


# --- the state machine, schema 3, export v2 ----------------------------------------------------------


def test_the_state_machine_refuses_transitions_it_does_not_declare(store):
    plan(store, VMSpec("vm1"), [rng(1)])
    with store.transaction() as txn:
        txn.set_state("vm1", uid(1), DeviceState.ATTACHED)
    with pytest.raises(InvalidTransition) as info, store.transaction() as txn:
        txn.set_state("vm1", uid(1), DeviceState.ATTACHING)
    assert (info.value.state, info.value.target, info.value.uuid) == ("attached", "attaching", uid(1))
    assert store.get_device("vm1", uid(1)).state is DeviceState.ATTACHED


def test_a_schema_2_state_file_is_upgraded_with_its_devices(tmp_path):
    state = tmp_path / "s"
    with Store(state) as s:
        plan(s, VMSpec("vm1"), [rng(1)])
    path = state / "kvmslots.sqlite3"
    conn = sqlite3.connect(path)  # make it look like 0.2.0 wrote it
    conn.executescript(  # schema 2 exactly as 0.2.0 created it
        """
        DROP TABLE controllers; DROP TABLE devices; DROP TABLE vms;
        CREATE TABLE vms (name TEXT PRIMARY KEY, machine TEXT NOT NULL, mask TEXT NOT NULL,
                          bus_masks TEXT NOT NULL DEFAULT '{}');
        CREATE TABLE devices (
            vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE, uuid TEXT NOT NULL, uuid8 TEXT NOT NULL,
            dev_type TEXT NOT NULL, driver TEXT NOT NULL, props TEXT NOT NULL, bus TEXT NOT NULL,
            slot INTEGER NOT NULL CHECK (slot BETWEEN 0 AND 31),
            state TEXT NOT NULL CHECK (state IN ('planned', 'attaching', 'attached', 'detaching')),
            unplug_requested INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (vm, uuid), UNIQUE (vm, bus, slot), UNIQUE (vm, uuid8, slot));
        INSERT INTO vms VALUES ('vm1', 'pc', '11110000000000000000000000000000', '{}');
        PRAGMA user_version = 2;
        """
    )
    conn.execute("INSERT INTO devices VALUES ('vm1', ?, ?, 'rng', 'virtio-rng-pci', '{}', 'pci.0', 4, 'planned', 0)",
                 (uid(1), uid(1)[:8]))
    conn.commit()
    conn.close()
    with Store(state) as s:
        [device] = s.devices("vm1")
        assert (device.slot, device.function, s.get_vm("vm1").hotplug_ports) == (4, 0, 4)
        assert plan(s, "vm1", [rng(1), DeviceGroup((rng(2), rng(3)))]).devices[1].multifunction


def test_export_v2_round_trips_ports_and_groups(tmp_path, store):
    plan(store, VMSpec("vm1", "q35", hotplug_ports=1), [rng(1), DeviceGroup((rng(2), rng(3)))])
    document = store.export_vm("vm1")
    assert document["version"] == 3 and len(document["controllers"]) == 3
    with Store(tmp_path / "other") as other:
        other.import_vm(json.dumps(document))
        assert other.devices("vm1") == store.devices("vm1")
        assert other.controllers("vm1") == store.controllers("vm1")


def test_an_import_whose_device_sits_behind_a_port_at_slot_1_is_refused(store):
    plan(store, VMSpec("vm1", "q35", hotplug_ports=1), [rng(1)])
    document = store.export_vm("vm1")
    document["devices"][0].update(slot=1, id=f"rng-{uid(1)[:8]}-pci-1")
    with pytest.raises(kvmslots.StateImportError, match="slot 0"):
        store.import_vm(document, replace=True)
    assert store.devices("vm1")[0].slot == 0


# --- the CLI -------------------------------------------------------------------------------------


def test_plan_json_lists_ports_and_devices(tmp_path, capsys):
    state = str(tmp_path / "s")
    code = main(["--state", state, "--json", "plan", "web1", "--machine", "q35", "--hotplug-ports", "1", "--qemu",
                 "/nonexistent/qemu", "--device", f"nic:{uid(1)}:virtio-net-pci",
                 "--device", f"rng:{uid(2)}:virtio-rng-pci", "--device", f"rng:{uid(3)}:virtio-rng-pci",
                 "--group", f"{uid(2)},{uid(3)}"])
    out, err = capsys.readouterr()
    assert code == 2 and "nonexistent" in err  # the binary to check --machine against must exist
    code = main(["--state", state, "--json", "plan", "web1", "--machine", "q35", "--hotplug-ports", "1",
                 "--device", f"nic:{uid(1)}:virtio-net-pci", "--device", f"rng:{uid(2)}:virtio-rng-pci",
                 "--device", f"rng:{uid(3)}:virtio-rng-pci", "--group", f"{uid(2)},{uid(3)}"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [(r["type"], r["uuid"], r["bus"], r["slot"], r["function"]) for r in rows] == [
        ("port", None, "pcie.0", 2, 0), ("port", None, "pcie.0", 2, 1), ("port", None, "pcie.0", 2, 2),
        ("nic", uid(1), "pcie-port-1", 0, 0), ("rng", uid(2), "pcie-port-2", 0, 0),
        ("rng", uid(3), "pcie-port-2", 0, 1),
    ]
    assert set(rows[0]) == {"id", "type", "uuid", "driver", "bus", "slot", "function", "arg"}


def test_plan_refuses_an_unknown_machine_with_exit_2(tmp_path, capsys):
    assert main(["--state", str(tmp_path / "s"), "plan", "vm1", "--machine", "microvm"]) == 2
    assert "not supported" in capsys.readouterr().err

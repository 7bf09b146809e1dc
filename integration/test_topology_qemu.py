"""Placement topology against real QEMU: root ports on q35, bridges on pc, multifunction slots,
and the capability probe's refusals, each checked where a user would notice it (the guest's
/sys/bus/pci, QEMU's query-pci, the store, the typed error and its attributes).

Guests boot under TCG, so the booted scenarios are combined into few VMs; refusals that need
no guest code run against QEMU started with -S (qtest mode).  QEMU facts relied on here were
measured on QEMU 7.2 (q35's default NIC takes 00:02.0, hence ``-nic none`` for planned ports;
an unnumbered bridge shows nothing behind it, hence booted guests for bridges).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
from devices import addr, pci_testdev, rng, run, uid

import kvmslots
from kvmslots import (
    BusNotHotpluggable,
    ControllerKind,
    DeviceGroup,
    DeviceSpec,
    DeviceState,
    MachineMismatch,
    Monitor,
    NoHotplugPort,
    QemuCommandMissing,
    QemuTooOld,
    SlotsExhausted,
    Store,
    UnsupportedMachine,
    VMSpec,
    capabilities,
    hot_add,
    hot_add_group,
    hot_del,
    plan_boot,
    reconcile,
)
from kvmslots.errors import QemuCommandError
from kvmslots.testvm import TestVM, qemu_binary

GUEST_WAIT = 30.0  # seconds the guest may take to notice a hot add or removal (never asserted on)
UNPLUG_WAIT = 30.0


def snapshot(store: Store, vm: str) -> tuple[list, list]:
    """Everything a refusal must leave untouched: the VM's device records and controllers."""
    return store.devices(vm), store.controllers(vm)


# --- q35: a root port per device, spare ports for hot add -------------------------------------


def test_q35_ports_cold_and_hot_until_no_port_is_left(tmp_path: Path) -> None:
    cold = [rng(1), rng(2)]
    with Store(tmp_path / "state") as store:
        plan = run(plan_boot(store, VMSpec("vm1", machine="q35", hotplug_ports=2), cold))
        ports = [c for c in plan.controllers if c.kind is ControllerKind.PCIE_ROOT_PORT]
        assert len(ports) == len(plan.controllers) == 4  # one per device + 2 spare
        assert {c.bus for c in ports} == {"pcie.0"}
        assert [(d.bus, d.slot, d.function) for d in plan.devices] == [(ports[0].id, 0, 0), (ports[1].id, 0, 0)]
        spare = {ports[2].id, ports[3].id}
        assert {c.id for c in store.controllers("vm1")} == {c.id for c in ports}

        with TestVM(tmp_path / "vm", machine="q35", extra_args=["-nic", "none", *plan.qemu_args]) as vm:

            async def boot_view():
                async with Monitor(vm.qmp_path) as mon:
                    view = await mon.query_pci()
                    report = await reconcile(store, mon, "vm1")
                    return {c.id: view.bus_number(c.id) for c in ports}, report

            numbers, report = run(boot_view())
            assert len(set(numbers.values())) == 4 and 0 not in numbers.values()
            seen = vm.guest_pci_devices()
            for device in plan.devices:  # each planned device at slot 0 behind its own port
                assert addr(numbers[device.bus], 0) in seen
            assert sorted(report.attached) == sorted(d.qemu_id for d in plan.devices)
            assert report.unknown == []  # built-ins are masked, the ports are ours
            for port in spare:
                assert not any(a.startswith(f"0000:{numbers[port]:02x}:") for a in seen)

            async def hot_round_trip():
                async with Monitor(vm.qmp_path) as mon:
                    first = await hot_add(store, mon, "vm1", rng(10))
                    assert first.bus in spare and first.slot == 0 and first.state is DeviceState.ATTACHED
                    assert store.get_device("vm1", first.uuid).bus == first.bus
                    vm.wait_guest_pci(lambda s: addr(numbers[first.bus], 0) in s, GUEST_WAIT)

                    removed = await hot_del(store, mon, "vm1", first.uuid, timeout=UNPLUG_WAIT)
                    assert removed.removed and [d.uuid for d in removed.devices] == [first.uuid]
                    assert first.uuid not in {d.uuid for d in store.devices("vm1")}
                    vm.wait_guest_pci(lambda s: addr(numbers[first.bus], 0) not in s, GUEST_WAIT)

                    again = await hot_add(store, mon, "vm1", rng(11))
                    assert again.bus == first.bus  # the freed port is taken again
                    vm.wait_guest_pci(lambda s: addr(numbers[again.bus], 0) in s, GUEST_WAIT)

                    # a multifunction group behind the last free port: the guest sees both functions
                    group = await hot_add_group(store, mon, "vm1", DeviceGroup((rng(20), pci_testdev(21))))
                    (other_port,) = spare - {again.bus}
                    assert [(d.bus, d.slot, d.function, d.multifunction) for d in group] == [
                        (other_port, 0, 0, True),
                        (other_port, 0, 1, False),
                    ]
                    bus = numbers[other_port]
                    vm.wait_guest_pci(lambda s: {addr(bus, 0, 0), addr(bus, 0, 1)} <= s, GUEST_WAIT)

                    # every port holds a device now: the third hot add has nowhere to go
                    before = snapshot(store, "vm1")
                    with pytest.raises(NoHotplugPort) as full:
                        await hot_add(store, mon, "vm1", rng(30))
                    assert isinstance(full.value, SlotsExhausted)
                    assert full.value.vm == "vm1" and full.value.ports == 4
                    assert "hotplug_ports" in full.value.hint
                    assert snapshot(store, "vm1") == before

                    # q35's pcie.0 itself takes no hotplug: an explicit slot without a bus means pcie.0
                    with pytest.raises(BusNotHotpluggable) as root:
                        await hot_add(store, mon, "vm1", DeviceSpec(uid(31), "rng", "virtio-rng-pci", slot=5))
                    assert root.value.bus == "pcie.0" and root.value.vm == "vm1"
                    assert "pcie-root-port" in root.value.reason
                    assert snapshot(store, "vm1") == before

                    # removing function 1 removes the whole slot, both records with it
                    gone = await hot_del(store, mon, "vm1", group[1].uuid, timeout=UNPLUG_WAIT)
                    assert gone.removed
                    assert [d.uuid for d in gone.devices] == [group[0].uuid, group[1].uuid]
                    assert not {group[0].uuid, group[1].uuid} & {d.uuid for d in store.devices("vm1")}
                    vm.wait_guest_pci(lambda s: not {addr(bus, 0, 0), addr(bus, 0, 1)} & s, GUEST_WAIT)
                    return again

            again = run(hot_round_trip())
            live = vm.guest_pci_devices()
            assert addr(numbers[again.bus], 0) in live
            for device in plan.devices:
                assert addr(numbers[device.bus], 0) in live
        assert sorted(d.uuid for d in store.devices("vm1")) == sorted([uid(1), uid(2), again.uuid])


# --- pc: a full pci.0 grows a bridge at boot; hot add goes behind it ---------------------------


def test_q35_native_pcie_hotplug_add_then_remove_at_once(tmp_path: Path) -> None:
    """With native PCIe hotplug QEMU refuses a device_del while the guest is still powering the slot
    on ("guest is busy"); hot_del right after hot_add must still end in a confirmed removal."""
    with Store(tmp_path / "state") as store:
        plan = run(plan_boot(store, VMSpec("vm1", machine="q35", hotplug_ports=1), []))
        native = ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
        with TestVM(tmp_path / "vm", machine="q35", extra_args=["-nic", "none", *native, *plan.qemu_args]) as vm:

            async def scenario():
                async with Monitor(vm.qmp_path) as mon:
                    device = await hot_add(store, mon, "vm1", rng(1))
                    result = await hot_del(store, mon, "vm1", device.uuid, timeout=UNPLUG_WAIT)
                    return device, result

            device, result = run(scenario())
            assert device.bus == plan.controllers[0].id
            assert result.removed and store.devices("vm1") == []


def test_pc_forty_devices_grow_a_bridge_and_hot_add_goes_behind_it(tmp_path: Path) -> None:
    specs = [pci_testdev(n) if n % 2 else rng(n) for n in range(1, 41)]
    with Store(tmp_path / "state") as store:
        plan = run(plan_boot(store, VMSpec("vm1"), specs))
        (bridge,) = plan.controllers
        assert (bridge.kind, bridge.bus, bridge.slot) == (ControllerKind.PCI_BRIDGE, "pci.0", 0x1F)
        on_root = [d for d in plan.devices if d.bus == "pci.0"]
        behind = [d for d in plan.devices if d.bus == bridge.id]
        assert [d.slot for d in on_root] == list(range(4, 31))  # 27 devices, the bridge has 31
        assert [d.slot for d in behind] == list(range(1, 14))  # the other 13

        with TestVM(tmp_path / "vm", extra_args=plan.qemu_args) as vm:

            async def number():
                async with Monitor(vm.qmp_path) as mon:
                    return (await mon.query_pci()).bus_number(bridge.id)

            bridge_bus = run(number())
            assert bridge_bus > 0
            seen = vm.guest_pci_devices()
            ours_on_root = {a for a in seen if a.startswith("0000:00:") and int(a[8:10], 16) >= 4}
            ours_behind = {a for a in seen if a.startswith(f"0000:{bridge_bus:02x}:")}
            assert ours_on_root == {addr(0, d.slot) for d in on_root} | {addr(0, 0x1F)}  # + the bridge itself
            assert ours_behind == {addr(bridge_bus, d.slot) for d in behind}
            assert len(ours_on_root - {addr(0, 0x1F)}) + len(ours_behind) == 40

            async def hot():
                async with Monitor(vm.qmp_path) as mon:
                    device = await hot_add(store, mon, "vm1", rng(100))
                    assert (device.bus, device.slot) == (bridge.id, 14)  # pci.0 is full
                    vm.wait_guest_pci(lambda s: addr(bridge_bus, 14) in s, GUEST_WAIT)
                    result = await hot_del(store, mon, "vm1", device.uuid, timeout=UNPLUG_WAIT)
                    assert result.removed
                    vm.wait_guest_pci(lambda s: addr(bridge_bus, 14) not in s, GUEST_WAIT)

            run(hot())
            assert len(store.devices("vm1")) == 40
            assert uid(100) not in {d.uuid for d in store.devices("vm1")}


# --- multifunction groups, cold and hot, on pc's root bus ------------------------------------


def test_pc_multifunction_groups_cold_and_hot_leave_together(tmp_path: Path) -> None:
    cold = DeviceGroup((rng(1), pci_testdev(2)))
    with Store(tmp_path / "state") as store:
        plan = run(plan_boot(store, VMSpec("vm1"), [cold, rng(3)]))
        assert [(d.uuid, d.bus, d.slot, d.function, d.multifunction) for d in plan.devices] == [
            (uid(1), "pci.0", 4, 0, True),
            (uid(2), "pci.0", 4, 1, False),
            (uid(3), "pci.0", 5, 0, False),
        ]
        with TestVM(tmp_path / "vm", extra_args=plan.qemu_args) as vm:
            seen = vm.guest_pci_devices()
            assert {addr(0, 4, 0), addr(0, 4, 1), addr(0, 5)} <= seen

            async def scenario():
                async with Monitor(vm.qmp_path) as mon:
                    group = await hot_add_group(store, mon, "vm1", DeviceGroup((pci_testdev(10), rng(11), rng(12))))
                    assert [(d.bus, d.slot, d.function) for d in group] == [("pci.0", 6, f) for f in range(3)]
                    both = {addr(0, 6, f) for f in range(3)}
                    vm.wait_guest_pci(lambda s: both <= s, GUEST_WAIT)

                    # removing a member removes its whole slot: hot group by function 2, cold by function 0
                    hot_gone = await hot_del(store, mon, "vm1", group[2].uuid, timeout=UNPLUG_WAIT)
                    cold_gone = await hot_del(store, mon, "vm1", uid(1), timeout=UNPLUG_WAIT)

                    # QEMU refuses function 0 after taking function 1: function 1 is removed again
                    # and the slot is free (the next group gets it)
                    bad = DeviceSpec(uid(20), "rng", "virtio-rng-pci", {"no-such-property": "1"})
                    with pytest.raises(kvmslots.DeviceAddFailed, match="no-such-property") as failed:
                        await hot_add_group(store, mon, "vm1", DeviceGroup((bad, rng(21))), undo_timeout=UNPLUG_WAIT)
                    assert "undone" in str(failed.value)
                    assert [d.uuid for d in store.devices("vm1")] == [uid(3)]
                    assert not {uid(20)[:8], uid(21)[:8]} & {f.qdev_id[4:12] for f in (await mon.pci()).functions}
                    again = await hot_add_group(store, mon, "vm1", DeviceGroup((rng(22), rng(23))))
                    assert {d.slot for d in again} == {4}  # the lowest free slot: the cold group's, freed above
                    await hot_del(store, mon, "vm1", uid(22), timeout=UNPLUG_WAIT)
                    return group, hot_gone, cold_gone, both

            group, hot_gone, cold_gone, both = run(scenario())
            assert hot_gone.removed and [d.uuid for d in hot_gone.devices] == [d.uuid for d in group]
            assert cold_gone.removed and [d.uuid for d in cold_gone.devices] == [uid(1), uid(2)]
            assert [d.uuid for d in store.devices("vm1")] == [uid(3)]
            seen = vm.wait_guest_pci(lambda s: not (both | {addr(0, 4, 0), addr(0, 4, 1)}) & s, GUEST_WAIT)
            assert addr(0, 5) in seen


# --- refusals of the capability probe --------------------------------------------------------


def test_acpi_hotplug_off_on_pci0_and_machine_mismatch_are_refused_before_reserving(tmp_path: Path) -> None:
    with Store(tmp_path / "state") as store:
        store.define_vm(VMSpec("vm1"))
        store.define_vm(VMSpec("planned-q35", machine="q35"))
        machines = capabilities.binary_machines(qemu_binary())
        running = machines["pc"]  # the resolved name, pc-i440fx-X.Y
        older = max(n for n in machines if n.startswith("pc-i440fx-") and n != running)  # another version
        store.define_vm(VMSpec("planned-old", machine=older))
        extra = ["-global", "PIIX4_PM.acpi-root-pci-hotplug=off"]
        with TestVM(tmp_path / "vm", mode="qtest", extra_args=extra) as vm:

            async def scenario():
                async with Monitor(vm.qmp_path) as mon:
                    with pytest.raises(BusNotHotpluggable) as off:
                        await hot_add(store, mon, "vm1", rng(1))
                    assert off.value.bus == "pci.0" and off.value.vm == "vm1"
                    assert "acpi-root-pci-hotplug=off" in off.value.reason
                    assert "every other bus" not in off.value.reason  # a pc without bridges has no other bus
                    with pytest.raises(BusNotHotpluggable) as asked:  # asking for a slot is refused the same way
                        await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "rng", "virtio-rng-pci", slot=9))
                    assert asked.value.bus == "pci.0"

                    with pytest.raises(MachineMismatch) as q35:
                        await hot_add(store, mon, "planned-q35", rng(3))
                    assert (q35.value.vm, q35.value.planned, q35.value.running) == ("planned-q35", "q35", running)
                    with pytest.raises(MachineMismatch) as versioned:  # a versioned plan takes only itself
                        await hot_add(store, mon, "planned-old", rng(4))
                    assert (versioned.value.planned, versioned.value.running) == (older, running)
                    with pytest.raises(MachineMismatch):
                        await hot_add_group(store, mon, "planned-q35", DeviceGroup((rng(5), rng(6))))

                    # nothing reached QEMU either
                    assert [f.qdev_id for f in (await mon.query_pci()).functions if f.qdev_id] == []

            run(scenario())
        for name in ("vm1", "planned-q35", "planned-old"):
            assert snapshot(store, name) == ([], [])


def test_a_bridge_without_any_hotplug_controller_is_refused(tmp_path: Path) -> None:
    # pci.0 reserved up to slot 30, the spare bridge takes 31: pci.0 is full, only the bridge is left.
    # QEMU is started with the bridge's SHPC off and ACPI bridge hotplug off: no handler serves its bus.
    with Store(tmp_path / "state") as store:
        plan = run(plan_boot(store, VMSpec("vm1", spare_bridge=True, reserve_slots=31), []))
        (bridge,) = plan.controllers
        assert (bridge.kind, bridge.slot) == (ControllerKind.PCI_BRIDGE, 0x1F)
        extra = [
            "-global", "pci-bridge.shpc=off",
            "-global", "PIIX4_PM.acpi-pci-hotplug-with-bridge-support=off",
            *plan.qemu_args,
        ]  # fmt: skip
        with TestVM(tmp_path / "vm", extra_args=extra) as vm:  # booted: the firmware numbers the bridge
            before = snapshot(store, "vm1")

            async def scenario():
                async with Monitor(vm.qmp_path) as mon:
                    bridge_bus = (await mon.query_pci()).bus_number(bridge.id)
                    assert bridge_bus > 0
                    with pytest.raises(BusNotHotpluggable) as chosen:
                        await hot_add(store, mon, "vm1", rng(1))
                    with pytest.raises(BusNotHotpluggable) as asked:
                        await hot_add(store, mon, "vm1", DeviceSpec(uid(2), "rng", "virtio-rng-pci", bus=bridge.id))
                    with pytest.raises(BusNotHotpluggable) as group:
                        await hot_add_group(store, mon, "vm1", DeviceGroup((rng(3), rng(4))))
                    return chosen.value, asked.value, group.value, bridge_bus

            chosen, asked, group, bridge_bus = run(scenario())
            for error in (chosen, asked, group):
                assert error.bus == bridge.id and error.vm == "vm1"
                assert "shpc=off" in error.reason
            assert "every other bus is full" in chosen.reason  # pci.0 was full, so the bridge was the only choice
            assert snapshot(store, "vm1") == before
            assert not any(a.startswith(f"0000:{bridge_bus:02x}:") for a in vm.guest_pci_devices())


def _version_from_binary() -> tuple[int, int, int]:
    out = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert match, out
    return (int(match[1]), int(match[2]), int(match[3]))


class NoQueryVersion:
    """A real monitor that answers query-version the way an HMP-era QEMU would (CommandNotFound),
    and gives no greeting version: fault injection only, everything else is the real QEMU's."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    async def execute(self, command, arguments=None):
        if command == "query-version":
            raise QemuCommandError(command, "The command query-version has not been found", "CommandNotFound")
        return await self._monitor.execute(command, arguments)


def test_qemu_too_old_or_without_device_add_is_refused_and_the_hmp_version_is_read(tmp_path: Path) -> None:
    # No real QEMU can be started "too old" or without device_add, and the fault proxy
    # (integration/qmpproxy.py) only drops or stalls messages, it cannot rewrite replies.  So the
    # capabilities probed from the real QEMU are altered (version, commands) and handed to hot_add
    # through the monitor's per-connection cache: the refusal path from there on is the real one.
    version = _version_from_binary()
    assert capabilities.parse_info_version("7.2.22Debian 1:7.2+dfsg-7\r\n") == (7, 2, 22)
    assert capabilities.parse_info_version("QEMU 2.5.0") == (2, 5, 0)  # the older form Ganeti 2.10's hv_kvm parsed
    assert capabilities.parse_info_version("no version here") is None
    with Store(tmp_path / "state") as store:
        store.define_vm(VMSpec("vm1"))
        with TestVM(tmp_path / "vm", mode="qtest") as vm:

            async def scenario():
                async with Monitor(vm.qmp_path) as mon:
                    real = await capabilities.probe(mon)
                    assert real.version == version
                    assert {"device_add", "device_del"} <= real.commands
                    assert real.machine == capabilities.binary_machines(qemu_binary())["pc"]
                    capabilities.check_capabilities(real, store.get_vm("vm1"))  # the real QEMU passes

                    # HMP-only version fallback, against the real QEMU's `info version`
                    hmp_only = NoQueryVersion(mon)
                    hmp_text = await mon.execute("human-monitor-command", {"command-line": "info version"})
                    assert capabilities.parse_info_version(hmp_text) == version
                    assert await capabilities._version(hmp_only) == version
                    assert (await capabilities.probe(hmp_only)).version == version

                    mon.capabilities = dataclasses.replace(real, version=(2, 5, 0))
                    with pytest.raises(QemuTooOld) as old:
                        await hot_add(store, mon, "vm1", rng(1))
                    assert old.value.version == (2, 5, 0)
                    assert old.value.minimum == capabilities.MIN_QEMU_VERSION

                    for missing in ("device_add", "device_del"):
                        mon.capabilities = dataclasses.replace(real, commands=real.commands - {missing})
                        with pytest.raises(QemuCommandMissing) as lacking:
                            await hot_add_group(store, mon, "vm1", DeviceGroup((rng(2), rng(3))))
                        assert lacking.value.command == missing

                    mon.capabilities = real  # and with the real facts the add goes through
                    device = await hot_add(store, mon, "vm1", rng(4))
                    assert (device.bus, device.slot) == ("pci.0", 4)
                    return device

            device = run(scenario())
        assert [d.uuid for d in store.devices("vm1")] == [device.uuid]


# --- machine types -------------------------------------------------------------------------------


def test_machine_types_of_the_binary_and_the_default_reservations_match_qemu(tmp_path: Path) -> None:
    binary = qemu_binary()
    assert capabilities.check_machine_available("pc-q35-7.2", binary) == "pc-q35-7.2"
    for alias in ("pc", "q35"):
        assert capabilities.check_machine_available(alias, binary) == alias
    with pytest.raises(UnsupportedMachine) as unknown:
        capabilities.check_machine_available("pc-q35-99.9", binary)
    assert unknown.value.machine == "pc-q35-99.9"
    assert "pc-q35-7.2" in unknown.value.known and "microvm" not in unknown.value.known
    with pytest.raises(UnsupportedMachine) as other:
        capabilities.check_machine_available("microvm", binary)  # QEMU has it, kvmslots does not place on it
    assert other.value.machine == "microvm"

    pc_builtins = {0, 1, 2, 3}  # host bridge, PIIX3/IDE/ACPI, VGA, the default NIC
    q35_builtins = {0, 1, 0x1F}  # host bridge, VGA, ICH9 (the default NIC is off: it would take slot 2)
    cases = [
        ("pc", [], pc_builtins),
        ("pc-i440fx-7.2", [], pc_builtins),
        ("q35", ["-nic", "none"], q35_builtins),
        ("pc-q35-7.2", ["-nic", "none"], q35_builtins),
    ]
    with Store(tmp_path / "state") as store:
        for index, (machine, extra, builtins) in enumerate(cases):
            spec = store.define_vm(VMSpec(f"bare{index}", machine=machine))
            reserved = {slot for slot, bit in enumerate(spec.mask) if bit == "1"}
            with TestVM(tmp_path / f"vm{index}", mode="qtest", machine=machine, extra_args=extra) as vm:

                async def look(name: str = spec.name):
                    async with Monitor(vm.qmp_path) as mon:
                        return await mon.query_pci(), await reconcile(store, mon, name)

                view, report = run(look())
            shown = {f.slot for f in view.functions if f.bus == 0}
            assert all(f.qdev_id == "" for f in view.functions)  # only built-ins
            # every built-in QEMU shows sits on a reserved slot, and the default mask reserves no more
            assert shown == reserved == builtins, (machine, sorted(shown), sorted(reserved))
            assert report.unknown == []


def test_a_port_numbered_after_a_refusal_is_used_on_the_same_connection(tmp_path: Path) -> None:
    """Before the firmware runs a port has bus number 0 and is refused; once numbered (here: the test
    plays the firmware through qtest) the same connection must not keep refusing it."""
    with Store(tmp_path / "state") as store:
        plan = run(plan_boot(store, VMSpec("vm1", machine="q35", hotplug_ports=1), []))
        port = plan.controllers[0]
        args = ["-nic", "none", *plan.qemu_args]
        with TestVM(tmp_path / "vm", mode="qtest", machine="q35", extra_args=args) as vm:

            async def scenario():
                async with Monitor(vm.qmp_path) as mon:
                    with pytest.raises(BusNotHotpluggable, match="firmware"):
                        await hot_add(store, mon, "vm1", rng(1))
                    assert store.devices("vm1") == []
                    # secondary bus 1 (config offset 0x18: primary 0, secondary 1, subordinate 1)
                    devfn = (port.slot << 3) | port.function
                    vm.qtest(f"outl 0xcf8 {0x80000000 | (devfn << 8) | 0x18:#x}")
                    vm.qtest("outl 0xcfc 0x00010100")
                    return await hot_add(store, mon, "vm1", rng(1))

            device = run(scenario())
            assert (device.bus, device.slot, device.state) == (port.id, 0, DeviceState.ATTACHED)


def test_the_synchronous_facade_plugs_groups_and_batches(tmp_path: Path) -> None:
    from kvmslots import SlotManager

    with SlotManager(tmp_path / "state") as manager, TestVM(tmp_path / "vm", mode="qtest") as vm:
        manager.define_vm(VMSpec("vm1"))
        group = manager.hot_add_group("vm1", DeviceGroup((rng(1), pci_testdev(2))), qmp=vm.qmp_path)
        batch = manager.hot_add_many("vm1", [rng(3), DeviceGroup((rng(4), rng(5)))], qmp=vm.qmp_path)

        async def live():
            async with Monitor(vm.qmp_path) as mon:
                return await mon.query_pci()

        view = run(live())
        placed = [(d.slot, d.function) for d in group + batch]
        assert placed == [(4, 0), (4, 1), (5, 0), (6, 0), (6, 1)]
        assert all((view.find(d.qemu_id).slot, view.find(d.qemu_id).function) == (d.slot, d.function)
                   for d in group + batch)

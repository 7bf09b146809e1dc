"""Properties of placement that must hold for any VM: nothing is held twice, nothing sits on a
reserved slot or behind a port at a slot other than 0, and a plan never moves what it placed before."""

from __future__ import annotations

import asyncio
import tempfile
import uuid as uuidlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmslots import DeviceGroup, DeviceSpec, Store, VMSpec
from kvmslots.errors import SlotsExhausted
from kvmslots.hotplug import plan_boot
from kvmslots.model import Controller
from kvmslots.pciview import PciFunction, PciOccupancy
from kvmslots.topology import Topology

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def uid(n: int) -> str:
    return str(uuidlib.UUID(int=(n << 96) | n))


def build_units(sizes: list[int]) -> list[DeviceSpec | DeviceGroup]:
    units: list[DeviceSpec | DeviceGroup] = []
    n = 0
    for size in sizes:
        specs = []
        for _ in range(size):
            n += 1
            specs.append(DeviceSpec(uid(n), "dev", "pci-testdev"))
        units.append(specs[0] if size == 1 else DeviceGroup(tuple(specs)))
    return units


vms = st.builds(
    lambda machine, reserve, ports, spare: VMSpec(
        "vm1", machine, reserve_slots=reserve if machine == "pc" else None, hotplug_ports=ports,
        spare_bridge=spare and machine == "pc",
    ),
    st.sampled_from(["pc", "q35"]),
    st.integers(0, 8),
    st.integers(0, 6),
    st.booleans(),
)
unit_sizes = st.lists(st.sampled_from([1, 1, 1, 1, 2, 3, 8]), max_size=45)


def check_plan(plan) -> None:
    held: set[tuple[str, int, int]] = set()
    vm = plan.vm
    topo = Topology(vm, plan.controllers)  # raises if a controller overlaps another or sits on a mask
    for controller in plan.controllers:
        assert (controller.bus, controller.slot, controller.function) not in held
        held.add((controller.bus, controller.slot, controller.function))
    assert len({c.chassis for c in plan.controllers}) == len(plan.controllers)
    for device in plan.devices:
        key = (device.bus, device.slot, device.function)
        assert key not in held, key
        held.add(key)
        bus = topo.bus(device.bus)
        assert not bus.slots.is_masked(device.slot), (device.bus, device.slot)
        if bus.is_port:
            assert device.slot == 0
        # a slot holds one device, or the functions of one group
        same_slot = [d for d in plan.devices if (d.bus, d.slot) == (device.bus, device.slot)]
        assert len(same_slot) == 1 or all(d.in_group for d in same_slot)
        assert not any((c.bus, c.slot) == (device.bus, device.slot) for c in plan.controllers)


@SETTINGS
@given(vms, unit_sizes, st.integers(0, 45))
def test_a_plan_holds_nothing_twice_and_a_replan_moves_nothing(vm, sizes, keep):
    units = build_units(sizes)
    with tempfile.TemporaryDirectory() as state, Store(state) as store:
        try:
            first = asyncio.run(plan_boot(store, vm, units[: min(keep, len(units))]))
        except SlotsExhausted:
            return  # a q35 VM with 232+ ports, or every pc slot reserved: refused, and typed
        check_plan(first)
        try:
            full = asyncio.run(plan_boot(store, "vm1", units))
        except SlotsExhausted:
            return
        check_plan(full)
        before = {d.uuid: (d.bus, d.slot, d.function) for d in first.devices}
        after = {d.uuid: (d.bus, d.slot, d.function) for d in full.devices}
        assert all(after[u] == place for u, place in before.items())  # nothing moved
        assert full.controllers[: len(first.controllers)] == first.controllers  # nothing renumbered
        again = asyncio.run(plan_boot(store, "vm1", units))
        assert again.qemu_args == full.qemu_args  # the same every time


live_slots = st.sets(st.integers(0, 31), max_size=32)


@SETTINGS
@given(st.sampled_from(["pc", "q35"]), live_slots, st.sets(st.integers(1, 8), max_size=8), st.integers(1, 12))
def test_hot_add_never_takes_what_qemu_shows(machine, root_taken, ports_taken, adds):
    vm = VMSpec("vm1", machine, hotplug_ports=8)
    if machine == "q35":
        controllers = [Controller.port(n, 2, n - 1) for n in range(1, 9)]
        functions = [PciFunction(0, 2, c.function, c.id, 0x1B36, 0x000C, "PCI bridge", secondary_bus=c.chassis)
                     for c in controllers]
        functions += [PciFunction(n, 0, 0, f"foreign{n}") for n in ports_taken]
    else:
        controllers = []
        functions = [PciFunction(0, s, 0, f"foreign{s}") for s in root_taken]
    topo = Topology(vm, controllers)
    topo.occupy_live(PciOccupancy(functions))
    taken = {(f.bus, f.slot) for f in functions}
    chosen: set[tuple[str, int]] = set()
    for _ in range(adds):
        try:
            place = topo.place(hotplug=True)
        except SlotsExhausted:
            break
        number = topo.number(place.bus)
        assert (number, place.slot) not in taken
        assert (place.bus, place.slot) not in chosen
        assert not topo.bus(place.bus).slots.is_masked(place.slot) or topo.bus(place.bus).is_port
        chosen.add((place.bus, place.slot))
    assert len(topo.controllers) == len(controllers)  # hot add never grows

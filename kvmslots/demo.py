"""``kvmslots demo``: the whole life cycle on a disposable VM, in about ten seconds.

It boots the tiny test guest (TCG) with three planned devices, hot-adds two,
draws the slot map before and after, hot-removes one with the guest's
confirmation, claims a passthrough device from a built-in example host
inventory and shows its planned ``vfio-pci`` argument, reconciles, shuts the
guest down.  Then the same on a ``q35`` machine: a device and a multifunction
pair, each behind its own ``pcie-root-port``, a hot add into a spare port, a
live migration of the running guest to a new QEMU on this host (as for a QEMU
upgrade) started from the records, and the removal on that new QEMU.  It says
what each step did and how long it took.

The state it creates stays in the state directory it reports (so that
``kvmslots --state DIR show demo`` works afterwards); the VM, its sockets and
its logs are removed, and no QEMU process outlives the demo.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import hotplug
from .errors import KvmSlotsError
from .model import DeviceGroup, DeviceSpec, VMSpec
from .monitor import Monitor
from .store import Store
from .testvm import TestVM, migrate_qemu

__all__ = ["run_demo", "main"]

T = TypeVar("T")
VM = "demo"
Q35_VM = "demo-q35"
# Built-in example host inventory: one SR-IOV NIC (a PF with 4 VFs) and one GPU-like device.
EXAMPLE_DEVICE_SPEC = [{"vendor_id": "8086", "physical_network": "physnet1"}, {"vendor_id": "10de"}]
EXAMPLE_ALIASES = [{"name": "gpu", "vendor_id": "10de", "product_id": "1eb8", "device_type": "type-PCI"}]


class _Steps:
    """Runs named steps, timing each, printing as it goes (or collecting JSON)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.records: list[dict[str, Any]] = []

    def run(self, name: str, work: Callable[[], T], describe: Callable[[T], str]) -> T:
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        text = describe(result)
        self.records.append({"step": name, "seconds": round(seconds, 4), "result": text})
        if not self.as_json:
            print(f"[{seconds * 1000:8.1f} ms] {name}: {text}", flush=True)
        return result

    def say(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)


def _ticker(stop: threading.Event, as_json: bool) -> None:
    """Dots on stderr while the guest boots (the boot itself must stay on the main thread:
    QEMU is tied to the thread that started it through PR_SET_PDEATHSIG)."""
    while not stop.wait(0.25):
        if not as_json:
            print(".", end="", file=sys.stderr, flush=True)
    if not as_json:
        print("", file=sys.stderr, flush=True)


def _new() -> str:
    return str(uuid.uuid4())


def run_demo(state_dir: str | None = None, *, as_json: bool = False) -> int:
    """Run the demo: 0 when every step worked, 1 (the failure on stderr) when a kvmslots error stopped it.

    The state goes to *state_dir*, or to a new temporary directory when it is None, and stays there.
    *as_json* prints one JSON object at the end (the state directory and every step with its time) instead of
    the running commentary.  Needs QEMU and the test guest (:mod:`kvmslots.testvm`).
    """
    from .passthrough import HostDevices, PassthroughSpec
    from .pci.devspec import Whitelist
    from .pci.fakehost import sriov_topology
    from .pci.request import get_pci_requests_from_flavor, parse_aliases
    from .pci.tracker import PciDevTracker

    state = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="kvmslots-demo-"))
    steps = _Steps(as_json)
    steps.say(f"kvmslots demo; state directory: {state}")
    try:
        with Store(state) as store:
            boot_devices = [
                DeviceSpec(_new(), "nic", "virtio-net-pci", {"mac": "52:54:00:12:34:56"}),
                DeviceSpec(_new(), "rng", "virtio-rng-pci"),
                DeviceSpec(_new(), "test", "pci-testdev"),
            ]
            plan = steps.run(
                "plan 3 boot devices",
                lambda: asyncio.run(hotplug.plan_boot(store, VMSpec(VM), boot_devices)),
                lambda p: " ".join(p.qemu_args),
            )

            def boot() -> TestVM:
                stop = threading.Event()
                ticker = threading.Thread(target=_ticker, args=(stop, as_json), daemon=True)
                ticker.start()
                try:
                    return TestVM(extra_args=plan.qemu_args).start()
                finally:
                    stop.set()
                    ticker.join()

            vm = steps.run("boot a disposable guest (TCG)", boot, lambda v: f"QEMU pid {v.pid}, guest shell up")
            try:
                steps.run("guest sees", vm.guest_pci_slots, lambda slots: f"slots {sorted(slots)}")

                def show() -> str:
                    return _slot_map(store, vm, VM, reconcile=True)

                steps.say(steps.run("slot map before", show, lambda _: "drawn below"))

                async def add_two() -> list[Any]:
                    async with Monitor(vm.qmp_path) as mon:
                        return [
                            await hotplug.hot_add(store, mon, VM, DeviceSpec(_new(), "rng", "virtio-rng-pci")),
                            await hotplug.hot_add(store, mon, VM, DeviceSpec(_new(), "nic", "e1000")),
                        ]

                added = steps.run("hot add 2 devices", lambda: asyncio.run(add_two()),
                                  lambda ds: ", ".join(f"{d.qemu_id} at slot {d.slot}" for d in ds))
                steps.run("guest sees them", lambda: vm.wait_guest_pci(
                    lambda seen: all(f"0000:00:{d.slot:02x}.0" in seen for d in added)),
                    lambda seen: f"{len(seen)} PCI functions")
                steps.say(steps.run("slot map after", show, lambda _: "drawn below"))

                async def remove_one() -> Any:
                    async with Monitor(vm.qmp_path) as mon:
                        return await hotplug.hot_del(store, mon, VM, added[0].uuid, timeout=30)

                steps.run("hot remove one", lambda: asyncio.run(remove_one()),
                          lambda r: f"{r.device.qemu_id} {r.status} (the guest ejected it: DEVICE_DELETED)")
                steps.run("guest no longer sees it", lambda: vm.wait_guest_pci(
                    lambda seen: f"0000:00:{added[0].slot:02x}.0" not in seen), lambda seen: "confirmed")

                def passthrough() -> str:
                    tracker = PciDevTracker(store, Whitelist.from_config(EXAMPLE_DEVICE_SPEC))
                    inventory = sriov_topology(pfs=1, vfs_per_pf=4, plain=0) + [
                        {"address": "0000:3b:00.0", "vendor_id": "10de", "product_id": "1eb8", "dev_type": "type-PCI",
                         "numa_node": 0, "iommu_group": 60, "dev_id": "pci_0000_3b_00_0", "label": "label_10de_1eb8"}]
                    tracker.update_devices_from_hypervisor_resources(inventory)
                    [request] = get_pci_requests_from_flavor(
                        {"extra_specs": {"pci_passthrough:alias": "gpu:1"}}, parse_aliases(EXAMPLE_ALIASES))
                    gpu_plan = asyncio.run(hotplug.plan_boot(
                        store, VMSpec("demo-gpu"), [PassthroughSpec(_new(), request)], host=HostDevices(tracker)))
                    return " ".join(gpu_plan.qemu_args)

                steps.run("claim a passthrough GPU from the example inventory (VM demo-gpu)", passthrough,
                          lambda args: args)

                async def settle() -> Any:
                    async with Monitor(vm.qmp_path) as mon:
                        return await hotplug.reconcile(store, mon, VM)

                steps.run("reconcile", lambda: asyncio.run(settle()),
                          lambda r: "records match QEMU" if not (r.changed or r.unknown or r.misplaced)
                          else str(r.to_json()))
            finally:
                steps.run("shut the guest down", lambda: vm.stop(), lambda _: "QEMU stopped, VM files removed")
            _q35_part(store, steps, as_json)
    except KvmSlotsError as exc:
        print(f"kvmslots demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"state_dir": str(state), "steps": steps.records}))
    else:
        steps.say(f"done. The state stays in {state}: try  kvmslots --state {state} show {VM}")
    return 0


def _slot_map(store: Store, vm: TestVM, name: str, *, reconcile: bool = False) -> str:
    """The slot map of the VM *name* (running as *vm*) with QEMU's live view; a reconcile first
    when asked (it settles what the records say of devices QEMU has since taken or dropped)."""
    from .cli import render_slot_map, slot_states

    async def view() -> Any:
        async with Monitor(vm.qmp_path) as mon:
            if reconcile:
                await hotplug.reconcile(store, mon, name)
            return await mon.pci()

    live = asyncio.run(view())
    spec, controllers, devices = store.get_vm(name), store.controllers(name), store.devices(name)
    return render_slot_map(spec, controllers, devices, slot_states(spec, controllers, devices, live), live=True)


def _q35_part(store: Store, steps: _Steps, as_json: bool) -> None:
    """The q35 machine: root ports planned per device plus spares, a hot add into a spare, its removal."""
    devices: list[DeviceSpec | DeviceGroup] = [
        DeviceSpec(_new(), "nic", "virtio-net-pci", {"mac": "52:54:00:12:34:57"}),
        DeviceGroup((DeviceSpec(_new(), "rng", "virtio-rng-pci"), DeviceSpec(_new(), "test", "pci-testdev"))),
    ]
    plan = steps.run(
        "q35: plan a device and a multifunction pair, 2 spare ports",
        lambda: asyncio.run(hotplug.plan_boot(store, VMSpec(Q35_VM, "q35", hotplug_ports=2), devices)),
        lambda p: " ".join(p.qemu_args),
    )
    vm = steps.run(
        "q35: boot (with -nic none: QEMU's default NIC would sit where the first ports go)",
        lambda: TestVM(machine="q35", extra_args=["-nic", "none", *plan.qemu_args]).start(),
        lambda v: f"QEMU pid {v.pid}, guest shell up",
    )
    try:
        steps.run("q35: guest sees", vm.guest_pci_devices,
                  lambda seen: ", ".join(sorted(a[5:] for a in seen if not a.startswith("0000:00:"))))

        async def add() -> Any:
            async with Monitor(vm.qmp_path) as mon:
                await hotplug.reconcile(store, mon, Q35_VM)  # the planned devices are running: attached
                device = await hotplug.hot_add(store, mon, Q35_VM, DeviceSpec(_new(), "rng", "virtio-rng-pci"))
                return device, (await mon.query_pci()).bus_number(device.bus)

        device, bus = steps.run("q35: hot add into a spare port", lambda: asyncio.run(add()),
                                lambda r: f"{r[0].qemu_id} behind {r[0].bus}, slot 0")
        steps.run("q35: guest sees it", lambda: vm.wait_guest_pci(lambda seen: f"0000:{bus:02x}:00.0" in seen),
                  lambda _: f"0000:{bus:02x}:00.0")

        steps.say(steps.run("q35: slot map", lambda: _slot_map(store, vm, Q35_VM), lambda _: "drawn below"))

        old = vm
        vm = steps.run("q35: live-migrate to a new QEMU on this host, started from the records",
                       lambda: _migrate_q35(store, old), lambda v: f"QEMU pid {v.pid} runs the guest now")
        steps.run("q35: the guest, now on the new QEMU, sees it",
                  lambda: vm.wait_guest_pci(lambda seen: f"0000:{bus:02x}:00.0" in seen),
                  lambda _: f"0000:{bus:02x}:00.0")

        async def remove() -> Any:
            async with Monitor(vm.qmp_path) as mon:
                return await hotplug.hot_del(store, mon, Q35_VM, device.uuid, timeout=30)

        steps.run("q35: hot remove it", lambda: asyncio.run(remove()),
                  lambda r: f"{r.device.qemu_id} {r.status}; {r.device.bus} is free again")
    finally:
        steps.run("q35: shut the guest down", lambda: vm.stop(), lambda _: "QEMU stopped, VM files removed")


def _migrate_q35(store: Store, source: TestVM) -> TestVM:
    """Live-migrate *source* to a new QEMU on the same store; the source stops, the target is returned."""

    async def move(target: TestVM) -> None:
        async with Monitor(source.qmp_path) as sm:
            doc = await hotplug.outgoing(store, sm, Q35_VM)
            plan = hotplug.plan_incoming(store, doc)  # the same store: the records are there already
            target.extra_args = ("-nic", "none", *plan.device_args)
            target.start()
            async with Monitor(target.qmp_path) as tm:
                status = (await migrate_qemu(sm, tm, target.migration_uri)).get("status")
                if status != "completed":
                    raise KvmSlotsError(f"the migration {status}")
                done = await hotplug.confirm_incoming(store, tm, doc)
                await hotplug.release_outgoing(store, sm, doc, done)

    target = TestVM(machine="q35", incoming="defer")
    try:
        asyncio.run(move(target))
        target.wait_for_shell(60)
    except BaseException:
        target.stop()
        raise
    source.stop()
    return target


def main() -> int:
    """``python3 -m kvmslots.demo``: the demo in a new temporary state directory; its exit status."""
    return run_demo()


if __name__ == "__main__":
    sys.exit(main())

"""Hotplug on a booted TCG guest: kvmslots against raw QMP on the same connection.

Raw rounds use qemu.qmp directly (no bookkeeping); kvmslots rounds use
``hot_add`` / ``hot_del`` (occupancy, persistence, verification).  Rounds
alternate so that drift in the guest affects both alike.

``pc``: into ``pci.0``.  ``q35``: behind the ``pcie-root-port`` spares of a
``plan_boot(hotplug_ports=...)`` plan (raw rounds use the last port, kvmslots
takes the first free one), with ACPI hotplug (q35's default on QEMU 7.2) and
with native PCIe hotplug (``ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off``);
there the time until the guest sees an added device and until QEMU confirms a
removal (``DEVICE_DELETED``, i.e. the guest has ejected it) is reported too.
Native unplug waits out Linux pciehp's 5 s attention-button window, so its
rounds are few.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from kvmslots import DeviceSpec, Monitor, Store, VMSpec, hot_add, hot_add_many, hot_del, plan_boot
from kvmslots.testvm import TestVM

from .common import emit, note

SLOT = 6  # raw rounds use this slot; kvmslots takes the first free one (4)
Q35_PORTS = 2  # spare root ports planned on q35: kvmslots takes the first free one, raw rounds the last
NATIVE_HOTPLUG = ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]


async def _raw_add(mon: Monitor, qdev_id: str, slot: int, bus: str = "pci.0") -> float:
    start = time.perf_counter()
    await mon._qmp.execute("device_add", {"driver": "pci-testdev", "id": qdev_id, "bus": bus, "addr": hex(slot)})
    return time.perf_counter() - start


async def _raw_del(mon: Monitor, qdev_id: str) -> float:
    """device_del, then wait for DEVICE_DELETED of exactly that id (listener first)."""
    start = time.perf_counter()
    with mon._qmp.listener("DEVICE_DELETED", lambda e: (e.get("data") or {}).get("device") == qdev_id) as events:
        await mon._qmp.execute("device_del", {"id": qdev_id})
        await asyncio.wait_for(events.get(), 30)
    return time.perf_counter() - start


async def _poll_del(mon: Monitor, qdev_id: str, interval: float = 1.0) -> float:
    """What Ganeti and Proxmox do: device_del, then look once a second until the device is gone."""
    start = time.perf_counter()
    await mon._qmp.execute("device_del", {"id": qdev_id})
    while True:
        await asyncio.sleep(interval)
        if (await mon.query_pci()).find(qdev_id) is None:
            return time.perf_counter() - start


async def _rounds(vm: TestVM, store: Store, rounds: int, batch_rounds: int, poll_rounds: int) -> None:
    raw_add, raw_del, our_add, our_del = [], [], [], []
    loop_16, batch_16 = [], []
    async with Monitor(vm.qmp_path) as mon:
        for n in range(rounds):
            raw_add.append(await _raw_add(mon, f"raw{n}", SLOT))
            raw_del.append(await _raw_del(mon, f"raw{n}"))
            spec = DeviceSpec(str(uuid.uuid4()), "test", "pci-testdev")
            start = time.perf_counter()
            device = await hot_add(store, mon, "bench", spec)
            our_add.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = await hot_del(store, mon, "bench", device.uuid, timeout=30)
            our_del.append(time.perf_counter() - start)
            assert result.removed
        emit("hotplug.add: hot_add vs raw device_add", our_add, raw_add, target="<= 1.3x", limit=1.3)
        emit("hotplug.del: hot_del vs raw device_del + DEVICE_DELETED", our_del, raw_del, target="<= 1.1x", limit=1.1)
        emit("hotplug.first_add: first hot_add on a connection (capability probe, bus hotplug, view) vs later ones",
             our_add[:1], our_add[1:])

        async def remove_all(devices: list) -> None:
            for d in devices:
                assert (await hot_del(store, mon, "bench", d.uuid, timeout=30)).removed

        for _ in range(batch_rounds):
            specs = [DeviceSpec(str(uuid.uuid4()), "test", "pci-testdev") for _ in range(16)]
            start = time.perf_counter()
            devices = [await hot_add(store, mon, "bench", s) for s in specs]
            loop_16.append(time.perf_counter() - start)
            await remove_all(devices)
            specs = [DeviceSpec(str(uuid.uuid4()), "test", "pci-testdev") for _ in range(16)]
            start = time.perf_counter()
            devices = await hot_add_many(store, mon, "bench", specs)
            batch_16.append(time.perf_counter() - start)
            await remove_all(devices)
        emit("hotplug.batch16: hot_add_many vs 16 x hot_add", batch_16, loop_16, target="<= 0.6x", limit=0.6)

        polled, evented = [], []
        for n in range(poll_rounds):
            await _raw_add(mon, f"poll{n}", SLOT)
            polled.append(await _poll_del(mon, f"poll{n}"))
            await _raw_add(mon, f"event{n}", SLOT)
            evented.append(await _raw_del(mon, f"event{n}"))
        emit("hotplug.confirm: DEVICE_DELETED event vs polling once a second (Ganeti/Proxmox)", evented, polled)


def _watch_guest(vm: TestVM, address: str) -> asyncio.Future:
    """Start a guest shell loop (polling every 2 ms) that ends once the guest has PCI function *address*.

    Started before the add, so the time measured is the loop's and the
    console's resolution, not a 50 ms ``ls`` round trip.
    """
    loop = f"while [ ! -e /sys/bus/pci/devices/{address} ]; do usleep 2000; done"
    return asyncio.ensure_future(asyncio.to_thread(vm.run, loop, 30, check=True))


async def _q35_rounds(
    vm: TestVM, store: Store, name: str, ports: list[str], rounds: int, guest_rounds: int, native: bool
) -> dict[str, list[float]]:
    """Alternating raw/kvmslots add+remove behind root ports, then guest-visibility rounds.

    With native PCIe hotplug QEMU refuses a device_del while the guest is still
    powering the slot on ("guest is busy (power indicator blinking)"), so there
    every add is followed by a wait until the guest sees the device (those
    waits are the guest-visibility samples) before it is removed.
    """
    raw_add, raw_del, our_add, our_del, seen = [], [], [], [], []
    async with Monitor(vm.qmp_path) as mon:
        raw_port = ports[-1]
        view = await mon.query_pci()
        numbers = {port: view.bus_number(port) for port in ports}

        async def settled(watch: asyncio.Future | None, start: float) -> None:
            if watch is not None:
                await watch
                seen.append(time.perf_counter() - start)

        for n in range(rounds):
            watch = _watch_guest(vm, f"0000:{numbers[raw_port]:02x}:00.0") if native else None
            if watch is not None:
                await asyncio.sleep(0.05)  # let the loop start
            start = time.perf_counter()
            raw_add.append(await _raw_add(mon, f"qraw{n}", 0, raw_port))
            await settled(watch, start)
            raw_del.append(await _raw_del(mon, f"qraw{n}"))
            spec = DeviceSpec(str(uuid.uuid4()), "test", "pci-testdev")
            # kvmslots takes the first free port (never the raw one: it is free again, but comes last)
            watch = _watch_guest(vm, f"0000:{numbers[ports[0]]:02x}:00.0") if native else None
            if watch is not None:
                await asyncio.sleep(0.05)
            start = time.perf_counter()
            device = await hot_add(store, mon, name, spec)
            our_add.append(time.perf_counter() - start)
            assert device.bus == ports[0], device
            await settled(watch, start)
            start = time.perf_counter()
            result = await hot_del(store, mon, name, device.uuid, timeout=30)
            our_del.append(time.perf_counter() - start)
            assert result.removed
        for n in range(guest_rounds):
            watch = _watch_guest(vm, f"0000:{numbers[raw_port]:02x}:00.0")
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            await _raw_add(mon, f"qseen{n}", 0, raw_port)
            await settled(watch, start)
            raw_del.append(await _raw_del(mon, f"qseen{n}"))
    return {"raw_add": raw_add, "raw_del": raw_del, "our_add": our_add, "our_del": our_del, "seen": seen}


def _q35(tmp: Path, store: Store, name: str, native: bool, rounds: int, guest_rounds: int) -> dict:
    plan = asyncio.run(plan_boot(store, VMSpec(name, machine="q35", hotplug_ports=Q35_PORTS), []))
    ports = [c.id for c in plan.controllers]
    extra = ["-nic", "none", *plan.qemu_args, *(NATIVE_HOTPLUG if native else [])]
    note(f"hotplug: booting a q35 TCG guest ({'native PCIe' if native else 'ACPI'} hotplug, ports {ports}) ...")
    with TestVM(tmp / name, machine="q35", extra_args=extra) as vm:
        return asyncio.run(_q35_rounds(vm, store, name, ports, rounds, guest_rounds, native))


def run(
    rounds: int = 50, batch_rounds: int = 8, poll_rounds: int = 5, q35_rounds: int = 30, native_rounds: int = 2
) -> None:
    note("hotplug: booting a TCG guest ...")
    with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp, Store(Path(tmp) / "state") as store:
        store.define_vm(VMSpec("bench"))
        with TestVM(Path(tmp) / "vm") as vm:
            asyncio.run(_rounds(vm, store, rounds, batch_rounds, poll_rounds))

        acpi = _q35(Path(tmp), store, "q35-acpi", False, q35_rounds, 5)
        emit("hotplug.q35.add: hot_add vs raw device_add (root port, ACPI)", acpi["our_add"], acpi["raw_add"],
             target="<= 1.3x", limit=1.3)
        emit("hotplug.q35.del: hot_del vs raw device_del + DEVICE_DELETED (root port, ACPI)", acpi["our_del"],
             acpi["raw_del"][:q35_rounds], target="<= 1.1x", limit=1.1)
        emit("hotplug.q35.first_add: first hot_add on a connection (probe, port hotplug, view) vs later ones",
             acpi["our_add"][:1], acpi["our_add"][1:])
        # native: every removal waits out pciehp's 5 s button window, so only a few rounds; the
        # guest-visibility samples are those rounds' adds (raw and kvmslots), removals their deletes
        # (hot_del's bookkeeping is milliseconds of 6 s).  No add ratio: two samples, one with the probe.
        native = _q35(Path(tmp), store, "q35-native", True, native_rounds, 0)
        emit("hotplug.q35native.del: hot_del vs raw device_del + DEVICE_DELETED (root port, native PCIe)",
             native["our_del"], native["raw_del"][:native_rounds], target="<= 1.1x", limit=1.1)
        emit("hotplug.q35.guest_sees_add: native PCIe vs ACPI hotplug (device_add to the guest's /sys)",
             native["seen"], acpi["seen"], unit="s")
        emit("hotplug.q35.unplug_confirmed: native PCIe vs ACPI hotplug (device_del to DEVICE_DELETED)",
             native["raw_del"] + native["our_del"], acpi["raw_del"], unit="s")

"""Hotplug on a booted TCG guest: kvmslots against raw QMP on the same connection.

Raw rounds use qemu.qmp directly (no bookkeeping); kvmslots rounds use
``hot_add`` / ``hot_del`` (occupancy, persistence, verification).  Rounds
alternate so that drift in the guest affects both alike.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from kvmslots import DeviceSpec, Monitor, Store, VMSpec, hot_add, hot_add_many, hot_del
from kvmslots.testvm import TestVM

from .common import emit, note

SLOT = 6  # raw rounds use this slot; kvmslots takes the first free one (4)


async def _raw_add(mon: Monitor, qdev_id: str, slot: int) -> float:
    start = time.perf_counter()
    await mon._qmp.execute("device_add", {"driver": "pci-testdev", "id": qdev_id, "bus": "pci.0", "addr": hex(slot)})
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
        emit("hotplug.add: hot_add vs raw device_add", our_add, raw_add, target="<= 1.5x", limit=1.5)
        emit("hotplug.del: hot_del vs raw device_del + DEVICE_DELETED", our_del, raw_del, target="<= 1.1x", limit=1.1)

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


def run(rounds: int = 50, batch_rounds: int = 8, poll_rounds: int = 5) -> None:
    note("hotplug: booting a TCG guest ...")
    with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp, Store(Path(tmp) / "state") as store:
        store.define_vm(VMSpec("bench"))
        with TestVM(Path(tmp) / "vm") as vm:
            asyncio.run(_rounds(vm, store, rounds, batch_rounds, poll_rounds))

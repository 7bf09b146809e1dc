"""Live migration of a booted TCG guest: what kvmslots adds to it, against the migration itself.

A guest gets devices hot-plugged, then migrates back and forth between two QEMUs (a new target
each round, started from ``plan_incoming``'s arguments with ``-incoming defer``) and two state
stores.  Per round: kvmslots' steps (``outgoing`` on the source, ``plan_incoming`` and
``confirm_incoming`` on the target, ``release_outgoing`` on the source) against QEMU's own
migration (``migrate-incoming`` + ``migrate`` until ``completed``, return-path on), measured in
the same run.  Starting the target QEMU is the manager's cost either way and is reported apart.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kvmslots import DeviceGroup, DeviceSpec, Monitor, Store, VMSpec, hot_add, hot_add_group, plan_boot, reconcile
from kvmslots.hotplug.migrate import confirm_incoming, outgoing, plan_incoming, release_outgoing
from kvmslots.testvm import TestVM, migrate_qemu

from .common import emit, note


def _uid(n: int) -> str:
    return str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000 | n))


async def _migrate(source: Monitor, target: Monitor, uri: str) -> float:
    start = time.perf_counter()
    status = (await migrate_qemu(source, target, uri)).get("status")
    if status != "completed":
        raise RuntimeError(f"migration {status}")
    return time.perf_counter() - start


async def _source_side(vm: TestVM, src: Store) -> dict[str, Any]:
    async with Monitor(vm.qmp_path) as mon:
        return await outgoing(src, mon, "bench")


async def _move(vm: TestVM, target: TestVM, src: Store, dst: Store, doc: dict[str, Any]) -> tuple[float, float, float]:
    """The migration itself, then confirm on the target and release on the source (each timed)."""
    async with Monitor(vm.qmp_path) as sm, Monitor(target.qmp_path) as tm:
        migration = await _migrate(sm, tm, target.migration_uri)
        start = time.perf_counter()
        done = await confirm_incoming(dst, tm, doc)
        confirmed = time.perf_counter()
        await release_outgoing(src, sm, doc, done)
        return migration, confirmed - start, time.perf_counter() - confirmed


def _rounds(tmp: Path, devices: int, rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {k: [] for k in ("ours", "migration", "outgoing", "plan", "confirm",
                                                        "release", "target_start")}  # fmt: skip
    stores = [Store(tmp / f"state-{devices}-a"), Store(tmp / f"state-{devices}-b")]
    plan = asyncio.run(plan_boot(stores[0], VMSpec("bench"), [DeviceSpec(_uid(1), "rng", "virtio-rng-pci")]))
    vm = TestVM(tmp / f"vm-{devices}-0", extra_args=plan.qemu_args).start()
    try:

        async def fill() -> None:
            async with Monitor(vm.qmp_path) as mon:
                await reconcile(stores[0], mon, "bench")
                await hot_add_group(stores[0], mon, "bench", DeviceGroup(
                    (DeviceSpec(_uid(2), "rng", "virtio-rng-pci"), DeviceSpec(_uid(3), "test", "pci-testdev"))))
                for n in range(4, devices + 1):
                    await hot_add(stores[0], mon, "bench", DeviceSpec(_uid(n), "test", "pci-testdev"))

        asyncio.run(fill())
        for index in range(rounds):
            src, dst = stores[index % 2], stores[(index + 1) % 2]

            t0 = time.perf_counter()
            doc = asyncio.run(_source_side(vm, src))
            t1 = time.perf_counter()
            incoming = plan_incoming(dst, doc)
            t2 = time.perf_counter()
            target = TestVM(tmp / f"vm-{devices}-{index + 1}", extra_args=incoming.device_args, incoming="defer")
            target.start()
            samples["target_start"].append(time.perf_counter() - t2)
            migration, confirm, release = asyncio.run(_move(vm, target, src, dst, doc))
            vm.stop()
            vm = target
            samples["outgoing"].append(t1 - t0)
            samples["plan"].append(t2 - t1)
            samples["confirm"].append(confirm)
            samples["release"].append(release)
            samples["migration"].append(migration)
            samples["ours"].append((t2 - t0) + confirm + release)
        vm.wait_for_shell(60)  # the guest survived every round
    finally:
        vm.stop()
        for store in stores:
            store.close()
    return samples


def run(rounds: int = 6) -> None:
    with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp:
        for devices in (4, 24):
            note(f"migration: a TCG guest with {devices} hot-plugged devices, {rounds} migrations ...")
            s = _rounds(Path(tmp), devices, rounds)
            emit(f"migration.{devices}: kvmslots' steps (outgoing+plan+confirm+release) vs the migration itself",
                 s["ours"], s["migration"], target="<= 0.1x", limit=0.1)
            for step in ("outgoing", "plan", "confirm", "release"):
                emit(f"migration.{devices}.{step}", s[step], None)
            emit(f"migration.{devices}: starting the target QEMU (the manager's, not ours) vs the migration",
                 s["target_start"], s["migration"])

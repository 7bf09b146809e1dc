"""The host PCI tracker at 256, 1024, 4096 and 8192 VFs.

Each operation's baseline is the same operation at the previous size, so
``ratio`` is the growth factor and ``linear`` what strictly linear growth
would give; ``ratio <= linear`` means the cost grows at most linearly.
"""

from __future__ import annotations

import tempfile
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from kvmslots import Store
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.fakehost import sriov_topology
from kvmslots.pci.request import InstancePciRequest
from kvmslots.pci.tracker import PciDevTracker

from .common import emit, note, timed

SIZES = (256, 1024, 4096, 8192)
VFS_PER_PF = 64


def _topology(vfs: int) -> list[dict[str, Any]]:
    return sriov_topology(pfs=vfs // VFS_PER_PF, vfs_per_pf=VFS_PER_PF, plain=0)


def _churned(devices: list[dict[str, Any]], round_: int) -> list[dict[str, Any]]:
    """1% of the VFs gone and 1% new (renumbered functions past the existing ones)."""
    vfs = [d for d in devices if d["dev_type"] == "type-VF"]
    step = max(1, len(vfs) // 100)
    gone = {d["address"] for d in vfs[round_ % 2 :: 100][:step]}
    kept = [d for d in devices if d["address"] not in gone]
    new = []
    for i, d in enumerate(vfs[:step]):
        bus = int(d["address"][5:7], 16)
        new.append(dict(d, address=f"0000:{bus:02x}:1f.{i % 8}" if i < 8 else f"0000:{bus + 1:02x}:1e.{i % 8}",
                        dev_id=None, devname=None))
    unique = {d["address"]: d for d in kept + new}
    return list(unique.values())


def _vf_request() -> InstancePciRequest:
    return InstancePciRequest(count=1, spec=[{"vendor_id": "8086", "product_id": "1520", "dev_type": "type-VF"}],
                              alias_name="vf", request_id=str(uuid.uuid4()))


def run(instances: int = 200) -> None:
    previous: dict[str, list[float]] = {}
    previous_size = 0
    whitelist = Whitelist.from_config([{"vendor_id": "8086"}])
    for size in SIZES:
        note(f"tracker: {size} VFs ...")
        devices = _topology(size)
        current: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp:
            current["initial sync"] = []
            for rep in range(3):
                tracker = PciDevTracker(Store(Path(tmp) / f"s{rep}"), whitelist)
                sync = tracker.update_devices_from_hypervisor_resources
                current["initial sync"].append(timed(partial(sync, devices)))
            current["steady sync"] = [timed(partial(sync, devices)) for _ in range(15)]
            churn = [_churned(devices, r) for r in range(2)]
            current["1% gone + 1% new sync"] = []
            for r in range(10):
                current["1% gone + 1% new sync"].append(timed(partial(sync, churn[r % 2])))
            tracker.update_devices_from_hypervisor_resources(devices)
            current["claim+allocate"] = []
            for n in range(instances):
                vm = f"vm-{n}"
                current["claim+allocate"].append(
                    timed(lambda vm=vm, t=tracker: (t.claim_instance(vm, [_vf_request()]), t.allocate_instance(vm)))
                )
            current["free"] = [timed(partial(tracker.free_instance, f"vm-{n}")) for n in range(instances)]
            current["pool listing"] = [timed(lambda t=tracker: list(t.pci_stats)) for _ in range(30)]
        for op, samples in current.items():
            targets: dict[str, Any] = {}
            if size == 4096 and op == "steady sync":
                targets = {"target": "< 20 ms", "limit": 20.0}
            if size == 4096 and op == "claim+allocate":
                targets = {"target": "< 200 us", "limit": 200.0}
            unit = "us" if op in ("claim+allocate", "free", "pool listing") else "ms"
            emit(f"tracker.{op} @ {size} VFs", samples, previous.get(op), unit=unit,
                 linear=round(size / previous_size, 2) if op in previous else None, **targets)
        previous, previous_size = current, size

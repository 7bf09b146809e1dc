"""The host PCI tracker at 256, 1024, 4096 and 8192 VFs, each figure against its floor in the same run.

The floors (what an operation cannot cost less than, measured in the same run, interleaved with it):

* a sync must at least read every field of every record it is given, and
  tell records apart exactly: for a list of dicts, building and hashing a
  tuple of each record's keys and values (``hash((*record, *record.values()))``);
  for the JSON text Nova passes, ``json.loads`` of the same text plus that.
  A steady sync (the same list again) is printed per device against that
  floor; goal: at most 3 µs per device.  (A sync of the very same text is
  recognised whole, so it comes out far below its floor.)
* a 1% churn sync (1% of the VFs gone, 1% new) is printed against a steady
  sync of the same list taken right after it, in turn; goal: at most 1.5×.
* a claim, an allocation or a free must at least commit once: a bare
  ``BEGIN IMMEDIATE; INSERT; COMMIT`` on a SQLite file in WAL mode with
  ``synchronous=NORMAL``, one connection kept open (as kvmslots' store), in
  blocks of 20 between blocks of 20 operations.  Goals: claim+allocate (two
  operations, two commits) at most 6 bare commits, free at most 3.
* a pool listing is printed per pool against the same per-pool figure at
  the previous size (the pools are one per PF here, so they grow with the
  devices: the cost per pool should not), and once more at a fixed number
  of pools with 16× more devices (it should cost the same).
* a restart (open the store of 1000 VMs × 8 devices and 4096 host VFs,
  construct the tracker, list the VMs, as ``bench/state.py`` does) is
  printed against the same on an empty state (goal: at most 10×); the first
  operation after it, which loads the host, separately.

``vs_previous`` is the growth factor from the previous size and ``linear``
what strictly linear growth would give.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from kvmslots import DeviceSpec, Store, VMSpec, plan_boot
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.fakehost import sriov_topology
from kvmslots.pci.request import InstancePciRequest
from kvmslots.pci.tracker import PciDevTracker

from .common import SQLiteCommitFloor, emit, note, timed

SIZES = (256, 1024, 4096, 8192)
VFS_PER_PF = 64
WHITELIST = [{"vendor_id": "8086"}]


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


def _plain_host(devices: int) -> list[dict[str, Any]]:
    """*devices* ordinary functions in 8 pools (4 product ids x 2 NUMA nodes)."""
    return [
        {"address": f"0000:{n // 256 + 1:02x}:{(n % 256) >> 3:02x}.{n & 7}", "vendor_id": "8086",
         "product_id": f"0a{n % 4:02x}", "dev_type": "type-PCI", "numa_node": (n // 4) % 2, "iommu_group": n + 1}
        for n in range(devices)
    ]


def _vf_request() -> InstancePciRequest:
    return InstancePciRequest(count=1, spec=[{"vendor_id": "8086", "product_id": "1520", "dev_type": "type-VF"}],
                              alias_name="vf", request_id=str(uuid.uuid4()))


# -- floors -----------------------------------------------------------------------------------
def _hash_records(records: list[dict[str, Any]]) -> None:
    """The least a sync of a list of dicts does: read every field of every record, and hash them."""
    for record in records:
        hash((*record, *record.values()))


def _hash_text(text: str) -> None:
    """The least a sync of JSON text does: parse it, then read every field of every record."""
    _hash_records(json.loads(text))


def _interleaved(pairs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Samples of each callable, taken in turn (so a drift of the machine hits all of them alike)."""
    samples: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(rounds):
        for name, work in pairs.items():
            samples[name].append(timed(work))
    return samples


def _per(samples: list[float], n: int) -> list[float]:
    return [s / n for s in samples]


def _growth(current: list[float], previous: list[float] | None) -> float | None:
    return None if previous is None else round(statistics.median(current) / statistics.median(previous), 3)


def run() -> None:
    sizes()
    restart()


def sizes(instances: int = 200) -> None:
    previous: dict[str, list[float]] = {}
    previous_size = 0
    whitelist = Whitelist.from_config(WHITELIST)
    for size in SIZES:
        note(f"tracker: {size} VFs ...")
        current = _measure(size, whitelist, instances)
        _report(size, current, previous, previous_size)
        previous, previous_size = current, size
    _fixed_pools(whitelist)


def _measure(size: int, whitelist: Whitelist, instances: int) -> dict[str, list[float]]:
    """Every operation at one size: samples by name (floors and counts included)."""
    devices = _topology(size)
    text = json.dumps(devices)
    current: dict[str, list[float]] = {"devices": [len(devices)]}
    with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp:
        current["initial sync"] = []
        for rep in range(3):
            store, tracker, seconds = _initial(Path(tmp) / f"s{rep}", whitelist, devices)
            current["initial sync"].append(seconds)
            if rep < 2:
                store.close()
        sync = tracker.update_devices_from_hypervisor_resources
        steady = _interleaved(
            {"list": lambda: sync(devices), "list floor": lambda: _hash_records(devices),
             "text": lambda: sync(text), "text floor": lambda: _hash_text(text)},
            15,
        )
        current.update({f"steady {k}": v for k, v in steady.items()})
        current["steady sync"] = steady["list"]
        # each churned list twice in a row: first 1% gone + 1% new, then the same list again (steady)
        churn = [_churned(devices, r) for r in range(2)]
        current["1% gone + 1% new sync"], current["steady after churn"] = [], []
        for r in range(20):
            current["1% gone + 1% new sync"].append(timed(lambda r=r: sync(churn[r % 2])))
            current["steady after churn"].append(timed(lambda r=r: sync(churn[r % 2])))
        sync(devices)

        # in blocks of 20, each after 20 bare commits (a drift of the machine hits both alike)
        commits = SQLiteCommitFloor(Path(tmp) / "floor.sqlite3")
        names = [f"vm-{i}" for i in range(instances)]
        requests = [[_vf_request()] for _ in names]  # made by the API, not by the host: untimed
        current["floor"], current["claim+allocate"], current["free"] = [], [], []
        for start in range(0, instances, 20):
            current["floor"] += commits.sample(20)
            current["claim+allocate"] += [
                timed(lambda vm=vm, r=r: (tracker.claim_instance(vm, r), tracker.allocate_instance(vm)))
                for vm, r in zip(names[start:start + 20], requests[start:start + 20])
            ]
        for start in range(0, instances, 20):
            current["floor"] += commits.sample(20)
            current["free"] += [timed(lambda vm=vm: tracker.free_instance(vm)) for vm in names[start:start + 20]]
        commits.close()
        current["pools"] = [len(tracker.pci_stats.pools)]
        current["pool listing"] = [timed(lambda: list(tracker.pci_stats)) for _ in range(50)]
        store.close()
    return current


def _initial(path: Path, whitelist: Whitelist, devices: list[dict[str, Any]]) -> tuple[Store, PciDevTracker, float]:
    """A new state, its tracker, and how long the first sync of *devices* took."""
    store = Store(path)
    tracker = PciDevTracker(store, whitelist)
    return store, tracker, timed(lambda: tracker.update_devices_from_hypervisor_resources(devices))


def _report(size: int, current: dict[str, list[float]], previous: dict[str, list[float]], previous_size: int) -> None:
    n, pools = int(current["devices"][0]), int(current["pools"][0])

    def line(op: str, samples: list[float], baseline: Any, unit: str, limit: float | None = None,
             target: str | None = None, growth_of: str | None = None, **extra: Any) -> None:
        key = growth_of or op
        growth = _growth(current[key], previous.get(key))
        emit(f"tracker.{op} @ {size} VFs", samples, baseline, unit=unit,
             **({"target": target, "limit": limit} if size == 4096 and target else {}),
             vs_previous=growth, linear=round(size / previous_size, 2) if growth is not None else None, **extra)

    line("initial sync", current["initial sync"], None, "ms", growth_of="initial sync")
    line("steady sync per device (list of dicts) vs hashing each record", _per(current["steady list"], n),
         _per(current["steady list floor"], n), "us", 3.0, "<= 3 us per device", growth_of="steady sync",
         devices=n, total_ms=round(statistics.median(current["steady list"]) * 1e3, 3))
    line("steady sync per device (JSON text) vs json.loads + hashing", _per(current["steady text"], n),
         _per(current["steady text floor"], n), "us", growth_of="steady text",
         total_ms=round(statistics.median(current["steady text"]) * 1e3, 3))
    line("1% gone + 1% new sync vs steady sync (the same list again, in turn)", current["1% gone + 1% new sync"],
         current["steady after churn"], "ms", 1.5, "<= 1.5x", growth_of="1% gone + 1% new sync")
    line("claim+allocate vs a bare SQLite commit", current["claim+allocate"], current["floor"], "us", 6.0, "<= 6x",
         growth_of="claim+allocate")
    line("free vs a bare SQLite commit", current["free"], current["floor"], "us", 3.0, "<= 3x", growth_of="free")
    line("pool listing per pool vs the previous size's", _per(current["pool listing"], pools),
         _per(previous["pool listing"], int(previous["pools"][0])) if previous else None, "us",
         growth_of="pool listing", pools=pools, total_us=round(statistics.median(current["pool listing"]) * 1e6, 2))


def _fixed_pools(whitelist: Whitelist) -> None:
    """Pool listing with 8 pools: 256 devices against 4096 (it should cost the same)."""
    listed: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp:
        for size in (256, 4096):
            tracker = PciDevTracker(Store(Path(tmp) / f"p{size}"), whitelist)
            tracker.update_devices_from_hypervisor_resources(_plain_host(size))
            assert len(tracker.pci_stats.pools) == 8
            listed[size] = [timed(lambda t=tracker: list(t.pci_stats)) for _ in range(50)]
    emit("tracker.pool listing, 8 pools: 4096 devices vs 256", listed[4096], listed[256], unit="us",
         target="<= 1.5x", limit=1.5)


def restart(vms: int = 1000, devices_per_vm: int = 8) -> None:
    """Open a state with *vms* VMs and 4096 host VFs and construct the tracker, against an empty state."""
    whitelist = Whitelist.from_config(WHITELIST)
    with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp:
        full_dir, empty_dir = Path(tmp) / "full", Path(tmp) / "empty"
        note(f"tracker: a state of {vms} VMs x {devices_per_vm} devices and 4096 host VFs ...")
        with Store(full_dir) as store:
            for n in range(vms):
                specs = [DeviceSpec(str(uuid.uuid4()), "dev", "virtio-net-pci") for _ in range(devices_per_vm)]
                asyncio.run(plan_boot(store, VMSpec(f"vm{n:04d}"), specs))
            tracker = PciDevTracker(store, whitelist)
            tracker.update_devices_from_hypervisor_resources(_topology(4096))
            for i in range(100):  # some devices in use, some requests stored
                tracker.claim_instance(f"vm{i:04d}", [_vf_request()])
        with Store(empty_dir):
            pass

        def reopen(path: Path) -> None:  # as bench/state.py's restart: the store, the tracker, the VM list
            with Store(path) as store:
                PciDevTracker(store, whitelist)
                store.vms()

        def first_use(path: Path) -> None:
            with Store(path) as store:
                list(PciDevTracker(store, whitelist).pci_stats)

        samples = _interleaved(
            {"full": lambda: reopen(full_dir), "empty": lambda: reopen(empty_dir),
             "full+use": lambda: first_use(full_dir), "empty+use": lambda: first_use(empty_dir)},
            15,
        )
    emit(f"tracker.restart: open {vms} VMs + 4096 host devices, construct the tracker, list the VMs vs an empty state",
         samples["full"], samples["empty"], unit="ms", target="<= 10x", limit=10.0)
    emit("tracker.restart then a first pool listing (loads the host) vs the same on an empty state",
         samples["full+use"], samples["empty+use"], unit="ms")

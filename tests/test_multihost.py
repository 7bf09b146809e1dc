"""Many hosts, one PostgreSQL database: the "4-process test" of the host PCI tracker.

Four OS processes act as four hosts (``host0`` .. ``host3``) on one
database, at the same time (a barrier makes them start together): each
syncs its own device list, then claims, allocates and frees devices for
many instances and re-syncs with a small churn (devices that come and go,
a label that changes).  Every host reports the *same* PCI addresses: only
the host name keeps them apart.  Two more processes act as ``host1`` too
(the same ``node_id``), claiming concurrently with host1's own process, so
three writers contend for one host row.

Every worker writes what its calls returned to a JSON file; at the end the
database is read back through the public API (a fresh tracker per host,
``all_devs``, :func:`kvmslots.cluster.cluster_pools`) and must agree with
those records: no device lost, none held twice, each instance holding
exactly what its claim returned, every host's free count what its devices
and holders leave.  Per-process wall times are printed (nothing is asserted
about timing).

The same-host contention test also runs on SQLite (``state_location``), and
a last test checks that a tracker never sees or touches another host's rows.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import random
import time
import traceback
from pathlib import Path
from typing import Any

from pcihost import PF_PRODUCT, VF_PRODUCT, host, pf_addr, vf_addr

from kvmslots import Store
from kvmslots.cluster import cluster_pools
from kvmslots.errors import PciDeviceRequestFailed
from kvmslots.pci.device import ASSIGNED, PciStatus
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.request import InstancePciRequest
from kvmslots.pci.tracker import PciDevTracker

HOSTS = [f"host{n}" for n in range(4)]
TWIN_HOST = "host1"  # the host that two extra processes also act as
TWINS = 2
GPU_VENDOR, GPU_PRODUCT = "10de", "2236"
N_PF, N_VF, N_GPU = 2, 32, 8
DEVICE_SPEC = [
    {"vendor_id": "8086", "physical_network": "physnet1"},
    {"vendor_id": GPU_VENDOR, "product_id": GPU_PRODUCT},
]
#: Taken out of the list by every other re-sync (and put back by the next).
CHURNED = {vf_addr(1, N_VF - 2), vf_addr(1, N_VF - 1), f"0000:{0x40 + N_GPU - 1:02x}:00.0"}
MAIN_ITERATIONS, TWIN_ITERATIONS, SYNC_EVERY = 160, 120, 10
JOIN_TIMEOUT = 120


def gpu_addr(n: int) -> str:
    return f"0000:{0x40 + n:02x}:00.0"


def device_list(variant: int) -> list[dict[str, Any]]:
    """A host's devices: 2 PFs x 32 VFs (physnet1) + 8 GPUs on NUMA 0/1.

    Variant 1 lacks the :data:`CHURNED` devices and gives GPU 0 another label.
    """
    devices = host(pfs=N_PF, vfs=N_VF, plain=0)
    for n in range(N_GPU):
        devices.append({"address": gpu_addr(n), "vendor_id": GPU_VENDOR, "product_id": GPU_PRODUCT,
                        "dev_type": "type-PCI", "numa_node": n % 2,
                        "label": f"gpu-{'b' if variant and n == 0 else 'a'}"})
    if variant:
        devices = [d for d in devices if d["address"] not in CHURNED]
    return devices


def req(kind: str, count: int = 1, policy: str = "legacy") -> InstancePciRequest:
    spec = {
        "vf": {"vendor_id": "8086", "product_id": VF_PRODUCT, "dev_type": "type-VF", "physical_network": "physnet1"},
        "pf": {"vendor_id": "8086", "product_id": PF_PRODUCT, "dev_type": "type-PF"},
        "gpu": {"vendor_id": GPU_VENDOR, "product_id": GPU_PRODUCT},
    }[kind]
    return InstancePciRequest(count=count, spec=[spec], alias_name=kind, numa_policy=policy, source="flavor")


def random_requests(rng: random.Random) -> list[InstancePciRequest]:
    roll = rng.random()
    if roll < 0.08:
        return [req("pf")]
    if roll < 0.45:
        return [req("vf", rng.randint(1, 2))]
    if roll < 0.75:
        return [req("gpu")]
    return [req("vf"), req("gpu")]


def open_tracker(location: str, node: str) -> PciDevTracker:
    return PciDevTracker(Store(location), Whitelist.from_config(DEVICE_SPEC), node_id=node)


def _owned(tracker: PciDevTracker, instance: str) -> list[str]:
    return sorted(d.address for d in tracker.get_instance_pci_devs(instance, "all"))


# --------------------------------------------------------------------------- the worker processes


def _worker(location: str, node: str, name: str, syncs: bool, iterations: int, seed: int,
            barrier: Any, out: str) -> None:
    """One process acting as *node*: (sync), then claim/allocate/free (and re-sync); results to *out*."""
    record: dict[str, Any] = {"node": node, "worker": name, "live": {}, "freed": 0, "failed_claims": 0,
                              "syncs": 0, "last_reported": None, "error": None}
    rng = random.Random(seed)
    try:
        tracker = open_tracker(location, node)
        barrier.wait(60)  # every process connected: the first syncs overlap
        started = time.monotonic()
        if syncs:
            tracker.update_devices_from_hypervisor_resources(device_list(0))
            record["last_reported"], record["syncs"] = device_list(0), 1
        barrier.wait(60)  # every host synced: the claims overlap
        live: dict[str, dict[str, Any]] = record["live"]
        for i in range(iterations):
            instance = f"{name}-vm{i}"
            requests = random_requests(rng)
            try:
                claimed = tracker.claim_instance(instance, requests)
            except PciDeviceRequestFailed:
                record["failed_claims"] += 1
            else:
                addresses = sorted(d.address for d in claimed)
                assert len(addresses) == sum(r.count for r in requests), (instance, addresses)
                allocated = rng.random() < 0.75
                if allocated:
                    tracker.allocate_instance(instance)
                live[instance] = {"addresses": addresses, "allocated": allocated}
                # another process reading now sees exactly what the claim returned, in the right state
                owned = tracker.get_instance_pci_devs(instance, "all")
                assert sorted(d.address for d in owned) == addresses, (instance, owned, addresses)
                wanted = PciStatus.ALLOCATED if allocated else PciStatus.CLAIMED
                assert {d.status for d in owned} == {wanted}, (instance, owned)
            if live and rng.random() < 0.5:
                victim = rng.choice(sorted(live))
                assert _owned(tracker, victim) == live[victim]["addresses"], victim
                tracker.free_instance(victim)
                assert _owned(tracker, victim) == [], victim
                del live[victim]
                record["freed"] += 1
            if syncs and i % SYNC_EVERY == SYNC_EVERY - 1:
                variant = record["syncs"] % 2
                report = tracker.update_devices_from_hypervisor_resources(device_list(variant))
                record["last_reported"] = device_list(variant)
                record["syncs"] += 1
                assert not set(report.removed) - CHURNED, report
        record["wall"] = time.monotonic() - started
    except BaseException as exc:  # recorded for the test to show; the exit code says it too
        record["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        barrier.abort()  # the others stop waiting at a barrier for this one
    Path(out).write_text(json.dumps(record))
    if record["error"]:
        raise SystemExit(1)


def run_workers(location: str, plan: list[tuple[str, str, bool, int]], outdir: Path) -> list[dict[str, Any]]:
    """Start one process per (node, name, syncs, iterations), all at once; their records."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(plan))
    procs = []
    for seed, (node, name, syncs, iterations) in enumerate(plan):
        out = str(outdir / f"{name}.json")
        proc = ctx.Process(target=_worker, args=(location, node, name, syncs, iterations, seed, barrier, out))
        proc.start()
        procs.append((proc, out))
    try:
        for proc, _ in procs:
            proc.join(JOIN_TIMEOUT)
    finally:
        for proc, _ in procs:
            if proc.is_alive():  # only the processes this test started, by their handles
                proc.kill()
                proc.join(10)
    records = []
    for proc, out in procs:
        assert Path(out).exists(), f"worker {out} left no record (exit code {proc.exitcode})"
        records.append(json.loads(Path(out).read_text()))
    # the first real failure, not the barrier it broke for the others
    errors = sorted((r for r in records if r["error"]), key=lambda r: r["error"].startswith("BrokenBarrierError"))
    assert not errors, "\n".join(f"{r['worker']} failed:\n{r['error']}" for r in errors)
    assert [proc.exitcode for proc, _ in procs] == [0] * len(procs)
    return records


# --------------------------------------------------------------------------- checking the database


def expected_state(reported: list[dict[str, Any]], held: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """What one host's devices must be, from its last reported list and its live claims
    (address -> (instance, allocated)): the addresses, and the ones blocked by a held relative."""
    present = {d["address"] for d in reported} | set(held)
    parent_of = {d["address"]: d.get("parent_addr") for d in device_list(0) if d["address"] in present}
    blocked = set()
    for address in held:
        parent = parent_of.get(address)
        if parent is not None:  # a held VF blocks its PF
            blocked.add(parent)
        blocked |= {a for a, p in parent_of.items() if p == address and a in present}  # a held PF its VFs
    return {"present": present, "blocked": blocked - set(held)}


def check_host(location: str, node: str, reported: list[dict[str, Any]], records: list[dict[str, Any]]) -> int:
    """The host's rows, through a fresh tracker, against what its processes recorded; its free count."""
    held: dict[str, tuple[str, bool]] = {}
    for record in records:
        for instance, claim in record["live"].items():
            for address in claim["addresses"]:
                assert address not in held, f"{node} {address} returned to {held[address][0]} and to {instance}"
                held[address] = (instance, claim["allocated"])
    want = expected_state(reported, held)
    tracker = open_tracker(location, node)
    devices = {d.address: d for d in tracker.all_devs}
    # no device lost, none left over: what the host last reported, plus what instances still hold
    assert set(devices) == want["present"], (node, sorted(set(devices) ^ want["present"]))
    by_report = {d["address"]: d for d in reported}
    for address, device in devices.items():
        if address in held:
            instance, allocated = held[address]
            assert device.instance_uuid == instance, (node, address, device)
            assert device.status is (PciStatus.ALLOCATED if allocated else PciStatus.CLAIMED), (node, device)
            assert device.vanished == (address not in by_report), (node, device)
        else:
            assert device.instance_uuid is None and device.status not in ASSIGNED, (node, device)
            if address in want["blocked"]:
                assert device.status in (PciStatus.UNCLAIMABLE, PciStatus.UNAVAILABLE), (node, device)
            else:
                assert device.status is PciStatus.AVAILABLE, (node, device)
        if address in by_report:  # the last reported values: applied, or parked while assigned
            values = device.stale if device.stale is not None else device.hypervisor_values()
            for key, value in by_report[address].items():
                assert values[key] == value, (node, address, key, values[key], value)
    # each instance holds exactly what its claim returned
    for record in records:
        for instance, claim in record["live"].items():
            assert [d.address for d in tracker.get_instance_pci_devs(instance, "all")] == claim["addresses"]
    free = len(want["present"]) - len(held) - len(want["blocked"])
    assert tracker.pci_stats.free_count() == free
    tracker.store.close()
    return free


# --------------------------------------------------------------------------- the tests


def test_four_hosts_and_a_contended_host_on_one_postgresql_database(pg_url, tmp_path):
    plan = [(node, f"{node}-main", True, MAIN_ITERATIONS) for node in HOSTS]
    plan += [(TWIN_HOST, f"{TWIN_HOST}-twin{n}", False, TWIN_ITERATIONS) for n in range(TWINS)]
    started = time.monotonic()
    records = run_workers(pg_url, plan, tmp_path)
    elapsed = time.monotonic() - started
    by_node = collections.defaultdict(list)
    for record in records:
        by_node[record["node"]].append(record)

    free = {}
    for node in HOSTS:
        [main] = [r for r in by_node[node] if r["last_reported"] is not None]
        free[node] = check_host(pg_url, node, main["last_reported"], by_node[node])

    with Store(pg_url) as store:
        inventory = {pools.host.name: pools for pools in cluster_pools(store)}
    assert sorted(inventory) == HOSTS
    for node in HOSTS:
        pools = inventory[node]
        tracker = open_tracker(pg_url, node)
        devices = tracker.all_devs
        assert pools.host.devices == len(devices)
        assert pools.host.free == free[node] == pools.stats.free_count()
        # the cluster's pools are the host tracker's own pools, by number
        assert sorted(map(_sortable, pools.stats)) == sorted(map(_sortable, tracker.pci_stats))
        assert pools.host.synced_at is not None
        tracker.store.close()

    # the same addresses are held on several hosts at once, by different instances: kept apart by host
    holders = collections.defaultdict(set)
    for record in records:
        for instance, claim in record["live"].items():
            for address in claim["addresses"]:
                holders[address].add((record["node"], instance))
    assert any(len({node for node, _ in held}) > 1 for held in holders.values())
    twins = [r for r in by_node[TWIN_HOST] if r["last_reported"] is None]
    assert all(r["live"] or r["freed"] for r in twins), "the same-host processes claimed nothing"

    print(f"\n{len(plan)} processes, {elapsed:.2f}s in all (spawn included)")
    for record in records:
        print(f"  {record['worker']:<14} {record['wall']:6.2f}s  live {len(record['live']):3}  "
              f"freed {record['freed']:3}  failed claims {record['failed_claims']:3}  syncs {record['syncs']}")


def _sortable(pool: dict[str, Any]) -> str:
    return json.dumps(pool, sort_keys=True)


# -- many processes, one host -------------------------------------------------------------------

SOLO_VFS, SOLO_GPUS = 12, 4


def solo_devices() -> list[dict[str, Any]]:
    devices = host(pfs=1, vfs=SOLO_VFS, plain=0)
    devices += [{"address": gpu_addr(n), "vendor_id": GPU_VENDOR, "product_id": GPU_PRODUCT, "dev_type": "type-PCI",
                 "numa_node": 0} for n in range(SOLO_GPUS)]
    return devices


def _drain(location: str, name: str, barrier: Any, out: str) -> None:
    """Claim one VF, then one GPU, at a time until none is left; the addresses each claim returned."""
    got: dict[str, list[str]] = {}
    error = None
    try:
        tracker = open_tracker(location, "solo")
        barrier.wait(60)
        for kind in ("vf", "gpu"):
            n = 0
            while True:
                instance = f"{name}-{kind}{n}"
                try:
                    claimed = tracker.claim_instance(instance, [req(kind)])
                except PciDeviceRequestFailed:
                    break
                got[instance] = [d.address for d in claimed]
                if n % 2:
                    tracker.allocate_instance(instance)
                n += 1
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        barrier.abort()
    Path(out).write_text(json.dumps({"got": got, "error": error}))


def test_processes_of_one_host_never_claim_a_device_twice(state_location, tmp_path):
    """Three processes with one node_id drain one host: every device goes to exactly one instance."""
    tracker = open_tracker(state_location, "solo")
    tracker.update_devices_from_hypervisor_resources(solo_devices())
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    outs = [str(tmp_path / f"drain{n}.json") for n in range(3)]
    procs = [ctx.Process(target=_drain, args=(state_location, f"p{n}", barrier, out)) for n, out in enumerate(outs)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(JOIN_TIMEOUT)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    owner: dict[str, str] = {}
    for out in outs:
        result = json.loads(Path(out).read_text())
        assert result["error"] is None, result["error"]
        for instance, addresses in result["got"].items():
            assert len(addresses) == 1
            assert addresses[0] not in owner, f"{addresses[0]} went to {owner[addresses[0]]} and {instance}"
            owner[addresses[0]] = instance
    wanted = {vf_addr(0, v) for v in range(SOLO_VFS)} | {gpu_addr(n) for n in range(SOLO_GPUS)}
    assert set(owner) == wanted  # every VF and GPU went, exactly once; the PF is blocked by its VFs
    devices = {d.address: d for d in tracker.all_devs}
    assert {a: d.instance_uuid for a, d in devices.items() if d.instance_uuid} == owner
    assert devices[pf_addr(0)].status in (PciStatus.UNCLAIMABLE, PciStatus.UNAVAILABLE)
    assert tracker.pci_stats.free_count() == 0


# -- hosts do not see each other ----------------------------------------------------------------


def test_a_tracker_never_sees_or_changes_another_hosts_rows(state_location):
    a, b = open_tracker(state_location, "host-a"), open_tracker(state_location, "host-b")
    a.update_devices_from_hypervisor_resources(device_list(0))
    b.update_devices_from_hypervisor_resources(device_list(0))  # the very same addresses
    b.claim_instance("vm-b", [req("vf", 2), req("gpu")])
    b.allocate_instance("vm-b")
    b.claim_instance("vm-b2", [req("pf")])
    before = sorted((d.record() for d in b.all_devs), key=lambda r: r["address"])
    assert all(d.status is PciStatus.AVAILABLE for d in a.all_devs)  # b's claims are not a's

    # a's instances, frees and syncs are a's alone
    assert a.get_instance_pci_devs("vm-b", "all") == []
    assert a.free_instance("vm-b") == []
    a.claim_instance("vm-a", [req("gpu", 8)])
    report = a.update_devices_from_hypervisor_resources([])  # host a reports nothing any more
    assert report.kept == [gpu_addr(n) for n in range(8)]
    assert len(report.removed) == len(device_list(0)) - 8
    a.free_instance("vm-a")
    assert a.all_devs == []
    assert a.clean_usage([], [], []) == []

    fresh_b = open_tracker(state_location, "host-b")
    assert sorted((d.record() for d in fresh_b.all_devs), key=lambda r: r["address"]) == before
    assert [d.address for d in fresh_b.get_instance_pci_devs("vm-b", "all")] == sorted(
        d.address for d in b.get_instance_pci_devs("vm-b", "all"))
    with Store(state_location) as store:
        pools = {p.host.name: p for p in cluster_pools(store)}
    assert pools["host-a"].host.devices == 0 and pools["host-a"].host.free == 0
    assert pools["host-b"].host.devices == len(device_list(0))
    assert pools["host-b"].host.free == fresh_b.pci_stats.free_count()

"""Property: whatever happens, the tracker never double-assigns and never forgets.

Random sequences of syncs (devices vanishing, reappearing, changing NUMA
node, IOMMU group or PF), syncs of the very same list again or of an
earlier one (as dicts or as JSON text), claims, allocations, frees and
clean_usage over a host with PFs and VFs, by one tracker or by two taking
turns.  After every step: no device belongs to two instances, no PF is in
use together with one of its VFs, pool counts equal the free devices, and a
tracker reopened from the database has exactly the same state, PF/VF tree
and IOMMU groups included.  A repeated sync, which the tracker answers
without comparing device by device, must change nothing; after any sync, a
freshly opened tracker's full comparison with the same list must find
nothing left to do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcihost import host, request

from kvmslots import Store
from kvmslots.errors import PciDeviceRequestFailed, PciError
from kvmslots.pci.device import ASSIGNED, PciStatus
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.tracker import PciDevTracker

UNIVERSE = host(pfs=2, vfs=3, plain=2)
WHITELIST = Whitelist.from_config([{"vendor_id": "8086"}])
INSTANCES = ["vm-0", "vm-1", "vm-2"]

ops = st.one_of(
    st.tuples(st.just("sync"),
              st.one_of(st.just([True] * len(UNIVERSE)),  # often every device: only the moved one changes
                        st.lists(st.booleans(), min_size=len(UNIVERSE), max_size=len(UNIVERSE))),
              st.integers(0, len(UNIVERSE) - 1), st.sampled_from(["numa", "group", "parent"])),
    st.tuples(st.just("resync"), st.booleans(), st.integers(0, 2)),
    st.tuples(st.just("claim"), st.sampled_from(INSTANCES),
              st.lists(st.tuples(st.sampled_from(["type-PF", "type-VF", "type-PCI"]), st.integers(1, 3)),
                       min_size=1, max_size=3)),
    st.tuples(st.just("allocate"), st.sampled_from(INSTANCES)),
    st.tuples(st.just("free"), st.sampled_from(INSTANCES)),
    st.tuples(st.just("free_device"), st.sampled_from(INSTANCES), st.integers(0, len(UNIVERSE) - 1)),
    st.tuples(st.just("clean"), st.lists(st.sampled_from(INSTANCES), unique=True)),
)


def state_of(tracker):
    devs = tracker.all_devs
    tree = [(d.address, d.parent.address if d.parent else None, [c.address for c in d.children]) for d in devs]
    groups = sorted((g, sorted(m.address for m in members)) for g, members in tracker._groups.items())
    return ([d.record() for d in devs], [p.describe() for p in tracker.pci_stats.pools],
            {i: [r.to_dict() for r in tracker.instance_requests(i)] for i in INSTANCES}, tree, groups)


def changed(reported, moved, how):
    """The host's list with one device changed: its NUMA node, its IOMMU group (shared with a plain
    device's), or (a VF) its PF."""
    for d in reported:
        if d["address"] == UNIVERSE[moved]["address"]:
            if how == "numa":
                d["numa_node"] = 1 - (d["numa_node"] or 0)
            elif how == "group":
                d["iommu_group"] = 41 if d.get("iommu_group") != 41 else 7
            elif d["dev_type"] == "type-VF":
                d["parent_addr"] = next(p["address"] for p in UNIVERSE
                                        if p["dev_type"] == "type-PF" and p["address"] != d["parent_addr"])
    return reported


def check_invariants(tracker, owners):
    devs = {d.address: d for d in tracker.all_devs}
    for d in devs.values():
        if d.status in ASSIGNED:
            assert d.instance_uuid is not None
            assert owners.get(d.address) == d.instance_uuid, "owner changed without a free"
        else:
            assert d.instance_uuid is None and d.address not in owners
        if d.dev_type == "type-PF" and d.status in ASSIGNED:
            assert not [vf for vf in d.children if vf.status in ASSIGNED], "PF and its VF both in use"
            assert not [vf for vf in d.children if vf.is_available], "a VF of a used PF looks free"
        if d.dev_type == "type-VF" and d.status in ASSIGNED and d.parent is not None:
            assert not d.parent.is_available, "the PF of a used VF looks free"
    assert set(owners) <= set(devs), "an owned device was dropped"
    free = [d for d in devs.values() if d.status is PciStatus.AVAILABLE]
    assert sum(p.count for p in tracker.pci_stats.pools) == len(free) == tracker.pci_stats.free_count()
    assert all(dev.is_available for p in tracker.pci_stats.pools for dev in p.devices.values())


def apply(tracker, step, owners, last, history, state_dir):
    """Run one step on *tracker*; the model's owners and the list last synced, as they are after it."""
    if step[0] == "sync":
        _, present, moved, how = step
        last = changed([dict(d) for d, keep in zip(UNIVERSE, present) if keep], moved, how)
        history.append(last)
        tracker.update_devices_from_hypervisor_resources(last)
        for address in list(owners):  # vanished free devices may go; owned ones must stay
            assert tracker.get_device(address).instance_uuid == owners[address]
    elif step[0] == "resync" and last is not None:
        _, as_text, back = step
        if back == 0:  # the list last synced, again
            before = stored_state(state_dir)
            given = json.dumps(last) if as_text else [dict(d) for d in last]
            report = tracker.update_devices_from_hypervisor_resources(given)
            assert (report.added, report.updated, report.removed) == ([], [], [])
            assert stored_state(state_dir) == before, "a repeated sync changed something"
        else:  # a list synced before the last one (its text may be the tracker's last text)
            older = history[max(0, len(history) - 1 - back)]
            given = json.dumps(older) if as_text else [dict(d) for d in older]
            tracker.update_devices_from_hypervisor_resources(given)
            last = older
            for address in list(owners):
                assert tracker.get_device(address).instance_uuid == owners[address]
        with Store(state_dir) as store:  # a tracker with no memory of earlier syncs compares in full
            fresh = PciDevTracker(store, WHITELIST)
            report = fresh.update_devices_from_hypervisor_resources(given)
            assert (report.added, report.updated, report.removed) == ([], [], []), "a sync left something out"
            assert state_of(fresh) == state_of(tracker)
    elif step[0] == "claim":
        _, vm, wanted = step
        got = tracker.claim_instance(vm, [request(kind, count) for kind, count in wanted])
        assert len(got) == sum(count for _, count in wanted)
        for d in got:
            assert d.address not in owners, f"{d.address} handed out twice"
            owners[d.address] = vm
    elif step[0] == "allocate":
        tracker.allocate_instance(step[1])
    elif step[0] == "free":
        tracker.free_instance(step[1])
        owners = {a: o for a, o in owners.items() if o != step[1]}
    elif step[0] == "free_device":
        _, vm, index = step
        address = UNIVERSE[index]["address"]
        tracker.free_device(address, vm)
        owners.pop(address)
    elif step[0] == "clean":
        tracker.clean_usage([{"uuid": i} for i in step[1]], [], [])
        owners = {a: o for a, o in owners.items() if o in step[1]}
    return owners, last


def stored_state(state_dir):
    """The state as a tracker opened now finds it (opening one refreshes no other)."""
    with Store(state_dir) as store:
        return state_of(PciDevTracker(store, WHITELIST))


def run_steps(steps, trackers, state_dir):
    """Each step on the tracker it names; after each, the invariants, and that tracker agrees with
    the database.  The other tracker is not refreshed: its next step starts from an old view."""
    owners: dict[str, str] = {}  # our model: address -> instance
    last: list[dict] | None = None  # the list last synced
    history: list[list[dict]] = []  # the lists the sync steps made
    for who, step in steps:
        tracker = trackers[who]
        before = stored_state(state_dir)
        try:
            owners, last = apply(tracker, step, owners, last, history, state_dir)
        except PciDeviceRequestFailed:
            assert stored_state(state_dir) == before, "a refused claim changed something"
        except PciError as exc:
            # only the free/allocate steps may be refused for state or owner: a claim that the
            # pools offered must never fail on the device itself
            assert step[0] in ("free_device", "allocate"), f"{step[0]} failed: {exc!r}"
            assert stored_state(state_dir) == before, "a refused operation changed something"
        check_invariants(tracker, owners)
        assert stored_state(state_dir) == state_of(tracker)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(ops, min_size=1, max_size=25))
def test_random_operations_keep_the_tracker_consistent_and_durable(steps):
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        with Store(state_dir) as store:
            run_steps([(0, step) for step in steps], [PciDevTracker(store, WHITELIST)], state_dir)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(0, 1), ops), min_size=2, max_size=25))
def test_two_trackers_of_one_host_taking_turns_never_act_on_an_old_view(steps):
    """A tracker whose view another one made stale finds out as it writes (or refuses, or finds
    nothing to do), loads again and does the step again: the same guarantees as with one."""
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        with Store(state_dir) as first, Store(state_dir) as second:
            run_steps(steps, [PciDevTracker(first, WHITELIST), PciDevTracker(second, WHITELIST)], state_dir)

"""Property: whatever happens, the tracker never double-assigns and never forgets.

Random sequences of syncs (devices vanishing, reappearing, changing NUMA
node), claims, allocations, frees and clean_usage over a host with PFs and
VFs.  After every step: no device belongs to two instances, no PF is in use
together with one of its VFs, pool counts equal the free devices, and a
tracker reopened from the database has exactly the same state.
"""

from __future__ import annotations

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
    st.tuples(st.just("sync"), st.lists(st.booleans(), min_size=len(UNIVERSE), max_size=len(UNIVERSE)),
              st.integers(0, len(UNIVERSE) - 1)),
    st.tuples(st.just("claim"), st.sampled_from(INSTANCES),
              st.lists(st.tuples(st.sampled_from(["type-PF", "type-VF", "type-PCI"]), st.integers(1, 3)),
                       min_size=1, max_size=3)),
    st.tuples(st.just("allocate"), st.sampled_from(INSTANCES)),
    st.tuples(st.just("free"), st.sampled_from(INSTANCES)),
    st.tuples(st.just("free_device"), st.sampled_from(INSTANCES), st.integers(0, len(UNIVERSE) - 1)),
    st.tuples(st.just("clean"), st.lists(st.sampled_from(INSTANCES), unique=True)),
)


def state_of(tracker):
    return ([d.record() for d in tracker.all_devs], [p.describe() for p in tracker.pci_stats.pools],
            {i: [r.to_dict() for r in tracker.instance_requests(i)] for i in INSTANCES})


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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(ops, min_size=1, max_size=25))
def test_random_operations_keep_the_tracker_consistent_and_durable(steps):
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        tracker = PciDevTracker(Store(state_dir), WHITELIST)
        owners: dict[str, str] = {}  # our model: address -> instance
        for step in steps:
            before = state_of(tracker)
            try:
                if step[0] == "sync":
                    _, present, moved = step
                    reported = [dict(d) for d, keep in zip(UNIVERSE, present) if keep]
                    for d in reported:
                        if d["address"] == UNIVERSE[moved]["address"]:
                            d["numa_node"] = 1 - (d["numa_node"] or 0)
                    tracker.update_devices_from_hypervisor_resources(reported)
                    for address in list(owners):  # vanished free devices may go; owned ones must stay
                        assert tracker.get_device(address).instance_uuid == owners[address]
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
            except PciDeviceRequestFailed:
                assert state_of(tracker) == before, "a refused claim changed something"
            except PciError as exc:
                # only the free/allocate steps may be refused for state or owner: a claim that the
                # pools offered must never fail on the device itself
                assert step[0] in ("free_device", "allocate"), f"{step[0]} failed: {exc!r}"
                assert state_of(tracker) == before, "a refused operation changed something"
            check_invariants(tracker, owners)
            reopened = PciDevTracker(Store(state_dir), WHITELIST)
            assert state_of(reopened) == state_of(tracker)

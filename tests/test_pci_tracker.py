"""PciDevTracker: Nova's semantics, persisted as it changes (real SQLite and a real PostgreSQL server)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os

import pytest
from pcihost import host, pf_addr, plain_addr, request, vf_addr

from kvmslots import Store
from kvmslots.errors import (
    InvalidDevicesJson,
    PciDeviceInvalidOwner,
    PciDeviceInvalidStatus,
    PciDeviceRequestFailed,
)
from kvmslots.pci.device import PciStatus
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.tracker import PciDevTracker

ALL_INTEL = Whitelist.from_config([json.dumps({"vendor_id": "8086", "physical_network": "physnet1"})])


@pytest.fixture
def state(state_location):
    return state_location


def open_tracker(state_dir, whitelist=ALL_INTEL, **kw):
    return PciDevTracker(Store(state_dir), whitelist, **kw)


@pytest.fixture
def tracker(state):
    t = open_tracker(state)
    t.update_devices_from_hypervisor_resources(json.dumps(host()))
    return t


def snapshot(tracker):
    return [d.record() for d in tracker.all_devs], [p.describe() for p in tracker.pci_stats.pools]


def status(tracker, address):
    return tracker.get_device(address).status


def test_sync_tracks_whitelisted_devices_with_tags_and_tree(tracker):
    assert len(tracker.all_devs) == 2 + 8 + 2
    pf = tracker.get_device(pf_addr(0))
    assert [vf.address for vf in pf.children] == [vf_addr(0, v) for v in range(4)]
    assert pf.tags == {"physical_network": "physnet1"}
    assert tracker.pci_stats.free_count() == 12
    vf_pools = [p for p in tracker.pci_stats.pools if p.dev_type == "type-VF"]
    assert sorted((p.parent_addr, p.count) for p in vf_pools) == [(pf_addr(0), 4), (pf_addr(1), 4)]


def test_devices_outside_the_spec_are_not_tracked(state):
    t = open_tracker(state, Whitelist.from_config([{"address": pf_addr(0)}]))
    t.update_devices_from_hypervisor_resources(host())
    assert [d.address for d in t.all_devs] == [pf_addr(0)] + [vf_addr(0, v) for v in range(4)]


def test_vf_claim_takes_its_pf_out_and_pf_claim_its_vfs(tracker):
    [vf] = tracker.claim_instance("vm-a", [request("type-VF")])
    assert vf.status is PciStatus.CLAIMED and vf.parent.status is PciStatus.UNCLAIMABLE
    [pf] = tracker.claim_instance("vm-b", [request("type-PF")])
    assert pf.address != vf.parent.address
    assert {c.status for c in pf.children} == {PciStatus.UNCLAIMABLE}
    assert tracker.pci_stats.free_count() == 12 - 1 - 1 - 1 - 4
    tracker.allocate_instance("vm-b")
    assert {c.status for c in pf.children} == {PciStatus.UNAVAILABLE}
    tracker.free_instance("vm-b")
    assert pf.status is PciStatus.AVAILABLE and {c.status for c in pf.children} == {PciStatus.AVAILABLE}
    tracker.free_instance("vm-a")
    assert tracker.pci_stats.free_count() == 12


def test_parent_pf_is_free_again_only_when_every_sibling_vf_is(tracker):
    a, b = tracker.claim_instance("vm-a", [request("type-VF", count=2)])
    assert a.parent is b.parent  # greedy, same pool
    tracker.free_device(a, "vm-a")
    assert a.parent.status is PciStatus.UNCLAIMABLE
    tracker.free_device(b.address, "vm-a")
    assert a.parent.status is PciStatus.AVAILABLE


def test_wrong_state_or_owner_is_typed_and_changes_nothing(tracker):
    [dev] = tracker.claim_instance("vm-a", [request("type-PCI")])
    before = snapshot(tracker)
    with pytest.raises(PciDeviceInvalidOwner):
        tracker.free_device(dev, "vm-b")
    with pytest.raises(PciDeviceInvalidOwner):
        dev.allocate("vm-b")
    with pytest.raises(PciDeviceInvalidStatus):
        tracker.get_device(plain_addr(1)).free()
    with pytest.raises(PciDeviceInvalidStatus):
        tracker.get_device(pf_addr(0)).free()
    assert snapshot(tracker) == before


def test_a_claim_of_several_requests_is_all_or_nothing(tracker):
    before = snapshot(tracker)
    with pytest.raises(PciDeviceRequestFailed):
        tracker.claim_instance("vm-a", [request("type-PCI", count=2), request("type-PCI", count=1)])
    assert snapshot(tracker) == before
    # a VF of PF0 and both PFs cannot be had together: PF0 is out once its VF is taken
    with pytest.raises(PciDeviceRequestFailed):
        tracker.claim_instance("vm-a", [request("type-VF"), request("type-PF", count=2)])
    assert snapshot(tracker) == before
    assert len(tracker.claim_instance("vm-a", [request("type-VF"), request("type-PF")])) == 2


def test_pf_pools_serve_only_pf_requests(tracker):
    untyped = request("type-PF")
    untyped.spec[0].pop("dev_type")
    with pytest.raises(PciDeviceRequestFailed):
        tracker.claim_instance("vm-a", [untyped])


def test_alias_tags_must_match_device_tags(tracker):
    assert tracker.claim_instance("vm-a", [request("type-VF", physical_network="physnet1")])
    with pytest.raises(PciDeviceRequestFailed):
        tracker.claim_instance("vm-b", [request("type-VF", physical_network="physnet2")])


@pytest.mark.parametrize(
    "policy,cells,expect_nodes",
    [("required", [1], {1}), ("legacy", [1], {1}), ("preferred", [1], {1}), ("required", None, {0})],
)
def test_numa_policies(tracker, policy, cells, expect_nodes):
    devs = tracker.claim_instance("vm-a", [request("type-PCI", policy=policy)], numa_cells=cells)
    assert {d.numa_node for d in devs} == expect_nodes


def test_numa_required_fails_and_preferred_falls_back(state):
    t = open_tracker(state)
    t.update_devices_from_hypervisor_resources(host(plain=1))  # plain device only on node 0
    with pytest.raises(PciDeviceRequestFailed):
        t.claim_instance("vm-a", [request("type-PCI", policy="required")], numa_cells=[1])
    assert t.claim_instance("vm-a", [request("type-PCI", policy="preferred")], numa_cells=[1])


def test_socket_policy_uses_the_host_socket_map(state):
    t = open_tracker(state, numa_sockets={0: 0, 1: 0, 2: 1})
    t.update_devices_from_hypervisor_resources(host(plain=1))
    assert t.claim_instance("vm-a", [request("type-PCI", policy="socket")], numa_cells=[1])
    t2 = open_tracker(state, numa_sockets={0: 0, 1: 1}, node_id="s2")  # another host
    t2.update_devices_from_hypervisor_resources(host(plain=1))
    with pytest.raises(PciDeviceRequestFailed):
        t2.claim_instance("vm-a", [request("type-PCI", policy="socket")], numa_cells=[1])


def test_grouping_keys_choose_which_tags_split_pools(state):
    wl = Whitelist.from_config([{"address": pf_addr(0), "physical_network": "net0", "trusted": "true"},
                                {"address": pf_addr(1), "physical_network": "net0", "trusted": "false"}])
    grouped = open_tracker(state, wl, grouping_keys=["physical_network"])
    grouped.update_devices_from_hypervisor_resources(host(plain=0, numa=False))
    everything = open_tracker(state, wl, node_id="other")  # another host
    everything.update_devices_from_hypervisor_resources(host(plain=0, numa=False))
    pf_pools = lambda t: [p for p in t.pci_stats.pools if p.dev_type == "type-PF"]  # noqa: E731
    assert len(pf_pools(grouped)) == 1 and len(pf_pools(everything)) == 2
    # a tag outside the grouping keys is still honoured device by device
    [pf] = grouped.claim_instance("vm-a", [request("type-PF", trusted="false")])
    assert pf.address == pf_addr(1)


def test_vanished_assigned_device_is_kept_until_freed(tracker, caplog):
    [dev] = tracker.claim_instance("vm-a", [request("type-PCI")])
    tracker.allocate_instance("vm-a")
    remaining = [d for d in host() if d["address"] != dev.address]
    with caplog.at_level(logging.WARNING):
        tracker.update_devices_from_hypervisor_resources(remaining)
    assert "no longer reported" in caplog.text
    assert tracker.get_device(dev.address).status is PciStatus.ALLOCATED
    tracker.free_instance("vm-a")
    assert dev.address not in {d.address for d in tracker.all_devs}


def test_changed_properties_of_an_assigned_device_apply_when_freed(tracker):
    [dev] = tracker.claim_instance("vm-a", [request("type-PCI")])
    changed = [dict(d, numa_node=1) if d["address"] == dev.address else d for d in host()]
    tracker.update_devices_from_hypervisor_resources(changed)
    assert tracker.get_device(dev.address).numa_node == 0 and tracker.get_device(dev.address).stale
    tracker.free_instance("vm-a")
    assert tracker.get_device(dev.address).numa_node == 1 and tracker.get_device(dev.address).stale is None


def test_a_vf_that_appears_under_an_allocated_pf_is_not_free(tracker):
    [pf] = tracker.claim_instance("vm-a", [request("type-PF")])
    tracker.allocate_instance("vm-a")
    new_addr = vf_addr(0, 9) if pf.address == pf_addr(0) else vf_addr(1, 9)
    more = host() + [{"address": new_addr, "vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
                      "parent_addr": pf.address, "numa_node": 0}]
    tracker.update_devices_from_hypervisor_resources(more)
    assert tracker.get_device(new_addr).status is PciStatus.UNAVAILABLE
    assert all(p.dev_type != "type-VF" or p.parent_addr != pf.address for p in tracker.pci_stats.pools)


@pytest.mark.parametrize("bad", [
    "not json", "{}", json.dumps([{"address": "0000:04:20.0", "vendor_id": "8086", "product_id": "1521"}]),
    json.dumps([{"address": "0000:04:00.0", "vendor_id": "80861", "product_id": "1521"}]),
    json.dumps([{"address": "0000:04:00.0", "vendor_id": "8086", "product_id": "1521", "dev_type": "type-XX"}]),
    json.dumps([{"address": "0000:04:00.1", "vendor_id": "8086", "product_id": "1521", "dev_type": "type-VF"}]),
    # a decimal text such as "0" is coerced as in Nova (issue 10); a non-number is still refused
    json.dumps([{"address": "0000:04:00.0", "vendor_id": "8086", "product_id": "1521", "numa_node": "zero"}]),
    json.dumps([{"address": "0000:04:00.0", "vendor_id": "8086", "product_id": "1521", "surprise": 1}]),
    json.dumps([{"address": "0000:04:00.0", "vendor_id": "8086", "product_id": "1521"}] * 2),
])
def test_bad_devices_json_is_typed_and_changes_nothing(tracker, bad):
    before = snapshot(tracker)
    with pytest.raises(InvalidDevicesJson):
        tracker.update_devices_from_hypervisor_resources(bad)
    assert snapshot(tracker) == before


def test_request_ids_mark_which_device_answered_which_request(tracker):
    gpu, nic = request("type-PCI"), request("type-VF")
    port = request("type-VF")
    port.source = "port"
    tracker.claim_instance({"uuid": "vm-a"}, [gpu, nic, port])
    assert [d.dev_type for d in tracker.get_instance_pci_devs("vm-a", gpu.request_id)] == ["type-PCI"]
    assert len(tracker.get_instance_pci_devs("vm-a", "all")) == 3
    assert len(tracker.get_instance_pci_devs("vm-a")) == 2  # None: the generic (flavor) requests
    assert [d.request_id for d in tracker.get_instance_pci_devs("vm-a", port.request_id)] == [port.request_id]


def test_migration_claims_and_clean_usage(tracker):
    incoming = {"uuid": "vm-m", "pci_requests": [request("type-PCI").to_json()]}
    assert len(tracker.update_pci_for_migration(incoming, 1)) == 1
    assert tracker.update_pci_for_migration(incoming, 1) == []  # already claimed here
    tracker.update_pci_for_migration(incoming, -1)
    assert tracker.get_instance_pci_devs("vm-m", "all") == []
    tracker.claim_instance("vm-a", [request("type-PCI")])
    tracker.claim_instance("vm-b", [request("type-VF")])
    tracker.update_pci_for_instance({"uuid": "vm-b"}, 1)
    tracker.clean_usage([{"uuid": "vm-a"}], [], [])
    assert tracker.get_instance_pci_devs("vm-b", "all") == []
    assert len(tracker.get_instance_pci_devs("vm-a", "all")) == 1
    assert tracker.pci_stats.free_count() == 12 - 1  # all but vm-a's device


def test_reopening_rebuilds_exactly_the_same_state(state, tracker):
    tracker.claim_instance("vm-a", [request("type-VF", count=2), request("type-PCI")])
    tracker.allocate_instance("vm-a")
    tracker.claim_instance("vm-b", [request("type-PF")])
    reopened = open_tracker(state)
    assert snapshot(reopened) == snapshot(tracker)
    assert reopened.instance_requests("vm-a") == tracker.instance_requests("vm-a")


def _claim_then_crash(state_dir):
    t = open_tracker(state_dir)
    t.claim_instance("vm-crash", [request("type-PCI")])
    os._exit(9)  # no save(), no clean shutdown


def test_a_crash_right_after_a_claim_loses_nothing(state, tracker):
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_claim_then_crash, args=(state,))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    reopened = open_tracker(state)
    assert len(reopened.get_instance_pci_devs("vm-crash", "all")) == 1
    tracker.refresh()  # the long-lived tracker sees the other process's claim too
    assert snapshot(tracker) == snapshot(reopened)


def test_sync_reports_what_it_did(tracker):
    [dev] = tracker.claim_instance("vm-a", [request("type-PCI")])
    devices = [d for d in host() if d["address"] not in (dev.address, vf_addr(1, 3))]
    devices = [dict(d, numa_node=1) if d["address"] == pf_addr(0) else d for d in devices]
    devices.append({"address": "0000:1c:00.0", "vendor_id": "8086", "product_id": "0443", "dev_type": "type-PCI"})
    report = tracker.update_devices_from_hypervisor_resources(devices)
    assert report.to_json() == {"added": ["0000:1c:00.0"], "updated": [pf_addr(0)], "removed": [vf_addr(1, 3)],
                                "kept": [dev.address]}


def test_a_vf_whose_parent_changed_while_assigned_is_relinked_when_freed(state):
    pf1, pf2, vf = "0000:81:00.0", "0000:82:00.0", "0000:81:02.0"

    def devices(parent):
        return [{"address": pf1, "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF"},
                {"address": pf2, "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF"},
                {"address": vf, "vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
                 "parent_addr": parent}]

    t = open_tracker(state)
    t.update_devices_from_hypervisor_resources(devices(pf1))
    t.claim_instance("vm-a", [request("type-VF")])
    t.update_devices_from_hypervisor_resources(devices(pf2))  # parked: the VF is assigned
    [pf] = t.claim_instance("vm-b", [request("type-PF")])
    assert pf.address == pf2
    t.free_instance("vm-a")
    assert t.get_device(vf).parent.address == pf2 and t.get_device(vf).status is PciStatus.UNCLAIMABLE
    assert t.get_device(pf1).status is PciStatus.AVAILABLE and t.get_device(pf1).children == []
    with pytest.raises(PciDeviceRequestFailed):
        t.claim_instance("vm-c", [request("type-VF")])  # never a PF and its VF both in use
    assert snapshot(open_tracker(state)) == snapshot(t)


def test_migration_claims_the_new_flavor_and_a_same_host_resize_is_claimed(tracker):
    old, new = request("type-PCI"), request("type-VF", count=2)
    instance = {"uuid": "vm-r", "system_metadata": {
        "pci_requests": json.dumps([old.to_dict()]), "new_pci_requests": json.dumps([new.to_dict()])}}
    tracker.claim_instance(instance)
    tracker.allocate_instance(instance)
    claimed = tracker.update_pci_for_migration(instance, 1)
    assert [d.dev_type for d in claimed] == ["type-VF", "type-VF"]
    assert tracker.update_pci_for_migration(instance, 1) == []  # already claimed here
    tracker.update_pci_for_migration(instance, -1)
    assert [d.status for d in tracker.get_instance_pci_devs("vm-r", "all")] == [PciStatus.ALLOCATED]


def test_two_trackers_on_one_database_see_each_others_claims(state, tracker):
    other = open_tracker(state)
    tracker.claim_instance("vm-a", [request("type-PCI", count=2)])
    assert other.pci_stats.free_count() == tracker.pci_stats.free_count() == 10
    assert not other.pci_stats.support_requests([request("type-PCI")])
    with pytest.raises(PciDeviceRequestFailed):
        other.claim_instance("vm-b", [request("type-PCI")])


def test_a_pf_devname_spec_covers_its_vfs_and_remote_managed_needs_vpd(state):
    from kvmslots.pci.fakehost import sriov_topology

    topo = sriov_topology(pfs=1, vfs_per_pf=2, plain=0)
    pf_name = next(d["devname"] for d in topo if d["dev_type"] == "type-PF")
    t = open_tracker(state, Whitelist.from_config([{"devname": pf_name, "physical_network": "physnet1"}]))
    t.update_devices_from_hypervisor_resources(topo)
    assert sorted(d.dev_type for d in t.all_devs) == ["type-PF", "type-VF", "type-VF"]
    assert {d.tags["physical_network"] for d in t.all_devs} == {"physnet1"}
    vf = next(d for d in topo if d["dev_type"] == "type-VF")
    spec = Whitelist.from_config([{"vendor_id": "8086", "remote_managed": "true"}])
    remote = open_tracker(state, spec, node_id="remote")  # another host
    remote.update_devices_from_hypervisor_resources(
        [dict(vf, capabilities={"vpd": {"card_serial_number": "MT2113X00000"}}), dict(topo[0])])
    assert [d.address for d in remote.all_devs] == [vf["address"]]


@pytest.mark.parametrize("field", ["numa_node", "iommu_group"])
def test_huge_integers_are_typed_errors(tracker, field):
    before = snapshot(tracker)
    with pytest.raises(InvalidDevicesJson):
        tracker.update_devices_from_hypervisor_resources([dict(host()[0], **{field: 2**63})])
    assert snapshot(tracker) == before


def test_an_iommu_group_never_goes_to_two_instances(state):
    gpu = {"address": "0000:3b:00.0", "vendor_id": "10de", "product_id": "1eb8", "iommu_group": 7}
    audio = {"address": "0000:3b:00.1", "vendor_id": "10de", "product_id": "10f8", "iommu_group": 7}
    other = {"address": "0000:5e:00.0", "vendor_id": "10de", "product_id": "10f8", "iommu_group": 9}
    t = open_tracker(state, Whitelist.from_config([{"vendor_id": "10de"}]))
    t.update_devices_from_hypervisor_resources([gpu, audio, other])

    def want(product):
        r = request("type-PCI")
        r.spec[0].update(vendor_id="10de", product_id=product)
        return r

    t.claim_instance("vm-a", [want("1eb8")])
    [picked] = t.claim_instance("vm-b", [want("10f8")])
    assert picked.address == other["address"]  # 3b:00.1 shares vm-a's group
    with pytest.raises(PciDeviceRequestFailed):
        t.claim_instance("vm-c", [want("10f8")])
    assert [d.address for d in t.claim_instance("vm-a", [want("10f8")])] == [audio["address"]]  # same VM: fine

"""The tracker's shortcuts must answer exactly as the long way would (SQLite and PostgreSQL).

* opening a tracker reads nothing: the first operation loads the host;
* a claim, an allocation or a free works on what is loaded and checks the
  host's generation as it writes: from a view another tracker made stale it
  must still never hand out a taken device, refuse what is possible, or miss
  what it should free or allocate;
* a sync looks only at the records that changed since the last one, and a
  sync of the very same JSON text does not parse it again: its report and
  its effect must be those of a full comparison, also after another tracker
  wrote in between and after the device spec changed.
"""

from __future__ import annotations

import json

import pytest
from pcihost import host, plain_addr, request, vf_addr

from kvmslots import Store
from kvmslots.errors import InvalidDevicesJson, PciDeviceRequestFailed
from kvmslots.pci.device import PciStatus
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.tracker import PciDevTracker

INTEL = Whitelist.from_config([{"vendor_id": "8086"}])


def open_tracker(location, whitelist=INTEL):
    return PciDevTracker(Store(location), whitelist)


def snapshot(tracker):
    devs = tracker.all_devs
    return ([d.record() for d in devs], [p.describe() for p in tracker.pci_stats.pools],
            [(d.address, d.parent.address if d.parent else None, [c.address for c in d.children]) for d in devs])


@pytest.fixture
def loaded(state_location):
    """Two trackers of one host, both loaded."""
    first = open_tracker(state_location)
    first.update_devices_from_hypervisor_resources(host())
    second = open_tracker(state_location)
    assert second.pci_stats.free_count() == first.pci_stats.free_count() == 12
    return first, second, state_location


def test_opening_a_tracker_reads_nothing_until_an_operation_needs_it(state_location, monkeypatch):
    open_tracker(state_location).update_devices_from_hypervisor_resources(host())
    store = Store(state_location)
    opened: list[str] = []
    for name in ("reading", "transaction"):
        original = getattr(store, name)
        monkeypatch.setattr(store, name, lambda original=original, name=name: opened.append(name) or original())
    tracker = PciDevTracker(store, INTEL)
    assert opened == []
    assert len(tracker.all_devs) == 12  # the first look loads
    assert opened == ["reading"]
    assert tracker.instance_requests("vm-none") == []


def test_a_claim_from_a_stale_view_never_takes_a_taken_device(loaded):
    first, second, location = loaded
    [taken] = first.claim_instance("vm-a", [request("type-PCI")])
    [got] = second.claim_instance("vm-b", [request("type-PCI")])  # its view still has both free
    assert got.address != taken.address
    with pytest.raises(PciDeviceRequestFailed):
        second.claim_instance("vm-c", [request("type-PCI")])
    assert snapshot(open_tracker(location)) == snapshot(first) == snapshot(second)


def test_a_refusal_from_a_stale_view_is_asked_again(loaded):
    first, second, location = loaded
    first.claim_instance("vm-a", [request("type-PCI", count=2)])
    assert second.pci_stats.free_count() == 10  # the second tracker sees both taken
    first.free_instance("vm-a")  # ... and does not know they are free again
    assert len(second.claim_instance("vm-b", [request("type-PCI", count=2)])) == 2
    assert snapshot(open_tracker(location)) == snapshot(second)


def test_a_free_or_an_allocation_from_a_stale_view_finds_what_another_tracker_claimed(loaded):
    first, second, location = loaded
    [dev] = first.claim_instance("vm-a", [request("type-VF")])
    assert [d.address for d in second.allocate_instance("vm-a")] == [dev.address]
    assert first.get_device(dev.address).status is PciStatus.ALLOCATED
    first.claim_instance("vm-b", [request("type-PCI")])
    assert len(second.free_instance("vm-b")) == 1
    assert second.get_instance_pci_devs("vm-b", "all") == []
    assert first.pci_stats.free_count() == second.pci_stats.free_count()
    assert snapshot(open_tracker(location)) == snapshot(first) == snapshot(second)


def test_repeated_syncs_report_what_a_full_comparison_reports(state_location):
    tracker = open_tracker(state_location)
    text = json.dumps(host())
    tracker.update_devices_from_hypervisor_resources(text)
    [dev] = tracker.claim_instance("vm-a", [request("type-PCI")])
    shrunk = json.dumps([d for d in host() if d["address"] != dev.address])
    first = tracker.update_devices_from_hypervisor_resources(shrunk)
    assert first.to_json() == {"added": [], "updated": [], "removed": [], "kept": [dev.address]}
    again = tracker.update_devices_from_hypervisor_resources(shrunk)  # the same text: not parsed again
    assert again == open_tracker(state_location).update_devices_from_hypervisor_resources(shrunk)
    assert again.to_json() == {"added": [], "updated": [], "removed": [], "kept": [dev.address]}
    tracker.free_instance("vm-a")  # vanished while assigned: it goes now
    assert tracker.update_devices_from_hypervisor_resources(shrunk).to_json() == {
        "added": [], "updated": [], "removed": [], "kept": []}
    assert tracker.update_devices_from_hypervisor_resources(text).added == [dev.address]


def test_a_sync_after_another_trackers_write_compares_with_what_is_stored(loaded):
    first, second, location = loaded
    devices = host()
    second.update_devices_from_hypervisor_resources(devices)  # second has applied this list
    moved = [dict(d, numa_node=1) if d["address"] == vf_addr(0, 0) else d for d in devices]
    first.update_devices_from_hypervisor_resources(moved)
    report = second.update_devices_from_hypervisor_resources(devices)  # back: second must see first's change
    assert report.updated == [vf_addr(0, 0)]
    assert second.get_device(vf_addr(0, 0)).numa_node == 0
    assert snapshot(open_tracker(location)) == snapshot(second)


def test_another_device_spec_is_matched_again_even_for_the_same_text(state_location):
    tracker = open_tracker(state_location)
    text = json.dumps(host())
    tracker.update_devices_from_hypervisor_resources(text)
    tracker.dev_filter = Whitelist.from_config([{"vendor_id": "8086", "product_id": "0443"}])
    report = tracker.update_devices_from_hypervisor_resources(text)
    assert sorted(d.address for d in tracker.all_devs) == [plain_addr(0), plain_addr(1)]
    assert len(report.removed) == 10


@pytest.mark.parametrize("duplicate", [
    # both outside the device spec, one outside and one in it, and a tracked one twice
    [{"address": "0000:20:00.0", "vendor_id": "15b3", "product_id": "1017"}] * 2,
    [{"address": "0000:20:00.0", "vendor_id": "15b3", "product_id": "1017"},
     {"address": "0000:20:00.0", "vendor_id": "8086", "product_id": "0443"}],
    [{"address": "0000:20:00.0", "vendor_id": "8086", "product_id": "0443"}] * 2,
])
def test_a_device_listed_twice_is_refused_tracked_or_not(state_location, duplicate):
    tracker = open_tracker(state_location)
    tracker.update_devices_from_hypervisor_resources(host())
    before = snapshot(tracker)
    for given in (host() + duplicate, json.dumps(host() + duplicate)):
        with pytest.raises(InvalidDevicesJson, match="0000:20:00.0 is listed twice"):
            tracker.update_devices_from_hypervisor_resources(given)
    assert snapshot(tracker) == before


def test_records_that_look_alike_are_told_apart(state_location):
    """The cache key keeps types apart where == does not (True == 1, 1.0 == 1) and sees nested values."""
    tracker = open_tracker(state_location)
    good = {"address": "0000:20:00.0", "vendor_id": "8086", "product_id": "0443", "iommu_group": 1}
    tracker.update_devices_from_hypervisor_resources([good])
    for bad in (True, 1.0):
        with pytest.raises(InvalidDevicesJson):
            tracker.update_devices_from_hypervisor_resources([dict(good, iommu_group=bad)])
    nested = dict(good, extra_info={"a": [1]})
    assert tracker.update_devices_from_hypervisor_resources([nested]).to_json() == {
        "added": [], "updated": [], "removed": [], "kept": []}
    assert tracker.get_device("0000:20:00.0").iommu_group == 1


@pytest.mark.parametrize("drop", [False, True])
def test_the_same_text_after_another_list_is_compared_again(state_location, drop):
    """The last text's scan is kept; a list synced since then must not make it look applied."""
    tracker = open_tracker(state_location)
    text = json.dumps(host())
    tracker.update_devices_from_hypervisor_resources(text)
    moved = [dict(d, numa_node=1) if d["address"] == vf_addr(0, 1) else d for d in host()
             if not drop or d["address"] != plain_addr(1)]
    tracker.update_devices_from_hypervisor_resources(moved)  # a list, not text
    report = tracker.update_devices_from_hypervisor_resources(text)  # the first text again
    assert (report.added, report.updated, report.removed) == ([plain_addr(1)] if drop else [], [vf_addr(0, 1)], [])
    assert tracker.get_device(vf_addr(0, 1)).numa_node == 0
    assert snapshot(open_tracker(state_location)) == snapshot(tracker)

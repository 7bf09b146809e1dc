"""The host PCI tracker (Nova's ``PciDevTracker``), persisted as it changes.

Same method names as Nova, different durability: Nova keeps an in-memory
"master copy" and flushes it on ``save()``, so a crash between a claim and the
next save loses the claim.  Here every public operation runs inside one
write transaction of the store (SQLite or PostgreSQL, through
:class:`~kvmslots.storage.base.HostDeviceTransaction`): it checks, changes the
devices, writes exactly the rows it changed and commits before it returns.  If anything fails, the
transaction rolls back and the in-memory view is reloaded from the database,
so memory and disk never disagree.  ``save()`` remains, as a no-op, for
callers written against Nova.

Several processes may share one database: every change bumps the host's
generation counter, and an operation acts only on the generation it loaded.
A sync locks the host's row first and reloads if the generation moved; a
claim, an allocation or a free works on what is loaded and writes the new
generation over the old one first thing, so that if another process got in
between it writes nothing, reloads and does the work again (see
``_mutate``).  Many hosts may share one database too: each tracker's rows
carry its ``node_id``, and it reads, locks and writes only those, so hosts
never wait for each other.

Indexes by address and by PF keep every step linear or better (a sync of
4096 VFs touches each device once; Nova searches a list per device).  A sync
looks at each record once: a record seen before is recognised by its exact
contents (a dictionary lookup, no validation), and only the devices whose
record changed are compared, written and relinked; a sync of the very same
JSON text as the last one does not even parse it.  Nothing is read from the
store until the first operation needs it, so opening a tracker costs nothing
however many devices the host has.
"""

from __future__ import annotations

import json
import logging
import operator
import re
import time
from bisect import insort
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from ..errors import InvalidDevicesJson, InvalidPciRequest, PciDeviceRequestFailed, UnknownPciDevice, ValidationError
from ..storage.base import HostChanges, HostDeviceTransaction
from ..store import Store
from .address import DEV_TYPE_PF, DEV_TYPE_VF, canonical_address
from .device import ASSIGNED, HYPERVISOR_FIELDS, PciDevice, PciStatus, device_from_hypervisor, has_32bit_domain
from .devspec import Whitelist
from .request import InstancePciRequest, get_instance_pci_requests
from .stats import PciDeviceStats

__all__ = ["PciDevTracker", "SyncReport", "instance_uuid_of"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_CLAIMED = frozenset({PciStatus.CLAIMED})
_ALLOCATED = frozenset({PciStatus.ALLOCATED})

_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def instance_uuid_of(instance: str | Mapping[str, Any]) -> str:
    """An instance is given as its id or as a mapping with ``uuid`` (Nova's instance dict)."""
    value = instance if type(instance) is str else instance.get("uuid") if isinstance(instance, Mapping) else instance
    if not isinstance(value, str) or not _OWNER_RE.fullmatch(value):
        raise InvalidPciRequest(f"Instance must be an id or a mapping with a 'uuid', got {instance!r}")
    return value


class _Parsed:
    """One validated hypervisor record: its values, its device_spec tags (None: not tracked), and
    their fingerprint.  Never changed once made, and compared by identity: the parse cache hands
    out one object per distinct record, so "the same object" means "the same record"."""

    __slots__ = ("address", "values", "tags", "fingerprint")

    def __init__(self, address: str, values: dict[str, Any], tags: dict[str, str] | None) -> None:
        self.address = address
        self.values = values
        self.tags = tags
        self.fingerprint = _fingerprint_of(values, tags or {}) if values else ()


def _fingerprint_of(values: Mapping[str, Any], tags: Mapping[str, str]) -> tuple[Any, ...]:
    return (*(values[name] for name in HYPERVISOR_FIELDS), tuple(sorted(tags.items())))


_CACHE_FIELDS = (*HYPERVISOR_FIELDS, "compute_node_id", "extra_info")
#: Cached for a record that is skipped (a 32-bit PCI domain): never tracked.
_SKIPPED = _Parsed("", {}, None)


# The key of a flat record (a dict without ``capabilities``), made inline in PciDevTracker._scan:
#     (*record, *record.values(), type(record.get("numa_node")), type(record.get("iommu_group")))
# its keys in order, then its values in the same order, then the types of the two numeric fields (so
# that True or 1.0 never pass for a validated 1; every other field must be a string or null).  Two such
# keys are equal only if their records have the same keys, in the same order, with equal values.  An
# unhashable value (a nested extra_info) makes the lookup raise TypeError: then _cache_key is used.


def _cache_key(raw: Any) -> tuple[Any, ...] | None:
    """A key that identifies any record exactly (nested ``capabilities`` as canonical JSON): its
    keys, values, and the types of the numbers.  None: not cacheable.  Never equal to a flat
    record's key (its first item is a frozenset, a flat key's a string)."""
    if not isinstance(raw, Mapping):
        return None
    try:
        caps = raw.get("capabilities")
        key = (
            frozenset(raw),
            *(raw.get(name) for name in _CACHE_FIELDS),
            type(raw.get("numa_node")),
            type(raw.get("iommu_group")),
            None if caps is None else json.dumps(caps, sort_keys=True),
        )
        hash(key)
    except (TypeError, ValueError, RecursionError):  # unhashable, NaN/huge/odd values, nesting too deep
        return None
    return key


@dataclass
class SyncReport:
    """What a sync did, by address: ``kept`` are assigned devices the host no longer reports
    (kept until freed); ``updated`` includes changes parked on assigned devices."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, list[str]]:
        """The four lists as ``host sync --json`` prints them."""
        return {"added": self.added, "updated": self.updated, "removed": self.removed, "kept": self.kept}


class _Stale(Exception):
    """Another process changed the host since this tracker loaded it: reload and try again."""


class _Scan:
    """A validated device list: the tracked records by address, and those that differ from what
    the tracker has applied (as of ``epoch``: recomputed when the tracker's moved on)."""

    __slots__ = ("reported", "changed", "epoch")

    def __init__(self, reported: dict[str, _Parsed], changed: list[_Parsed], epoch: int) -> None:
        self.reported = reported
        self.changed = changed
        self.epoch = epoch


class _Change:
    """Devices touched by one operation (written together at its end).

    ``whole`` holds the addresses whose hypervisor values or tags changed too (or that are new):
    their whole row is written; for the others only the state columns (status, owner, request,
    parked values, vanished).
    """

    __slots__ = ("_on_touch", "touched", "whole", "deleted", "requests_put", "requests_deleted")

    def __init__(self, on_touch: Callable[[PciDevice], None]) -> None:
        self._on_touch = on_touch
        self.touched: dict[str, PciDevice] = {}
        self.whole: set[str] = set()
        self.deleted: set[str] = set()
        self.requests_put: list[tuple[str, InstancePciRequest]] = []
        self.requests_deleted: set[tuple[str, str]] = set()

    def touch(self, devices: Iterable[PciDevice], *, whole: bool = False) -> None:
        for device in devices:
            self.touched[device.address] = device
            if whole:
                self.whole.add(device.address)
            self._on_touch(device)


class PciDevTracker:
    """Tracks one host's PCI devices and their use by instances (VMs).

    *whitelist* is the operator's ``device_spec``; only matching devices are
    tracked.  *grouping_keys* and *numa_sockets* configure the pools.
    """

    def __init__(
        self,
        store: Store,
        whitelist: Whitelist | None = None,
        *,
        node_id: str = "local",
        grouping_keys: Sequence[str] | None = None,
        numa_sockets: Mapping[int, int] | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.dev_filter = whitelist if whitelist is not None else Whitelist.from_config([])
        self.stats = PciDeviceStats(grouping_keys, numa_sockets)
        self._devs: dict[str, PciDevice] = {}
        self._requests: dict[str, dict[str, InstancePciRequest]] = {}
        self._groups: dict[int, list[PciDevice]] = {}
        self._owners: dict[str, set[str]] = {}  # instance -> addresses it holds (any status)
        self._owner_of: dict[str, str] = {}
        self._fingerprints: dict[str, tuple[Any, ...]] = {}  # address -> hypervisor values + tags
        self._parse_cache: dict[tuple[Any, ...], _Parsed] = {}
        #: address -> the record last synced into that device (its values, or parked as stale): a
        #: sync that reports the same record object again has nothing to do for it.
        self._applied: dict[str, _Parsed] = {}
        self._filter = self.dev_filter  # the device spec the parse cache was matched against
        self._last_text: str | bytes | None = None  # the last JSON text synced, and its scan
        self._last_scan: _Scan | None = None
        self._skip_warned: set[str] = set()  # addresses already warned about (32-bit domains)
        #: The host's generation as loaded; None: nothing loaded yet.  Nothing is read here: the
        #: first operation loads (and looking registers nothing: a host's row comes with its first write).
        self._generation: int | None = None
        #: Counts changes of ``_applied`` (a load, a sync that changed it, a dropped device): a scan's
        #: ``changed`` holds as of one of them.
        self._epoch = 0

    # -- views ----------------------------------------------------------------
    @property
    def pci_stats(self) -> PciDeviceStats:
        """The pools, as the database has them now (another process may have claimed since)."""
        self.refresh()
        return self.stats

    @property
    def all_devs(self) -> list[PciDevice]:
        """Tracked devices, by address."""
        self.refresh()
        return [self._devs[a] for a in sorted(self._devs)]

    def get_device(self, address: str) -> PciDevice:
        """The tracked device at *address* (any spelling of it), as the database has it now;
        :class:`UnknownPciDevice` when there is none."""
        self.refresh()
        return self._get(address)

    def _get(self, address: str) -> PciDevice:
        device = self._devs.get(canonical_address(address))
        if device is None:
            raise UnknownPciDevice(f"No tracked host PCI device at {address}")
        return device

    def get_instance_pci_devs(
        self, instance: str | Mapping[str, Any], request_id: str | None = None
    ) -> list[PciDevice]:
        """Devices claimed or allocated by *instance* for one request.

        ``request_id=None`` gives the devices of generic (flavor alias)
        requests, ``'all'`` every device of the instance, a request id the
        devices that answered that request (the request marker of the OpenStack
        wiki's SR-IOV design, "PCI passthrough SRIOV support").
        """
        self.refresh()
        uuid = instance_uuid_of(instance)
        owned = self._owned_by(uuid, ASSIGNED)
        if request_id == "all":
            return owned
        if request_id is None:
            generic = {r.request_id for r in self._requests_of(uuid) if r.source == "flavor"}
            return [d for d in owned if d.request_id is None or d.request_id in generic]
        return [d for d in owned if d.request_id == request_id]

    def instance_requests(self, instance: str | Mapping[str, Any]) -> list[InstancePciRequest]:
        """The requests an instance's claims answer (kept so the flavor need not be read again)."""
        uuid = instance_uuid_of(instance)
        self.refresh()
        return self._requests_of(uuid)

    def save(self) -> None:
        """Kept for Nova compatibility: every change is already committed when its method returns."""

    def refresh(self) -> None:
        """Reload when another process changed this host's devices."""
        with self.store.reading() as txn:
            if txn.host_generation(self.node_id) != self._generation:
                self._load(txn)

    # -- sync -------------------------------------------------------------------
    def update_devices_from_hypervisor_resources(self, devices_json: str | Sequence[Mapping[str, Any]]) -> SyncReport:
        """Sync with the hypervisor's device list (Nova's JSON).

        The whole list is validated first; a malformed list changes nothing.
        A device with a 32-bit PCI domain (``10000:00:02.0``, behind Intel
        VMD) cannot be assigned: as in Nova it is skipped with a warning and
        the rest is tracked.  Devices that vanish are removed if free; if assigned they are kept
        (with a warning) and removed when freed.  Changed properties of an
        assigned device are parked and applied when it is freed.
        """
        scan = self._scan(devices_json)
        return self._mutate(lambda change: self._sync(scan, change), synced=True)

    def _scan(self, devices_json: str | Sequence[Mapping[str, Any]]) -> _Scan:
        """Validate the list and match it against the device spec; only tracked devices are kept.

        A record seen before (same keys, same values, same types) is not
        validated and matched again: a steady-state sync of thousands of
        devices costs a dictionary lookup per device.  The very same JSON
        text as the last sync's is not parsed again.
        """
        if self.dev_filter is not self._filter:  # another device spec: what was matched is void
            self._filter = self.dev_filter
            self._parse_cache.clear()
            self._last_text = self._last_scan = None
        text = None
        if isinstance(devices_json, (str, bytes)):
            if self._last_scan is not None and devices_json == self._last_text:
                return self._last_scan  # the same text parses the same (changed: see _sync)
            text = devices_json
            try:
                devices_json = json.loads(devices_json)
            except (ValueError, RecursionError) as exc:
                raise InvalidDevicesJson(f"Device list is not valid JSON: {exc}") from None
        if not isinstance(devices_json, list):
            raise InvalidDevicesJson("Device list must be a JSON list of device objects")
        cache = self._parse_cache
        if len(cache) > 4 * len(devices_json) + 1024:
            cache.clear()
        cached = cache.get
        applied = self._applied.get
        reported: dict[str, _Parsed] = {}
        changed: list[_Parsed] = []
        untracked: list[str] = []
        order: list[_Parsed] = []
        tracked = 0
        for raw in devices_json:  # the hot loop of every sync: kept flat
            parsed = None
            key = None
            if type(raw) is dict and raw.get("capabilities") is None:
                key = (*raw, *raw.values(), type(raw.get("numa_node")), type(raw.get("iommu_group")))
                try:
                    parsed = cached(key)
                except TypeError:  # an unhashable value (say a nested extra_info): the general key
                    key = None
            if parsed is None:
                parsed = self._parse_record(raw, key if key is not None else _cache_key(raw))
            order.append(parsed)
            if parsed.tags is not None:
                tracked += 1
                reported[parsed.address] = parsed
                if applied(parsed.address) is not parsed:
                    changed.append(parsed)
            elif parsed is not _SKIPPED:  # else: not in the device_spec, not ours to track
                untracked.append(parsed.address)
        if len(reported) != tracked or (untracked and (
            len(set(untracked)) != len(untracked) or not reported.keys().isdisjoint(untracked)
        )):
            seen: set[str] = set()
            for parsed in order:
                if parsed is not _SKIPPED:
                    if parsed.address in seen:
                        raise InvalidDevicesJson(f"Device {parsed.address} is listed twice")
                    seen.add(parsed.address)
        scan = _Scan(reported, changed, self._epoch)
        if text is not None:
            self._last_text, self._last_scan = text, scan
        return scan

    def _parse_record(self, raw: Any, key: tuple[Any, ...] | None) -> _Parsed:
        """One record not found under its fast key: found under *key*, or validated and matched
        (and cached under *key*, unless None)."""
        if key is not None:
            parsed = self._parse_cache.get(key)
            if parsed is not None:
                return parsed
        try:
            device = device_from_hypervisor(raw)
        except InvalidDevicesJson as exc:
            if not self._skip_wide_domain(raw, exc):
                raise
            if key is not None:
                self._parse_cache[key] = _SKIPPED
            return _SKIPPED
        # capabilities (VPD) only inform the match (remote_managed); they are not kept
        values = device.hypervisor_values()
        tags = self.dev_filter.match({**values, "capabilities": raw.get("capabilities")})
        parsed = _Parsed(device.address, values, None if tags is None else dict(tags))
        if key is not None:
            self._parse_cache[key] = parsed
        return parsed

    def _skip_wide_domain(self, raw: Any, exc: InvalidDevicesJson) -> bool:
        """A record refused because of a 32-bit PCI domain is skipped (warned once per address)."""
        if not isinstance(raw, Mapping):
            return False
        address, parent = raw.get("address"), raw.get("parent_addr")
        if not (has_32bit_domain(address) or has_32bit_domain(parent)):
            return False
        where = f"{address} (parent {parent})" if parent is not None else str(address)
        if where in self._skip_warned:
            log.debug("Skipping PCI device %s reported by the hypervisor: %s", where, exc)
        else:
            if len(self._skip_warned) >= 4096:
                self._skip_warned.clear()
            self._skip_warned.add(where)
            log.warning(
                "Skipping PCI device %s reported by the hypervisor: its PCI domain is above ffff (a 32-bit "
                "domain, e.g. behind Intel VMD, cannot be assigned to a guest)", where,
            )
        return True

    def _fingerprint(self, device: PciDevice) -> tuple[Any, ...]:
        fp = self._fingerprints.get(device.address)
        if fp is None:
            fp = self._fingerprints[device.address] = _fingerprint_of(device.hypervisor_values(), device.tags)
        return fp

    def _sync(self, scan: _Scan, change: _Change) -> SyncReport:
        """Apply a scanned list: only the devices whose record changed, and those no longer reported."""
        report = SyncReport()
        reported, devs, applied = scan.reported, self._devs, self._applied
        if scan.epoch != self._epoch:  # loaded or synced since the scan: compare with what is applied now
            scan.changed = [p for p in reported.values() if applied.get(p.address) is not p]
        new_count = sum(1 for p in scan.changed if p.address not in devs)
        unreported = len(devs) > len(reported) - new_count
        if unreported:  # some tracked devices are no longer reported
            for address in sorted(devs.keys() - reported.keys()):
                existing = devs[address]
                if existing.status in ASSIGNED:
                    report.kept.append(address)
                    if not existing.vanished:
                        log.warning(
                            "PCI device %s is %s by %s but no longer reported by the hypervisor (or no longer in "
                            "device_spec); keeping it until it is freed",
                            address, existing.status.value, existing.instance_uuid,
                        )
                        existing.vanished = True
                        applied.pop(address, None)
                        change.touch([existing])
                else:
                    self._drop(existing, change)
                    report.removed.append(address)
        added: list[PciDevice] = []
        moved: list[tuple[PciDevice, tuple[str, str | None], int | None]] = []
        for new in scan.changed:
            address = new.address
            found = devs.get(address)
            tags = new.tags or {}
            if found is None:
                device = PciDevice(**new.values, tags=dict(tags))
                devs[address] = device
                change.touch([device], whole=True)
                report.added.append(address)
                added.append(device)
            else:
                existing = found
                same = new.fingerprint == self._fingerprint(existing)
                if existing.status in ASSIGNED:
                    stale = None if same else {**new.values, "tags": dict(tags)}
                    if stale != existing.stale or existing.vanished:
                        existing.stale, existing.vanished = stale, False
                        change.touch([existing])
                        if stale is not None:
                            report.updated.append(address)
                elif not same:
                    moved.append((existing, (existing.dev_type, existing.parent_addr), existing.iommu_group))
                    _apply(existing, {**new.values, "tags": dict(tags)})
                    self._fingerprints[address] = new.fingerprint
                    change.touch([existing], whole=True)
                    report.updated.append(address)
            applied[address] = new
        if scan.changed or unreported:
            self._epoch += 1  # other scans must compare again
        scan.changed, scan.epoch = [], self._epoch  # all applied (a failed commit reloads: recomputed then)
        if added or moved:
            self._place(added, moved)
            self._fit_new_relatives_of(list(change.touched.values()))
        report.added.sort()
        report.removed.sort()
        report.kept.sort()
        report.updated.sort()
        return report

    def _place(
        self, added: list[PciDevice], moved: list[tuple[PciDevice, tuple[str, str | None], int | None]]
    ) -> None:
        """Link new and changed devices into the PF/VF tree and the IOMMU groups: one by one when
        few VFs or plain devices came or moved, else by rebuilding the whole tree once."""
        if len(added) + len(moved) > len(self._devs) // 8 or any(
            d.dev_type == DEV_TYPE_PF for d in added
        ) or any(d.dev_type == DEV_TYPE_PF or place[0] == DEV_TYPE_PF for d, place, _ in moved):
            self._build_tree()  # a PF comes or goes: its VFs may be anywhere in the list
            return
        for device in added:
            if device.iommu_group is not None:
                self._groups.setdefault(device.iommu_group, []).append(device)
            self._link(device)
        for device, old_place, old_group in moved:
            self._moved(device, old_place, old_group)

    def _moved(self, device: PciDevice, old_place: tuple[str, str | None], old_group: int | None) -> None:
        """Re-index a device whose IOMMU group, type or PF changed."""
        if device.iommu_group != old_group:
            self._ungroup(device, old_group)
            if device.iommu_group is not None:
                self._groups.setdefault(device.iommu_group, []).append(device)
        if (device.dev_type, device.parent_addr) != old_place:
            self._unlink(device)  # it moved in the PF/VF tree: link it where it is now
            self._link(device)

    def _drop(self, device: PciDevice, change: _Change) -> None:
        """Remove a free device the host no longer reports (removed -> deleted: its row goes)."""
        device.remove()
        self._unlink(device)
        self._ungroup(device, device.iommu_group)
        self._index_owner(device)
        self._fingerprints.pop(device.address, None)
        self._applied.pop(device.address, None)
        self._epoch += 1
        del self._devs[device.address]
        change.touched.pop(device.address, None)
        change.whole.discard(device.address)
        change.deleted.add(device.address)
        self.stats.forget([device.address])

    def _fit_new_relatives_of(self, devices: list[PciDevice]) -> None:
        """A device that (re)appears next to an assigned relative must not look free."""
        for device in devices:
            if device.status is not PciStatus.AVAILABLE:
                continue
            if device.dev_type == DEV_TYPE_VF and device.parent is not None and device.parent.status in ASSIGNED:
                device.status = (
                    PciStatus.UNAVAILABLE if device.parent.status is PciStatus.ALLOCATED else PciStatus.UNCLAIMABLE
                )
            elif device.dev_type == DEV_TYPE_PF:
                used = [vf.status for vf in device.children if vf.status in ASSIGNED]
                if used:
                    device.status = (
                        PciStatus.UNAVAILABLE if PciStatus.ALLOCATED in used else PciStatus.UNCLAIMABLE
                    )

    def _build_tree(self) -> None:
        """Link VFs to their PFs (VFs sorted after their PF by address); index IOMMU groups."""
        groups: dict[int, list[PciDevice]] = {}
        self._groups = groups
        for device in self._devs.values():
            if device.iommu_group is not None:
                members = groups.get(device.iommu_group)
                if members is None:
                    groups[device.iommu_group] = [device]
                else:
                    members.append(device)
            if device.children:
                device.children = []
            device.parent = None
        for address in sorted(self._devs):
            device = self._devs[address]
            if device.dev_type == DEV_TYPE_VF and device.parent_addr is not None:
                parent = self._devs.get(device.parent_addr)
                if parent is not None and parent.dev_type == DEV_TYPE_PF:
                    device.parent = parent
                    parent.children.append(device)

    # -- claims -----------------------------------------------------------------
    def claim_instance(
        self,
        instance: str | Mapping[str, Any],
        pci_requests: Sequence[InstancePciRequest] | None = None,
        numa_cells: Sequence[int] | None = None,
        *,
        _skip_if_claimed: bool = False,
    ) -> list[PciDevice]:
        """Claim devices for all of *instance*'s requests at once, or none of them.

        *pci_requests* default to the instance's own (``pci_requests`` or its
        system metadata); *numa_cells* are the host NUMA nodes of the
        instance's cells (``None``: no NUMA topology).
        """
        uuid = instance_uuid_of(instance)
        if pci_requests is None:
            pci_requests = _requests_from_instance(instance)
        if type(pci_requests) is not list and (
            isinstance(pci_requests, (str, bytes, Mapping)) or not isinstance(pci_requests, Iterable)
        ):
            raise InvalidPciRequest(
                f"pci_requests must be a list of InstancePciRequest, got {type(pci_requests).__name__}"
            )
        requests = list(pci_requests)
        if not all(isinstance(r, InstancePciRequest) for r in requests):
            raise InvalidPciRequest("pci_requests must hold InstancePciRequest objects")
        if not requests:
            return []
        ids = [r.request_id for r in requests if r.request_id is not None]
        if len(ids) != len(set(ids)):
            raise InvalidPciRequest("Two PCI requests of one claim share a request_id")

        def claim(change: _Change) -> list[PciDevice]:
            if _skip_if_claimed and self._owned_by(uuid, _CLAIMED):
                return []  # already claimed on this host
            taken = self._requests.get(uuid, {})
            again = [rid for rid in ids if rid in taken]
            if again:
                raise PciDeviceRequestFailed(f"Instance {uuid} already holds a claim for request(s) {again}")
            claimed: list[PciDevice] = []
            plan = self.stats.plan(requests, numa_cells, allowed=lambda d: self._group_free_for(d, uuid))
            for request, devices in zip(requests, plan):
                for device in devices:
                    change.touch(device.claim(uuid, request.request_id))
                    claimed.append(device)
                if request.request_id is not None:
                    change.requests_put.append((uuid, request))
                    self._requests.setdefault(uuid, {})[request.request_id] = request
            if numa_cells and any(d.numa_node is None for d in claimed):
                log.warning("Assigning a PCI device without NUMA affinity to instance %s with a NUMA topology", uuid)
            return claimed

        return self._mutate(claim)

    def allocate_instance(self, instance: str | Mapping[str, Any]) -> list[PciDevice]:
        """Turn the instance's claims into allocations (the VM now uses them)."""
        uuid = instance_uuid_of(instance)

        def allocate(change: _Change) -> list[PciDevice]:
            devices = self._owned_by(uuid, _CLAIMED)
            for device in devices:
                change.touch(device.allocate(uuid))
            return devices

        return self._mutate(allocate)

    def allocate_device(self, dev: PciDevice | str, instance: str | Mapping[str, Any]) -> list[PciDevice]:
        """Allocate one device the instance has claimed (a hot-plugged passthrough device)."""
        uuid = instance_uuid_of(instance)
        address = dev.address if isinstance(dev, PciDevice) else canonical_address(dev)

        def allocate(change: _Change) -> list[PciDevice]:
            changed = self._get(address).allocate(uuid)
            change.touch(changed)
            return changed

        return self._mutate(allocate)

    def free_instance(self, instance: str | Mapping[str, Any]) -> list[PciDevice]:
        """Free every device claimed or allocated by *instance*."""
        uuid = instance_uuid_of(instance)
        return self._mutate(lambda change: self._free_owned(uuid, ASSIGNED, change))

    def free_instance_claims(self, instance: str | Mapping[str, Any]) -> list[PciDevice]:
        """Free only what *instance* has claimed (not allocated)."""
        uuid = instance_uuid_of(instance)
        return self._mutate(lambda change: self._free_owned(uuid, _CLAIMED, change))

    def free_instance_allocations(self, instance: str | Mapping[str, Any]) -> list[PciDevice]:
        """Free only what *instance* has allocated (not claimed), as Nova's method of that name."""
        uuid = instance_uuid_of(instance)
        return self._mutate(lambda change: self._free_owned(uuid, _ALLOCATED, change))

    def free_device(self, dev: PciDevice | str, instance: str | Mapping[str, Any]) -> list[PciDevice]:
        """Free one device of *instance* (a device object or its address)."""
        uuid = instance_uuid_of(instance)
        address = dev.address if isinstance(dev, PciDevice) else canonical_address(dev)

        def free(change: _Change) -> list[PciDevice]:
            device = self._get(address)
            freed = self._free_one(device, uuid, change)
            self._forget_requests({uuid}, change)
            return freed

        return self._mutate(free)

    def update_pci_for_instance(self, instance: str | Mapping[str, Any], sign: int) -> list[PciDevice]:
        """``sign=1``: allocate the instance's claims; ``sign=-1``: free all its devices."""
        if sign == 1:
            return self.allocate_instance(instance)
        if sign == -1:
            return self.free_instance(instance)
        raise InvalidPciRequest(f"sign must be 1 or -1, got {sign!r}")

    def update_pci_for_migration(self, instance: str | Mapping[str, Any], sign: int = 1) -> list[PciDevice]:
        """On the destination host: ``sign=1`` claims for the incoming instance, ``-1`` drops that claim."""
        if sign == 1:
            # Nova claims the new flavor's requests (kept under the 'new_' prefix during a
            # resize), and only when the instance holds no claim here yet.
            requests = _requests_from_instance(instance, "new_") or _requests_from_instance(instance)
            return self.claim_instance(instance, requests, _skip_if_claimed=True)
        if sign == -1:
            return self.free_instance_claims(instance)
        raise InvalidPciRequest(f"sign must be 1 or -1, got {sign!r}")

    def clean_usage(
        self,
        instances: Iterable[str | Mapping[str, Any]],
        migrations: Iterable[Mapping[str, Any]],
        orphans: Iterable[str | Mapping[str, Any]],
    ) -> list[PciDevice]:
        """Free the devices of every instance not named in *instances*, *migrations* or *orphans*."""
        keep = {instance_uuid_of(i) for i in _iterable(instances, "instances")}
        for migration in _iterable(migrations, "migrations"):
            if not isinstance(migration, Mapping):
                raise InvalidPciRequest(f"Each migration must be a mapping with 'instance_uuid', got {migration!r}")
            keep.add(instance_uuid_of(migration.get("instance_uuid", "")))
        keep |= {instance_uuid_of(o) for o in _iterable(orphans, "orphans")}

        def clean(change: _Change) -> list[PciDevice]:
            # one pass to find what to free: O(devices), however many instances there are
            doomed = [
                d for owner in sorted(set(self._owners) - keep) for d in self._owned_by(owner, ASSIGNED)
            ]
            freed: list[PciDevice] = []
            for device in doomed:
                freed += self._free_one(device, str(device.instance_uuid), change)
            self._forget_requests({str(d.instance_uuid) for d in doomed} | set(self._requests) - keep, change)
            return freed

        return self._mutate(clean)

    # -- internals --------------------------------------------------------------
    def _free_owned(self, uuid: str, states: frozenset[PciStatus], change: _Change) -> list[PciDevice]:
        freed: list[PciDevice] = []
        for device in self._owned_by(uuid, states):
            freed += self._free_one(device, uuid, change)
        self._forget_requests((uuid,), change)
        return freed

    def _free_one(self, device: PciDevice, uuid: str, change: _Change) -> list[PciDevice]:
        changed = device.free(uuid)
        change.touch(changed)
        if device.vanished:
            device.vanished = False
            device.stale = None
            self._drop(device, change)
            return [d for d in changed if d is not device]  # gone (its relatives stay)
        elif device.stale is not None:
            old_place, old_group = (device.dev_type, device.parent_addr), device.iommu_group
            _apply(device, device.stale)  # the values its last sync parked (self._applied still holds)
            device.stale = None
            self._fingerprints.pop(device.address, None)
            change.touch([device], whole=True)
            self._moved(device, old_place, old_group)
            if (device.dev_type, device.parent_addr) != old_place:
                self._fit_new_relatives_of([device])
        return changed

    def _ungroup(self, device: PciDevice, group: int | None) -> None:
        members = self._groups.get(group) if group is not None else None
        if members is not None:
            members[:] = [m for m in members if m is not device]
            if not members:
                del self._groups[group]  # type: ignore[arg-type]

    def _unlink(self, device: PciDevice) -> None:
        if device.parent is not None:
            device.parent.children = [c for c in device.parent.children if c is not device]
            device.parent = None
        for child in device.children:
            child.parent = None
        device.children = []

    def _link(self, device: PciDevice) -> None:
        if device.dev_type == DEV_TYPE_VF and device.parent_addr is not None:
            parent = self._devs.get(device.parent_addr)
            if parent is not None and parent.dev_type == DEV_TYPE_PF:
                device.parent = parent
                insort(parent.children, device, key=_address)
        elif device.dev_type == DEV_TYPE_PF:
            device.children = sorted(
                (d for d in self._devs.values() if d.dev_type == DEV_TYPE_VF and d.parent_addr == device.address),
                key=lambda d: d.address,
            )
            for child in device.children:
                child.parent = device

    def _group_free_for(self, device: PciDevice, uuid: str) -> bool:
        """VFIO gives a whole IOMMU group to one VM: no other instance may hold a device of it."""
        if device.iommu_group is None:
            return True
        members = self._groups.get(device.iommu_group, ())
        if len(members) == 1 and members[0] is device:  # a group of its own (most VFs)
            return True
        return all(
            m.instance_uuid in (None, uuid) or m.status not in ASSIGNED
            for m in self._groups.get(device.iommu_group, ())
            if m is not device
        )

    def _owned_by(self, uuid: str, states: frozenset[PciStatus]) -> list[PciDevice]:
        """The instance's devices in *states*, by address (from the owner index: no scan)."""
        owned = self._owners.get(uuid)
        if not owned:
            return []
        devs = self._devs
        return [d for d in map(devs.__getitem__, sorted(owned)) if d.status in states]

    def _index_owner(self, device: PciDevice) -> None:
        address, new = device.address, device.instance_uuid
        old = self._owner_of.get(address)
        if old == new:
            return
        if old is not None:
            self._owners[old].discard(address)
            if not self._owners[old]:
                del self._owners[old]
            del self._owner_of[address]
        if new is not None:
            self._owners.setdefault(new, set()).add(address)
            self._owner_of[address] = new

    def _requests_of(self, uuid: str) -> list[InstancePciRequest]:
        return [self._requests[uuid][rid] for rid in sorted(self._requests.get(uuid, {}))]

    def _forget_requests(self, uuids: Iterable[str], change: _Change) -> None:
        """Drop each stored request of these instances that no device answers any more."""
        for uuid in uuids:
            stored = self._requests.get(uuid)
            if not stored:
                continue
            answered = {self._devs[a].request_id for a in self._owners.get(uuid, ())}
            for request_id in [r for r in stored if r not in answered]:
                del stored[request_id]
                change.requests_deleted.add((uuid, request_id))
            if not stored:
                del self._requests[uuid]

    def _mutate(self, work: Callable[[_Change], T], *, synced: bool = False, lock: bool = False) -> T:
        """Run *work* and persist what it changed in one transaction; on failure reload from the store.

        A sync (or *lock*) locks the host's row first and reloads if its
        generation moved.  A claim, an allocation or a free works on what is
        loaded and checks the generation as it writes: the host's new
        generation is written first, and only over the one the work started
        from (SQLite's ``BEGIN IMMEDIATE`` has kept every other writer out
        since; on PostgreSQL the row is locked from then on, before any device
        row, as a sync takes them).  If another process changed the host in
        between, nothing is written, the host is reloaded and the work is done
        again with the row locked first.  An operation that changes nothing,
        or refuses, compares the generation too.  Either way two processes
        never change one host's devices at once, and other hosts are not
        blocked.  A tracker's first operation loads the host in a read
        transaction beforehand, so no writer waits for that load.
        """
        if self._generation is None:
            self._reload()
        optimistic = not (synced or lock)
        try:
            with self.store.transaction() as txn:
                if not optimistic and txn.lock_host(self.node_id, self.stats.numa_sockets) != self._generation:
                    self._load(txn)
                expected = self._generation if optimistic else None
                change = _Change(self._index_owner)
                try:
                    result = work(change)
                except Exception:
                    if expected is not None and txn.host_generation(self.node_id) != expected:
                        raise _Stale from None  # refused from an old view: ask again
                    raise
                if not self._flush(txn, change, expected):
                    raise _Stale
                if synced:
                    txn.mark_synced(self.node_id, time.time())
        except _Stale:  # rolled back: load again (memory may hold the work's changes), then lock the row first
            self._generation = None
            return self._mutate(work, synced=synced, lock=True)
        except BaseException:
            self._reload()
            raise
        if change.touched:
            self.stats.update(change.touched.values())
        return result

    def _flush(self, txn: HostDeviceTransaction, change: _Change, expected: int | None) -> bool:
        """Write what *change* holds; False if the host's generation is no longer *expected* (then
        nothing was written).  ``expected`` None: the row is locked and the generation current."""
        touched, whole = change.touched, change.whole
        if not (touched or change.deleted or change.requests_put or change.requests_deleted):
            # nothing to write, and no new generation for other processes to reload for
            return expected is None or txn.host_generation(self.node_id) == expected
        assert self._generation is not None  # loaded
        written = txn.write_host_changes(
            self.node_id,
            HostChanges(
                put=[d for a, d in touched.items() if a in whole] if whole else [],
                states=[d for a, d in touched.items() if a not in whole] if whole else list(touched.values()),
                deleted=change.deleted,
                requests_put=change.requests_put,
                requests_deleted=change.requests_deleted,
                generation=self._generation + 1,
                previous=expected,
            ),
        )
        if written:
            self._generation += 1
        return written

    def _reload(self) -> None:
        with self.store.reading() as txn:
            self._load(txn)

    def _load(self, txn: HostDeviceTransaction) -> None:
        devices, requests = txn.load_host(self.node_id)
        self._devs = {device.address: device for device in devices}
        self._build_tree()
        self.stats.clear()
        self.stats.update(self._devs.values())
        self._owners, self._owner_of = {}, {}
        for device in self._devs.values():
            if device.instance_uuid is not None:
                self._index_owner(device)
        self._fingerprints = {}
        self._applied = {}
        self._epoch += 1
        self._requests = {}
        for uuid, request in requests:
            if request.request_id is not None:
                self._requests.setdefault(uuid, {})[request.request_id] = request
        self._generation = txn.host_generation(self.node_id)


_address = operator.attrgetter("address")


def _apply(device: PciDevice, values: Mapping[str, Any]) -> None:
    for name in HYPERVISOR_FIELDS:
        if name in values:
            setattr(device, name, values[name])
    if "tags" in values:
        device.tags = dict(values["tags"])


def _iterable(value: Any, what: str) -> Iterable[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidPciRequest(f"{what} must be a list, got {type(value).__name__}")
    return value


def _requests_from_instance(instance: str | Mapping[str, Any], prefix: str = "") -> list[InstancePciRequest]:
    if not isinstance(instance, Mapping):
        return []
    if prefix:
        return get_instance_pci_requests(instance, prefix) if "system_metadata" in instance else []
    given = instance.get("pci_requests")
    if given is not None:
        try:
            return [
                r if isinstance(r, InstancePciRequest)
                else InstancePciRequest.from_json(r) if isinstance(r, (str, bytes))
                else InstancePciRequest.from_dict(r)
                for r in given
            ]
        except (ValidationError, TypeError, AttributeError) as exc:
            raise InvalidPciRequest(f"Bad pci_requests of instance {instance.get('uuid')!r}: {exc}") from None
    return get_instance_pci_requests(instance)

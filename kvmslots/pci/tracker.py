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

Several processes may share one database: each operation first locks its
host's row, compares the host's generation counter and reloads when another
process changed the devices.  Many hosts may share one database too: each
tracker's rows carry its ``node_id``, and it reads, locks and writes only
those, so hosts never wait for each other.

Indexes by address and by PF keep every step linear or better (a sync of
4096 VFs touches each device once; Nova searches a list per device).
"""

from __future__ import annotations

import json
import logging
import re
import time
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

_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def instance_uuid_of(instance: str | Mapping[str, Any]) -> str:
    """An instance is given as its id or as a mapping with ``uuid`` (Nova's instance dict)."""
    value = instance.get("uuid") if isinstance(instance, Mapping) else instance
    if not isinstance(value, str) or not _OWNER_RE.fullmatch(value):
        raise InvalidPciRequest(f"Instance must be an id or a mapping with a 'uuid', got {instance!r}")
    return value


@dataclass(frozen=True)
class _Parsed:
    """One validated hypervisor record: its values, its device_spec tags (None: not tracked)."""

    address: str
    values: dict[str, Any]
    tags: dict[str, str] | None

    @property
    def fingerprint(self) -> tuple[Any, ...]:
        return _fingerprint_of(self.values, self.tags or {})


def _fingerprint_of(values: Mapping[str, Any], tags: Mapping[str, str]) -> tuple[Any, ...]:
    return (*(values[name] for name in HYPERVISOR_FIELDS), tuple(sorted(tags.items())))


_CACHE_FIELDS = (*HYPERVISOR_FIELDS, "compute_node_id", "extra_info")
#: Cached for a record that is skipped (a 32-bit PCI domain): never tracked.
_SKIPPED = _Parsed("", {}, None)


def _cache_key(raw: Any) -> tuple[Any, ...] | None:
    """A key that identifies a record exactly: its keys, values, and the types of the numbers
    (so that True or 1.0 never pass for a validated 1).  None: not cacheable."""
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
        return {"added": self.added, "updated": self.updated, "removed": self.removed, "kept": self.kept}


class _Change:
    """Devices touched by one operation (written together at its end)."""

    def __init__(self, on_touch: Callable[[PciDevice], None]) -> None:
        self._on_touch = on_touch
        self.touched: dict[str, PciDevice] = {}
        self.deleted: set[str] = set()
        self.requests_put: list[tuple[str, InstancePciRequest]] = []
        self.requests_deleted: set[tuple[str, str]] = set()

    def touch(self, devices: Iterable[PciDevice]) -> None:
        for device in devices:
            self.touched[device.address] = device
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
        self._skip_warned: set[str] = set()  # addresses already warned about (32-bit domains)
        self._generation = -1
        with store.reading() as txn:  # looking registers nothing: a host's row comes with its first write
            self._load(txn)

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
        return self._requests_of(instance_uuid_of(instance))

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
        reported = self._parse_devices_json(devices_json)
        return self._mutate(lambda change: self._sync(reported, change), synced=True)

    def _parse_devices_json(self, devices_json: str | Sequence[Mapping[str, Any]]) -> dict[str, _Parsed]:
        """Validate the list and match it against the device spec; only tracked devices are returned.

        A record seen before (same keys, same values, same types) is not
        validated and matched again: a steady-state sync of thousands of
        devices costs a dictionary lookup per device.
        """
        if isinstance(devices_json, (str, bytes)):
            try:
                devices_json = json.loads(devices_json)
            except (ValueError, RecursionError) as exc:
                raise InvalidDevicesJson(f"Device list is not valid JSON: {exc}") from None
        if not isinstance(devices_json, list):
            raise InvalidDevicesJson("Device list must be a JSON list of device objects")
        if len(self._parse_cache) > 4 * len(devices_json) + 1024:
            self._parse_cache.clear()
        reported: dict[str, _Parsed] = {}
        seen: set[str] = set()
        for raw in devices_json:
            key = _cache_key(raw)
            parsed = self._parse_cache.get(key) if key is not None else None
            if parsed is None:
                try:
                    device = device_from_hypervisor(raw)
                except InvalidDevicesJson as exc:
                    if not self._skip_wide_domain(raw, exc):
                        raise
                    if key is not None:
                        self._parse_cache[key] = _SKIPPED
                    continue
                # capabilities (VPD) only inform the match (remote_managed); they are not kept
                tags = self.dev_filter.match({**device.hypervisor_values(), "capabilities": raw.get("capabilities")})
                values = device.hypervisor_values()
                parsed = _Parsed(device.address, values, None if tags is None else dict(tags))
                if key is not None:
                    self._parse_cache[key] = parsed
            if parsed is _SKIPPED:
                continue
            if parsed.address in seen:
                raise InvalidDevicesJson(f"Device {parsed.address} is listed twice")
            seen.add(parsed.address)
            if parsed.tags is not None:  # else: not in the device_spec, not ours to track
                reported[parsed.address] = parsed
        return reported

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

    def _sync(self, reported: dict[str, _Parsed], change: _Change) -> SyncReport:
        report = SyncReport()
        for address in [a for a in self._devs if a not in reported]:
            existing = self._devs[address]
            if existing.status in ASSIGNED:
                report.kept.append(address)
                if not existing.vanished:
                    log.warning(
                        "PCI device %s is %s by %s but no longer reported by the hypervisor (or no longer in "
                        "device_spec); keeping it until it is freed",
                        address, existing.status.value, existing.instance_uuid,
                    )
                    existing.vanished = True
                    change.touch([existing])
            else:
                self._drop(existing, change)
                report.removed.append(address)
        for address, new in reported.items():
            found = self._devs.get(address)
            if found is None:
                device = PciDevice(**new.values, tags=dict(new.tags or {}))
                self._devs[address] = device
                change.touch([device])
                report.added.append(address)
                continue
            existing = found
            same = new.fingerprint == self._fingerprint(existing)
            if existing.status in ASSIGNED:
                stale = None if same else {**new.values, "tags": dict(new.tags or {})}
                if stale != existing.stale or existing.vanished:
                    existing.stale, existing.vanished = stale, False
                    change.touch([existing])
                    if stale is not None:
                        report.updated.append(address)
            elif not same:
                _apply(existing, {**new.values, "tags": dict(new.tags or {})})
                self._fingerprints[address] = new.fingerprint
                change.touch([existing])
                report.updated.append(address)
        if change.touched or change.deleted:  # a steady sync changes nothing: no tree to rebuild
            self._build_tree()
            self._fit_new_relatives(change)
        report.added.sort()
        report.removed.sort()
        report.kept.sort()
        report.updated.sort()
        return report

    def _drop(self, device: PciDevice, change: _Change) -> None:
        """Remove a free device the host no longer reports (removed -> deleted: its row goes)."""
        device.remove()
        self._unlink(device)
        self._ungroup(device, device.iommu_group)
        self._index_owner(device)
        self._fingerprints.pop(device.address, None)
        del self._devs[device.address]
        change.touched.pop(device.address, None)
        change.deleted.add(device.address)
        self.stats.forget([device.address])

    def _fit_new_relatives(self, change: _Change) -> None:
        self._fit_new_relatives_of(list(change.touched.values()))

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
        self._groups = {}
        for device in self._devs.values():
            if device.iommu_group is not None:
                self._groups.setdefault(device.iommu_group, []).append(device)
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
        if isinstance(pci_requests, (str, bytes, Mapping)) or not isinstance(pci_requests, Iterable):
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
            if _skip_if_claimed and self._owned_by(uuid, {PciStatus.CLAIMED}):
                return []  # already claimed on this host
            taken = {r.request_id for r in self._requests_of(uuid)}
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
            devices = self._owned_by(uuid, {PciStatus.CLAIMED})
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
        return self._mutate(lambda change: self._free_owned(uuid, {PciStatus.CLAIMED}, change))

    def free_instance_allocations(self, instance: str | Mapping[str, Any]) -> list[PciDevice]:
        """Free only what *instance* has allocated (not claimed), as Nova's method of that name."""
        uuid = instance_uuid_of(instance)
        return self._mutate(lambda change: self._free_owned(uuid, {PciStatus.ALLOCATED}, change))

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
    def _free_owned(self, uuid: str, states: Iterable[PciStatus], change: _Change) -> list[PciDevice]:
        states = frozenset(states)
        freed: list[PciDevice] = []
        for device in self._owned_by(uuid, states):
            freed += self._free_one(device, uuid, change)
        self._forget_requests({uuid}, change)
        return freed

    def _free_one(self, device: PciDevice, uuid: str, change: _Change) -> list[PciDevice]:
        changed = device.free(uuid)
        change.touch(changed)
        if device.vanished:
            device.vanished = False
            device.stale = None
            self._drop(device, change)
        elif device.stale is not None:
            old_place, old_group = (device.dev_type, device.parent_addr), device.iommu_group
            _apply(device, device.stale)
            device.stale = None
            self._fingerprints.pop(device.address, None)
            if device.iommu_group != old_group:
                self._ungroup(device, old_group)
                if device.iommu_group is not None:
                    self._groups.setdefault(device.iommu_group, []).append(device)
            if (device.dev_type, device.parent_addr) != old_place:
                self._unlink(device)  # it moved in the PF/VF tree: link it where it is now
                self._link(device)
                self._fit_new_relatives_of([device])
        return [d for d in changed if d.address in self._devs]

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
                parent.children = sorted([*parent.children, device], key=lambda d: d.address)
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
        return all(
            m.instance_uuid in (None, uuid) or m.status not in ASSIGNED
            for m in self._groups.get(device.iommu_group, ())
            if m is not device
        )

    def _owned_by(self, uuid: str, states: Iterable[PciStatus]) -> list[PciDevice]:
        """The instance's devices in *states*, by address (from the owner index: no scan)."""
        wanted = frozenset(states)
        found = (self._devs[a] for a in sorted(self._owners.get(uuid, ())))
        return [d for d in found if d.status in wanted]

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

    def _forget_requests(self, uuids: set[str], change: _Change) -> None:
        """Drop each stored request of these instances that no device answers any more."""
        uuids = {u for u in uuids if u in self._requests}
        if not uuids:
            return
        held = {(u, self._devs[a].request_id) for u in uuids for a in self._owners.get(u, ())}
        for uuid in uuids:
            for request_id in [r for r in self._requests[uuid] if (uuid, r) not in held]:
                del self._requests[uuid][request_id]
                change.requests_deleted.add((uuid, request_id))
            if not self._requests[uuid]:
                del self._requests[uuid]

    def _mutate(self, work: Callable[[_Change], T], *, synced: bool = False) -> T:
        """Run *work* and persist what it changed in one transaction; on failure reload from the store.

        The host's row is locked first (its generation read), so two processes
        never change one host's devices at once; other hosts are not blocked.
        """
        try:
            with self.store.transaction() as txn:
                if txn.lock_host(self.node_id, self.stats.numa_sockets) != self._generation:
                    self._load(txn)
                change = _Change(self._index_owner)
                result = work(change)
                self._flush(txn, change)
                if synced:
                    txn.mark_synced(self.node_id, time.time())
        except BaseException:
            self._reload()
            raise
        self.stats.update(change.touched.values())
        return result

    def _flush(self, txn: HostDeviceTransaction, change: _Change) -> None:
        changed = bool(change.touched or change.deleted or change.requests_put or change.requests_deleted)
        if changed:
            self._generation += 1  # lock_host read the current one: no other writer since
        txn.write_host_changes(
            self.node_id,
            HostChanges(
                put=list(change.touched.values()),
                deleted=change.deleted,
                requests_put=change.requests_put,
                requests_deleted=change.requests_deleted,
                generation=self._generation if changed else None,
            ),
        )

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
            self._index_owner(device)
        self._fingerprints = {}
        self._requests = {}
        for uuid, request in requests:
            if request.request_id is not None:
                self._requests.setdefault(uuid, {})[request.request_id] = request
        self._generation = txn.host_generation(self.node_id)


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

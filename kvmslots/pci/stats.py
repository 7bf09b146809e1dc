"""Pools of free host devices (Nova's ``PciDeviceStats``).

Devices that are ``available`` sit in pools keyed by vendor, product, NUMA
node, device type, their grouping tags and, for VFs, their PF.  A pool's
``count`` is the number of its free devices, kept exact by moving a device in
or out whenever its status changes (O(1) per device; Nova rebuilds and
deep-copies pools instead).

:meth:`PciDeviceStats.plan` answers a set of requests all or nothing: it picks
devices without changing anything, honouring NUMA policies and the SR-IOV
rule that a PF and any of its VFs are never both handed out; the tracker then
claims what was picked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from ..errors import PciDeviceRequestFailed
from .address import DEV_TYPE_PF, DEV_TYPE_VF
from .device import PciDevice, PciStatus
from .request import values_match

__all__ = ["Pool", "PciDeviceStats", "NUMA_POLICIES", "PoolKey"]

NUMA_POLICIES = ("required", "legacy", "preferred", "socket")
_DEVICE_KEYS = ("vendor_id", "product_id", "dev_type")

PoolKey = tuple[str, str, int | None, str, str | None, tuple[tuple[str, str], ...]]


@dataclass
class Pool:
    """Free devices that are interchangeable for a request."""

    vendor_id: str
    product_id: str
    numa_node: int | None
    dev_type: str
    parent_addr: str | None
    tags: dict[str, str]
    devices: dict[str, PciDevice] = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return len(self.devices)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "vendor_id": self.vendor_id,
            "product_id": self.product_id,
            "numa_node": self.numa_node,
            "dev_type": self.dev_type,
            "count": self.count,
        }
        if self.parent_addr is not None:
            out["parent_addr"] = self.parent_addr
        out.update(self.tags)
        return out


class PciDeviceStats:
    """The pools of one host.

    *grouping_keys* names the tags that split pools (seed 004's
    ``pci_grouping_key``); ``None`` groups by every tag.  *numa_sockets*
    maps host NUMA node -> socket, for the ``socket`` policy.
    """

    def __init__(
        self, grouping_keys: Sequence[str] | None = None, numa_sockets: Mapping[int, int] | None = None
    ) -> None:
        self.grouping_keys = None if grouping_keys is None else frozenset(grouping_keys)
        self.numa_sockets = dict(numa_sockets or {})
        self._pools: dict[PoolKey, Pool] = {}
        self._where: dict[str, PoolKey] = {}
        self._by_ids: dict[tuple[str, str], set[PoolKey]] = {}  # (vendor, product) -> pool keys
        self._order: list[PoolKey] | None = None  # sorted pool keys, rebuilt when pools come or go

    # -- membership -------------------------------------------------------------
    def _key(self, device: PciDevice) -> PoolKey:
        tags = [(k, v) for k, v in device.tags.items() if self.grouping_keys is None or k in self.grouping_keys]
        parent = device.parent_addr if device.dev_type == DEV_TYPE_VF else None
        return (device.vendor_id, device.product_id, device.numa_node, device.dev_type, parent, tuple(sorted(tags)))

    def update(self, devices: Iterable[PciDevice]) -> None:
        """Put each device where its status says: in its pool when available, else nowhere."""
        for device in devices:
            self._discard(device.address)
            if device.status is PciStatus.AVAILABLE:
                key = self._key(device)
                pool = self._pools.get(key)
                if pool is None:
                    vendor, product, numa, dev_type, parent, tags = key
                    pool = self._pools[key] = Pool(vendor, product, numa, dev_type, parent, dict(tags))
                    self._by_ids.setdefault((vendor, product), set()).add(key)
                    self._order = None
                pool.devices[device.address] = device
                self._where[device.address] = key

    def forget(self, addresses: Iterable[str]) -> None:
        for address in addresses:
            self._discard(address)

    def _discard(self, address: str) -> None:
        key = self._where.pop(address, None)
        if key is not None:
            pool = self._pools[key]
            del pool.devices[address]
            if not pool.devices:
                del self._pools[key]
                self._by_ids[key[:2]].discard(key)
                self._order = None

    def clear(self) -> None:
        self._pools.clear()
        self._where.clear()
        self._by_ids.clear()
        self._order = None

    # -- views ----------------------------------------------------------------
    @property
    def pools(self) -> list[Pool]:
        """Non-empty pools in a stable order."""
        return [self._pools[key] for key in self._sorted_keys()]

    def _sorted_keys(self) -> list[PoolKey]:
        if self._order is None:
            self._order = sorted(self._pools, key=_sortable)
        return self._order

    def __iter__(self) -> Any:
        return iter(pool.describe() for pool in self.pools)

    def free_count(self) -> int:
        return len(self._where)

    # -- requests ---------------------------------------------------------------
    def support_requests(self, requests: Sequence[Any], numa_cells: Sequence[int] | None = None) -> bool:
        """Could these requests be met together right now? (Changes nothing.)"""
        try:
            self.plan(requests, numa_cells)
        except PciDeviceRequestFailed:
            return False
        return True

    def plan(
        self,
        requests: Sequence[Any],
        numa_cells: Sequence[int] | None = None,
        allowed: Callable[[PciDevice], bool] | None = None,
    ) -> list[list[PciDevice]]:
        """Pick devices for every request, all or nothing; the i-th list answers the i-th request.

        Greedy in a stable order (like Nova), with one guarantee Nova lacks:
        a device, or a PF together with one of its VFs, is never picked twice
        across the requests of one claim.  *allowed* can veto devices (the
        tracker uses it for IOMMU groups).
        """
        excluded: set[str] = set()
        answer: list[list[PciDevice]] = []
        for request in requests:
            picked: list[PciDevice] = []
            for pool, alternatives in self._candidates(request, numa_cells):
                for address in sorted(pool.devices):  # address order: a reopened tracker picks the same
                    device = pool.devices[address]
                    if len(picked) == request.count:
                        break
                    if device.address in excluded or not _tags_match(alternatives, device):
                        continue
                    if allowed is not None and not allowed(device):
                        continue
                    picked.append(device)
                    excluded.add(device.address)
                    excluded.update(_relatives(device))
                if len(picked) == request.count:
                    break
            if len(picked) < request.count:
                name = request.alias_name or request.request_id or "request"
                raise PciDeviceRequestFailed(
                    f"PCI request {name!r} for {request.count} device(s) cannot be met: "
                    f"{len(picked)} matching device(s) free (policy {request.numa_policy}, NUMA cells {numa_cells})"
                )
            answer.append(picked)
        return answer

    def _candidates(
        self, request: Any, numa_cells: Sequence[int] | None
    ) -> Iterator[tuple[Pool, list[Mapping[str, str]]]]:
        """Matching pools in order, lazily: a claim usually stops at the first one."""
        found = self._matching(request, numa_cells)
        if request.numa_policy == "preferred" and numa_cells is not None:
            cells = set(numa_cells)
            return iter(sorted(
                found, key=lambda item: 0 if item[0].numa_node in cells else 1 if item[0].numa_node is None else 2
            ))
        return found

    def _matching(
        self, request: Any, numa_cells: Sequence[int] | None
    ) -> Iterator[tuple[Pool, list[Mapping[str, str]]]]:
        for pool in self._pools_for(request.spec):
            alternatives = [alt for alt in request.spec if _pool_matches(alt, pool, self.grouping_keys)]
            if not alternatives:
                continue
            if pool.dev_type == DEV_TYPE_PF and not any(alt.get("dev_type") == DEV_TYPE_PF for alt in alternatives):
                continue  # a PF pool serves only requests that ask for a PF
            if self._numa_allows(request.numa_policy, pool.numa_node, numa_cells):
                yield pool, alternatives

    def _pools_for(self, alternatives: Sequence[Mapping[str, str]]) -> list[Pool]:
        """Pools that could match: by (vendor, product) when every alternative names both
        exactly (lowercase hex, as ids are stored), else every pool."""
        ids = [(alt.get("vendor_id"), alt.get("product_id")) for alt in alternatives]
        keys: set[PoolKey] = set()
        for vendor, product in ids:
            if not (vendor and product and vendor == vendor.lower() and product == product.lower()):
                return self.pools
            keys |= self._by_ids.get((vendor, product), set())
        return [self._pools[key] for key in sorted(keys, key=_sortable)]

    def _numa_allows(self, policy: str, node: int | None, cells: Sequence[int] | None) -> bool:
        if cells is None or policy == "preferred":
            return True
        if policy == "required":
            return node in cells
        if policy == "legacy":
            return node is None or node in cells
        if policy == "socket":
            sockets = {self.numa_sockets[c] for c in cells if c in self.numa_sockets}
            return node is not None and self.numa_sockets.get(node) in sockets
        raise PciDeviceRequestFailed(f"Unknown NUMA policy {policy!r} (expected one of {', '.join(NUMA_POLICIES)})")


def _pool_matches(alternative: Mapping[str, str], pool: Pool, grouping: frozenset[str] | None) -> bool:
    for key, wanted in alternative.items():
        if key in _DEVICE_KEYS:
            if not values_match(getattr(pool, key), wanted):
                return False
        elif grouping is None or key in grouping:
            if not values_match(pool.tags.get(key), wanted):
                return False
        # tags outside the grouping keys are checked per device (_tags_match)
    return True


def _tags_match(alternatives: list[Mapping[str, str]], device: PciDevice) -> bool:
    return any(
        all(values_match(device.tags.get(k), v) for k, v in alt.items() if k not in _DEVICE_KEYS)
        for alt in alternatives
    )


def _relatives(device: PciDevice) -> list[str]:
    if device.dev_type == DEV_TYPE_PF:
        return [vf.address for vf in device.children]
    if device.dev_type == DEV_TYPE_VF and device.parent is not None:
        return [device.parent.address]
    return []


def _sortable(key: PoolKey) -> tuple[Any, ...]:
    vendor, product, numa, dev_type, parent, tags = key
    return (vendor, product, -1 if numa is None else numa, dev_type, parent or "", tags)

"""Pools of free host devices (Nova's ``PciDeviceStats``).

Devices that are ``available`` sit in pools keyed by vendor, product, NUMA
node, device type, their grouping tags, ``remote_managed`` and, for VFs,
their PF.  As in Nova, a PF or VF without a ``remote_managed`` tag is
``remote_managed: 'false'`` (so a request for ``'False'`` finds it), and a
remote-managed device only serves a request that asks for one.  A pool's
``count`` is the number of its free devices, kept exact by moving a device in
or out whenever its status changes (O(1) per device; Nova rebuilds and
deep-copies pools instead).

:meth:`PciDeviceStats.plan` answers a set of requests all or nothing: it picks
devices without changing anything, honouring NUMA policies and the SR-IOV
rule that a PF and any of its VFs are never both handed out; the tracker then
claims what was picked.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from ..errors import PciDeviceRequestFailed
from .address import DEV_TYPE_PCI, DEV_TYPE_PF, DEV_TYPE_VF
from .device import PciDevice, PciStatus
from .devspec import bool_word
from .request import values_match

__all__ = ["Pool", "PciDeviceStats", "NUMA_POLICIES", "PoolKey", "REMOTE_MANAGED", "exact_ids"]

NUMA_POLICIES = ("required", "legacy", "preferred", "socket")
_DEVICE_KEYS = ("vendor_id", "product_id", "dev_type")
#: Nova's ``PCI_REMOTE_MANAGED_TAG``: always a pool key, implicitly ``'false'`` on PFs and VFs.
REMOTE_MANAGED = "remote_managed"
_NOT_REMOTE_MANAGED = ((REMOTE_MANAGED, "false"),)

PoolKey = tuple[str, str, int | None, str, str | None, tuple[tuple[str, str], ...]]


@dataclass(slots=True)
class Pool:
    """Free devices that are interchangeable for a request."""

    vendor_id: str
    product_id: str
    numa_node: int | None
    dev_type: str
    parent_addr: str | None
    tags: dict[str, str]
    devices: dict[str, PciDevice] = field(default_factory=dict, repr=False)
    #: Its ``remote_managed`` tag is true: only requests asking for that may use it.
    remote_managed: bool = field(default=False, repr=False)
    #: Free devices known only by number (a cluster view), by their full tag sets.
    counted: list[tuple[dict[str, str], int]] = field(default_factory=list, repr=False)
    _described: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    #: The addresses of ``devices`` in order, kept sorted as devices come and go (made on first use).
    _sorted: list[str] | None = field(default=None, init=False, repr=False, compare=False)
    #: Where the pool sorts among the host's pools (set by :class:`PciDeviceStats`).
    _rank: tuple[Any, ...] = field(default=(), init=False, repr=False, compare=False)

    def addresses(self) -> list[str]:
        """The free devices' addresses in order (the order a claim picks them in)."""
        if self._sorted is None or len(self._sorted) != len(self.devices):
            self._sorted = sorted(self.devices)
        return self._sorted

    def _put(self, device: PciDevice) -> None:
        if device.address not in self.devices and self._sorted is not None:
            insort(self._sorted, device.address)
        self.devices[device.address] = device

    def _take(self, address: str) -> None:
        del self.devices[address]
        if self._sorted is not None:
            index = bisect_left(self._sorted, address)
            if index < len(self._sorted) and self._sorted[index] == address:
                del self._sorted[index]
            else:
                self._sorted = None

    @property
    def count(self) -> int:
        """Its free devices: those it holds plus those known only by number (a cluster view)."""
        return len(self.devices) + sum(n for _, n in self.counted)

    def free_by_tags(self) -> Iterator[tuple[tuple[str, Any], Mapping[str, str], int]]:
        """The free devices as (entry, tags, number): one entry per device, and one per counted tag set."""
        for address, device in self.devices.items():
            yield ("device", address), device.tags, 1
        for index, (tags, count) in enumerate(self.counted):
            yield ("counted", index), tags, count

    def describe(self) -> dict[str, Any]:
        """The pool as a Nova ``pci_device_pools`` entry: its keys (``parent_addr`` only for VFs), its tags
        flattened in, and ``count``; a new dict on every call."""
        # a pool's keys never change: build their part once, then copy it (C speed) per call
        if self._described is None:
            out: dict[str, Any] = {
                "vendor_id": self.vendor_id,
                "product_id": self.product_id,
                "numa_node": self.numa_node,
                "dev_type": self.dev_type,
                "count": 0,
            }
            if self.parent_addr is not None:
                out["parent_addr"] = self.parent_addr
            out.update(self.tags)
            self._described = out
        described = dict(self._described)
        described["count"] = self.count
        return described


class PciDeviceStats:
    """The pools of one host.

    *grouping_keys* names the tags that split pools (the ``pci_grouping_key``
    of the OpenStack wiki's SR-IOV design, "PCI passthrough SRIOV support");
    ``None`` groups by every tag.  *numa_sockets* maps host NUMA node ->
    socket, for the ``socket`` policy.
    """

    def __init__(
        self, grouping_keys: Sequence[str] | None = None, numa_sockets: Mapping[int, int] | None = None
    ) -> None:
        self.grouping_keys = None if grouping_keys is None else frozenset(grouping_keys)
        self.numa_sockets = dict(numa_sockets or {})
        self._pools: dict[PoolKey, Pool] = {}
        self._where: dict[str, PoolKey] = {}
        self._by_ids: dict[tuple[str, str], set[PoolKey]] = {}  # (vendor, product) -> pool keys
        # Pools in order: every key (made on first use), and by (vendor, product) the pools of those
        # ids (made when first asked for); kept in order as pools come and go (a pool goes when its
        # last free device is claimed, and comes back when one is freed).
        self._order: list[PoolKey] | None = None
        self._ordered: dict[tuple[str, str], list[Pool]] = {}

    # -- membership -------------------------------------------------------------
    def _key(self, device: PciDevice) -> PoolKey:
        dev_type = device.dev_type
        if not device.tags:  # the common case, kept cheap: every status change re-keys its device
            return (
                device.vendor_id, device.product_id, device.numa_node, dev_type,
                device.parent_addr if dev_type == DEV_TYPE_VF else None,
                () if dev_type == DEV_TYPE_PCI else _NOT_REMOTE_MANAGED,
            )
        return self._key_of(
            device.vendor_id, device.product_id, device.numa_node, dev_type, device.parent_addr, device.tags
        )

    def _key_of(
        self, vendor: str, product: str, numa: int | None, dev_type: str, parent_addr: str | None,
        tags: Mapping[str, str],
    ) -> PoolKey:
        parent = parent_addr if dev_type == DEV_TYPE_VF else None
        key_tags: tuple[tuple[str, str], ...]
        if not tags:  # the common case, kept cheap: a sync re-keys every device
            key_tags = () if dev_type == DEV_TYPE_PCI else _NOT_REMOTE_MANAGED
        else:
            grouping = self.grouping_keys
            items = list(tags.items()) if grouping is None else [
                (k, v) for k, v in tags.items() if k in grouping or k == REMOTE_MANAGED
            ]
            if dev_type != DEV_TYPE_PCI and REMOTE_MANAGED not in tags:
                items.append(_NOT_REMOTE_MANAGED[0])  # Nova's _ensure_remote_managed_tag
            key_tags = tuple(sorted(items))
        return (vendor, product, numa, dev_type, parent, key_tags)

    def _pool(self, key: PoolKey) -> Pool:
        pool = self._pools.get(key)
        if pool is None:
            vendor, product, numa, dev_type, parent, tags = key
            remote = _truthy(dict(tags).get(REMOTE_MANAGED))
            pool = Pool(vendor, product, numa, dev_type, parent, dict(tags), remote_managed=remote)
            pool._rank = _sortable(key)
            self._pools[key] = pool
            self._by_ids.setdefault((vendor, product), set()).add(key)
            if self._order is not None:
                insort(self._order, key, key=_sortable)
            ordered = self._ordered.get((vendor, product))
            if ordered is not None:
                insort(ordered, pool, key=_pool_order)
        return pool

    def _unorder(self, key: PoolKey, pool: Pool) -> None:
        """A pool went: out of the orders (found by bisection: keys are unique)."""
        if self._order is not None:
            index = bisect_left(self._order, _sortable(key), key=_sortable)
            if index < len(self._order) and self._order[index] == key:
                del self._order[index]
            else:  # cannot happen; rebuilt when next asked for
                self._order = None
        ordered = self._ordered.get(key[:2])
        if ordered is not None:
            index = bisect_left(ordered, pool._rank, key=_pool_order)
            if index < len(ordered) and ordered[index] is pool:
                del ordered[index]
            else:
                del self._ordered[key[:2]]

    def update(self, devices: Iterable[PciDevice]) -> None:
        """Put each device where its status says: in its pool when available, else nowhere."""
        where, pools = self._where, self._pools
        for device in devices:
            address = device.address
            old = where.get(address)
            if device.status is PciStatus.AVAILABLE:
                key = self._key(device)
                if old == key:  # already there (the same device or its new object)
                    pools[key].devices[address] = device
                    continue
                if old is not None:
                    self._discard(address)
                (pools.get(key) or self._pool(key))._put(device)
                where[address] = key
            elif old is not None:
                self._discard(address)

    def add_counted(
        self, vendor: str, product: str, numa: int | None, dev_type: str, parent_addr: str | None,
        tags: Mapping[str, str], count: int,
    ) -> None:
        """Add *count* free devices known only by their pool keys and tags (what a scheduler sees of a
        host: Nova's ``pci_device_pools``).  Such pools answer :meth:`fits`, not :meth:`plan`."""
        if count > 0:
            key = self._key_of(vendor, product, numa, dev_type, parent_addr, tags)
            self._pool(key).counted.append((dict(tags), count))

    def forget(self, addresses: Iterable[str]) -> None:
        """Take devices out of their pools; an address in no pool is ignored."""
        for address in addresses:
            self._discard(address)

    def _discard(self, address: str) -> None:
        key = self._where.pop(address, None)
        if key is not None:
            pool = self._pools[key]
            pool._take(address)
            if not pool.devices:
                del self._pools[key]
                self._by_ids[key[:2]].discard(key)
                self._unorder(key, pool)

    def clear(self) -> None:
        """Empty every pool, counted devices included."""
        self._pools.clear()
        self._where.clear()
        self._by_ids.clear()
        self._order = None
        self._ordered.clear()

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
        """How many free devices the pools hold, counted ones included."""
        return len(self._where) + sum(n for pool in self._pools.values() for _, n in pool.counted)

    # -- requests ---------------------------------------------------------------
    def support_requests(self, requests: Sequence[Any], numa_cells: Sequence[int] | None = None) -> bool:
        """Could these requests be met together right now? (Changes nothing.)"""
        try:
            self.plan(requests, numa_cells)
        except PciDeviceRequestFailed:
            return False
        return True

    def fits(self, requests: Sequence[Any], numa_cells: Sequence[int] | None = None) -> bool:
        """Could these requests be met together, by counts alone? (Nova's scheduler filter.)

        The same pools, the same matching and the same NUMA tiers as
        :meth:`plan`, but over numbers: a request takes what it needs from
        its candidate pools in order, and what it took is not there for the
        next request.  Like Nova's ``PciPassthroughFilter`` it does not
        look at IOMMU groups or at a PF and its VFs asked for in one claim,
        so a host it accepts can still refuse the claim (the host's tracker
        decides); a host it refuses could not meet the requests.
        """
        taken: dict[tuple[int, tuple[str, Any]], int] = {}
        for request in requests:
            need = request.count
            for pool, residual in self._candidates(request, numa_cells):
                for entry, tags, count in pool.free_by_tags():
                    if residual is not None and not _tags_match(residual, tags):
                        continue
                    where = (id(pool), entry)
                    take = min(need, count - taken.get(where, 0))
                    if take > 0:
                        taken[where] = taken.get(where, 0) + take
                        need -= take
                    if need == 0:
                        break
                if need == 0:
                    break
            if need:
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
            for pool, residual in self._candidates(request, numa_cells):
                for address in pool.addresses():  # address order: a reopened tracker picks the same
                    device = pool.devices[address]
                    if len(picked) == request.count:
                        break
                    if device.address in excluded or (residual is not None and not _tags_match(residual, device.tags)):
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
    ) -> Iterable[tuple[Pool, list[Mapping[str, str]] | None]]:
        """Matching pools, best NUMA affinity first; lazily when NUMA does not matter
        (a claim usually stops at the first pool).

        Nova's ``_filter_pools_for_numa_cells`` tries its policy's tiers in turn
        (the instance's own nodes, then NUMA-less devices for ``legacy`` and
        ``preferred``, the same socket's nodes for ``socket``, anything for
        ``preferred``) and settles on the first that has enough devices.
        Filling greedily from the tiers in that order answers the same
        requests and never takes a worse-placed device while a better one is
        free.
        """
        found = self._matching(request)
        if not numa_cells:  # Nova: no NUMA cells (None or empty), no NUMA constraint
            return found
        return _tiered(found, self._numa_ranker(request.numa_policy, numa_cells))

    def _numa_ranker(self, policy: str, cells: Sequence[int]) -> Callable[[int | None], int | None]:
        """The tier of a device on NUMA node *node* (lower is better), None if the policy forbids it."""
        own = frozenset(cells)
        if policy == "required":
            return lambda node: 0 if node in own else None
        if policy == "legacy":
            return lambda node: 0 if node in own else 1 if node is None else None
        if policy == "preferred":
            return lambda node: 0 if node in own else 1 if node is None else 2
        if policy == "socket":
            # Nova accepts the instance's own nodes even without socket information;
            # beyond them, only nodes whose socket is known to be one of the instance's.
            sockets = {self.numa_sockets[c] for c in own if c in self.numa_sockets}
            near = frozenset(n for n, s in self.numa_sockets.items() if s in sockets)
            return lambda node: 0 if node in own else 1 if node in near else None
        raise PciDeviceRequestFailed(f"Unknown NUMA policy {policy!r} (expected one of {', '.join(NUMA_POLICIES)})")

    def _matching(self, request: Any) -> Iterator[tuple[Pool, list[Mapping[str, str]] | None]]:
        """Pools the request's spec may use, each with the alternatives still to check
        device by device (None: the pool's keys decided everything)."""
        grouping = self.grouping_keys
        for pool in self._pools_for(request.spec):
            alternatives = [alt for alt in request.spec if _pool_serves(alt, pool, grouping)]
            if not alternatives:
                continue
            if grouping is None:
                yield pool, None  # every tag is a pool key
                continue
            residual: list[Mapping[str, str]] = [
                {k: v for k, v in alt.items() if k not in _DEVICE_KEYS and k not in grouping and k != REMOTE_MANAGED}
                for alt in alternatives
            ]
            yield pool, residual if all(residual) else None  # an alternative with nothing left matches every device

    def _pools_for(self, alternatives: Sequence[Mapping[str, str]]) -> list[Pool]:
        """Pools that could match: by (vendor, product) when every alternative names both
        exactly (lowercase hex, as ids are stored), else every pool."""
        ids = exact_ids(alternatives)
        if ids is None:
            return self.pools
        if len(ids) == 1:  # the usual alias: one product, its pools in order (kept until pools change)
            (pair,) = ids
            found = self._ordered.get(pair)
            if found is None:
                found = self._ordered[pair] = sorted(
                    (self._pools[key] for key in self._by_ids.get(pair, ())), key=_pool_order
                )
            return found
        keys: set[PoolKey] = set()
        for pair in ids:
            keys |= self._by_ids.get(pair, set())
        return [self._pools[key] for key in sorted(keys, key=_sortable)]


def exact_ids(alternatives: Iterable[Mapping[str, str]]) -> set[tuple[str, str]] | None:
    """The (vendor, product) pairs that alone can match, when every alternative names both exactly
    (lowercase hex, as ids are stored); None when some alternative could match other ids."""
    ids: set[tuple[str, str]] = set()
    for alt in alternatives:
        vendor, product = alt.get("vendor_id"), alt.get("product_id")
        if not (vendor and product and vendor == vendor.lower() and product == product.lower()):
            return None
        ids.add((vendor, product))
    return ids


def _tiered(
    found: Iterable[tuple[Pool, Any]], rank: Callable[[int | None], int | None]
) -> Iterator[tuple[Pool, Any]]:
    """*found* by tier, pool order within a tier; the best tier lazily (a claim usually stops there)."""
    later: list[tuple[int, tuple[Pool, Any]]] = []
    for item in found:
        tier = rank(item[0].numa_node)
        if tier == 0:
            yield item
        elif tier is not None:
            later.append((tier, item))
    later.sort(key=lambda pair: pair[0])  # stable
    for _, item in later:
        yield item


def _pool_serves(alternative: Mapping[str, str], pool: Pool, grouping: frozenset[str] | None) -> bool:
    """Does this alternative match the pool's keys, and may it use such a device at all?

    As in Nova, a PF pool serves only an alternative that asks for a PF, and
    a remote-managed pool only one that asks for ``remote_managed`` true.
    """
    if pool.dev_type == DEV_TYPE_PF and alternative.get("dev_type") != DEV_TYPE_PF:
        return False
    if pool.remote_managed and not _truthy(alternative.get(REMOTE_MANAGED)):
        return False
    for key, wanted in alternative.items():
        if key in _DEVICE_KEYS:
            have = getattr(pool, key)
            if have != wanted and not values_match(have, wanted):
                return False
        elif key == REMOTE_MANAGED:
            if _bool_word(pool.tags.get(key)) != _bool_word(wanted):
                return False
        elif grouping is None or key in grouping:
            if not values_match(pool.tags.get(key), wanted):
                return False
        # tags outside the grouping keys are checked per device (_tags_match)
    return True


def _tags_match(alternatives: list[Mapping[str, str]], tags: Mapping[str, str]) -> bool:
    return any(all(values_match(tags.get(k), v) for k, v in alt.items()) for alt in alternatives)


def _bool_word(value: str | None) -> str | None:
    """A boolean tag value as Nova compares it, with oslo's spellings of true and false
    (``yes``, ``0``, ...) read as ``true`` / ``false``; other text as written (lowercased)."""
    if value is None:
        return None
    return bool_word(value) or value.strip().lower()


def _truthy(value: str | None) -> bool:
    """oslo's ``bool_from_string`` (non-strict): only the true spellings are true."""
    return bool_word(value) == "true"


def _relatives(device: PciDevice) -> list[str]:
    if device.dev_type == DEV_TYPE_PF:
        return [vf.address for vf in device.children]
    if device.dev_type == DEV_TYPE_VF and device.parent is not None:
        return [device.parent.address]
    return []


def _pool_order(pool: Pool) -> tuple[Any, ...]:
    return pool._rank


def _sortable(key: PoolKey) -> tuple[Any, ...]:
    vendor, product, numa, dev_type, parent, tags = key
    return (vendor, product, -1 if numa is None else numa, dev_type, parent or "", tags)

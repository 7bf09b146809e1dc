"""The cluster view: every host's passthrough devices in one (PostgreSQL) database.

Each host's tracker (:class:`~kvmslots.pci.tracker.PciDevTracker` with its
own ``node_id``) owns its rows; this module only reads them, except
:func:`forget_host`.  What a scheduler needs is what Nova's scheduler has:
per host, its free devices by pool (``pci_device_pools``), and a filter that
says which hosts can take a VM's PCI requests (``PciPassthroughFilter``, and
``NUMATopologyFilter``'s per-cell check).  The database counts the free
devices per host and pool key in one ``GROUP BY``; each host's counts are
put into a :class:`~kvmslots.pci.stats.PciDeviceStats`, and
:meth:`~kvmslots.pci.stats.PciDeviceStats.fits` answers with the same pool
matching and NUMA policies as the host tracker's own claims.

Works on a SQLite state too (one file, one or more node ids), which is how
a single host's view looks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .pci.request import InstancePciRequest
from .pci.stats import PciDeviceStats, exact_ids
from .storage.base import HostRecord
from .store import Store

__all__ = [
    "HostPools",
    "HostFit",
    "cluster_pools",
    "hosts_for",
    "fitting_hosts",
    "request_ids",
    "forget_host",
    "numa_nodes_of",
]

#: A NUMA node no device is on (device NUMA nodes are never negative).
_NO_FREE_DEVICE = -1


@dataclass
class HostPools:
    """One host of the inventory and its pools of free devices (every tag is a pool key, as in Nova)."""

    host: HostRecord
    stats: PciDeviceStats = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The host's counts and its pools as Nova's ``pci_device_pools`` entries (tags flattened into each
        entry); ``devices`` and ``free`` are None when they were not counted."""
        return {
            "host": self.host.name,
            "devices": self.host.devices,
            "free": self.host.free,
            "synced_at": self.host.synced_at,
            "pools": list(self.stats),
        }


@dataclass(frozen=True)
class HostFit:
    """A host that can take the requests, on which of its NUMA nodes (None: no NUMA constraint), and how
    many free devices it has that such requests could use.

    The nodes are those the inventory knows (the host's free devices' and its socket map's): fewer
    than the VM's cells, or none, means the other cells go to nodes with no free device.
    """

    host: str
    numa_cells: tuple[int, ...] | None
    free: int

    def to_json(self) -> dict[str, Any]:
        """The fit as ``cluster hosts --json`` prints it (``numa_cells`` a list, or None)."""
        return {"host": self.host, "numa_cells": None if self.numa_cells is None else list(self.numa_cells),
                "free": self.free}


def cluster_pools(
    store: Store,
    hosts: Sequence[str] | None = None,
    *,
    ids: Iterable[tuple[str, str]] | None = None,
    counts: bool = True,
) -> list[HostPools]:
    """Every host's pools of free devices (one read transaction: one consistent picture).

    *ids* keeps only devices with those (vendor, product) ids (what a request can use);
    *counts* also counts each host's devices (a scan a scheduler does not need).
    """
    with store.reading() as txn:
        records = txn.hosts(counts=counts)
        if hosts is not None:
            wanted = set(hosts)
            records = [r for r in records if r.name in wanted]
        pools = txn.free_pools([r.name for r in records] if hosts is not None else None, ids)
    by_host = {record.name: HostPools(record, PciDeviceStats(None, record.numa_sockets)) for record in records}
    for pool in pools:
        found = by_host.get(pool.host)
        if found is not None:  # a host row may come and go between the two reads of another backend
            found.stats.add_counted(
                pool.vendor_id, pool.product_id, pool.numa_node, pool.dev_type, pool.parent_addr, pool.tags, pool.count
            )
    return list(by_host.values())


def numa_nodes_of(pools: HostPools) -> list[int]:
    """The host's NUMA nodes, as its devices and its socket map name them."""
    nodes = {p.numa_node for p in pools.stats.pools if p.numa_node is not None} | set(pools.host.numa_sockets)
    return sorted(nodes)


def hosts_for(
    store: Store,
    requests: Sequence[InstancePciRequest],
    *,
    numa_cells: int | None = None,
    hosts: Sequence[str] | None = None,
) -> list[HostFit]:
    """The hosts whose free devices can meet *requests* together.

    *numa_cells* is the number of NUMA cells of the VM (None: it has no NUMA
    topology, so NUMA does not constrain the devices).  With cells, a host
    fits when some set of that many of its NUMA nodes satisfies every
    request under its NUMA policy, which is how Nova's NUMA topology filter
    asks the host's pools, cell by cell.
    """
    return fitting_hosts(cluster_pools(store, hosts, ids=request_ids(requests), counts=False), requests,
                         numa_cells=numa_cells)


def request_ids(requests: Sequence[InstancePciRequest]) -> set[tuple[str, str]] | None:
    """The (vendor, product) ids the requests can use, when each of them names them exactly (a filter the
    database applies before counting); None when some request could use any device."""
    found: set[tuple[str, str]] = set()
    for request in requests:
        ids = exact_ids(request.spec)
        if ids is None:
            return None
        found |= ids
    return found


def fitting_hosts(
    inventory: Sequence[HostPools], requests: Sequence[InstancePciRequest], *, numa_cells: int | None = None
) -> list[HostFit]:
    """:func:`hosts_for` over pools already read (a scheduler that asks several questions of one read)."""
    fits: list[HostFit] = []
    for pools in inventory:
        stats = pools.stats
        if numa_cells is None:
            if stats.fits(requests):
                fits.append(HostFit(pools.host.name, None, stats.free_count()))
            continue
        # The inventory knows a host's NUMA nodes from its free devices and its socket map only; a
        # node with no free device changes no answer, so fewer known nodes than cells means the
        # VM's other cells go to such nodes: all the known nodes are used (and when none is known,
        # a node no device is on stands in for the cells).  Without this, a host whose devices on
        # one node are all taken was refused although it could serve.
        nodes = numa_nodes_of(pools)
        for cells in itertools.combinations(nodes, min(numa_cells, len(nodes))):
            if stats.fits(requests, cells or (_NO_FREE_DEVICE,)):
                fits.append(HostFit(pools.host.name, tuple(cells), stats.free_count()))
                break
    return fits


def forget_host(store: Store, host: str) -> int:
    """Remove a host's inventory (a host that was retired or renamed); the number of devices that went.

    :class:`~kvmslots.errors.UnknownHost` if the host has no rows.  A host
    that merely stopped syncing keeps its rows until this is called.
    """
    with store.transaction() as txn:
        return txn.forget_host(host)

"""What the orchestration and the host tracker ask of a state store, named by intent.

Two stores, one per concern, both reached through one transaction object
(so a hot add of a passthrough device can change slots and host devices
together or not at all):

* :class:`SlotTransaction`, the per-VM slot records: define a VM, reserve a
  device at a slot, move a device's state (the old state is checked against
  :data:`~kvmslots.model.TRANSITIONS`), remove it expecting what was read,
  list.
* :class:`HostDeviceTransaction`, the host PCI inventory, one set of rows per
  host: lock a host's generation, load it, write what a sync, claim,
  allocation or free changed, and the cluster views (every host's free
  pools, forget a host).

A :class:`Backend` hands out write transactions (serialised per VM and per
host), read transactions (one consistent snapshot, never waiting for a
writer) and the VM operation lock that keeps whole operations (a hot add
from intent to verification) apart, across processes and, on PostgreSQL,
across hosts.

Implementations: :mod:`kvmslots.storage.sqlite` (the embedded default) and
:mod:`kvmslots.storage.postgres`.  Neither protocol mentions SQL.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncContextManager,
    AsyncIterator,
    Callable,
    ContextManager,
    Iterable,
    Iterator,
    Mapping,
    Protocol,
    TypeVar,
)

import tenacity

from ..errors import VMBusy
from ..model import Controller, Device, DeviceState, VMSpec
from ..pci.device import PciDevice
from ..pci.request import InstancePciRequest

__all__ = [
    "SlotTransaction",
    "HostDeviceTransaction",
    "Transaction",
    "Backend",
    "HostChanges",
    "HostRecord",
    "PoolCount",
    "lock_retry",
    "hold",
    "hold_sync",
    "vm_busy",
]

H = TypeVar("H")


class SlotTransaction(Protocol):
    """The per-VM slot records, inside one transaction."""

    def find_vm(self, name: str) -> VMSpec | None:
        """The stored VM, or None when there is none.  A VM stored with a machine type kvmslots no longer
        supports is a :class:`StateConflict`, never None: it must not look like a new VM."""
        ...
    def has_vm(self, name: str) -> bool:
        """Is a VM of that name stored?  True also for a record :meth:`find_vm` refuses to read."""
        ...
    def get_vm(self, name: str) -> VMSpec:
        """:meth:`find_vm` for a VM that must exist: :class:`UnknownVM` when there is none."""
        ...
    def put_vm(self, vm: VMSpec) -> None:
        """Create the VM, or replace its spec (machine, masks, hotplug room) keeping its devices and
        controllers; checking that the new spec fits them is the caller's job
        (:func:`~kvmslots.topology.check_records`)."""
        ...
    def delete_vm(self, name: str) -> None:
        """Forget the VM with its devices and controllers; a VM that is not stored is no error."""
        ...
    def vm_names(self) -> list[str]:
        """Every stored VM's name, sorted."""
        ...
    def devices(self, vm: str) -> list[Device]:
        """The VM's device records by bus, slot and function, in the same order on every backend; empty for a
        VM that is not stored."""
        ...
    def find_device(self, vm: str, uuid: str) -> Device | None:
        """The record of device *uuid* of *vm*, or None."""
        ...
    def get_device(self, vm: str, uuid: str) -> Device:
        """:meth:`find_device` for a device that must exist: :class:`UnknownDevice` when there is none."""
        ...
    def add_device(self, vm: str, device: Device) -> None:
        """Reserve *device*'s slot, or refuse with nothing written: a UUID or QEMU id the VM already has, or
        an id that would collide with another device's (same first UUID group and slot), is
        :class:`DeviceExists`; a slot another device or a controller holds is :class:`StateConflict` (only the
        functions of one multifunction group share a slot)."""
        ...
    def set_state(self, vm: str, uuid: str, state: DeviceState, *, unplug_requested: bool = False) -> None:
        """Move a device to *state*, which :data:`~kvmslots.model.TRANSITIONS` must allow from the stored one
        (else :class:`InvalidTransition`; no record: :class:`UnknownDevice`).

        *unplug_requested*, kept only with ``detaching``, records that QEMU has the ``device_del``; any other
        call clears it.
        """
        ...
    def unplug_requested(self, vm: str) -> set[str]:
        """UUIDs of the VM's ``detaching`` devices whose ``device_del`` QEMU is known to have."""
        ...
    def remove_device(self, vm: str, uuid: str, *, expect: Device | None = None) -> bool:
        """Forget a device, releasing its slot; True if a record went.  With *expect*, only a record still at
        that bus, slot and state goes, so a caller acting on an older read never deletes a newer one."""
        ...
    def controllers(self, vm: str) -> list[Controller]:
        """The root ports and bridges planned for the VM, by chassis number."""
        ...
    def add_controller(self, vm: str, controller: Controller) -> None:
        """Record a controller; one that shares its id, chassis number or bus, slot and function with a stored
        one is a :class:`StateConflict`."""
        ...


@dataclass
class HostChanges:
    """What one tracker operation changed on one host, written together.

    ``put`` are devices written whole (new ones, or changed hypervisor
    values or tags); ``states`` devices already stored whose state alone
    changed (status, owner, request, parked values, vanished: a claim, an
    allocation, a free).  ``generation`` is the host's new generation (None:
    nothing changed that other processes must reload for).  ``previous``, when
    given, is the generation the changes were made from: they are written
    only if the host's generation is still that (the host's row was not
    locked beforehand; see :meth:`HostDeviceTransaction.write_host_changes`).
    """

    put: list[PciDevice] = field(default_factory=list)
    states: list[PciDevice] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    requests_put: list[tuple[str, InstancePciRequest]] = field(default_factory=list)
    requests_deleted: set[tuple[str, str]] = field(default_factory=set)
    generation: int | None = None
    previous: int | None = None


@dataclass(frozen=True)
class HostRecord:
    """One host of the inventory, as ``cluster hosts`` and ``cluster pools`` show it."""

    name: str
    generation: int
    #: Its devices and how many are free (None: not counted, see ``hosts(counts=False)``).
    devices: int | None
    free: int | None
    synced_at: float | None
    numa_sockets: dict[int, int]


@dataclass(frozen=True)
class PoolCount:
    """Free devices of one host that share every pool key and every tag (the cluster view's unit)."""

    host: str
    vendor_id: str
    product_id: str
    numa_node: int | None
    dev_type: str
    parent_addr: str | None
    tags: dict[str, str]
    count: int


class HostDeviceTransaction(Protocol):
    """The host PCI inventory, inside one transaction; every method names the host it is about."""

    def lock_host(self, node: str, numa_sockets: Mapping[int, int]) -> int:
        """The host's generation, and no other writer of this host until the transaction ends."""
        ...
    def host_generation(self, node: str) -> int:
        """The host's last committed generation, read without a lock; 0 for a host with no row yet."""
        ...
    def load_host(self, node: str) -> tuple[list[PciDevice], list[tuple[str, InstancePciRequest]]]:
        """The host's device records by address, and its PCI requests as (instance UUID, request) pairs; both
        empty for a host not stored."""
        ...
    def write_host_changes(self, node: str, changes: HostChanges) -> bool:
        """Write *changes*; with ``changes.previous``, the new generation is written first and only
        over that one (which locks the host's row until the transaction ends): False, and nothing
        written, if the host's generation is another (or the host has no row yet)."""
        ...
    def mark_synced(self, node: str, when: float) -> None:
        """Record when the host was last synced (*when*: seconds since the epoch); nothing is written for a
        host with no row yet."""
        ...
    def device_spec(self, node: str) -> Any | None:
        """The device spec last stored for the host (``host sync --device-spec``), decoded from JSON; None
        when none was stored."""
        ...
    def set_device_spec(self, node: str, spec: Any) -> None:
        """Store the host's device spec (anything JSON can hold) for later syncs; nothing is written for a
        host with no row yet (:meth:`lock_host` creates it)."""
        ...
    def hosts(self, *, counts: bool = True) -> list[HostRecord]:
        """Every host of the inventory, by name; *counts* also counts each host's devices and free ones (a
        scan of its rows), else those are None."""
        ...
    def free_pools(
        self, hosts: Iterable[str] | None = None, ids: Iterable[tuple[str, str]] | None = None
    ) -> list[PoolCount]:
        """Available devices counted per host, pool key and full tag set, by the database; only of *hosts* and
        only with these (vendor, product) *ids*, when given (an empty list matches nothing).  The order of the
        counts is unspecified."""
        ...
    def forget_host(self, node: str) -> int:
        """Remove the host's devices, requests and row; the number of devices that went.  :class:`UnknownHost`
        when the host has no row."""
        ...


class Transaction(SlotTransaction, HostDeviceTransaction, Protocol):
    """One transaction of a backend: both stores, committed together."""


class Backend(Protocol):
    """A database holding slot records and host inventories."""

    #: Where the state is, for messages (a path, or a URL without its password).
    location: str

    def transaction(self) -> ContextManager[Transaction]:
        """A write transaction, committed when the ``with`` block ends, or rolled back whole if it raises.

        It waits for other writers of the same VM or host (SQLite: of the whole file) up to the backend's
        timeout.  The database's errors come out typed: a broken constraint as :class:`StateConflict`,
        anything else as another :class:`StateError`.
        """
        ...
    def reading(self) -> ContextManager[Transaction]:
        """A read transaction: one consistent snapshot that never waits for a writer and commits nothing."""
        ...
    def vm_lock(self, vm: str, timeout: float = 60.0) -> AsyncContextManager[None]:
        """Hold the VM's operation lock, for asyncio callers: retried until *timeout* seconds pass, then
        :class:`VMBusy`.  Asking for it again while holding it waits too; a holder that dies releases it."""
        ...
    def vm_lock_sync(self, vm: str, timeout: float = 60.0) -> ContextManager[None]:
        """:meth:`vm_lock` for synchronous callers: the same lock, *timeout* and :class:`VMBusy`."""
        ...
    def identity(self) -> str:
        """Which database this is, whichever path or URL reached it: the same on every host and process that
        shares it."""
        ...
    def close(self) -> None:
        """Close the database connection; the backend is not used afterwards."""
        ...



def lock_retry(timeout: float) -> dict[str, Any]:
    """How long and how often to retry a VM lock someone else holds (both backends, sync and async)."""
    return {
        "stop": tenacity.stop_after_delay(timeout),
        "wait": tenacity.wait_exponential(multiplier=0.005, max=0.1),
        "retry": tenacity.retry_if_exception_type(BlockingIOError),
        "reraise": True,
    }


@contextlib.contextmanager
def hold_sync(vm: str, timeout: float, attempt: Callable[[], H], release: Callable[[H], None]) -> Iterator[None]:
    """Hold a VM lock for a synchronous caller: *attempt* takes it or raises BlockingIOError, and is
    retried with backoff until *timeout* (then :class:`VMBusy`); *release* gives it back."""
    try:
        held = tenacity.Retrying(**lock_retry(timeout))(attempt)
    except BlockingIOError:
        raise vm_busy(vm, timeout) from None
    try:
        yield
    finally:
        release(held)


@contextlib.asynccontextmanager
async def hold(vm: str, timeout: float, attempt: Callable[[], H], release: Callable[[H], None]) -> AsyncIterator[None]:
    """:func:`hold_sync` for asyncio callers: the waits between attempts do not block the loop."""
    try:
        held = attempt()
    except BlockingIOError:  # contended: wait with backoff
        try:
            async for retry in tenacity.AsyncRetrying(**lock_retry(timeout)):
                with retry:
                    held = attempt()
        except BlockingIOError:
            raise vm_busy(vm, timeout) from None
    try:
        yield
    finally:
        release(held)


def vm_busy(vm: str, timeout: float) -> VMBusy:
    """The :class:`VMBusy` for a VM lock not obtained within *timeout* seconds (returned, for the caller to
    raise)."""
    return VMBusy(f"VM {vm!r} is locked by another operation for more than {timeout:g}s")

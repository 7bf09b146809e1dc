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

    def find_vm(self, name: str) -> VMSpec | None: ...
    def has_vm(self, name: str) -> bool: ...
    def get_vm(self, name: str) -> VMSpec: ...
    def put_vm(self, vm: VMSpec) -> None: ...
    def delete_vm(self, name: str) -> None: ...
    def vm_names(self) -> list[str]: ...
    def devices(self, vm: str) -> list[Device]: ...
    def find_device(self, vm: str, uuid: str) -> Device | None: ...
    def get_device(self, vm: str, uuid: str) -> Device: ...
    def add_device(self, vm: str, device: Device) -> None: ...
    def set_state(self, vm: str, uuid: str, state: DeviceState, *, unplug_requested: bool = False) -> None: ...
    def unplug_requested(self, vm: str) -> set[str]: ...
    def remove_device(self, vm: str, uuid: str, *, expect: Device | None = None) -> bool: ...
    def controllers(self, vm: str) -> list[Controller]: ...
    def add_controller(self, vm: str, controller: Controller) -> None: ...


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
    def host_generation(self, node: str) -> int: ...
    def load_host(self, node: str) -> tuple[list[PciDevice], list[tuple[str, InstancePciRequest]]]: ...
    def write_host_changes(self, node: str, changes: HostChanges) -> bool:
        """Write *changes*; with ``changes.previous``, the new generation is written first and only
        over that one (which locks the host's row until the transaction ends): False, and nothing
        written, if the host's generation is another (or the host has no row yet)."""
        ...
    def mark_synced(self, node: str, when: float) -> None: ...
    def device_spec(self, node: str) -> Any | None: ...
    def set_device_spec(self, node: str, spec: Any) -> None: ...
    def hosts(self, *, counts: bool = True) -> list[HostRecord]: ...
    def free_pools(
        self, hosts: Iterable[str] | None = None, ids: Iterable[tuple[str, str]] | None = None
    ) -> list[PoolCount]: ...
    def forget_host(self, node: str) -> int: ...


class Transaction(SlotTransaction, HostDeviceTransaction, Protocol):
    """One transaction of a backend: both stores, committed together."""


class Backend(Protocol):
    """A database holding slot records and host inventories."""

    #: Where the state is, for messages (a path, or a URL without its password).
    location: str

    def transaction(self) -> ContextManager[Transaction]: ...
    def reading(self) -> ContextManager[Transaction]: ...
    def vm_lock(self, vm: str, timeout: float = 60.0) -> AsyncContextManager[None]: ...
    def vm_lock_sync(self, vm: str, timeout: float = 60.0) -> ContextManager[None]: ...
    def identity(self) -> str: ...
    def close(self) -> None: ...



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
    return VMBusy(f"VM {vm!r} is locked by another operation for more than {timeout:g}s")

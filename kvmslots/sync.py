"""A synchronous facade over the async core, for callers that are not asyncio code.

Each call opens the state store's connection once per :class:`SlotManager`
and a QMP connection per operation (one QMP socket serves one client at a
time, so it is not held between calls).  Do not call these from inside a
running event loop: use the coroutines of :mod:`kvmslots.hotplug` there.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence, TypeVar

from . import hotplug
from .model import Device, DeviceGroup, DeviceSpec, VMSpec
from .monitor import Monitor
from .store import Store

if TYPE_CHECKING:
    from .passthrough import HostDevices, PassthroughSpec
    from .pci.binding import HostBinder
    from .pci.tracker import PciDevTracker

__all__ = ["SlotManager"]

T = TypeVar("T")


def with_monitor(
    qmp: str | os.PathLike[str],
    work: Callable[[Monitor], Awaitable[T]],
    *,
    connect_timeout: float = 30.0,
    command_timeout: float | None = None,
) -> T:
    """Run *work* on a QMP connection of its own, in an event loop of its own (the synchronous
    callers' way into the async core: :class:`SlotManager` and the CLI)."""

    async def run() -> T:
        async with Monitor(qmp, connect_timeout=connect_timeout, command_timeout=command_timeout) as mon:
            return await work(mon)

    return asyncio.run(run())


class SlotManager:
    """``plan_boot``, ``hot_add``, ``hot_del``, ``reconcile`` and the live migration steps without ``await``."""

    def __init__(
        self,
        state: str | os.PathLike[str],
        *,
        connect_timeout: float = 30.0,
        command_timeout: float | None = None,
    ) -> None:
        """*state* is a state directory (SQLite) or a ``postgresql://`` URL, as for :class:`Store`."""
        self.store = Store(state)
        self.connect_timeout = connect_timeout
        #: longest wait for one QMP answer (None: ``$KVMSLOTS_QMP_TIMEOUT`` or 15 s)
        self.command_timeout = command_timeout
        self.host: HostDevices | None = None

    def use_host_devices(
        self, device_spec: Any = None, *, binder: HostBinder | None = None, **tracker_options: Any
    ) -> PciDevTracker:
        """Enable passthrough: a host PCI tracker on this manager's store (Nova ``device_spec``
        entries), and optionally a binder to vfio-pci.  Every later call then frees and allocates
        host devices together with guest slots."""
        from .passthrough import HostDevices
        from .pci.devspec import Whitelist
        from .pci.tracker import PciDevTracker

        whitelist = Whitelist.from_config(device_spec) if device_spec is not None else None
        tracker = PciDevTracker(self.store, whitelist, **tracker_options)
        self.host = HostDevices(tracker, binder)
        return tracker

    def close(self) -> None:
        """Close the store; the manager is not used afterwards (a ``with`` block does this)."""
        self.store.close()

    def __enter__(self) -> "SlotManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def define_vm(self, vm: VMSpec) -> VMSpec:
        """Create or update a VM (:meth:`Store.define_vm`): a new mask must not mask a slot in use."""
        return self.store.define_vm(vm)

    def plan_boot(
        self, vm: VMSpec | str, devices: Sequence[DeviceSpec | DeviceGroup | PassthroughSpec]
    ) -> hotplug.BootPlan:
        """:func:`~kvmslots.hotplug.plan_boot`: place and persist the VM's whole boot device set and return
        the QEMU arguments; passthrough devices need :meth:`use_host_devices` first."""
        return asyncio.run(hotplug.plan_boot(self.store, vm, devices, host=self.host))

    def hot_add(
        self, vm: str, device: DeviceSpec | PassthroughSpec, *, qmp: str | os.PathLike[str], undo_timeout: float = 5.0
    ) -> Device:
        """:func:`~kvmslots.hotplug.hot_add` over a QMP connection of its own: one device, all or nothing
        (:class:`DeviceAddFailed` when it failed); a passthrough device needs :meth:`use_host_devices` first."""
        return self._with_monitor(
            qmp, lambda mon: hotplug.hot_add(self.store, mon, vm, device, host=self.host, undo_timeout=undo_timeout)
        )

    def hot_add_many(
        self,
        vm: str,
        devices: Sequence[DeviceSpec | DeviceGroup],
        *,
        qmp: str | os.PathLike[str],
        undo_timeout: float = 5.0,
    ) -> list[Device]:
        """Several devices (and multifunction groups), all or nothing."""
        return self._with_monitor(
            qmp, lambda mon: hotplug.hot_add_many(self.store, mon, vm, devices, undo_timeout=undo_timeout)
        )

    def hot_add_group(
        self, vm: str, group: DeviceGroup, *, qmp: str | os.PathLike[str], undo_timeout: float = 5.0
    ) -> list[Device]:
        """One multifunction slot; function 0 is plugged last."""
        return self._with_monitor(
            qmp, lambda mon: hotplug.hot_add_group(self.store, mon, vm, group, undo_timeout=undo_timeout)
        )

    def hot_del(
        self, vm: str, device_uuid: str, *, qmp: str | os.PathLike[str], timeout: float = 5.0
    ) -> hotplug.HotDelResult:
        """:func:`~kvmslots.hotplug.hot_del`: unplug a device with its whole slot; ``pending`` when the guest
        has not ejected it within *timeout* seconds."""
        return self._with_monitor(
            qmp, lambda mon: hotplug.hot_del(self.store, mon, vm, device_uuid, timeout=timeout, host=self.host)
        )

    def reconcile(self, vm: str, *, qmp: str | os.PathLike[str]) -> hotplug.ReconcileReport:
        """:func:`~kvmslots.hotplug.reconcile`: repair the VM's records against QEMU's live view and report
        what was found and changed."""
        return self._with_monitor(qmp, lambda mon: hotplug.reconcile(self.store, mon, vm, host=self.host))

    # -- live migration (see kvmslots.hotplug.migrate for the order of the steps) ------------
    def migration_outgoing(self, vm: str, *, qmp: str | os.PathLike[str]) -> dict[str, Any]:
        """On the source: the migration document (:func:`~kvmslots.hotplug.migrate.outgoing`)."""
        return self._with_monitor(qmp, lambda mon: hotplug.outgoing(self.store, mon, vm))

    def plan_incoming(self, document: Any, *, incoming: str = "defer") -> hotplug.IncomingPlan:
        """On the target: record the incoming VM, get its QEMU arguments."""
        return hotplug.plan_incoming(self.store, document, incoming=incoming)

    def confirm_incoming(self, document: Any, *, qmp: str | os.PathLike[str]) -> hotplug.IncomingConfirmed:
        """On the target, after the migration completed: the confirmation the source releases on."""
        return self._with_monitor(qmp, lambda mon: hotplug.confirm_incoming(self.store, mon, document))

    def abort_incoming(self, document: Any) -> list[Device]:
        """On the target, after a failed migration: drop the incoming records."""
        return hotplug.abort_incoming(self.store, document)

    def release_outgoing(self, document: Any, confirmation: Any, *, qmp: str | os.PathLike[str]) -> list[Device]:
        """On the source, with the target's confirmation: forget the VM's records."""
        return self._with_monitor(
            qmp, lambda mon: hotplug.release_outgoing(self.store, mon, document, confirmation)
        )

    def _with_monitor(self, qmp: str | os.PathLike[str], work: Callable[[Monitor], Awaitable[T]]) -> T:
        return with_monitor(qmp, work, connect_timeout=self.connect_timeout, command_timeout=self.command_timeout)

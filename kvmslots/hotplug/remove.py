"""Hot remove: persist ``detaching``, ``device_del``, release the slot only on ``DEVICE_DELETED``."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from ..devid import validate_uuid
from ..errors import (
    HotplugError,
    InvalidPciRequest,
    MonitorConnectionLost,
    QemuCommandError,
    StateConflict,
    UnplugGuestError,
)
from ..model import Device, DeviceState
from ..monitor import Monitor, MonitorLike, validate_timeout
from ..passthrough import HostDevices, is_passthrough
from ..store import Store
from .common import UnplugRecorder, find, forget_all, group_of, removed_from_view, require_host, restore, unplug


class HotDelStatus(str, enum.Enum):
    """How :func:`hot_del` ended: ``removed`` (QEMU confirmed, the slot is free) or ``pending`` (the guest has
    not ejected the device yet; the slot stays taken)."""

    REMOVED = "removed"
    PENDING = "pending"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HotDelResult:
    """Outcome of :func:`hot_del`: ``removed`` (slot released) or ``pending`` (slot still taken).

    ``devices`` is everything that left (or is leaving) with it: the device
    alone, or every function of its multifunction slot, function 0 first.
    """

    status: HotDelStatus
    device: Device
    devices: tuple[Device, ...] = ()

    def __post_init__(self) -> None:
        if not self.devices:
            object.__setattr__(self, "devices", (self.device,))

    @property
    def removed(self) -> bool:
        """QEMU confirmed the removal: the records are gone and the slot is free."""
        return self.status is HotDelStatus.REMOVED

    @property
    def pending(self) -> bool:
        """The guest did not eject the device in time: it stays ``detaching`` and its slot taken until QEMU
        confirms the removal (to a later :func:`hot_del`, or :func:`reconcile` finds it gone)."""
        return self.status is HotDelStatus.PENDING


async def hot_del(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    device_uuid: str,
    *,
    timeout: float = 5.0,
    host: HostDevices | None = None,
) -> HotDelResult:
    """Hot-unplug a device and release its slot once QEMU confirms the removal.

    The device is persisted as ``detaching``, ``device_del`` is sent with the id
    rebuilt from the stored slot, and we wait for ``DEVICE_DELETED`` of exactly
    that id.  Confirmed: the device is forgotten.  Timeout: ``pending`` is
    returned and the slot stays taken.  Guest refusal: :class:`UnplugGuestError`
    and the device stays attached.  A passthrough device's host device is
    freed (and given back to the host) only once the removal is confirmed.

    A device in a multifunction slot leaves with its whole slot (QEMU
    unplugs every function of a slot together): ``device_del`` goes to
    function 0 and the removal is confirmed only when ``DEVICE_DELETED`` has
    arrived for every function.
    """
    uuid = validate_uuid(device_uuid)
    timeout = validate_timeout(timeout)
    async with store.vm_lock(vm):
        found = find(store, vm, uuid) if host is None else None
        if found is not None and is_passthrough(found):
            raise InvalidPciRequest(
                f"Device {uuid} passes a host device through: hot_del needs host=HostDevices(tracker)"
            )
        result = await _hot_del(store, monitor, vm, uuid, timeout)
        if result.removed:
            removed_from_view(monitor, (d.qemu_id for d in result.devices))
            if host is not None:
                for device in result.devices:
                    host.release_guest_device(vm, device)
        return result


async def _hot_del(store: Store, monitor: MonitorLike, vm: str, uuid: str, timeout: float) -> HotDelResult:
    with store.transaction() as txn:
        txn.get_vm(vm)
        asked = txn.get_device(vm, uuid)
        group = group_of(txn.devices(vm), asked)
        requested = txn.unplug_requested(vm)
        for device in group:
            if device.state is DeviceState.ATTACHING:
                raise StateConflict(f"{device.qemu_id} is still being attached; retry, or run reconcile after a crash",
                                    **device.facts(vm))
        # a second hot_del of a pending unplug keeps what is known: QEMU has the request
        was_requested = all(d.state is DeviceState.DETACHING and d.uuid in requested for d in group)
        for device in group:
            txn.set_state(vm, device.uuid, DeviceState.DETACHING, unplug_requested=was_requested)
    previous = {d.uuid: d.state for d in group}
    group = [d.with_state(DeviceState.DETACHING) for d in group]
    first = group[0]
    asked = next(d for d in group if d.uuid == uuid)
    others = [d.qemu_id for d in group[1:]]
    # QEMU has the device_del: a crash from then on is "pending"
    recorder = UnplugRecorder(store, vm, [d.uuid for d in group])

    try:
        deleted = await unplug(monitor, first.qemu_id, timeout, recorder, others)
    except MonitorConnectionLost as exc:
        exc.vm, exc.device_id = vm, first.qemu_id  # same type (a MonitorTimeout stays one), with the facts
        exc.args = (
            f"{exc}; {first.qemu_id} stays 'detaching' with slot {first.slot} taken until reconcile() "
            "sees what QEMU did",
        )
        raise
    except QemuCommandError as exc:
        live = await monitor.pci() if exc.error_class == "DeviceNotFound" else None
        if live is not None and not any(live.has(d.qemu_id) for d in group):
            deleted = True  # QEMU does not have it (already ejected, or never booted with it)
        else:
            with store.transaction() as txn:
                for device in group:
                    txn.set_state(vm, device.uuid, previous[device.uuid], unplug_requested=was_requested)
            raise HotplugError(
                f"QEMU refused device_del of {first.qemu_id}: {exc.qemu_message}",
                exc.qemu_message,
                **{**first.facts(vm), "state": str(previous[first.uuid])},
            ) from exc
    except UnplugGuestError as exc:
        restore(store, vm, [d.uuid for d in group], DeviceState.ATTACHED)
        exc.add_facts(**{**first.facts(vm), "state": str(DeviceState.ATTACHED)})
        raise
    if not deleted:
        return HotDelResult(HotDelStatus.PENDING, asked, tuple(group))
    forget_all(store, vm, group)
    return HotDelResult(HotDelStatus.REMOVED, asked, tuple(group))


async def watch_unplugs(
    store: Store, monitor: Monitor, vm: str, *, timeout: float | None = None, host: HostDevices | None = None
) -> list[str]:
    """Release the slots of ``detaching`` devices as their ``DEVICE_DELETED`` arrives.

    For a lifecycle manager that keeps the QMP connection open: a ``hot_del``
    that returned ``pending`` is finished here the moment the guest ejects.
    Returns the ids released, when nothing is detaching any more or after
    *timeout* seconds.
    """
    require_host(vm, store.devices(vm), host, "watch_unplugs")
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    released: list[str] = []
    gone_ids: set[str] = set()
    while True:
        detaching = {d.qemu_id: d for d in store.devices(vm) if d.state is DeviceState.DETACHING}
        if not detaching:
            return released
        with monitor.deleted_events(set(detaching)) as events:
            view = await monitor.pci()
            gone = [qid for qid in detaching if not view.has(qid)]
            if not gone:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                qid = await events.next(remaining)
                if qid is None:
                    return released
                gone = [qid]
        gone_ids.update(gone)
        async with store.vm_lock(vm):  # write under the lock, and only the records we saw
            devices = store.devices(vm)
            for qid in gone:
                group = group_of(devices, detaching[qid])
                if not all(d.qemu_id in gone_ids for d in group):
                    continue  # a slot is free only when every function is gone
                gone_ids.difference_update(d.qemu_id for d in group)  # a later incarnation starts afresh
                for device in forget_all(store, vm, [d for d in group if d.state is DeviceState.DETACHING]):
                    removed_from_view(monitor, [device.qemu_id])
                    if host is not None:
                        host.release_guest_device(vm, device)
                    released.append(device.qemu_id)

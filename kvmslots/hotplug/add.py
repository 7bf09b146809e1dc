"""Hot add: reserve (persist ``attaching``), ``device_add``, verify in ``query-pci``, commit ``attached``.

One path for a single device, a multifunction group and a batch: choose every
place through the topology in one write transaction, plug in order (a
group's function 0 last, since that is when QEMU tells the guest), verify
with one ``query-pci`` pipelined behind the last add, and undo in reverse
on any failure.  The live view is kept per connection (the monitor's
``placement_view``): QEMU refuses a ``device_add`` to a taken address
atomically, so it is read again only when that happens.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ..capabilities import QemuCapabilities, check_capabilities, check_qemu, hotplug_support, known_support
from ..errors import (
    BusNotHotpluggable,
    DeviceAddFailed,
    DeviceExists,
    HotplugError,
    InvalidPciRequest,
    KvmSlotsError,
    MonitorError,
    MonitorTimeout,
    QemuCommandError,
    SlotError,
    SlotOccupied,
    UnplugGuestError,
    VerificationFailed,
)
from ..model import Device, DeviceGroup, DeviceSpec, DeviceState
from ..monitor import AddsAndViews, KeepsConnectionFacts, MonitorLike, Reconnects, validate_timeout
from ..passthrough import HostDevices, PassthroughSpec, holds_host_device
from ..pciview import PciOccupancy
from ..store import Store
from .common import (
    RACE_RETRIES,
    SLOT_TAKEN_TEXT,
    Unit,
    UnplugRecorder,
    arguments_in_plug_order,
    check_unique_uuids,
    describe_live,
    find,
    forget_all,
    log,
    members,
    refuse_raw_passthrough,
    removed_from_view,
    restore,
    topology,
    typed,
    typed_unit,
    unit_devices,
    unplug_taken,
)


async def hot_add(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    spec: DeviceSpec | PassthroughSpec,
    *,
    host: HostDevices | None = None,
    undo_timeout: float = 5.0,
) -> Device:
    """Hot-plug *spec* into running VM *vm*; return the attached device.

    The place is chosen through the VM's topology (``pc``: the first free
    hotpluggable slot of ``pci.0``, then of the bridges; ``q35``: a free
    ``pcie-root-port``, slot 0) from QEMU's live view + our records + the
    mask, persisted as ``attaching`` before ``device_add``, then verified in
    ``query-pci`` and persisted as ``attached``.  On failure the device is
    removed again if QEMU took it and the slot is released, and a
    :class:`DeviceAddFailed` carrying QEMU's message is raised.  What QEMU
    cannot do (too old, no hotplug on the bus, another machine type) is
    refused before anything is reserved.

    A :class:`PassthroughSpec` first claims a host device through *host*
    (and binds it to vfio-pci), is plugged as ``vfio-pci,host=<address>`` with
    id ``hostdev-<uuid8>-pci-<slot>``, and its claim becomes an allocation;
    on failure the host device is freed with the slot.
    """
    refuse_raw_passthrough(spec)
    if isinstance(spec, PassthroughSpec) and host is None:
        raise InvalidPciRequest(f"Passthrough device {spec.uuid} needs host=HostDevices(tracker)")
    if isinstance(spec, DeviceGroup):
        raise InvalidPciRequest("hot_add takes one device; plug a DeviceGroup with hot_add_group")
    undo_timeout = validate_timeout(undo_timeout, "undo_timeout")
    async with store.vm_lock(vm):
        if not isinstance(spec, PassthroughSpec):
            return (await _add_units(store, monitor, vm, [await typed(monitor, spec)], undo_timeout))[0]
        assert host is not None
        store.get_vm(vm)
        existing = find(store, vm, spec.uuid)
        if existing is not None:
            raise DeviceExists(f"VM {vm!r} already has device {spec.uuid} as {existing.qemu_id} ({existing.state})",
                               **existing.facts(vm))
        hostdev = host.claim(vm, spec)
        try:
            guest = await typed(monitor, spec.guest_spec(hostdev.address))
            device = (await _add_units(store, monitor, vm, [guest], undo_timeout))[0]
        except BaseException:
            left = find(store, vm, spec.uuid)
            if left is None or not holds_host_device(left, hostdev.address):
                host.release(vm, hostdev.address)  # QEMU does not hold it: back to the host
            # else the guest device is left attaching/detaching: QEMU may hold the host
            # device, so it stays claimed until hot_del or reconcile settles it
            raise
        host.allocate(vm, hostdev.address)
        return device


async def hot_add_group(
    store: Store, monitor: MonitorLike, vm: str, group: DeviceGroup, *, undo_timeout: float = 5.0
) -> list[Device]:
    """Hot-plug a multifunction group into one free slot; returns its devices, function 0 first.

    Functions other than 0 are added first and function 0 last (QEMU
    announces the slot to the guest when function 0 arrives); any failure
    removes what was added and frees the slot.
    """
    return await hot_add_many(store, monitor, vm, [group], undo_timeout=undo_timeout)


async def hot_add_many(
    store: Store, monitor: MonitorLike, vm: str, specs: Sequence[DeviceSpec | DeviceGroup], *, undo_timeout: float = 5.0
) -> list[Device]:
    """Hot-plug several devices (and groups) with one reservation, the adds, one verification.

    All or nothing: if any ``device_add`` or the verification fails, the
    devices already added are removed again (in reverse order) and every
    slot is released; the raised :class:`DeviceAddFailed` names the failure.
    """
    units = list(specs)
    for unit in units:
        refuse_raw_passthrough(unit)
        if not isinstance(unit, (DeviceSpec, DeviceGroup)):
            raise InvalidPciRequest(
                "hot_add_many takes DeviceSpec and DeviceGroup only; add passthrough devices with hot_add"
            )
    check_unique_uuids(units)
    if not units:
        return []
    undo_timeout = validate_timeout(undo_timeout, "undo_timeout")
    async with store.vm_lock(vm):
        units = [await typed_unit(monitor, unit) for unit in units]
        return await _add_units(store, monitor, vm, units, undo_timeout)


async def _view(monitor: MonitorLike, fresh: bool) -> PciOccupancy:
    """The placement view kept for this connection, or a fresh one (and kept)."""
    cached = monitor.placement_view if isinstance(monitor, KeepsConnectionFacts) else None
    if cached is not None and not fresh:
        return cached
    view = await monitor.pci(placement_only=True)
    _keep(monitor, view)
    return view


def _keep(monitor: MonitorLike, view: PciOccupancy | None) -> None:
    if isinstance(monitor, KeepsConnectionFacts):
        monitor.placement_view = view


async def _add_units(
    store: Store, monitor: MonitorLike, vm: str, units: list[Unit], undo_timeout: float
) -> list[Device]:
    caps = monitor.capabilities if isinstance(monitor, KeepsConnectionFacts) else None
    if caps is None:  # first add on this connection: probe (and refuse) before anything is reserved
        caps = await check_qemu(monitor, store.get_vm(vm))
    explicit = any(unit.slot is not None for unit in units)
    for attempt in range(RACE_RETRIES + 1):
        view = await _view(monitor, fresh=attempt > 0)
        support = known_support(monitor, view)  # every bus asked about on this connection: no I/O
        if support is None:
            support = await hotplug_support(monitor, store.get_vm(vm), view)
        try:
            reserved = _reserve(store, vm, units, view, support, caps)
        except (SlotError, BusNotHotpluggable):
            if attempt > 0:
                raise
            # the kept view may be older than a removal made elsewhere, or than the firmware numbering
            # a port or bridge: judge by a fresh one
            continue
        added: list[Device] = []
        in_flight: Device | None = None
        try:
            after = None
            plug = [args for devices, _ in reserved for args in arguments_in_plug_order(devices)]
            by_id = {d.qemu_id: d for devices, _ in reserved for d in devices}
            for index, arguments in enumerate(plug):
                in_flight = by_id[arguments["id"]]
                if index == len(plug) - 1:
                    after = await _add_and_view(monitor, arguments)
                else:
                    await monitor.device_add(arguments)
                added.append(in_flight)
                in_flight = None
            assert after is not None
            _keep(monitor, after)
            _verify(reserved, after)
        except QemuCommandError as exc:
            if not added and not explicit and SLOT_TAKEN_TEXT in exc.qemu_message and attempt < RACE_RETRIES:
                forget_all(store, vm, [d for devices, _ in reserved for d in devices])
                log.warning("A slot of %s was taken behind our back; reading QEMU's view again", vm)
                continue
            failure = await asyncio.shield(_undo(store, monitor, vm, reserved, added, None, undo_timeout, exc))
            raise _left_behind(failure, store, vm, reserved) from exc
        except asyncio.CancelledError:
            _keep(monitor, None)
            await asyncio.shield(_undo(store, monitor, vm, reserved, added, in_flight, undo_timeout, "cancelled"))
            raise
        except BaseException as exc:
            _keep(monitor, None)
            failure = await asyncio.shield(_undo(store, monitor, vm, reserved, added, in_flight, undo_timeout, exc))
            raise _left_behind(failure, store, vm, reserved) from exc
        with store.transaction() as txn:
            for devices, _ in reserved:
                for device in devices:
                    txn.set_state(vm, device.uuid, DeviceState.ATTACHED)
        return [d.with_state(DeviceState.ATTACHED) for devices, _ in reserved for d in devices]
    raise AssertionError("unreachable")  # pragma: no cover


def _verify(reserved: list[tuple[list[Device], int | None]], after: PciOccupancy) -> None:
    for devices, number in reserved:
        for device in devices:
            live = after.find(device.qemu_id)
            if live is None or (live.bus, live.slot, live.function) != (number, device.slot, device.function):
                where = "absent" if live is None else f"at bus {live.bus} slot {live.slot} function {live.function}"
                raise VerificationFailed(
                    f"QEMU accepted {device.qemu_id} but query-pci shows it {where}, not at bus {number} "
                    f"slot {device.slot} function {device.function}"
                )


async def _add_and_view(monitor: MonitorLike, arguments: dict[str, Any]) -> PciOccupancy:
    """device_add, then the placement view (pipelined where the monitor can)."""
    if isinstance(monitor, AddsAndViews):
        return await monitor.device_add_and_view(arguments)
    await monitor.device_add(arguments)
    try:
        return await monitor.pci(placement_only=True)
    except QemuCommandError as exc:  # QEMU took the device: this must not read as a refused add
        raise MonitorError(f"QEMU took device_add of {arguments.get('id')} but then refused query-pci: {exc}") from exc


def _reserve(
    store: Store,
    vm: str,
    units: Sequence[Unit],
    view: PciOccupancy,
    support: dict[str, str | None],
    caps: QemuCapabilities | None,
) -> list[tuple[list[Device], int | None]]:
    """Phase one: choose and persist every place, in one write transaction (a refusal rolls it back)."""
    reserved: list[tuple[list[Device], int | None]] = []
    with store.transaction() as txn:
        vm_spec = txn.get_vm(vm)
        if caps is not None:
            check_capabilities(caps, vm_spec)  # the VM's machine may have been re-planned meanwhile
        topo = topology(txn, vm_spec, view, support)
        for unit in units:
            for spec in members(unit):
                existing = txn.find_device(vm, spec.uuid)
                if existing is not None:
                    raise DeviceExists(
                        f"VM {vm!r} already has device {spec.uuid} as {existing.qemu_id} ({existing.state})",
                        **existing.facts(vm),
                    )
            bus = unit.bus
            if bus is not None and unit.slot is not None and bus in topo.buses:
                target = topo.buses[bus]
                if not target.slots.is_free(unit.slot) and not target.slots.is_masked(unit.slot):
                    number = target.number
                    holder = target.holder(unit.slot)
                    if number is not None and holder is not None and not holder.count("-pci-"):
                        holder = describe_live(view.at(number, unit.slot))
                    raise SlotOccupied(unit.slot, holder, bus)
            place = topo.place(len(members(unit)), bus=bus, slot=unit.slot, hotplug=True, holder=unit.uuid)
            devices = unit_devices(unit, place.bus, place.slot, DeviceState.ATTACHING)
            for device in devices:
                txn.add_device(vm, device)
            reserved.append((devices, topo.number(place.bus)))
    return reserved


async def _undo(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    reserved: list[tuple[list[Device], int | None]],
    added: list[Device],
    in_flight: Device | None,
    timeout: float,
    cause: object,
) -> DeviceAddFailed:
    """Undo in reverse: remove what QEMU took, settle the one in flight, release the rest."""
    single = len(reserved) == 1 and len(reserved[0][0]) == 1
    qemu_message = getattr(cause, "qemu_message", None)
    if single:
        device = reserved[0][0][0]
        if isinstance(cause, QemuCommandError) and not added:
            forget_all(store, vm, [device])
            return DeviceAddFailed(
                f"QEMU refused device_add of {device.qemu_id} at {device.bus} slot {device.slot}", cause.qemu_message
            )
        if device is in_flight:
            return await _undo_unknown(store, monitor, vm, [device], timeout, cause)
        failure = cause if isinstance(cause, DeviceAddFailed) else DeviceAddFailed(_cause_text(cause, device))
        return await _undo_added(store, monitor, vm, [device], timeout, failure)
    notes: list[str] = []
    for devices, _ in reversed(reserved):
        taken = [d for d in devices if d in added]
        if in_flight in devices and not isinstance(cause, QemuCommandError):
            result = await _undo_unknown(store, monitor, vm, devices, timeout, cause)
            notes.append(str(result))
        elif taken:
            clean = DeviceAddFailed(", ".join(d.qemu_id for d in devices))
            result = await _undo_added(store, monitor, vm, devices, timeout, clean, taken)
            if result is not clean:  # _undo_added says what it could not undo
                notes.append(str(result))
        else:
            forget_all(store, vm, devices)
    count = sum(len(devices) for devices, _ in reserved)
    what = "Batch hot add" if len(reserved) > 1 else "Hot add of a multifunction group"
    outcome = "was undone" if not notes else "was undone as far as QEMU allowed"
    text = f"{what} of {count} device(s) to {vm!r} failed and {outcome}"
    if not isinstance(cause, QemuCommandError):
        text += f": {cause!r}" if not str(cause) else f": {cause}"
    if notes:
        text += " (" + "; ".join(notes) + ")"
    kind = type(cause) if isinstance(cause, DeviceAddFailed) else DeviceAddFailed  # keep VerificationFailed
    return kind(text, qemu_message if isinstance(cause, QemuCommandError) else None)


def _left_behind(
    failure: DeviceAddFailed, store: Store, vm: str, reserved: list[tuple[list[Device], int | None]]
) -> DeviceAddFailed:
    """The failure with its facts: the device (the first, for a batch) and ``left``, what stays recorded
    after the undo (QEMU id -> state; empty when nothing was left behind)."""
    devices = [d for group, _ in reserved for d in group]
    left: dict[str, str] = {}
    try:
        for device in devices:
            record = find(store, vm, device.uuid)
            if record is not None:
                left[record.qemu_id] = record.state.value
    except KvmSlotsError as exc:  # the store is gone too: say what is known
        log.error("Cannot read what a failed hot add of %s left behind: %s", vm, exc)
        left = {d.qemu_id: "unknown" for d in devices}
    first = devices[0]
    new_state = left.get(first.qemu_id)
    return failure.add_facts(
        vm=vm, uuid=first.uuid, device_id=first.qemu_id, bus=first.bus, slot=first.slot, state="attaching",
        new_state=new_state if new_state is not None else "released", left=left,
    )


def _cause_text(cause: object, device: Device) -> str:
    if isinstance(cause, BaseException) and not str(cause):
        return f"Adding {device.qemu_id} failed: {cause!r}"
    return str(cause)


async def _undo_added(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    devices: list[Device],
    timeout: float,
    failure: DeviceAddFailed,
    taken: list[Device] | None = None,
) -> DeviceAddFailed:
    """QEMU has the device (or some functions of a group) but the add failed: remove, then release.

    A group whose function 0 QEMU has is removed by unplugging function 0 and
    waiting for every function's ``DEVICE_DELETED``; functions QEMU has
    without their function 0 (the guest never saw them) are unplugged one by
    one.  If the guest does not confirm the removal in time the devices are
    left ``detaching`` (their slot stays taken) and the error says so; if
    QEMU refuses the removal, they are left ``attaching`` for
    :func:`reconcile`.
    """
    taken = list(devices) if taken is None else taken
    slot = devices[0].slot

    def with_note(note: str, extra: str | None = None) -> DeviceAddFailed:
        message = " / ".join(m for m in (failure.qemu_message, extra) if m) or None
        return type(failure)(f"{failure}; {note}", message)

    recorder = UnplugRecorder(store, vm, [d.uuid for d in devices])  # a crash during the wait leaves 'detaching'

    def left() -> str:
        return "'detaching' (QEMU has its unplug)" if recorder.sent else "'attaching'"

    try:
        deleted = await unplug_taken(monitor, taken, timeout, recorder)
    except QemuCommandError as exc:
        log.error("Could not undo %s: %s", taken[0].qemu_id, exc)
        return with_note(
            f"undoing it failed too (device_del: {exc.qemu_message}), so it is left 'attaching' with slot "
            f"{slot} reserved until reconcile()", exc.qemu_message
        )
    except UnplugGuestError as exc:  # the guest keeps it: it is QEMU's and ours, as after a failed add
        if recorder.sent:
            restore(store, vm, [d.uuid for d in devices], DeviceState.ATTACHING)
        log.error("Could not undo %s: %s", taken[0].qemu_id, exc)
        return with_note(
            f"undoing it failed too ({exc}), so it is left 'attaching' with slot {slot} reserved until reconcile()",
            exc.qemu_message,
        )
    except (MonitorError, HotplugError) as exc:
        log.error("Could not undo %s: %s", taken[0].qemu_id, exc)
        return with_note(
            f"undoing it failed too ({exc}), so it is left {left()} with slot {slot} reserved until reconcile()",
            getattr(exc, "qemu_message", None),
        )
    if deleted:
        state = DeviceState.DETACHING if recorder.sent else DeviceState.ATTACHING
        forget_all(store, vm, [d.with_state(state) for d in devices])
        removed_from_view(monitor, [d.qemu_id for d in devices])
        return failure
    with store.transaction() as txn:
        for device in devices:
            txn.set_state(vm, device.uuid, DeviceState.DETACHING, unplug_requested=True)
    return with_note(
        f"its removal is not confirmed yet, so slot {slot} stays reserved until DEVICE_DELETED arrives "
        "(hot_del, watch_unplugs or reconcile finishes it)"
    )


async def _undo_unknown(
    store: Store, monitor: MonitorLike, vm: str, devices: list[Device], timeout: float, cause: object
) -> DeviceAddFailed:
    """``device_add`` was sent but its outcome is unknown (lost connection, cancellation):
    find out what QEMU did, then undo.

    If QEMU cannot be asked (no reconnect), the devices stay ``attaching``
    (their slot taken) and :func:`reconcile` settles them later.
    """
    view: PciOccupancy | None = None
    first = devices[0]
    try:
        view = await monitor.pci()
    except MonitorError:
        # After silence (MonitorTimeout) QEMU is wedged: asking again would only wait again.
        if not isinstance(cause, MonitorTimeout) and isinstance(monitor, Reconnects):
            try:
                await monitor.reconnect()
                view = await monitor.pci()
            except MonitorError as exc:
                log.error("Reconnect after a lost connection failed: %s", exc)
    if view is None:
        return DeviceAddFailed(
            f"QMP connection lost while adding {first.qemu_id}: {cause}; the device is left 'attaching' "
            f"with slot {first.slot} reserved until reconcile() sees what QEMU did"
        )
    what = f"QMP connection lost while adding {first.qemu_id}" if isinstance(cause, MonitorError) else (
        f"Adding {first.qemu_id} was {cause}"
    )
    failure = DeviceAddFailed(f"{what}: {cause}" if isinstance(cause, MonitorError) else what)
    taken = [d for d in devices if view.has(d.qemu_id)]
    if not taken:
        forget_all(store, vm, devices)
        return failure
    return await _undo_added(store, monitor, vm, devices, timeout, failure, taken)


__all__ = ["hot_add", "hot_add_group", "hot_add_many"]


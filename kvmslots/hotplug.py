"""Boot planning, hot add, hot remove and reconcile: the two-phase orchestration.

Each operation follows one rule: persist the intent, act on QEMU, verify,
commit; undo in reverse on failure.  Occupancy always comes from both
sources at once, our records (which know about devices being attached or
detached right now) and QEMU's live ``query-pci`` (which knows about devices
someone else added), plus the VM's reservation mask.  A slot is free only if
all three agree, and becomes free again only when removal is confirmed.

These coroutines take a :class:`~kvmslots.store.Store` and a monitor as
arguments (anything that implements :class:`~kvmslots.monitor.MonitorLike`),
so a lifecycle manager can hand in its own connection and tests can hand in
a fault-injecting one.  :mod:`kvmslots.sync` wraps them for callers that are
not async.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from .devid import coerce_props, is_passthrough_driver, validate_uuid
from .errors import (
    InvalidDriver,
    InvalidPciRequest,
    DeviceAddFailed,
    DeviceExists,
    HotplugError,
    MonitorConnectionLost,
    MonitorError,
    MonitorTimeout,
    QemuCommandError,
    SlotOccupied,
    StateConflict,
    StateError,
    UnplugGuestError,
    VerificationFailed,
)
from .model import Device, DeviceSpec, DeviceState, VMSpec
from .monitor import Monitor, MonitorLike, validate_timeout
from .passthrough import HostDevices, PassthroughSpec, holds_host_device, is_passthrough
from .pciview import PciFunction, PciOccupancy
from .slots import SlotMap
from .store import Store, Transaction

__all__ = [
    "BootPlan",
    "HotDelStatus",
    "HotDelResult",
    "ReconcileReport",
    "plan_boot",
    "hot_add",
    "hot_del",
    "reconcile",
    "watch_unplugs",
    "hot_add_many",
]

log = logging.getLogger(__name__)

#: How often hot_add retries when a slot it chose was taken behind its back in the meantime.
_RACE_RETRIES = 3
#: QEMU's message when device_add hits a taken slot (``PCI: slot 5 function 0 not available for ...``).
_SLOT_TAKEN_TEXT = "not available for"


# --------------------------------------------------------------------------- boot


@dataclass(frozen=True)
class BootPlan:
    """The result of :func:`plan_boot`: devices with slots, and the QEMU arguments."""

    vm: VMSpec
    devices: tuple[Device, ...]
    dropped: tuple[Device, ...] = ()

    @property
    def qemu_args(self) -> list[str]:
        """``["-device", "virtio-net-pci,id=nic-9f3c2a1b-pci-4,bus=pci.0,addr=0x4", ...]``."""
        args: list[str] = []
        for device in self.devices:
            args += ["-device", device.device_option()]
        return args


async def plan_boot(
    store: Store,
    vm: VMSpec | str,
    devices: Sequence[DeviceSpec | PassthroughSpec],
    *,
    host: HostDevices | None = None,
) -> BootPlan:
    """Give every device of a VM that is about to boot its slot, and persist the plan.

    A device keeps the slot stored for it (or the slot its spec asks for);
    a stored slot that the mask reserves or another device holds is an error.
    The others get the first free slots, in the order given.  The list is the
    VM's whole device set: stored devices not in it are dropped.  Planning
    the same devices again gives the same slots, ids and arguments.

    A :class:`PassthroughSpec` keeps the host device it already holds, or
    claims one through *host*; its ``-device vfio-pci,...,host=<address>``
    argument is emitted like any other.  If planning fails, the claims it
    made are freed again.
    """
    name = vm if isinstance(vm, str) else vm.name
    async with store.vm_lock(name):
        stored = {d.uuid: d for d in store.devices(name)} if store.has_vm(name) else {}
        _require_host(name, stored.values(), host, "plan_boot")
        specs: list[DeviceSpec] = []
        new_claims: list[str] = []
        try:
            for spec in devices:
                refuse_raw_passthrough(spec)
                if isinstance(spec, PassthroughSpec):
                    address = _host_for_boot(name, spec, stored.get(spec.uuid), host, new_claims)
                    specs.append(spec.guest_spec(address))
                else:
                    specs.append(spec)
            plan = _plan_boot(store, vm, specs)
        except BaseException:
            for address in new_claims:
                assert host is not None
                host.release(name, address)
            raise
        if host is not None:
            for device in plan.dropped:
                host.release_guest_device(name, device)
        return plan


def _require_host(vm: str, devices: Iterable[Device], host: HostDevices | None, what: str) -> None:
    """Passthrough records must not be dropped without freeing their host devices."""
    if host is None and any(is_passthrough(d) for d in devices):
        raise InvalidPciRequest(f"VM {vm!r} has passthrough devices: {what} needs host=HostDevices(tracker)")


def refuse_raw_passthrough(spec: DeviceSpec | PassthroughSpec) -> None:
    """A host device reaches a guest only through the tracker (PassthroughSpec), never directly."""
    if isinstance(spec, DeviceSpec) and is_passthrough_driver(spec.driver):
        raise InvalidDriver(
            f"Driver {spec.driver!r} passes a host device through: use PassthroughSpec so the tracker claims it"
        )


def _host_for_boot(
    vm: str, spec: PassthroughSpec, stored: Device | None, host: HostDevices | None, new_claims: list[str]
) -> str:
    """The host address a passthrough device boots with: the one it holds, or a new claim."""
    if host is None:
        raise InvalidPciRequest(f"Passthrough device {spec.uuid} needs host=HostDevices(tracker) to claim a host device")
    if stored is not None and is_passthrough(stored):
        address = str(stored.props["host"])
        held = host.tracker.get_instance_pci_devs(vm, spec.uuid)
        if [d.address for d in held] == [address]:
            return address
    address = host.claim(vm, spec).address
    new_claims.append(address)
    return address


def _plan_boot(store: Store, vm: VMSpec | str, specs: list[DeviceSpec]) -> BootPlan:
    _check_unique_uuids(specs)
    with store.transaction() as txn:
        if isinstance(vm, str):
            vm = txn.get_vm(vm)
        stored = {device.uuid: device for device in txn.devices(vm.name)}
        maps: dict[str, SlotMap] = {}
        holders: dict[tuple[str, int], str] = {}

        def slot_map(bus: str) -> SlotMap:
            if bus not in maps:
                maps[bus] = SlotMap(vm.mask_for(bus), bus=bus)
            return maps[bus]

        chosen: dict[str, int] = {}
        for spec in specs:  # first the devices whose slot is fixed
            old = stored.get(spec.uuid)
            slot = spec.slot
            if old is not None and old.bus == spec.bus:
                if slot is not None and slot != old.slot:
                    raise StateConflict(
                        f"Device {spec.uuid} asks for slot {slot} but is stored at slot {old.slot} ({old.qemu_id})"
                    )
                slot = old.slot
            if slot is not None:
                slot_map(spec.bus).reserve(slot, holders.get((spec.bus, slot)))
                holders[(spec.bus, slot)] = spec.uuid
                chosen[spec.uuid] = slot
        for spec in specs:  # then the rest, first free slot wins
            if spec.uuid not in chosen:
                chosen[spec.uuid] = slot_map(spec.bus).reserve()
        planned = [Device.from_spec(spec, chosen[spec.uuid], DeviceState.PLANNED) for spec in specs]
        _check_unique_ids(planned)
        dropped = [device for uuid, device in stored.items() if uuid not in chosen]
        txn.put_vm(vm)
        for device in stored.values():
            txn.remove_device(vm.name, device.uuid)
        for device in planned:
            txn.add_device(vm.name, device)
    return BootPlan(vm, tuple(planned), tuple(dropped))


def _check_unique_uuids(specs: Sequence[DeviceSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.uuid in seen:
            raise DeviceExists(f"Device UUID {spec.uuid} is listed twice")
        seen.add(spec.uuid)


def _check_unique_ids(devices: Sequence[Device]) -> None:
    seen: set[str] = set()
    for device in devices:
        if device.qemu_id in seen:
            raise DeviceExists(
                f"Two devices would get the id {device.qemu_id} (same type, first UUID group and slot)"
            )
        seen.add(device.qemu_id)


# --------------------------------------------------------------------------- hot add


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

    occupied = QEMU's live view + our records + the mask; the first free slot
    (or ``spec.slot``) is persisted as ``attaching`` before ``device_add``, then
    verified in ``query-pci`` and persisted as ``attached``.  On failure the
    device is removed again if QEMU took it and the slot is released, and a
    :class:`DeviceAddFailed` carrying QEMU's message is raised.

    A :class:`PassthroughSpec` first claims a host device through *host*
    (and binds it to vfio-pci), is plugged as ``vfio-pci,host=<address>`` with
    id ``hostdev-<uuid8>-pci-<slot>``, and its claim becomes an allocation;
    on failure the host device is freed with the slot.
    """
    refuse_raw_passthrough(spec)
    if isinstance(spec, PassthroughSpec) and host is None:
        raise InvalidPciRequest(f"Passthrough device {spec.uuid} needs host=HostDevices(tracker)")
    undo_timeout = validate_timeout(undo_timeout, "undo_timeout")
    async with store.vm_lock(vm):
        if not isinstance(spec, PassthroughSpec):
            return await _hot_add(store, monitor, vm, await _typed(monitor, spec), undo_timeout)
        assert host is not None
        store.get_vm(vm)
        existing = _find(store, vm, spec.uuid)
        if existing is not None:
            raise DeviceExists(f"VM {vm!r} already has device {spec.uuid} as {existing.qemu_id} ({existing.state})")
        hostdev = host.claim(vm, spec)
        try:
            guest = await _typed(monitor, spec.guest_spec(hostdev.address))
            device = await _hot_add(store, monitor, vm, guest, undo_timeout)
        except BaseException:
            left = _find(store, vm, spec.uuid)
            if left is None or not holds_host_device(left, hostdev.address):
                host.release(vm, hostdev.address)  # QEMU does not hold it: back to the host
            # else the guest device is left attaching/detaching: QEMU may hold the host
            # device, so it stays claimed until hot_del or reconcile settles it
            raise
        host.allocate(vm, hostdev.address)
        return device


async def _typed(monitor: MonitorLike, spec: DeviceSpec) -> DeviceSpec:
    """*spec* with text values of integer properties turned into integers, as QEMU types them.

    Only asked of QEMU (``device-list-properties``, once per model and
    connection) when some text value has a digit in it; everything else stays
    the text it was given as.  A model QEMU does not know is left to
    ``device_add`` to refuse, with QEMU's own message.
    """
    lookup = getattr(monitor, "property_types", None)
    if lookup is None or not any(isinstance(v, str) and any(c.isdigit() for c in v) for v in spec.props.values()):
        return spec
    try:
        types = await lookup(spec.driver)
    except QemuCommandError:
        return spec
    return replace(spec, props=coerce_props(spec.props, types))


async def _hot_add(store: Store, monitor: MonitorLike, vm: str, spec: DeviceSpec, undo_timeout: float) -> Device:
    for attempt in range(_RACE_RETRIES + 1):
        view = await monitor.pci(placement_only=True)
        device, bus_number = _reserve_for_add(store, vm, spec, view)
        try:
            after = await _add_and_view(monitor, device.qmp_arguments())
        except QemuCommandError as exc:
            _forget(store, vm, device)
            if spec.slot is None and _SLOT_TAKEN_TEXT in exc.qemu_message and attempt < _RACE_RETRIES:
                log.warning("Slot %d of %s was taken behind our back; choosing again", device.slot, vm)
                continue
            raise DeviceAddFailed(
                f"QEMU refused device_add of {device.qemu_id} at {device.bus} slot {device.slot}", exc.qemu_message
            ) from exc
        except MonitorConnectionLost as exc:
            raise await _undo_unknown(store, monitor, vm, device, undo_timeout, exc) from exc
        except asyncio.CancelledError:
            await asyncio.shield(_undo_unknown(store, monitor, vm, device, undo_timeout, "cancelled"))
            raise
        break
    live = after.find(device.qemu_id)
    if live is None or (live.bus, live.slot) != (bus_number, device.slot):
        where = "absent" if live is None else f"at bus {live.bus} slot {live.slot}"
        failure = VerificationFailed(
            f"QEMU accepted {device.qemu_id} but query-pci shows it {where}, not at bus {bus_number} slot {device.slot}"
        )
        raise await _undo_added(store, monitor, vm, device, undo_timeout, failure)
    with store.transaction() as txn:
        txn.set_state(vm, device.uuid, DeviceState.ATTACHED)
    return device.with_state(DeviceState.ATTACHED)


async def _add_and_view(monitor: MonitorLike, arguments: dict[str, Any]) -> PciOccupancy:
    """device_add, then the placement view (pipelined where the monitor can)."""
    pipelined = getattr(monitor, "device_add_and_view", None)
    if pipelined is not None:
        view: PciOccupancy = await pipelined(arguments)
        return view
    await monitor.device_add(arguments)
    return await monitor.pci(placement_only=True)


def _reserve_for_add(store: Store, vm: str, spec: DeviceSpec, view: PciOccupancy) -> tuple[Device, int]:
    """Phase one of a hot add: choose and persist the slot, in one write transaction."""
    return _reserve_many(store, vm, [spec], view)[0]


def _reserve_many(store: Store, vm: str, specs: Sequence[DeviceSpec], view: PciOccupancy) -> list[tuple[Device, int]]:
    """Choose and persist slots for several devices at once (first free slots, in order)."""
    numbers = {spec.bus: view.bus_number(spec.bus) for spec in specs}
    reserved: list[tuple[Device, int]] = []
    with store.transaction() as txn:
        vm_spec = txn.get_vm(vm)
        stored = txn.devices(vm)
        maps: dict[str, SlotMap] = {}
        for spec in specs:
            existing = txn.find_device(vm, spec.uuid)
            if existing is not None:
                raise DeviceExists(f"VM {vm!r} already has device {spec.uuid} as {existing.qemu_id} ({existing.state})")
            slot_map = maps.get(spec.bus)
            if slot_map is None:
                slot_map = maps[spec.bus] = SlotMap(_live_mask(vm_spec, spec.bus, view), bus=spec.bus)
                slot_map.occupy(d.slot for d in stored if d.bus == spec.bus)
                slot_map.occupy(view.slots(numbers[spec.bus]))
            if spec.slot is not None and not slot_map.is_free(spec.slot) and not slot_map.is_masked(spec.slot):
                holder = next((d.qemu_id for d in stored if d.bus == spec.bus and d.slot == spec.slot), None)
                if holder is None:
                    holder = next((d.qemu_id for d, _ in reserved if d.bus == spec.bus and d.slot == spec.slot), None)
                if holder is None:
                    holder = _describe_live(view.at(numbers[spec.bus], spec.slot))
                raise SlotOccupied(spec.slot, holder, spec.bus)
            device = Device.from_spec(spec, slot_map.reserve(spec.slot), DeviceState.ATTACHING)
            txn.add_device(vm, device)
            reserved.append((device, numbers[spec.bus]))
    return reserved


async def hot_add_many(
    store: Store, monitor: MonitorLike, vm: str, specs: Sequence[DeviceSpec], *, undo_timeout: float = 5.0
) -> list[Device]:
    """Hot-plug several devices with one occupancy read, one reservation, the adds, one verification.

    All or nothing: if any ``device_add`` or the verification fails, the
    devices already added are removed again (in reverse order) and every
    slot is released; the raised :class:`DeviceAddFailed` names the failure.
    """
    specs = list(specs)
    for spec in specs:
        refuse_raw_passthrough(spec)
        if not isinstance(spec, DeviceSpec):
            raise InvalidPciRequest("hot_add_many takes DeviceSpec only; add passthrough devices with hot_add")
    if len({spec.uuid for spec in specs}) != len(specs):
        raise DeviceExists("A device UUID is listed twice")
    if not specs:
        return []
    undo_timeout = validate_timeout(undo_timeout, "undo_timeout")
    async with store.vm_lock(vm):
        specs = [await _typed(monitor, spec) for spec in specs]
        view = await monitor.pci(placement_only=True)
        reserved = _reserve_many(store, vm, specs, view)
        added: list[Device] = []
        in_flight: Device | None = None
        try:
            for device, _ in reserved:
                in_flight = device
                await monitor.device_add(device.qmp_arguments())
                added.append(device)
                in_flight = None
            live = await monitor.pci(placement_only=True)
            for device, bus_number in reserved:
                found = live.find(device.qemu_id)
                if found is None or (found.bus, found.slot) != (bus_number, device.slot):
                    raise VerificationFailed(
                        f"QEMU accepted {device.qemu_id} but query-pci does not show it at bus {bus_number} "
                        f"slot {device.slot}"
                    )
        except BaseException as exc:
            failure = await asyncio.shield(
                _undo_many(store, monitor, vm, reserved, added, in_flight, undo_timeout, exc)
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise failure from exc
        with store.transaction() as txn:
            for device, _ in reserved:
                txn.set_state(vm, device.uuid, DeviceState.ATTACHED)
        return [device.with_state(DeviceState.ATTACHED) for device, _ in reserved]


async def _undo_many(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    reserved: list[tuple[Device, int]],
    added: list[Device],
    in_flight: Device | None,
    timeout: float,
    cause: BaseException,
) -> DeviceAddFailed:
    """Undo a batch in reverse: remove what QEMU took, settle the one in flight, release the rest."""
    qemu_message = getattr(cause, "qemu_message", None)
    notes: list[str] = []
    for device, _ in reversed(reserved):
        if device in added:
            clean = DeviceAddFailed(device.qemu_id)
            result = await _undo_added(store, monitor, vm, device, timeout, clean)
            if result is not clean:  # _undo_added says what it could not undo
                notes.append(str(result))
        elif device is in_flight and not isinstance(cause, QemuCommandError):
            result = await _undo_unknown(store, monitor, vm, device, timeout, cause)
            notes.append(str(result))
        else:
            _forget(store, vm, device)
    text = f"Batch hot add of {len(reserved)} device(s) to {vm!r} failed and was undone"
    if not isinstance(cause, QemuCommandError):
        text += f": {cause!r}" if not str(cause) else f": {cause}"
    if notes:
        text += " (" + "; ".join(notes) + ")"
    kind = type(cause) if isinstance(cause, DeviceAddFailed) else DeviceAddFailed  # keep VerificationFailed
    return kind(text, qemu_message if isinstance(cause, QemuCommandError) else None)


#: Below a PCIe port only slot 0 exists for the guest.
PCIE_PORT_RESERVATIONS = "0" + "1" * 31


def _live_mask(vm: VMSpec, bus: str, view: PciOccupancy) -> str:
    """The mask of *bus* as QEMU shows it: below a PCIe port only slot 0 (plus what the VM masks there)."""
    if not view.is_pcie_port(bus):
        return vm.mask_for(bus)
    configured = vm.bus_masks.get(bus)
    if configured is None:
        return PCIE_PORT_RESERVATIONS
    return "".join("1" if "1" in pair else "0" for pair in zip(configured, PCIE_PORT_RESERVATIONS))


def _describe_live(functions: list[PciFunction]) -> str:
    if not functions:
        return "a device QEMU shows"
    first = functions[0]
    name = f"id {first.qdev_id!r}" if first.qdev_id else "no id"
    return f"{first.description or 'a device'} in QEMU ({name})"


def _find(store: Store, vm: str, uuid: str) -> Device | None:
    with store.reading() as txn:
        return txn.find_device(vm, uuid)


class _UnplugRecorder:
    """The ``on_sent`` callback of ``device_del``: records that QEMU has the unplug request.

    It never raises: QEMU already has the request, so a database that is busy
    or failing at this moment must not turn a sent unplug into an error that
    says nothing was changed.  The record then only lacks the flag, and
    :func:`reconcile` asks QEMU again (which answers "already in the process
    of unplug").
    """

    def __init__(self, store: Store, vm: str, uuid: str) -> None:
        self.store, self.vm, self.uuid = store, vm, uuid
        self.sent = False
        self.already = False

    def __call__(self, already: bool) -> None:
        self.sent, self.already = True, already
        try:
            with self.store.transaction() as txn:
                txn.set_state(self.vm, self.uuid, DeviceState.DETACHING, unplug_requested=True)
        except StateError as exc:
            log.warning("QEMU has the unplug of %s in %s but it could not be recorded: %s", self.uuid, self.vm, exc)


def _forget(store: Store, vm: str, device: Device) -> bool:
    """Release *device*'s slot, but only if the record is still the one we acted on."""
    with store.transaction() as txn:
        return txn.remove_device(vm, device.uuid, expect=device)


async def _undo_added(
    store: Store, monitor: MonitorLike, vm: str, device: Device, timeout: float, failure: DeviceAddFailed
) -> DeviceAddFailed:
    """QEMU has the device but the add failed: remove it, then release the slot.

    If the guest does not confirm the removal in time the device is left
    ``detaching`` (its slot stays taken) and the error says so; if QEMU
    refuses the removal, it is left ``attaching`` for :func:`reconcile`.
    """
    def with_note(note: str, extra: str | None = None) -> DeviceAddFailed:
        message = " / ".join(m for m in (failure.qemu_message, extra) if m) or None
        return type(failure)(f"{failure}; {note}", message)

    recorder = _UnplugRecorder(store, vm, device.uuid)  # a crash during the wait leaves 'detaching'

    def left() -> str:
        return "'detaching' (QEMU has its unplug)" if recorder.sent else "'attaching'"

    try:
        deleted = await monitor.device_del(device.qemu_id, timeout, recorder)
    except QemuCommandError as exc:
        if exc.error_class != "DeviceNotFound":
            log.error("Could not undo %s: %s", device.qemu_id, exc)
            return with_note(
                f"undoing it failed too (device_del: {exc.qemu_message}), so it is left 'attaching' with slot "
                f"{device.slot} reserved until reconcile()", exc.qemu_message
            )
        deleted = True
    except UnplugGuestError as exc:  # the guest keeps it: it is QEMU's and ours, as after a failed add
        if recorder.sent:
            _restore(store, vm, device.uuid, DeviceState.ATTACHING)
        log.error("Could not undo %s: %s", device.qemu_id, exc)
        return with_note(
            f"undoing it failed too ({exc}), so it is left 'attaching' with slot {device.slot} reserved until reconcile()",
            exc.qemu_message,
        )
    except (MonitorError, HotplugError) as exc:
        log.error("Could not undo %s: %s", device.qemu_id, exc)
        return with_note(
            f"undoing it failed too ({exc}), so it is left {left()} with slot {device.slot} reserved until reconcile()",
            getattr(exc, "qemu_message", None),
        )
    if deleted:
        _forget(store, vm, device.with_state(DeviceState.DETACHING) if recorder.sent else device)
        return failure
    with store.transaction() as txn:
        txn.set_state(vm, device.uuid, DeviceState.DETACHING, unplug_requested=True)
    return with_note(
        f"its removal is not confirmed yet, so slot {device.slot} stays reserved until DEVICE_DELETED arrives "
        "(hot_del, watch_unplugs or reconcile finishes it)"
    )


async def _undo_unknown(
    store: Store, monitor: MonitorLike, vm: str, device: Device, timeout: float, cause: object
) -> DeviceAddFailed:
    """``device_add`` was sent but its outcome is unknown (lost connection, cancellation):
    find out what QEMU did, then undo.

    If QEMU cannot be asked (no reconnect), the device stays ``attaching``
    (its slot taken) and :func:`reconcile` settles it later.
    """
    view: PciOccupancy | None = None
    try:
        view = await monitor.pci()
    except MonitorError:
        # After silence (MonitorTimeout) QEMU is wedged: asking again would only wait again.
        reconnect = None if isinstance(cause, MonitorTimeout) else getattr(monitor, "reconnect", None)
        if reconnect is not None:
            try:
                await reconnect()
                view = await monitor.pci()
            except MonitorError as exc:
                log.error("Reconnect after a lost connection failed: %s", exc)
    if view is None:
        return DeviceAddFailed(
            f"QMP connection lost while adding {device.qemu_id}: {cause}; the device is left 'attaching' "
            f"with slot {device.slot} reserved until reconcile() sees what QEMU did"
        )
    what = f"QMP connection lost while adding {device.qemu_id}" if isinstance(cause, MonitorError) else (
        f"Adding {device.qemu_id} was {cause}"
    )
    failure = DeviceAddFailed(f"{what}: {cause}" if isinstance(cause, MonitorError) else what)
    if not view.has(device.qemu_id):
        _forget(store, vm, device)
        return failure
    return await _undo_added(store, monitor, vm, device, timeout, failure)


# --------------------------------------------------------------------------- hot remove


class HotDelStatus(str, enum.Enum):
    REMOVED = "removed"
    PENDING = "pending"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HotDelResult:
    """Outcome of :func:`hot_del`: ``removed`` (slot released) or ``pending`` (slot still taken)."""

    status: HotDelStatus
    device: Device

    @property
    def removed(self) -> bool:
        return self.status is HotDelStatus.REMOVED

    @property
    def pending(self) -> bool:
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
    """
    uuid = validate_uuid(device_uuid)
    timeout = validate_timeout(timeout)
    async with store.vm_lock(vm):
        found = _find(store, vm, uuid) if host is None else None
        if found is not None and is_passthrough(found):
            raise InvalidPciRequest(f"Device {uuid} passes a host device through: hot_del needs host=HostDevices(tracker)")
        result = await _hot_del(store, monitor, vm, uuid, timeout)
        if result.removed and host is not None:
            host.release_guest_device(vm, result.device)
        return result


async def _hot_del(store: Store, monitor: MonitorLike, vm: str, uuid: str, timeout: float) -> HotDelResult:
    with store.transaction() as txn:
        txn.get_vm(vm)
        device = txn.get_device(vm, uuid)
        if device.state is DeviceState.ATTACHING:
            raise StateConflict(f"{device.qemu_id} is still being attached; retry, or run reconcile after a crash")
        # a second hot_del of a pending unplug keeps what is known: QEMU has the request
        was_requested = device.state is DeviceState.DETACHING and uuid in txn.unplug_requested(vm)
        txn.set_state(vm, uuid, DeviceState.DETACHING, unplug_requested=was_requested)
    previous = device.state
    device = device.with_state(DeviceState.DETACHING)
    recorder = _UnplugRecorder(store, vm, uuid)  # QEMU has the device_del: a crash from then on is "pending"

    try:
        deleted = await monitor.device_del(device.qemu_id, timeout, recorder)
    except MonitorConnectionLost as exc:
        exc.vm, exc.device_id = vm, device.qemu_id  # same type (a MonitorTimeout stays one), with the facts
        exc.args = (
            f"{exc}; {device.qemu_id} stays 'detaching' with slot {device.slot} taken until reconcile() "
            "sees what QEMU did",
        )
        raise
    except QemuCommandError as exc:
        if exc.error_class == "DeviceNotFound" and not (await monitor.pci()).has(device.qemu_id):
            deleted = True  # QEMU does not have it (already ejected, or never booted with it)
        else:
            _restore(store, vm, uuid, previous, unplug_requested=was_requested)
            raise HotplugError(
                f"QEMU refused device_del of {device.qemu_id}: {exc.qemu_message}", exc.qemu_message
            ) from exc
    except UnplugGuestError:
        _restore(store, vm, uuid, DeviceState.ATTACHED)
        raise
    if not deleted:
        return HotDelResult(HotDelStatus.PENDING, device)
    _forget(store, vm, device)
    return HotDelResult(HotDelStatus.REMOVED, device)


async def watch_unplugs(
    store: Store, monitor: Monitor, vm: str, *, timeout: float | None = None, host: HostDevices | None = None
) -> list[str]:
    """Release the slots of ``detaching`` devices as their ``DEVICE_DELETED`` arrives.

    For a lifecycle manager that keeps the QMP connection open: a ``hot_del``
    that returned ``pending`` is finished here the moment the guest ejects.
    Returns the ids released, when nothing is detaching any more or after
    *timeout* seconds.
    """
    _require_host(vm, store.devices(vm), host, "watch_unplugs")
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    released: list[str] = []
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
        async with store.vm_lock(vm):  # write under the lock, and only the record we saw
            for qid in gone:
                if _forget(store, vm, detaching[qid]):
                    if host is not None:
                        host.release_guest_device(vm, detaching[qid])
                    released.append(qid)


def _restore(store: Store, vm: str, uuid: str, state: DeviceState, *, unplug_requested: bool = False) -> None:
    with store.transaction() as txn:
        txn.set_state(vm, uuid, state, unplug_requested=unplug_requested)


# --------------------------------------------------------------------------- reconcile


@dataclass
class ReconcileReport:
    """What :func:`reconcile` found and repaired; lists of QEMU ids unless said."""

    vm: str
    attached: list[str] = field(default_factory=list)  # attaching/planned and present -> attached
    released: list[str] = field(default_factory=list)  # attaching or detaching and gone -> slot freed
    lost: list[str] = field(default_factory=list)  # attached but gone -> slot freed (someone removed it)
    pending: list[str] = field(default_factory=list)  # detaching, still present, QEMU has the unplug request
    resent: list[str] = field(default_factory=list)  # detaching but device_del never reached QEMU: sent now
    # (a resent unplug the guest confirms within reconcile's unplug_wait is also in ``released``)
    restored: list[str] = field(default_factory=list)  # detaching, QEMU refuses the unplug: back to attached
    not_running: list[str] = field(default_factory=list)  # planned and absent (VM not booted with it yet)
    misplaced: list[str] = field(default_factory=list)  # present at another bus/slot than recorded
    unverified: list[str] = field(default_factory=list)  # QEMU has it but shows it on no bus right now
    host_freed: list[str] = field(default_factory=list)  # host devices claimed for a guest device never recorded
    unknown: list[dict[str, Any]] = field(default_factory=list)  # live devices we did not place

    @property
    def changed(self) -> bool:
        return bool(self.attached or self.released or self.lost or self.resent or self.restored)

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "attached": self.attached,
            "released": self.released,
            "lost": self.lost,
            "pending": self.pending,
            "resent": self.resent,
            "restored": self.restored,
            "not_running": self.not_running,
            "misplaced": self.misplaced,
            "unverified": self.unverified,
            "host_freed": self.host_freed,
            "unknown": self.unknown,
        }


async def reconcile(
    store: Store,
    monitor: MonitorLike,
    vm: str,
    *,
    host: HostDevices | None = None,
    unplug_wait: float = 0.0,
) -> ReconcileReport:
    """Compare our records with QEMU's live view and repair what a crash or a lost event left.

    ===========================  ===========================  ====================================
    record                       QEMU                         action (report list)
    ===========================  ===========================  ====================================
    planned / attaching          present at its slot          -> attached (``attached``)
    planned                      absent                       none (``not_running``)
    attaching                    absent                       slot freed (``released``)
    attached                     absent                       slot freed (``lost``)
    detaching                    absent                       slot freed (``released``)
    detaching, unplug requested  present                      none, the guest decides (``pending``)
    detaching, never sent        present                      ``device_del`` sent now (``resent``)
    detaching, never sent        present, unplug refused      -> attached (``restored``)
    any                          present elsewhere            none (``misplaced``)
    any                          on no bus (unnumbered)       none (``unverified``)
    ===========================  ===========================  ====================================

    "Never sent" is a detach that died between recording ``detaching`` and
    QEMU taking its ``device_del``: the user asked for the removal, so it is
    finished (and confirmed if the guest ejects within *unplug_wait* seconds).
    Live devices we do not know are reported (``unknown``; hot_add treats
    their slots as taken anyway).  It holds the VM's lock, so an operation
    still under way in another process is never mistaken for one a crash left
    behind.  With *host*, passthrough devices follow: released ones free their
    host device, newly attached ones turn their host claim into an allocation.
    """
    unplug_wait = validate_timeout(unplug_wait, "unplug_wait")
    async with store.vm_lock(vm):
        before = {d.qemu_id: d for d in store.devices(vm)}
        _require_host(vm, before.values(), host, "reconcile")
        view = await monitor.pci()
        report, unsent = _reconcile_view(store, vm, view)
        try:
            for device in unsent:
                await _resend_unplug(store, monitor, vm, device, unplug_wait, report)
        finally:  # records already released free their host devices even if QEMU fails us now
            if host is not None:
                for qid in report.released + report.lost:
                    host.release_guest_device(vm, before[qid])
                # every passthrough device QEMU has must hold an allocation, including one whose
                # process died between committing 'attached' and allocating
                for device in store.devices(vm):
                    if device.state is DeviceState.ATTACHED:
                        host.allocate_guest_device(vm, device)
                report.host_freed = host.free_orphan_claims(vm, {d.uuid for d in store.devices(vm)})
        return report


def _reconcile_view(store: Store, vm: str, view: PciOccupancy) -> tuple[ReconcileReport, list[Device]]:
    """The table of :func:`reconcile`, in one transaction; returns the detaching devices whose
    unplug never reached QEMU (they need QEMU again, outside the transaction)."""
    report = ReconcileReport(vm)
    unsent: list[Device] = []
    with store.transaction() as txn:
        vm_spec = txn.get_vm(vm)
        devices = txn.devices(vm)
        requested = txn.unplug_requested(vm)
        for device in devices:
            if _reconcile_device(txn, vm, device, view, report, requested):
                unsent.append(device)
        report.unknown = _unknown_devices(vm_spec, devices, view)
    return report, unsent


async def _resend_unplug(
    store: Store, monitor: MonitorLike, vm: str, device: Device, wait: float, report: ReconcileReport
) -> None:
    """Finish a detach whose ``device_del`` never reached QEMU (the process died first)."""
    recorder = _UnplugRecorder(store, vm, device.uuid)
    try:
        deleted = await monitor.device_del(device.qemu_id, wait, recorder)
    except (QemuCommandError, UnplugGuestError) as exc:
        if isinstance(exc, QemuCommandError) and exc.error_class == "DeviceNotFound":
            deleted = True
        else:  # QEMU or the guest will not unplug it (e.g. a bus without hotplug): it stays, and is ours
            log.warning("Unplug of %s refused during reconcile: %s", device.qemu_id, exc.qemu_message)
            _restore(store, vm, device.uuid, DeviceState.ATTACHED)
            report.restored.append(device.qemu_id)
            return
    if recorder.sent and not recorder.already:
        report.resent.append(device.qemu_id)  # said even when the eject follows at once
    if deleted:
        _forget(store, vm, device.with_state(DeviceState.DETACHING))
        report.released.append(device.qemu_id)
    elif recorder.already:
        report.pending.append(device.qemu_id)


def _reconcile_device(
    txn: Transaction, vm: str, device: Device, view: PciOccupancy, report: ReconcileReport, requested: set[str]
) -> bool:
    """Apply one row of the table; True for a detaching device QEMU still has whose unplug was
    never sent (*requested*: the UUIDs whose unplug QEMU has)."""
    live = view.find(device.qemu_id)
    if live is None and view.has(device.qemu_id):
        # QEMU has the device but shows it on no bus (a bridge the firmware has not numbered
        # yet, a paused or reset VM): nothing can be concluded, nothing is changed.
        report.unverified.append(device.qemu_id)
        return False
    if live is not None:
        try:
            expected_bus = view.bus_number(device.bus)
        except (MonitorError, ValueError):
            expected_bus = None
        if (live.bus, live.slot) != (expected_bus, device.slot):
            report.misplaced.append(device.qemu_id)
            return False
    state, qid = device.state, device.qemu_id
    if live is not None:
        if state in (DeviceState.PLANNED, DeviceState.ATTACHING):
            txn.set_state(vm, device.uuid, DeviceState.ATTACHED)
            report.attached.append(qid)
        elif state is DeviceState.DETACHING:
            if device.uuid not in requested:
                return True  # decided by _resend_unplug
            report.pending.append(qid)
    elif state is DeviceState.PLANNED:
        report.not_running.append(qid)
    else:
        txn.remove_device(vm, device.uuid)
        (report.lost if state is DeviceState.ATTACHED else report.released).append(qid)
    return False


def _unknown_devices(vm: VMSpec, devices: Sequence[Device], view: PciOccupancy) -> list[dict[str, Any]]:
    ours = {device.qemu_id for device in devices}
    bridges = {f.secondary_bus: f.qdev_id for f in view.functions if f.secondary_bus and f.qdev_id}
    unknown = []
    for function in view.functions:
        if function.qdev_id and function.qdev_id in ours:
            continue
        bus_name = "pci.0" if function.bus == 0 else bridges.get(function.bus)
        if bus_name is not None and SlotMap(_live_mask(vm, bus_name, view)).is_masked(function.slot):
            continue
        unknown.append(
            {
                "bus": function.bus,
                "slot": function.slot,
                "function": function.function,
                "qdev_id": function.qdev_id,
                "description": function.description,
            }
        )
    return unknown

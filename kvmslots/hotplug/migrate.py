"""Live migration: the target QEMU starts with exactly the source's devices, at the source's addresses.

QEMU migrates device *state*, not devices: the target must be started with
the same PCI functions at the same bus, slot and function, with the same ids
(the ids name the migration sections), or QEMU refuses the incoming stream
("Unknown savevm section"), or worse, a function the source no longer has
comes up fresh on the target and the guest sees a device appear.  A VM that
had devices hot-plugged and unplugged has a device set that only kvmslots'
records describe, so the records travel with it.

The flow for a lifecycle manager (one call per step, each step checkable)::

    source                                     target
    ------                                     ------
    doc = await outgoing(store, mon, vm)       (hand doc to the target)
                                               plan = plan_incoming(store, doc, incoming=URI)
                                               start QEMU with its own arguments + plan.qemu_args
    QMP migrate URI; wait until completed      done = await confirm_incoming(store, mon, doc)
    await release_outgoing(store, mon, doc, done)   (hand done.to_json() to the source)
    (stop the source QEMU)
    on failure: nothing to undo, the source    on failure: abort_incoming(store, doc), stop the
    keeps running with its records             target QEMU

:func:`outgoing` checks the source against QEMU's live view first and
refuses what cannot migrate: a device being attached or detached right now,
a record QEMU does not show where recorded, and a passthrough device (QEMU
cannot migrate a host device; as Nova does, unplug it before, and on the
target claim a matching host device - ``PciDevTracker.update_pci_for_migration``
- and plug it after).  It changes nothing on the source.  The target's
records are written as ``planned`` and become ``attached`` only when
:func:`confirm_incoming` sees them in the running target; until then
:func:`abort_incoming` drops them.  :func:`release_outgoing` forgets the
source's records only with the target's confirmation in hand (as libvirt's
Confirm phase takes the result of its Finish phase), when the source QEMU
also says the migration completed, and only if they still match the
document the target started from.  The source's word alone is not enough:
without the ``return-path`` capability a source reports ``completed`` once it
has sent the last byte, even when the target then refuses the state (seen on
q35 with a device missing on the target; the source then sits paused in
``postmigrate`` until the manager resumes it with QMP ``cont``).  With
``return-path`` on both ends the source notices and runs on by itself.

Source and target may share one store (hosts on one PostgreSQL state, or a
migration between two QEMUs of one host, to upgrade QEMU): the document names
its store (:attr:`Store.identity <kvmslots.store.Store.identity>`), and then the
records are already where the target is.  :func:`plan_incoming` writes nothing
(it checks the records still match), :func:`abort_incoming` drops nothing,
and :func:`release_outgoing` keeps them (the confirmation names the target's
store): they describe the VM on the target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..errors import MigrationIncomplete, MigrationMismatch, MigrationRefused, StateConflict, StateImportError
from ..model import Controller, Device, DeviceState, VMSpec
from ..monitor import MonitorLike, RunsQmp
from ..passthrough import is_passthrough
from ..store import Store, export_document, json_object, parse_export
from .common import device_arguments, topology
from .reconcile import Live, ReconcileReport, live_state, reconcile, unknown_devices

__all__ = [
    "MIGRATION_FORMAT",
    "IncomingPlan",
    "outgoing",
    "plan_incoming",
    "confirm_incoming",
    "IncomingConfirmed",
    "parse_confirmation",
    "abort_incoming",
    "release_outgoing",
    "parse_migration",
]

MIGRATION_FORMAT = "kvmslots-migration"
CONFIRMATION_FORMAT = "kvmslots-migration-confirmation"
MIGRATION_VERSION = 1
_IN_FLIGHT = (DeviceState.ATTACHING, DeviceState.DETACHING)
#: What a QEMU incoming VM reports in ``query-status`` before the stream has been loaded.
_INCOMING_STATES = ("inmigrate",)


@dataclass(frozen=True)
class IncomingPlan:
    """What the target QEMU must be started with: the source's controllers and devices, and ``-incoming``."""

    vm: VMSpec
    controllers: tuple[Controller, ...]
    devices: tuple[Device, ...]
    incoming: str
    #: Live functions on the source that kvmslots did not place (the manager's own, a VM taken over
    #: from another manager): the manager must start the target with them too.
    unmanaged: tuple[Mapping[str, Any], ...] = ()

    @property
    def device_args(self) -> list[str]:
        """``-device`` arguments: controllers parents first, then the devices, as the source has them."""
        return device_arguments(self.controllers, self.devices)

    @property
    def qemu_args(self) -> list[str]:
        """:attr:`device_args` and ``-incoming <uri>`` (``defer``: start it with QMP ``migrate-incoming``)."""
        return [*self.device_args, "-incoming", self.incoming]


# --- source ---------------------------------------------------------------------------------


async def outgoing(store: Store, monitor: MonitorLike, vm: str) -> dict[str, Any]:
    """The document a target needs, after checking that the source's records are what QEMU runs.

    Refused with :class:`MigrationRefused` (naming the devices, nothing changed) when a device
    is being attached or detached, is passthrough, or is not where its record says in QEMU's
    live view.  Take it right before QMP ``migrate``: a device hot-plugged in between is
    caught by :func:`release_outgoing`, too late for this migration.
    """
    async with store.vm_lock(vm):
        view = await monitor.pci()
        with store.reading() as txn:
            spec = txn.get_vm(vm)
            devices = txn.devices(vm)
            topo = topology(txn, spec, view)
            in_flight = [d for d in devices if d.state in _IN_FLIGHT]
            passthrough = [d for d in devices if is_passthrough(d)]
            if in_flight:
                raise MigrationRefused(
                    f"VM {vm!r} has devices being attached or detached: "
                    f"{_named(in_flight)}; finish them (or reconcile) and migrate after",
                    vm=vm,
                    devices=[d.qemu_id for d in in_flight],
                    reason="in_flight",
                )
            if passthrough:
                raise MigrationRefused(
                    f"VM {vm!r} has passthrough devices QEMU cannot migrate: {_named(passthrough)}; unplug them "
                    "before (hot_del frees their host devices), migrate, then on the target claim matching host "
                    "devices (PciDevTracker.update_pci_for_migration, or kvmslots host claim) and hot add them",
                    vm=vm,
                    devices=[d.qemu_id for d in passthrough],
                    reason="passthrough",
                )
            elsewhere = [d for d in devices if live_state(d, view, topo) is not Live.PRESENT]
            if elsewhere:
                raise MigrationRefused(
                    f"VM {vm!r}: QEMU does not show {_named(elsewhere)} where recorded; the target would start "
                    "with a different device set (run reconcile, then migrate)",
                    vm=vm,
                    devices=[d.qemu_id for d in elsewhere],
                    reason="not_running",
                )
            return {
                "format": MIGRATION_FORMAT,
                "version": MIGRATION_VERSION,
                "store": store.identity,
                "state": export_document(txn, vm),  # the snapshot just checked
                "unmanaged": unknown_devices(topo, devices, view),
            }


async def release_outgoing(
    store: Store,
    monitor: RunsQmp,
    document: Doc,
    confirmation: IncomingConfirmed | Mapping[str, Any] | str | bytes,
) -> list[Device]:
    """Forget the source's records once the target confirmed the VM; returns what was released.

    *confirmation* is what :func:`confirm_incoming` returned on the target (or its
    :meth:`~IncomingConfirmed.to_json`).  It must be for this VM and name every device the
    document sent (:class:`MigrationMismatch` otherwise).  :class:`MigrationIncomplete`
    (``state``: QEMU's migration status) when the source QEMU does not report ``completed``
    either.  :class:`MigrationMismatch` when the source's records changed since the document was
    taken: the target started without those changes, and nothing is forgotten.  When the target
    uses this same store, the records are checked the same way and kept (they are the target's
    now); the result is then empty.
    """
    sent = parse_migration(document)
    done = confirmation if isinstance(confirmation, IncomingConfirmed) else parse_confirmation(confirmation)
    name = sent.vm.name
    if done.vm != name:
        raise MigrationMismatch(f"The confirmation is for VM {done.vm!r}, not {name!r}", vm=name)
    unconfirmed = sorted({d.qemu_id for d in sent.devices} ^ set(done.devices))
    if unconfirmed:
        raise MigrationMismatch(
            f"The target of VM {name!r} confirmed another device set (differing: {', '.join(unconfirmed)})",
            vm=name,
            devices=unconfirmed,
        )
    info = await monitor.execute("query-migrate")
    status = info.get("status") if isinstance(info, Mapping) else None
    if status != "completed":
        raise MigrationIncomplete(
            f"The source QEMU of VM {name!r} reports migration status {status or 'none'!r}, not 'completed'; "
            "its records stay",
            vm=name,
            state=str(status) if status is not None else None,
        )
    async with store.vm_lock(name):
        now = store.devices(name)
        changed = _differences(sent.devices, now)
        if changed:
            raise MigrationMismatch(
                f"VM {name!r} changed after its migration document was taken ({', '.join(changed)}); the target "
                "started without those changes, so the source keeps its records: compare them with the target's",
                vm=name,
                devices=changed,
            )
        if done.store == store.identity:
            return []
        with store.transaction() as txn:
            txn.delete_vm(name)
    return now


# --- target ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationDocument:
    """A parsed, checked migration document (see :func:`parse_migration`)."""

    vm: VMSpec
    controllers: tuple[Controller, ...]
    devices: tuple[Device, ...]
    unmanaged: tuple[Mapping[str, Any], ...]
    #: The :attr:`~kvmslots.store.Store.identity` of the source's store.
    store: str


#: A migration document as :func:`outgoing` made it (a JSON object or its text), or parsed already.
Doc: TypeAlias = "MigrationDocument | Mapping[str, Any] | str | bytes"


def parse_migration(document: Doc) -> MigrationDocument:
    """Check a document made by :func:`outgoing` whole; :class:`StateImportError` names the first problem.

    A document parsed already is returned as it is, so a caller that needs its facts first (the CLI
    names the VM) parses it once.
    """
    if isinstance(document, MigrationDocument):
        return document
    document = json_object(document, "Migration document")
    if document.get("format") != MIGRATION_FORMAT:
        raise StateImportError(f"Not a kvmslots migration document (expected format {MIGRATION_FORMAT!r})")
    if document.get("version") != MIGRATION_VERSION or type(document.get("version")) is not int:
        raise StateImportError(f"Migration document version {document.get('version')!r} is not supported")
    if set(document) != {"format", "version", "store", "state", "unmanaged"}:
        raise StateImportError("Migration document must have exactly format, version, store, state and unmanaged")
    if not isinstance(document["store"], str) or not document["store"]:
        raise StateImportError("'store' must name the source's store")
    unmanaged = document["unmanaged"]
    if not isinstance(unmanaged, list) or not all(isinstance(item, Mapping) for item in unmanaged):
        raise StateImportError("'unmanaged' must be a list of objects")
    vm, controllers, devices = parse_export(document["state"])
    in_flight = [d for d in devices if d.state in _IN_FLIGHT]
    if in_flight:  # outgoing never writes one; a hand-edited document does
        raise StateImportError(f"Migration document has devices in flight: {_named(in_flight)}")
    return MigrationDocument(
        vm, tuple(_parents_first(controllers)), tuple(devices), tuple(unmanaged), document["store"]
    )


def plan_incoming(store: Store, document: Doc, *, incoming: str = "defer") -> IncomingPlan:
    """Record the incoming VM on the target (devices ``planned``) and return the target's arguments.

    Everything is checked before anything is written.  A VM of that name already on the target
    is a :class:`StateConflict`: abort or delete it first.  On the source's own store (shared)
    nothing is written: the records must still be the document's (:class:`MigrationMismatch`
    otherwise), and they stay ``attached``.  ``incoming`` is QEMU's ``-incoming``
    value (``unix:/path``, ``tcp:host:port``, ``defer``); it is passed as one argument, never
    through a shell.
    """
    if not isinstance(incoming, str) or not incoming or incoming.startswith("-") or "\n" in incoming:
        raise StateImportError(f"incoming must be a QEMU -incoming value such as unix:/path, got {incoming!r}")
    sent = parse_migration(document)
    name = sent.vm.name
    if sent.store == store.identity:
        with store.reading() as txn:
            now = txn.devices(name) if txn.has_vm(name) else []
        changed = _differences(sent.devices, now)
        if changed:
            raise MigrationMismatch(
                f"VM {name!r} changed in the shared store after its migration document was taken "
                f"({', '.join(changed)}): take a new one",
                vm=name,
                devices=changed,
            )
        return IncomingPlan(sent.vm, sent.controllers, sent.devices, incoming, sent.unmanaged)
    planned = tuple(d.with_state(DeviceState.PLANNED) for d in sent.devices)
    with store.vm_lock_sync(name), store.transaction() as txn:
        if txn.has_vm(name):
            raise StateConflict(
                f"VM {name!r} already has records on this host; abort_incoming (kvmslots migrate abort) or "
                "delete them before planning an incoming migration",
                vm=name,
            )
        txn.put_vm(sent.vm)
        for controller in sent.controllers:
            txn.add_controller(name, controller)
        for device in planned:
            txn.add_device(name, device)
    return IncomingPlan(sent.vm, sent.controllers, planned, incoming, sent.unmanaged)


@dataclass(frozen=True)
class IncomingConfirmed:
    """The target's word that the VM runs there with every device: what the source releases on.

    ``store`` is the target's :attr:`~kvmslots.store.Store.identity`; ``devices`` the QEMU ids
    confirmed; ``report`` the target's reconcile (not part of :meth:`to_json`).
    """

    vm: str
    store: str
    devices: tuple[str, ...]
    report: ReconcileReport | None = None

    def to_json(self) -> dict[str, Any]:
        """The confirmation document the source's :func:`release_outgoing` checks (``report`` is left out)."""
        return {
            "format": CONFIRMATION_FORMAT,
            "version": MIGRATION_VERSION,
            "vm": self.vm,
            "store": self.store,
            "devices": list(self.devices),
        }


def parse_confirmation(document: Mapping[str, Any] | str | bytes) -> IncomingConfirmed:
    """Check a confirmation made by :meth:`IncomingConfirmed.to_json`; :class:`StateImportError` if malformed."""
    document = json_object(document, "Migration confirmation")
    if document.get("format") != CONFIRMATION_FORMAT or set(document) != {
        "format", "version", "vm", "store", "devices"
    } or type(document.get("version")) is not int or document["version"] != MIGRATION_VERSION:  # fmt: skip
        raise StateImportError(
            f"Not a kvmslots migration confirmation (format {CONFIRMATION_FORMAT!r}, version "
            f"{MIGRATION_VERSION}, with exactly vm, store and devices)"
        )
    vm, store, devices = document["vm"], document["store"], document["devices"]
    if not isinstance(vm, str) or not isinstance(store, str) or not store:
        raise StateImportError("The confirmation's vm and store must be names")
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise StateImportError("The confirmation's devices must be a list of QEMU ids")
    return IncomingConfirmed(vm, store, tuple(devices))


async def confirm_incoming(
    store: Store, monitor: MonitorLike, document: Doc
) -> IncomingConfirmed:
    """After the migration completed: the target's devices become ``attached``, checked against its QEMU.

    Returns the confirmation :func:`release_outgoing` needs on the source.
    :class:`MigrationIncomplete` while the target QEMU still waits for or loads the stream
    (``inmigrate``); :class:`MigrationMismatch` when a planned device is not where recorded (every
    record stays ``planned``, so :func:`abort_incoming` can still drop them).
    """
    sent = parse_migration(document)
    vm = sent.vm.name
    if isinstance(monitor, RunsQmp):
        status = await monitor.execute("query-status")
        state = status.get("status") if isinstance(status, Mapping) else None
        if state in _INCOMING_STATES:
            raise MigrationIncomplete(
                f"The target QEMU of VM {vm!r} is still {state!r}: the migration has not completed",
                vm=vm,
                state=state,
            )
    view = await monitor.pci()
    with store.reading() as txn:  # checked before anything changes: a mismatch leaves every record planned
        topo = topology(txn, txn.get_vm(vm), view)
        devices = txn.devices(vm)
    expected = {d.qemu_id for d in sent.devices}
    missing = sorted(expected - {d.qemu_id for d in devices})  # records gone since the plan
    missing += [d.qemu_id for d in devices if d.qemu_id in expected and live_state(d, view, topo) is not Live.PRESENT]
    report = None
    if not missing:
        report = await reconcile(store, monitor, vm)
        missing = report.not_running + report.misplaced + report.unverified + report.lost
    if missing:
        raise MigrationMismatch(
            f"The target QEMU of VM {vm!r} does not show {', '.join(missing)} where recorded", vm=vm, devices=missing
        )
    return IncomingConfirmed(vm, store.identity, tuple(sorted(expected)), report)


def abort_incoming(store: Store, document: Doc) -> list[Device]:
    """Drop the records :func:`plan_incoming` wrote from *document*, after a failed migration; returns them.

    Refused (:class:`StateConflict`) once a device was confirmed: the VM runs here then, and
    its records are no longer an incoming plan.  On the source's own store (shared) nothing is
    dropped: the records are the source's, which runs on.
    """
    sent = parse_migration(document)
    vm = sent.vm.name
    if sent.store == store.identity:
        return []
    with store.vm_lock_sync(vm), store.transaction() as txn:
        txn.get_vm(vm)  # UnknownVM when there is none
        devices = txn.devices(vm)
        confirmed = [d for d in devices if d.state is not DeviceState.PLANNED]
        if confirmed:
            raise StateConflict(
                f"VM {vm!r} is not an unconfirmed incoming VM ({_named(confirmed)} are {confirmed[0].state}); "
                "delete its state if it is really gone",
                vm=vm,
                state=str(confirmed[0].state),
            )
        txn.delete_vm(vm)
    return devices


# --- helpers --------------------------------------------------------------------------------


def _named(devices: Sequence[Device]) -> str:
    return ", ".join(f"{d.qemu_id} ({d.state})" for d in devices)


def _parents_first(controllers: Sequence[Controller]) -> list[Controller]:
    """Controllers ordered so that each one's bus exists before it (QEMU creates them in order)."""
    ids = {c.id for c in controllers}
    placed: set[str] = set()
    ordered: list[Controller] = []
    pending = list(controllers)
    while pending:
        ready = [c for c in pending if c.bus not in ids or c.bus in placed]
        if not ready:  # a cycle: parse_export's checks make this unreachable
            raise StateImportError(f"Controllers form a cycle: {', '.join(c.id for c in pending)}")
        for controller in ready:
            ordered.append(controller)
            placed.add(controller.id)
        pending = [c for c in pending if c.id not in placed]
    return ordered


def _differences(sent: Sequence[Device], now: Sequence[Device]) -> list[str]:
    """QEMU ids whose record is not the one sent (added, removed, moved, or in flight now)."""
    before = {d.uuid: d for d in sent}
    after = {d.uuid: d for d in now}
    changed = []
    for uuid in sorted(before.keys() | after.keys()):
        old, new = before.get(uuid), after.get(uuid)
        if old is None or new is None:
            changed.append((old or new).qemu_id)  # type: ignore[union-attr]
        elif (old.qemu_id, old.bus, old.slot, old.function, old.driver, old.props) != (
            new.qemu_id, new.bus, new.slot, new.function, new.driver, new.props
        ) or new.state in _IN_FLIGHT:  # fmt: skip
            changed.append(new.qemu_id)
    return changed

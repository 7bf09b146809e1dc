"""The state store of kvmslots: per-VM slot records and host PCI inventories, in a database.

:class:`Store` is what the rest of kvmslots holds.  Where the state lives is
chosen by its location:

* a directory (the default): an embedded SQLite file on this host
  (:mod:`kvmslots.storage.sqlite`: WAL, one writer at a time, per-VM ``flock``);
* a ``postgresql://`` URL: a PostgreSQL database that many hosts share
  (:mod:`kvmslots.storage.postgres`: per-VM advisory locks, per-host row locks),
  so a VM's slots can be read from any host and one query sees every host's
  passthrough devices.

Both implement the stores of :mod:`kvmslots.storage.base`; orchestration
and the host tracker talk to those, never to SQL.  One VM's state can be
exported as a versioned JSON document and imported elsewhere (migration: the
target boots with identical slots and ids).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncContextManager, ContextManager, Mapping

from ._shown import shown
from .devid import is_passthrough_driver, uuid8, validate_qemu_id
from .errors import (
    InvalidStateLocation,
    SlotError,
    StateConflict,
    StateImportError,
    UnknownVM,
    ValidationError,
)
from .model import Controller, ControllerKind, Device, DeviceSpec, DeviceState, VMSpec, validate_function
from .storage.base import Backend, Transaction
from .storage.postgres import is_postgres_url
from .storage.sqlite import DB_NAME, SQLiteBackend
from .topology import check_records

__all__ = ["Store", "Transaction", "EXPORT_FORMAT", "EXPORT_VERSION", "DB_NAME", "DATABASE_URL_ENV"]

EXPORT_FORMAT = "kvmslots.vm-state"
EXPORT_VERSION = 3
#: Export versions this kvmslots reads (1: no functions, no controllers; 2: no ids given by another manager).
EXPORT_VERSIONS = (1, 2, 3)
#: Something that looks like a URL (a scheme, a colon): never taken for a directory name.
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(//|/|$)|postgres(ql)?:", re.IGNORECASE)
#: The environment variable the CLI reads a PostgreSQL URL from.
DATABASE_URL_ENV = "KVMSLOTS_DATABASE_URL"


class Store:
    """The state store: a SQLite file in a directory, or a PostgreSQL database given by URL.

    Safe for several processes at once (and, on PostgreSQL, several hosts);
    one :class:`Store` object is meant for one thread (or one asyncio loop).
    A transaction that returned survives a crash of the process;
    ``durable=True`` makes a SQLite commit survive a power loss too, at the
    cost of an fsync per commit (a PostgreSQL server decides that itself).
    """

    def __init__(self, location: str | os.PathLike[str], *, timeout: float = 60.0, durable: bool = False) -> None:
        self.backend: Backend
        #: The SQLite state directory and file (None on PostgreSQL).
        self.state_dir: Path | None = None
        self.path: Path | None = None
        if isinstance(location, str) and not is_postgres_url(location) and _URL_RE.match(location):
            raise InvalidStateLocation(location)
        if is_postgres_url(location):
            from .storage.postgres import PostgresBackend

            self.backend = PostgresBackend(str(location), timeout=timeout, durable=durable)
        else:
            sqlite = SQLiteBackend(location, timeout=timeout, durable=durable)
            self.backend, self.state_dir, self.path = sqlite, sqlite.state_dir, sqlite.path
        self.location = self.backend.location
        self._identity: str | None = None

    @property
    def shared(self) -> bool:
        """Is this a database many hosts share (PostgreSQL), rather than this host's own file?"""
        return self.path is None

    @property
    def identity(self) -> str:
        """Which database this is, whichever URL or path reached it: two hosts on one PostgreSQL
        state (or two QEMUs of one host) see the same identity, so a migration between them knows
        that the records are already where the target is."""
        if self._identity is None:
            self._identity = self.backend.identity()
        return self._identity

    def close(self) -> None:
        """Close the backend's connection; the store is not used afterwards (a ``with`` block does this)."""
        self.backend.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> ContextManager[Transaction]:
        """A write transaction: committed when the ``with`` block ends, or rolled back whole.

        The database's own errors come out typed: a broken constraint as
        :class:`StateConflict`, a lost server as :class:`StoreUnavailable`,
        anything else as :class:`StateError`.
        """
        return self.backend.transaction()

    def reading(self) -> ContextManager[Transaction]:
        """A read transaction: one consistent snapshot that never waits for a writer."""
        return self.backend.reading()

    def vm_lock(self, vm: str, timeout: float = 60.0) -> AsyncContextManager[None]:
        """Hold the VM's operation lock (an ``flock`` on SQLite, an advisory lock on PostgreSQL).

        Transactions keep single writes consistent; this lock keeps whole
        operations apart, so that :func:`~kvmslots.hotplug.reconcile` never
        mistakes a hot add that is still under way in another process (or on
        another host) for one a crash left behind.  A crashed holder never
        leaves the VM locked.
        """
        return self.backend.vm_lock(vm, timeout)

    def vm_lock_sync(self, vm: str, timeout: float = 60.0) -> ContextManager[None]:
        """:meth:`vm_lock` for synchronous callers (define, delete and import of a VM)."""
        return self.backend.vm_lock_sync(vm, timeout)

    # -- conveniences (each its own transaction) -------------------------------
    def define_vm(self, vm: VMSpec) -> VMSpec:
        """Create or update a VM; changing the mask must not mask a slot in use."""
        with self.vm_lock_sync(vm.name), self.transaction() as txn:
            try:
                check_records(vm, txn.controllers(vm.name), txn.devices(vm.name))
            except (ValidationError, SlotError) as exc:
                raise StateConflict(f"VM {vm.name!r} cannot be changed so: {exc}") from exc
            txn.put_vm(vm)
        return vm

    def get_vm(self, name: str) -> VMSpec:
        """The stored VM; :class:`UnknownVM` when there is none."""
        with self.reading() as txn:
            return txn.get_vm(name)

    def has_vm(self, name: str) -> bool:
        """Is a VM of that name stored?"""
        with self.reading() as txn:
            return txn.has_vm(name)

    def vms(self) -> list[str]:
        """Every stored VM's name, sorted."""
        with self.reading() as txn:
            return txn.vm_names()

    def delete_vm(self, name: str) -> None:
        """Forget a VM's slots, ports and bridges, under its VM lock; :class:`UnknownVM` when it is not
        stored.  Its host devices stay claimed until the tracker frees them."""
        with self.vm_lock_sync(name), self.transaction() as txn:
            if not txn.has_vm(name):
                raise UnknownVM(name)
            txn.delete_vm(name)

    def devices(self, vm: str) -> list[Device]:
        """The VM's device records by bus, slot and function, whatever their state; :class:`UnknownVM` when it
        is not stored."""
        with self.reading() as txn:
            txn.get_vm(vm)
            return txn.devices(vm)

    def get_device(self, vm: str, uuid: str) -> Device:
        """One device's record; :class:`UnknownDevice` when the VM has no such device."""
        with self.reading() as txn:
            return txn.get_device(vm, uuid)

    def controllers(self, vm: str) -> list[Controller]:
        """The root ports and bridges planned for *vm*, by chassis number."""
        with self.reading() as txn:
            txn.get_vm(vm)
            return txn.controllers(vm)

    # -- export / import ------------------------------------------------------
    def export_vm(self, name: str) -> dict[str, Any]:
        """One VM's state as a versioned JSON-ready document."""
        with self.reading() as txn:
            return export_document(txn, name)

    def import_vm(self, document: Mapping[str, Any] | str | bytes, *, replace: bool = False) -> VMSpec:
        """Load a document made by :meth:`export_vm`; all checked before anything is written.

        An existing VM of that name is a :class:`StateConflict` unless
        *replace* is true, in which case its state is replaced whole.
        """
        vm, controllers, devices = parse_export(document)
        with self.vm_lock_sync(vm.name), self.transaction() as txn:
            if txn.has_vm(vm.name):
                if not replace:
                    raise StateConflict(
                        f"VM {vm.name!r} already exists; import with replace=True (--replace) to overwrite it",
                        vm=vm.name,
                    )
                txn.delete_vm(vm.name)
            txn.put_vm(vm)
            for controller in controllers:
                txn.add_controller(vm.name, controller)
            for device in devices:
                txn.add_device(vm.name, device)
        return vm


def export_document(txn: Transaction, name: str) -> dict[str, Any]:
    """One VM's state as a versioned JSON-ready document, read in *txn* (one consistent picture)."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "vm": txn.get_vm(name).to_json(),
        "controllers": [controller.to_json() for controller in txn.controllers(name)],
        "devices": [device.to_json() for device in txn.devices(name)],
    }


def json_object(document: Mapping[str, Any] | str | bytes, what: str) -> Mapping[str, Any]:
    """*document* as a JSON object, decoded if it is text; :class:`StateImportError` saying *what* it is."""
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StateImportError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(document, Mapping):
        raise StateImportError(f"{what} must be a JSON object")
    return document


def parse_export(document: Mapping[str, Any] | str | bytes) -> tuple[VMSpec, list[Controller], list[Device]]:
    """Validate an exported document completely; :class:`StateImportError` names the first problem.

    Version 1 (before multifunction slots and controllers) is still read: its
    devices are function 0 and it has no controllers.
    """
    document = json_object(document, "Runtime document")
    if document.get("format") != EXPORT_FORMAT:
        raise StateImportError(f"Not a kvmslots runtime document (format {shown(document.get('format'))})")
    version = document.get("version")
    if type(version) is not int or version not in EXPORT_VERSIONS:  # neither true nor 1.0 is version 1
        raise StateImportError(
            f"Runtime document version {shown(document.get('version'))} is not supported "
            f"(expected one of {', '.join(map(str, EXPORT_VERSIONS))})"
        )
    v1 = version == 1
    _expect_keys(document, {"format", "version", "vm", "devices"} | (set() if v1 else {"controllers"}), "document")
    vm = _import_vm(document["vm"], v1)
    controllers = [] if v1 else _import_controllers(document["controllers"])
    raw_devices = document["devices"]
    if not isinstance(raw_devices, list):
        raise StateImportError("'devices' must be a list")
    devices: list[Device] = []
    ids: dict[tuple[str, int], str] = {}
    uuids: set[str] = set()
    given_ids: set[str] = set()  # every id, derived or given: QEMU takes each once
    keys = {"uuid", "type", "driver", "props", "bus", "slot", "state", "id"} | (
        set() if v1 else {"function", "multifunction"}
    ) | ({"id_given"} if version >= 3 else set())
    for index, raw in enumerate(raw_devices):
        where = f"devices[{index}]"
        if not isinstance(raw, Mapping):
            raise StateImportError(f"{where} must be an object")
        _expect_keys(raw, keys, where)
        try:
            spec = DeviceSpec(
                raw["uuid"], raw["type"], raw["driver"], _mapping(raw["props"], f"{where}.props"), raw["bus"],
                raw["slot"],
            )
            if not isinstance(raw["state"], str) or raw["state"] not in {s.value for s in DeviceState}:
                raise ValidationError(f"state must be one of {', '.join(s.value for s in DeviceState)}")
            state = DeviceState(raw["state"])
            function = 0 if v1 else validate_function(raw["function"])
            multifunction = False if v1 else raw["multifunction"]
            if not isinstance(multifunction, bool):
                raise ValidationError(f"multifunction must be true or false, got {shown(multifunction)}")
        except (ValidationError, ValueError) as exc:
            raise StateImportError(f"Bad device in {where}: {exc}") from None
        if spec.slot is None or spec.bus is None:
            raise StateImportError(f"{where} has no bus or slot")
        if is_passthrough_driver(spec.driver):
            raise StateImportError(
                f"{where}: {spec.driver} passes host device {spec.props.get('host', '?')} through; passthrough "
                "devices are not imported (the host device belongs to its host's tracker): plug a matching "
                "host device through the tracker after the import"
            )
        device = Device.from_spec(spec, spec.bus, spec.slot, state, function, multifunction)
        given = raw.get("id_given", False)
        if not isinstance(given, bool):
            raise StateImportError(f"{where}: id_given must be true or false, got {shown(given)}")
        if given:  # an id another manager gave it (a VM kvmslots took over): kept as it is
            try:
                device = replace(device, given_id=validate_qemu_id(raw["id"]))
            except ValidationError as exc:
                raise StateImportError(f"Bad device in {where}: {exc}") from None
        elif raw["id"] != device.qemu_id:
            raise StateImportError(
                f"{where}: id {shown(raw['id'])} does not match its type, UUID and slot ({device.qemu_id})"
            )
        if device.uuid in uuids:
            raise StateImportError(f"{where}: UUID {device.uuid} appears twice")
        if (uuid8(device.uuid), device.slot) in ids:
            raise StateImportError(f"{where}: its id would collide with {ids[(uuid8(device.uuid), device.slot)]}")
        if device.qemu_id in given_ids:
            raise StateImportError(f"{where}: the id {device.qemu_id} appears twice")
        uuids.add(device.uuid)
        ids[(uuid8(device.uuid), device.slot)] = device.qemu_id
        given_ids.add(device.qemu_id)
        devices.append(device)
    try:
        check_records(vm, controllers, devices)
    except (ValidationError, SlotError) as exc:
        raise StateImportError(f"Runtime document does not fit VM {vm.name!r}: {exc}") from None
    return vm, controllers, devices


def _import_vm(raw_vm: Any, v1: bool) -> VMSpec:
    if not isinstance(raw_vm, Mapping):
        raise StateImportError("'vm' must be an object")
    keys = {"name", "machine", "mask", "bus_masks"} | (set() if v1 else {"hotplug_ports", "spare_bridge"})
    _expect_keys(raw_vm, keys, "vm")
    try:
        extra = {} if v1 else {"hotplug_ports": raw_vm["hotplug_ports"], "spare_bridge": raw_vm["spare_bridge"]}
        bus_masks = _mapping(raw_vm["bus_masks"], "vm.bus_masks")
        return VMSpec(raw_vm["name"], raw_vm["machine"], raw_vm["mask"], bus_masks, **extra)
    except ValidationError as exc:
        raise StateImportError(f"Bad VM in runtime document: {exc}") from None


def _import_controllers(raw: Any) -> list[Controller]:
    if not isinstance(raw, list):
        raise StateImportError("'controllers' must be a list")
    controllers = []
    for index, item in enumerate(raw):
        where = f"controllers[{index}]"
        if not isinstance(item, Mapping):
            raise StateImportError(f"{where} must be an object")
        _expect_keys(item, {"id", "kind", "bus", "slot", "function", "chassis"}, where)
        try:
            if item["kind"] not in {k.value for k in ControllerKind}:
                raise ValidationError(f"kind must be one of {', '.join(k.value for k in ControllerKind)}")
            controllers.append(
                Controller(
                    item["id"], ControllerKind(item["kind"]), item["bus"], item["slot"], item["function"],
                    item["chassis"],
                )
            )
        except (ValidationError, ValueError, TypeError) as exc:
            raise StateImportError(f"Bad controller in {where}: {exc}") from None
    return controllers

def _expect_keys(obj: Mapping[str, Any], keys: set[str], where: str) -> None:
    missing = keys - set(obj)
    unknown = set(obj) - keys
    if missing:
        raise StateImportError(f"{where} lacks {', '.join(sorted(missing))}")
    if unknown:
        raise StateImportError(f"{where} has unknown keys {', '.join(sorted(shown(key, 60) for key in unknown))}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StateImportError(f"{where} must be an object")
    return value

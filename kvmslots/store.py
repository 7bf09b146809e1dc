"""Runtime state in the embedded database (SQLite).

Why a database and not Ganeti's runtime file: several processes may work on
one VM at once (a boot, a hotplug, a reconcile), and each must see the slots
the others took.  Every change runs in a ``BEGIN IMMEDIATE`` transaction, which
takes SQLite's write lock before reading, so two processes can never both pick
the same free slot; a ``UNIQUE (vm, bus, slot)`` constraint backs that up.

The state directory is the caller's; it is created 0700 and the database file
0600, and looser modes found on them are tightened.  A new database is built
under a temporary name and linked into place only once its schema is
committed, so the state file either does not exist (a new store) or holds a
schema: an empty, truncated or foreign file is refused with
:class:`~kvmslots.errors.StateCorrupt`, never taken for a new store.  Reads run
in WAL read transactions and never wait for a writer.

One VM's state can be exported as a versioned JSON document and imported
elsewhere (migration: the target boots with identical slots and ids).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import tenacity

from ._shown import shown
from .devid import is_passthrough_driver, uuid8, validate_uuid, validate_vm_name
from .errors import (
    SlotError,
    UnsupportedMachine,
    DeviceExists,
    InvalidTransition,
    StateConflict,
    StateCorrupt,
    StateError,
    StateImportError,
    UnknownDevice,
    UnknownVM,
    ValidationError,
    VMBusy,
)
from .topology import check_records
from .model import (
    DEFAULT_HOTPLUG_PORTS,
    TRANSITIONS,
    Controller,
    ControllerKind,
    Device,
    DeviceSpec,
    DeviceState,
    VMSpec,
    validate_function,
)

__all__ = ["Store", "Transaction", "EXPORT_FORMAT", "EXPORT_VERSION", "DB_NAME"]

log = logging.getLogger(__name__)

DB_NAME = "kvmslots.sqlite3"
EXPORT_FORMAT = "kvmslots.vm-state"
EXPORT_VERSION = 2
#: Export versions this kvmslots reads (1: no functions, no controllers).
EXPORT_VERSIONS = (1, 2)
#: 1: vms + devices.  2: devices.unplug_requested (QEMU has the device_del of a detaching device).
#: 3: multifunction slots (devices.function, .multifunction), controllers (root ports, bridges),
#:    vms.hotplug_ports and vms.spare_bridge.
_SCHEMA_VERSION = 3

_DEVICES_TABLE = """
CREATE TABLE IF NOT EXISTS devices (
    vm       TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
    uuid     TEXT NOT NULL,
    uuid8    TEXT NOT NULL,
    dev_type TEXT NOT NULL,
    driver   TEXT NOT NULL,
    props    TEXT NOT NULL,
    bus      TEXT NOT NULL,
    slot     INTEGER NOT NULL CHECK (slot BETWEEN 0 AND 31),
    state    TEXT NOT NULL CHECK (state IN ('planned', 'attaching', 'attached', 'detaching')),
    unplug_requested INTEGER NOT NULL DEFAULT 0,
    function INTEGER NOT NULL DEFAULT 0 CHECK (function BETWEEN 0 AND 7),
    multifunction INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (vm, uuid),
    UNIQUE (vm, bus, slot, function),
    UNIQUE (vm, uuid8, slot)
)"""
_CONTROLLERS_TABLE = """
CREATE TABLE IF NOT EXISTS controllers (
    vm       TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
    id       TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('pcie-root-port', 'pci-bridge')),
    bus      TEXT NOT NULL,
    slot     INTEGER NOT NULL CHECK (slot BETWEEN 0 AND 31),
    function INTEGER NOT NULL CHECK (function BETWEEN 0 AND 7),
    chassis  INTEGER NOT NULL CHECK (chassis BETWEEN 1 AND 255),
    PRIMARY KEY (vm, id),
    UNIQUE (vm, bus, slot, function),
    UNIQUE (vm, chassis)
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS vms (
    name      TEXT PRIMARY KEY,
    machine   TEXT NOT NULL,
    mask      TEXT NOT NULL,
    bus_masks TEXT NOT NULL DEFAULT '{{}}',
    hotplug_ports INTEGER NOT NULL DEFAULT {DEFAULT_HOTPLUG_PORTS},
    spare_bridge  INTEGER NOT NULL DEFAULT 0
);
{_DEVICES_TABLE};
{_CONTROLLERS_TABLE};
"""
_DEVICE_COLUMNS = "uuid, dev_type, driver, props, bus, slot, state, function, multifunction"
#: Upgrades in place, from the version in the key to the next one.
_MIGRATIONS = {
    1: ["ALTER TABLE devices ADD COLUMN unplug_requested INTEGER NOT NULL DEFAULT 0"],
    2: [
        # SQLite cannot change a UNIQUE constraint in place: the devices table is rebuilt
        f"ALTER TABLE vms ADD COLUMN hotplug_ports INTEGER NOT NULL DEFAULT {DEFAULT_HOTPLUG_PORTS}",
        "ALTER TABLE vms ADD COLUMN spare_bridge INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE devices RENAME TO devices_v2",
        _DEVICES_TABLE,
        "INSERT INTO devices (vm, uuid, uuid8, dev_type, driver, props, bus, slot, state, unplug_requested) "
        "SELECT vm, uuid, uuid8, dev_type, driver, props, bus, slot, state, unplug_requested FROM devices_v2",
        "DROP TABLE devices_v2",
        _CONTROLLERS_TABLE,
    ],
}


class Transaction:
    """Reads and writes inside one ``BEGIN IMMEDIATE`` transaction.

    Obtained from :meth:`Store.transaction`; everything done through it is
    committed together when the ``with`` block ends, or not at all.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Raw SQL inside this transaction, for modules that own tables of their own (the PCI tracker)."""
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self._conn.executemany(sql, rows)

    # -- VMs ------------------------------------------------------------------
    def find_vm(self, name: str) -> VMSpec | None:
        row = self._conn.execute(
            "SELECT name, machine, mask, bus_masks, hotplug_ports, spare_bridge FROM vms WHERE name = ?",
            (validate_vm_name(name),),
        ).fetchone()
        if row is None:
            return None
        try:
            return VMSpec(row[0], row[1], row[2], json.loads(row[3]), hotplug_ports=row[4], spare_bridge=bool(row[5]))
        except UnsupportedMachine as exc:  # stored by kvmslots < 0.3, which took any machine name
            raise StateConflict(
                f"VM {name!r} is stored with machine type {row[1]!r}, on which kvmslots no longer places "
                f"devices ({exc}); delete its state (kvmslots delete {name}) and plan it again"
            ) from None

    def has_vm(self, name: str) -> bool:
        """Is a VM of that name stored (readable or not)?"""
        row = self._conn.execute("SELECT 1 FROM vms WHERE name = ?", (validate_vm_name(name),)).fetchone()
        return row is not None

    def get_vm(self, name: str) -> VMSpec:
        vm = self.find_vm(name)
        if vm is None:
            raise UnknownVM(f"No VM named {name!r} in the state store")
        return vm

    def put_vm(self, vm: VMSpec) -> None:
        self._conn.execute(
            "INSERT INTO vms (name, machine, mask, bus_masks, hotplug_ports, spare_bridge) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET machine = excluded.machine, mask = excluded.mask, "
            "bus_masks = excluded.bus_masks, hotplug_ports = excluded.hotplug_ports, "
            "spare_bridge = excluded.spare_bridge",
            (
                vm.name,
                vm.machine,
                vm.mask,
                json.dumps(dict(vm.bus_masks), sort_keys=True),
                vm.hotplug_ports,
                int(vm.spare_bridge),
            ),
        )

    def delete_vm(self, name: str) -> None:
        self._conn.execute("DELETE FROM devices WHERE vm = ?", (name,))
        self._conn.execute("DELETE FROM controllers WHERE vm = ?", (name,))
        self._conn.execute("DELETE FROM vms WHERE name = ?", (name,))

    # -- devices --------------------------------------------------------------
    def devices(self, vm: str) -> list[Device]:
        rows = self._conn.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE vm = ? ORDER BY bus, slot, function", (vm,)
        ).fetchall()
        return [_row_to_device(row) for row in rows]

    def find_device(self, vm: str, uuid: str) -> Device | None:
        row = self._conn.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE vm = ? AND uuid = ?", (vm, validate_uuid(uuid))
        ).fetchone()
        return None if row is None else _row_to_device(row)

    def get_device(self, vm: str, uuid: str) -> Device:
        device = self.find_device(vm, uuid)
        if device is None:
            raise UnknownDevice(f"VM {vm!r} has no device with UUID {uuid}")
        return device

    def add_device(self, vm: str, device: Device) -> None:
        """Insert a device; its UUID (and uuid8 at that slot) and its slot must be new.

        A slot is shared only by the functions of one multifunction group.
        """
        validate_function(device.function)
        # Only the rows that can clash (same UUID, same slot, same uuid8 at that slot), by index,
        # in the order devices() gives: the same checks as over every device, at O(1) per add.
        rows = self._conn.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE vm = ? AND "
            "(uuid = ? OR (bus = ? AND slot = ?) OR (uuid8 = ? AND slot = ?)) ORDER BY bus, slot, function",
            (vm, device.uuid, device.bus, device.slot, uuid8(device.uuid), device.slot),
        ).fetchall()
        for other in map(_row_to_device, rows):
            if other.uuid == device.uuid:
                raise DeviceExists(f"VM {vm!r} already has a device with UUID {device.uuid} ({other.qemu_id})")
            if other.bus == device.bus and other.slot == device.slot and (
                other.function == device.function or not (other.in_group and device.in_group)
            ):
                raise StateConflict(f"Slot {device.slot} on {device.bus} is already held by {other.qemu_id}")
            if uuid8(other.uuid) == uuid8(device.uuid) and other.slot == device.slot:
                raise DeviceExists(
                    f"{device.uuid} and {other.uuid} share their first UUID group and slot {device.slot}: "
                    f"their ids would collide ({other.qemu_id})"
                )
        held = self._conn.execute(
            "SELECT id FROM controllers WHERE vm = ? AND bus = ? AND slot = ? ORDER BY chassis LIMIT 1",
            (vm, device.bus, device.slot),
        ).fetchone()
        if held is not None:
            raise StateConflict(f"Slot {device.slot} on {device.bus} is held by {held[0]}")
        self._conn.execute(
            "INSERT INTO devices (vm, uuid, uuid8, dev_type, driver, props, bus, slot, state, function, multifunction) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                vm,
                device.uuid,
                uuid8(device.uuid),
                device.dev_type,
                device.driver,
                json.dumps(dict(device.props), sort_keys=True),
                device.bus,
                device.slot,
                device.state.value,
                device.function,
                int(device.multifunction),
            ),
        )

    def set_state(self, vm: str, uuid: str, state: DeviceState, *, unplug_requested: bool = False) -> None:
        """Move a device to *state*.  *unplug_requested* records that QEMU has its ``device_del``
        (only for ``detaching``); any other change clears it."""
        state = DeviceState(state)
        row = self._conn.execute("SELECT state FROM devices WHERE vm = ? AND uuid = ?", (vm, uuid)).fetchone()
        if row is None:
            raise UnknownDevice(f"VM {vm!r} has no device with UUID {uuid}")
        if state not in TRANSITIONS[DeviceState(row[0])]:
            raise InvalidTransition(vm, uuid, row[0], state.value)
        requested = bool(unplug_requested) and state is DeviceState.DETACHING
        self._conn.execute(
            "UPDATE devices SET state = ?, unplug_requested = ? WHERE vm = ? AND uuid = ?",
            (state.value, int(requested), vm, uuid),
        )

    def unplug_requested(self, vm: str) -> set[str]:
        """UUIDs of the VM's detaching devices whose ``device_del`` QEMU is known to have."""
        rows = self._conn.execute(
            "SELECT uuid FROM devices WHERE vm = ? AND state = 'detaching' AND unplug_requested = 1", (vm,)
        )
        return {row[0] for row in rows}

    def remove_device(self, vm: str, uuid: str, *, expect: Device | None = None) -> bool:
        """Forget a device and so release its slot; True if a record went.

        With *expect*, only the record with that bus, slot and state goes: a
        caller acting on an older read never deletes a newer record.
        """
        if expect is None:
            cur = self._conn.execute("DELETE FROM devices WHERE vm = ? AND uuid = ?", (vm, uuid))
        else:
            cur = self._conn.execute(
                "DELETE FROM devices WHERE vm = ? AND uuid = ? AND bus = ? AND slot = ? AND state = ?",
                (vm, uuid, expect.bus, expect.slot, expect.state.value),
            )
        return cur.rowcount > 0

    # -- controllers (root ports and bridges kvmslots planned) ------------------------------
    def controllers(self, vm: str) -> list[Controller]:
        rows = self._conn.execute(
            "SELECT id, kind, bus, slot, function, chassis FROM controllers WHERE vm = ? ORDER BY chassis", (vm,)
        ).fetchall()
        return [Controller(*row) for row in rows]

    def add_controller(self, vm: str, controller: Controller) -> None:
        try:
            self._conn.execute(
                "INSERT INTO controllers (vm, id, kind, bus, slot, function, chassis) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (vm, controller.id, controller.kind.value, controller.bus, controller.slot, controller.function,
                 controller.chassis),
            )
        except sqlite3.IntegrityError as exc:
            raise StateConflict(f"VM {vm!r}: {controller.id} clashes with a stored controller ({exc})") from None


class Store:
    """The state store of one host: a SQLite database in a directory the caller chooses.

    Safe for several processes at once; one :class:`Store` object is meant for
    one thread (or one asyncio loop), like the ``sqlite3`` connection it holds.
    A transaction that returned survives a crash of the process; ``durable=True``
    makes it survive a power loss too, at the cost of an fsync per commit.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, timeout: float = 60.0, durable: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        try:
            _private_dir(self.state_dir)
            if not _existing_file(self.path):
                _create_database(self.path)
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            # WAL + NORMAL: every committed transaction survives a crash of the process (what the
            # tests check); only a power loss may roll back the last ones, and a power loss also
            # ends every VM they were about.  durable=True fsyncs each commit (about 200 us more).
            self._conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            version = self._schema_version()
            if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # an old file: reads need WAL
                with contextlib.suppress(sqlite3.OperationalError):  # another process may hold it now
                    self._conn.execute("PRAGMA journal_mode = WAL")
        except StateError:
            self._close_quietly()
            raise
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise StateCorrupt(
                f"State file {self.path} is not a readable kvmslots database ({exc}); refusing to treat it as a "
                "new store. Restore it from a backup, or move it away (with its -wal and -shm files) to start from "
                "nothing.",
                str(self.path),
            ) from exc
        except (OSError, sqlite3.Error) as exc:
            self._close_quietly()
            raise StateError(f"Cannot open the state store {self.path}: {exc}") from exc
        if version != _SCHEMA_VERSION:
            self._upgrade()

    def _close_quietly(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()

    def _schema_version(self) -> int:
        """The schema version of an existing file, read without taking the write lock."""
        self._conn.execute("BEGIN")
        try:
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            has_vms = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'vms'"
            ).fetchone() is not None
        finally:
            self._conn.execute("COMMIT")
        if not has_vms or version < 1:
            raise StateCorrupt(
                f"State file {self.path} is not a kvmslots state (no schema, version {version}); refusing to "
                "treat it as a new store. Restore it from a backup, or move it away (with its -wal and -shm files) "
                "to start from nothing.",
                str(self.path),
            )
        if version > _SCHEMA_VERSION:
            raise StateError(f"{self.path} has schema version {version}; this kvmslots knows up to {_SCHEMA_VERSION}")
        return version

    def _upgrade(self) -> None:
        """Bring an older schema up to date in place, in one write transaction."""
        with self.transaction() as txn:
            version = int(txn.execute("PRAGMA user_version").fetchone()[0])  # another process may have done it
            while version < _SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    txn.execute(statement)
                version += 1
                log.info("State store %s upgraded to schema version %d", self.path, version)
            txn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction: the database is locked for writers until it ends.

        SQLite's own errors come out typed: a broken constraint as
        :class:`StateConflict`, anything else (busy past the timeout, a
        corrupt file) as :class:`StateError`.
        """
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            raise StateConflict(f"The change contradicts the stored state: {exc}") from exc
        except sqlite3.Error as exc:
            raise StateError(f"State store {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def reading(self) -> Iterator[Transaction]:
        """A read transaction: one consistent snapshot that never waits for a writer (WAL).

        For looking only (``show``, ``export``): writing through it is an error.
        """
        try:
            self._conn.execute("BEGIN")
            try:
                yield Transaction(self._conn)
            finally:  # a read commits nothing, not even a write made through it by mistake
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StateError(f"State store {self.path}: {exc}") from exc

    def _lock_path(self, vm: str) -> Path:
        return self.state_dir / "locks" / f"{validate_vm_name(vm)}.lock"

    def _try_lock(self, vm: str) -> int:
        """One attempt at the VM's lock: the descriptor holding it, or BlockingIOError if taken.

        The file is removed when the lock is released, so a holder may unlink
        it while we wait on it: a lock taken on a file that is no longer at
        the path is dropped and taken again on the current one.
        """
        path = self._lock_path(vm)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:  # first lock in this state dir
                path.parent.mkdir(mode=0o700, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
            os.close(fd)

    def _unlock(self, vm: str, fd: int) -> None:
        """Remove the lock file while still holding it (no file is left behind), then release."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path(vm))
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def vm_lock_sync(self, vm: str, timeout: float = 60.0) -> Iterator[None]:
        """:meth:`vm_lock` for synchronous callers (define, delete and import of a VM)."""
        try:
            fd = tenacity.Retrying(**_lock_wait(timeout))(self._try_lock, vm)
        except BlockingIOError:
            raise _busy(vm, timeout) from None
        try:
            yield
        finally:
            self._unlock(vm, fd)

    @contextlib.asynccontextmanager
    async def vm_lock(self, vm: str, timeout: float = 60.0) -> AsyncIterator[None]:
        """Hold the VM's operation lock (an ``flock`` on a 0600 file in the state dir).

        Transactions keep single writes consistent; this lock keeps whole
        operations apart, so that :func:`~kvmslots.hotplug.reconcile` never
        mistakes a hot add that is still under way in another process for
        one a crash left behind.  The kernel drops the lock when its holder
        dies, so a crashed process never leaves the VM locked; a process that
        ends normally, successful or not, leaves no lock file behind.
        """
        try:
            fd = self._try_lock(vm)
        except BlockingIOError:  # contended: wait with backoff
            try:
                fd = -1
                async for attempt in tenacity.AsyncRetrying(**_lock_wait(timeout)):
                    with attempt:
                        fd = self._try_lock(vm)
            except BlockingIOError:
                raise _busy(vm, timeout) from None
        try:
            yield
        finally:
            self._unlock(vm, fd)

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
        with self.reading() as txn:
            return txn.get_vm(name)

    def has_vm(self, name: str) -> bool:
        with self.reading() as txn:
            return txn.has_vm(name)

    def vms(self) -> list[str]:
        with self.reading() as txn:
            return [row[0] for row in txn.execute("SELECT name FROM vms ORDER BY name")]

    def delete_vm(self, name: str) -> None:
        with self.vm_lock_sync(name), self.transaction() as txn:
            if not txn.has_vm(name):
                raise UnknownVM(f"No VM named {name!r} in the state store")
            txn.delete_vm(name)

    def devices(self, vm: str) -> list[Device]:
        with self.reading() as txn:
            txn.get_vm(vm)
            return txn.devices(vm)

    def get_device(self, vm: str, uuid: str) -> Device:
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
            vm = txn.get_vm(name)
            devices = txn.devices(name)
            controllers = txn.controllers(name)
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "vm": vm.to_json(),
            "controllers": [controller.to_json() for controller in controllers],
            "devices": [device.to_json() for device in devices],
        }

    def import_vm(self, document: Mapping[str, Any] | str | bytes, *, replace: bool = False) -> VMSpec:
        """Load a document made by :meth:`export_vm`; all checked before anything is written.

        An existing VM of that name is a :class:`StateConflict` unless
        *replace* is true, in which case its state is replaced whole.
        """
        vm, controllers, devices = parse_export(document)
        with self.vm_lock_sync(vm.name), self.transaction() as txn:
            if txn.has_vm(vm.name):
                if not replace:
                    raise StateConflict(f"VM {vm.name!r} already exists; import with replace=True to overwrite it")
                txn.delete_vm(vm.name)
            txn.put_vm(vm)
            for controller in controllers:
                txn.add_controller(vm.name, controller)
            for device in devices:
                txn.add_device(vm.name, device)
        return vm


def parse_export(document: Mapping[str, Any] | str | bytes) -> tuple[VMSpec, list[Controller], list[Device]]:
    """Validate an exported document completely; :class:`StateImportError` names the first problem.

    Version 1 (before multifunction slots and controllers) is still read: its
    devices are function 0 and it has no controllers.
    """
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StateImportError(f"Runtime document is not valid JSON: {exc}") from None
    if not isinstance(document, Mapping):
        raise StateImportError("Runtime document must be a JSON object")
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
    keys = {"uuid", "type", "driver", "props", "bus", "slot", "state", "id"} | (
        set() if v1 else {"function", "multifunction"}
    )
    for index, raw in enumerate(raw_devices):
        where = f"devices[{index}]"
        if not isinstance(raw, Mapping):
            raise StateImportError(f"{where} must be an object")
        _expect_keys(raw, keys, where)
        try:
            spec = DeviceSpec(
                raw["uuid"], raw["type"], raw["driver"], _mapping(raw["props"], f"{where}.props"), raw["bus"], raw["slot"]
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
        if raw["id"] != device.qemu_id:
            raise StateImportError(f"{where}: id {shown(raw['id'])} does not match its type, UUID and slot ({device.qemu_id})")
        if device.uuid in uuids:
            raise StateImportError(f"{where}: UUID {device.uuid} appears twice")
        if (uuid8(device.uuid), device.slot) in ids:
            raise StateImportError(f"{where}: its id would collide with {ids[(uuid8(device.uuid), device.slot)]}")
        uuids.add(device.uuid)
        ids[(uuid8(device.uuid), device.slot)] = device.qemu_id
        devices.append(device)
    try:
        check_records(vm, controllers, devices)
    except (ValidationError, SlotError) as exc:
        raise StateImportError(f"Runtime document does not fit VM {vm.name!r}: {exc}") from None
    return vm, controllers, devices


def _import_vm(raw_vm: Any, v1: bool) -> VMSpec:
    if not isinstance(raw_vm, Mapping):
        raise StateImportError("'vm' must be an object")
    _expect_keys(raw_vm, {"name", "machine", "mask", "bus_masks"} | (set() if v1 else {"hotplug_ports", "spare_bridge"}), "vm")
    try:
        extra = {} if v1 else {"hotplug_ports": raw_vm["hotplug_ports"], "spare_bridge": raw_vm["spare_bridge"]}
        return VMSpec(raw_vm["name"], raw_vm["machine"], raw_vm["mask"], _mapping(raw_vm["bus_masks"], "vm.bus_masks"), **extra)
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
                Controller(item["id"], ControllerKind(item["kind"]), item["bus"], item["slot"], item["function"], item["chassis"])
            )
        except (ValidationError, ValueError, TypeError) as exc:
            raise StateImportError(f"Bad controller in {where}: {exc}") from None
    return controllers


def _lock_wait(timeout: float) -> dict[str, Any]:
    """How long and how often to retry a VM lock someone else holds (sync and async alike)."""
    return {
        "stop": tenacity.stop_after_delay(timeout),
        "wait": tenacity.wait_exponential(multiplier=0.005, max=0.1),
        "retry": tenacity.retry_if_exception_type(BlockingIOError),
        "reraise": True,
    }


def _busy(vm: str, timeout: float) -> VMBusy:
    return VMBusy(f"VM {vm!r} is locked by another operation for more than {timeout:g}s")


def _private_dir(path: Path) -> None:
    """Create the state dir 0700; an existing one must be a directory of ours (not a symlink),
    and a looser mode on it (or on its lock directory) is tightened to 0700."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"State directory {path} exists and is not a directory") from None
        if info.st_uid != os.geteuid():
            raise StateError(f"State directory {path} belongs to uid {info.st_uid}, not to us") from None
        _tighten(path, info, 0o700)
        locks = path / "locks"
        with contextlib.suppress(FileNotFoundError):
            info = locks.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise StateError(f"{locks} is not a directory of ours")
            _tighten(locks, info, 0o700)


def _tighten(path: Path, info: os.stat_result, mode: int) -> None:
    """Take away what *mode* does not grant (README promises 0700 dirs and 0600 files)."""
    if stat.S_IMODE(info.st_mode) & ~mode:
        log.warning("Tightening %s from %o to %o", path, stat.S_IMODE(info.st_mode), mode)
        os.chmod(path, mode)  # lstat said: not a symlink


def _existing_file(path: Path) -> bool:
    """Is there a state file?  It (and its WAL files) must be a regular file of ours, and is made
    0600 if it was looser.  Only a missing file means a new store; an empty one is refused."""
    _remove_stale_temporaries(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        left = [side.name for side in _side_files(path) if os.path.lexists(side)]
        if left:  # SQLite would replay an old WAL into a brand-new database
            raise StateCorrupt(
                f"State file {path} is missing but its {' and '.join(left)} {'are' if len(left) > 1 else 'is'} "
                "still there (the file was moved without them?); refusing to start a new store from them. "
                "Put the file back, or move all of them away together to start from nothing.",
                str(path),
            ) from None
        return False
    if not stat.S_ISREG(info.st_mode):
        raise StateError(f"State file {path} is not a regular file (a symlink or a device?)")
    if info.st_uid != os.geteuid():
        raise StateError(f"State file {path} belongs to uid {info.st_uid}, not to us")
    if info.st_size == 0:
        raise StateCorrupt(
            f"State file {path} is empty (truncated?); refusing to treat it as a new store, which would "
            "forget every slot assignment. Restore it from a backup, or move it away together with its -wal and "
            "-shm files to start from nothing.",
            str(path),
        )
    _tighten(path, info, 0o600)
    for side in _side_files(path):
        with contextlib.suppress(FileNotFoundError):
            side_info = side.lstat()
            if stat.S_ISREG(side_info.st_mode) and side_info.st_uid == os.geteuid():
                _tighten(side, side_info, 0o600)
    return True


def _side_files(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


#: A temporary database older than this was left by a process that died while creating the store.
_STALE_TEMPORARY = 600.0


def _remove_stale_temporaries(path: Path) -> None:
    """Remove what a process that died inside :func:`_create_database` left: a half-built
    database, or a second name (hard link) of the live one, which must never be opened."""
    now = time.time()
    try:
        live = path.lstat()
    except FileNotFoundError:
        live = None
    for leftover in path.parent.glob(f".{path.name}.*.new*"):
        with contextlib.suppress(OSError):
            info = leftover.lstat()
            same = live is not None and (info.st_dev, info.st_ino) == (live.st_dev, live.st_ino)
            if same or now - info.st_mtime > _STALE_TEMPORARY:  # a second name of the live file: always
                leftover.unlink()


def _create_database(path: Path) -> None:
    """Build a new database with its schema under a temporary name, then link it into place.

    So the state file is never seen without its schema (an empty file at the
    path is therefore always damage, never "new").  Two processes creating the
    store at once: the first link wins and the other opens that file.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{DB_NAME}.", suffix=".new", dir=path.parent)  # 0600
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: open theirs
        except OSError:  # a file system without hard links: a rename, unless the file appeared meanwhile
            if not os.path.lexists(path):
                os.rename(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


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


def _row_to_device(row: tuple[Any, ...]) -> Device:
    uuid, dev_type, driver, props, bus, slot, state, function, multifunction = row
    return Device(uuid, dev_type, driver, json.loads(props), bus, slot, DeviceState(state), function, bool(multifunction))

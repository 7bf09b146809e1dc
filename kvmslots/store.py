"""Runtime state in the embedded database (SQLite).

Why a database and not Ganeti's runtime file: several processes may work on
one VM at once (a boot, a hotplug, a reconcile), and each must see the slots
the others took.  Every change runs in a ``BEGIN IMMEDIATE`` transaction, which
takes SQLite's write lock before reading, so two processes can never both pick
the same free slot; a ``UNIQUE (vm, bus, slot)`` constraint backs that up.

The state directory is the caller's; it is created 0700 and the database file
0600.  One VM's state can be exported as a versioned JSON document and
imported elsewhere (migration: the target boots with identical slots and ids).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import tenacity

from .devid import uuid8, validate_uuid, validate_vm_name
from .errors import (
    DeviceExists,
    StateConflict,
    StateError,
    StateImportError,
    UnknownDevice,
    UnknownVM,
    ValidationError,
    VMBusy,
)
from .model import Device, DeviceSpec, DeviceState, VMSpec
from .slots import SlotMap

__all__ = ["Store", "Transaction", "EXPORT_FORMAT", "EXPORT_VERSION", "DB_NAME"]

DB_NAME = "kvmslots.sqlite3"
EXPORT_FORMAT = "kvmslots.vm-state"
EXPORT_VERSION = 1
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name      TEXT PRIMARY KEY,
    machine   TEXT NOT NULL,
    mask      TEXT NOT NULL,
    bus_masks TEXT NOT NULL DEFAULT '{}'
);
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
    PRIMARY KEY (vm, uuid),
    UNIQUE (vm, bus, slot),
    UNIQUE (vm, uuid8, slot)
);
"""


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
            "SELECT name, machine, mask, bus_masks FROM vms WHERE name = ?", (validate_vm_name(name),)
        ).fetchone()
        if row is None:
            return None
        return VMSpec(row[0], row[1], row[2], json.loads(row[3]))

    def get_vm(self, name: str) -> VMSpec:
        vm = self.find_vm(name)
        if vm is None:
            raise UnknownVM(f"No VM named {name!r} in the state store")
        return vm

    def put_vm(self, vm: VMSpec) -> None:
        self._conn.execute(
            "INSERT INTO vms (name, machine, mask, bus_masks) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET machine = excluded.machine, mask = excluded.mask, "
            "bus_masks = excluded.bus_masks",
            (vm.name, vm.machine, vm.mask, json.dumps(dict(vm.bus_masks), sort_keys=True)),
        )

    def delete_vm(self, name: str) -> None:
        self._conn.execute("DELETE FROM devices WHERE vm = ?", (name,))
        self._conn.execute("DELETE FROM vms WHERE name = ?", (name,))

    # -- devices --------------------------------------------------------------
    def devices(self, vm: str) -> list[Device]:
        rows = self._conn.execute(
            "SELECT uuid, dev_type, driver, props, bus, slot, state FROM devices WHERE vm = ? "
            "ORDER BY bus, slot",
            (vm,),
        ).fetchall()
        return [_row_to_device(row) for row in rows]

    def find_device(self, vm: str, uuid: str) -> Device | None:
        row = self._conn.execute(
            "SELECT uuid, dev_type, driver, props, bus, slot, state FROM devices WHERE vm = ? AND uuid = ?",
            (vm, validate_uuid(uuid)),
        ).fetchone()
        return None if row is None else _row_to_device(row)

    def get_device(self, vm: str, uuid: str) -> Device:
        device = self.find_device(vm, uuid)
        if device is None:
            raise UnknownDevice(f"VM {vm!r} has no device with UUID {uuid}")
        return device

    def add_device(self, vm: str, device: Device) -> None:
        """Insert a device; its UUID (and uuid8 at that slot) and slot must be new."""
        for other in self.devices(vm):
            if other.uuid == device.uuid:
                raise DeviceExists(f"VM {vm!r} already has a device with UUID {device.uuid} ({other.qemu_id})")
            if other.bus == device.bus and other.slot == device.slot:
                raise StateConflict(f"Slot {device.slot} on {device.bus} is already held by {other.qemu_id}")
            if uuid8(other.uuid) == uuid8(device.uuid) and other.slot == device.slot:
                raise DeviceExists(
                    f"{device.uuid} and {other.uuid} share their first UUID group and slot {device.slot}: "
                    f"their ids would collide ({other.qemu_id})"
                )
        self._conn.execute(
            "INSERT INTO devices (vm, uuid, uuid8, dev_type, driver, props, bus, slot, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    def set_state(self, vm: str, uuid: str, state: DeviceState) -> None:
        cur = self._conn.execute(
            "UPDATE devices SET state = ? WHERE vm = ? AND uuid = ?", (DeviceState(state).value, vm, uuid)
        )
        if cur.rowcount != 1:
            raise UnknownDevice(f"VM {vm!r} has no device with UUID {uuid}")

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

    def slot_maps(self, vm: VMSpec) -> dict[str, SlotMap]:
        """One :class:`SlotMap` per bus that has a device, reserving our records."""
        maps: dict[str, SlotMap] = {}
        for device in self.devices(vm.name):
            if device.bus not in maps:
                maps[device.bus] = SlotMap(vm.mask_for(device.bus), bus=device.bus)
            maps[device.bus].occupy([device.slot])
        return maps


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
            # Create the file ourselves so it is 0600 from the first byte on; never through a symlink.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            with contextlib.suppress(sqlite3.OperationalError):  # another process may be switching it now
                self._conn.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: every committed transaction survives a crash of the process (what the
            # tests check); only a power loss may roll back the last ones, and a power loss also
            # ends every VM they were about.  durable=True fsyncs each commit (about 200 us more).
            self._conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"Cannot open the state store {self.path}: {exc}") from exc
        with self.transaction() as txn:
            version = txn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise StateError(f"{self.path} has schema version {version}; this kvmslots knows {_SCHEMA_VERSION}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    txn.execute(statement)
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

    def _lock_fd(self, vm: str) -> int:
        lock_dir = self.state_dir / "locks"
        path = lock_dir / f"{validate_vm_name(vm)}.lock"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:  # first lock in this state dir
            lock_dir.mkdir(mode=0o700, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)

    @contextlib.contextmanager
    def vm_lock_sync(self, vm: str, timeout: float = 60.0) -> Iterator[None]:
        """:meth:`vm_lock` for synchronous callers (define, delete and import of a VM)."""
        fd = self._lock_fd(vm)
        try:
            if _try_flock(fd):
                yield
                return
            try:
                tenacity.Retrying(**_lock_wait(timeout))(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(vm, timeout) from None
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def vm_lock(self, vm: str, timeout: float = 60.0) -> AsyncIterator[None]:
        """Hold the VM's operation lock (an ``flock`` on a 0600 file in the state dir).

        Transactions keep single writes consistent; this lock keeps whole
        operations apart, so that :func:`~kvmslots.hotplug.reconcile` never
        mistakes a hot add that is still under way in another process for
        one a crash left behind.  The kernel drops the lock when its holder
        dies, so a crashed process never leaves the VM locked.
        """
        fd = self._lock_fd(vm)
        try:
            if _try_flock(fd):  # uncontended: no retry machinery
                yield
                return
            try:
                async for attempt in tenacity.AsyncRetrying(**_lock_wait(timeout)):
                    with attempt:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(vm, timeout) from None
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # -- conveniences (each its own transaction) -------------------------------
    def define_vm(self, vm: VMSpec) -> VMSpec:
        """Create or update a VM; changing the mask must not mask a slot in use."""
        with self.vm_lock_sync(vm.name), self.transaction() as txn:
            for device in txn.devices(vm.name):
                slot_map = SlotMap(vm.mask_for(device.bus), bus=device.bus)
                if slot_map.is_masked(device.slot):
                    raise StateConflict(
                        f"The new mask of {device.bus} reserves slot {device.slot}, held by {device.qemu_id}"
                    )
            txn.put_vm(vm)
        return vm

    def get_vm(self, name: str) -> VMSpec:
        with self.transaction() as txn:
            return txn.get_vm(name)

    def has_vm(self, name: str) -> bool:
        with self.transaction() as txn:
            return txn.find_vm(name) is not None

    def vms(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT name FROM vms ORDER BY name")]

    def delete_vm(self, name: str) -> None:
        with self.vm_lock_sync(name), self.transaction() as txn:
            txn.get_vm(name)
            txn.delete_vm(name)

    def devices(self, vm: str) -> list[Device]:
        with self.transaction() as txn:
            txn.get_vm(vm)
            return txn.devices(vm)

    def get_device(self, vm: str, uuid: str) -> Device:
        with self.transaction() as txn:
            return txn.get_device(vm, uuid)

    # -- export / import ------------------------------------------------------
    def export_vm(self, name: str) -> dict[str, Any]:
        """One VM's state as a versioned JSON-ready document."""
        with self.transaction() as txn:
            vm = txn.get_vm(name)
            devices = txn.devices(name)
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "vm": vm.to_json(),
            "devices": [device.to_json() for device in devices],
        }

    def import_vm(self, document: Mapping[str, Any] | str | bytes, *, replace: bool = False) -> VMSpec:
        """Load a document made by :meth:`export_vm`; all checked before anything is written.

        An existing VM of that name is a :class:`StateConflict` unless
        *replace* is true, in which case its state is replaced whole.
        """
        vm, devices = parse_export(document)
        with self.vm_lock_sync(vm.name), self.transaction() as txn:
            if txn.find_vm(vm.name) is not None:
                if not replace:
                    raise StateConflict(f"VM {vm.name!r} already exists; import with replace=True to overwrite it")
                txn.delete_vm(vm.name)
            txn.put_vm(vm)
            for device in devices:
                txn.add_device(vm.name, device)
        return vm


def parse_export(document: Mapping[str, Any] | str | bytes) -> tuple[VMSpec, list[Device]]:
    """Validate an exported document completely; :class:`StateImportError` names the first problem."""
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StateImportError(f"Runtime document is not valid JSON: {exc}") from None
    if not isinstance(document, Mapping):
        raise StateImportError("Runtime document must be a JSON object")
    if document.get("format") != EXPORT_FORMAT:
        raise StateImportError(f"Not a kvmslots runtime document (format {document.get('format')!r})")
    if document.get("version") != EXPORT_VERSION:
        raise StateImportError(
            f"Runtime document version {document.get('version')!r} is not supported (expected {EXPORT_VERSION})"
        )
    _expect_keys(document, {"format", "version", "vm", "devices"}, "document")
    raw_vm = document["vm"]
    if not isinstance(raw_vm, Mapping):
        raise StateImportError("'vm' must be an object")
    _expect_keys(raw_vm, {"name", "machine", "mask", "bus_masks"}, "vm")
    try:
        vm = VMSpec(raw_vm["name"], raw_vm["machine"], raw_vm["mask"], _mapping(raw_vm["bus_masks"], "vm.bus_masks"))
    except ValidationError as exc:
        raise StateImportError(f"Bad VM in runtime document: {exc}") from None
    raw_devices = document["devices"]
    if not isinstance(raw_devices, list):
        raise StateImportError("'devices' must be a list")
    devices: list[Device] = []
    taken: dict[tuple[str, int], str] = {}
    ids: dict[tuple[str, int], str] = {}
    uuids: set[str] = set()
    for index, raw in enumerate(raw_devices):
        where = f"devices[{index}]"
        if not isinstance(raw, Mapping):
            raise StateImportError(f"{where} must be an object")
        _expect_keys(raw, {"uuid", "type", "driver", "props", "bus", "slot", "state", "id"}, where)
        try:
            spec = DeviceSpec(
                raw["uuid"], raw["type"], raw["driver"], _mapping(raw["props"], f"{where}.props"), raw["bus"], raw["slot"]
            )
            state = DeviceState(raw["state"])
        except (ValidationError, ValueError) as exc:
            raise StateImportError(f"Bad device in {where}: {exc}") from None
        if spec.slot is None:
            raise StateImportError(f"{where} has no slot")
        device = Device.from_spec(spec, spec.slot, state)
        if raw["id"] != device.qemu_id:
            raise StateImportError(f"{where}: id {raw['id']!r} does not match its type, UUID and slot ({device.qemu_id})")
        if device.uuid in uuids:
            raise StateImportError(f"{where}: UUID {device.uuid} appears twice")
        if SlotMap(vm.mask_for(device.bus)).is_masked(device.slot):
            raise StateImportError(f"{where}: slot {device.slot} on {device.bus} is reserved by the mask")
        if (uuid8(device.uuid), device.slot) in ids:
            raise StateImportError(f"{where}: its id would collide with {ids[(uuid8(device.uuid), device.slot)]}")
        if (device.bus, device.slot) in taken:
            raise StateImportError(
                f"{where}: slot {device.slot} on {device.bus} is also held by {taken[(device.bus, device.slot)]}"
            )
        uuids.add(device.uuid)
        taken[(device.bus, device.slot)] = device.qemu_id
        ids[(uuid8(device.uuid), device.slot)] = device.qemu_id
        devices.append(device)
    return vm, devices


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


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _private_dir(path: Path) -> None:
    """Create the state dir 0700; an existing one must be a directory of ours (not a symlink)."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"State directory {path} exists and is not a directory") from None
        if info.st_uid != os.geteuid():
            raise StateError(f"State directory {path} belongs to uid {info.st_uid}, not to us") from None


def _expect_keys(obj: Mapping[str, Any], keys: set[str], where: str) -> None:
    missing = keys - set(obj)
    unknown = set(obj) - keys
    if missing:
        raise StateImportError(f"{where} lacks {', '.join(sorted(missing))}")
    if unknown:
        raise StateImportError(f"{where} has unknown keys {', '.join(sorted(map(str, unknown)))}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StateImportError(f"{where} must be an object")
    return value


def _row_to_device(row: tuple[Any, ...]) -> Device:
    uuid, dev_type, driver, props, bus, slot, state = row
    return Device(uuid, dev_type, driver, json.loads(props), bus, slot, DeviceState(state))

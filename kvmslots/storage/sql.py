"""The SQL both backends speak: one implementation of the two stores over a DB-API connection.

SQLite and PostgreSQL differ here only in three places, which subclasses
fill in: the parameter marker (``?`` or ``%s``), how a write transaction
keeps other writers of the same VM or host out (SQLite's ``BEGIN
IMMEDIATE`` already excludes every other writer; PostgreSQL takes a
transaction-scoped advisory lock on the VM and a row lock on the host), and
how many rows go in one statement.  Everything else, including the checks
that make a slot reservation safe, is written once.

Ordering is done in Python, not with ``ORDER BY`` on text: the two engines
collate text differently, and the order of devices and addresses must not
depend on the backend.
"""

from __future__ import annotations

import dataclasses
import json
import json.encoder
import operator
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from ..devid import uuid8, validate_uuid, validate_vm_name
from ..errors import (
    DeviceExists,
    InvalidTransition,
    StateConflict,
    UnknownDevice,
    UnknownHost,
    UnknownVM,
    UnsupportedMachine,
)
from ..model import TRANSITIONS, Controller, Device, DeviceState, VMSpec, validate_function
from ..pci.device import HYPERVISOR_FIELDS, PciDevice, PciStatus
from ..pci.request import InstancePciRequest
from .base import HostChanges, HostRecord, PoolCount

__all__ = ["SqlTransaction", "DEVICE_COLUMNS", "PCI_COLUMNS"]

DEVICE_COLUMNS = "uuid, dev_type, driver, props, bus, slot, state, function, multifunction, qemu_id"
PCI_COLUMNS = (*HYPERVISOR_FIELDS, "tags", "status", "instance_uuid", "request_id", "stale", "vanished")
_PCI_SELECT = ", ".join(PCI_COLUMNS)
_PCI_UPSERT = (
    f"INSERT INTO pci_devices (node, {_PCI_SELECT}) VALUES ({', '.join('?' for _ in range(len(PCI_COLUMNS) + 1))}) "
    f"ON CONFLICT (node, address) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in PCI_COLUMNS if name != "address")
)
_PCI_DELETE = "DELETE FROM pci_devices WHERE node = ? AND address = ?"
_REQUEST_UPSERT = (
    "INSERT INTO pci_requests (node, instance_uuid, request_id, body) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (node, instance_uuid, request_id) DO UPDATE SET body = excluded.body"
)
_REQUEST_DELETE = "DELETE FROM pci_requests WHERE node = ? AND instance_uuid = ? AND request_id = ?"
_PCI_STATE_UPDATE = (
    "UPDATE pci_devices SET status = ?, instance_uuid = ?, request_id = ?, stale = ?, vanished = ? "
    "WHERE node = ? AND address = ?"
)
#: A VF's pool depends on its PF; other devices' do not (as in PciDeviceStats._key).
_POOL_PARENT = "CASE WHEN dev_type = 'type-VF' THEN parent_addr END"


class SqlTransaction:
    """Reads and writes inside one transaction of a backend (see :mod:`kvmslots.storage.base`).

    Obtained from :meth:`kvmslots.store.Store.transaction` or ``.reading()``;
    everything done through a write transaction is committed together when
    the ``with`` block ends, or not at all.
    """

    def __init__(self, conn: Any, *, write: bool) -> None:
        self._conn = conn
        self._write = write
        self._vms: set[str] = set()  # names already validated (and guarded) in this transaction
        #: Did this transaction change a host's devices (not only its last-sync time)?
        self.wrote_host = False

    # -- what a backend fills in ----------------------------------------------------------
    def _sql(self, sql: str) -> str:
        """The statement in this backend's parameter style (written with ``?``)."""
        return sql

    def _guard_vm(self, vm: str) -> None:
        """Keep other writers of *vm* out until this transaction ends (a write transaction only)."""

    def _lock_host_row(self) -> str:
        """The suffix that locks the row a ``SELECT`` reads, until the transaction ends."""
        return ""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Raw SQL in this transaction: for migrations and for tests that must damage a state on purpose."""
        return self._conn.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """One statement (written with ``?``) over many rows, in this transaction."""
        self._conn.executemany(self._sql(sql), rows)

    def _vm(self, name: str) -> str:
        if name in self._vms:
            return name
        name = validate_vm_name(name)
        if self._write:
            self._guard_vm(name)
        self._vms.add(name)
        return name

    # -- VMs --------------------------------------------------------------------------
    def find_vm(self, name: str) -> VMSpec | None:
        """The stored VM, or None; one stored with a machine type kvmslots no longer places devices on is a
        :class:`StateConflict` that says to delete it."""
        row = self.execute(
            "SELECT name, machine, mask, bus_masks, hotplug_ports, spare_bridge FROM vms WHERE name = ?",
            (self._vm(name),),
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
        return self.execute("SELECT 1 FROM vms WHERE name = ?", (self._vm(name),)).fetchone() is not None

    def get_vm(self, name: str) -> VMSpec:
        """The stored VM; :class:`UnknownVM` when there is none."""
        vm = self.find_vm(name)
        if vm is None:
            raise UnknownVM(name)
        return vm

    def put_vm(self, vm: VMSpec) -> None:
        """Insert the VM, or update its spec in place (its devices and controllers stay)."""
        self.execute(
            "INSERT INTO vms (name, machine, mask, bus_masks, hotplug_ports, spare_bridge) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET machine = excluded.machine, mask = excluded.mask, "
            "bus_masks = excluded.bus_masks, hotplug_ports = excluded.hotplug_ports, "
            "spare_bridge = excluded.spare_bridge",
            (
                self._vm(vm.name),
                vm.machine,
                vm.mask,
                json.dumps(dict(vm.bus_masks), sort_keys=True),
                vm.hotplug_ports,
                int(vm.spare_bridge),
            ),
        )

    def delete_vm(self, name: str) -> None:
        """Delete the VM's devices, controllers and row; nothing to delete is fine."""
        name = self._vm(name)
        self.execute("DELETE FROM devices WHERE vm = ?", (name,))
        self.execute("DELETE FROM controllers WHERE vm = ?", (name,))
        self.execute("DELETE FROM vms WHERE name = ?", (name,))

    def vm_names(self) -> list[str]:
        """Every VM's name, sorted in Python (the same order on both engines)."""
        return sorted(row[0] for row in self.execute("SELECT name FROM vms").fetchall())

    # -- devices ------------------------------------------------------------------------
    def devices(self, vm: str) -> list[Device]:
        """The VM's devices by bus, slot and function, sorted in Python (the same order on both engines)."""
        rows = self.execute(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE vm = ?", (self._vm(vm),)).fetchall()
        return sorted(map(_row_to_device, rows), key=_device_order)

    def find_device(self, vm: str, uuid: str) -> Device | None:
        """The device's record, or None (the UUID is validated first)."""
        row = self.execute(
            f"SELECT {DEVICE_COLUMNS} FROM devices WHERE vm = ? AND uuid = ?", (self._vm(vm), validate_uuid(uuid))
        ).fetchone()
        return None if row is None else _row_to_device(row)

    def get_device(self, vm: str, uuid: str) -> Device:
        """The device's record; :class:`UnknownDevice` when there is none."""
        device = self.find_device(vm, uuid)
        if device is None:
            raise UnknownDevice(f"VM {vm!r} has no device with UUID {uuid}", vm=vm, uuid=uuid)
        return device

    def add_device(self, vm: str, device: Device) -> None:
        """Reserve a device's slot; its UUID (and uuid8 at that slot) and its slot must be new.

        A slot is shared only by the functions of one multifunction group.
        """
        vm = self._vm(vm)
        validate_function(device.function)
        # Only the rows that can clash (same UUID, same slot, same uuid8 at that slot), by index,
        # in the order devices() gives: the same checks as over every device, at O(1) per add.
        rows = self.execute(
            f"SELECT {DEVICE_COLUMNS} FROM devices WHERE vm = ? AND "
            "(uuid = ? OR (bus = ? AND slot = ?) OR (uuid8 = ? AND slot = ?) OR qemu_id = ?)",
            (vm, device.uuid, device.bus, device.slot, uuid8(device.uuid), device.slot, device.qemu_id),
        ).fetchall()
        for other in sorted(map(_row_to_device, rows), key=_device_order):
            if other.uuid == device.uuid:
                raise DeviceExists(f"VM {vm!r} already has a device with UUID {device.uuid} ({other.qemu_id})",
                                   **other.facts(vm))
            if other.qemu_id == device.qemu_id:
                raise DeviceExists(f"VM {vm!r} already has a device with the id {device.qemu_id} ({other.uuid})",
                                   **other.facts(vm))
            if other.bus == device.bus and other.slot == device.slot and (
                other.function == device.function or not (other.in_group and device.in_group)
            ):
                raise StateConflict(f"Slot {device.slot} on {device.bus} is already held by {other.qemu_id}",
                                    **other.facts(vm))
            if uuid8(other.uuid) == uuid8(device.uuid) and other.slot == device.slot:
                raise DeviceExists(
                    f"{device.uuid} and {other.uuid} share their first UUID group and slot {device.slot}: "
                    f"their ids would collide ({other.qemu_id})",
                    **other.facts(vm),
                )
        held = self.execute(
            "SELECT id FROM controllers WHERE vm = ? AND bus = ? AND slot = ? ORDER BY chassis LIMIT 1",
            (vm, device.bus, device.slot),
        ).fetchone()
        if held is not None:
            raise StateConflict(f"Slot {device.slot} on {device.bus} is held by {held[0]}",
                                vm=vm, bus=device.bus, slot=device.slot, device_id=held[0])
        self.execute(
            "INSERT INTO devices (vm, uuid, uuid8, dev_type, driver, props, bus, slot, state, function, multifunction, "
            "qemu_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                device.given_id,
            ),
        )

    def set_state(self, vm: str, uuid: str, state: DeviceState, *, unplug_requested: bool = False) -> None:
        """Move a device to *state*, which the state machine must allow from the stored one.

        *unplug_requested* records that QEMU has its ``device_del`` (only for
        ``detaching``); any other change clears it.
        """
        vm = self._vm(vm)
        state = DeviceState(state)
        row = self.execute("SELECT state FROM devices WHERE vm = ? AND uuid = ?", (vm, uuid)).fetchone()
        if row is None:
            raise UnknownDevice(f"VM {vm!r} has no device with UUID {uuid}", vm=vm, uuid=uuid)
        if state not in TRANSITIONS[DeviceState(row[0])]:
            raise InvalidTransition(vm, uuid, row[0], state.value)
        requested = bool(unplug_requested) and state is DeviceState.DETACHING
        self.execute(
            "UPDATE devices SET state = ?, unplug_requested = ? WHERE vm = ? AND uuid = ?",
            (state.value, int(requested), vm, uuid),
        )

    def unplug_requested(self, vm: str) -> set[str]:
        """UUIDs of the VM's detaching devices whose ``device_del`` QEMU is known to have."""
        rows = self.execute(
            "SELECT uuid FROM devices WHERE vm = ? AND state = 'detaching' AND unplug_requested = 1", (self._vm(vm),)
        ).fetchall()
        return {row[0] for row in rows}

    def remove_device(self, vm: str, uuid: str, *, expect: Device | None = None) -> bool:
        """Forget a device and so release its slot; True if a record went.

        With *expect*, only the record with that bus, slot and state goes: a
        caller acting on an older read never deletes a newer record.
        """
        vm = self._vm(vm)
        if expect is None:
            cur = self.execute("DELETE FROM devices WHERE vm = ? AND uuid = ?", (vm, uuid))
        else:
            cur = self.execute(
                "DELETE FROM devices WHERE vm = ? AND uuid = ? AND bus = ? AND slot = ? AND state = ?",
                (vm, uuid, expect.bus, expect.slot, expect.state.value),
            )
        return bool(cur.rowcount > 0)

    # -- controllers (root ports and bridges kvmslots planned) ----------------------------
    def controllers(self, vm: str) -> list[Controller]:
        """The VM's controllers by chassis number."""
        rows = self.execute(
            "SELECT id, kind, bus, slot, function, chassis FROM controllers WHERE vm = ? ORDER BY chassis",
            (self._vm(vm),),
        ).fetchall()
        return [Controller(*row) for row in rows]

    def add_controller(self, vm: str, controller: Controller) -> None:
        """Record a controller; a clash of id, chassis number or place with a stored one is a
        :class:`StateConflict`."""
        vm = self._vm(vm)
        clash = self.execute(
            "SELECT id FROM controllers "
            "WHERE vm = ? AND (id = ? OR chassis = ? OR (bus = ? AND slot = ? AND function = ?))",
            (vm, controller.id, controller.chassis, controller.bus, controller.slot, controller.function),
        ).fetchone()
        if clash is not None:
            raise StateConflict(f"VM {vm!r}: {controller.id} clashes with the stored controller {clash[0]}")
        self.execute(
            "INSERT INTO controllers (vm, id, kind, bus, slot, function, chassis) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (vm, controller.id, controller.kind.value, controller.bus, controller.slot, controller.function,
             controller.chassis),
        )

    # -- host devices -------------------------------------------------------------------
    def lock_host(self, node: str, numa_sockets: Mapping[int, int]) -> int:
        """The host's generation, with its row locked until the transaction ends (created on the
        host's first write; *numa_sockets*, the tracker's configuration, is kept up to date)."""
        sockets = _sockets_json(tuple(sorted(numa_sockets.items())) if numa_sockets else ())
        select = "SELECT generation, numa_sockets FROM pci_hosts WHERE node = ?" + self._lock_host_row()
        row = self.execute(select, (node,)).fetchone()
        if row is None:
            self.execute(
                "INSERT INTO pci_hosts (node, generation, numa_sockets) VALUES (?, 0, ?) ON CONFLICT (node) DO NOTHING",
                (node, sockets),
            )
            row = self.execute(select, (node,)).fetchone()
        if row[1] != sockets:
            self.execute("UPDATE pci_hosts SET numa_sockets = ? WHERE node = ?", (sockets, node))
        return int(row[0])

    def host_generation(self, node: str) -> int:
        """The host's committed generation, without a lock; 0 when it has no row."""
        row = self.execute("SELECT generation FROM pci_hosts WHERE node = ?", (node,)).fetchone()
        return int(row[0]) if row else 0

    def load_host(self, node: str) -> tuple[list[PciDevice], list[tuple[str, InstancePciRequest]]]:
        """The host's devices by address, and its stored PCI requests as (instance UUID, request)."""
        rows = self.execute(f"SELECT {_PCI_SELECT} FROM pci_devices WHERE node = ?", (node,)).fetchall()
        rows.sort(key=_first)  # by address
        devices = _rows_to_pci(rows)
        requests = [
            (uuid, InstancePciRequest.from_json(body))
            for uuid, body in self.execute(
                "SELECT instance_uuid, body FROM pci_requests WHERE node = ?", (node,)
            ).fetchall()
        ]
        return devices, requests

    def write_host_changes(self, node: str, changes: HostChanges) -> bool:
        """Write what one tracker operation changed (see :meth:`HostDeviceTransaction.write_host_changes`).

        The generation goes first, so that a writer that did not lock the
        host's row beforehand takes it before any device row, in the order
        :meth:`lock_host` takes them (PostgreSQL never sees two writers wait
        for each other).
        """
        if changes.previous is not None:
            assert changes.generation is not None
            bumped = self.execute(
                "UPDATE pci_hosts SET generation = ? WHERE node = ? AND generation = ?",
                (changes.generation, node, changes.previous),
            )
            if bumped.rowcount != 1:
                return False
        elif changes.generation is not None:
            self.execute("UPDATE pci_hosts SET generation = ? WHERE node = ?", (changes.generation, node))
        self.wrote_host = self.wrote_host or bool(
            changes.put or changes.states or changes.deleted or changes.requests_put or changes.requests_deleted
        )
        # a claim, an allocation or a free writes one row of a kind: executed alone, not as a batch
        if changes.deleted:
            self._write_rows(_PCI_DELETE, [(node, a) for a in changes.deleted])
        if changes.put:
            self._write_rows(_PCI_UPSERT, [(node, *_pci_to_row(d)) for d in changes.put])
        if changes.states:
            self._write_rows(_PCI_STATE_UPDATE, [(*_pci_state(d), node, d.address) for d in changes.states])
        if changes.requests_put:
            self._write_rows(
                _REQUEST_UPSERT,
                [(node, uuid, request.request_id, _json(request.to_dict())) for uuid, request in changes.requests_put],
            )
        if changes.requests_deleted:
            self._write_rows(_REQUEST_DELETE, [(node, u, r) for u, r in changes.requests_deleted])
        return True

    def _write_rows(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if len(rows) == 1:
            self.execute(sql, rows[0])
        else:
            self.executemany(sql, rows)

    def mark_synced(self, node: str, when: float) -> None:
        """Set the host's last-sync time (seconds since the epoch)."""
        self.execute("UPDATE pci_hosts SET synced_at = ? WHERE node = ?", (when, node))

    def device_spec(self, node: str) -> Any | None:
        """The host's stored device spec, decoded; None when there is none."""
        row = self.execute("SELECT device_spec FROM pci_hosts WHERE node = ?", (node,)).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    def set_device_spec(self, node: str, spec: Any) -> None:
        """Store the host's device spec as JSON on its row (nothing is written when it has none)."""
        self.execute("UPDATE pci_hosts SET device_spec = ? WHERE node = ?", (json.dumps(spec), node))

    def hosts(self, *, counts: bool = True) -> list[HostRecord]:
        """Every host of the inventory; *counts* adds its device and free counts (a scan of its rows)."""
        counted = {
            node: (int(total), int(free or 0))
            for node, total, free in self.execute(
                "SELECT node, COUNT(*), SUM(CASE WHEN status = 'available' THEN 1 ELSE 0 END) "
                "FROM pci_devices GROUP BY node"
            ).fetchall()
        } if counts else {}
        records = []
        for node, generation, synced_at, sockets in self.execute(
            "SELECT node, generation, synced_at, numa_sockets FROM pci_hosts"
        ).fetchall():
            devices, free = counted.get(node, (0, 0)) if counts else (None, None)
            sockets_map = {int(k): int(v) for k, v in json.loads(sockets).items()}
            records.append(HostRecord(node, int(generation), devices, free, synced_at, sockets_map))
        return sorted(records, key=lambda h: h.name)

    def free_pools(
        self, hosts: Iterable[str] | None = None, ids: Iterable[tuple[str, str]] | None = None
    ) -> list[PoolCount]:
        """Available devices counted by host, pool key and full tag set, aggregated by the database;
        only of *hosts*, and only with these (vendor, product) *ids*, when given."""
        where: list[str] = ["status = 'available'"]
        params: list[str] = []
        for column, texts in (
            ("node", None if hosts is None else list(hosts)),
            ("vendor_id || ':' || product_id", None if ids is None else [f"{v}:{p}" for v, p in ids]),
        ):
            if texts is None:
                continue
            if not texts:
                return []
            where.append(f"{column} IN ({', '.join('?' for _ in texts)})")
            params += texts
        rows = self.execute(
            f"SELECT node, vendor_id, product_id, numa_node, dev_type, {_POOL_PARENT}, tags, COUNT(*) "
            f"FROM pci_devices WHERE {' AND '.join(where)} "
            f"GROUP BY node, vendor_id, product_id, numa_node, dev_type, {_POOL_PARENT}, tags",
            params,
        ).fetchall()
        parsed: dict[str, dict[str, str]] = {}  # a few distinct tag sets across thousands of rows
        return [
            PoolCount(node, vendor, product, numa, dev_type, parent,
                      parsed[tags] if tags in parsed else parsed.setdefault(tags, json.loads(tags)), int(count))
            for node, vendor, product, numa, dev_type, parent, tags, count in rows
        ]

    def forget_host(self, node: str) -> int:
        """Remove a host's devices, requests and row; the number of devices that went."""
        if self.execute("SELECT 1 FROM pci_hosts WHERE node = ?" + self._lock_host_row(), (node,)).fetchone() is None:
            raise UnknownHost(node)
        gone = self.execute("DELETE FROM pci_devices WHERE node = ?", (node,)).rowcount
        self.execute("DELETE FROM pci_requests WHERE node = ?", (node,))
        self.execute("DELETE FROM pci_hosts WHERE node = ?", (node,))
        return int(gone)


@lru_cache(maxsize=64)
def _sockets_json(items: tuple[tuple[int, int], ...]) -> str:
    """A host's NUMA node -> socket map as stored (every tracker operation passes its own)."""
    return json.dumps({str(k): v for k, v in items})


def _device_order(device: Device) -> tuple[str, int, int]:
    return device.bus, device.slot, device.function


def _row_to_device(row: Sequence[Any]) -> Device:
    uuid, dev_type, driver, props, bus, slot, state, function, multifunction, given_id = row
    return Device(
        uuid, dev_type, driver, json.loads(props), bus, slot, DeviceState(state), function, bool(multifunction),
        given_id,
    )


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_encode = None if _C_ENCODER is None else _C_ENCODER(
    None, _not_json, json.encoder.encode_basestring_ascii, None, ": ", ", ", True, False, True
)


def _json(value: Any) -> str:
    """``json.dumps(value, sort_keys=True)``, the same text, without making an encoder per call (a
    claim writes a request, a sync a row per new device: this is on their path)."""
    if _encode is None:
        return json.dumps(value, sort_keys=True)
    return "".join(_encode(value, 0))


def _pci_to_row(device: PciDevice) -> tuple[Any, ...]:
    return (
        *(getattr(device, name) for name in HYPERVISOR_FIELDS),
        _json(device.tags),
        device.status.value,
        device.instance_uuid,
        device.request_id,
        None if device.stale is None else _json(device.stale),
        int(device.vanished),
    )


def _pci_state(device: PciDevice) -> tuple[Any, ...]:
    """The state columns of a device's row (``_PCI_STATE_UPDATE``'s order)."""
    return (
        device.status.value,
        device.instance_uuid,
        device.request_id,
        None if device.stale is None else _json(device.stale),
        int(device.vanished),
    )


_first = operator.itemgetter(0)
_STATUSES = {status.value: status for status in PciStatus}
# _rows_to_pci passes a row's columns to PciDevice by position
assert tuple(f.name for f in dataclasses.fields(PciDevice))[: len(PCI_COLUMNS)] == PCI_COLUMNS


def _rows_to_pci(rows: Sequence[Sequence[Any]]) -> list[PciDevice]:
    """:func:`_row_to_pci` for a host's rows (a reload builds thousands: the few distinct tag sets
    are parsed once, each device getting its own copy)."""
    tag_sets: dict[str, dict[str, str]] = {}
    devices: list[PciDevice] = []
    append = devices.append
    for (address, vendor_id, product_id, dev_type, parent_addr, numa_node, iommu_group, dev_id, label, devname,
         parent_devname, tags, status, instance_uuid, request_id, stale, vanished) in rows:
        parsed = tag_sets.get(tags)
        if parsed is None:
            parsed = tag_sets[tags] = json.loads(tags)
        append(PciDevice(
            address, vendor_id, product_id, dev_type, parent_addr, numa_node, iommu_group, dev_id, label, devname,
            parent_devname, dict(parsed), _STATUSES.get(status) or PciStatus(status), instance_uuid, request_id,
            None if stale is None else json.loads(stale), bool(vanished),
        ))
    return devices


def _row_to_pci(row: Sequence[Any]) -> PciDevice:
    values = dict(zip(PCI_COLUMNS, row))
    return PciDevice(
        **{name: values[name] for name in HYPERVISOR_FIELDS},
        tags=json.loads(values["tags"]),
        status=PciStatus(values["status"]),
        instance_uuid=values["instance_uuid"],
        request_id=values["request_id"],
        stale=None if values["stale"] is None else json.loads(values["stale"]),
        vanished=bool(values["vanished"]),
    )

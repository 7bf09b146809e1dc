"""The database schema, shared by both backends, and how older schemas are upgraded.

The DDL is written in the SQL that SQLite and PostgreSQL both accept (TEXT,
INTEGER, BIGINT, DOUBLE PRECISION, CHECK, ON DELETE CASCADE, ON CONFLICT), so
there is one schema, not two that drift apart.  Where it lives differs:
SQLite keeps the version in ``PRAGMA user_version`` (as every kvmslots state
file since 0.1 does), PostgreSQL in the one-row table ``kvmslots_schema``.

Versions:
  1. vms + devices.
  2. devices.unplug_requested (QEMU has the device_del of a detaching device).
  3. multifunction slots (devices.function, .multifunction), controllers (root ports, bridges),
     vms.hotplug_ports and vms.spare_bridge.
  4. the host PCI tracker's tables join the schema (before, the tracker created them itself):
     pci_devices, pci_requests, and pci_hosts (one row per host: generation, NUMA sockets,
     device spec, last sync), so one database can hold many hosts' inventories.
  5. devices.qemu_id: the id another manager gave a device of a VM kvmslots took over
     (NULL: kvmslots derives it), unique per VM.
"""

from __future__ import annotations

from ..model import DEFAULT_HOTPLUG_PORTS

__all__ = ["SCHEMA_VERSION", "CREATE", "SQLITE_MIGRATIONS", "COMMON_MIGRATIONS"]

SCHEMA_VERSION = 5

_VMS = f"""CREATE TABLE IF NOT EXISTS vms (
    name      TEXT PRIMARY KEY,
    machine   TEXT NOT NULL,
    mask      TEXT NOT NULL,
    bus_masks TEXT NOT NULL DEFAULT '{{}}',
    hotplug_ports INTEGER NOT NULL DEFAULT {DEFAULT_HOTPLUG_PORTS},
    spare_bridge  INTEGER NOT NULL DEFAULT 0
)"""
#: The devices table of schema 3 (what migration 2 -> 3 builds; migration 4 -> 5 adds qemu_id).
_DEVICES_V3 = """CREATE TABLE IF NOT EXISTS devices (
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
_DEVICES = _DEVICES_V3.replace("    PRIMARY KEY (vm, uuid),", "    qemu_id  TEXT,\n    PRIMARY KEY (vm, uuid),")
_CONTROLLERS = """CREATE TABLE IF NOT EXISTS controllers (
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
#: As the tracker of kvmslots <= 0.3 created them (kept so an old file upgrades in place).
_PCI_DEVICES = """CREATE TABLE IF NOT EXISTS pci_devices (
    node TEXT NOT NULL, address TEXT NOT NULL, vendor_id TEXT NOT NULL, product_id TEXT NOT NULL,
    dev_type TEXT NOT NULL, parent_addr TEXT, numa_node INTEGER, iommu_group INTEGER,
    dev_id TEXT, label TEXT, devname TEXT, parent_devname TEXT, tags TEXT NOT NULL, status TEXT NOT NULL,
    instance_uuid TEXT, request_id TEXT, stale TEXT, vanished INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node, address))"""
_PCI_REQUESTS = """CREATE TABLE IF NOT EXISTS pci_requests (
    node TEXT NOT NULL, instance_uuid TEXT NOT NULL, request_id TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (node, instance_uuid, request_id))"""
_PCI_HOSTS = """CREATE TABLE IF NOT EXISTS pci_hosts (
    node TEXT PRIMARY KEY,
    generation BIGINT NOT NULL DEFAULT 0,
    numa_sockets TEXT NOT NULL DEFAULT '{}',
    device_spec TEXT,
    synced_at DOUBLE PRECISION)"""

_GIVEN_IDS = "CREATE UNIQUE INDEX IF NOT EXISTS devices_qemu_id ON devices (vm, qemu_id)"

#: The whole schema of the current version, statement by statement.
CREATE = (_VMS, _DEVICES, _GIVEN_IDS, _CONTROLLERS, _PCI_DEVICES, _PCI_REQUESTS, _PCI_HOSTS)

#: Upgrades both backends make the same way, from the version in the key to the next one.
COMMON_MIGRATIONS: dict[int, list[str]] = {
    4: ["ALTER TABLE devices ADD COLUMN qemu_id TEXT", _GIVEN_IDS],
}

#: SQLite upgrades in place, from the version in the key to the next one.
SQLITE_MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE devices ADD COLUMN unplug_requested INTEGER NOT NULL DEFAULT 0"],
    2: [
        # SQLite cannot change a UNIQUE constraint in place: the devices table is rebuilt
        f"ALTER TABLE vms ADD COLUMN hotplug_ports INTEGER NOT NULL DEFAULT {DEFAULT_HOTPLUG_PORTS}",
        "ALTER TABLE vms ADD COLUMN spare_bridge INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE devices RENAME TO devices_v2",
        _DEVICES_V3,
        "INSERT INTO devices (vm, uuid, uuid8, dev_type, driver, props, bus, slot, state, unplug_requested) "
        "SELECT vm, uuid, uuid8, dev_type, driver, props, bus, slot, state, unplug_requested FROM devices_v2",
        "DROP TABLE devices_v2",
        _CONTROLLERS,
    ],
    3: [
        # a 0.3 tracker may have made pci_devices, pci_requests and pci_meta (node, generation)
        _PCI_DEVICES,
        _PCI_REQUESTS,
        _PCI_HOSTS,
        "CREATE TABLE IF NOT EXISTS pci_meta (node TEXT PRIMARY KEY, generation INTEGER NOT NULL)",
        "INSERT INTO pci_hosts (node, generation) SELECT node, generation FROM pci_meta",
        "DROP TABLE pci_meta",
    ],
    **COMMON_MIGRATIONS,
}

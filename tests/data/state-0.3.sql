-- A state file written by kvmslots 0.3.0 (commit 65f4b5a): VM web1 (q35, two planned devices,
-- six root ports), VM old1 (pc, one device), and the host tracker of node 'local' with 12 devices,
-- one VF allocated to web1 under a request.  Made by running 0.3.0's own code; dumped with
-- sqlite3's iterdump so that it can be read and diffed.  Load it and set user_version.
PRAGMA user_version = 3;
BEGIN TRANSACTION;
CREATE TABLE controllers (
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
);
INSERT INTO "controllers" VALUES('web1','pcie-port-1','pcie-root-port','pcie.0',2,0,1);
INSERT INTO "controllers" VALUES('web1','pcie-port-2','pcie-root-port','pcie.0',2,1,2);
INSERT INTO "controllers" VALUES('web1','pcie-port-3','pcie-root-port','pcie.0',2,2,3);
INSERT INTO "controllers" VALUES('web1','pcie-port-4','pcie-root-port','pcie.0',2,3,4);
INSERT INTO "controllers" VALUES('web1','pcie-port-5','pcie-root-port','pcie.0',2,4,5);
INSERT INTO "controllers" VALUES('web1','pcie-port-6','pcie-root-port','pcie.0',2,5,6);
CREATE TABLE devices (
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
);
INSERT INTO "devices" VALUES('web1','00000001-0000-4000-8000-000000000000','00000001','nic','virtio-net-pci','{}','pcie-port-1',0,'planned',0,0,0);
INSERT INTO "devices" VALUES('web1','00000002-0000-4000-8000-000000000000','00000002','disk','virtio-blk-pci','{"drive": "d0"}','pcie-port-2',0,'planned',0,0,0);
INSERT INTO "devices" VALUES('old1','00000003-0000-4000-8000-000000000000','00000003','nic','e1000','{}','pci.0',4,'planned',0,0,0);
CREATE TABLE pci_devices (
        node TEXT NOT NULL, address TEXT NOT NULL, vendor_id TEXT NOT NULL, product_id TEXT NOT NULL,
        dev_type TEXT NOT NULL, parent_addr TEXT, numa_node INTEGER, iommu_group INTEGER,
        dev_id TEXT, label TEXT, devname TEXT, parent_devname TEXT, tags TEXT NOT NULL, status TEXT NOT NULL,
        instance_uuid TEXT, request_id TEXT, stale TEXT, vanished INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (node, address));
INSERT INTO "pci_devices" VALUES('local','0000:81:02.1','8086','154c','type-VF','0000:81:00.0',0,NULL,NULL,'label_8086_154c',NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:81:02.2','8086','154c','type-VF','0000:81:00.0',0,NULL,NULL,'label_8086_154c',NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:81:02.3','8086','154c','type-VF','0000:81:00.0',0,NULL,NULL,'label_8086_154c',NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:82:00.0','8086','1572','type-PF',NULL,1,NULL,'pci_0000_82_00_0','label_8086_1572',NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:82:02.0','8086','154c','type-VF','0000:82:00.0',1,NULL,NULL,'label_8086_154c',NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:82:02.1','8086','154c','type-VF','0000:82:00.0',1,NULL,NULL,'label_8086_154c',NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:82:02.2','8086','154c','type-VF','0000:82:00.0',1,NULL,NULL,'label_8086_154c',NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:82:02.3','8086','154c','type-VF','0000:82:00.0',1,NULL,NULL,'label_8086_154c',NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:0a:00.0','8086','0443','type-PCI',NULL,0,40,NULL,NULL,NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:0b:00.0','8086','0443','type-PCI',NULL,1,41,NULL,NULL,NULL,NULL,'{"physical_network": "physnet1"}','available',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:81:00.0','8086','1572','type-PF',NULL,0,NULL,'pci_0000_81_00_0','label_8086_1572',NULL,NULL,'{"physical_network": "physnet1"}','unavailable',NULL,NULL,NULL,0);
INSERT INTO "pci_devices" VALUES('local','0000:81:02.0','8086','154c','type-VF','0000:81:00.0',0,NULL,NULL,'label_8086_154c',NULL,NULL,'{"physical_network": "physnet1"}','allocated','web1','00000005-0000-4000-8000-000000000000',NULL,0);
CREATE TABLE pci_meta (node TEXT PRIMARY KEY, generation INTEGER NOT NULL);
INSERT INTO "pci_meta" VALUES('local',3);
CREATE TABLE pci_requests (
        node TEXT NOT NULL, instance_uuid TEXT NOT NULL, request_id TEXT NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (node, instance_uuid, request_id));
INSERT INTO "pci_requests" VALUES('local','web1','00000005-0000-4000-8000-000000000000','{"alias_name": null, "count": 1, "numa_policy": "legacy", "request_id": "00000005-0000-4000-8000-000000000000", "source": "flavor", "spec": [{"dev_type": "type-VF", "vendor_id": "8086"}]}');
CREATE TABLE vms (
    name      TEXT PRIMARY KEY,
    machine   TEXT NOT NULL,
    mask      TEXT NOT NULL,
    bus_masks TEXT NOT NULL DEFAULT '{}',
    hotplug_ports INTEGER NOT NULL DEFAULT 4,
    spare_bridge  INTEGER NOT NULL DEFAULT 0
);
INSERT INTO "vms" VALUES('web1','q35','11000000000000000000000000000001','{}',4,0);
INSERT INTO "vms" VALUES('old1','pc','11110000000000000000000000000000','{}',4,0);
COMMIT;

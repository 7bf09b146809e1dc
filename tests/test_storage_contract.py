"""The storage contract, on both backends: what a lifecycle manager may rely on whatever the database.

The bulk of the contract is exercised by the store, tracker and hotplug-fault
tests, which run on SQLite and on a real PostgreSQL server (``state_location``).
This file holds what is about the storage layer itself: whole transactions or
nothing, snapshots, schema versions and upgrades, and what happens when a
PostgreSQL server cannot be reached or goes away in the middle.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from pcihost import host

from kvmslots import Store
from kvmslots.cli import main
from kvmslots.errors import DeviceExists, StateConflict, StateError, StoreUnavailable, UnknownHost, VMBusy
from kvmslots.hotplug import plan_boot
from kvmslots.model import Device, DeviceSpec, DeviceState, VMSpec
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.tracker import PciDevTracker
from kvmslots.storage.postgres import redact
from kvmslots.storage.schema import SCHEMA_VERSION

DATA = Path(__file__).parent / "data"
U = [str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000)) for n in range(16)]
INTEL = Whitelist.from_config([{"vendor_id": "8086", "physical_network": "physnet1"}])


def is_pg(location: str) -> bool:
    return location.startswith("postgresql://")


def dev(n: int, slot: int, state: DeviceState = DeviceState.ATTACHING) -> Device:
    return Device.from_spec(DeviceSpec(U[n], "dev", "pci-testdev"), "pci.0", slot, state)


# --- whole transactions ------------------------------------------------------------------


def test_a_failed_transaction_leaves_nothing_behind(state_location):
    with Store(state_location) as store:
        store.define_vm(VMSpec("vm1"))
        with pytest.raises(RuntimeError):
            with store.transaction() as txn:
                txn.add_device("vm1", dev(1, 5))
                txn.put_vm(VMSpec("vm2"))
                raise RuntimeError("the caller failed half way")
        assert store.vms() == ["vm1"]
        assert store.devices("vm1") == []
        # a broken constraint is typed, and rolls back the whole transaction too
        with pytest.raises(StateConflict):
            with store.transaction() as txn:
                txn.add_device("vm1", dev(2, 6))
                txn.execute("INSERT INTO devices (vm, uuid, uuid8, dev_type, driver, props, bus, slot, state) "
                            "VALUES ('vm1', 'x', 'x', 'dev', 'd', '{}', 'pci.0', 6, 'planned')")
        assert store.devices("vm1") == []


def test_state_moves_only_along_the_state_machine_and_removal_expects_what_was_read(state_location):
    with Store(state_location) as store:
        store.define_vm(VMSpec("vm1"))
        with store.transaction() as txn:
            txn.add_device("vm1", dev(1, 5))
        planned = store.get_device("vm1", U[1])
        with store.transaction() as txn:
            txn.set_state("vm1", U[1], DeviceState.ATTACHED)
        with pytest.raises(StateConflict, match="cannot go from 'attached' to 'attaching'"):
            with store.transaction() as txn:
                txn.set_state("vm1", U[1], DeviceState.ATTACHING)
        attached = store.get_device("vm1", U[1])
        with store.transaction() as txn:  # acting on an older read never deletes the newer record
            assert not txn.remove_device("vm1", U[1], expect=planned)
            assert txn.remove_device("vm1", U[1], expect=attached)
        assert store.devices("vm1") == []


def test_a_read_snapshot_does_not_see_later_commits(state_location):
    with Store(state_location) as reader, Store(state_location) as writer:
        writer.define_vm(VMSpec("vm1"))
        with reader.reading() as txn:
            assert txn.devices("vm1") == []
            with writer.transaction() as wtxn:  # another connection commits meanwhile
                wtxn.add_device("vm1", dev(1, 5))
            assert txn.devices("vm1") == []  # one snapshot for the whole read
        assert [d.slot for d in reader.devices("vm1")] == [5]


def test_devices_come_back_in_the_same_order_on_both_backends(state_location):
    with Store(state_location) as store:
        store.define_vm(VMSpec("vm1", bus_masks={"pci-bridge-1": "1" + "0" * 31, "B": "1" + "0" * 31}))
        with store.transaction() as txn:
            for n, (bus, slot) in enumerate([("pci.0", 7), ("pci-bridge-1", 3), ("B", 9), ("pci.0", 5)]):
                txn.add_device("vm1", Device.from_spec(DeviceSpec(U[n], "dev", "pci-testdev"), bus, slot,
                                                       DeviceState.PLANNED))
        # code-point order ("B" < "pci-bridge-1" < "pci.0"), whatever the database's collation
        assert [(d.bus, d.slot) for d in store.devices("vm1")] == [
            ("B", 9), ("pci-bridge-1", 3), ("pci.0", 5), ("pci.0", 7),
        ]


def test_hosts_are_kept_apart_and_forgotten_whole(state_location):
    with Store(state_location) as store:
        a = PciDevTracker(store, INTEL, node_id="host-a")
        b = PciDevTracker(store, INTEL, node_id="host-b")
        a.update_devices_from_hypervisor_resources(host())
        b.update_devices_from_hypervisor_resources(host())  # the same addresses on another host
        a.claim_instance("vm-a", [_vf_request()])
        assert {d.status.value for d in b.all_devs} == {"available"}
        with store.reading() as txn:
            hosts = {h.name: h for h in txn.hosts()}
        assert hosts["host-a"].devices == hosts["host-b"].devices == 12
        assert hosts["host-a"].free < hosts["host-b"].free == 12
        assert hosts["host-a"].synced_at is not None
        with store.transaction() as txn:
            assert txn.forget_host("host-b") == 12
        with pytest.raises(UnknownHost) as caught:
            with store.transaction() as txn:
                txn.forget_host("host-b")
        assert caught.value.host == "host-b"
        assert len(PciDevTracker(store, INTEL, node_id="host-a").all_devs) == 12


def _vf_request():
    from kvmslots.pci.request import InstancePciRequest

    return InstancePciRequest(count=1, spec=[{"vendor_id": "8086", "dev_type": "type-VF"}], request_id=U[9])


# --- schema versions ---------------------------------------------------------------------


def test_a_state_file_of_kvmslots_0_3_opens_and_is_upgraded_in_place(tmp_path):
    """Written by 0.3.0's own code (tests/data/state-0.3.sql): slots and host claims survive the upgrade."""
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    conn = sqlite3.connect(state / "kvmslots.sqlite3")
    conn.executescript((DATA / "state-0.3.sql").read_text())
    conn.close()
    with Store(state) as store:
        with store.reading() as txn:
            assert txn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert txn.execute("SELECT name FROM sqlite_master WHERE name = 'pci_meta'").fetchone() is None
        assert store.vms() == ["old1", "web1"]
        assert [d.qemu_id for d in store.devices("web1")] == ["nic-00000001-pci-0", "disk-00000002-pci-0"]
        assert len(store.controllers("web1")) == 6
        tracker = PciDevTracker(store, INTEL)  # node 'local', as 0.3 named it
        assert len(tracker.all_devs) == 12
        [vf] = tracker.get_instance_pci_devs("web1", "all")
        assert (vf.address, vf.status.value) == ("0000:81:02.0", "allocated")
        assert [r.request_id for r in tracker.instance_requests("web1")] == [U[5]]
        tracker.free_instance("web1")  # and it goes on working
        assert tracker.pci_stats.free_count() == 12


def test_postgres_records_its_schema_version_and_refuses_a_newer_one(pg_url):
    Store(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM kvmslots_schema").fetchone()[0] == SCHEMA_VERSION
        conn.execute("UPDATE kvmslots_schema SET version = 99")
    with pytest.raises(StateError, match="schema version 99"):
        Store(pg_url)


def _open_store(url, queue):
    try:
        with Store(url) as store:
            store.define_vm(VMSpec(f"vm{multiprocessing.current_process().name[-1]}"))
        queue.put("ok")
    except Exception as exc:  # reported to the test
        queue.put(repr(exc))


def test_many_processes_creating_the_postgres_schema_at_once_all_succeed(pg_url):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_store, args=(pg_url, queue), name=f"creator{n}") for n in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == ["ok"] * 4
    with Store(pg_url) as store:
        assert store.vms() == ["vm0", "vm1", "vm2", "vm3"]


# --- PostgreSQL: locks per VM and per host, not per database ------------------------------


def test_postgres_writers_of_different_vms_do_not_wait_for_each_other(pg_url):
    with Store(pg_url, timeout=1) as a, Store(pg_url, timeout=1) as b:
        a.define_vm(VMSpec("vm1"))
        b.define_vm(VMSpec("vm2"))
        with a.transaction() as txn:
            txn.add_device("vm1", dev(1, 5))  # holds vm1's write lock until the block ends
            with b.transaction() as other:
                other.add_device("vm2", dev(2, 5))  # another VM: no wait
            with pytest.raises(VMBusy):
                with b.transaction() as other:
                    other.add_device("vm1", dev(3, 6))  # the same VM: waits, here past b's 1 s timeout
        assert [d.uuid for d in b.devices("vm1")] == [U[1]]


def test_postgres_host_writers_of_different_hosts_do_not_wait(pg_url):
    with Store(pg_url, timeout=1) as a, Store(pg_url, timeout=1) as b:
        ta = PciDevTracker(a, INTEL, node_id="host-a")
        tb = PciDevTracker(b, INTEL, node_id="host-b")
        tb2 = PciDevTracker(Store(pg_url, timeout=1), INTEL, node_id="host-b")
        with a.transaction() as txn:
            txn.lock_host("host-a", {})  # as a long tracker operation on host-a would
            tb.update_devices_from_hypervisor_resources(host())  # host-b goes on
            with pytest.raises(VMBusy):
                blocked = PciDevTracker(Store(pg_url, timeout=1), INTEL, node_id="host-a")
                blocked.update_devices_from_hypervisor_resources(host())
        assert len(tb2.all_devs) == 12
        assert ta.all_devs == []


# --- PostgreSQL: a server that cannot be reached, or goes away --------------------------


def test_an_unreachable_server_is_a_clear_error_and_never_a_fallback(tmp_path, capsys):
    url = f"postgresql://kvmslots:s3cret@/postgres?host={tmp_path}"  # no server listens there
    with pytest.raises(StoreUnavailable) as caught:
        Store(url)
    assert caught.value.location == f"postgresql://kvmslots:***@/postgres?host={tmp_path}"
    assert "s3cret" not in str(caught.value)
    assert main(["--state", url, "show", "vm1"]) == 1
    err = capsys.readouterr().err
    assert "StoreUnavailable" in err and "s3cret" not in err
    assert list(tmp_path.iterdir()) == []  # no SQLite file appeared anywhere it could have


def test_redact_hides_only_the_password():
    assert redact("postgresql://u:p@h:5432/db?x=1") == "postgresql://u:***@h:5432/db?x=1"
    assert redact("postgresql:///db?host=/run/pg") == "postgresql:///db?host=/run/pg"


def _named(pg_url: str) -> tuple[str, str]:
    """The URL with an application name of its own, so that only this test's sessions are ended."""
    name = f"kvmslots-test-{uuid.uuid4().hex[:8]}"
    return f"{pg_url}&application_name={name}", name


def _terminate(pg_url: str, name: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (name,))


def test_a_server_lost_mid_transaction_rolls_it_back_and_the_next_one_reconnects(pg_url):
    url, name = _named(pg_url)
    with Store(url) as store:
        store.define_vm(VMSpec("vm1"))
        with pytest.raises(StoreUnavailable) as caught:
            with store.transaction() as txn:
                txn.add_device("vm1", dev(1, 5))
                _terminate(pg_url, name)  # the server ends our session, as a restart would
                txn.add_device("vm1", dev(2, 6))
        assert caught.value.location == store.location
        assert store.devices("vm1") == []  # nothing half-written
        with store.transaction() as txn:  # a new connection for the next transaction
            txn.add_device("vm1", dev(3, 7))
        assert [d.slot for d in store.devices("vm1")] == [7]


def test_a_vm_lock_lost_with_its_connection_is_never_silently_replaced(pg_url):
    url, name = _named(pg_url)

    async def scenario():
        with Store(url) as store, Store(pg_url) as other:
            store.define_vm(VMSpec("vm1"))
            async with store.vm_lock("vm1"):
                _terminate(pg_url, name)
                for _ in range(2):  # the failing transaction finds out; the next one is not reconnected
                    with pytest.raises(StoreUnavailable, match="lock of VM"):
                        with store.transaction() as txn:
                            txn.set_state("vm1", U[1], DeviceState.ATTACHED)
                async with other.vm_lock("vm1", timeout=2):  # the server released it
                    pass
            async with store.vm_lock("vm1", timeout=2):  # and once released here, the store works again
                assert store.vms() == ["vm1"]

    asyncio.run(scenario())


def test_two_hosts_never_plan_the_same_vm_at_once(pg_url):
    """plan_boot holds the VM lock; a second host's plan waits for it and then sees the first one's slots."""
    start = threading.Event()
    results: dict[str, list[int]] = {}

    def plan_on(host_name: str, uuids: list[str]) -> None:
        with Store(pg_url) as store:
            start.wait()
            planned = asyncio.run(plan_boot(store, VMSpec("vm1"), [DeviceSpec(u, "dev", "pci-testdev") for u in uuids]))
            results[host_name] = [d.slot for d in planned.devices]

    threads = [threading.Thread(target=plan_on, args=(f"h{n}", [U[n]])) for n in range(4)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(60)
    with Store(pg_url) as store:
        # each plan is the VM's whole device set: the last one wins, and no plan ever saw a half-written one
        assert len(store.devices("vm1")) == 1
    assert all(slots == [4] for slots in results.values())


def test_a_postgres_database_of_schema_4_is_upgraded_in_place(pg_url):
    with Store(pg_url) as store:
        store.define_vm(VMSpec("vm1"))
        with store.transaction() as txn:
            txn.add_device("vm1", dev(1, 5))
    with psycopg.connect(pg_url) as conn:  # as kvmslots with schema 4 left it
        conn.execute("DROP INDEX devices_qemu_id")
        conn.execute("ALTER TABLE devices DROP COLUMN qemu_id")
        conn.execute("UPDATE kvmslots_schema SET version = 4")
    with Store(pg_url) as store:
        assert [d.qemu_id for d in store.devices("vm1")] == [f"dev-{U[1][:8]}-pci-5"]
        with store.transaction() as txn:  # the new column works
            txn.add_device("vm1", Device.from_spec(DeviceSpec(U[2], "nic", "e1000"), "pci.0", 6, DeviceState.ATTACHED,
                                                   given_id="nic-legacy0"))
        assert [d.qemu_id for d in store.devices("vm1")] == [f"dev-{U[1][:8]}-pci-5", "nic-legacy0"]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM kvmslots_schema").fetchone()[0] == SCHEMA_VERSION


def test_an_id_given_by_another_manager_is_kept_exported_and_unique(state_location):
    with Store(state_location) as store:
        store.define_vm(VMSpec("vm1"))
        given = Device.from_spec(DeviceSpec(U[1], "nic", "e1000"), "pci.0", 5, DeviceState.ATTACHED, given_id="nic-9")
        with store.transaction() as txn:
            txn.add_device("vm1", given)
        with pytest.raises(DeviceExists, match="nic-9"):
            with store.transaction() as txn:
                txn.add_device("vm1", Device.from_spec(DeviceSpec(U[2], "nic", "e1000"), "pci.0", 6,
                                                       DeviceState.ATTACHED, given_id="nic-9"))
        document = store.export_vm("vm1")
        assert document["devices"][0]["id"] == "nic-9" and document["devices"][0]["id_given"] is True
        store.delete_vm("vm1")
        store.import_vm(document)
        assert store.devices("vm1") == [given]

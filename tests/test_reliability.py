"""Issue 8, the parts that need no QEMU: state files, reads, exact values, validation.

Each test names the numbered item of the issue it proves; the QEMU-side items
(bounded waits, a QEMU killed during a detach, interrupted removals) are in
``integration/test_reliability_qemu.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sqlite3
import stat
import subprocess
import uuid

import pytest
from fakes import FakeQemu

from kvmslots import DeviceSpec, DeviceState, Store, VMSpec, hot_add, hot_del, plan_boot, reconcile
from kvmslots.cli import _prop_value, main
from kvmslots.devid import coerce_props, validate_props
from kvmslots.errors import (
    InvalidDriver,
    InvalidProperty,
    InvalidTimeout,
    MonitorConnectionLost,
    StateCorrupt,
    StateImportError,
    UnknownVM,
)
from kvmslots.monitor import Monitor, validate_timeout
from kvmslots.storage.schema import SCHEMA_VERSION
from kvmslots.store import DB_NAME, parse_export

U = [str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000)) for n in range(8)]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state") as s:
        s.define_vm(VMSpec("vm1"))
        yield s


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- item 2: --timeout inf -------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1, 10**9, True, "5"])
def test_item2_infinite_or_absurd_waits_are_refused(store, bad):
    with pytest.raises(InvalidTimeout):
        validate_timeout(bad)
    with pytest.raises(InvalidTimeout):
        run(hot_del(store, FakeQemu(), "vm1", U[1], timeout=bad))
    with pytest.raises(InvalidTimeout):
        Monitor("/nonexistent", command_timeout=bad)


@pytest.mark.parametrize("text", ["inf", "infinity", "nan", "1e400", "-1", "abc"])
def test_item2_cli_refuses_unbounded_detach_timeout(tmp_path, capsys, text):
    code, out, err = cli(capsys, "--state", str(tmp_path / "s"), "detach", "vm1", "--qmp", "/x", "--uuid", U[1],
                         "--timeout", text)
    assert code == 2 and "--timeout" in err and err.count("\n") == 1


def test_item2_lost_connection_during_the_unplug_wait_is_an_error_and_the_device_stays_detaching(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    qemu.lose_during_del_wait = True
    with pytest.raises(MonitorConnectionLost) as info:
        run(hot_del(store, qemu, "vm1", U[1], timeout=30))
    assert info.value.vm == "vm1" and info.value.device_id == device.qemu_id
    assert "reconcile" in str(info.value)
    assert store.get_device("vm1", U[1]).state is DeviceState.DETACHING


# --- item 3: an interrupted detach -----------------------------------------------------


def test_item3_detach_that_never_reached_qemu_is_resent_by_reconcile(store):
    qemu = FakeQemu(guest_acks=False)
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    with store.transaction() as txn:  # what a process killed before device_del leaves
        txn.set_state("vm1", U[1], DeviceState.DETACHING)
    report = run(reconcile(store, qemu, "vm1"))
    assert report.resent == [device.qemu_id] and report.pending == []
    assert qemu.calls[-1] == f"device_del {device.qemu_id}"
    report = run(reconcile(store, qemu, "vm1"))  # now QEMU has the request: pending, not sent again
    assert report.pending == [device.qemu_id] and report.resent == []
    assert qemu.calls.count(f"device_del {device.qemu_id}") == 1
    qemu.eject(device.qemu_id)
    assert run(reconcile(store, qemu, "vm1")).released == [device.qemu_id]


def test_item3_reconcile_confirms_a_resent_unplug_the_guest_acknowledges(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    with store.transaction() as txn:
        txn.set_state("vm1", U[1], DeviceState.DETACHING)
    report = run(reconcile(store, qemu, "vm1", unplug_wait=1))
    assert report.released == [device.qemu_id] and store.devices("vm1") == []


def test_item3_unplug_qemu_refuses_puts_the_device_back_to_attached(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    with store.transaction() as txn:
        txn.set_state("vm1", U[1], DeviceState.DETACHING)
    qemu.refuse_del = "Bus 'pcie.0' does not support hotplugging"
    report = run(reconcile(store, qemu, "vm1"))
    assert report.restored == [device.qemu_id]
    assert store.get_device("vm1", U[1]).state is DeviceState.ATTACHED


def test_item3_a_pending_hot_del_is_recorded_as_requested(store):
    qemu = FakeQemu(guest_acks=False)
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    assert run(hot_del(store, qemu, "vm1", U[1], timeout=0)).pending
    with store.reading() as txn:
        assert txn.unplug_requested("vm1") == {U[1]}
    assert run(reconcile(store, qemu, "vm1")).pending == [device.qemu_id]


# --- item 4: an empty or foreign state file --------------------------------------------


def test_item4_an_empty_state_file_is_refused_not_taken_for_a_new_store(tmp_path, capsys):
    state = tmp_path / "s"
    with Store(state) as s:
        run(plan_boot(s, VMSpec("vm1"), [DeviceSpec(U[1], "nic", "virtio-net-pci")]))
    (state / DB_NAME).write_bytes(b"")
    for f in state.glob(DB_NAME + "-*"):
        f.unlink()
    with pytest.raises(StateCorrupt) as info:
        Store(state)
    assert info.value.path == str(state / DB_NAME)
    code, _, err = cli(capsys, "--state", str(state), "show", "vm1")
    assert code == 1 and "StateCorrupt" in err and "empty" in err
    code, _, err = cli(capsys, "--state", str(state), "plan", "vm1", "--device", f"nic:{U[2]}:virtio-net-pci")
    assert code == 1 and "StateCorrupt" in err
    assert (state / DB_NAME).stat().st_size == 0  # nothing re-planned, nothing written


@pytest.mark.parametrize("content", [b"not a database at all" * 100, b"SQLite format 3\x00" + b"\x00" * 84])
def test_item4_a_foreign_or_truncated_file_is_refused(tmp_path, content):
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / DB_NAME).write_bytes(content)
    with pytest.raises(StateCorrupt):
        Store(state)
    assert (state / DB_NAME).read_bytes() == content


def test_item4_an_empty_sqlite_database_without_our_schema_is_refused(tmp_path):
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StateCorrupt, match="not a kvmslots state"):
        Store(state)


def test_item4_a_missing_file_is_a_new_store_and_no_temporary_file_is_left(tmp_path):
    with Store(tmp_path / "s") as s:
        assert s.vms() == []
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith(DB_NAME + "-")) == [DB_NAME]


def test_item4_a_schema_1_state_file_opens_and_is_upgraded_in_place(tmp_path):
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    conn = sqlite3.connect(state / DB_NAME)
    conn.executescript(
        """
        CREATE TABLE vms (name TEXT PRIMARY KEY, machine TEXT NOT NULL, mask TEXT NOT NULL,
                          bus_masks TEXT NOT NULL DEFAULT '{}');
        CREATE TABLE devices (vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE, uuid TEXT NOT NULL,
            uuid8 TEXT NOT NULL, dev_type TEXT NOT NULL, driver TEXT NOT NULL, props TEXT NOT NULL,
            bus TEXT NOT NULL, slot INTEGER NOT NULL CHECK (slot BETWEEN 0 AND 31),
            state TEXT NOT NULL CHECK (state IN ('planned', 'attaching', 'attached', 'detaching')),
            PRIMARY KEY (vm, uuid), UNIQUE (vm, bus, slot), UNIQUE (vm, uuid8, slot));
        PRAGMA user_version = 1;
        """
    )
    conn.execute("INSERT INTO vms VALUES ('old', 'pc', ?, '{}')", ("1111" + "0" * 28,))
    conn.execute(
        "INSERT INTO devices VALUES ('old', ?, ?, 'nic', 'virtio-net-pci', '{}', 'pci.0', 5, 'detaching')",
        (U[1], U[1][:8]),
    )
    conn.commit()
    conn.close()
    with Store(state) as s:
        assert [(d.slot, d.state) for d in s.devices("old")] == [(5, DeviceState.DETACHING)]
        with s.reading() as txn:
            assert txn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # upgraded all the way
            assert txn.unplug_requested("old") == set()  # unknown: reconcile asks QEMU again


# --- item 5: reads never wait for writers ----------------------------------------------


def test_item5_reads_do_not_wait_for_a_writer(tmp_path):
    state = tmp_path / "s"
    with Store(state) as s:
        run(plan_boot(s, VMSpec("vm1"), [DeviceSpec(U[1], "nic", "virtio-net-pci")]))
    writer = sqlite3.connect(state / DB_NAME, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE vms SET machine = 'q35'")  # uncommitted
    try:
        with Store(state, timeout=0.1) as reader:  # a write lock wait would fail with StateError here
            assert reader.get_vm("vm1").machine == "pc"
            assert [d.slot for d in reader.devices("vm1")] == [4]
            assert reader.export_vm("vm1")["vm"]["name"] == "vm1"
            assert reader.vms() == ["vm1"]
        # the real command, with its default 60 s wait: it must answer while the writer holds the lock
        proc = subprocess.run(["python3", "-m", "kvmslots", "--state", str(state), "show", "vm1"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert "virtio-net-pci" in proc.stdout
    finally:
        writer.execute("ROLLBACK")
        writer.close()


# --- item 6: exact property values -----------------------------------------------------


def test_item6_text_values_stay_text(tmp_path, capsys):
    assert _prop_value("007") == "007"
    assert _prop_value("١٢") == "١٢"
    assert _prop_value("true") == "true"
    code, out, _ = cli(capsys, "--state", str(tmp_path / "s"), "--json", "plan", "vm1",
                       "--device", f"disk:{U[1]}:virtio-blk-pci:serial=007,vectors=١٢")
    assert code == 0
    [row] = json.loads(out)
    assert row["arg"].endswith(",serial=007,vectors=١٢")
    with Store(tmp_path / "s") as s:
        assert dict(s.get_device("vm1", U[1]).props) == {"serial": "007", "vectors": "١٢"}


def test_item6_integers_only_where_qemu_says_so_and_only_from_ascii_digits():
    types = {"vectors": "uint32", "serial": "str", "num-queues": "uint16", "size": "size"}
    assert coerce_props({"vectors": "010", "serial": "007", "size": "4K"}, types) == {
        "vectors": 10, "serial": "007", "size": "4K"}
    for bad in ("١٢", "²"):
        with pytest.raises(InvalidProperty, match="ASCII"):
            coerce_props({"vectors": bad}, types)
    with pytest.raises(InvalidProperty, match="65535"):
        coerce_props({"num-queues": "65536"}, types)
    with pytest.raises(InvalidProperty):
        coerce_props({"vectors": "9" * 5000}, types)


class TypedFake(FakeQemu):
    """A fake that also answers device-list-properties, and keeps what device_add was sent."""

    sent: list = []

    async def property_types(self, driver):
        return {"vectors": "uint32", "serial": "str"}

    async def device_add(self, arguments):
        self.sent.append(dict(arguments))
        await super().device_add(arguments)


def test_item6_hot_add_sends_integers_for_integer_properties_and_text_as_given(store):
    qemu = TypedFake()
    qemu.sent = []
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "virtio-net-pci",
                                                       {"vectors": "010", "serial": "007"})))
    assert qemu.sent[0]["vectors"] == 10 and qemu.sent[0]["serial"] == "007"
    assert dict(store.get_device("vm1", U[1]).props) == {"vectors": 10, "serial": "007"}
    assert device.props["vectors"] == 10
    with pytest.raises(InvalidProperty):
        run(hot_add(store, qemu, "vm1", DeviceSpec(U[2], "dev", "virtio-net-pci", {"vectors": "²"})))
    assert [d.uuid for d in store.devices("vm1")] == [U[1]]  # nothing reserved for the bad one


# --- item 7: bad input is exit 2, never a traceback ------------------------------------


@pytest.mark.parametrize("command", [
    ["import", "{file}"],
    ["host", "sync", "--devices-json", "{file}", "--device-spec", "{spec}"],
    ["host", "sync", "--devices-json", "{spec}", "--device-spec", "{file}"],
    ["host", "claim", "vm1", "--request", "a:1", "--aliases", "{file}"],
])
def test_item7_deeply_nested_json_files_are_usage_errors(tmp_path, capsys, command):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000)
    spec = tmp_path / "spec.json"
    spec.write_text("[]")
    args = [a.format(file=deep, spec=spec) for a in command]
    code, _, err = cli(capsys, "--state", str(tmp_path / "s"), *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("kvmslots: error:")


def test_item7_huge_and_non_ascii_values_are_not_tracebacks(tmp_path, capsys):
    for value in ("²", "9" * 5000):
        code, out, err = cli(capsys, "--state", str(tmp_path / "s"), "plan", "vm1",
                             "--device", f"nic:{U[1]}:virtio-net-pci:vectors={value}")
        assert code == 0 and f"vectors={value}" in out  # kept exactly; QEMU judges it at boot


# --- item 8: validation gaps -----------------------------------------------------------


@pytest.mark.parametrize("driver", ["vfio-pci", "vfio-pci-nohotplug", "vfio-pci-igd-lpc-bridge", "pci-assign"])
def test_item8_passthrough_drivers_are_matched_by_family(store, driver):
    with pytest.raises(InvalidDriver, match="passes a host device"):
        run(hot_add(store, FakeQemu(), "vm1", DeviceSpec(U[1], "dev", driver)))
    with pytest.raises(InvalidDriver):
        run(plan_boot(store, "vm1", [DeviceSpec(U[1], "dev", driver)]))
    with pytest.raises(InvalidProperty):
        DeviceSpec(U[1], "dev", "virtio-net-pci", {"host": "0000:00:01.0"})


@pytest.mark.parametrize("props", [{"help": "1"}, {"help": True}])
def test_item8_help_is_never_a_property_or_a_driver(props):
    with pytest.raises(InvalidProperty, match="help"):
        DeviceSpec(U[1], "nic", "virtio-net-pci", props)
    with pytest.raises(InvalidDriver, match="help"):
        DeviceSpec(U[1], "nic", "help")


def test_item8_cli_refuses_a_passthrough_driver_before_contacting_qemu(tmp_path, capsys):
    code, _, err = cli(capsys, "--state", str(tmp_path / "s"), "attach", "vm1", "--qmp", str(tmp_path / "none"),
                       "--type", "nic", "--uuid", U[1], "--driver", "vfio-pci-nohotplug")
    assert code == 2 and "passes a host device" in err


def test_item8_cli_help_property_is_exit_2(tmp_path, capsys):
    code, _, err = cli(capsys, "--state", str(tmp_path / "s"), "plan", "vm1",
                       "--device", f"nic:{U[1]}:virtio-net-pci:help=1")
    assert code == 2 and "help" in err


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**4000])
def test_item8_unbounded_integers_are_refused(value):
    with pytest.raises(InvalidProperty, match="range"):
        validate_props({"vectors": value})


def _document(**changes):
    doc = {
        "format": "kvmslots.vm-state",
        "version": 1,
        "vm": {"name": "vm1", "machine": "pc", "mask": "1111" + "0" * 28, "bus_masks": {}},
        "devices": [{"uuid": U[1], "type": "nic", "driver": "virtio-net-pci", "props": {}, "bus": "pci.0",
                     "slot": 5, "state": "attached", "id": f"nic-{U[1][:8]}-pci-5"}],
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_item8_import_takes_only_the_integer_version_1(version):
    parse_export(_document())
    with pytest.raises(StateImportError, match="version"):
        parse_export(_document(version=version))


def test_item8_import_refuses_raw_passthrough_and_unbounded_values():
    raw = _document()
    raw["devices"][0].update(driver="vfio-pci", type="hostdev", props={"host": "0000:3b:00.0"},
                             id=f"hostdev-{U[1][:8]}-pci-5")
    with pytest.raises(StateImportError, match="passthrough"):
        parse_export(raw)
    big = _document()
    big["devices"][0]["props"] = {"vectors": 10**40}
    with pytest.raises(StateImportError, match="range"):
        parse_export(big)
    for slot in (True, 5.0):
        bad = _document()
        bad["devices"][0]["slot"] = slot
        with pytest.raises(StateImportError):
            parse_export(bad)


def test_item8_plan_text_is_quoted_for_a_shell(tmp_path, capsys):
    code, out, _ = cli(capsys, "--state", str(tmp_path / "s"), "plan", "vm1",
                       "--device", f"nic:{U[1]}:virtio-net-pci:mac=$(touch {tmp_path}/pwned)")
    assert code == 0
    line = out.strip()
    # what a script does with it: the words come back intact and nothing runs
    words = subprocess.run(["sh", "-c", 'eval "set -- $PLAN"; printf "%s\\n" "$@"'], env={**os.environ, "PLAN": line},
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words[0] == "-device" and words[1].endswith(f",mac=$(touch {tmp_path}/pwned)")
    assert not (tmp_path / "pwned").exists()
    assert shlex.split(line)[1] == words[1]


def test_item8_failed_commands_leave_no_lock_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVMSLOTS_CONNECT_TIMEOUT", "0.5")
    state = tmp_path / "s"
    code, _, err = cli(capsys, "--state", str(state), "attach", "ghost", "--qmp", str(tmp_path / "nosock"),
                       "--type", "nic", "--uuid", U[1], "--driver", "virtio-net-pci")
    assert code == 1
    with Store(state) as s:
        with pytest.raises(UnknownVM):
            run(hot_add(s, FakeQemu(), "ghost", DeviceSpec(U[1], "nic", "virtio-net-pci")))
        s.define_vm(VMSpec("vm1"))
        run(hot_add(s, FakeQemu(), "vm1", DeviceSpec(U[1], "nic", "virtio-net-pci")))
    assert list((state / "locks").iterdir()) == []


# --- item 9: loose permissions ---------------------------------------------------------


def test_item9_loose_modes_are_tightened(tmp_path):
    state = tmp_path / "s"
    with Store(state) as s:
        s.define_vm(VMSpec("vm1"))
        async def lock():
            async with s.vm_lock("vm1"):
                pass
        run(lock())
    os.chmod(state, 0o777)
    os.chmod(state / DB_NAME, 0o666)
    os.chmod(state / "locks", 0o777)
    for side in state.glob(DB_NAME + "-*"):
        os.chmod(side, 0o666)
    with Store(state) as s:
        assert s.vms() == ["vm1"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "locks").stat().st_mode) == 0o700
    assert stat.S_IMODE((state / DB_NAME).stat().st_mode) == 0o600
    for side in state.glob(DB_NAME + "-*"):
        assert stat.S_IMODE(side.stat().st_mode) == 0o600


def test_item9_a_symlinked_state_file_is_refused(tmp_path):
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (tmp_path / "elsewhere").write_bytes(b"")
    (state / DB_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="regular file"):
        Store(state)


# --- found by review: the corners of the items above ----------------------------------------


def test_a_leftover_wal_without_its_database_is_refused_not_replayed(tmp_path):
    state = tmp_path / "s"
    with Store(state) as s:
        s.define_vm(VMSpec("old"))
    (state / DB_NAME).rename(tmp_path / "moved")  # "move it away", but without its -wal
    (state / f"{DB_NAME}-wal").write_bytes(b"stale wal frames")
    with pytest.raises(StateCorrupt, match="-wal"):
        Store(state)


def test_a_second_name_left_by_a_crashed_creator_is_removed(tmp_path):
    state = tmp_path / "s"
    with Store(state):
        pass
    twin = state / f".{DB_NAME}.abc123.new"
    os.link(state / DB_NAME, twin)  # a crash between link and unlink
    with Store(state) as s:
        assert s.vms() == []
    assert not twin.exists()


def test_a_read_transaction_never_commits(store):
    with pytest.raises(RuntimeError):
        with store.reading() as txn:
            txn.execute("DELETE FROM vms")
            raise RuntimeError("boom")
    assert store.vms() == ["vm1"]


def test_a_second_hot_del_of_a_pending_unplug_keeps_it_requested(store):
    qemu = FakeQemu(guest_acks=False)
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    assert run(hot_del(store, qemu, "vm1", U[1], timeout=0)).pending
    qemu.lose_during_del_wait = True
    qemu.refuse_del = None
    with pytest.raises(MonitorConnectionLost):
        run(hot_del(store, qemu, "vm1", U[1], timeout=5))
    with store.reading() as txn:
        assert txn.unplug_requested("vm1") == {U[1]}
    qemu.connected = True
    report = run(reconcile(store, qemu, "vm1"))
    assert report.pending == [device.qemu_id] and report.resent == []


def test_hot_del_keeps_a_monitor_timeout_a_monitor_timeout(store):
    from kvmslots.errors import MonitorTimeout

    class Wedged(FakeQemu):
        async def device_del(self, qdev_id, timeout, on_sent=None):
            raise MonitorTimeout("fake: no answer", address="/x", command="device_del", timeout=0.5)

    qemu = Wedged()
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    with pytest.raises(MonitorTimeout) as info:
        run(hot_del(store, qemu, "vm1", U[1]))
    assert (info.value.timeout, info.value.vm, info.value.device_id) == (0.5, "vm1", device.qemu_id)
    assert "reconcile" in str(info.value)


def test_an_unplug_qemu_took_is_not_an_error_when_the_database_cannot_record_it(store, tmp_path):
    qemu = FakeQemu(guest_acks=False)
    run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    writer = sqlite3.connect(store.path, isolation_level=None)
    real = qemu.device_del

    async def busy_while_sent(qdev_id, timeout, on_sent=None):
        def locked(already):
            writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock right now
            try:
                on_sent(already)
            finally:
                writer.execute("ROLLBACK")
        return await real(qdev_id, timeout, locked)

    qemu.device_del = busy_while_sent
    with Store(tmp_path / "state", timeout=0.1) as quick:
        assert run(hot_del(quick, qemu, "vm1", U[1], timeout=0)).pending
    writer.close()
    assert store.get_device("vm1", U[1]).state is DeviceState.DETACHING


def test_reconcile_does_not_call_a_vanished_device_resent(store):
    qemu = FakeQemu()
    device = run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    with store.transaction() as txn:
        txn.set_state("vm1", U[1], DeviceState.DETACHING)

    class GoneOnDel(FakeQemu):
        async def device_del(self, qdev_id, timeout, on_sent=None):
            from kvmslots.errors import QemuCommandError
            raise QemuCommandError("device_del", f"Device '{qdev_id}' not found", "DeviceNotFound")

    racing = GoneOnDel(devices=dict(qemu.devices))  # the view still shows it, device_del no longer finds it
    report = run(reconcile(store, racing, "vm1"))
    assert report.released == [device.qemu_id] and report.resent == []


def test_undo_that_dies_during_its_wait_leaves_detaching_not_attaching(store):
    from kvmslots.errors import DeviceAddFailed

    qemu = FakeQemu(misplace_by=1, lose_during_del_wait=True)  # verification fails, undo loses QEMU
    with pytest.raises(DeviceAddFailed, match="detaching"):
        run(hot_add(store, qemu, "vm1", DeviceSpec(U[1], "dev", "pci-testdev")))
    assert store.get_device("vm1", U[1]).state is DeviceState.DETACHING
    with store.reading() as txn:
        assert txn.unplug_requested("vm1") == {U[1]}


def test_hot_add_many_types_integer_properties_too(store):
    from kvmslots import hot_add_many

    qemu = TypedFake()
    qemu.sent = []
    run(hot_add_many(store, qemu, "vm1", [DeviceSpec(U[1], "dev", "virtio-net-pci", {"vectors": "010"})]))
    assert qemu.sent[0]["vectors"] == 10


def test_export_to_an_unwritable_place_is_a_usage_error(tmp_path, capsys):
    state = str(tmp_path / "s")
    assert cli(capsys, "--state", state, "plan", "vm1")[0] == 0
    for target in (str(tmp_path / "no" / "such"), str(tmp_path)):
        code, _, err = cli(capsys, "--state", state, "export", "vm1", "-o", target)
        assert code == 2 and err.startswith("kvmslots: error: cannot write")

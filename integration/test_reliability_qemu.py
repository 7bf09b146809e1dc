"""Issue 8 on real QEMU: a wedged QEMU, a QEMU killed during a detach, a detach killed midway.

A wedged QEMU is a real one stopped with SIGSTOP, or a real one behind the
fault proxy that stops forwarding its answers; a killed detach is a real
process killed with SIGKILL at the message the proxy names.  Subprocess waits
carry a generous ``timeout`` only so that a regression (an unbounded wait)
fails the test instead of hanging the run; no test asserts on a duration.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kvmslots import DeviceSpec, DeviceState, Monitor, Store, VMSpec, hot_add, hot_del, reconcile
from kvmslots.errors import MonitorTimeout
from kvmslots.testvm import TestVM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qmpproxy import QmpFaultProxy  # noqa: E402

U = [str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000 | n)) for n in range(8)]


def kvmslots_cli(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmslots", "--state", str(state), *args],
                          capture_output=True, text=True, timeout=timeout)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "state"
    with Store(path) as s:
        s.define_vm(VMSpec("vm1"))
    return path


# --- item 1: a QEMU that stops answering ------------------------------------------------


def test_item1_a_stopped_qemu_ends_a_command_with_a_typed_timeout(qtest_vm):
    async def scenario():
        async with Monitor(qtest_vm.qmp_path, command_timeout=0.5) as mon:
            await mon.query_pci()
            os.kill(qtest_vm.pid, signal.SIGSTOP)  # a wedged QEMU: the socket stays, nobody answers
            try:
                with pytest.raises(MonitorTimeout) as info:
                    await mon.query_pci()
            finally:
                os.kill(qtest_vm.pid, signal.SIGCONT)
            assert not mon.connected  # a late answer can never be taken for the next command's
            return info.value

    error = run(scenario())
    assert (error.command, error.timeout, error.address) == ("query-pci", 0.5, str(qtest_vm.qmp_path))


def test_item1_attach_to_a_wedged_qemu_fails_releases_the_lock_and_reconcile_settles_it(qtest_vm, state):
    with QmpFaultProxy(qtest_vm.qmp_path) as proxy:
        # CLI attach: qmp_capabilities, the probe (query-commands, qom-get of the machine type),
        # query-pci, qom-get of pci.0's hotplug handler, device_add (+ query-pci pipelined).  QEMU gets
        # the device_add; its answer never comes back.
        proxy.arm("c2s", 6, "after", "stall")
        proc = kvmslots_cli(state, "--qmp-timeout", "1", "attach", "vm1", "--qmp", proxy.listen,
                            "--type", "rng", "--uuid", U[1], "--driver", "virtio-rng-pci")
        assert proxy.fired, proxy.describe()
    assert proc.returncode == 1, proc.stderr
    assert "did not answer device_add within 1s" in proc.stderr and "attaching" in proc.stderr
    assert proc.stderr.count("\n") == 1
    shown = json.loads(kvmslots_cli(state, "--json", "show", "vm1").stdout)
    assert [d["state"] for d in shown["devices"]] == ["attaching"]
    # the lock was released: the next operation on the VM goes through at once
    other = kvmslots_cli(state, "attach", "vm1", "--qmp", str(qtest_vm.qmp_path), "--type", "rng",
                         "--uuid", U[2], "--driver", "virtio-rng-pci", timeout=30)
    assert other.returncode == 0, other.stderr
    report = json.loads(kvmslots_cli(state, "--json", "reconcile", "vm1", "--qmp", str(qtest_vm.qmp_path)).stdout)
    assert report["attached"] == [f"rng-{U[1][:8]}-pci-4"]  # QEMU had taken it
    with Store(state) as s:
        assert {d.slot: d.state for d in s.devices("vm1")} == {4: DeviceState.ATTACHED, 5: DeviceState.ATTACHED}
    assert not list((state / "locks").iterdir())


# --- item 2: QEMU killed during a detach ---------------------------------------------------


def test_item2_qemu_killed_during_the_detach_wait_is_reported_at_once(tmp_path, state):
    vm = TestVM(tmp_path / "vm", mode="qtest").start()  # no guest: the unplug is never acknowledged
    try:
        with Store(state) as s:
            async def add():
                async with Monitor(vm.qmp_path) as mon:
                    return await hot_add(s, mon, "vm1", DeviceSpec(U[1], "rng", "virtio-rng-pci"))
            device = run(add())
        detach = subprocess.Popen(
            [sys.executable, "-m", "kvmslots", "--state", str(state), "detach", "vm1", "--qmp", str(vm.qmp_path),
             "--uuid", U[1], "--timeout", "3600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with Store(state) as s:  # wait until QEMU has the device_del (recorded by the detach)
            for _ in range(600):
                with s.reading() as txn:
                    if txn.unplug_requested("vm1"):
                        break
                time.sleep(0.05)
            else:
                pytest.fail("the detach never recorded its unplug request")
        os.kill(vm.pid, signal.SIGKILL)
        out, err = detach.communicate(timeout=60)  # not 3600: a closed monitor is noticed at once
    finally:
        vm.stop()
    assert detach.returncode == 1, out + err
    assert "MonitorConnectionLost" in err and device.qemu_id in err and "reconcile" in err
    with Store(state) as s:
        assert s.get_device("vm1", U[1]).state is DeviceState.DETACHING


# --- item 3: a detach killed before or after its device_del --------------------------------


def _detach_child(state: Path, socket: str) -> None:
    async def go():
        with Store(state) as s:
            async with Monitor(socket, connect_timeout=2) as mon:
                await hot_del(s, mon, "vm1", U[1], timeout=30)

    asyncio.run(go())


def _kill_detach_at(proxy: QmpFaultProxy, state: Path, direction: str, index: int) -> None:
    child = multiprocessing.get_context("fork").Process(target=_detach_child, args=(state, proxy.listen))
    proxy.arm(direction, index, "before", "kill", kill=lambda: os.kill(child.pid, signal.SIGKILL))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, proxy.describe()
    proxy.close_all()


def _attach(state: Path, qmp: Path) -> str:
    async def go():
        with Store(state) as s:
            async with Monitor(qmp) as mon:
                return (await hot_add(s, mon, "vm1", DeviceSpec(U[1], "rng", "virtio-rng-pci"))).qemu_id

    return run(go())


def _reconcile(state: Path, qmp: Path, wait: float = 0.0):
    async def go():
        with Store(state) as s:
            async with Monitor(qmp) as mon:
                return await reconcile(s, mon, "vm1", unplug_wait=wait)

    return run(go())


def test_item3_a_detach_killed_before_its_device_del_is_finished_by_reconcile(guest_vm, state):
    qemu_id = _attach(state, guest_vm.qmp_path)
    guest_vm.wait_guest_pci(lambda seen: "0000:00:04.0" in seen)
    with QmpFaultProxy(guest_vm.qmp_path) as proxy:
        _kill_detach_at(proxy, state, "c2s", 2)  # c2s: qmp_capabilities, device_del: never sent
    with Store(state) as s:
        assert s.get_device("vm1", U[1]).state is DeviceState.DETACHING
    first = _reconcile(state, guest_vm.qmp_path, wait=10)
    assert first.resent == [qemu_id] and first.pending == [], first
    assert first.released in ([], [qemu_id])  # [] if the guest takes longer than unplug_wait
    guest_vm.wait_guest_pci(lambda seen: "0000:00:04.0" not in seen)  # the guest really ejected it
    _reconcile(state, guest_vm.qmp_path)
    with Store(state) as s:
        assert s.devices("vm1") == []


def test_item3_a_detach_killed_after_qemu_took_its_device_del_is_pending_not_resent(qtest_vm, state):
    qemu_id = _attach(state, qtest_vm.qmp_path)
    with QmpFaultProxy(qtest_vm.qmp_path) as proxy:
        # s2c: greeting, capabilities reply, device_del reply: QEMU executed it, the child never heard back.
        # (Killed right after device_del left it, the child may also lose it: QEMU drops the commands of a
        # client that vanishes before they are dispatched, so that case may be either.)
        _kill_detach_at(proxy, state, "s2c", 3)
    report = _reconcile(state, qtest_vm.qmp_path)
    assert report.pending == [qemu_id] and report.resent == [], report  # QEMU: "already in the process of unplug"
    with Store(state) as s, s.reading() as txn:
        assert txn.unplug_requested("vm1") == {U[1]}  # and now it is recorded
    qtest_vm.acpi_eject(4)  # the guest (played by the test) finally ejects
    assert _reconcile(state, qtest_vm.qmp_path).released == [qemu_id]

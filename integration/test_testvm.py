"""kvmslots.testvm against a real QEMU: the VMs boot, hotplug round-trips, nothing leaks."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from kvmslots.errors import GuestBootTimeout, TestVMError
from kvmslots.testvm import TestVM

RNG = "0000:00:06.0"


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def connect(vm: TestVM) -> QMPClient:
    client = QMPClient("kvmslots-test")
    await asyncio.wait_for(client.connect(str(vm.qmp_path)), 10)
    return client


def test_guest_boots_and_sees_the_default_pc_slots(guest_vm: TestVM) -> None:
    # A default `pc`: host bridge, PIIX3 (ISA, IDE, ACPI functions), VGA, e1000.
    assert guest_vm.guest_pci_slots() == {0, 1, 2, 3}
    assert {"0000:00:01.0", "0000:00:01.1", "0000:00:01.3"} <= guest_vm.guest_pci_devices()
    assert guest_vm.run("echo hello") == "hello\n"


def test_guest_acknowledges_hotplug_and_unplug(guest_vm: TestVM) -> None:
    async def scenario() -> dict[str, Any]:
        qmp = await connect(guest_vm)
        try:
            await qmp.execute("device_add", {"driver": "virtio-rng-pci", "addr": "0x6", "id": "rng0"})
            guest_vm.wait_guest_pci(lambda devices: RNG in devices)
            with qmp.listener("DEVICE_DELETED") as listener:
                await qmp.execute("device_del", {"id": "rng0"})
                while True:  # virtio first reports its backend child, without "device"
                    event: Any = await asyncio.wait_for(listener.get(), 10)
                    if event["data"].get("device") == "rng0":
                        return dict(event)
        finally:
            await qmp.disconnect()

    event = asyncio.run(scenario())
    assert event["data"]["path"] == "/machine/peripheral/rng0"
    guest_vm.wait_guest_pci(lambda devices: RNG not in devices)


def test_qtest_unplug_completes_only_when_the_guest_ejects(qtest_vm: TestVM) -> None:
    async def scenario() -> None:
        qmp = await connect(qtest_vm)
        try:
            await qmp.execute("device_add", {"driver": "pci-testdev", "addr": "0x7", "id": "td0"})
            pci: Any = await qmp.execute("query-pci")
            assert any(d["slot"] == 7 and d["qdev_id"] == "td0" for d in pci[0]["devices"])
            with qmp.listener("DEVICE_DELETED") as listener:
                await qmp.execute("device_del", {"id": "td0"})
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(listener.get(), 1.0)  # nobody ejected yet
                qtest_vm.acpi_eject(7)
                event: Any = await asyncio.wait_for(listener.get(), 5)
            assert event["data"]["device"] == "td0"
            pci = await qmp.execute("query-pci")
            assert all(d["slot"] != 7 for d in pci[0]["devices"])
        finally:
            await qmp.disconnect()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["qtest", "guest"])
def test_stop_kills_qemu_and_removes_its_workdir(mode: str) -> None:
    vm = TestVM(mode=mode).start()
    pid, workdir = vm.pid, vm.workdir
    assert pid is not None and vm.is_running() and workdir.is_dir()
    assert workdir.stat().st_mode & 0o777 == 0o700
    assert vm.qmp_path.stat().st_mode & 0o777 == 0o600
    vm.stop()
    assert not pid_alive(pid)
    assert not workdir.exists()
    assert not vm.is_running()
    vm.stop()  # idempotent
    with pytest.raises(TestVMError):
        vm.start()  # one start per TestVM


def test_caller_workdir_keeps_logs(tmp_path: Path) -> None:
    with TestVM(tmp_path / "vm", mode="qtest") as vm:
        private = vm.qmp_path.parent
        assert private.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "vm" / "qemu.log").read_text().startswith("$ ")
    assert not private.exists()


def test_failed_start_leaves_no_process() -> None:
    vm = TestVM(mode="qtest", extra_args=["-no-such-option"])
    with pytest.raises(TestVMError, match="no-such-option"):
        vm.start()
    assert vm.pid is not None and not pid_alive(vm.pid)
    assert not vm.workdir.exists()


def test_boot_timeout_kills_the_running_qemu() -> None:
    vm = TestVM(mode="guest", boot_timeout=0.3)
    with pytest.raises(GuestBootTimeout, match="did not answer"):
        vm.start()
    assert vm.pid is not None and not pid_alive(vm.pid)
    assert not vm.workdir.exists()


def test_qemu_dies_with_a_killed_python() -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed test runner cannot run cleanup, the kernel does it."""
    script = textwrap.dedent(
        """
        import sys, time
        from kvmslots.testvm import TestVM
        vm = TestVM(mode="qtest").start()
        print(vm.pid, vm.workdir, flush=True)
        time.sleep(60)
        """
    )
    path = [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        pid_text, workdir = child.stdout.readline().split(maxsplit=1)
        qemu_pid = int(pid_text)
        assert pid_alive(qemu_pid)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert wait_gone(qemu_pid), f"QEMU {qemu_pid} outlived its killed parent"
    finally:
        child.kill()
        child.wait()
        if "workdir" in locals():  # the killed child could not remove its private dir
            shutil.rmtree(workdir.strip(), ignore_errors=True)

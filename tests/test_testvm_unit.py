"""Pure parts of kvmslots.testvm: no QEMU is started here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvmslots import testvm
from kvmslots.errors import GuestFilesMissing, InvalidSlot, TestVMError
from kvmslots.testvm import TestVM, find_guest_files, parse_pci_addresses, qemu_binary, slots_on_bus

LS_OUTPUT = "0000:00:00.0\n0000:00:01.0\n0000:00:01.1\n0000:00:01.3\n0000:00:02.0\n0000:00:03.0\n0000:01:1f.7\n"


@pytest.fixture
def guest_dir(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initramfs.cpio.gz").write_bytes(b"initramfs")
    return tmp_path


@pytest.fixture(autouse=True)
def fake_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMSLOTS_QEMU", sys.executable)  # any executable will do
    monkeypatch.delenv("KVMSLOTS_ACCEL", raising=False)
    monkeypatch.delenv("KVMSLOTS_GUEST_DIR", raising=False)


def test_parse_pci_addresses_ignores_console_noise() -> None:
    text = "/ # ls\r\n" + LS_OUTPUT.replace("\n", "\r\n") + "sh: oops\n0000:00:05 00:05.0 0000:00:05.8\n"
    assert parse_pci_addresses(text) == set(LS_OUTPUT.split())
    assert parse_pci_addresses("0000:00:04.0    0000:00:05.0") == {"0000:00:04.0", "0000:00:05.0"}
    assert parse_pci_addresses("") == set()


def test_slots_on_bus() -> None:
    devices = parse_pci_addresses(LS_OUTPUT)
    assert slots_on_bus(devices) == {0, 1, 2, 3}
    assert slots_on_bus(devices, bus=1) == {31}
    assert slots_on_bus(devices, bus=2) == set()
    assert slots_on_bus(devices, domain=1) == set()
    assert slots_on_bus(["junk", "0000:00:0a.2"]) == {10}


def test_find_guest_files_prefers_argument_then_env_then_repo(
    guest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_guest_files(guest_dir) == (guest_dir / "vmlinuz", guest_dir / "initramfs.cpio.gz")
    monkeypatch.setenv("KVMSLOTS_GUEST_DIR", str(guest_dir))
    assert find_guest_files()[0] == guest_dir / "vmlinuz"
    with pytest.raises(GuestFilesMissing):  # an explicit argument is not replaced by the env
        find_guest_files(tmp_path / "elsewhere")


def test_find_guest_files_error_names_paths_and_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    monkeypatch.setenv("KVMSLOTS_GUEST_DIR", str(tmp_path))
    with pytest.raises(GuestFilesMissing) as caught:
        find_guest_files()
    message = str(caught.value)
    assert str(tmp_path / "initramfs.cpio.gz") in message
    assert str(tmp_path / "vmlinuz") not in message  # that one exists
    assert "KVMSLOTS_GUEST_DIR" in message
    assert "runtime/build-guest.sh" in message
    assert isinstance(caught.value, TestVMError)


def test_qemu_binary_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert qemu_binary() == sys.executable
    monkeypatch.setenv("KVMSLOTS_QEMU", "/nonexistent/qemu-system-x86_64")
    with pytest.raises(TestVMError, match="apt-get install qemu-system-x86"):
        qemu_binary()


def test_guest_command_line(guest_dir: Path) -> None:
    vm = TestVM(guest_dir=guest_dir, memory_mb=128, extra_args=["-smp", "2"])
    try:
        cmd = vm.qemu_command()
        assert cmd[0] == sys.executable
        joined = " ".join(cmd)
        for expected in (
            "-machine pc", "-accel tcg", "-m 128", "-no-reboot", "-display none", "-monitor none",
            f"-kernel {guest_dir / 'vmlinuz'}", f"-initrd {guest_dir / 'initramfs.cpio.gz'}",
            f"-qmp unix:{vm.qmp_path},server=on,wait=off", "-serial chardev:ser",
        ):  # fmt: skip
            assert expected in joined
        assert "console=ttyS0" in cmd[cmd.index("-append") + 1]
        assert "-nodefaults" not in cmd  # slots 0-3 stay taken as in a default pc
        assert cmd[-2:] == ["-smp", "2"]
        assert vm.qmp_path.parent.stat().st_mode & 0o777 == 0o700
        assert vm.workdir == vm.qmp_path.parent
    finally:
        vm.stop()
    assert not vm.workdir.exists()


def test_qtest_command_line_and_accel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMSLOTS_ACCEL", "kvm")
    vm = TestVM(mode="qtest")
    try:
        cmd = vm.qemu_command()
        assert cmd[cmd.index("-accel") + 1] == "kvm"
        assert "-S" in cmd and "-kernel" not in cmd
        assert f"unix:{vm.qtest_path},server=on,wait=off" in cmd
    finally:
        vm.stop()
    vm = TestVM(mode="qtest", accel="tcg")
    try:
        assert vm.qemu_command()[vm.qemu_command().index("-accel") + 1] == "tcg"
    finally:
        vm.stop()


def test_guest_mode_without_guest_files_fails_before_creating_anything(tmp_path: Path) -> None:
    with pytest.raises(GuestFilesMissing):
        TestVM(tmp_path / "work", guest_dir=tmp_path / "none")
    assert not (tmp_path / "work").exists()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        TestVM(mode="bogus")
    vm = TestVM(mode="qtest")
    try:
        with pytest.raises(InvalidSlot):
            vm.acpi_eject(32)
        with pytest.raises(InvalidSlot):
            vm.acpi_eject(True)
        with pytest.raises(TestVMError, match="not running"):
            vm.acpi_eject(5)
        with pytest.raises(TestVMError, match="guest mode"):
            vm.run("true")
    finally:
        vm.stop()


def test_chardev_paths_escape_commas() -> None:
    assert testvm._chardev_path(Path("/tmp/a,b")) == "/tmp/a,,b"

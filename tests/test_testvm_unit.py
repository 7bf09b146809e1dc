"""Pure parts of kvmslots.testvm: no QEMU is started here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from kvmslots import guest, testvm
from kvmslots.errors import GuestBuildFailed, GuestFilesMissing, InvalidSlot, TestVMError
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


def make_guest(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vmlinuz").write_bytes(b"kernel")
    (directory / "initramfs.cpio.gz").write_bytes(b"initramfs")
    return directory


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A fake checkout (runtime/build-guest.sh, empty runtime/out) and an empty per-user cache."""
    runtime = tmp_path / "checkout" / "runtime"
    (runtime / "out").mkdir(parents=True)
    (runtime / "build-guest.sh").write_text("#!/bin/sh\n")
    monkeypatch.setattr(testvm, "_CHECKOUT_RUNTIME", runtime)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return {"checkout": runtime / "out", "cache": tmp_path / "cache" / "kvmslots" / "guest", "env": tmp_path / "env"}


def test_lookup_order_argument_env_checkout_then_user_cache(
    places: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert guest.default_guest_dir() == places["cache"]
    make_guest(places["cache"])
    assert find_guest_files()[0] == places["cache"] / "vmlinuz"  # the checkout's runtime/out is empty
    make_guest(places["checkout"])
    assert find_guest_files()[0] == places["checkout"] / "vmlinuz"  # a checkout's guest comes first
    monkeypatch.setenv("KVMSLOTS_GUEST_DIR", str(make_guest(places["env"])))
    assert find_guest_files()[0] == places["env"] / "vmlinuz"
    argument = make_guest(tmp_path / "argument")
    assert find_guest_files(argument)[0] == argument / "vmlinuz"
    monkeypatch.setenv("KVMSLOTS_GUEST_DIR", str(tmp_path / "empty"))
    with pytest.raises(GuestFilesMissing):  # a named directory is never replaced by a default one
        find_guest_files()


def test_installed_package_looks_in_the_user_cache_and_names_the_command(
    places: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed kvmslots: no runtime/build-guest.sh next to the package, even if a runtime/out exists.
    (places["checkout"].parent / "build-guest.sh").unlink()
    make_guest(places["checkout"])
    with pytest.raises(GuestFilesMissing) as caught:
        find_guest_files()
    message = str(caught.value)
    assert str(places["cache"] / "vmlinuz") in message
    assert "checkout" not in message
    assert message.endswith("Build it with: kvmslots guest build")
    assert isinstance(caught.value, TestVMError)
    make_guest(places["cache"])
    assert find_guest_files() == (places["cache"] / "vmlinuz", places["cache"] / "initramfs.cpio.gz")


def test_missing_everywhere_names_both_default_places(places: dict[str, Path]) -> None:
    with pytest.raises(GuestFilesMissing) as caught:
        TestVM(mode="guest")
    message = str(caught.value)
    assert f"also looked in {places['checkout']}" in message
    assert message.endswith("Build it with: kvmslots guest build")


def test_find_guest_files_error_names_paths_and_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    monkeypatch.setenv("KVMSLOTS_GUEST_DIR", str(tmp_path))
    with pytest.raises(GuestFilesMissing) as caught:
        find_guest_files()
    message = str(caught.value)
    assert str(tmp_path / "initramfs.cpio.gz") in message
    assert str(tmp_path / "vmlinuz") not in message  # that one exists
    assert "KVMSLOTS_GUEST_DIR" in message
    assert message.endswith(f"Build it with: kvmslots guest build {tmp_path}")
    assert isinstance(caught.value, TestVMError)
    with pytest.raises(GuestFilesMissing, match=r"guest_dir argument.*kvmslots guest build /no/such$"):
        find_guest_files("/no/such")


def test_default_guest_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert guest.default_guest_dir() == tmp_path / "home" / ".cache" / "kvmslots" / "guest"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG spec says
    assert guest.default_guest_dir() == tmp_path / "home" / ".cache" / "kvmslots" / "guest"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert guest.default_guest_dir() == tmp_path / "xdg" / "kvmslots" / "guest"
    assert guest.default_work_dir() == tmp_path / "xdg" / "kvmslots" / "guest-work"
    assert guest.guest_dir() == guest.default_guest_dir()
    monkeypatch.setenv("KVMSLOTS_GUEST_DIR", str(tmp_path / "env"))
    assert guest.guest_dir() == tmp_path / "env"  # building without a DIR builds where VMs look first


# --- kvmslots guest build (the recipe itself is run for real by integration/test_wheel.py) ---


def test_recipe_is_package_data_and_the_checkout_wrapper_calls_it() -> None:
    assert guest.BUILD_SCRIPT.is_file() and guest.INIT_SCRIPT.is_file()
    assert guest.BUILD_SCRIPT.parent == Path(guest.__file__).resolve().parent
    root = Path(__file__).resolve().parent.parent
    wrapper = (root / "runtime" / "build-guest.sh").read_text()
    assert "kvmslots/guest" in wrapper and "apt-get" not in wrapper  # one recipe, not two
    assert not (root / "runtime" / "init").exists()
    setup_cfg = (root / "setup.cfg").read_text()
    assert "kvmslots.guest = build-guest.sh, init" in setup_cfg


FAKE_RECIPE = """#!/usr/bin/env bash
# Stands in for build-guest.sh: records its arguments, then writes the guest or fails.
printf '%s\\n' "$@" >"$FAKE_LOG"
echo "fake: step one" >&2
[[ -z "${FAKE_FAIL:-}" ]] || { echo "fake: cannot resolve linux-image-cloud-amd64" >&2; exit 3; }
out=${@: -1}
mkdir -p "$out"
[[ -n "${FAKE_HALF:-}" ]] || echo kernel >"$out/vmlinuz"
echo initramfs >"$out/initramfs.cpio.gz"
echo "kernel:    $out/vmlinuz"
"""


@pytest.fixture
def fake_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    recipe = tmp_path / "recipe" / "build-guest.sh"
    recipe.parent.mkdir()
    recipe.write_text(FAKE_RECIPE)
    (recipe.parent / "init").write_text("#!/bin/sh\n")
    monkeypatch.setattr(guest, "BUILD_SCRIPT", recipe)
    monkeypatch.setattr(guest, "INIT_SCRIPT", recipe.parent / "init")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "args"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "args"


def test_build_guest_defaults_to_the_user_cache(fake_recipe: Path, tmp_path: Path) -> None:
    built = guest.build_guest()
    assert built == tmp_path / "cache" / "kvmslots" / "guest"
    assert (built / "vmlinuz").is_file()
    work = tmp_path / "cache" / "kvmslots" / "guest-work"
    assert fake_recipe.read_text().split() == ["--work", str(work), str(built)]
    assert find_guest_files(built)[0] == built / "vmlinuz"


def test_build_guest_failure_is_typed_and_carries_the_recipe_output(
    fake_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(GuestBuildFailed, match=r"exit status 3[\s\S]*cannot resolve linux-image") as caught:
        guest.build_guest(tmp_path / "out")
    assert isinstance(caught.value, TestVMError)
    monkeypatch.delenv("FAKE_FAIL")
    monkeypatch.setenv("FAKE_HALF", "1")
    with pytest.raises(GuestBuildFailed, match="did not write vmlinuz"):
        guest.build_guest(tmp_path / "out")
    monkeypatch.setattr(guest, "INIT_SCRIPT", tmp_path / "nothing")
    with pytest.raises(GuestBuildFailed, match="reinstall kvmslots"):
        guest.build_guest(tmp_path / "out")


def guest_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmslots")
    parser.add_argument("--json", action="store_true")
    guest.add_guest_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_guest_build_command(
    fake_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmslots.cli import Output

    args = guest_parser().parse_args(["guest", "build", str(tmp_path / "mine"), "--force", "--work-dir", "/w"])
    assert args.func is guest.cmd_guest_build
    assert args.func(args, None, Output(False)) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'mine'}\n"  # only the directory on stdout: $(kvmslots guest build) works
    assert "fake: step one" in err  # progress goes to stderr
    assert fake_recipe.read_text().split() == ["--work", "/w", "--force", str(tmp_path / "mine")]

    args = guest_parser().parse_args(["--json", "guest", "build", "-q"])
    assert args.func(args, None, Output(True)) == 0
    out, err = capsys.readouterr()
    built = tmp_path / "cache" / "kvmslots" / "guest"
    assert json.loads(out) == {
        "directory": str(built), "kernel": str(built / "vmlinuz"), "initramfs": str(built / "initramfs.cpio.gz")
    }
    assert err == ""


def test_guest_parser_documents_every_option() -> None:
    parser = guest_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["guest"])  # a subcommand is required

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    build = subcommands(subcommands(parser)["guest"])["build"]
    for action in build._actions:
        assert action.help, f"{action.dest} has no help text"


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


def test_plugin_fixture_fails_without_a_guest_and_names_the_command(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMSLOTS_GUEST_DIR", str(tmp_path / "no-guest"))
    pytester.makepyfile(test_user="def test_hotplug(kvm_test_vm):\n    pass\n")
    result = pytester.runpytest_subprocess()  # the plugin comes in through its pytest11 entry point
    result.assert_outcomes(errors=1)  # an error at setup: never a skip, never a pass
    result.stdout.fnmatch_lines(
        [f"*GuestFilesMissing: test guest not built*Build it with: kvmslots guest build {tmp_path / 'no-guest'}*"]
    )
    result.stdout.no_fnmatch_line("*testvm.py:*")  # the reason, not a traceback into kvmslots


# --- passthrough mode with two NUMA nodes ----------------------------------------------------


@pytest.fixture
def passthrough_dir(tmp_path: Path) -> Path:
    built = tmp_path / "passthrough"
    built.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4", "packages.txt"):
        (built / name).write_text(name)
    return tmp_path


def _devices(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "-device"]


def test_numa_args_give_each_node_half_and_put_an_sriov_nvme_behind_an_expander_on_node_1() -> None:
    args = testvm.numa_args(1024, 2)
    assert [args[i + 1] for i, arg in enumerate(args) if arg in ("-object", "-numa")] == [
        "memory-backend-ram,id=kvmslots-node0-mem,size=512M",
        "memory-backend-ram,id=kvmslots-node1-mem,size=512M",
        "node,nodeid=0,cpus=0,memdev=kvmslots-node0-mem",
        "node,nodeid=1,cpus=1,memdev=kvmslots-node1-mem",
    ]
    pxb, port, subsys, nvme = _devices(args)
    assert pxb.startswith("pxb-pcie,id=kvmslots-node1-pxb,") and "numa_node=1" in pxb and "bus_nr=128" in pxb
    assert port.startswith("pcie-root-port,id=kvmslots-node1-port,bus=kvmslots-node1-pxb,")
    assert subsys == f"nvme-subsys,id={testvm.NUMA_SRIOV_SERIAL}-subsys,nqn={testvm.NUMA_SRIOV_SERIAL}"
    assert f"serial={testvm.NUMA_SRIOV_SERIAL}," in nvme and "addr=0x0,bus=kvmslots-node1-port" in nvme
    assert "sriov_max_vfs=4" in nvme
    odd = testvm.numa_args(1001, 5, None)  # no controller; the odd MiB and CPU go to node 1
    assert "size=500M" in odd[1] and "size=501M" in odd[3]
    assert "cpus=0-1," in odd[5] and "cpus=2-4," in odd[7]
    assert [d.split(",")[0] for d in _devices(odd)] == ["pxb-pcie", "pcie-root-port"]
    with pytest.raises(ValueError, match="2 CPUs"):
        testvm.numa_args(1024, 1)
    with pytest.raises(ValueError, match="64 MiB"):
        testvm.numa_args(32, 2)


def test_sriov_nvme_args_name_a_subsystem_per_serial_and_take_slot_0_only_behind_a_bus() -> None:
    assert _devices(testvm.sriov_nvme_args(2))[0] == "nvme-subsys,id=kvmslots-subsys,nqn=kvmslots"  # as before
    subsys, nvme = _devices(testvm.sriov_nvme_args(2, addr=0, bus="port1", serial="other-1"))
    assert subsys == "nvme-subsys,id=other-1-subsys,nqn=other-1"
    assert nvme.startswith("nvme,id=other-1,serial=other-1,subsys=other-1-subsys,addr=0x0,bus=port1,")
    with pytest.raises(InvalidSlot, match="1..31"):
        testvm.sriov_nvme_args(2, addr=0)
    for serial in ("", "a" * 21, "bad,serial", "-x"):
        with pytest.raises(ValueError, match="serial"):
            testvm.sriov_nvme_args(2, serial=serial)


def test_passthrough_with_numa_boots_two_cpus_and_adds_the_expander_after_the_disks(passthrough_dir: Path) -> None:
    vm = TestVM(mode="passthrough", guest_dir=passthrough_dir, numa=True, extra_args=["-device", "x,bus=pcie.0"])
    try:
        cmd = vm.qemu_command()
    finally:
        vm.stop()
    assert vm.cpus == 2 and cmd[cmd.index("-smp") + 1] == "2"
    devices = [d.split(",")[0] for d in _devices(cmd)]
    assert devices == ["intel-iommu", "nvme-subsys", "nvme", "virtio-blk-pci", "virtio-blk-pci",
                       "pxb-pcie", "pcie-root-port", "nvme-subsys", "nvme", "x"]  # fmt: skip
    assert cmd[cmd.index("-m") + 1] == "1024" and "node,nodeid=1,cpus=1,memdev=kvmslots-node1-mem" in cmd
    vm = TestVM(mode="passthrough", guest_dir=passthrough_dir, numa=True, cpus=4, sriov_max_vfs=None)
    try:
        cmd = vm.qemu_command()
    finally:
        vm.stop()
    assert vm.cpus == 4 and "node,nodeid=1,cpus=2-3,memdev=kvmslots-node1-mem" in cmd
    assert not [d for d in _devices(cmd) if d.startswith("nvme")]
    vm = TestVM(mode="passthrough", guest_dir=passthrough_dir)
    try:
        assert "-numa" not in vm.qemu_command() and "-smp" not in vm.qemu_command()  # opt-in
    finally:
        vm.stop()


def test_numa_is_for_passthrough_mode_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="passthrough mode"):
        TestVM(tmp_path / "work", mode="qtest", numa=True)
    assert not (tmp_path / "work").exists()

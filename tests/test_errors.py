"""Errors a lifecycle manager can act on: facts as attributes, and --json failures for each exit code."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest
from fakes import FakeQemu

import kvmslots
from kvmslots import DeviceSpec, DeviceState, Store, VMSpec, hot_add
from kvmslots.cli import build_parser, main
from kvmslots.errors import FACTS, DeviceAddFailed, DeviceExists, KvmSlotsError, SlotOccupied, UnknownVM

U = [str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000)) for n in range(8)]


def run(coro):
    return asyncio.run(coro)


def spec(n, **kw):
    return DeviceSpec(U[n], "dev", "pci-testdev", **kw)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state") as s:
        s.define_vm(VMSpec("vm1"))
        yield s


def test_every_error_has_every_fact_attribute_none_unless_known():
    for name in kvmslots.errors.__all__:
        cls = getattr(kvmslots.errors, name)
        if isinstance(cls, type) and issubclass(cls, KvmSlotsError):
            for fact in FACTS:
                assert hasattr(cls, fact), (name, fact)
    with pytest.raises(TypeError, match="no fact 'colour'"):
        KvmSlotsError("x", colour="red")


def test_a_refused_add_says_qemu_s_words_and_that_nothing_was_left(store):
    qemu = FakeQemu(refuse_add="'pci-testdev' is not a valid device model name")
    with pytest.raises(DeviceAddFailed) as caught:
        run(hot_add(store, qemu, "vm1", spec(1)))
    error = caught.value
    assert (error.vm, error.uuid, error.device_id, error.bus, error.slot) == ("vm1", U[1], f"dev-{U[1][:8]}-pci-4",
                                                                              "pci.0", 4)
    assert error.qemu_message == "'pci-testdev' is not a valid device model name"
    assert error.left == {} and (error.state, error.new_state) == ("attaching", "released")
    assert store.devices("vm1") == []


def test_an_add_whose_outcome_is_unknown_says_what_it_left_attaching(store):
    qemu = FakeQemu(lose_after_add=True, can_reconnect=False)
    with pytest.raises(DeviceAddFailed) as caught:
        run(hot_add(store, qemu, "vm1", spec(1)))
    device_id = f"dev-{U[1][:8]}-pci-4"
    assert caught.value.left == {device_id: "attaching"} and caught.value.new_state == "attaching"
    assert [(d.qemu_id, d.state) for d in store.devices("vm1")] == [(device_id, DeviceState.ATTACHING)]


def test_store_refusals_name_the_device_and_the_slot(store):
    run(hot_add(store, FakeQemu(), "vm1", spec(1)))
    with pytest.raises(DeviceExists) as caught:
        run(hot_add(store, FakeQemu(), "vm1", spec(1)))
    assert (caught.value.vm, caught.value.uuid, caught.value.slot, caught.value.state) == ("vm1", U[1], 4, "attached")
    with pytest.raises(SlotOccupied) as occupied:
        run(hot_add(store, FakeQemu(devices={"stranger": 5}), "vm1", spec(2, slot=5)))
    assert (occupied.value.slot, occupied.value.bus, occupied.value.holder) == (5, "pci.0", "stranger")
    with pytest.raises(UnknownVM) as unknown:
        store.get_vm("web9")
    assert unknown.value.vm == "web9" and "kvmslots adopt web9 --qmp" in str(unknown.value)


def cli_json(capsys, *args):
    code = main(["--json", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_failures_are_one_object_on_stderr_for_each_exit_code(tmp_path, capsys):
    state = str(tmp_path / "state")
    code, out, err = cli_json(capsys, "--state", state, "plan", "vm1", "--device",
                              f"nic:{U[1]}:virtio-net-pci")
    assert code == 0 and json.loads(out)[0]["id"] == f"nic-{U[1][:8]}-pci-4" and err == ""
    code, out, err = cli_json(capsys, "--state", state, "show", "web9")  # 1: the operation failed
    assert code == 1 and out == ""
    failure = json.loads(err)
    assert failure == {"error": "UnknownVM", "message": failure["message"], "vm": "web9"}
    assert "kvmslots plan web9" in failure["message"]
    code, out, err = cli_json(capsys, "--state", state, "plan", "bad name")  # 2: bad usage
    assert code == 2 and json.loads(err)["error"] == "InvalidName"
    code, out, err = cli_json(capsys, "--state", state, "no-such-command")  # 2: argparse itself
    assert code == 2 and json.loads(err)["error"] == "UsageError" and "invalid choice" in json.loads(err)["message"]
    code, out, err = cli_json(capsys, "--state", state, "plan", "vm1", "--device", f"nic:{U[2]}:e1000",
                              "--device", f"rng:{U[2]}:virtio-rng-pci")  # 1 with facts: a UUID twice
    assert code == 1 and json.loads(err)["error"] == "DeviceExists"
    assert len(err.strip().splitlines()) == 1


def test_version_and_every_option_has_help(capsys):
    proc = subprocess.run([sys.executable, "-m", "kvmslots", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"kvmslots {kvmslots.__version__}"
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), ["kvmslots"])
    assert missing == []


def test_the_hierarchy_drawn_in_the_docstring_names_every_error():
    drawn = kvmslots.errors.__doc__
    for name in kvmslots.errors.__all__:
        if isinstance(getattr(kvmslots.errors, name), type):
            assert f" {name}\n" in drawn or f" {name}  (also" in drawn, name

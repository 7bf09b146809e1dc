"""The real ``kvmslots`` executable, run as a subprocess against real QEMU VMs and libvirt's test driver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from kvmslots.pci.fakehost import libvirt_test_xml, sriov_topology
from kvmslots.testvm import TestVM

U1, U2, U3 = (str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000)) for n in (1, 2, 3))


def executable() -> str:
    beside = Path(sys.executable).parent / "kvmslots"
    found = str(beside) if beside.exists() else shutil.which("kvmslots")
    assert found, "the kvmslots console script is not installed (pip install -e .)"
    return found


@pytest.fixture
def cli(tmp_path):
    state = tmp_path / "state"

    def run(*args: str, expect: int = 0, stdin: str | None = None, env: dict | None = None):
        proc = subprocess.run([executable(), "--state", str(state), *args], capture_output=True, text=True,
                              timeout=300, input=stdin, env={**os.environ, **(env or {})})
        assert proc.returncode == expect, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
        if expect:
            assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kvmslots"), proc.stderr
        return proc

    run.state = state
    return run


def jrun(cli, *args, **kw):
    return json.loads(cli("--json", *args, **kw).stdout)


def test_plan_prints_device_arguments_and_json(cli, tmp_path):
    text = cli("plan", "vm1", "--device", f"nic:{U1}:virtio-net-pci:mac=52:54:00:00:00:01",
               "--device", f"rng:{U2}:virtio-rng-pci").stdout.splitlines()
    assert text == [f"-device virtio-net-pci,id=nic-{U1[:8]}-pci-4,bus=pci.0,addr=0x4,mac=52:54:00:00:00:01",
                    f"-device virtio-rng-pci,id=rng-{U2[:8]}-pci-5,bus=pci.0,addr=0x5"]
    rows = jrun(cli, "plan", "vm1", "--device", f"nic:{U1}:virtio-net-pci:mac=52:54:00:00:00:01",
                "--device", f"rng:{U2}:virtio-rng-pci")
    assert [set(r) for r in rows] == [{"id", "uuid", "type", "driver", "bus", "slot", "function", "arg"}] * 2
    assert [r["slot"] for r in rows] == [4, 5]
    assert os.stat(cli.state).st_mode & 0o777 == 0o700
    # QEMU boots with exactly these arguments, and show --qmp sees them as ours
    args = [a for r in rows for a in ("-device", r["arg"])]
    with TestVM(tmp_path / "vm", mode="qtest", extra_args=args) as vm:
        shown = jrun(cli, "show", "vm1", "--qmp", str(vm.qmp_path))
    assert set(shown) >= {"vm", "buses", "devices"}
    assert shown["buses"]["pci.0"][:6] == ["reserved"] * 4 + ["ours"] * 2


def test_attach_show_detach_reconcile_on_a_booted_guest(cli, kvm_test_vm):
    qmp = str(kvm_test_vm.qmp_path)
    cli("plan", "vm1")
    added = jrun(cli, "attach", "vm1", "--qmp", qmp, "--type", "rng", "--uuid", U1, "--driver", "virtio-rng-pci")
    assert added == {"id": f"rng-{U1[:8]}-pci-4", "uuid": U1, "type": "rng", "driver": "virtio-rng-pci",
                     "bus": "pci.0", "slot": 4, "function": 0}
    kvm_test_vm.wait_guest_pci(lambda seen: "0000:00:04.0" in seen)
    drawn = cli("show", "vm1", "--qmp", qmp).stdout
    assert "RRRRO" in drawn and f"rng-{U1[:8]}-pci-4" in drawn
    assert jrun(cli, "reconcile", "vm1", "--qmp", qmp)["unknown"] == []
    removed = jrun(cli, "detach", "vm1", "--qmp", qmp, "--uuid", U1, "--timeout", "30")
    assert removed == {"id": f"rng-{U1[:8]}-pci-4", "uuid": U1, "result": "removed", "ids": [f"rng-{U1[:8]}-pci-4"]}
    kvm_test_vm.wait_guest_pci(lambda seen: "0000:00:04.0" not in seen)


def test_pending_detach_exits_zero_and_says_so(cli, kvm_qtest_vm):
    qmp = str(kvm_qtest_vm.qmp_path)
    cli("plan", "vm1")
    cli("attach", "vm1", "--qmp", qmp, "--type", "test", "--uuid", U1, "--driver", "pci-testdev")
    out = cli("detach", "vm1", "--qmp", qmp, "--uuid", U1, "--timeout", "0.5").stdout
    assert out.startswith("pending:")
    assert jrun(cli, "show", "vm1")["buses"]["pci.0"][4] == "pending"


def test_failed_operations_exit_1_and_change_nothing(cli, kvm_qtest_vm):
    qmp = str(kvm_qtest_vm.qmp_path)
    cli("plan", "vm1")
    before = jrun(cli, "show", "vm1")
    proc = cli("attach", "vm1", "--qmp", qmp, "--type", "test", "--uuid", U1, "--driver", "nosuch-dev", expect=1)
    assert "not a valid device model name" in proc.stderr
    cli("detach", "vm1", "--qmp", qmp, "--uuid", U2, expect=1)  # no such device
    cli("attach", "ghost", "--qmp", qmp, "--type", "test", "--uuid", U1, "--driver", "pci-testdev", expect=1)
    assert jrun(cli, "show", "vm1") == before


@pytest.mark.parametrize("args", [
    ["plan", "vm1", "--device", "nic:not-a-uuid:e1000"],
    ["plan", "vm1", "--device", f"Nic:{U1}:e1000"],
    ["plan", "vm1", "--device", f"nic:{U1}:e1000:romfile=/etc/passwd"],
    ["plan", "vm1", "--device", f"nic:{U1}"],
    ["plan", "vm1", "--mask", "111"],
    ["attach", "vm1", "--qmp", "/nonexistent", "--type", "nic", "--uuid", U1, "--driver", "E1000"],
    ["attach", "vm1", "--qmp", "/nonexistent", "--type", "nic", "--uuid", U1, "--driver", "e1000", "--slot", "x"],
    ["detach", "vm1", "--qmp", "/nonexistent", "--uuid", "xyz"],
    ["import", "/nonexistent/file.json"],
    ["host", "devices", "--status", "zombie"],
    ["host", "claim", "vm1", "--request", "gpu:0", "--aliases", "/nonexistent"],
    ["nosuchcommand"],
    [],
])
def test_bad_usage_exits_2_with_one_line(cli, args):
    cli(*args, expect=2)


def test_export_import_round_trip_and_bad_documents(cli, tmp_path):
    cli("plan", "vm1", "--device", f"nic:{U1}:e1000")
    doc = cli("export", "vm1").stdout
    other = tmp_path / "other"
    subprocess.run([executable(), "--state", str(other), "import", "-"], input=doc, check=True, capture_output=True,
                   text=True)
    exported = subprocess.run([executable(), "--state", str(other), "export", "vm1"], capture_output=True, text=True)
    assert json.loads(exported.stdout) == json.loads(doc)
    (tmp_path / "foreign.json").write_text(json.dumps({"format": "ganeti", "version": 1}))
    cli("import", str(tmp_path / "foreign.json"), expect=2)
    (tmp_path / "broken.json").write_text(doc[: len(doc) // 2])
    cli("import", str(tmp_path / "broken.json"), expect=2)
    cli("import", "-", stdin=doc, expect=1)  # exists already: a failed operation
    cli("export", "vm1", "-o", str(tmp_path / "out.json"))
    assert os.stat(tmp_path / "out.json").st_mode & 0o777 == 0o600


def test_host_commands_against_the_libvirt_test_driver(cli, tmp_path):
    topology = sriov_topology(pfs=2, vfs_per_pf=8, plain=2)
    xml = tmp_path / "node.xml"
    xml.write_text(libvirt_test_xml(topology))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"vendor_id": "8086", "physical_network": "physnet1"}, {"address": "*:*:*.*"}]))
    report = jrun(cli, "host", "sync", "--libvirt", f"test://{xml}", "--device-spec", str(spec))
    assert set(report) == {"added", "updated", "removed", "kept"} and len(report["added"]) == len(topology)
    devices = jrun(cli, "host", "devices")
    assert {tuple(sorted(d)) for d in devices} == {tuple(sorted(
        ["address", "vendor_id", "product_id", "dev_type", "parent_addr", "numa_node", "status", "instance"]))}
    pools = jrun(cli, "host", "pools")
    assert all(set(p) == {"vendor_id", "product_id", "numa_node", "dev_type", "tags", "count"} for p in pools)
    assert sum(p["count"] for p in pools) == len(topology)
    vf = next(d for d in topology if d["dev_type"] == "type-VF")
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps([{"name": "vf", "vendor_id": vf["vendor_id"], "product_id": vf["product_id"],
                                    "device_type": "type-VF", "physical_network": "physnet1"}]))
    claimed = jrun(cli, "host", "claim", "vm1", "--request", "vf:2", "--aliases", str(aliases))
    assert len(claimed) == 2
    assert {d["address"] for d in jrun(cli, "host", "devices", "--status", "claimed")} == set(claimed)
    cli("host", "claim", "vm2", "--request", "vf:99", "--aliases", str(aliases), expect=1)
    assert len(jrun(cli, "host", "devices", "--status", "claimed")) == 2  # nothing changed
    assert sorted(jrun(cli, "host", "free", "vm1")) == sorted(claimed)
    # a later sync reuses the stored device spec; sysfs of this very machine and a devices-json file work too
    assert jrun(cli, "host", "sync", "--libvirt", f"test://{xml}")["added"] == []
    cli("host", "sync", "--sysfs", "/sys")
    (tmp_path / "devices.json").write_text(json.dumps(topology))
    jrun(cli, "host", "sync", "--devices-json", str(tmp_path / "devices.json"))
    assert {d["address"] for d in jrun(cli, "host", "devices")} == {d["address"] for d in topology}


def test_demo_leaves_nothing_behind_but_its_state():
    # a short scratch TMPDIR of its own: the demo's sockets go under it, and a unix socket path has
    # at most 107 bytes (pytest's tmp_path, under an xdist worker's directory, is too deep)
    scratch = Path(tempfile.mkdtemp(prefix="kd-"))
    try:
        proc = subprocess.run([executable(), "--json", "demo"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TMPDIR": str(scratch)})
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        steps = {s["step"]: s["result"] for s in result["steps"]}
        assert "vfio-pci" in steps["claim a passthrough GPU from the example inventory (VM demo-gpu)"]
        assert "removed" in steps["hot remove one"]
        pid = int(steps["boot a disposable guest (TCG)"].split()[2].rstrip(","))
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert [p.name for p in scratch.iterdir()] == [Path(result["state_dir"]).name]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_the_pytest_plugin_gives_users_a_booted_guest(pytester):
    pytester.makepyfile("""
        import asyncio
        from qemu.qmp import QMPClient

        def test_user_suite(kvm_test_vm):
            async def add():
                qmp = QMPClient("user")
                await qmp.connect(str(kvm_test_vm.qmp_path))
                await qmp.execute("device_add", {"driver": "virtio-rng-pci", "id": "r", "addr": "0x9"})
                await qmp.disconnect()
            asyncio.run(add())
            kvm_test_vm.wait_guest_pci(lambda seen: "0000:00:09.0" in seen)
    """)
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)


def test_q35_plan_attach_same_slot_show_and_detach_through_the_cli(cli, tmp_path):
    U4, U5 = (str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000)) for n in (4, 5))
    rows = jrun(cli, "plan", "vm1", "--machine", "q35", "--hotplug-ports", "1", "--device", f"nic:{U1}:e1000e",
                "--device", f"rng:{U2}:virtio-rng-pci", "--device", f"rng:{U3}:virtio-rng-pci", "--group", f"{U2},{U3}")
    assert [(r["type"], r["bus"], r["function"]) for r in rows] == [
        ("port", "pcie.0", 0), ("port", "pcie.0", 1), ("port", "pcie.0", 2),
        ("nic", "pcie-port-1", 0), ("rng", "pcie-port-2", 0), ("rng", "pcie-port-2", 1),
    ]
    args = ["-nic", "none", *(a for r in rows for a in ("-device", r["arg"]))]
    with TestVM(tmp_path / "vm", machine="q35", extra_args=args) as vm:
        qmp = str(vm.qmp_path)
        added = jrun(cli, "attach", "vm1", "--qmp", qmp, "--same-slot", "--device", f"rng:{U4}:virtio-rng-pci",
                     "--device", f"test:{U5}:pci-testdev")
        assert [(d["uuid"], d["bus"], d["slot"], d["function"]) for d in added] == [
            (U4, "pcie-port-3", 0, 0), (U5, "pcie-port-3", 0, 1)
        ]
        shown = jrun(cli, "show", "vm1", "--qmp", qmp)
        assert shown["buses"]["pcie-port-3"][0] == "group" and shown["buses"]["pcie.0"][2] == "controller"
        assert " M" in cli("show", "vm1", "--qmp", qmp).stdout
        proc = cli("attach", "vm1", "--qmp", qmp, "--type", "rng", "--uuid", str(uuid.uuid4()),
                   "--driver", "virtio-rng-pci", expect=1)
        assert "NoHotplugPort" in proc.stderr and "--hotplug-ports" in proc.stderr
        removed = jrun(cli, "detach", "vm1", "--qmp", qmp, "--uuid", U5, "--timeout", "30")
        assert removed["result"] == "removed" and removed["ids"] == [f"rng-{U4[:8]}-pci-0", f"test-{U5[:8]}-pci-0"]
    cli("plan", "vm2", "--machine", "q35", "--device", f"nic:{U1}:e1000e:bus=x", expect=2)

"""README's first quick-start command runs the demo on a disposable VM; keep it working as written."""

import subprocess
import sys


def test_readme_demo_command_runs_the_whole_life_cycle(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvmslots", "--state", str(tmp_path / "s"), "demo"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for expected in ("plan 3 boot devices", "-device virtio-net-pci,id=nic-", "slot map before", "RRRROOO",
                     "hot add 2 devices", "slot map after", "removed (the guest ejected it", "vfio-pci,id=hostdev-",
                     "reconcile: records match QEMU", "shut the guest down", str(tmp_path / "s"),
                     "q35: plan", "pcie-root-port,id=pcie-port-1,bus=pcie.0,addr=0x2.0,multifunction=on",
                     "addr=0x0.1", "q35: hot add into a spare port", "behind pcie-port-3",
                     "q35: guest sees it: 0000:03:00.0", "q35: live-migrate to a new QEMU on this host",
                     "q35: the guest, now on the new QEMU, sees it: 0000:03:00.0",
                     "pcie-port-2 MRRR", "removed; pcie-port-3 is free again", "q35: shut the guest down"):
        assert expected in out.stdout, expected
    assert "." in out.stderr  # the progress indication while the guest boots

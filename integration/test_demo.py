"""README's first quick-start command runs the demo on a disposable VM; keep it working as written."""

import subprocess
import sys


def test_readme_demo_command_runs_the_whole_life_cycle(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvmslots", "--state", str(tmp_path / "s"), "demo"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for expected in ("plan 3 boot devices", "-device virtio-net-pci,id=nic-", "slot map before", "RRRROOO",
                     "hot add 2 devices", "slot map after", "removed (the guest ejected it", "vfio-pci,id=hostdev-",
                     "reconcile: records match QEMU", "shut the guest down", str(tmp_path / "s")):
        assert expected in out.stdout, expected
    assert "." in out.stderr  # the progress indication while the guest boots

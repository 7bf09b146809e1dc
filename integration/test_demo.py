"""README's first quick-start command runs the demo on a disposable VM; keep it working."""

import subprocess
import sys


def test_demo_runs_the_whole_life_cycle():
    out = subprocess.run([sys.executable, "-m", "kvmslots.demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "-device virtio-net-pci,id=nic-" in out.stdout
    assert "removed" in out.stdout and "unknown live devices ['stranger']" in out.stdout
    assert "demo done" in out.stdout

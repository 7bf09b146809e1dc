"""Python scripts run inside the passthrough guest, as a lifecycle manager on that host would run them.

Shared by the passthrough test modules: :func:`prelude` is the top of every script (kvmslots'
imports, the operator's device_spec and alias, ``step`` timing, sysfs helpers), and
:func:`run_py` runs ``prelude + body`` with the guest's python3 and returns the ``result`` dict
the script filled, recording the steps it timed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kvmslots.testvm import TestVM

_PRELUDE = r"""
import asyncio, json, os, shutil, subprocess, sys, time, uuid
from contextlib import contextmanager
from kvmslots import Monitor, Store, VMSpec, hot_add, hot_del, outgoing
from kvmslots.errors import KvmSlotsError, MigrationRefused
from kvmslots.passthrough import HostDevices, PassthroughSpec
from kvmslots.pci.binding import SysfsBinder
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.discovery import discover_sysfs
from kvmslots.pci.request import get_pci_requests_from_flavor, parse_aliases
from kvmslots.pci.tracker import PciDevTracker
from kvmslots.testvm import TestVM

BASE = {base!r}
SPEC = [{{"vendor_id": "1b36", "product_id": "0010"}}]  # nova.conf [pci] device_spec: every NVMe function
ALIASES = [{{"name": "nvmevf", "vendor_id": "1b36", "product_id": "0010", "device_type": "type-VF"}}]
os.makedirs(BASE, exist_ok=True)
result = {{"steps": {{}}}}

@contextmanager
def step(name):
    t = time.perf_counter()
    try:
        yield
    finally:
        result["steps"][name] = round(result["steps"].get(name, 0.0) + time.perf_counter() - t, 4)

def link(path):
    try:
        return os.path.basename(os.readlink(path))
    except FileNotFoundError:
        return None

def driver(address):
    return link(f"/sys/bus/pci/devices/{{address}}/driver")

def group_of(address):
    return link(f"/sys/bus/pci/devices/{{address}}/iommu_group")

def request(alias="nvmevf:1", aliases=ALIASES, policy=None):
    [req] = get_pci_requests_from_flavor({{"extra_specs": {{"pci_passthrough:alias": alias}}}},
                                         parse_aliases(aliases), policy)
    return req

def error_facts(exc):
    return {{"type": type(exc).__name__, "bases": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc), "facts": exc.facts()}}

subprocess.run(["modprobe", "-a", "vfio-pci", "vfio_iommu_type1"], check=True)
"""

_EPILOGUE = r"""
print("RESULT " + json.dumps(result))
"""


def prelude(base: str, extra: str = "") -> str:
    """The top of every script: shared helpers with ``BASE`` (the guest tmpfs directory of the
    module's state) set, then the module's own helpers (*extra*)."""
    return _PRELUDE.format(base=base) + extra


def run_py(
    vm: TestVM,
    top: str,
    name: str,
    body: str,
    tmp_path: Path,
    timings: dict[str, dict[str, float]],
    timeout: float = 180.0,
) -> dict[str, Any]:
    """Run *top* + *body* in the guest; return its RESULT, record (in *timings*) and print its step timings.

    A test's second script keeps both: the second's wall time is ``script_wall_2``.
    """
    started = time.perf_counter()
    output, status = vm.run_script(top + body + _EPILOGUE, timeout, interpreter="python3")
    wall = time.perf_counter() - started
    assert status == 0, output
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    steps = {**result["steps"], "script_wall": round(wall, 3)}
    print(f"\n[{name}] " + "  ".join(f"{k}={v:.3f}s" for k, v in steps.items()))
    if "error" in result:
        print(f"[{name}] error: {result['error']}")
    if name in timings:
        steps["script_wall_2"] = steps.pop("script_wall")
    timings.setdefault(name, {}).update(steps)
    (tmp_path / "timings.json").write_text(json.dumps(timings[name], indent=2))
    return result


def report_timings(title: str, workdir: Path, timings: dict[str, dict[str, float]]) -> None:
    """Write a module's step timings to ``timings.json`` in *workdir* and print them (``-s`` shows them)."""
    path = workdir / "timings.json"
    path.write_text(json.dumps(timings, indent=2))
    print(f"\n{title} timings (s), also in {path}:")
    for test, steps in timings.items():
        print(f"  {test:<12} " + "  ".join(f"{name}={seconds:.3f}" for name, seconds in steps.items()))

"""Fixtures that hand integration tests a real, disposable QEMU VM.

They deliberately FAIL (never skip) when QEMU or the test guest is missing:
a skipped hotplug test looks green while testing nothing. Install QEMU with
``apt-get install qemu-system-x86`` and build the guest with
``runtime/build-guest.sh`` (or ``kvmslots guest build``). Logs of each VM are kept in the test's
``tmp_path`` (qemu.log, console.log, qtest.log) for post-mortems.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmslots.testvm import TestVM


@pytest.fixture
def guest_vm(tmp_path: Path) -> Iterator[TestVM]:
    """A booted tiny Linux guest (TCG unless KVMSLOTS_ACCEL=kvm) that acknowledges ACPI unplug."""
    with TestVM(tmp_path, mode="guest") as vm:
        yield vm


@pytest.fixture
def qtest_vm(tmp_path: Path) -> Iterator[TestVM]:
    """A VM that runs no guest code; the test plays the guest through qtest."""
    with TestVM(tmp_path, mode="qtest") as vm:
        yield vm

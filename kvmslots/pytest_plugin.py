"""pytest plugin: disposable QEMU guests for a lifecycle manager's own CI.

Installed with kvmslots and registered through the ``pytest11`` entry point,
so a test suite only has to ask for the fixture::

    def test_my_hotplug_path(kvm_test_vm):
        my_manager.attach(qmp=kvm_test_vm.qmp_path, ...)
        kvm_test_vm.wait_guest_pci(lambda seen: "0000:00:04.0" in seen)

``kvm_test_vm`` is a booted tiny Linux guest (``-machine pc``, TCG unless
``KVMSLOTS_ACCEL=kvm``) that acknowledges ACPI hot-unplug; its QMP socket is
``kvm_test_vm.qmp_path`` and ``kvm_test_vm.run(cmd)`` runs a shell command in
it.  ``kvm_qtest_vm`` runs no guest code: the test plays (or withholds) the
guest's eject with ``acpi_eject(slot)``.  The guest files come from
``KVMSLOTS_GUEST_DIR`` or a checkout's ``runtime/out`` (``runtime/build-guest.sh``).

When QEMU or the guest files are missing the fixtures fail, they never skip:
a skipped hotplug test is green while testing nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .testvm import TestVM


@pytest.fixture
def kvm_test_vm(tmp_path: Path) -> Iterator[TestVM]:
    """A booted disposable guest with a QMP socket; stopped (and its QEMU gone) after the test."""
    with TestVM(tmp_path / "kvm-test-vm", mode="guest") as vm:
        yield vm


@pytest.fixture
def kvm_qtest_vm(tmp_path: Path) -> Iterator[TestVM]:
    """A VM that runs no guest code; the test plays the guest's ACPI eject, or withholds it."""
    with TestVM(tmp_path / "kvm-qtest-vm", mode="qtest") as vm:
        yield vm

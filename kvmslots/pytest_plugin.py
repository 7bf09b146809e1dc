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
guest's eject with ``acpi_eject(slot)``.

The guest is built once per machine (or CI cache) with ``kvmslots guest
build``: it downloads Debian's cloud kernel and busybox with ``apt-get
download`` and writes ``vmlinuz`` and ``initramfs.cpio.gz`` into
``$XDG_CACHE_HOME/kvmslots/guest`` (``~/.cache/kvmslots/guest``).  The fixtures
look in ``$KVMSLOTS_GUEST_DIR`` when it is set, else in a source checkout's
``runtime/out`` (developers), else in that per-user directory.

When QEMU or the guest files are missing the fixtures fail, they never skip:
a skipped hotplug test is green while testing nothing.  The failure names the
command to run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .errors import GuestFilesMissing
from .testvm import TestVM


@pytest.fixture
def kvm_test_vm(tmp_path: Path) -> Iterator[TestVM]:
    """A booted disposable guest with a QMP socket; stopped (and its QEMU gone) after the test."""
    try:
        vm = TestVM(tmp_path / "kvm-test-vm", mode="guest")
    except GuestFilesMissing as exc:
        # A setup step the user has not done: say what to run, without a traceback into kvmslots.
        pytest.fail(f"GuestFilesMissing: {exc}", pytrace=False)
    with vm:
        yield vm


@pytest.fixture
def kvm_qtest_vm(tmp_path: Path) -> Iterator[TestVM]:
    """A VM that runs no guest code; the test plays the guest's ACPI eject, or withholds it."""
    with TestVM(tmp_path / "kvm-qtest-vm", mode="qtest") as vm:
        yield vm

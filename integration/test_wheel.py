"""kvmslots as a new user gets it: the built wheel in a fresh venv, outside any checkout.

What a user's CI does, step by step: build the wheel, install it (and pytest)
into a new venv, run ``kvmslots guest build`` (the guest recipe ships with the
package and builds into ``$XDG_CACHE_HOME/kvmslots/guest``), then run their own
test file that asks for ``kvm_test_vm`` and ``kvm_qtest_vm``, from a directory
that is not the checkout. Before the guest is built, that same test file must
fail (never skip) and say which command to run.

Nothing here imports the checkout's kvmslots: every step runs the venv's
programs in subprocesses whose environment cannot reach the checkout
(no PYTHONPATH, no system site-packages, cwd outside the tree). The wheel is
built from a copy of the tree, so no ``build/`` is left in the checkout and no
stale ``build/lib`` can leak into the wheel. Each step's duration is printed
(``-s`` or the report of a failure shows it). On the machine this was written
on (2 cores, TCG) the module takes about 25 s: wheel 3 s, venv 3-4 s, install
3 s (from the machine's pip index and cache), guest build 6-7 s (including the
download of two .deb files, 27 MB, from a fast mirror; 2 s when up to date),
the user's tests 1 s without a guest and 3 s with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent

#: What a copy of the tree for the wheel leaves out: VCS data, caches, earlier builds, the checkout's guest.
_SKIP_NAMES = {".git", "build", "dist", "_build", "__pycache__", ".hypothesis", ".benchmarks"}
_SKIP_PATHS = {CHECKOUT / "runtime" / "out", CHECKOUT / "runtime" / "work"}

#: The user's own tests: one on a booted guest, one on a qtest VM. Only the plugin's fixtures are used.
USER_TESTS = '''
    """A lifecycle manager's own CI tests, using kvmslots' pytest fixtures."""

    import asyncio
    import sys

    from qemu.qmp import QMPClient

    import kvmslots

    RNG = "0000:00:06.0"


    def test_runs_the_installed_kvmslots():
        assert kvmslots.__file__.startswith(sys.prefix), (kvmslots.__file__, sys.prefix)


    async def qmp(vm):
        client = QMPClient("user-ci")
        await asyncio.wait_for(client.connect(str(vm.qmp_path)), 10)
        return client


    def test_guest_sees_a_hot_added_device(kvm_test_vm):
        async def add():
            client = await qmp(kvm_test_vm)
            try:
                await client.execute("device_add", {"driver": "virtio-rng-pci", "addr": "0x6", "id": "rng0"})
            finally:
                await client.disconnect()

        asyncio.run(add())
        seen = kvm_test_vm.wait_guest_pci(lambda devices: RNG in devices, timeout=20)
        assert 6 in kvm_test_vm.guest_pci_slots()
        assert RNG in seen


    def test_unplug_waits_for_the_guest_eject(kvm_qtest_vm):
        async def scenario():
            client = await qmp(kvm_qtest_vm)
            try:
                await client.execute("device_add", {"driver": "pci-testdev", "addr": "0x7", "id": "td0"})
                with client.listener("DEVICE_DELETED") as listener:
                    await client.execute("device_del", {"id": "td0"})
                    kvm_qtest_vm.acpi_eject(7)
                    event = await asyncio.wait_for(listener.get(), 10)
                return event["data"].get("device")
            finally:
                await client.disconnect()

        assert asyncio.run(scenario()) == "td0"
'''


@dataclass
class Venv:
    root: Path
    wheel: Path
    source: Path  # the copy of the tree the wheel was built from
    home: Path  # a scratch directory outside the checkout, for the user's files and caches
    timings: dict[str, float]

    @property
    def bin(self) -> Path:
        return self.root / "bin"


def run(
    cmd: list[str | Path], *, timings: dict[str, float], step: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run a step, time it, and fail with its output if it fails."""
    started = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd)
    timings[step] = time.monotonic() - started
    print(f"[{step}] {timings[step]:.1f}s: {' '.join(map(str, cmd))}")
    assert proc.returncode == 0, f"{step} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment with nothing that points at the checkout or configures pytest behind the user's back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST_", "KVMSLOTS_", "VIRTUAL_ENV"))}
    env.pop("XDG_CACHE_HOME", None)
    for name in ("KVMSLOTS_ACCEL", "KVMSLOTS_QEMU"):  # how QEMU runs is the machine's business, keep it
        if name in os.environ:
            env[name] = os.environ[name]
    env["HOME"] = str(home)  # ~/.cache/kvmslots/guest of this "user" is empty until they build
    env.update(extra)
    return env


def _skip(directory: str, names: list[str]) -> set[str]:
    here = Path(directory)
    return {
        name
        for name in names
        if name in _SKIP_NAMES
        or name.endswith((".egg-info", "_cache"))
        or ".sqlite3" in name
        or here / name in _SKIP_PATHS
    }


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """The wheel, built from a copy of this tree, installed with pytest into a fresh venv."""
    base = tmp_path_factory.mktemp("wheel")
    timings: dict[str, float] = {}
    source = base / "src"
    shutil.copytree(CHECKOUT, source, ignore=_skip, symlinks=True)
    wheels = base / "wheels"
    home = base / "home"
    home.mkdir()
    # pip's own settings (index, cache) are the machine's: keep HOME as is for the install steps.
    pip_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, source],
        timings=timings, step="wheel build", env=pip_env, cwd=base)  # fmt: skip
    (wheel,) = wheels.glob("kvmslots-*.whl")
    root = base / "venv"
    run([sys.executable, "-m", "venv", root], timings=timings, step="venv create", env=pip_env, cwd=base)
    run([root / "bin" / "python", "-m", "pip", "install", "-q", wheel, "pytest"],
        timings=timings, step="venv install", env=pip_env, cwd=base)  # fmt: skip
    return Venv(root, wheel, source, home, timings)


def test_the_wheel_has_every_module_and_the_guest_recipe(venv: Venv) -> None:
    with zipfile.ZipFile(venv.wheel) as wheel:
        shipped = set(wheel.namelist())
    package = venv.source / "kvmslots"
    modules = {path.relative_to(venv.source).as_posix() for path in package.rglob("*.py")}
    missing = sorted(modules - shipped)
    assert not missing, (
        f"the wheel lacks {missing}: a directory without __init__.py is not found by 'packages = find:'"
    )
    data = {"kvmslots/py.typed", "kvmslots/guest/build-guest.sh", "kvmslots/guest/init"}
    assert data <= shipped, f"not in setup.cfg [options.package_data]: {sorted(data - shipped)}"


def test_the_venv_runs_the_wheels_kvmslots(venv: Venv) -> None:
    probe = "import kvmslots, kvmslots.guest as g; print(kvmslots.__file__, g.BUILD_SCRIPT, g.INIT_SCRIPT)"
    proc = run([venv.bin / "python", "-c", probe], timings=venv.timings, step="probe",
               env=user_env(venv.home), cwd=venv.home)  # fmt: skip
    package, script, init = (Path(line) for line in proc.stdout.split())
    print("the venv's kvmslots:", package)
    assert package.is_relative_to(venv.root), f"{package} is not the wheel's (venv {venv.root})"
    assert not package.is_relative_to(CHECKOUT)
    assert script.is_file() and init.is_file() and script.is_relative_to(venv.root)
    assert not (package.parent.parent / "runtime").exists()  # nothing named runtime/ lands in site-packages
    help_text = run([venv.bin / "kvmslots", "guest", "build", "--help"], timings=venv.timings, step="help",
                    env=user_env(venv.home), cwd=venv.home).stdout  # fmt: skip
    assert "--force" in help_text and "DIR" in help_text


def test_user_ci_fails_until_the_guest_is_built_then_passes(venv: Venv) -> None:
    user = venv.home / "my-manager"
    (user / "tests").mkdir(parents=True)
    (user / "pytest.ini").write_text("[pytest]\naddopts = -ra\n")
    (user / "tests" / "test_hotplug.py").write_text(textwrap.dedent(USER_TESTS))
    cache = venv.home / "ci-cache"  # what the CI would persist between runs
    env = user_env(venv.home, XDG_CACHE_HOME=str(cache))
    pytest_cmd: list[str | Path] = [venv.bin / "python", "-m", "pytest", "-p", "no:cacheprovider", "tests"]

    # 1. No guest anywhere: the guest test fails (an error, not a skip), naming the command.
    started = time.monotonic()
    first = subprocess.run([str(c) for c in pytest_cmd], capture_output=True, text=True, env=env, cwd=user)
    venv.timings["external tests, no guest"] = time.monotonic() - started
    report = first.stdout + first.stderr
    assert first.returncode == 1, report
    assert "GuestFilesMissing" in report and "Build it with: kvmslots guest build" in report, report
    assert str(cache / "kvmslots" / "guest" / "vmlinuz") in report, report
    summary = report.strip().splitlines()[-1]
    assert "2 passed" in summary and "1 error" in summary and "skipped" not in summary, report

    # 2. The one command, with nothing but the installed package.
    built = run([venv.bin / "kvmslots", "guest", "build"], timings=venv.timings, step="guest build",
                env=env, cwd=user)  # fmt: skip
    guest_dir = cache / "kvmslots" / "guest"
    assert built.stdout.strip() == str(guest_dir), built.stdout
    assert (guest_dir / "vmlinuz").stat().st_size > 1_000_000
    assert (guest_dir / "initramfs.cpio.gz").stat().st_size > 100_000
    assert sorted(p.name for p in (cache / "kvmslots" / "guest-work").iterdir()) == ["debs"]  # only the cache stays
    again = run([venv.bin / "kvmslots", "guest", "build"], timings=venv.timings, step="guest build again",
                env=env, cwd=user)  # fmt: skip
    assert "up to date" in again.stderr, again.stderr

    # 3. The same test file passes now.
    second = run(pytest_cmd, timings=venv.timings, step="external tests", env=env, cwd=user)
    assert "3 passed" in second.stdout.strip().splitlines()[-1], second.stdout
    print("timings:", ", ".join(f"{step} {seconds:.1f}s" for step, seconds in venv.timings.items()))

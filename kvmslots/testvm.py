"""Disposable QEMU VMs for kvmslots' tests (and for users' own CI).

Why real VMs: PCI hot-unplug on a ``pc`` machine is a conversation. QMP
``device_del`` only *asks*; QEMU removes the device (and emits
``DEVICE_DELETED``) once the guest OS has acknowledged the ACPI eject. A
hotplug manager therefore cannot be tested against a mock or a paused QEMU:
removal would never complete. This module gives two kinds of throw-away VM:

* ``mode="guest"`` boots a tiny Linux (Debian's cloud kernel + a busybox
  initramfs, built by ``kvmslots guest build``) that really acknowledges
  ACPI unplug, and drives its shell over the serial console, so a test can
  also check what the guest sees in ``/sys/bus/pci/devices``.
* ``mode="qtest"`` runs no guest code at all; the test plays the guest through
  QEMU's qtest protocol. It can perform the guest's eject itself
  (:meth:`TestVM.acpi_eject`) or withhold it, to test an unplug the guest never
  acknowledges. (Debian's QEMU ships no ``qtest`` accelerator, so this mode is
  TCG with the CPUs stopped by ``-S``: no firmware or guest code ever runs.)

Both use TCG unless KVM is asked for (``accel="kvm"`` or ``KVMSLOTS_ACCEL=kvm``),
because nested KVM guests hang on the machines this project is built on.
Every VM is torn down on :meth:`TestVM.stop`, on garbage collection, at
interpreter exit, and - through ``PR_SET_PDEATHSIG`` - even when the Python
process is killed outright: a test run never leaves a QEMU behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kvmslots.errors import GuestBootTimeout, GuestFilesMissing, InvalidSlot, TestVMError
from kvmslots.guest import BUILD_COMMAND, GUEST_DIR_ENV, default_guest_dir

__all__ = [
    "TestVM",
    "find_guest_files",
    "qemu_binary",
    "parse_pci_addresses",
    "slots_on_bus",
    "KERNEL_NAME",
    "INITRAMFS_NAME",
]

KERNEL_NAME = "vmlinuz"
INITRAMFS_NAME = "initramfs.cpio.gz"
#: A source checkout's guest (``bash runtime/build-guest.sh``), looked in before the per-user one.
#: Only a checkout has ``runtime/build-guest.sh`` next to the package; an installed kvmslots has none.
_CHECKOUT_RUNTIME = Path(__file__).resolve().parent.parent / "runtime"

#: ACPI PCI hotplug eject register of the i440FX ``pc`` machine (0xae00 + 8).
PC_ACPI_EJECT_PORT = 0xAE08
_MODES = ("guest", "qtest")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
_STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
_PROBE_INTERVAL = 0.5  # seconds between readiness probes on the console

_PCI_ADDRESS = re.compile(r"([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")


# --- locating the pieces --------------------------------------------------------


def find_guest_files(guest_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Return ``(kernel, initramfs)`` of the test guest.

    Looked for in the first of: the argument, ``$KVMSLOTS_GUEST_DIR``; when
    neither is given, a source checkout's ``runtime/out`` (for developers, if
    it holds a guest), then the per-user ``$XDG_CACHE_HOME/kvmslots/guest``
    (``~/.cache/kvmslots/guest``), where ``kvmslots guest build`` puts it. A
    directory someone named explicitly is the only one looked in: it must not
    be silently replaced by another guest. The error names the command that
    builds the guest where it was looked for.
    """
    if guest_dir is not None:
        candidates, origin = [Path(guest_dir)], "the guest_dir argument"
    elif os.environ.get(GUEST_DIR_ENV):
        candidates, origin = [Path(os.environ[GUEST_DIR_ENV])], f"${GUEST_DIR_ENV}"
    else:
        candidates, origin = [default_guest_dir()], "the default location"
        if (_CHECKOUT_RUNTIME / "build-guest.sh").is_file() and (_CHECKOUT_RUNTIME / "out").is_dir():
            candidates.insert(0, _CHECKOUT_RUNTIME / "out")
    for directory in candidates:
        kernel, initramfs = directory / KERNEL_NAME, directory / INITRAMFS_NAME
        if kernel.is_file() and initramfs.is_file():
            return kernel, initramfs
    directory = candidates[-1]  # the one the build command writes when given no directory
    missing = [p for p in (directory / KERNEL_NAME, directory / INITRAMFS_NAME) if not p.is_file()]
    also = "".join(f"; also looked in {other}" for other in candidates[:-1])
    named = guest_dir is not None or bool(os.environ.get(GUEST_DIR_ENV))
    command = f"{BUILD_COMMAND} {shlex.quote(str(directory))}" if named else BUILD_COMMAND
    raise GuestFilesMissing(
        f"test guest not built: missing {', '.join(map(str, missing))} (from {origin}{also}). "
        f"Build it with: {command}"
    )


def qemu_binary() -> str:
    """Return the QEMU executable: ``$KVMSLOTS_QEMU`` or ``qemu-system-x86_64`` on PATH."""
    wanted = os.environ.get("KVMSLOTS_QEMU") or "qemu-system-x86_64"
    found = shutil.which(wanted)
    if found is None:
        source = "$KVMSLOTS_QEMU" if os.environ.get("KVMSLOTS_QEMU") else "PATH"
        raise TestVMError(
            f"QEMU not found: {wanted!r} (from {source}) is not an executable. "
            "Install it with: apt-get install qemu-system-x86"
        )
    return found


# --- pure helpers (unit tested without QEMU) --------------------------------------


def parse_pci_addresses(text: str) -> set[str]:
    """Pick the PCI addresses (``0000:00:05.0``) out of ``ls`` output.

    Anything else on the console (a prompt, a stray kernel line) is ignored
    rather than trusted, since the console is a shared byte stream.
    """
    return {word for word in text.split() if _PCI_ADDRESS.fullmatch(word)}


def slots_on_bus(addresses: Iterable[str], bus: int = 0, domain: int = 0) -> set[int]:
    """Slots of ``bus`` (in ``domain``) that hold at least one function."""
    slots = set()
    for address in addresses:
        match = _PCI_ADDRESS.fullmatch(address)
        if match and int(match[1], 16) == domain and int(match[2], 16) == bus:
            slots.add(int(match[3], 16))
    return slots


def _chardev_path(path: Path) -> str:
    """Quote a path for a QEMU ``key=value,...`` option (commas are doubled)."""
    return str(path).replace(",", ",,")


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` making the child get SIGKILL when its parent dies.

    prctl is resolved here, in the parent, so the child only makes one call.
    The death signal fires when the *thread* that forked exits: start VMs from
    a thread that outlives them (normally the main thread).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# --- cleanup state, kept apart from TestVM so weakref.finalize can own it -------------


@dataclass
class _Resources:
    proc: subprocess.Popen[bytes] | None = None
    sockets: list[socket.socket] = field(default_factory=list)
    socket_files: list[Path] = field(default_factory=list)
    private_dir: Path | None = None
    logs: list[IO[bytes]] = field(default_factory=list)  # open files to close


def _release(res: _Resources) -> None:
    """Tear everything down; safe on partial state and at interpreter exit."""
    for sock in res.sockets:
        with contextlib.suppress(OSError):
            sock.close()
    proc = res.proc
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for log in res.logs:
        log.close()
    for path in res.socket_files:
        path.unlink(missing_ok=True)
    if res.private_dir is not None:
        shutil.rmtree(res.private_dir, ignore_errors=True)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.replace("\r", "").splitlines()[-lines:]) or "(no output)"


# --- the VM -----------------------------------------------------------------------


class TestVM:
    """A disposable QEMU VM: `-machine pc`, TCG by default, QMP on a unix socket, never left behind.

    Tests talk QMP to :attr:`qmp_path` themselves (QEMU serves one QMP client
    at a time, so this class never holds that socket). Use it as a context
    manager or call :meth:`start`/:meth:`stop`. A VM is started at most once.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        mode: str = "guest",
        machine: str = "pc",
        accel: str | None = None,
        memory_mb: int = 256,
        extra_args: Sequence[str] = (),
        guest_dir: str | os.PathLike[str] | None = None,
        boot_timeout: float = 60.0,
    ) -> None:
        """Prepare (but do not start) a VM.

        ``workdir`` receives the logs (``qemu.log``, ``console.log``,
        ``qtest.log``); when None a private temporary directory is used and
        removed on :meth:`stop`. Sockets always live in a private 0700
        directory under the system temp dir, because unix socket paths are
        limited to 107 bytes and a caller's workdir may be deeper than that.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        if memory_mb < 16:
            raise ValueError(f"memory_mb too small: {memory_mb}")
        self.mode = mode
        self.machine = machine
        self.accel = accel or os.environ.get("KVMSLOTS_ACCEL") or "tcg"
        self.memory_mb = memory_mb
        self.extra_args = tuple(str(arg) for arg in extra_args)
        self.boot_timeout = boot_timeout
        self.kernel: Path | None = None
        self.initramfs: Path | None = None
        if mode == "guest":  # fail before creating anything
            self.kernel, self.initramfs = find_guest_files(guest_dir)

        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _release, self._res)
        private = Path(tempfile.mkdtemp(prefix="kvmslots-vm-"))  # mode 0700
        self._res.private_dir = private
        if workdir is None:
            self.workdir = private
        else:
            self.workdir = Path(workdir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = private / "qmp.sock"
        self.console_path = private / "console.sock"
        self.qtest_path = private / "qtest.sock"
        self._res.socket_files += [self.qmp_path, self.console_path, self.qtest_path]
        if len(os.fsencode(self.console_path)) > _SUN_PATH_MAX:
            self._finalizer()
            raise TestVMError(f"socket path too long for AF_UNIX: {self.console_path} (set TMPDIR shorter)")
        self.qemu_log_path = self.workdir / "qemu.log"
        self.console_log_path = self.workdir / "console.log"
        self.qtest_log_path = self.workdir / "qtest.log"

        self.pid: int | None = None  # kept after stop() so callers can check it is gone
        self.command: list[str] = []
        self._console: socket.socket | None = None
        self._console_buf = bytearray()
        self._console_log: IO[bytes] | None = None
        self._qtest: socket.socket | None = None
        self._qtest_buf = bytearray()
        self._tokens = itertools.count(1)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<TestVM {self.mode} {self.machine}/{self.accel} pid={self.pid} {state} {self.workdir}>"

    # --- lifecycle -----------------------------------------------------------------

    def qemu_command(self) -> list[str]:
        """The QEMU command line this VM runs (built fresh; for logs and debugging)."""
        cmd = [
            qemu_binary(),
            "-name", "kvmslots-testvm",
            "-machine", self.machine,
            "-accel", self.accel,
            "-m", str(self.memory_mb),
            "-no-user-config",
            "-no-reboot",
            "-display", "none",
            "-monitor", "none",
            "-qmp", f"unix:{_chardev_path(self.qmp_path)},server=on,wait=off",
        ]  # fmt: skip
        # QEMU's default devices stay: a default `pc` has the host bridge in
        # slot 0, PIIX3 ISA/IDE/ACPI in 1, VGA in 2 and an e1000 NIC in 3,
        # so the slots a test sees taken are the ones a real default VM has.
        if self.mode == "guest":
            assert self.kernel is not None and self.initramfs is not None
            cmd += [
                "-kernel", str(self.kernel),
                "-initrd", str(self.initramfs),
                "-append", "console=ttyS0 panic=-1 quiet",
                "-chardev", f"socket,id=ser,path={_chardev_path(self.console_path)},server=on,wait=off",
                "-serial", "chardev:ser",
            ]  # fmt: skip
        else:
            # -S: CPUs never run, so no firmware pokes the hardware behind the test's back.
            cmd += [
                "-S",
                "-qtest", f"unix:{_chardev_path(self.qtest_path)},server=on,wait=off",
                "-qtest-log", str(self.qtest_log_path),
            ]  # fmt: skip
        return cmd + list(self.extra_args)

    def start(self) -> TestVM:
        """Start QEMU and wait until the VM can be driven.

        Guest mode returns once the guest's shell answers on the console;
        qtest mode once the qtest and QMP sockets are up. Any failure stops
        the VM before the error propagates, so nothing is left running.
        """
        if not self._finalizer.alive:
            raise TestVMError("this TestVM was stopped; create a new one")
        if self._res.proc is not None:
            raise TestVMError("this TestVM is already started")
        try:
            self._launch()
            deadline = time.monotonic() + self.boot_timeout
            if self.mode == "guest":
                self._console = self._connect(self.console_path, deadline)
                self._wait_for_shell(deadline)
            else:
                self._qtest = self._connect(self.qtest_path, deadline)
            self._wait_for_file(self.qmp_path, deadline)
            for path in self._res.socket_files:  # QEMU creates them per umask; the dir is 0700 anyway
                if path.exists():
                    path.chmod(0o600)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL), reap it and remove sockets and private files.

        Idempotent. No QMP ``quit`` is sent: the caller may hold the one QMP
        connection, and a signal works even when QEMU is wedged.
        """
        self._console = self._qtest = None
        self._finalizer()

    def __enter__(self) -> TestVM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def is_running(self) -> bool:
        """Whether the QEMU process is alive."""
        proc = self._res.proc
        return proc is not None and proc.poll() is None

    def _launch(self) -> None:
        self.command = self.qemu_command()
        log = open(self.qemu_log_path, "ab")  # noqa: SIM115 - closed by _release
        self._res.logs.append(log)
        log.write(("$ " + shlex.join(self.command) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - needed for PR_SET_PDEATHSIG
        )
        self._res.proc = proc
        self.pid = proc.pid

    def _check_alive(self) -> None:
        proc = self._res.proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise TestVMError(
                f"QEMU exited (status {code}); its output ({self.qemu_log_path}):\n{_tail(self.qemu_log_path)}"
            )

    def _wait_for_file(self, path: Path, deadline: float) -> None:
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TestVMError(f"QEMU did not create {path} in time")
            time.sleep(0.01)

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        """Connect to a socket QEMU serves, retrying until QEMU has created it."""
        while True:
            self._check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise TestVMError(f"could not connect to QEMU's socket {path}") from None
                time.sleep(0.01)
                continue
            self._res.sockets.append(sock)
            return sock

    # --- guest mode: the serial console ---------------------------------------------------

    def _require(self, mode: str) -> None:
        if self.mode != mode:
            raise TestVMError(f"only available in {mode} mode (this VM is in {self.mode} mode)")
        if not self.is_running():
            raise TestVMError("the VM is not running")

    def _read_console(self, pattern: re.Pattern[bytes], deadline: float) -> re.Match[bytes] | None:
        """Read the console until ``pattern`` matches the buffer or the deadline passes.

        On a match, the buffer is consumed up to its end. Everything read is
        appended to ``console.log``.
        """
        sock = self._console
        assert sock is not None
        if self._console_log is None:
            self._console_log = open(self.console_log_path, "ab")  # noqa: SIM115 - closed by _release
            self._res.logs.append(self._console_log)
        while True:
            # Match a bytes copy: the match must survive trimming the buffer.
            match = pattern.search(bytes(self._console_buf))
            if match:
                del self._console_buf[: match.end()]
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(min(remaining, 0.2))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                self._check_alive()
                raise TestVMError("QEMU closed the serial console")
            self._console_log.write(data)
            self._console_log.flush()
            self._console_buf += data

    def _wait_for_shell(self, deadline: float) -> None:
        """Probe the console with markers until the shell answers one.

        Output from before we connected is lost (the socket is wait=off), so
        readiness can only be seen by asking. Probes sent while the kernel
        boots may be truncated or answered late; each has its own number, and
        :meth:`run` ignores everything before its own begin marker.
        """
        sent: set[bytes] = set()
        answer = re.compile(rb"@@(\d+)R\r?\n")
        while True:
            self._check_alive()
            token = next(self._tokens)
            sent.add(str(token).encode())
            assert self._console is not None
            self._console.sendall(f"echo @@$(({token}+0))R\n".encode())
            step = min(deadline, time.monotonic() + _PROBE_INTERVAL)
            while (match := self._read_console(answer, step)) is not None:
                if match[1] in sent:
                    return
            if time.monotonic() >= deadline:
                raise GuestBootTimeout(
                    f"the guest shell did not answer within {self.boot_timeout:g}s "
                    f"(accel {self.accel}). Console ({self.console_log_path}):\n"
                    f"{_tail(self.console_log_path)}\nQEMU output:\n{_tail(self.qemu_log_path, 10)}"
                )

    def run(self, command: str, timeout: float = 10.0, *, check: bool = False) -> str:
        """Run a shell command in the guest and return its output (stdout and stderr).

        The command is wrapped as ``echo @@$((N+0))B; eval '<command>'; echo
        @@$((N+0))E$?``: the terminal echoes the line back, but only the
        shell's expansion prints ``@@NB``/``@@NE``, so the output between them
        is the command's and nothing else. With ``check=True`` a non-zero
        exit status raises :class:`TestVMError`.
        """
        self._require("guest")
        assert self._console is not None
        token = next(self._tokens)
        line = f"echo @@$(({token}+0))B; eval {shlex.quote(command)}; echo @@$(({token}+0))E$?\n"
        self._console.sendall(line.encode())
        pattern = re.compile(rb"@@%dB\r?\n(.*?)@@%dE(\d+)\r?\n" % (token, token), re.DOTALL)
        match = self._read_console(pattern, time.monotonic() + timeout)
        if match is None:
            raise TestVMError(
                f"guest command {command!r} did not finish within {timeout:g}s; console so far:\n"
                + self._console_buf.decode(errors="replace")[-2000:]
            )
        output = match[1].decode(errors="replace").replace("\r\n", "\n")
        status = int(match[2])
        if check and status != 0:
            raise TestVMError(f"guest command {command!r} exited {status}: {output.strip()}")
        return output

    def guest_pci_devices(self) -> set[str]:
        """PCI functions the guest kernel knows, e.g. ``{"0000:00:05.0", ...}``."""
        return parse_pci_addresses(self.run("ls -1 /sys/bus/pci/devices", check=True))

    def guest_pci_slots(self, bus: int = 0) -> set[int]:
        """Slots of ``bus`` where the guest sees at least one function."""
        return slots_on_bus(self.guest_pci_devices(), bus)

    def wait_guest_pci(self, predicate: Callable[[set[str]], bool], timeout: float = 10.0) -> set[str]:
        """Poll the guest's PCI devices until ``predicate`` holds; return them.

        Needed because the guest handles hotplug asynchronously: QMP returns
        before the guest kernel has rescanned the bus.
        """
        deadline = time.monotonic() + timeout
        while True:
            devices = self.guest_pci_devices()
            if predicate(devices):
                return devices
            if time.monotonic() > deadline:
                raise TestVMError(
                    f"guest PCI devices did not reach the expected state in {timeout:g}s: {sorted(devices)}"
                )
            time.sleep(0.1)

    # --- qtest mode -----------------------------------------------------------------------

    def qtest(self, line: str, timeout: float = 5.0) -> str:
        """Send one qtest command and return its reply line (e.g. ``"OK"``).

        Asynchronous ``IRQ ...`` lines are skipped. A ``FAIL``/``ERR`` reply
        raises :class:`TestVMError`, since a test helper should fail loudly.
        """
        self._require("qtest")
        sock = self._qtest
        assert sock is not None
        if "\n" in line:
            raise ValueError("one qtest command per call")
        sock.sendall(line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._qtest_buf:
                raw, _, rest = self._qtest_buf.partition(b"\n")
                self._qtest_buf[:] = rest
                reply = raw.decode(errors="replace").strip()
                if reply.startswith("IRQ"):
                    continue
                if reply.startswith(("FAIL", "ERR")):
                    raise TestVMError(f"qtest {line!r}: {reply}")
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TestVMError(f"qtest {line!r}: no reply within {timeout:g}s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                self._check_alive()
                raise TestVMError("QEMU closed the qtest socket")
            self._qtest_buf += data

    def acpi_eject(self, slot: int) -> None:
        """Play the guest's ACPI eject of ``slot`` on bus 0 of the ``pc`` machine.

        Writes ``1 << slot`` to the PIIX4 hotplug eject register, as QEMU's
        own ``qpci_unplug_acpi_device_test`` does; QEMU then finishes a pending
        ``device_del`` and emits ``DEVICE_DELETED``.
        """
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= 31:
            raise InvalidSlot(f"slot must be an integer in 0..31, not {slot!r}")
        if not (self.machine == "pc" or self.machine.startswith("pc-i440fx")):
            raise TestVMError(f"acpi_eject knows the i440FX 'pc' machine only, not {self.machine!r}")
        self.qtest(f"outl {PC_ACPI_EJECT_PORT:#x} {1 << slot:#x}")

"""The test guests: where they live and how to build them (``kvmslots guest build``).

The recipe ships with the package: ``build-guest.sh`` and the guest's
``init`` sit next to this module (package data), so an installed kvmslots can
build its guest without a source checkout. The build downloads Debian's cloud
kernel and ``busybox-static`` with ``apt-get download`` (nothing is installed
on the host) and writes ``vmlinuz`` and ``initramfs.cpio.gz`` into a
directory, by default a per-user cache: ``$XDG_CACHE_HOME/kvmslots/guest``
(``~/.cache/kvmslots/guest``). :func:`kvmslots.testvm.find_guest_files` and the
pytest plugin look there after ``$KVMSLOTS_GUEST_DIR``. Downloaded packages are
kept in ``$XDG_CACHE_HOME/kvmslots/guest-work/debs``, so a rebuild (or a CI job
that caches ``~/.cache/kvmslots``) downloads nothing.

The second guest, for host PCI passthrough on a real kernel
(``TestVM(mode="passthrough")``), comes from the same recipe with
``--passthrough`` (:func:`build_passthrough_guest`, ``kvmslots guest build
--passthrough``): the same kernel, an ext4 root disk image with python3,
``qemu-system-x86_64``, ``nvme-cli`` and the vfio modules (Debian's packages
and all they depend on, about 135 packages, 50 MB to download once), in the
``passthrough`` subdirectory of the guest directory.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kvmslots.errors import GuestBuildFailed

if TYPE_CHECKING:  # the CLI imports this module, not the other way round
    from kvmslots.cli import Output

__all__ = [
    "BUILD_SCRIPT",
    "GUEST_DIR_ENV",
    "INIT_SCRIPT",
    "add_guest_parser",
    "build_guest",
    "build_passthrough_guest",
    "passthrough_dir",
    "cmd_guest_build",
    "default_guest_dir",
    "default_work_dir",
    "guest_dir",
]

#: The packaged recipe and the guest's /init (package data of ``kvmslots.guest``).
BUILD_SCRIPT = Path(__file__).resolve().parent / "build-guest.sh"
INIT_SCRIPT = BUILD_SCRIPT.parent / "init"
#: Names the guest directory explicitly; wins over every default.
GUEST_DIR_ENV = "KVMSLOTS_GUEST_DIR"
#: The command that builds the guest where kvmslots looks for it (error messages name it).
BUILD_COMMAND = "kvmslots guest build"
_OUTPUT_TAIL = 15  # lines of the recipe's output kept for an error message
#: The passthrough guest's subdirectory of a guest directory, and the files the recipe writes there.
PASSTHROUGH_SUBDIR = "passthrough"
_GUEST_FILES = ("vmlinuz", "initramfs.cpio.gz")
_PASSTHROUGH_FILES = ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4", "packages.txt")


def _cache_home() -> Path:
    """``$XDG_CACHE_HOME``, or ``~/.cache`` when it is unset or not absolute (as the XDG spec says)."""
    value = os.environ.get("XDG_CACHE_HOME", "")
    return Path(value) if os.path.isabs(value) else Path.home() / ".cache"


def default_guest_dir() -> Path:
    """The per-user guest directory: ``$XDG_CACHE_HOME/kvmslots/guest`` (``~/.cache/kvmslots/guest``)."""
    return _cache_home() / "kvmslots" / "guest"


def default_work_dir() -> Path:
    """Where the build keeps downloaded packages: ``$XDG_CACHE_HOME/kvmslots/guest-work``."""
    return _cache_home() / "kvmslots" / "guest-work"


def guest_dir() -> Path:
    """Where ``kvmslots guest build`` builds when not told: ``$KVMSLOTS_GUEST_DIR``, else :func:`default_guest_dir`.

    The same directory the test VMs look in first, so building without an
    argument always builds where the guest will be found.
    """
    value = os.environ.get(GUEST_DIR_ENV)
    return Path(value) if value else default_guest_dir()


def passthrough_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """Where the passthrough guest of guest directory ``directory`` (default :func:`guest_dir`) lives."""
    return Path(directory if directory is not None else guest_dir()).expanduser().absolute() / PASSTHROUGH_SUBDIR


def build_guest(
    directory: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    work_dir: str | os.PathLike[str] | None = None,
    progress: IO[str] | None = None,
) -> Path:
    """Build the test guest into ``directory`` and return it (absolute).

    ``directory`` defaults to :func:`guest_dir`; ``work_dir`` (the download
    cache) to :func:`default_work_dir`. Nothing is rebuilt while the outputs
    are newer than their inputs, unless ``force``. The recipe's output goes to
    ``progress`` line by line as it comes (the download takes a while), or
    nowhere when None. Needs ``bash``, ``apt-get`` with current package lists,
    ``dpkg``, ``cpio`` and ``gzip``; as root the image also gets a
    ``/dev/console``. Raises :class:`~kvmslots.errors.GuestBuildFailed`, with
    the end of the recipe's output, when the build does not produce both files.
    """
    target = Path(directory if directory is not None else guest_dir()).expanduser().absolute()
    _run_recipe(target, target, _GUEST_FILES, [], force=force, work_dir=work_dir, progress=progress)
    return target


def build_passthrough_guest(
    directory: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    work_dir: str | os.PathLike[str] | None = None,
    progress: IO[str] | None = None,
) -> Path:
    """Build the passthrough guest into ``<directory>/passthrough`` and return that subdirectory.

    ``directory`` is the guest directory, as for :func:`build_guest` (default
    :func:`guest_dir`): ``TestVM(mode="passthrough")`` looks in its
    ``passthrough`` subdirectory. Writes ``vmlinuz``, ``initramfs.cpio.gz``,
    ``rootfs.ext4`` (an ext4 image of about 250 MB, mostly sparse) and
    ``packages.txt`` (what the image holds). The first build downloads about
    135 Debian packages (50 MB) into ``work_dir``; a rebuild from the cache
    takes about 10 s, and nothing is rebuilt while everything is up to date.
    Needs, besides what :func:`build_guest` needs, ``dpkg-deb`` and
    ``mke2fs`` (e2fsprogs); no root privileges and nothing is mounted.
    Raises :class:`~kvmslots.errors.GuestBuildFailed` as :func:`build_guest` does.
    """
    target = Path(directory if directory is not None else guest_dir()).expanduser().absolute()
    _run_recipe(
        target, passthrough_dir(target), _PASSTHROUGH_FILES, ["--passthrough"],
        force=force, work_dir=work_dir, progress=progress, what="passthrough guest",
    )  # fmt: skip
    return passthrough_dir(target)


def _run_recipe(
    target: Path,
    built: Path,
    files: tuple[str, ...],
    options: list[str],
    *,
    force: bool,
    work_dir: str | os.PathLike[str] | None,
    progress: IO[str] | None,
    what: str = "test guest",
) -> None:
    """Run the recipe for guest directory ``target``; check that ``built`` holds ``files`` afterwards."""
    work = Path(work_dir if work_dir is not None else default_work_dir()).expanduser().absolute()
    bash = shutil.which("bash")
    if bash is None:
        raise GuestBuildFailed("building the test guest needs bash, which is not on PATH")
    if not BUILD_SCRIPT.is_file() or not INIT_SCRIPT.is_file():
        raise GuestBuildFailed(
            f"the guest recipe is missing from the installed package ({BUILD_SCRIPT.parent}): "
            "reinstall kvmslots"
        )
    command = [bash, str(BUILD_SCRIPT), "--work", str(work), *(["--force"] if force else []), *options, str(target)]
    tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL)
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise GuestBuildFailed(f"cannot run the guest recipe {BUILD_SCRIPT}: {exc}") from None
    with proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if progress is not None:
                progress.write(line)
                progress.flush()
        status = proc.wait()
    output = "\n".join(tail) or "(no output)"
    if status != 0:
        raise GuestBuildFailed(f"building the {what} into {built} failed (exit status {status}):\n{output}")
    missing = [name for name in files if not (built / name).is_file()]
    if missing:
        raise GuestBuildFailed(f"the guest recipe did not write {', '.join(missing)} into {built}:\n{output}")


# --- the `kvmslots guest` command ----------------------------------------------------


def add_guest_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``kvmslots guest build [DIR]`` on the CLI's subcommand action."""
    guest = sub.add_parser("guest", help="the tiny test guest that kvm_test_vm / TestVM boot")
    gsub = guest.add_subparsers(
        dest="guest_command", required=True, metavar="GUEST_COMMAND", parser_class=type(guest)
    )
    p = gsub.add_parser(
        "build",
        help="download Debian's cloud kernel and busybox (apt-get download) and build the guest's "
        "vmlinuz and initramfs.cpio.gz; prints the directory",
    )
    p.add_argument(
        "directory",
        nargs="?",
        metavar="DIR",
        help=f"where to write the guest (default ${GUEST_DIR_ENV}, else $XDG_CACHE_HOME/kvmslots/guest, "
        "i.e. ~/.cache/kvmslots/guest: where the test VMs look for it)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when the guest is up to date")
    p.add_argument(
        "--passthrough",
        action="store_true",
        help="build the passthrough guest instead (TestVM mode 'passthrough': an IOMMU, SR-IOV and vfio on a "
        "real kernel), into DIR/passthrough: the same kernel and an ext4 root disk with python3, QEMU and "
        "nvme-cli (about 135 Debian packages, 50 MB to download once)",
    )
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        help="cache of downloaded packages (default $XDG_CACHE_HOME/kvmslots/guest-work)",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="do not show the build's progress on stderr (errors still show)"
    )
    p.set_defaults(func=cmd_guest_build)


def cmd_guest_build(args: argparse.Namespace, store: None, out: Output) -> int:
    """``kvmslots guest build [--passthrough] [DIR]``: needs no state store (``store`` is None)."""
    build = build_passthrough_guest if getattr(args, "passthrough", False) else build_guest
    directory = build(
        args.directory,
        force=args.force,
        work_dir=args.work_dir,
        progress=None if args.quiet else sys.stderr,
    )
    kernel, initramfs = directory / "vmlinuz", directory / "initramfs.cpio.gz"
    facts = {"directory": str(directory), "kernel": str(kernel), "initramfs": str(initramfs)}
    if build is build_passthrough_guest:
        facts["rootfs"] = str(directory / "rootfs.ext4")
    out.emit(facts, str(directory))
    return 0

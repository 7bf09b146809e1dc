"""The embedded backend: one SQLite file per host, in a directory the caller chooses.

Why a database and not Ganeti's runtime file: several processes may work on
one VM at once (a boot, a hotplug, a reconcile), and each must see the slots
the others took.  Every change runs in a ``BEGIN IMMEDIATE`` transaction, which
takes SQLite's write lock before reading, so two processes can never both pick
the same free slot; a ``UNIQUE (vm, bus, slot)`` constraint backs that up.

The state directory is created 0700 and the database file 0600, and looser
modes found on them are tightened.  A new database is built under a
temporary name and linked into place only once its schema is committed, so
the state file either does not exist (a new store) or holds a schema: an
empty, truncated or foreign file is refused with
:class:`~kvmslots.errors.StateCorrupt`, never taken for a new store.  Reads run
in WAL read transactions and never wait for a writer.  The VM operation lock
is an ``flock`` on a 0600 file under ``locks/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sqlite3
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..devid import validate_vm_name
from ..errors import StateConflict, StateCorrupt, StateError
from .base import hold, hold_sync
from .schema import CREATE, SCHEMA_VERSION, SQLITE_MIGRATIONS
from .sql import SqlTransaction

__all__ = ["SQLiteBackend", "SQLiteTransaction", "DB_NAME"]

log = logging.getLogger(__name__)

DB_NAME = "kvmslots.sqlite3"


class SQLiteTransaction(SqlTransaction):
    """A transaction on the SQLite file: ``BEGIN IMMEDIATE`` already keeps every other writer out."""

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """One statement over many rows through ``sqlite3`` (which takes the ``?`` markers as written)."""
        self._conn.executemany(sql, rows)


class SQLiteBackend:
    """The state of one host in a SQLite file (see the module's docstring).

    Safe for several processes at once; one object is meant for one thread
    (or one asyncio loop), like the ``sqlite3`` connection it holds.  A
    transaction that returned survives a crash of the process;
    ``durable=True`` makes it survive a power loss too, at the cost of an
    fsync per commit.
    """

    def identity(self) -> str:
        """This database among all others: the host and the file (device and inode, which a rename keeps)."""
        info = os.stat(self.path)
        return f"sqlite:{socket.gethostname()}:{info.st_dev}:{info.st_ino}"

    def __init__(self, state_dir: str | os.PathLike[str], *, timeout: float = 60.0, durable: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.location = str(self.path)
        try:
            _private_dir(self.state_dir)
            if not _existing_file(self.path):
                _create_database(self.path)
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            # WAL + NORMAL: every committed transaction survives a crash of the process (what the
            # tests check); only a power loss may roll back the last ones, and a power loss also
            # ends every VM they were about.  durable=True fsyncs each commit (about 200 us more).
            self._conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            version = self._schema_version()
            if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # an old file: reads need WAL
                with contextlib.suppress(sqlite3.OperationalError):  # another process may hold it now
                    self._conn.execute("PRAGMA journal_mode = WAL")
        except StateError:
            self._close_quietly()
            raise
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise StateCorrupt(
                f"State file {self.path} is not a readable kvmslots database ({exc}); refusing to treat it as a "
                "new store. Restore it from a backup, or move it away (with its -wal and -shm files) to start from "
                "nothing.",
                str(self.path),
            ) from exc
        except (OSError, sqlite3.Error) as exc:
            self._close_quietly()
            raise StateError(f"Cannot open the state store {self.path}: {exc}") from exc
        if version != SCHEMA_VERSION:
            self._upgrade()

    def _close_quietly(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()

    def _schema_version(self) -> int:
        """The schema version of an existing file, read without taking the write lock."""
        self._conn.execute("BEGIN")
        try:
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            has_vms = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'vms'"
            ).fetchone() is not None
        finally:
            self._conn.execute("COMMIT")
        if not has_vms or version < 1:
            raise StateCorrupt(
                f"State file {self.path} is not a kvmslots state (no schema, version {version}); refusing to "
                "treat it as a new store. Restore it from a backup, or move it away (with its -wal and -shm files) "
                "to start from nothing.",
                str(self.path),
            )
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path} has schema version {version}; this kvmslots knows up to {SCHEMA_VERSION}")
        return version

    def _upgrade(self) -> None:
        """Bring an older schema up to date in place, in one write transaction."""
        with self.transaction() as txn:
            version = int(txn.execute("PRAGMA user_version").fetchone()[0])  # another process may have done it
            while version < SCHEMA_VERSION:
                for statement in SQLITE_MIGRATIONS[version]:
                    txn.execute(statement)
                version += 1
                log.info("State store %s upgraded to schema version %d", self.path, version)
            txn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database connection (VM locks are file locks of their own, released when their ``with``
        blocks end)."""
        self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SQLiteTransaction]:
        """A write transaction: the database is locked for writers until it ends.

        SQLite's own errors come out typed: a broken constraint as
        :class:`StateConflict`, anything else (busy past the timeout, a
        corrupt file) as :class:`StateError`.
        """
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield SQLiteTransaction(self._conn, write=True)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            raise StateConflict(f"The change contradicts the stored state: {exc}") from exc
        except sqlite3.Error as exc:
            raise StateError(f"State store {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def reading(self) -> Iterator[SQLiteTransaction]:
        """A read transaction: one consistent snapshot that never waits for a writer (WAL).

        For looking only (``show``, ``export``): writing through it is an error.
        """
        try:
            self._conn.execute("BEGIN")
            try:
                yield SQLiteTransaction(self._conn, write=False)
            finally:  # a read commits nothing, not even a write made through it by mistake
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StateError(f"State store {self.path}: {exc}") from exc

    # -- the VM operation lock ---------------------------------------------------------
    def _lock_path(self, vm: str) -> Path:
        return self.state_dir / "locks" / f"{validate_vm_name(vm)}.lock"

    def _try_lock(self, vm: str) -> int:
        """One attempt at the VM's lock: the descriptor holding it, or BlockingIOError if taken.

        The file is removed when the lock is released, so a holder may unlink
        it while we wait on it: a lock taken on a file that is no longer at
        the path is dropped and taken again on the current one.
        """
        path = self._lock_path(vm)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:  # first lock in this state dir
                path.parent.mkdir(mode=0o700, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
            os.close(fd)

    def _unlock(self, vm: str, fd: int) -> None:
        """Remove the lock file while still holding it (no file is left behind), then release."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path(vm))
        finally:
            os.close(fd)

    def vm_lock_sync(self, vm: str, timeout: float = 60.0) -> contextlib.AbstractContextManager[None]:
        """:meth:`vm_lock` for synchronous callers (define, delete and import of a VM)."""
        return hold_sync(vm, timeout, lambda: self._try_lock(vm), lambda fd: self._unlock(vm, fd))

    def vm_lock(self, vm: str, timeout: float = 60.0) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the VM's operation lock (an ``flock`` on a 0600 file in the state dir).

        The kernel drops the lock when its holder dies, so a crashed process
        never leaves the VM locked; a process that ends normally, successful
        or not, leaves no lock file behind.
        """
        return hold(vm, timeout, lambda: self._try_lock(vm), lambda fd: self._unlock(vm, fd))

def _private_dir(path: Path) -> None:
    """Create the state dir 0700; an existing one must be a directory of ours (not a symlink),
    and a looser mode on it (or on its lock directory) is tightened to 0700."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"State directory {path} exists and is not a directory") from None
        if info.st_uid != os.geteuid():
            raise StateError(f"State directory {path} belongs to uid {info.st_uid}, not to us") from None
        _tighten(path, info, 0o700)
        locks = path / "locks"
        with contextlib.suppress(FileNotFoundError):
            info = locks.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise StateError(f"{locks} is not a directory of ours") from None
            _tighten(locks, info, 0o700)


def _tighten(path: Path, info: os.stat_result, mode: int) -> None:
    """Take away what *mode* does not grant (README promises 0700 dirs and 0600 files)."""
    if stat.S_IMODE(info.st_mode) & ~mode:
        log.warning("Tightening %s from %o to %o", path, stat.S_IMODE(info.st_mode), mode)
        os.chmod(path, mode)  # lstat said: not a symlink


def _existing_file(path: Path) -> bool:
    """Is there a state file?  It (and its WAL files) must be a regular file of ours, and is made
    0600 if it was looser.  Only a missing file means a new store; an empty one is refused."""
    _remove_stale_temporaries(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        left = [side.name for side in _side_files(path) if os.path.lexists(side)]
        if left:  # SQLite would replay an old WAL into a brand-new database
            raise StateCorrupt(
                f"State file {path} is missing but its {' and '.join(left)} {'are' if len(left) > 1 else 'is'} "
                "still there (the file was moved without them?); refusing to start a new store from them. "
                "Put the file back, or move all of them away together to start from nothing.",
                str(path),
            ) from None
        return False
    if not stat.S_ISREG(info.st_mode):
        raise StateError(f"State file {path} is not a regular file (a symlink or a device?)")
    if info.st_uid != os.geteuid():
        raise StateError(f"State file {path} belongs to uid {info.st_uid}, not to us")
    if info.st_size == 0:
        raise StateCorrupt(
            f"State file {path} is empty (truncated?); refusing to treat it as a new store, which would "
            "forget every slot assignment. Restore it from a backup, or move it away together with its -wal and "
            "-shm files to start from nothing.",
            str(path),
        )
    _tighten(path, info, 0o600)
    for side in _side_files(path):
        with contextlib.suppress(FileNotFoundError):
            side_info = side.lstat()
            if stat.S_ISREG(side_info.st_mode) and side_info.st_uid == os.geteuid():
                _tighten(side, side_info, 0o600)
    return True


def _side_files(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


#: A temporary database older than this was left by a process that died while creating the store.
_STALE_TEMPORARY = 600.0


def _remove_stale_temporaries(path: Path) -> None:
    """Remove what a process that died inside :func:`_create_database` left: a half-built
    database, or a second name (hard link) of the live one, which must never be opened."""
    now = time.time()
    try:
        live = path.lstat()
    except FileNotFoundError:
        live = None
    for leftover in path.parent.glob(f".{path.name}.*.new*"):
        with contextlib.suppress(OSError):
            info = leftover.lstat()
            same = live is not None and (info.st_dev, info.st_ino) == (live.st_dev, live.st_ino)
            if same or now - info.st_mtime > _STALE_TEMPORARY:  # a second name of the live file: always
                leftover.unlink()


def _create_database(path: Path) -> None:
    """Build a new database with its schema under a temporary name, then link it into place.

    So the state file is never seen without its schema (an empty file at the
    path is therefore always damage, never "new").  Two processes creating the
    store at once: the first link wins and the other opens that file.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{DB_NAME}.", suffix=".new", dir=path.parent)  # 0600
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in CREATE:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: open theirs
        except OSError:  # a file system without hard links: a rename, unless the file appeared meanwhile
            if not os.path.lexists(path):
                os.rename(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

"""The server backend: many hosts' state in one PostgreSQL database (psycopg 3).

Selected by a ``postgresql://`` URL.  Why psycopg 3 directly and not
SQLAlchemy Core with Alembic: measured on the same machine, a slot
reservation costs ~230 us through psycopg and ~500 us through SQLAlchemy
Core, the schema is one short list of portable statements shared with SQLite
(:mod:`kvmslots.storage.schema`), and migrations are a dict of statements
applied under a lock; Alembic would bring a second migration history for
what SQLite already does with ``user_version``.  psycopg is imported only
when a PostgreSQL URL is opened, so the embedded default does not pay for it.

How races are kept out without SQLite's database-wide write lock:

* A write transaction that touches a VM first takes a transaction-scoped
  advisory lock on that VM's name, so two writers of one VM (on one host or
  on two) run one after the other, and each sees what the other committed
  (READ COMMITTED reads the latest commit after the lock is granted).  Writers
  of different VMs never wait for each other.  ``UNIQUE (vm, bus, slot,
  function)`` backs this up.
* A tracker operation locks its own host's row in ``pci_hosts`` (``SELECT
  ... FOR UPDATE``): hosts never block each other's syncs and claims.
* The VM operation lock (held from a hot add's intent to its verification)
  is a session-level advisory lock: held on the server, by this connection,
  and released by the server if the process or its host dies.  While such a
  lock is held the connection is never silently replaced: losing it is a
  :class:`~kvmslots.errors.StoreUnavailable`, because the lock went with it.

Reads run in ``REPEATABLE READ READ ONLY`` transactions: one snapshot, no
waiting.  A server that cannot be reached is a
:class:`~kvmslots.errors.StoreUnavailable` naming the URL (without its
password); nothing falls back to SQLite.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import urllib.parse
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from ..devid import validate_vm_name
from ..errors import StateConflict, StateError, StoreUnavailable, VMBusy
from .base import hold, hold_sync
from .schema import COMMON_MIGRATIONS, CREATE, SCHEMA_VERSION
from .sql import SqlTransaction

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresBackend", "PostgresTransaction", "is_postgres_url", "redact"]

log = logging.getLogger(__name__)

#: Upgrades in place, from the version in the key to the next one (version 4 is the first here).
PG_MIGRATIONS: dict[int, list[str]] = dict(COMMON_MIGRATIONS)
_SCHEMA_TABLE = "CREATE TABLE kvmslots_schema (version INTEGER NOT NULL)"


def is_postgres_url(location: object) -> bool:
    """Does *location* name a PostgreSQL database (a ``postgresql://`` or ``postgres://`` URL) rather than a
    state directory?  Anything but text does not."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL as messages may show it: a password, in the user part or in the query, replaced by ``***``."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def _key(kind: str, name: str) -> int:
    """A 64-bit advisory lock key for (kind, name), in a namespace no other program is likely to use."""
    digest = hashlib.blake2b(f"kvmslots:{kind}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """``?`` markers as psycopg's ``%s`` (kvmslots' SQL has no literal ``?`` or ``%``)."""
    return sql.replace("?", "%s")


class PostgresTransaction(SqlTransaction):
    """A transaction on the server; see the module's docstring for what it locks."""

    def __init__(self, conn: Any, *, write: bool) -> None:
        super().__init__(conn, write=write)
        self._guarded: set[str] = set()

    def _sql(self, sql: str) -> str:
        return _pg(sql)

    def _guard_vm(self, vm: str) -> None:
        if vm not in self._guarded:
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_key("vm-write", vm),))
            self._guarded.add(vm)

    def _lock_host_row(self) -> str:
        return " FOR UPDATE" if self._write else ""

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """One statement (written with ``?``) over many rows, in one psycopg ``executemany``."""
        with self._conn.cursor() as cur:
            cur.executemany(_pg(sql), list(rows))

    def mark_synced(self, node: str, when: float) -> None:
        """A sync that changed nothing commits without waiting for the WAL flush: losing a last-sync
        time in a server crash costs nothing, and a steady sync then costs no fsync."""
        if not self.wrote_host:
            self._conn.execute("SET LOCAL synchronous_commit = off")
        super().mark_synced(node, when)


class PostgresBackend:
    """Slot records and host inventories in a PostgreSQL database.

    One object holds one connection and is meant for one thread (or one
    asyncio loop), as the SQLite backend.  *timeout* bounds how long a
    writer waits for another writer's lock before the operation fails.
    """

    def __init__(self, url: str, *, timeout: float = 60.0, durable: bool = False) -> None:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - the extra is missing
            raise StateError(
                "A PostgreSQL state needs psycopg 3: pip install 'kvmslots[postgres]'"
            ) from None
        self._psycopg = psycopg
        self.url = url
        self.location = redact(url)
        self.timeout = timeout
        self._held: set[str] = set()
        self._conn: psycopg.Connection[Any] | None = None
        self._connect()
        self._ensure_schema()

    # -- connection ---------------------------------------------------------------------
    def _connect(self) -> "psycopg.Connection[Any]":
        import psycopg  # already imported by __init__: a dictionary lookup

        try:
            params: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
            if "application_name" not in psycopg.conninfo.conninfo_to_dict(self.url):
                params["application_name"] = "kvmslots"  # the URL's own name wins (psycopg's keywords would)
            conn: psycopg.Connection[Any] = psycopg.connect(self.url, **params)
            # set here, not as a connection 'options': that would replace the URL's own options
            conn.execute(f"SET lock_timeout = {int(self.timeout * 1000)}")
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"Cannot reach the state database {self.location}: {' '.join(str(exc).split())}", self.location
            ) from None
        self._conn = conn
        return conn

    def _connection(self) -> "psycopg.Connection[Any]":
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if self._held:
            raise StoreUnavailable(
                f"The connection to {self.location} was lost while holding the lock of VM(s) "
                f"{', '.join(sorted(self._held))}; the server released it, so the operation cannot go on safely",
                self.location,
            )
        log.warning("Reconnecting to the state database %s", self.location)
        return self._connect()

    def identity(self) -> str:
        """This database among all others: the cluster's system identifier, the database and the schema."""
        try:
            row = self._connection().execute(
                "SELECT (SELECT system_identifier FROM pg_control_system()), current_database(), current_schema()"
            ).fetchone()
        except self._psycopg.Error as exc:
            raise self._unavailable(exc) from None
        assert row is not None
        return f"postgresql:{row[0]}/{row[1]}/{row[2]}"

    def close(self) -> None:
        """Close the connection; the server releases every VM lock it held."""
        if self._conn is not None:
            self._conn.close()

    # -- schema ---------------------------------------------------------------------------
    def _schema_version(self, conn: "psycopg.Connection[Any]") -> int | None:
        # pg_tables is read with this statement's snapshot (to_regclass would go through the
        # catalog cache, which an advisory lock does not refresh: it can miss a table just created)
        row = conn.execute(
            "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() AND tablename = 'kvmslots_schema'"
        ).fetchone()
        if row is None:
            return None
        found = conn.execute("SELECT version FROM kvmslots_schema").fetchone()
        return int(found[0]) if found else None

    def _ensure_schema(self) -> None:
        """Create the schema in an empty database, or upgrade an older one in place, under a lock."""
        psycopg = self._psycopg
        conn = self._connection()
        try:
            if self._schema_version(conn) == SCHEMA_VERSION:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_key("schema", ""),))
                version = self._schema_version(conn)  # another process may have done it meanwhile
                if version is None:
                    for statement in CREATE:
                        conn.execute(statement)
                    conn.execute(_SCHEMA_TABLE)
                    conn.execute("INSERT INTO kvmslots_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
                    log.info("Created the kvmslots schema (version %d) in %s", SCHEMA_VERSION, self.location)
                    return
                if version > SCHEMA_VERSION:
                    raise StateError(
                        f"{self.location} has schema version {version}; this kvmslots knows up to {SCHEMA_VERSION}"
                    )
                while version < SCHEMA_VERSION:
                    for statement in PG_MIGRATIONS[version]:
                        conn.execute(statement)
                    version += 1
                    log.info("State database %s upgraded to schema version %d", self.location, version)
                conn.execute("UPDATE kvmslots_schema SET version = %s", (SCHEMA_VERSION,))
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        except psycopg.Error as exc:
            raise StateError(f"Cannot prepare the state database {self.location}: {exc}") from exc

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        locks = (
            f"; the lock of VM(s) {', '.join(sorted(self._held))} went with the connection"
            if self._held else ""
        )
        return StoreUnavailable(
            f"Lost the state database {self.location} ({' '.join(str(exc).split())}); the server rolled back "
            f"the unfinished transaction{locks}", self.location,
        )

    # -- transactions ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _run(self, begin: str, write: bool) -> Iterator[PostgresTransaction]:
        psycopg = self._psycopg
        conn = self._connection()
        try:
            conn.execute(begin)
            try:
                yield PostgresTransaction(conn, write=write)
            except BaseException:
                if not conn.broken:
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT" if write else "ROLLBACK")
        except psycopg.errors.IntegrityError as exc:
            raise StateConflict(f"The change contradicts the stored state: {exc}") from exc
        except psycopg.errors.LockNotAvailable as exc:
            raise VMBusy(f"Another writer held the state in {self.location} for more than {self.timeout:g}s") from exc
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from exc
        except psycopg.Error as exc:
            raise StateError(f"State database {self.location}: {exc}") from exc

    def transaction(self) -> contextlib.AbstractContextManager[PostgresTransaction]:
        """A write transaction; it waits only for writers of the same VMs or host it touches."""
        return self._run("BEGIN", write=True)

    def reading(self) -> contextlib.AbstractContextManager[PostgresTransaction]:
        """A read transaction: one consistent snapshot that never waits for a writer."""
        return self._run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", write=False)

    # -- the VM operation lock ------------------------------------------------------------
    def _try_lock(self, vm: str) -> None:
        """One attempt at the VM's advisory lock; BlockingIOError if anyone (this object included) holds it."""
        vm = validate_vm_name(vm)
        if vm in self._held:
            raise BlockingIOError(vm)
        try:
            row = self._connection().execute("SELECT pg_try_advisory_lock(%s)", (_key("vm-op", vm),)).fetchone()
        except self._psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        if not row or not row[0]:
            raise BlockingIOError(vm)
        self._held.add(vm)

    def _unlock(self, vm: str) -> None:
        self._held.discard(vm)
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return  # the server dropped the lock with the session
        with contextlib.suppress(self._psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock(%s)", (_key("vm-op", vm),))

    def vm_lock_sync(self, vm: str, timeout: float = 60.0) -> contextlib.AbstractContextManager[None]:
        """:meth:`vm_lock` for synchronous callers (define, delete and import of a VM)."""
        return hold_sync(vm, timeout, lambda: self._try_lock(vm), lambda _: self._unlock(vm))

    def vm_lock(self, vm: str, timeout: float = 60.0) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the VM's operation lock: a session advisory lock, so no other process on any host
        can plan or hot-plug the VM meanwhile; the server drops it if this process dies."""
        return hold(vm, timeout, lambda: self._try_lock(vm), lambda _: self._unlock(vm))

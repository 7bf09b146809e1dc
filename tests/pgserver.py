"""A real PostgreSQL server for the tests, and a private schema per test.

``KVMSLOTS_TEST_DATABASE_URL`` names a server to use (``.ci/run`` starts a
throwaway cluster and sets it); without it, the session starts its own
throwaway cluster with ``.ci/pg-cluster`` (Debian's ``postgresql`` package,
run as an unprivileged user, on a unix socket only) and removes it at the
end.  A missing server is a failure, never a skip: a contract suite that
silently ran on one backend would prove nothing about the other.

Each test gets a schema of its own (``search_path`` in the URL), so tests
never see each other's rows and a test's database starts empty, as a new
SQLite file does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.parse
import uuid
from pathlib import Path
from typing import Iterator

import pytest

URL_ENV = "KVMSLOTS_TEST_DATABASE_URL"
CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "pg-cluster"


def start_cluster() -> tuple[str, str]:
    """Start a throwaway cluster: (its URL, its directory)."""
    directory = tempfile.mkdtemp(prefix="kvmslots-pg-")  # under /tmp: the server's user must reach it
    try:
        done = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "start", directory], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(f"Could not start a throwaway PostgreSQL cluster: {exc}", pytrace=False)
    if done.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(
            "The PostgreSQL backend's tests need a PostgreSQL server: install Debian's postgresql package "
            f"(bash .ci/install does) or set {URL_ENV}.\n{done.stderr.strip()}",
            pytrace=False,
        )
    return done.stdout.strip(), directory


def stop_cluster(directory: str) -> None:
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", directory], capture_output=True, timeout=120)


def with_schema(url: str, schema: str) -> str:
    """*url* with ``search_path`` set to *schema* (kept in the URL, so subprocesses get it too).

    Appended as text: ``urllib.parse.urlunsplit`` would turn ``postgresql:///db`` into
    ``postgresql:/db``, which is no longer a URL at all.
    """
    option = urllib.parse.quote(f"-csearch_path={schema}", safe="")
    return f"{url}{'&' if '?' in url else '?'}options={option}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    given = os.environ.get(URL_ENV)
    if given:
        yield given
        return
    url, directory = start_cluster()
    try:
        yield url
    finally:
        stop_cluster(directory)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """The URL of an empty schema of the test server, dropped after the test."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(pg_server, schema)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def state_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's state lives: a new SQLite directory, or an empty PostgreSQL schema (the contract
    suite runs on both)."""
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return str(request.getfixturevalue("pg_url"))

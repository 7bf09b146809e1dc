"""The storage backends: PostgreSQL against SQLite per host, the cluster view at 1000 hosts,
and SQLite through the storage interface against the code before it.

1. Per-host operations on both backends, blocks alternating between them:
   the store work of a hot add without QEMU (``vm_lock``, the reservation
   transaction of :mod:`kvmslots.hotplug.add` — VM, controllers and devices
   read, topology placement, ``add_device`` as ``attaching`` — then
   ``set_state`` ``attached``), a steady tracker sync of 4096 VFs (the same
   list again), claim+allocate of one VF through a flavor alias, and free.
   Each is printed against its own floor (a bare ``BEGIN IMMEDIATE; INSERT;
   COMMIT`` on a SQLite file configured as the backend's, a bare ``BEGIN;
   INSERT; COMMIT`` through psycopg on the same server) and as PG/SQLite.
   The PostgreSQL lines also say how many statements an operation sends and
   how much of its time is spent inside psycopg (server, socket, fsync)
   rather than in Python.
2. The cluster view over 1000 hosts x 64 devices in one PostgreSQL database
   (rows copied, in SQL, from one host a real tracker wrote): ``hosts_for``
   a ``gpu:2`` flavor and ``cluster_pools``, split into the database reads
   and the Python that builds and fits pools; a profile if ``hosts_for``
   misses 100 ms.
3. SQLite before the interface: the same SQLite operations with the code
   of :data:`OLD_COMMIT` (a ``git worktree`` made and removed by the run)
   and with this tree, each in a subprocess that imports only that tree's
   ``kvmslots``.  Both subprocesses stay up and run short blocks on command,
   old and new alternating (old first, then new first, ...), so that bursts
   of other load hit both sides alike; printed new/old (target <= 1.1x),
   with the median of the per-block-pair ratios and the CPU-time ratio.

PostgreSQL: ``KVMSLOTS_BENCH_DATABASE_URL``, else ``KVMSLOTS_TEST_DATABASE_URL``;
if neither is set or answers, a throwaway cluster is started with
``.ci/pg-cluster`` (and stopped).  Every run works in databases of its own
(``CREATE DATABASE``: the URL's user needs that right), dropped at the end, so
nothing depends on how the backend treats a ``search_path`` in the URL and the
cluster's statistics (``ANALYZE``) are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from kvmslots import Device, DeviceSpec, DeviceState, Store, VMSpec, plan_boot
from kvmslots.hotplug.add import _reserve
from kvmslots.hotplug.common import forget_all
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.request import InstancePciRequest, get_pci_requests_from_flavor, parse_aliases
from kvmslots.pci.tracker import PciDevTracker
from kvmslots.pciview import PciFunction, PciOccupancy

from .common import emit, note, timed
from .tracker import _topology

REPO = Path(__file__).resolve().parent.parent
URL_ENVS = ("KVMSLOTS_BENCH_DATABASE_URL", "KVMSLOTS_TEST_DATABASE_URL")
#: The commit before the storage interface (SQLite written directly by the store and the tracker).
OLD_COMMIT = "65f4b5a"

VFS = 4096
VM = "bench"
DRIVERS = ("virtio-net-pci", "virtio-rng-pci", "pci-testdev", "e1000")
PLANNED = 8  # devices the VM already has when a device is hot-added
BUILTIN_SLOTS = (0, 1, 2, 3)  # what QEMU's pc machine shows before any -device
VF_ALIAS = {"name": "vf", "vendor_id": "8086", "product_id": "1520", "device_type": "type-VF"}
GPU_ALIAS = {"name": "gpu", "vendor_id": "10de", "product_id": "20b5"}
OPS = ("hot add records", "steady sync", "claim+allocate", "free")
WHAT = {
    "hot add records": f"vm_lock, reserve txn (attaching), attached txn; pc VM with {PLANNED} devices",
    "steady sync": f"the same {VFS} VFs again",
    "claim+allocate": f"one VF through flavor alias vf:1, {VFS} VFs tracked",
    "free": "free_instance of such a VM",
}
UNITS = {"hot add records": "us", "steady sync": "ms", "claim+allocate": "us", "free": "us"}

HOSTS = 1000
CLUSTER_GPUS = 8  # per host; with 2 PFs x 27 VFs: 64 devices
CLUSTER_PFS, CLUSTER_VFS_PER_PF = 2, 27


# -- one host's operations (the same code on every backend, and in the old tree) ------------------
def _requests(flavor: str, alias: dict[str, Any]) -> list[InstancePciRequest]:
    """A flavor's requests, as nova-api makes them from ``pci_passthrough:alias`` (a fresh request id each)."""
    return get_pci_requests_from_flavor({"extra_specs": {"pci_passthrough:alias": flavor}}, parse_aliases([alias]))


class HostOps:
    """One host's state (a SQLite directory or a PostgreSQL URL): a pc VM with 8 devices and a
    tracker of 4096 VFs, and the operations timed on it.

    Each sample is wall-clock time; the CPU time of this process for the same sample is kept too
    (:attr:`cpu`, by operation), which waiting for a CPU that another process holds does not inflate.
    """

    def __init__(self, location: str, *, node: str = "local") -> None:
        self.store = Store(location)
        specs = [DeviceSpec(str(uuid.uuid4()), "dev", DRIVERS[i % len(DRIVERS)]) for i in range(PLANNED)]
        plan = asyncio.run(plan_boot(self.store, VMSpec(VM), specs))
        # QEMU's view once the VM runs: the machine's own functions and the planned devices
        functions = [PciFunction(0, slot, 0, "") for slot in BUILTIN_SLOTS]
        functions += [PciFunction(0, d.slot, d.function, d.qemu_id) for d in plan.devices]
        self.view = PciOccupancy(functions, peripherals={d.qemu_id for d in plan.devices})
        self.devices = _topology(VFS)
        self.tracker = PciDevTracker(self.store, Whitelist.from_config([{"vendor_id": "8086"}]), node_id=node)
        self.initial_sync = timed(lambda: self.tracker.update_devices_from_hypervisor_resources(self.devices))
        self.cpu: dict[str, list[float]] = {op: [] for op in OPS}
        self._instances = 0

    def close(self) -> None:
        self.store.close()

    def _timed(self, op: str, work: Callable[[], Any]) -> float:
        cpu, start = time.process_time(), time.perf_counter()
        work()
        wall = time.perf_counter() - start
        self.cpu[op].append(time.process_time() - cpu)
        return wall

    def hot_add_records(self, rounds: int, probe: "_Probe | None" = None) -> list[float]:
        """What hot_add writes around its device_add: lock, reserve (attaching), attached; unlock.
        The record is forgotten again (untimed, unprobed), so every round sees the same VM."""

        async def add(spec: DeviceSpec) -> list[tuple[list[Device], int | None]]:
            async with self.store.vm_lock(VM):
                reserved = _reserve(self.store, VM, [spec], self.view, {}, None)
                with self.store.transaction() as txn:
                    for devices, _ in reserved:
                        for device in devices:
                            txn.set_state(VM, device.uuid, DeviceState.ATTACHED)
            return reserved

        async def rounds_() -> list[float]:
            samples = []
            for _ in range(rounds):
                spec = DeviceSpec(str(uuid.uuid4()), "dev", "virtio-net-pci")
                cpu, start = time.process_time(), time.perf_counter()
                reserved = await add(spec)
                samples.append(time.perf_counter() - start)
                self.cpu["hot add records"].append(time.process_time() - cpu)
                with probe.paused() if probe is not None else contextlib.nullcontext():
                    forget_all(self.store, VM, [d.with_state(DeviceState.ATTACHED) for ds, _ in reserved for d in ds])
            return samples

        return asyncio.run(rounds_())

    def steady_sync(self, rounds: int) -> list[float]:
        sync = self.tracker.update_devices_from_hypervisor_resources
        return [self._timed("steady sync", lambda: sync(self.devices)) for _ in range(rounds)]

    def claim_and_free(self, rounds: int) -> tuple[list[float], list[float]]:
        names = [f"vm-{self._instances + n}" for n in range(rounds)]
        self._instances += rounds
        tracker = self.tracker
        claims = []
        for name in names:
            requests = _requests("vf:1", VF_ALIAS)  # made by the API, not by the compute host: untimed
            claims.append(self._timed(
                "claim+allocate",
                lambda name=name, requests=requests: (
                    tracker.claim_instance(name, requests), tracker.allocate_instance(name)
                ),
            ))
        frees = [self._timed("free", lambda name=name: tracker.free_instance(name)) for name in names]
        return claims, frees

    def block(self, hot_adds: int, syncs: int, claims: int) -> dict[str, list[float]]:
        """One round of every operation: wall-clock samples by operation (CPU samples in :attr:`cpu`)."""
        claimed, freed = self.claim_and_free(claims)
        return {
            "hot add records": self.hot_add_records(hot_adds),
            "steady sync": self.steady_sync(syncs),
            "claim+allocate": claimed,
            "free": freed,
        }


def serve(state_dir: str) -> None:
    """Section 3's subprocess: a host state with whatever ``kvmslots`` is importable, then one block of
    SQLite operations per JSON line read (``{"hot_adds": .., "syncs": .., "claims": ..}``), one JSON line
    of samples written back; idle in between, so that the other side's blocks run alone."""
    import kvmslots

    host = HostOps(state_dir)
    print(json.dumps({"kvmslots": kvmslots.__file__, "initial_sync": host.initial_sync}), flush=True)
    try:
        for line in sys.stdin:
            for values in host.cpu.values():
                values.clear()
            wall = host.block(**json.loads(line))
            print(json.dumps({"wall": wall, "cpu": host.cpu}), flush=True)
    finally:
        host.close()


# -- floors -----------------------------------------------------------------------------------
def _sqlite_floor(directory: Path, rounds: int) -> list[float]:
    """A bare INSERT+COMMIT on a SQLite file set up as the backend sets its own (WAL, synchronous=NORMAL)."""
    conn = sqlite3.connect(directory / "floor.sqlite3", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS floor (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")

        def one() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO floor (v) VALUES (?)", ("x",))
            conn.execute("COMMIT")

        return [timed(one) for _ in range(rounds)]
    finally:
        conn.close()


def _pg_floor(url: str, rounds: int, *, synchronous_commit: bool = True) -> list[float]:
    """A bare BEGIN; INSERT; COMMIT through psycopg (autocommit connection, as the backend runs)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS floor (k BIGSERIAL PRIMARY KEY, v TEXT NOT NULL)")
        if not synchronous_commit:
            conn.execute("SET synchronous_commit = off")

        def one() -> None:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO floor (v) VALUES (%s)", ("x",))
            conn.execute("COMMIT")

        return [timed(one) for _ in range(rounds)]


def _pg_round_trip(url: str, rounds: int) -> list[float]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return [timed(lambda: conn.execute("SELECT 1").fetchone()) for _ in range(rounds)]


# -- PostgreSQL: a server, and databases of our own ------------------------------------------------
@contextlib.contextmanager
def _pg_server() -> Iterator[str | None]:
    """The URL of a server that answers (a throwaway cluster if needed), or None."""
    try:
        import psycopg
    except ImportError:
        note("storage: psycopg is not installed; the PostgreSQL sections are skipped")
        yield None
        return
    candidates = [os.environ[name] for name in URL_ENVS if os.environ.get(name)]
    for url in candidates:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            continue
        yield url
        return
    directory = tempfile.mkdtemp(prefix="kvmslots-bench-pg-")
    script = REPO / ".ci" / "pg-cluster"
    note(f"storage: no PostgreSQL server at {candidates}; starting a throwaway cluster in {directory} ...")
    done = subprocess.run(["bash", str(script), "start", directory], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        note(f"storage: could not start PostgreSQL ({done.stderr.strip()}); the PostgreSQL sections are skipped")
        yield None
        return
    try:
        yield done.stdout.strip()
    finally:
        subprocess.run(["bash", str(script), "stop", directory], capture_output=True, timeout=120)


def _database_url(url: str, database: str) -> str:
    """*url* naming another database (text surgery: ``urlunsplit`` would turn ``postgresql:///db``
    into ``postgresql:/db``)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/{database}" + (f"?{parts.query}" if parts.query else "")


@contextlib.contextmanager
def _pg_database(server: str, purpose: str) -> Iterator[str]:
    """A new, empty database for this run; dropped (with any sessions left on it) afterwards."""
    import psycopg

    name = f"kvmslots_bench_{purpose}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield _database_url(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class _Probe:
    """Counts the statements a PostgreSQL store sends and the time spent inside psycopg for them
    (encoding, socket, server work, fsync at COMMIT); the rest of an operation is Python."""

    def __init__(self, store: Store) -> None:
        self.conn: Any = store.backend._conn  # type: ignore[attr-defined]
        self.statements = 0
        self.seconds = 0.0
        self._paused = False
        #: statement text (its first words) -> [times sent, seconds inside psycopg]
        self.by_sql: dict[str, list[float]] = {}
        self.sent: list[str] = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _count(self, start: float, sql: Any) -> None:
        if not self._paused:
            elapsed = time.perf_counter() - start
            self.sent.append(str(sql))
            self.statements += 1
            self.seconds += elapsed
            entry = self.by_sql.setdefault(" ".join(str(sql).split())[:70], [0, 0.0])
            entry[0] += 1
            entry[1] += elapsed

    def top(self, rounds: int, count: int = 8) -> str:
        """The statements that took most of the time, per operation."""
        rows = sorted(self.by_sql.items(), key=lambda item: -item[1][1])[:count]
        return "\n".join(f"    {n / rounds:5.1f} x {s / rounds * 1e6:7.1f} us  {sql}" for sql, (n, s) in rows)

    def __enter__(self) -> "_Probe":
        conn, probe = self.conn, self
        execute, cursor = conn.execute, conn.cursor

        def timed_execute(sql: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return execute(sql, *args, **kwargs)
            finally:
                probe._count(start, sql)

        class Cursor:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __enter__(self) -> "Cursor":
                self.inner.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return self.inner.__exit__(*exc)

            def executemany(self, sql: Any, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return self.inner.executemany(sql, *args, **kwargs)
                finally:
                    probe._count(start, "executemany " + str(sql))

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        conn.execute = timed_execute
        conn.cursor = lambda *a, **k: Cursor(cursor(*a, **k))
        return self

    def __exit__(self, *exc: object) -> None:
        del self.conn.execute, self.conn.cursor


def _probed(host: HostOps, rounds: int = 20, syncs: int = 3) -> dict[str, dict[str, float]]:
    """Per operation on PostgreSQL: statements sent, and microseconds inside psycopg vs in total."""
    out: dict[str, dict[str, float]] = {}
    with _Probe(host.store) as probe:
        out["hot add records"] = _split(probe, host.hot_add_records(rounds, probe))
    with _Probe(host.store) as probe:
        out["steady sync"] = _split(probe, host.steady_sync(syncs))
    names = [f"probe-{n}" for n in range(rounds)]
    requests = {name: _requests("vf:1", VF_ALIAS) for name in names}
    with _Probe(host.store) as probe:
        claimed = [timed(lambda n=n: (host.tracker.claim_instance(n, requests[n]), host.tracker.allocate_instance(n)))
                   for n in names]
        out["claim+allocate"] = _split(probe, claimed)
    with _Probe(host.store) as probe:
        out["free"] = _split(probe, [timed(lambda n=n: host.tracker.free_instance(n)) for n in names])
    return out


def _split(probe: _Probe, samples: list[float]) -> dict[str, float]:
    rounds, total = len(samples), sum(samples)
    note(f"storage: PostgreSQL statements per operation, by time inside psycopg ({rounds} rounds):\n"
         + probe.top(rounds))
    return {"statements": round(probe.statements / rounds, 1), "mean_us": round(total / rounds * 1e6, 1),
            "in_psycopg_us": round(min(probe.seconds, total) / rounds * 1e6, 1)}


# -- section 1 ------------------------------------------------------------------------------------
def _per_host(
    tmp: Path, server: str | None, reps: int = 12, hot_adds: int = 30, syncs: int = 3, claims: int = 30
) -> None:
    samples: dict[str, dict[str, list[float]]] = {"sqlite": {op: [] for op in OPS}, "pg": {op: [] for op in OPS}}
    floors: dict[str, list[float]] = {"sqlite": [], "pg": [], "pg_nosync": [], "pg_rtt": []}
    with contextlib.ExitStack() as stack:
        hosts: dict[str, HostOps] = {}
        note(f"storage: per-host state on SQLite ({VFS} VFs, a VM with {PLANNED} devices) ...")
        hosts["sqlite"] = HostOps(str(tmp / "sqlite"))
        stack.callback(hosts["sqlite"].close)
        if server is not None:
            url = stack.enter_context(_pg_database(server, "host"))
            note(f"storage: per-host state on PostgreSQL ({url}) ...")
            hosts["pg"] = HostOps(url)
            stack.callback(hosts["pg"].close)
        (tmp / "floor").mkdir()
        for rep in range(reps):  # blocks alternate between the backends, so drift hits both alike
            floors["sqlite"] += _sqlite_floor(tmp / "floor", 40)
            for name in sorted(hosts, reverse=rep % 2 == 1):
                for op, values in hosts[name].block(hot_adds, syncs, claims).items():
                    samples[name][op] += values
            if server is not None:
                floors["pg"] += _pg_floor(url, 40)
        if server is not None:
            floors["pg_nosync"] = _pg_floor(url, 100, synchronous_commit=False)
            floors["pg_rtt"] = _pg_round_trip(url, 200)
            probe = _probed(hosts["pg"])
        initial = {name: host.initial_sync for name, host in hosts.items()}

    emit("storage.floor.sqlite: bare BEGIN IMMEDIATE; INSERT; COMMIT (WAL, synchronous=NORMAL)", floors["sqlite"], None,
         unit="us")
    if server is None:
        note("storage: no PostgreSQL: only the SQLite figures of section 1 are printed")
    else:
        emit("storage.floor.pg: bare psycopg BEGIN; INSERT; COMMIT vs the SQLite floor", floors["pg"], floors["sqlite"],
             unit="us")
        emit("storage.floor.pg_nosync: the same with synchronous_commit=off vs with it on (the WAL fsync's share)",
             floors["pg_nosync"], floors["pg"], unit="us")
        emit("storage.floor.pg_rtt: one SELECT 1 round trip vs the PG floor", floors["pg_rtt"], floors["pg"], unit="us")
    for op in OPS:
        unit, what = UNITS[op], WHAT[op]
        emit(f"storage.sqlite.{op}: {what}; vs bare SQLite INSERT+COMMIT", samples["sqlite"][op], floors["sqlite"],
             unit=unit)
        if server is None:
            continue
        details: dict[str, Any] = dict(probe[op])
        emit(f"storage.pg.{op}: {what}; vs bare psycopg INSERT+COMMIT", samples["pg"][op], floors["pg"], unit=unit,
             **details)
        emit(f"storage.pg_vs_sqlite.{op}: PostgreSQL vs SQLite", samples["pg"][op], samples["sqlite"][op],
             unit=unit)
    for name, seconds in initial.items():
        emit(f"storage.{name}.initial_sync: first sync of {VFS} VFs into an empty state (once)", [seconds], None)


# -- section 2 ------------------------------------------------------------------------------------
def _cluster_host() -> list[dict[str, Any]]:
    """One host of the cluster: 2 NIC PFs with 27 VFs each, and 8 GPUs (4 per NUMA node): 64 devices."""
    from kvmslots.pci.address import DEV_TYPE_PCI, PciAddress
    from kvmslots.pci.discovery import make_record
    from kvmslots.pci.fakehost import sriov_topology

    topology = sriov_topology(pfs=CLUSTER_PFS, vfs_per_pf=CLUSTER_VFS_PER_PF, plain=0)
    devices: list[dict[str, Any]] = [dict(d) for d in topology]
    for i in range(CLUSTER_GPUS):
        devices.append(dict(make_record(PciAddress(0, 0x41 + 0x10 * i, 0, 0), "10de", "20b5", DEV_TYPE_PCI,
                                        numa_node=i * 2 // CLUSTER_GPUS, iommu_group=1000 + i)))
    return devices


def _populate(url: str) -> tuple[int, int]:
    """1000 hosts' rows, copied in SQL from one host a real tracker synced; some devices in use."""
    import psycopg

    whitelist = Whitelist.from_config([{"vendor_id": "8086", "physical_network": "physnet1"}, {"vendor_id": "10de"}])
    with Store(url) as store:  # the rows of one host, exactly as its tracker writes them
        tracker = PciDevTracker(store, whitelist, node_id="template", numa_sockets={0: 0, 1: 1})
        tracker.update_devices_from_hypervisor_resources(_cluster_host())
    with psycopg.connect(url) as conn:  # one transaction, committed when the block ends

        def columns(table: str) -> str:
            return ", ".join(row[0] for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                "AND table_schema = current_schema() AND column_name <> 'node' ORDER BY ordinal_position", (table,)))

        node = "'host-' || lpad(g::text, 4, '0')"
        for table in ("pci_hosts", "pci_devices"):
            names = columns(table)
            conn.execute(f"INSERT INTO {table} (node, {names}) SELECT {node}, {names} "
                         f"FROM {table}, generate_series(0, {HOSTS - 1}) g WHERE node = 'template'")
            conn.execute(f"DELETE FROM {table} WHERE node = 'template'")
        # host n has n mod 9 of its 8 GPUs and n mod 17 of its VFs allocated: hosts with 7 or 8 busy GPUs
        # cannot take gpu:2, and the pools' counts differ from host to host
        for vendor, modulo in (("10de", 9), ("8086", 17)):
            conn.execute(
                "UPDATE pci_devices d SET status = 'allocated', instance_uuid = 'vm-' || d.node "
                "FROM (SELECT node, address, row_number() OVER (PARTITION BY node ORDER BY address) AS rn "
                "      FROM pci_devices WHERE vendor_id = %s AND dev_type <> 'type-PF') r "
                "WHERE d.node = r.node AND d.address = r.address "
                "AND r.rn <= mod(CAST(substr(r.node, 6) AS INTEGER), %s)",
                (vendor, modulo))
        # as the tracker does: a PF whose VF is allocated is unavailable
        conn.execute(
            "UPDATE pci_devices p SET status = 'unavailable' FROM pci_devices v "
            "WHERE v.node = p.node AND v.parent_addr = p.address AND v.status = 'allocated' "
            "AND p.dev_type = 'type-PF' AND p.status = 'available'")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE pci_devices")
        conn.execute("ANALYZE pci_hosts")
        with contextlib.suppress(psycopg.Error):  # written out now, not by a checkpoint while timing
            conn.execute("CHECKPOINT")
        devices = conn.execute("SELECT COUNT(*) FROM pci_devices").fetchone()
        nodes = conn.execute("SELECT COUNT(*) FROM pci_hosts").fetchone()
    assert devices is not None and nodes is not None
    return int(nodes[0]), int(devices[0])


class _GcTimer:
    """Time spent in the garbage collector while measuring (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.collections += 1

    @contextlib.contextmanager
    def measuring(self) -> Iterator["_GcTimer"]:
        self.seconds, self.collections = 0.0, 0
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


def _cluster(server: str | None, rounds: int = 20) -> None:
    if server is None:
        note("storage: no PostgreSQL: section 2 (cluster hosts) skipped")
        return
    from kvmslots.cluster import cluster_pools, fitting_hosts, hosts_for

    with _pg_database(server, "cluster") as url:
        note(f"storage: cluster: {HOSTS} hosts x {CLUSTER_PFS * (CLUSTER_VFS_PER_PF + 1) + CLUSTER_GPUS} devices ...")
        start = time.perf_counter()
        nodes, devices = _populate(url)
        populate = time.perf_counter() - start
        requests = _requests("gpu:2", GPU_ALIAS)
        with Store(url) as store:
            hosts_for(store, requests)  # warm: first statements, catalog caches

            def reads() -> None:
                with store.reading() as txn:
                    txn.hosts()
                    txn.free_pools(None)

            samples: dict[str, list[float]] = {
                "hosts_for": [], "gc": [], "cluster_pools": [], "reads": [], "in_psycopg": [], "fit": []
            }
            fits = []
            collector = _GcTimer()
            for _ in range(rounds):  # interleaved, so that all parts see the same server and machine
                with collector.measuring():
                    samples["hosts_for"].append(timed(lambda: fits.append(hosts_for(store, requests))))
                samples["gc"].append(collector.seconds)
                samples["cluster_pools"].append(timed(lambda: cluster_pools(store)))
                with _Probe(store) as probe:
                    samples["reads"].append(timed(reads))
                samples["in_psycopg"].append(probe.seconds)
                inventory = cluster_pools(store)
                samples["fit"].append(timed(lambda inventory=inventory: fitting_hosts(inventory, requests)))
            server_ms = _explain(store)
            with store.reading() as txn:
                pools = len(txn.free_pools(None))
        median = statistics.median
        ms = lambda seconds: round(seconds * 1e3, 2)  # noqa: E731
        build = median(samples["cluster_pools"]) - median(samples["reads"])
        decode = median(samples["reads"]) - median(samples["in_psycopg"])
        emit(f"storage.cluster.hosts_for: gpu:2 over {nodes} hosts x {devices // max(nodes, 1)} devices "
             f"(reads + pools + fit) vs cluster_pools alone", samples["hosts_for"], samples["cluster_pools"],
             target="< 100 ms", limit=100.0, fitting_hosts=len(fits[-1]), hosts=nodes, devices=devices,
             pool_rows=pools, gc_ms=ms(median(samples["gc"])), populate_s=round(populate, 2))
        emit("storage.cluster.cluster_pools: every host's pools (reads + building PciDeviceStats) vs its reads",
             samples["cluster_pools"], samples["reads"], python_build_ms=ms(build))
        emit("storage.cluster.reads: hosts() + free_pools() in one read transaction (SQL, transfer, rows decoded) "
             "vs hosts_for", samples["reads"], samples["hosts_for"], in_psycopg_ms=ms(median(samples["in_psycopg"])),
             python_decode_ms=ms(decode), server_execution_ms=server_ms)
        emit("storage.cluster.fit: fitting_hosts over pools already read (Python) vs hosts_for", samples["fit"],
             samples["hosts_for"])
        emit("storage.cluster.gc: garbage collection inside hosts_for vs hosts_for", samples["gc"],
             samples["hosts_for"])
        if median(samples["hosts_for"]) > 0.1:
            with Store(url) as store:
                _profile(lambda: hosts_for(store, requests))


def _explain(store: Store) -> dict[str, float]:
    """The server's own execution time of the cluster queries (EXPLAIN ANALYZE of exactly what the store sends)."""
    with _Probe(store) as probe:
        with store.reading() as txn:
            txn.hosts()
            txn.free_pools(None)
    out: dict[str, float] = {}
    for sql in probe.sent:
        if not sql.lstrip().upper().startswith("SELECT"):
            continue
        plan = probe.conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").fetchone()[0][0]
        if "GROUP BY node, vendor_id" in sql:
            label = "free_pools"
        else:
            label = "hosts_count" if "COUNT" in sql else "hosts_rows"
        out[label] = round(plan["Execution Time"], 2)
    return out


def _profile(work: Callable[[], Any]) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(work)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    note("storage: hosts_for over 100 ms; where its time goes (cProfile, by own time):\n" + text.getvalue())


# -- section 3 ------------------------------------------------------------------------------------
_WORKER = """
import importlib.util, sys
tree, bench, state = sys.argv[1:4]
sys.path[:] = [tree] + [p for p in sys.path if p not in ("", tree)]
spec = importlib.util.spec_from_file_location("kvmslots_bench", bench + "/__init__.py",
                                              submodule_search_locations=[bench])
package = importlib.util.module_from_spec(spec)
sys.modules["kvmslots_bench"] = package
spec.loader.exec_module(package)
import kvmslots
if not kvmslots.__file__.startswith(tree + "/"):
    sys.exit(f"kvmslots came from {kvmslots.__file__}, not from {tree}")
from kvmslots_bench.storage import serve
serve(state)
"""


@contextlib.contextmanager
def _old_tree() -> Iterator[Path | None]:
    """A git worktree of :data:`OLD_COMMIT` (made for this run, removed after), or None with a note why not."""
    git = shutil.which("git")
    if git is None:
        note("storage: git not found: section 3 (SQLite before/after the storage interface) skipped")
        yield None
        return
    fixed = Path("/tmp/kvmslots-old")
    # a run of its own if another one (or a person) has /tmp/kvmslots-old: never removed under it
    path = fixed if not fixed.exists() else Path(tempfile.mkdtemp(prefix="kvmslots-old-"))
    done = subprocess.run([git, "-C", str(REPO), "worktree", "add", "--detach", str(path), OLD_COMMIT],
                          capture_output=True, text=True)
    if done.returncode != 0:
        note(f"storage: git worktree add {path} {OLD_COMMIT} failed ({done.stderr.strip()}): section 3 skipped")
        if path != fixed:
            shutil.rmtree(path, ignore_errors=True)
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run([git, "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([git, "-C", str(REPO), "worktree", "prune"], capture_output=True)


class _Worker:
    """A subprocess that imports ``kvmslots`` from *tree* only (PYTHONPATH, and a working directory
    outside every tree) and runs blocks of SQLite operations on command."""

    def __init__(self, tree: Path, tmp: Path) -> None:
        self.tree = tree
        self.state = tempfile.mkdtemp(prefix="state-", dir=tmp)
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tree), str(REPO / "bench"), self.state],
            cwd=tmp, env=dict(os.environ, PYTHONPATH=str(tree)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.errors, text=True,
        )
        self.hello = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            raise RuntimeError(f"worker on {self.tree} failed:\n{self.errors.read()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def block(self, args: dict[str, int]) -> dict[str, dict[str, list[float]]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()
        shutil.rmtree(self.state, ignore_errors=True)


def _before_after(tmp: Path, processes: int = 2, blocks: int = 24, hot_adds: int = 25, syncs: int = 2,
                  claims: int = 25) -> None:
    """Old and new in two idle-waiting subprocesses, blocks alternating between them (old first, then new
    first, ...), so that bursts of other load on the machine hit both sides alike; twice, with fresh processes."""
    sides = ("old", "new")
    wall: dict[str, dict[str, list[float]]] = {side: {op: [] for op in OPS} for side in sides}
    cpu: dict[str, dict[str, list[float]]] = {side: {op: [] for op in OPS} for side in sides}
    pairs: dict[str, list[float]] = {op: [] for op in OPS}  # per block pair: median new / median old
    initial: dict[str, list[float]] = {side: [] for side in sides}
    sources: dict[str, set[str]] = {side: set() for side in sides}
    args = {"hot_adds": hot_adds, "syncs": syncs, "claims": claims}
    with _old_tree() as old:
        if old is None:
            return
        note(f"storage: SQLite, {OLD_COMMIT} ({old}) vs this tree: {processes} x 2 subprocesses, "
             f"{blocks} blocks each, alternating ...")
        for _ in range(processes):
            workers: dict[str, _Worker] = {}
            try:
                for side, tree in (("old", old), ("new", REPO)):
                    workers[side] = _Worker(tree, tmp)
                    sources[side].add(workers[side].hello["kvmslots"])
                    initial[side].append(workers[side].hello["initial_sync"])
                for n in range(blocks):
                    got = {side: workers[side].block(args) for side in (sides if n % 2 == 0 else sides[::-1])}
                    for op in OPS:
                        for side in sides:
                            wall[side][op] += got[side]["wall"][op]
                            cpu[side][op] += got[side]["cpu"][op]
                        new_wall, old_wall = (statistics.median(got[side]["wall"][op]) for side in ("new", "old"))
                        pairs[op].append(new_wall / old_wall)
            finally:
                for worker in workers.values():
                    worker.close()
    for side in sides:
        note(f"storage: {side}: kvmslots from {', '.join(sorted(sources[side]))}")
    for op in OPS:
        cpu_new, cpu_old = statistics.median(cpu["new"][op]), statistics.median(cpu["old"][op])
        emit(f"storage.sqlite_before_after.{op}: through the storage interface vs {OLD_COMMIT} (new/old)",
             wall["new"][op], wall["old"][op], unit=UNITS[op], target="<= 1.1x", limit=1.1,
             paired_ratio=round(statistics.median(pairs[op]), 3),
             paired_ratio_quartiles=[round(q, 3) for q in statistics.quantiles(pairs[op], n=4)[::2]],
             cpu_us_new=round(cpu_new * 1e6, 1), cpu_us_old=round(cpu_old * 1e6, 1),
             cpu_ratio=round(cpu_new / cpu_old, 3))
    new_ms, old_ms = (", ".join(f"{x * 1e3:.0f}" for x in initial[side]) for side in ("new", "old"))
    note(f"storage: first sync of {VFS} VFs (one per process, informative): new {new_ms} ms, old {old_ms} ms")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def run() -> None:
    """Sections 3, 1 and 2 of the module's docstring, in that order, in about half a minute."""
    start = time.perf_counter()
    note(f"storage: {_load()}: other processes on this machine (and on the PostgreSQL server) add noise")
    with tempfile.TemporaryDirectory(prefix="kvmslots-bench-") as tmp, _pg_server() as server:
        tmp_path = Path(tmp)
        note(f"storage: PostgreSQL at {server}" if server else "storage: no PostgreSQL")
        # SQLite before/after first: dropping a PostgreSQL database forces a checkpoint, whose disk
        # writes would otherwise fall into it
        _before_after(tmp_path)
        _per_host(tmp_path, server)
        _cluster(server)
    note(f"storage: {time.perf_counter() - start:.1f} s; {_load()}")

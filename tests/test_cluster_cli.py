"""The cluster view (kvmslots.cluster) and the ``kvmslots cluster`` commands, on SQLite and PostgreSQL.

Three hosts sync their own device lists through ``kvmslots host sync
--host-name``: GPUs on NUMA nodes 0 and 1, VFs tagged with a
``physical_network``.  ``cluster pools`` must show every host's free pools
(and the counts drop after ``host claim``), ``cluster hosts`` must name
exactly the hosts that can serve a flavor-style request (with and without
NUMA cells), ``cluster forget`` must remove one host and refuse an unknown
one.  The count-only view the scheduler uses must agree with the host
tracker's own answer (a Hypothesis property), and a server that cannot be
reached must fail cleanly.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcihost import PF_PRODUCT, VF_PRODUCT, pf_addr, vf_addr

from kvmslots import Store
from kvmslots.cli import main
from kvmslots.cluster import cluster_pools, fitting_hosts, forget_host
from kvmslots.errors import PciDeviceRequestFailed
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.request import InstancePciRequest
from kvmslots.pci.tracker import PciDevTracker
from kvmslots.store import DATABASE_URL_ENV

REPO = Path(__file__).resolve().parent.parent
GPU = ("10de", "2236")
ALIASES = [
    {"name": "GPU", "vendor_id": GPU[0], "product_id": GPU[1], "device_type": "type-PCI"},
    {"name": "NET1", "vendor_id": "8086", "product_id": VF_PRODUCT, "device_type": "type-VF",
     "physical_network": "physnet1"},
    {"name": "NET2", "vendor_id": "8086", "product_id": VF_PRODUCT, "device_type": "type-VF",
     "physical_network": "physnet2"},
]


def gpu(n: int, numa: int) -> dict[str, Any]:
    return {"address": f"0000:{0x40 + n:02x}:00.0", "vendor_id": GPU[0], "product_id": GPU[1],
            "dev_type": "type-PCI", "numa_node": numa}


def sriov(p: int, vfs: int, numa: int) -> list[dict[str, Any]]:
    devices = [{"address": pf_addr(p), "vendor_id": "8086", "product_id": PF_PRODUCT, "dev_type": "type-PF",
                "numa_node": numa}]
    devices += [{"address": vf_addr(p, v), "vendor_id": "8086", "product_id": VF_PRODUCT, "dev_type": "type-VF",
                 "parent_addr": pf_addr(p), "numa_node": numa} for v in range(vfs)]
    return devices


def vf_spec(p: int, network: str) -> dict[str, Any]:
    """The VFs of PF *p* (its address names its VFs; the product keeps the PF itself out)."""
    return {"address": pf_addr(p), "vendor_id": "8086", "product_id": VF_PRODUCT, "physical_network": network}


GPU_SPEC = {"vendor_id": GPU[0], "product_id": GPU[1]}
#: host -> (device list, device_spec): the PFs are not tracked, their VFs are.
HOSTS = {
    # 2 GPUs on NUMA 0, 2 on NUMA 1; 4 physnet1 VFs
    "alpha": ([gpu(0, 0), gpu(1, 0), gpu(2, 1), gpu(3, 1), *sriov(0, 4, 0)], [vf_spec(0, "physnet1"), GPU_SPEC]),
    # 1 GPU on each node; 4 physnet2 VFs
    "beta": ([gpu(0, 0), gpu(1, 1), *sriov(0, 4, 1)], [vf_spec(0, "physnet2"), GPU_SPEC]),
    # 1 GPU; 2 physnet1 VFs on NUMA 0, 2 physnet2 VFs on NUMA 1
    "gamma": ([gpu(0, 0), *sriov(0, 2, 0), *sriov(1, 2, 1)],
              [vf_spec(0, "physnet1"), vf_spec(1, "physnet2"), GPU_SPEC]),
}


def expected_pools(devices: list[dict[str, Any]], spec: list[dict[str, Any]], taken: set[str] = frozenset()
                   ) -> list[dict[str, Any]]:
    """The pool rows ``cluster pools --json`` should print for a host (written out independently)."""
    networks = {s["address"]: s["physical_network"] for s in spec if "address" in s}
    counts: dict[str, dict[str, Any]] = {}
    for d in devices:
        if d["dev_type"] == "type-PF" or d["address"] in taken:
            continue
        if d["dev_type"] == "type-VF":
            row = {"vendor_id": "8086", "product_id": VF_PRODUCT, "numa_node": d["numa_node"], "dev_type": "type-VF",
                   "parent_addr": d["parent_addr"],
                   "tags": {"physical_network": networks[d["parent_addr"]], "remote_managed": "false"}}
        else:
            row = {"vendor_id": GPU[0], "product_id": GPU[1], "numa_node": d["numa_node"], "dev_type": "type-PCI",
                   "parent_addr": None, "tags": {}}
        key = json.dumps(row, sort_keys=True)
        counts.setdefault(key, {**row, "count": 0})["count"] += 1
    return sorted(counts.values(), key=lambda r: json.dumps(r, sort_keys=True))


def tracked(devices: list[dict[str, Any]]) -> int:
    return sum(d["dev_type"] != "type-PF" for d in devices)


# --------------------------------------------------------------------------- helpers


class Cli:
    """``kvmslots --state LOCATION ...`` in this process; (exit code, stdout, stderr)."""

    def __init__(self, location: str, capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
        self.location, self.capsys, self.workdir = location, capsys, workdir
        self.aliases = workdir / "aliases.json"
        self.aliases.write_text(json.dumps(ALIASES))

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--state", self.location, *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self("--json", *args)
        assert code == 0, err
        return json.loads(out)

    def sync(self, host: str, devices: list[dict[str, Any]], spec: list[dict[str, Any]]) -> Any:
        devices_file, spec_file = self.workdir / f"{host}-devices.json", self.workdir / f"{host}-spec.json"
        devices_file.write_text(json.dumps(devices))
        spec_file.write_text(json.dumps(spec))
        return self.json("--host-name", host, "host", "sync", "--devices-json", str(devices_file),
                         "--device-spec", str(spec_file))

    def claim(self, host: str, vm: str, request: str) -> list[str]:
        return self.json("--host-name", host, "host", "claim", vm, "--request", request,
                         "--aliases", str(self.aliases))

    def hosts(self, request: str, *extra: str) -> list[dict[str, Any]]:
        return self.json("cluster", "hosts", "--request", request, "--aliases", str(self.aliases), *extra)

    def pools(self, *extra: str) -> dict[str, dict[str, Any]]:
        return {h["host"]: h for h in self.json("cluster", "pools", *extra)}


@pytest.fixture
def cli(state_location, capsys, tmp_path) -> Cli:
    return Cli(state_location, capsys, tmp_path)


@pytest.fixture
def three_hosts(cli) -> Cli:
    for host, (devices, spec) in HOSTS.items():
        report = cli.sync(host, devices, spec)
        assert len(report["added"]) == tracked(devices)
    return cli


def names(fits: list[dict[str, Any]]) -> list[str]:
    return [f["host"] for f in fits]


def sorted_pools(host: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(host["pools"], key=lambda r: json.dumps(r, sort_keys=True))


# --------------------------------------------------------------------------- cluster pools


def test_cluster_pools_shows_every_hosts_free_pools(three_hosts):
    pools = three_hosts.pools()
    assert sorted(pools) == ["alpha", "beta", "gamma"]
    for host, (devices, spec) in HOSTS.items():
        shown = pools[host]
        assert shown["devices"] == shown["free"] == tracked(devices)
        assert isinstance(shown["synced_at"], float)
        assert sorted_pools(shown) == expected_pools(devices, spec)
        assert sum(p["count"] for p in shown["pools"]) == shown["free"]

    # --host narrows the view; the text table has one line per pool
    assert list(three_hosts.pools("--host", "beta")) == ["beta"]
    code, out, _ = three_hosts("cluster", "pools", "--host", "gamma")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["HOST", "VENDOR", "PRODUCT", "NUMA", "TYPE", "FREE", "TAGS"]
    assert len(lines) == 1 + len(expected_pools(*HOSTS["gamma"]))
    assert "gamma  " in lines[1] and "physical_network=physnet1,remote_managed=false" in out


def test_free_counts_drop_after_host_claim_and_come_back_after_host_free(three_hosts):
    got = three_hosts.claim("alpha", "vm1", "GPU:2, NET1:1")
    assert len(got) == 3
    devices, spec = HOSTS["alpha"]
    alpha = three_hosts.pools()["alpha"]
    assert alpha["free"] == tracked(devices) - 3 and alpha["devices"] == tracked(devices)
    assert sorted_pools(alpha) == expected_pools(devices, spec, set(got))
    # the other hosts are untouched
    for host in ("beta", "gamma"):
        assert sorted_pools(three_hosts.pools()[host]) == expected_pools(*HOSTS[host])
    code, out, _ = three_hosts("--host-name", "alpha", "host", "free", "vm1")
    assert code == 0
    assert sorted_pools(three_hosts.pools()["alpha"]) == expected_pools(devices, spec)


# --------------------------------------------------------------------------- cluster hosts


def test_cluster_hosts_lists_exactly_the_hosts_that_can_serve(three_hosts):
    cli = three_hosts
    # GPU:2: alpha (4 GPUs) and beta (2, one per node); gamma has one
    assert cli.hosts("GPU:2") == [{"host": "alpha", "numa_cells": None, "free": 8},
                                  {"host": "beta", "numa_cells": None, "free": 6}]
    assert names(cli.hosts("GPU:1")) == ["alpha", "beta", "gamma"]
    assert names(cli.hosts("NET1:2")) == ["alpha", "gamma"]
    assert names(cli.hosts("NET1:3")) == ["alpha"]
    assert names(cli.hosts("NET2:3")) == ["beta"]
    assert names(cli.hosts("GPU:1, NET2:2")) == ["beta", "gamma"]
    assert cli.hosts("GPU:5") == []

    # one NUMA cell, required: 2 free GPUs on ONE node; only alpha has that, on node 0
    one_cell = ("--numa-cells", "1", "--numa-policy", "required")
    assert cli.hosts("GPU:2", *one_cell) == [{"host": "alpha", "numa_cells": [0], "free": 8}]
    # beta has a GPU and its physnet2 VFs on node 1; gamma's GPU is on node 0, its physnet2 VFs on node 1
    assert cli.hosts("GPU:1, NET2:2", *one_cell) == [{"host": "beta", "numa_cells": [1], "free": 6}]
    # two cells: alpha, beta (one GPU on each node); legacy and preferred without cells agree with no NUMA
    assert names(cli.hosts("GPU:2", "--numa-cells", "2", "--numa-policy", "required")) == ["alpha", "beta"]
    assert names(cli.hosts("GPU:1, NET2:2", *one_cell[:2], "--numa-policy", "preferred")) == ["beta", "gamma"]

    # claims change the answer: alpha's first two GPUs (node 0) go
    assert cli.claim("alpha", "vm1", "GPU:2") == ["0000:40:00.0", "0000:41:00.0"]
    assert cli.hosts("GPU:2", *one_cell) == [{"host": "alpha", "numa_cells": [1], "free": 6}]
    assert names(cli.hosts("GPU:2")) == ["alpha", "beta"]
    cli.claim("alpha", "vm2", "GPU:1")
    assert names(cli.hosts("GPU:2")) == ["beta"]  # alpha has one GPU left
    assert cli.hosts("GPU:2", *one_cell) == []
    code, out, _ = cli("cluster", "hosts", "--request", "GPU:2", "--aliases", str(cli.aliases), *one_cell)
    assert code == 0 and out.strip() == "no host can meet GPU:2"
    code, out, _ = cli("cluster", "hosts", "--request", "GPU:1", "--aliases", str(cli.aliases), *one_cell)
    assert out.split("\n")[0].split() == ["alpha", "NUMA", "1"]


def test_cluster_hosts_refuses_bad_requests(three_hosts):
    cli = three_hosts
    code, _, err = cli("cluster", "hosts", "--request", "TPU:1", "--aliases", str(cli.aliases))
    assert code == 2 and err.strip() == "kvmslots: error: PCI alias 'TPU' is not defined"  # bad usage
    code, _, err = cli("cluster", "hosts", "--request", "GPU:1", "--aliases", str(cli.aliases), "--numa-cells", "0")
    assert code == 2 and "--numa-cells" in err


def test_numa_cells_on_nodes_without_free_devices(cli):
    """A host is not refused because its free devices span fewer NUMA nodes than the VM has cells.

    The inventory knows a host's nodes only from its free devices (and a socket map): 'delta' has a
    GPU on each of two nodes, and once node 0's is taken, a 2-cell VM asking for one GPU on its own
    nodes still fits (the tracker itself would claim node 1's GPU for cells 0,1).  'omega' has one
    GPU without NUMA affinity: a 1-cell VM may take it under the legacy policy, not under required.
    """
    cli.sync("delta", [gpu(0, 0), gpu(1, 1)], [GPU_SPEC])
    cli.sync("omega", [{**gpu(0, 0), "numa_node": None}], [GPU_SPEC])
    assert cli.claim("delta", "vm1", "GPU:1") == ["0000:40:00.0"]  # node 0's GPU goes first
    assert cli.hosts("GPU:1", "--numa-cells", "2", "--numa-policy", "required") == [
        {"host": "delta", "numa_cells": [1], "free": 1}]
    assert cli.hosts("GPU:1", "--numa-cells", "1", "--numa-policy", "required") == [
        {"host": "delta", "numa_cells": [1], "free": 1}]
    assert cli.hosts("GPU:1", "--numa-cells", "1", "--numa-policy", "legacy") == [
        {"host": "delta", "numa_cells": [1], "free": 1}, {"host": "omega", "numa_cells": [], "free": 1}]
    code, out, _ = cli("cluster", "hosts", "--request", "GPU:1", "--aliases", str(cli.aliases),
                       "--numa-cells", "2", "--numa-policy", "legacy")
    assert code == 0 and out.splitlines() == ["delta  NUMA 1", "omega  NUMA -"]
    assert cli.hosts("GPU:2", "--numa-cells", "2", "--numa-policy", "preferred") == []  # 1 free GPU each


# --------------------------------------------------------------------------- cluster forget, stale hosts


def test_cluster_forget_removes_one_host_and_refuses_an_unknown_one(three_hosts):
    cli = three_hosts
    cli.claim("gamma", "vm1", "GPU:1")
    assert cli.json("cluster", "forget", "gamma") == {"host": "gamma", "devices": tracked(HOSTS["gamma"][0])}
    pools = cli.pools()
    assert sorted(pools) == ["alpha", "beta"]
    assert sorted_pools(pools["alpha"]) == expected_pools(*HOSTS["alpha"])
    assert names(cli.hosts("GPU:1")) == ["alpha", "beta"]
    for host in ("gamma", "nope"):
        code, out, err = cli("cluster", "forget", host)
        assert code == 1 and out == ""
        assert err.strip() == f"kvmslots: UnknownHost: No host named {host!r} in the device inventory"
    # the host may come back: a sync registers it again, from nothing
    cli.sync("gamma", *HOSTS["gamma"])
    assert cli.pools()["gamma"]["free"] == tracked(HOSTS["gamma"][0])


def test_a_tracker_that_outlives_forget_does_not_leave_hidden_rows(state_location):
    devices, spec = HOSTS["gamma"]
    tracker = PciDevTracker(Store(state_location), Whitelist.from_config(spec), node_id="gamma")
    tracker.update_devices_from_hypervisor_resources(devices)
    with Store(state_location) as store:
        assert forget_host(store, "gamma") == tracked(devices)
    tracker.update_devices_from_hypervisor_resources(devices)  # a daemon's next periodic sync
    with Store(state_location) as store:
        shown = {p.host.name: p.host.devices for p in cluster_pools(store)}
        with store.reading() as txn:
            stored = len(txn.load_host("gamma")[0])
    assert shown.get("gamma", 0) == stored  # whatever is stored for gamma, the cluster view shows
    assert stored == tracked(devices)  # the daemon's next sync registered the host again


def test_looking_at_a_host_registers_nothing(state_location, capsys):
    assert main(["--state", state_location, "--host-name", "typo", "host", "pools"]) == 0
    assert main(["--state", state_location, "--host-name", "typo", "host", "devices"]) == 0
    capsys.readouterr()
    with Store(state_location) as store:
        assert cluster_pools(store) == []


def test_a_host_that_stops_syncing_keeps_its_rows(three_hosts):
    cli = three_hosts
    cli.claim("beta", "vm1", "NET2:1")
    before = cli.pools()["beta"]
    for _ in range(3):  # the others keep syncing; beta is silent
        cli.sync("alpha", *HOSTS["alpha"])
        cli.sync("gamma", HOSTS["gamma"][0][:1], HOSTS["gamma"][1])  # gamma now reports only its GPU
    after = cli.pools()
    assert after["beta"] == before
    assert after["alpha"]["synced_at"] > before["synced_at"]
    assert after["gamma"]["devices"] == 1
    assert names(cli.hosts("NET2:3")) == ["beta"]  # still offered: nobody said it is gone
    code, out, _ = cli("--json", "--host-name", "beta", "host", "devices", "--status", "claimed")
    assert [d["instance"] for d in json.loads(out)] == ["vm1"]


# --------------------------------------------------------------------------- the environment variable, a subprocess


def test_the_database_url_comes_from_the_environment(pg_url, capsys, tmp_path, monkeypatch):
    cli = Cli(pg_url, capsys, tmp_path)
    for host, (devices, spec) in HOSTS.items():
        cli.sync(host, devices, spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSLOTS_")}
    env[DATABASE_URL_ENV] = pg_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvmslots", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)

    done = run("--json", "cluster", "hosts", "--request", "GPU:2", "--aliases", str(cli.aliases))
    assert done.returncode == 0, done.stderr
    assert names(json.loads(done.stdout)) == ["alpha", "beta"]
    done = run("--json", "--host-name", "beta", "host", "claim", "vm9", "--request", "GPU:1",
               "--aliases", str(cli.aliases))
    assert done.returncode == 0, done.stderr
    done = run("--json", "cluster", "pools")
    assert done.returncode == 0, done.stderr
    assert {h["host"]: h["free"] for h in json.loads(done.stdout)} == {"alpha": 8, "beta": 5, "gamma": 5}
    assert not (tmp_path / "kvmslots.sqlite3").exists()  # nothing went to a SQLite file

    # the same in this process, through the environment instead of --state
    monkeypatch.setenv(DATABASE_URL_ENV, pg_url)
    for name in ("KVMSLOTS_STATE_DIR", "KVMSLOTS_HOST"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    assert main(["--json", "cluster", "hosts", "--request", "GPU:2", "--aliases", str(cli.aliases)]) == 0
    assert names(json.loads(capsys.readouterr().out)) == ["alpha"]  # beta gave one GPU to vm9


# --------------------------------------------------------------------------- an unreachable server


def test_an_unreachable_server_is_exit_1_naming_the_url_without_password(tmp_path, capsys, monkeypatch):
    sockets = tmp_path / "no-server"  # a socket directory where no server listens
    sockets.mkdir()
    url = f"postgresql://kvmslots:s3cret@/kvmslots?host={sockets}"
    monkeypatch.chdir(tmp_path)
    for name in ("KVMSLOTS_STATE_DIR", DATABASE_URL_ENV):
        monkeypatch.delenv(name, raising=False)
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps(ALIASES))
    for argv in (["--state", url, "cluster", "pools"],
                 ["--state", url, "--host-name", "alpha", "host", "sync", "--devices-json", str(aliases),
                  "--device-spec", str(aliases)],
                 ["--state", url, "cluster", "forget", "alpha"]):
        capsys.readouterr()
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("kvmslots: StoreUnavailable: Cannot reach the state database "
                              f"postgresql://kvmslots:***@/kvmslots?host={sockets}")
        assert "s3cret" not in err and len(err.splitlines()) == 1
    monkeypatch.setenv(DATABASE_URL_ENV, url)
    assert main(["cluster", "hosts", "--request", "GPU:1", "--aliases", str(aliases)]) == 1
    assert "StoreUnavailable" in capsys.readouterr().err
    # nothing was created: no socket, no SQLite state to fall back on
    assert list(sockets.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aliases.json", "no-server"]


def test_a_password_in_the_query_string_is_not_shown_either(tmp_path, capsys):
    sockets = tmp_path / "no-server"
    sockets.mkdir()
    assert main(["--state", f"postgresql:///kvmslots?host={sockets}&user=kvmslots&password=s3cret",
                 "cluster", "pools"]) == 1
    assert "s3cret" not in capsys.readouterr().err


# --------------------------------------------------------------------------- the count view agrees with the tracker
#
# The scheduler's view (cluster_pools -> PciDeviceStats.fits) knows free devices only by number per pool;
# the host tracker's support_requests plans real devices.  They must give the same answer, except where
# the count view cannot know: a claim asking for a PF *and* a VF type could be refused by the host because
# the VFs it would take belong to the PF it would take (a PF and its VFs are never handed out together),
# and counts do not say which PF a VF belongs to.  Such request sets are not generated.  IOMMU groups (the
# other thing counts cannot see) are left out of the hosts for the same reason.

PCI_PRODUCTS = ("2236", "1eb8")
NETWORKS = (None, "physnet1", "physnet2")
NUMA = (None, 0, 1)

plain_devices = st.lists(st.tuples(st.sampled_from(PCI_PRODUCTS), st.sampled_from(NUMA), st.sampled_from(NETWORKS)),
                         max_size=5)
pf_devices = st.lists(st.tuples(st.sampled_from(NUMA), st.sampled_from(NETWORKS), st.integers(0, 4)), max_size=2)
kinds = st.sampled_from(["2236", "1eb8", "pf", "vf"])


@st.composite
def pci_request(draw: st.DrawFn, kind: str) -> InstancePciRequest:
    if kind == "pf":
        spec = {"vendor_id": "8086", "product_id": PF_PRODUCT, "dev_type": "type-PF"}
    elif kind == "vf":
        spec = {"vendor_id": "8086", "product_id": VF_PRODUCT}
        if draw(st.booleans()):
            spec["dev_type"] = "type-VF"
    else:
        spec = {"vendor_id": GPU[0], "product_id": kind}
    network = draw(st.sampled_from(NETWORKS))
    if network is not None:
        spec["physical_network"] = network
    return InstancePciRequest(count=draw(st.integers(1, 3)), spec=[spec], alias_name=kind,
                              numa_policy=draw(st.sampled_from(["required", "legacy", "preferred"])),
                              request_id=str(uuid.uuid4()))


@st.composite
def request_sets(draw: st.DrawFn) -> list[InstancePciRequest]:
    chosen = draw(st.lists(kinds, min_size=1, max_size=2).filter(lambda ks: not {"pf", "vf"} <= set(ks)))
    return [draw(pci_request(kind)) for kind in chosen]


def random_host(plain: list[tuple[str, int | None, str | None]], pfs: list[tuple[int | None, str | None, int]]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    devices, spec = [], []
    for n, (product, numa, network) in enumerate(plain):
        address = f"0000:{0x40 + n:02x}:00.0"
        devices.append({"address": address, "vendor_id": GPU[0], "product_id": product, "numa_node": numa})
        if network:
            spec.append({"address": address, "vendor_id": GPU[0], "physical_network": network})
    for p, (numa, network, vfs) in enumerate(pfs):
        devices += sriov(p, vfs, numa)  # VFs on their PF's node
        if network:  # the PF and its VFs on one network
            spec.append({"address": pf_addr(p), "vendor_id": "8086", "physical_network": network})
    spec += [{"vendor_id": "8086"}, {"vendor_id": GPU[0]}]  # everything else, untagged
    return devices, spec


@pytest.fixture(scope="module")
def shared_sqlite(tmp_path_factory) -> Any:
    with Store(tmp_path_factory.mktemp("cluster-property")) as store:
        yield store


@settings(max_examples=100, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(plain=plain_devices, pfs=pf_devices, pre_claims=st.lists(kinds, max_size=3), requests=request_sets(),
       cells=st.sampled_from([None, (0,), (1,), (0, 1)]), socket_map=st.booleans())
def test_the_count_view_agrees_with_the_host_tracker(shared_sqlite, plain, pfs, pre_claims, requests, cells,
                                                     socket_map):
    node = f"h-{uuid.uuid4().hex[:12]}"
    devices, spec = random_host(plain, pfs)
    sockets = {0: 0, 1: 1} if socket_map else None
    tracker = PciDevTracker(shared_sqlite, Whitelist.from_config(spec), node_id=node, numa_sockets=sockets)
    tracker.update_devices_from_hypervisor_resources(devices)
    for n, kind in enumerate(pre_claims):  # some devices taken, their PF/VF relatives blocked
        try:
            tracker.claim_instance(f"vm{n}", [_one(kind)])
        except PciDeviceRequestFailed:
            continue
        if n % 2:
            tracker.allocate_instance(f"vm{n}")

    [view] = cluster_pools(shared_sqlite, [node])
    assert view.stats.free_count() == view.host.free == tracker.pci_stats.free_count()
    expected = tracker.pci_stats.support_requests(requests, cells)
    assert view.stats.fits(requests, cells) == expected
    if cells is None:
        assert bool(fitting_hosts([view], requests)) == expected
    if socket_map:
        # the host's NUMA nodes are known (0 and 1): --numa-cells N fits when some N of them serve
        for size in (1, 2):
            truth = any(tracker.pci_stats.support_requests(requests, c) for c in itertools.combinations((0, 1), size))
            assert bool(fitting_hosts([view], requests, numa_cells=size)) == truth, size


def _one(kind: str) -> InstancePciRequest:
    spec = {"pf": {"vendor_id": "8086", "product_id": PF_PRODUCT, "dev_type": "type-PF"},
            "vf": {"vendor_id": "8086", "product_id": VF_PRODUCT, "dev_type": "type-VF"}}.get(
        kind, {"vendor_id": GPU[0], "product_id": kind})
    return InstancePciRequest(count=1, spec=[spec], request_id=str(uuid.uuid4()))


def test_host_claim_follows_the_vms_numa_nodes_and_policy(cli: Cli) -> None:
    cli.sync("alpha", *HOSTS["alpha"])  # GPUs 0x40, 0x41 on node 0; 0x42, 0x43 on node 1
    claim = ("--host-name", "alpha", "host", "claim")
    got = cli.json(*claim, "vm1", "--request", "GPU:2", "--aliases", str(cli.aliases), "--numa-nodes", "1",
                   "--numa-policy", "required")
    assert sorted(got) == ["0000:42:00.0", "0000:43:00.0"]
    code, _, err = cli(*claim, "vm2", "--request", "GPU:1", "--aliases", str(cli.aliases), "--numa-nodes", "1",
                       "--numa-policy", "required")
    assert code == 1 and "PciDeviceRequestFailed" in err and "NUMA cells [1]" in err  # node 1 is used up
    got = cli.json(*claim, "vm2", "--request", "GPU:1", "--aliases", str(cli.aliases), "--numa-nodes", "1",
                   "--numa-policy", "preferred")
    assert got[0] in ("0000:40:00.0", "0000:41:00.0")
    for bad in ("x", "1,1", "-1", ""):
        code, _, err = cli(*claim, "vm3", "--request", "GPU:1", "--aliases", str(cli.aliases), "--numa-nodes", bad)
        assert code == 2 and "--numa-nodes" in err

"""Every QMP message of hot_add, hot_del, hot_add_many and passthrough hot_add, broken three ways.

For each operation a dry run through :class:`qmpproxy.QmpFaultProxy` counts its
messages in each direction.  Then, for every message (client to QEMU and QEMU to
client), before and after it is forwarded, the connection is stalled (QEMU
seems wedged), dropped, or the client process is killed with SIGKILL.  The
client is a forked child that runs the operation as a lifecycle manager would,
with short QMP timeouts.  After each fault:

* the child ended by success, a kvmslots error (exit 3) or SIGKILL, never by
  any other exception;
* ``reconcile`` on QEMU directly leaves the records equal to QEMU's view: every
  record ``attached`` at the slot QEMU shows, every kvmslots-id device QEMU has
  recorded, no passthrough host device left claimed;
* the next operation of the same kind works.

The guest is a real booted Linux that acknowledges unplugs, so removals are
confirmed by ``DEVICE_DELETED`` exactly as in production.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import signal
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from kvmslots import (
    DeviceAddFailed,
    DeviceSpec,
    DeviceState,
    Monitor,
    Store,
    VMSpec,
    hot_add,
    hot_add_many,
    hot_del,
    reconcile,
)
from kvmslots.devid import parse_device_id
from kvmslots.errors import InvalidDeviceId, KvmSlotsError
from kvmslots.passthrough import HostDevices, PassthroughSpec
from kvmslots.pci.device import PciStatus
from kvmslots.pci.devspec import Whitelist
from kvmslots.pci.discovery import discover_sysfs
from kvmslots.pci.request import get_pci_requests_from_flavor, parse_aliases
from kvmslots.pci.tracker import PciDevTracker
from kvmslots.testvm import TestVM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qmpproxy import ACTIONS, WHENS, QmpFaultProxy  # noqa: E402

VM = "vm1"
#: The child's QMP limits: short, so that a stalled connection ends quickly.
CHILD_COMMAND_TIMEOUT = 0.5
CHILD_CONNECT_TIMEOUT = 2.0
CHILD_UNPLUG_TIMEOUT = 1.0
EXIT_KVMSLOTS_ERROR = 3
EXIT_OTHER_ERROR = 4
_numbers = itertools.count(1)


def fresh_uuid() -> str:
    return str(uuid.UUID(int=(next(_numbers) << 96) | 0x4000_8000_0000_0000_0000 | 0xFA))


def rng(uid: str) -> DeviceSpec:
    return DeviceSpec(uid, "rng", "virtio-rng-pci")


@dataclass
class Context:
    """One operation's world: the VM, the state directory and, for passthrough, the host side."""

    vm: TestVM
    state: Path
    passthrough: bool = False
    device_spec: list[str] = field(default_factory=list)
    host_devices: list[dict[str, Any]] = field(default_factory=list)
    aliases: Any = None
    target: str = ""

    def host(self, store: Store) -> HostDevices | None:
        if not self.passthrough:
            return None
        tracker = PciDevTracker(store, Whitelist.from_config(self.device_spec))
        return HostDevices(tracker)

    def passthrough_spec(self) -> PassthroughSpec:
        [request] = get_pci_requests_from_flavor({"extra_specs": {"pci_passthrough:alias": "hostdev:1"}}, self.aliases)
        return PassthroughSpec(fresh_uuid(), request)


# --- the operations ---------------------------------------------------------------------


async def op_hot_add(store: Store, mon: Monitor, ctx: Context, arg: Any) -> None:
    await hot_add(store, mon, VM, rng(arg), undo_timeout=CHILD_UNPLUG_TIMEOUT)


async def op_hot_del(store: Store, mon: Monitor, ctx: Context, arg: Any) -> None:
    await hot_del(store, mon, VM, arg, timeout=CHILD_UNPLUG_TIMEOUT)


async def op_hot_add_many(store: Store, mon: Monitor, ctx: Context, arg: Any) -> None:
    await hot_add_many(store, mon, VM, [rng(u) for u in arg], undo_timeout=CHILD_UNPLUG_TIMEOUT)


async def op_passthrough(store: Store, mon: Monitor, ctx: Context, arg: Any) -> None:
    # There is no IOMMU here, so QEMU refuses the vfio-pci device_add: the ordinary outcome.
    with pytest.raises(DeviceAddFailed):
        await hot_add(store, mon, VM, arg, host=ctx.host(store), undo_timeout=CHILD_UNPLUG_TIMEOUT)


Operation = Callable[[Store, Monitor, Context, Any], Awaitable[None]]


def _child(operation: Operation, ctx: Context, socket: str, arg: Any) -> None:
    async def go() -> None:
        with Store(ctx.state) as store:
            async with Monitor(socket, connect_timeout=CHILD_CONNECT_TIMEOUT,
                               command_timeout=CHILD_COMMAND_TIMEOUT) as mon:
                await operation(store, mon, ctx, arg)

    try:
        asyncio.run(go())
    except KvmSlotsError:
        os._exit(EXIT_KVMSLOTS_ERROR)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(EXIT_OTHER_ERROR)
    os._exit(0)


# --- checks -----------------------------------------------------------------------------


def _ours(qdev_id: str) -> bool:
    try:
        parse_device_id(qdev_id)
    except InvalidDeviceId:
        return False
    return True


async def settle(ctx: Context) -> None:
    """reconcile until nothing is in flight, then: records == QEMU's view, host devices free."""
    with Store(ctx.state) as store:
        async with Monitor(ctx.vm.qmp_path, connect_timeout=10) as mon:
            host = ctx.host(store)
            for _ in range(100):
                report = await reconcile(store, mon, VM, host=host, unplug_wait=2)
                if not (report.pending or report.resent or report.unverified or report.misplaced):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"reconcile never settled: {report}")
            view = await mon.pci()
            records = store.devices(VM)
            for device in records:
                live = view.find(device.qemu_id)
                assert device.state is DeviceState.ATTACHED, device
                assert live is not None and (live.bus, live.slot) == (0, device.slot), device
            assert {f.qdev_id for f in view.functions if _ours(f.qdev_id)} == {d.qemu_id for d in records}
            assert view.peripherals is not None
            assert {p for p in view.peripherals if _ours(p)} == {d.qemu_id for d in records}
            if host is not None:
                held = [d for d in host.tracker.all_devs if d.status is not PciStatus.AVAILABLE]
                assert held == [], held


async def clear(ctx: Context) -> None:
    """Back to no devices of ours (each removal confirmed by the guest)."""
    with Store(ctx.state) as store:
        async with Monitor(ctx.vm.qmp_path, connect_timeout=10) as mon:
            for device in store.devices(VM):
                result = await hot_del(store, mon, VM, device.uuid, timeout=20, host=ctx.host(store))
                assert result.removed, result


async def direct(ctx: Context, operation: Operation, arg: Any) -> None:
    with Store(ctx.state) as store:
        async with Monitor(ctx.vm.qmp_path, connect_timeout=10) as mon:
            await operation(store, mon, ctx, arg)


# --- the sweep --------------------------------------------------------------------------


@dataclass
class Case:
    """How one operation is swept: its argument, and the state it starts from."""

    operation: Operation
    arg: Callable[[Context], Any]
    before: Callable[[Context, Any], Awaitable[None]] | None = None  # bring the VM to the starting state


async def _attach_target(ctx: Context, uid: str) -> None:
    await direct(ctx, op_hot_add, uid)


CASES = {
    "hot_add": Case(op_hot_add, lambda ctx: fresh_uuid()),
    "hot_del": Case(op_hot_del, lambda ctx: fresh_uuid(), _attach_target),
    "hot_add_many": Case(op_hot_add_many, lambda ctx: [fresh_uuid(), fresh_uuid()]),
    "passthrough_hot_add": Case(op_passthrough, lambda ctx: ctx.passthrough_spec()),
}

TOTALS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    with TestVM(tmp_path_factory.mktemp("sweep-vm"), mode="guest") as vm:
        yield vm


def _context(guest: TestVM, tmp_path: Path, passthrough: bool) -> Context:
    state = tmp_path / "state"
    with Store(state) as store:
        store.define_vm(VMSpec(VM))
    ctx = Context(guest, state, passthrough)
    if passthrough:
        devices = discover_sysfs("/sys")
        assert devices, "this machine shows no PCI devices in /sys/bus/pci/devices"
        target = devices[-1]
        ctx.target = target["address"]
        ctx.device_spec = [f'{{"address": "{target["address"]}"}}']
        with Store(state) as store:
            ctx.host(store).tracker.update_devices_from_hypervisor_resources(devices)  # type: ignore[union-attr]
        ctx.aliases = parse_aliases([{"name": "hostdev", "vendor_id": target["vendor_id"],
                                      "product_id": target["product_id"], "device_type": target["dev_type"]}])
    return ctx


async def _start(ctx: Context, case: Case) -> Any:
    arg = case.arg(ctx)
    if case.before is not None:
        await case.before(ctx, arg)
    return arg


@pytest.mark.parametrize("name", list(CASES))
def test_every_message_of_an_operation_survives_stall_drop_and_kill(guest, tmp_path, name):
    case = CASES[name]
    ctx = _context(guest, tmp_path, passthrough=name == "passthrough_hot_add")
    fork = multiprocessing.get_context("fork")
    outcomes: Counter[str] = Counter()
    with QmpFaultProxy(guest.qmp_path) as proxy:
        # the dry run: how many messages the operation exchanges, in each direction
        arg = asyncio.run(_start(ctx, case))
        proxy.arm("c2s", 10**9, "before", "drop")  # never fires: only resets the counters
        _run_child(fork, case.operation, ctx, proxy, arg, outcomes)
        counts = proxy.counts()
        asyncio.run(settle(ctx))
        asyncio.run(clear(ctx))
        assert counts["c2s"] >= 2 and counts["s2c"] >= 3, counts
        for direction, when, action in itertools.product(("c2s", "s2c"), WHENS, ACTIONS):
            for index in range(1, counts[direction] + 1):
                arg = asyncio.run(_start(ctx, case))
                child: list[multiprocessing.process.BaseProcess] = []
                kill = (lambda child=child: os.kill(child[0].pid, signal.SIGKILL)) if action == "kill" else None
                proxy.arm(direction, index, when, action, kill=kill)
                where = f"{name}: {action} {when} {direction} #{index}"
                code = _run_child(fork, case.operation, ctx, proxy, arg, outcomes, child)
                assert code in (0, EXIT_KVMSLOTS_ERROR, -signal.SIGKILL), f"{where}: exit {code}\n{proxy.describe()}"
                proxy.close_all()
                try:
                    asyncio.run(settle(ctx))  # records == QEMU's view
                    asyncio.run(direct(ctx, case.operation, case.arg(ctx) if case.before is None else
                                       _next_arg_for_del(ctx, arg)))  # the next operation works
                    asyncio.run(clear(ctx))
                except BaseException as exc:
                    raise AssertionError(f"after {where} (child exit {code}): {exc!r}\n{proxy.describe()}") from exc
                outcomes["fired" if proxy.fired else "not reached"] += 1
    TOTALS.update({f"{name} faults": sum(v for k, v in outcomes.items() if k in ("fired", "not reached"))})
    TOTALS.update(outcomes)
    print(f"\n{name}: messages {counts}, outcomes {dict(outcomes)}", file=sys.stderr)
    assert outcomes["fired"] >= 2 * len(WHENS) * len(ACTIONS)


def _next_arg_for_del(ctx: Context, uid: str) -> str:
    """hot_del's next operation: remove the target if the fault left it, else a new one."""
    with Store(ctx.state) as store:
        if any(d.uuid == uid for d in store.devices(VM)):
            return uid
    other = fresh_uuid()
    asyncio.run(_attach_target(ctx, other))
    return other


def _run_child(fork: Any, operation: Operation, ctx: Context, proxy: QmpFaultProxy, arg: Any,
               outcomes: Counter[str], holder: list | None = None) -> int:
    child = fork.Process(target=_child, args=(operation, ctx, proxy.listen, arg))
    if holder is not None:
        holder.append(child)
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail(f"the child hung (an unbounded wait?)\n{proxy.describe()}")
    names = {0: "ok", EXIT_KVMSLOTS_ERROR: "kvmslots error", -signal.SIGKILL: "killed"}
    outcomes[names.get(child.exitcode, "other")] += 1
    return int(child.exitcode)

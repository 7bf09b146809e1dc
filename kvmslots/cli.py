"""The ``kvmslots`` command: parse, call the library, print.

Nothing here decides anything; every operation is a library call, so the CLI
and a lifecycle manager that imports kvmslots always behave the same.

Exit status: 0 ok, 1 the operation failed (nothing was changed unless the
message says so), 2 bad usage (including a malformed value or file).  Errors
go to stderr on one line.  ``--json`` makes every command print JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, NoReturn, Sequence, TypeVar

from . import __version__, hotplug
from .capabilities import check_machine_available
from .devid import PropValue, validate_uuid, validate_vm_name
from .errors import InvalidFunction, KvmSlotsError, ValidationError
from .guest import add_guest_parser, cmd_guest_build
from .model import DEFAULT_HOTPLUG_PORTS, Controller, Device, DeviceGroup, DeviceSpec, DeviceState, VMSpec
from .monitor import Monitor, command_timeout_from_env, validate_timeout
from .pciview import PciOccupancy
from .slots import NUM_SLOTS
from .store import DATABASE_URL_ENV, Store
from .sync import with_monitor
from .topology import Topology

__all__ = ["main"]

T = TypeVar("T")
DEFAULT_STATE_DIR = "/var/lib/kvmslots"
HOST_ENV = "KVMSLOTS_HOST"
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SLOT_MARKS = {
    "reserved": "R", "ours": "O", "group": "M", "pending": "P", "controller": "C", "foreign": "F", "free": ".",
}


class UsageError(Exception):
    """Bad usage: exit 2."""


class _ArgumentError(UsageError):
    """argparse refused the command line (reported by main, as text or as JSON)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line on stderr, exit 2 (main prints it)
        raise _ArgumentError(message)


# --------------------------------------------------------------------------- helpers


def _read_json_file(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return json.loads(text)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{what} {path} is nested too deeply to be a valid document") from None


def _write_private(path: str, text: str, what: str) -> None:
    """Write a file 0600, never through a symlink; a path that cannot be written is bad usage."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    except OSError as exc:
        raise UsageError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def _prop_value(text: str) -> PropValue:
    """A property value exactly as typed: ``serial=007`` stays ``"007"``.  Values of integer
    properties become integers at ``attach``, where QEMU says which properties those are."""
    return text


def _parse_props(items: Sequence[str]) -> dict[str, PropValue]:
    props: dict[str, PropValue] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"property {item!r} is not key=value")
        props[key] = _prop_value(value)
    return props


def _split_commas(text: str) -> list[str]:
    """Split on ',' where ',,' stands for a literal comma (QEMU's option syntax)."""
    return [part.replace("\0", ",") for part in text.replace(",,", "\0").split(",") if part]


def _parse_device(text: str) -> DeviceSpec:
    """``TYPE:UUID:DRIVER[:key=value,...]``."""
    parts = text.split(":", 3)
    if len(parts) < 3:
        raise UsageError(f"--device {text!r} is not TYPE:UUID:DRIVER[:key=value,...]")
    props = _parse_props(_split_commas(parts[3])) if len(parts) == 4 else {}
    return DeviceSpec(parts[1], parts[0], parts[2], props)


def _device_json(device: Device) -> dict[str, Any]:
    return {"id": device.qemu_id, "uuid": device.uuid, "type": device.dev_type, "driver": device.driver,
            "bus": device.bus, "slot": device.slot, "function": device.function}


def _controller_json(controller: Controller) -> dict[str, Any]:
    return {"id": controller.id, "uuid": None, "type": controller.kind.label, "driver": controller.kind.value,
            "bus": controller.bus, "slot": controller.slot, "function": controller.function,
            "chassis": controller.chassis}


def _group_devices(devices: list[DeviceSpec], groups: Sequence[str]) -> list[DeviceSpec | DeviceGroup]:
    """Fold the --device entries named by each --group UUID,UUID,... into one multifunction group,
    at the position of its first member (function order = the order in --group)."""
    by_uuid = {d.uuid: d for d in devices}
    units: list[DeviceSpec | DeviceGroup] = list(devices)
    for text in groups:
        uuids = [validate_uuid(u.strip()) for u in text.split(",") if u.strip()]
        missing = [u for u in uuids if u not in by_uuid]
        if missing:
            raise UsageError(f"--group names {', '.join(missing)}, which no --device gives")
        members = [by_uuid[u] for u in uuids]
        if any(m not in units for m in members):
            raise InvalidFunction("A device is in two --group lists")
        first = min(units.index(m) for m in members)
        units[first] = DeviceGroup(tuple(members))
        units = [u for u in units if not (isinstance(u, DeviceSpec) and u in members)]
    return units


def _qemu_binary(args: argparse.Namespace) -> str | None:
    """The QEMU binary whose machine types ``plan --machine`` is checked against, if there is one."""
    import shutil

    binary = args.qemu or os.environ.get("KVMSLOTS_QEMU")
    if binary:
        return binary
    return shutil.which("qemu-system-x86_64")


def _with_monitor(args: argparse.Namespace, work: Callable[[Monitor], Awaitable[T]]) -> T:
    return with_monitor(args.qmp, work, connect_timeout=args.connect_timeout, command_timeout=args.qmp_timeout)


def _seconds(text: str, what: str, *, allow_zero: bool = True) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what} must be a number of seconds, got {text!r}") from None
    try:
        return validate_timeout(value, what, allow_zero=allow_zero)
    except ValidationError as exc:
        raise UsageError(str(exc)) from None


class Output:
    """Prints text for people or JSON for programs."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: Any, text: str | Callable[[], str]) -> None:
        """Print *data* as one line of JSON when ``as_json`` (``--json``), else *text*; a callable *text* is
        called only when people read the output."""
        if self.as_json:
            print(json.dumps(data, indent=None, sort_keys=False))
        else:
            print(text() if callable(text) else text)


# --------------------------------------------------------------------------- VM commands


def cmd_plan(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots plan VM --device ...``: plan the boot devices and print one shell-quoted ``-device``
    argument per line.

    The ``--device`` list is the VM's whole device set, so planning a VM that has stored devices without any
    ``--device`` is bad usage (exit 2) rather than dropping them all.
    """
    units = _group_devices([_parse_device(text) for text in args.device], args.group)
    vm: VMSpec | str = args.vm
    old = store.get_vm(args.vm) if store.has_vm(args.vm) else None
    if old is not None and not units and store.devices(args.vm):
        raise UsageError(
            f"plan {args.vm} without --device would drop its {len(store.devices(args.vm))} stored device(s): the "
            "--device list is the VM's whole device set (kvmslots show lists them; delete forgets the VM)"
        )
    changes = (args.mask, args.machine, args.reserve_slots, args.hotplug_ports, args.spare_bridge)
    if old is None or any(value is not None for value in changes):
        machine = args.machine or (old.machine if old else "pc")
        binary = _qemu_binary(args)
        if args.machine and binary:  # a name this QEMU lacks would only fail when the VM starts
            check_machine_available(machine, binary)
        same_family = old is not None and old.family is VMSpec(args.vm, machine).family
        vm = VMSpec(
            args.vm,
            machine,
            args.mask or (old.mask if same_family and old and args.reserve_slots is None else ""),
            old.bus_masks if same_family and old else {},
            hotplug_ports=args.hotplug_ports if args.hotplug_ports is not None else (
                old.hotplug_ports if old else DEFAULT_HOTPLUG_PORTS),
            spare_bridge=args.spare_bridge if args.spare_bridge is not None else bool(
                same_family and old and old.spare_bridge),
            reserve_slots=args.reserve_slots,
        )
    plan = asyncio.run(hotplug.plan_boot(store, vm, units, host=_host_devices(args, store)))
    rows = _argument_rows(plan.controllers, plan.devices)
    out.emit(rows, lambda: "\n".join(_device_lines(rows)))
    return 0


def _argument_rows(controllers: Sequence[Controller], devices: Sequence[Device]) -> list[dict[str, Any]]:
    """One JSON row per ``-device`` argument, controllers first (as :func:`hotplug.common.device_arguments`)."""
    rows = [{**_controller_json(c), "arg": c.device_option()} for c in controllers]
    rows += [{**_device_json(d), "arg": d.device_option()} for d in devices]
    for row in rows:
        row.pop("chassis", None)
    return rows


def _device_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``-device ARG`` lines, quoted for a POSIX shell: a value such as mac=$(touch x) stays data in
    ``qemu ... $(kvmslots plan ...)`` only through eval; quoted, ``eval "qemu-system-x86_64 $(kvmslots
    plan ...)"`` is safe."""
    return [f"-device {shlex.quote(row['arg'])}" for row in rows]


def cmd_attach(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots attach VM --qmp SOCKET``: hot-plug one device, several (``--device``, all or nothing) or one
    multifunction slot (``--same-slot``), and print where each one landed."""
    if args.device:
        if args.type or args.uuid or args.driver or args.prop:
            raise UsageError("give either --device (repeatable) or --type/--uuid/--driver/--prop, not both")
        specs = [_parse_device(text) for text in args.device]
        if args.same_slot:
            if len(specs) < 2:
                raise UsageError("--same-slot needs at least two --device")
            group = DeviceGroup(tuple(specs), args.bus, args.slot)
            hotplug.refuse_raw_passthrough(group)
            devices = _with_monitor(args, lambda mon: hotplug.hot_add_group(store, mon, args.vm, group))
        else:
            if args.bus or args.slot is not None:
                specs = [DeviceSpec(s.uuid, s.dev_type, s.driver, s.props, args.bus, args.slot) for s in specs]
            for spec in specs:
                hotplug.refuse_raw_passthrough(spec)
            devices = _with_monitor(args, lambda mon: hotplug.hot_add_many(store, mon, args.vm, specs))
        out.emit([_device_json(d) for d in devices], "\n".join(
            f"attached {d.qemu_id} at {d.bus} slot {d.slot} function {d.function}" for d in devices
        ))
        return 0
    if args.same_slot:
        raise UsageError("--same-slot groups several --device entries")
    if not (args.type and args.uuid and args.driver):
        raise UsageError("attach needs --type, --uuid and --driver (or --device TYPE:UUID:DRIVER)")
    spec = DeviceSpec(args.uuid, args.type, args.driver, _parse_props(args.prop), args.bus, args.slot)
    hotplug.refuse_raw_passthrough(spec)  # bad usage, found before QEMU is contacted
    device = _with_monitor(args, lambda mon: hotplug.hot_add(store, mon, args.vm, spec))
    out.emit(_device_json(device), f"attached {device.qemu_id} at {device.bus} slot {device.slot}")
    return 0


def cmd_detach(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots detach VM --uuid UUID --qmp SOCKET``: hot-unplug a device with its whole slot; a guest that
    has not ejected it within ``--timeout`` is still exit 0, printed as ``pending`` (the slot stays taken
    until reconcile sees the device gone)."""
    host = _host_devices(args, store)
    result = _with_monitor(
        args, lambda mon: hotplug.hot_del(store, mon, args.vm, args.uuid, timeout=args.timeout, host=host)
    )
    device = result.device
    ids = ", ".join(d.qemu_id for d in result.devices)
    text = (
        f"removed {ids} (DEVICE_DELETED); slot {device.slot} is free"
        if result.removed
        else f"pending: {ids} was asked to leave but the guest has not ejected it within "
        f"{args.timeout:g}s; slot {device.slot} stays reserved until it does (run reconcile later)"
    )
    out.emit(
        {"id": device.qemu_id, "uuid": device.uuid, "result": result.status.value,
         "ids": [d.qemu_id for d in result.devices]},
        text,
    )
    return 0


def cmd_reconcile(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots reconcile VM --qmp SOCKET``: repair the records against QEMU and print the report, one line
    per list (``-`` for an empty one)."""
    host = _host_devices(args, store)
    report = _with_monitor(args, lambda mon: hotplug.reconcile(store, mon, args.vm, host=host))
    data = report.to_json()

    def text() -> str:
        lines = [f"{key}: {', '.join(map(str, value)) if value else '-'}" for key, value in data.items() if key != "vm"]
        return "\n".join([f"reconcile {args.vm}", *lines])

    out.emit(data, text)
    return 0


def cmd_adopt(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots adopt VM --qmp SOCKET``: record a running VM kvmslots did not start; for a VM already stored
    nothing is written and its differences from QEMU are printed instead."""
    from .hotplug.adopt import adopt, parse_uuids

    uuids = parse_uuids(_read_json_file(args.uuids, "UUID list")) if args.uuids else {}
    report = _with_monitor(
        args, lambda mon: adopt(store, mon, args.vm, uuids, mask=args.mask or "", reserve_slots=args.reserve_slots)
    )
    data = report.to_json()

    def text() -> str:
        head = f"adopted {args.vm} ({report.machine})" if report.created else f"{args.vm} is already stored"
        lines = [f"{key}: {', '.join(data[key]) or '-'}" for key in ("devices", "controllers", "foreign")]
        if not report.created:
            lines.append(f"differences: {'; '.join(report.differences) or 'none'}")
        return "\n".join([head, *lines])

    out.emit(data, text)
    return 0


def cmd_show(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots show VM``: draw the slot map and list the devices; QEMU is asked only with ``--qmp``
    (without it, devices kvmslots did not place are not shown)."""
    vm = store.get_vm(args.vm)
    devices = store.devices(args.vm)
    controllers = store.controllers(args.vm)
    view = _with_monitor(args, lambda mon: mon.pci()) if args.qmp else None
    buses = slot_states(vm, controllers, devices, view)
    data = {
        "vm": vm.name,
        "machine": vm.machine,
        "buses": buses,
        "controllers": [_controller_json(c) for c in controllers],
        "devices": [{**_device_json(d), "state": d.state.value} for d in devices],
        "live": view is not None,
    }

    out.emit(data, lambda: render_slot_map(vm, controllers, devices, buses, live=view is not None))
    return 0


def render_slot_map(
    vm: VMSpec, controllers: Sequence[Controller], devices: Sequence[Device], buses: dict[str, list[str]], *, live: bool
) -> str:
    """The slot map as text: one row of 32 marks per bus (a port's bus shows its one slot), then the tables."""
    lines = [f"VM {vm.name} (machine {vm.machine})" + ("" if live else "; no --qmp: foreign devices not shown")]
    ruler = "".join(str(s // 10) if s % 10 == 0 else " " for s in range(NUM_SLOTS))
    width = max([8, *(len(bus) for bus in buses)])
    where = {c.id: f"{c.kind} at {c.bus} {c.addr}, chassis {c.chassis}" for c in controllers}
    lines.append(f"  {'':<{width}} {ruler}")
    for bus, states in buses.items():
        marks = "".join(_SLOT_MARKS[s] for s in states)
        lines.append(f"  {bus:<{width}} {marks}" + (f"  ({where[bus]})" if bus in where else ""))
    lines.append("  legend: R reserved, O ours, M ours, several functions, P pending (attaching/detaching), "
                 "C port or bridge, F foreign, . free")
    if devices:
        lines.append(f"  {'ID':<28} {'TYPE':<8} {'DRIVER':<16} {'BUS':<{width}} {'ADDR':>6}  STATE")
        for d in devices:
            addr = f"{d.slot:#04x}.{d.function}"
            lines.append(
                f"  {d.qemu_id:<28} {d.dev_type:<8} {d.driver:<16} {d.bus:<{width}} {addr:>6}  {d.state.value}"
            )
    return "\n".join(lines)


def slot_states(
    vm: VMSpec, controllers: Sequence[Controller], devices: Sequence[Device], view: PciOccupancy | None
) -> dict[str, list[str]]:
    """``{bus: 32 slot states}`` for every bus of the VM's topology (and foreign buses QEMU shows)."""
    topo = Topology(vm, controllers)
    if view is not None:
        topo.occupy_live(view)
    topo.occupy_devices(devices)  # also brings in a caller's own buses
    ours = {d.qemu_id for d in devices}
    ids = {c.id for c in controllers}
    buses: dict[str, list[str]] = {}
    for bus in topo.walk():
        states = ["reserved" if bus.slots.is_masked(s) else "free" for s in range(NUM_SLOTS)]
        for slot, held in bus.functions.items():
            holders = set(held.values())
            if holders & ids:
                states[slot] = "controller"
            elif view is not None and not holders & ours and not bus.slots.is_masked(slot):
                states[slot] = "foreign"
        on_bus = [d for d in devices if d.bus == bus.name]
        for d in on_bus:
            if d.state in (DeviceState.ATTACHING, DeviceState.DETACHING):
                states[d.slot] = "pending"
            elif states[d.slot] != "pending":
                states[d.slot] = "group" if d.in_group else "ours"
        buses[bus.name] = states
    return buses


def cmd_delete(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots delete VM``: forget the VM's slots, ports and bridges (its host devices stay claimed until
    ``host free``)."""
    store.delete_vm(args.vm)
    out.emit({"vm": args.vm, "deleted": True}, f"deleted the state of {args.vm} (its slots, ports and bridges)")
    return 0


def cmd_export(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots export VM``: the VM's state document on standard output, or written 0600 to ``--output``
    with a one-line report."""
    _put_document(args, out, args.vm, store.export_vm(args.vm), {}, f"exported {args.vm} to {args.output}")
    return 0


def _put_document(
    args: argparse.Namespace, out: Output, vm: str, document: Any, facts: dict[str, Any], said: str
) -> None:
    """A JSON document to ``--output`` (0600, reported) or to standard output (the document itself)."""
    text = json.dumps(document, indent=2, sort_keys=True)
    if args.output:
        _write_private(args.output, text + "\n", "--output")
        out.emit({"vm": vm, "file": args.output, **facts}, said)
    else:
        print(text)


def cmd_import(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots import FILE``: load an exported document (``-`` reads stdin), checked whole before anything
    is written; with ``--ganeti-runtime FILE VM``, take over a Ganeti instance instead."""
    if args.ganeti_runtime is not None:
        from .ganeti import cmd_import_ganeti

        return cmd_import_ganeti(args, store, out)
    if args.file is None:
        raise UsageError("import needs FILE (or --ganeti-runtime FILE VM)")
    document = _read_json_file(args.file, "runtime document")
    vm = store.import_vm(document, replace=args.replace)
    count = len(store.devices(vm.name))
    out.emit({"vm": vm.name, "devices": count}, f"imported {vm.name} with {count} device(s)")
    return 0


# --------------------------------------------------------------------------- live migration


def cmd_migrate_export(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots migrate export VM --qmp SOCKET``: on the source, the migration document, on standard output
    or written 0600 to ``--output``."""
    from .hotplug import migrate

    document = _with_monitor(args, lambda mon: migrate.outgoing(store, mon, args.vm))
    count = len(document["state"]["devices"])
    said = f"migration document of {args.vm} ({count} device(s)) written to {args.output}"
    _put_document(args, out, args.vm, document, {"devices": count}, said)
    return 0


def cmd_migrate_plan(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots migrate plan FILE``: on the target, record the incoming VM and print its ``-device`` and
    ``-incoming`` arguments; devices kvmslots did not place are warned about on stderr."""
    from .hotplug import migrate

    plan = migrate.plan_incoming(store, _read_json_file(args.file, "migration document"), incoming=args.incoming)
    rows = _argument_rows(plan.controllers, plan.devices)
    data = {"vm": plan.vm.name, "devices": rows, "incoming": plan.incoming, "unmanaged": list(plan.unmanaged),
            "args": plan.qemu_args}

    def text() -> str:  # quoted for a POSIX shell, as 'plan' prints them
        return "\n".join([*_device_lines(rows), f"-incoming {shlex.quote(plan.incoming)}"])

    out.emit(data, text)
    for item in plan.unmanaged:
        print(f"warning: {plan.vm.name} also runs {item.get('qdev_id') or item.get('description')} at bus "
              f"{item['bus']} slot {item['slot']} function {item['function']}, which kvmslots did not place: "
              "start the target with it too", file=sys.stderr)
    return 0


def cmd_migrate_confirm(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots migrate confirm FILE --qmp SOCKET``: on the target, after the migration, check the devices
    in QEMU and print (or write to ``--output``) the confirmation the source releases on."""
    from .hotplug import migrate

    document = _read_json_file(args.file, "migration document")
    done = _with_monitor(args, lambda mon: migrate.confirm_incoming(store, mon, document))
    said = f"{done.vm}: {len(done.devices)} device(s) confirmed on this host; confirmation written to {args.output}"
    _put_document(args, out, done.vm, done.to_json(), {"devices": list(done.devices)}, said)
    return 0


def cmd_migrate_abort(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots migrate abort FILE``: on the target, after a failed migration, drop the incoming records and
    print the ids dropped."""
    from .hotplug import migrate

    document = migrate.parse_migration(_read_json_file(args.file, "migration document"))
    dropped = migrate.abort_incoming(store, document)
    vm = document.vm.name
    out.emit({"vm": vm, "dropped": [d.qemu_id for d in dropped]},
             f"dropped the incoming plan of {vm} ({len(dropped)} device(s))")
    return 0


def cmd_migrate_release(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots migrate release FILE --confirmation FILE --qmp SOCKET``: on the source, forget the VM's
    records once the target's confirmation and QEMU's migration status check out."""
    from .hotplug import migrate

    document = migrate.parse_migration(_read_json_file(args.file, "migration document"))
    confirmation = _read_json_file(args.confirmation, "migration confirmation")
    released = _with_monitor(args, lambda mon: migrate.release_outgoing(store, mon, document, confirmation))
    vm = document.vm.name
    out.emit({"vm": vm, "released": [d.qemu_id for d in released]},
             f"released the records of {vm} ({len(released)} device(s)): it runs on the target now")
    return 0


# --------------------------------------------------------------------------- host commands


def _host_name(args: argparse.Namespace, store: Store) -> str:
    """This host's name in the device inventory: --host-name, $KVMSLOTS_HOST, else the machine's
    hostname on a shared (PostgreSQL) state and 'local' in a SQLite file (as kvmslots <= 0.3 did)."""
    name = getattr(args, "host_name", None) or os.environ.get(HOST_ENV)
    if not name:
        name = socket.gethostname() if store.shared else "local"
    if not _HOST_RE.fullmatch(name):
        raise UsageError(f"host name {name!r} is not valid (letters, digits, '.', '_', ':' and '-', at most 128)")
    return name


def _tracker(args: argparse.Namespace, store: Store, device_spec: Any | None = None) -> Any:
    from .pci.devspec import Whitelist
    from .pci.tracker import PciDevTracker

    whitelist = Whitelist.from_config(device_spec) if device_spec is not None else None
    return PciDevTracker(store, whitelist, node_id=_host_name(args, store))


def _host_devices(args: argparse.Namespace, store: Store) -> Any:
    """The host side of passthrough devices, so that removing one frees its host device.
    (The CLI binds nothing to vfio-pci; a manager that wants that passes a binder to the library.)"""
    from .passthrough import HostDevices

    return HostDevices(_tracker(args, store))


def _stored_device_spec(store: Store, host: str) -> Any | None:
    """The device spec the last ``host sync --device-spec`` stored (in the database; kvmslots <= 0.3
    kept it in the SQLite state directory, which is still read)."""
    with store.reading() as txn:
        spec = txn.device_spec(host)
    if spec is None and store.state_dir is not None:
        legacy = Path(store.state_dir) / "device_spec.json"
        if legacy.exists():
            spec = _read_json_file(str(legacy), "stored device spec")
    return spec


def cmd_host_sync(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots host sync``: sync this host's tracker from sysfs, libvirt or a device list and print what
    was added, updated, removed and kept.

    The device spec is ``--device-spec`` (then stored for later syncs) or the one stored last; no spec at all
    is bad usage (exit 2).
    """
    from .pci import discovery

    host = _host_name(args, store)
    spec = _read_json_file(args.device_spec, "device spec") if args.device_spec else _stored_device_spec(store, host)
    if spec is None:
        raise UsageError("no device spec yet: give --device-spec FILE (a JSON list of Nova device_spec entries)")
    tracker = _tracker(args, store, spec)  # validates the spec before anything is read or written
    if args.devices_json:
        devices = _read_json_file(args.devices_json, "device list")
    elif args.libvirt:
        devices = discovery.discover_libvirt(args.libvirt)
    else:
        devices = discovery.discover_sysfs(args.sysfs)
    report = tracker.update_devices_from_hypervisor_resources(devices)
    if args.device_spec:
        with store.transaction() as txn:
            txn.set_device_spec(host, spec)
    data = report.to_json()
    out.emit(data, lambda: "\n".join(f"{k} {len(v)}: {' '.join(v) or '-'}" for k, v in data.items()))
    return 0


def cmd_host_devices(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots host devices``: list this host's tracked devices (only those in ``--status``, if given; an
    unknown status is bad usage, exit 2)."""
    from .pci.device import PciStatus

    if args.status is not None and args.status not in {s.value for s in PciStatus}:
        raise UsageError(f"--status must be one of {', '.join(s.value for s in PciStatus)}, got {args.status!r}")
    rows = [
        {"address": d.address, "vendor_id": d.vendor_id, "product_id": d.product_id, "dev_type": d.dev_type,
         "parent_addr": d.parent_addr, "numa_node": d.numa_node, "status": d.status.value, "instance": d.instance_uuid}
        for d in _tracker(args, store).all_devs
        if args.status is None or d.status.value == args.status
    ]

    def text() -> str:
        lines = [
            f"{'ADDRESS':<13} {'VENDOR':<6} {'PRODUCT':<7} {'TYPE':<8} {'PARENT':<13} {'NUMA':>4}  "
            f"{'STATUS':<11} INSTANCE"
        ]
        for r in rows:
            numa = "-" if r["numa_node"] is None else str(r["numa_node"])
            lines.append(f"{r['address']:<13} {r['vendor_id']:<6} {r['product_id']:<7} {r['dev_type']:<8} "
                         f"{r['parent_addr'] or '-':<13} {numa:>4}  {r['status']:<11} {r['instance'] or '-'}")
        return "\n".join(lines)

    out.emit(rows, text)
    return 0


def cmd_host_pools(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots host pools``: list this host's pools of free devices with their counts."""
    rows = [
        {"vendor_id": p.vendor_id, "product_id": p.product_id, "numa_node": p.numa_node, "dev_type": p.dev_type,
         "tags": dict(p.tags), "count": p.count}
        for p in _tracker(args, store).pci_stats.pools
    ]

    out.emit(rows, lambda: "\n".join([_POOL_HEADER.format("COUNT"), *map(_pool_line, rows)]))
    return 0


_POOL_HEADER = f"{'VENDOR':<6} {'PRODUCT':<7} {'NUMA':>4}  {'TYPE':<8} {{:>5}}  TAGS"


def _pool_line(row: dict[str, Any]) -> str:
    """One pool as ``host pools`` and ``cluster pools`` print it."""
    numa = "-" if row["numa_node"] is None else str(row["numa_node"])
    tags = ",".join(f"{k}={v}" for k, v in sorted(row["tags"].items())) or "-"
    return f"{row['vendor_id']:<6} {row['product_id']:<7} {numa:>4}  {row['dev_type']:<8} {row['count']:>5}  {tags}"


def cmd_host_claim(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots host claim VM --request ... --aliases FILE``: claim host devices for the VM, all or nothing,
    and print their addresses."""
    from .pci.request import get_pci_requests_from_flavor, parse_aliases

    tracker = _tracker(args, store)
    # an alias may ask for any tag the operator's device_spec gave the tracked devices
    extra_tags = {name for device in tracker.all_devs for name in device.tags}
    aliases = parse_aliases(_read_json_file(args.aliases, "aliases file"), extra_tags=extra_tags)
    requests = get_pci_requests_from_flavor(
        {"extra_specs": {"pci_passthrough:alias": args.request}}, aliases, args.numa_policy
    )
    claimed = tracker.claim_instance(args.vm, requests, numa_cells=_numa_nodes(args.numa_nodes))
    addresses = [d.address for d in claimed]
    out.emit(addresses, f"claimed for {args.vm}: {' '.join(addresses)}")
    return 0


def _numa_nodes(text: str | None) -> list[int] | None:
    """``--numa-nodes 0,1``: the host NUMA nodes of the VM's cells, distinct and non-negative."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts) or len(set(map(int, parts))) != len(parts):
        raise UsageError(f"--numa-nodes must be distinct NUMA node numbers such as 0 or 0,1, got {text!r}")
    return [int(part) for part in parts]


def cmd_host_free(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots host free VM``: free every host device the VM holds, claimed or allocated, and print their
    addresses (``nothing`` when it held none: still exit 0)."""
    tracker = _tracker(args, store)
    addresses = [d.address for d in tracker.get_instance_pci_devs(args.vm, "all")]
    tracker.free_instance(args.vm)
    out.emit(addresses, f"freed for {args.vm}: {' '.join(addresses) or 'nothing'}")
    return 0


def _pool_row(pool: dict[str, Any]) -> dict[str, Any]:
    keys = ("vendor_id", "product_id", "numa_node", "dev_type", "parent_addr", "count")
    return {**{k: pool.get(k) for k in keys}, "tags": {k: v for k, v in pool.items() if k not in keys}}


def cmd_cluster_pools(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots cluster pools``: every host's pools of free devices (or only the ``--host`` ones), from one
    consistent read; a host without free devices shows one empty row."""
    from .cluster import cluster_pools

    hosts = cluster_pools(store, args.host)
    data = [{**h.to_json(), "pools": [_pool_row(p) for p in h.stats]} for h in hosts]

    def text() -> str:
        lines = [f"{'HOST':<20} " + _POOL_HEADER.format("FREE")]
        empty: dict[str, Any] = {"vendor_id": "-", "product_id": "-", "numa_node": None, "dev_type": "-", "count": 0,
                                 "tags": {}}
        for host in data:
            lines += [f"{host['host']:<20} {_pool_line(r)}" for r in host["pools"] or [empty]]
        return "\n".join(lines)

    out.emit(data, text)
    return 0


def cmd_cluster_hosts(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots cluster hosts --request ... --aliases FILE``: the hosts whose free devices could meet the
    request, by counts (the host's own claim still decides); when none fits it says so (exit 0)."""
    from .cluster import cluster_pools, fitting_hosts
    from .pci.request import get_pci_requests_from_flavor, parse_aliases

    if args.numa_cells is not None and args.numa_cells < 1:
        raise UsageError(f"--numa-cells must be at least 1, got {args.numa_cells}")
    # an alias may ask for any tag some host's device_spec gave its devices
    inventory = cluster_pools(store)
    extra_tags = {k for h in inventory for p in h.stats.pools for k in p.tags}
    aliases = parse_aliases(_read_json_file(args.aliases, "aliases file"), extra_tags=extra_tags)
    flavor = {"extra_specs": {"pci_passthrough:alias": args.request}}
    requests = get_pci_requests_from_flavor(flavor, aliases, args.numa_policy)
    fits = fitting_hosts(inventory, requests, numa_cells=args.numa_cells)
    data = [fit.to_json() for fit in fits]

    def text() -> str:
        if not data:
            return f"no host can meet {args.request}"
        return "\n".join(
            f"{d['host']}" + ("" if d["numa_cells"] is None else f"  NUMA {','.join(map(str, d['numa_cells'])) or '-'}")
            for d in data
        )

    out.emit(data, text)
    return 0


def cmd_cluster_forget(args: argparse.Namespace, store: Store, out: Output) -> int:
    """``kvmslots cluster forget HOST``: remove a host that is gone, with its devices, from the inventory; an
    unknown host fails (exit 1)."""
    from .cluster import forget_host

    gone = forget_host(store, args.host)
    out.emit({"host": args.host, "devices": gone}, f"forgot host {args.host} and its {gone} device(s)")
    return 0


def cmd_demo(args: argparse.Namespace, store: Store | None, out: Output) -> int:
    """``kvmslots demo``: run :func:`kvmslots.demo.run_demo` in the state directory given (``--state`` or the
    environment) or a new temporary one; *store* is unused (the demo opens its own)."""
    from .demo import run_demo

    return run_demo(args.state_given, as_json=out.as_json)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``kvmslots`` argument parser with every command and option (the CLI reference is generated from
    it).  Bad usage raises instead of exiting, so that :func:`main` reports it as text or JSON."""
    parser = _Parser(prog="kvmslots", description="Stable PCI slots, device ids and safe hotplug for QEMU/KVM VMs.")
    parser.add_argument("--state", metavar="DIR|URL", help="where the state lives: a directory for this host's "
                        "SQLite file (created 0700), or a postgresql:// URL of a database many hosts share "
                        f"(default ${DATABASE_URL_ENV}, else $KVMSLOTS_STATE_DIR, else {DEFAULT_STATE_DIR})")
    parser.add_argument("--host-name", metavar="NAME", help="this host's name in the device inventory (default "
                        f"${HOST_ENV}; else the hostname on a PostgreSQL state, 'local' on a SQLite one)")
    parser.add_argument("--json", action="store_true", help="machine-readable output: every command prints JSON, "
                        "and a failure prints one JSON object on stderr ({\"error\": CLASS, \"message\": ..., "
                        "and the failure's facts})")
    parser.add_argument("--version", action="version", version=f"kvmslots {__version__}",
                        help="print kvmslots' version and exit")
    parser.add_argument("--qmp-timeout", metavar="SECONDS", help="longest wait for QEMU to answer one QMP "
                        "command (default $KVMSLOTS_QMP_TIMEOUT or 15); a wedged QEMU ends the command with exit 1")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("plan", help="plan a VM's boot devices and print the -device arguments")
    p.add_argument("vm", help="the VM's name (letters, digits, '.', '_', '-'; created on first plan)")
    p.add_argument("--device", action="append", default=[], metavar="TYPE:UUID:DRIVER[:key=value,...]",
                   help="a device of the VM (repeat for each; the list is the VM's whole device set)")
    p.add_argument("--group", action="append", default=[], metavar="UUID,UUID,...",
                   help="put these --device entries in one multifunction slot, as functions 0, 1, ... in this order")
    p.add_argument("--machine", help="QEMU machine type: pc, q35, or a versioned name such as pc-q35-7.2 "
                   "(default pc; checked against the QEMU binary's own list when one is found)")
    p.add_argument("--qemu", metavar="BINARY", help="QEMU binary whose machine types --machine is checked "
                   "against (default $KVMSLOTS_QEMU, else qemu-system-x86_64 on PATH)")
    reserve = p.add_mutually_exclusive_group()
    reserve.add_argument("--mask", help="32-character reservation mask of the root bus (default: the machine's "
                         "built-ins; pc 1111 then zeros, q35 slots 0, 1 and 0x1f)")
    reserve.add_argument("--reserve-slots", type=int, metavar="N",
                         help="reserve the first N slots (0-32) of the root bus: Ganeti's kvm_pci_reservations")
    p.add_argument("--hotplug-ports", type=int, metavar="N", help="q35: spare pcie-root-ports kept for hot add "
                   f"(default {DEFAULT_HOTPLUG_PORTS}); ports cannot be added while the VM runs")
    p.add_argument("--spare-bridge", action="store_true", default=None,
                   help="pc: plan a pci-bridge up front, so hot add has room once pci.0 is full")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("attach", help="hot add a device (or several, or a multifunction group) to a running VM")
    p.add_argument("vm", help="the VM's name in the state store")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the running VM's QMP socket")
    p.add_argument("--type", help="device type, the first part of its id (nic, disk, ...)")
    p.add_argument("--uuid", help="the device's UUID (its id carries the first group)")
    p.add_argument("--driver", help="QEMU device model, e.g. virtio-net-pci")
    p.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE", help="a device property (repeatable)")
    p.add_argument("--device", action="append", default=[], metavar="TYPE:UUID:DRIVER[:key=value,...]",
                   help="a device to add (repeatable, instead of --type/--uuid/--driver); all or nothing")
    p.add_argument("--same-slot", action="store_true",
                   help="put the --device entries in one multifunction slot (functions 0, 1, ... in order)")
    p.add_argument("--bus", help="bus to use (default: chosen by machine type: pci.0 then bridges on pc, "
                   "a free pcie-root-port on q35)")
    p.add_argument("--slot", type=int, help="slot to use (default: the first free one; 0 behind a root port)")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("detach", help="hot remove a device; confirmed by DEVICE_DELETED")
    p.add_argument("vm", help="the VM's name in the state store")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the running VM's QMP socket")
    p.add_argument("--uuid", required=True,
                   help="the UUID of the device to remove (its whole multifunction slot goes with it)")
    p.add_argument("--timeout", default="5", metavar="SECONDS",
                   help="how long to wait for the guest to eject it (finite, at most a day; default 5)")
    p.set_defaults(func=cmd_detach)

    p = sub.add_parser("show", help="draw the slot map and list the devices of a VM")
    p.add_argument("vm", help="the VM's name in the state store")
    p.add_argument("--qmp", metavar="SOCKET", help="also read QEMU's live view (foreign devices)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("adopt", help="take over a running VM kvmslots did not start, from its live state")
    p.add_argument("vm", help="the name to record the VM under")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the running VM's QMP socket")
    p.add_argument("--uuids", metavar="FILE", help="JSON list of the VM's device UUIDs, or of "
                   '{"uuid": ..., "type": ...} objects: a device whose id is <type>-<uuid8>-pci-<slot> for one of '
                   "them is recorded as that device; every other device is foreign (its slot is reserved)")
    reserve = p.add_mutually_exclusive_group()
    reserve.add_argument("--mask", help="32-character reservation mask of the root bus, on top of the slots QEMU "
                         "shows taken (default: the machine's built-ins)")
    reserve.add_argument("--reserve-slots", type=int, metavar="N", help="reserve the first N root-bus slots "
                         "(Ganeti's kvm_pci_reservations)")
    p.set_defaults(func=cmd_adopt)

    p = sub.add_parser("reconcile", help="repair records against QEMU's live view")
    p.add_argument("vm", help="the VM's name in the state store")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the running VM's QMP socket")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("delete", help="forget a VM's state (after it was destroyed; its host devices stay "
                       "claimed until 'host free')")
    p.add_argument("vm", help="the VM's name in the state store")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("export", help="print a VM's state as a versioned JSON document")
    p.add_argument("vm", help="the VM's name in the state store")
    p.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (0600) instead")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="load a VM's state exported elsewhere ('-' reads stdin), or take over a "
                       "running Ganeti instance (--ganeti-runtime FILE VM)")
    p.add_argument("file", nargs="?", metavar="FILE|VM", help="the exported JSON document, or '-' for standard "
                   "input; with --ganeti-runtime, the name to record the instance as")
    p.add_argument("--ganeti-runtime", metavar="FILE", help="Ganeti's KVM runtime file of a running instance "
                   "(/var/run/ganeti/kvm-hypervisor/conf/INSTANCE.runtime, '-' for standard input): record its "
                   "NICs and disks at their slots under the ids QEMU knows them by, then run reconcile")
    p.add_argument("--replace", action="store_true", help="replace the VM if it exists")
    p.set_defaults(func=cmd_import)

    migrate = sub.add_parser("migrate", help="live migration: the target starts with the source's devices at the "
                             "source's addresses")
    msub = migrate.add_subparsers(dest="migrate_command", metavar="STEP", required=True)
    p = msub.add_parser("export", help="on the source, right before QMP migrate: check the VM against QEMU and "
                        "print its migration document")
    p.add_argument("vm", help="the VM's name in the state store")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the source VM's QMP socket")
    p.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (0600) instead")
    p.set_defaults(func=cmd_migrate_export)
    p = msub.add_parser("plan", help="on the target: record the incoming VM and print the -device and "
                        "-incoming arguments to start its QEMU with")
    p.add_argument("file", metavar="FILE", help="the migration document ('-' reads standard input)")
    p.add_argument("--incoming", default="defer", metavar="URI", help="QEMU's -incoming value (default: defer, "
                   "then QMP migrate-incoming)")
    p.set_defaults(func=cmd_migrate_plan)
    p = msub.add_parser("confirm", help="on the target, after the migration completed: check the devices in "
                        "QEMU, mark them attached and print the confirmation the source releases on")
    p.add_argument("file", metavar="FILE", help="the migration document the target was started from")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the target VM's QMP socket")
    p.add_argument("-o", "--output", metavar="FILE", help="write the confirmation to FILE (0600) instead")
    p.set_defaults(func=cmd_migrate_confirm)
    p = msub.add_parser("abort", help="on the target, after a failed migration: drop the incoming plan")
    p.add_argument("file", metavar="FILE", help="the migration document the plan was made from")
    p.set_defaults(func=cmd_migrate_abort)
    p = msub.add_parser("release", help="on the source, with the target's confirmation: forget the VM's records "
                        "(only if QEMU also reports 'completed' and they still match the document)")
    p.add_argument("file", metavar="FILE", help="the migration document the target was started from")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the source VM's QMP socket")
    p.add_argument("--confirmation", required=True, metavar="FILE", help="what 'migrate confirm' printed on the "
                   "target")
    p.set_defaults(func=cmd_migrate_release)

    host = sub.add_parser("host", help="the host PCI tracker (passthrough devices)")
    hsub = host.add_subparsers(dest="host_command", required=True, metavar="HOST_COMMAND", parser_class=_Parser)
    p = hsub.add_parser("sync", help="sync the tracker with the host's devices")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--libvirt", metavar="URI", help="read the host's PCI devices from libvirt's node devices (e.g. qemu:///system)")
    src.add_argument("--sysfs", metavar="ROOT",
                     help="read the host's PCI devices from sysfs under ROOT (normally /sys)")
    src.add_argument("--devices-json", metavar="FILE", help="read the device list from FILE (Nova's hypervisor JSON)")
    p.add_argument("--device-spec", metavar="FILE", help="JSON list of Nova device_spec entries (kept for later syncs)")
    p.set_defaults(func=cmd_host_sync)
    p = hsub.add_parser("devices", help="list tracked host devices")
    p.add_argument("--status", help="only devices in this state (available, claimed, allocated, ...)")
    p.set_defaults(func=cmd_host_devices)
    p = hsub.add_parser("pools", help="list pools of free devices")
    p.set_defaults(func=cmd_host_pools)
    p = hsub.add_parser("claim", help="claim host devices for a VM from a flavor-style request")
    p.add_argument("vm", help="the instance (VM) to claim for")
    p.add_argument("--request", required=True, metavar='"alias:count[, alias:count]"',
                   help="the flavor's pci_passthrough:alias value")
    p.add_argument("--aliases", required=True, metavar="FILE", help="JSON list of Nova alias entries")
    p.add_argument("--numa-nodes", metavar="N[,N...]", help="the host NUMA nodes the VM's cells are pinned to "
                   "(its NUMA topology; default: none): the NUMA policy decides which devices may serve")
    p.add_argument("--numa-policy", choices=("required", "legacy", "preferred", "socket"),
                   help="the flavor's hw:pci_numa_affinity_policy (default: each alias's own)")
    p.set_defaults(func=cmd_host_claim)
    p = hsub.add_parser("free", help="free every host device of a VM")
    p.add_argument("vm", help="the instance (VM) whose host devices to free")
    p.set_defaults(func=cmd_host_free)

    cluster = sub.add_parser("cluster", help="every host's passthrough devices (a state shared by many hosts)")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="CLUSTER_COMMAND",
                                  parser_class=_Parser)
    p = csub.add_parser("pools", help="every host's pools of free devices")
    p.add_argument("--host", action="append", metavar="NAME", help="only this host (repeatable)")
    p.set_defaults(func=cmd_cluster_pools)
    p = csub.add_parser("hosts", help="the hosts that can meet a flavor-style PCI request")
    p.add_argument("--request", required=True, metavar='"alias:count[, alias:count]"',
                   help="the flavor's pci_passthrough:alias value")
    p.add_argument("--aliases", required=True, metavar="FILE", help="JSON list of Nova alias entries")
    p.add_argument("--numa-policy", choices=("required", "legacy", "preferred", "socket"),
                   help="the flavor's hw:pci_numa_affinity_policy (default: each alias's own)")
    p.add_argument("--numa-cells", type=int, metavar="N", help="the VM has N NUMA cells: a host fits when N of "
                   "its NUMA nodes can serve the requests under the policy (default: no NUMA topology)")
    p.set_defaults(func=cmd_cluster_hosts)
    p = csub.add_parser("forget", help="remove a host's devices from the inventory (a host that is gone)")
    p.add_argument("host", help="the host's name in the inventory (as its tracker's --host-name)")
    p.set_defaults(func=cmd_cluster_forget)

    p = sub.add_parser("demo", help="walk a disposable VM through the whole life cycle")
    p.set_defaults(func=cmd_demo)
    add_guest_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.  Exit 0 on success, 1 when the operation failed, 2 for bad usage; a failure
    is one line on stderr, or with ``--json`` one JSON object (:func:`error_json`)."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(words)
    except _ArgumentError as exc:
        return _fail(exc, 2, "--json" in words)
    out = Output(args.json)
    args.state_given = args.state or os.environ.get(DATABASE_URL_ENV) or os.environ.get("KVMSLOTS_STATE_DIR")
    command: Callable[[argparse.Namespace, Store, Output], int] = args.func
    try:
        _validate_early(args)
        if command is cmd_demo:
            return cmd_demo(args, None, out)
        if args.func is cmd_guest_build:
            return int(cmd_guest_build(args, None, out))
        with Store(args.state_given or DEFAULT_STATE_DIR) as store:
            return command(args, store, out)
    except (UsageError, ValidationError) as exc:
        return _fail(exc, 2, args.json)
    except KvmSlotsError as exc:
        return _fail(exc, 1, args.json)
    except KeyboardInterrupt as exc:
        return _fail(exc, 1, args.json)
    except BrokenPipeError:  # the reader left (`kvmslots plan ... | head -1`): not worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush stays quiet
        return 1


def _validate_early(args: argparse.Namespace) -> None:
    """Malformed values are bad usage, found before any state is opened or QEMU is contacted."""
    if getattr(args, "vm", None) is not None:
        validate_vm_name(args.vm)
    if getattr(args, "uuid", None) is not None:
        validate_uuid(args.uuid)
    for name in ("reserve_slots", "hotplug_ports"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if getattr(args, "timeout", None) is not None:
        args.timeout = _seconds(args.timeout, "--timeout")
    args.qmp_timeout = (
        command_timeout_from_env()
        if args.qmp_timeout is None
        else _seconds(args.qmp_timeout, "--qmp-timeout", allow_zero=False)
    )
    args.connect_timeout = _seconds(os.environ.get("KVMSLOTS_CONNECT_TIMEOUT", "30"), "$KVMSLOTS_CONNECT_TIMEOUT",
                                    allow_zero=False)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def error_json(exc: BaseException) -> dict[str, Any]:
    """A failure as a program reads it: ``error`` (the exception's class), ``message``, and every fact
    the exception carries as a public attribute (``vm``, ``uuid``, ``bus``, ``slot``, ``state``,
    ``qemu_message``, ...), with values JSON cannot hold given as text."""
    name = "UsageError" if isinstance(exc, UsageError) else "Interrupted" if isinstance(exc, KeyboardInterrupt) else (
        type(exc).__name__
    )
    data: dict[str, Any] = {"error": name, "message": _one_line(exc) or name}
    facts = exc.facts() if isinstance(exc, KvmSlotsError) else vars(exc)
    for key, value in facts.items():
        if key.startswith("_") or key in data:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        data[key] = value
    return data


def _fail(exc: BaseException, code: int, as_json: bool) -> int:
    if as_json:
        print(json.dumps(error_json(exc)), file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):
        print("kvmslots: interrupted", file=sys.stderr)
    elif code == 2:
        print(f"kvmslots: error: {_one_line(exc)}", file=sys.stderr)
    else:
        print(f"kvmslots: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

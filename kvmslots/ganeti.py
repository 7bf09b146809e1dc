"""Take over a running Ganeti instance: its KVM runtime file as kvmslots state.

Ganeti keeps one runtime file per running KVM instance
(``/var/run/ganeti/kvm-hypervisor/conf/<instance>.runtime``): one line of
JSON holding ``[kvm_cmd, nics, hvparams, disks]``, where *kvm_cmd* is the
command line without the NIC and disk options (Ganeti appends those at each
start), *nics* are ``objects.NIC`` dicts, *hvparams* the hypervisor
parameters the instance was started with, and each disk is a
``[objects.Disk dict, link, uri]`` triple.  Files written before Ganeti 2.8
have no disks entry.  Two layouts place the NICs and disks on the PCI bus:

``2.10-2.15`` (:data:`LAYOUT_OLD`)
    A device carries ``"pci": <slot>``.  Its QEMU id is
    ``hot<type>-<uuid8>-pci-<slot>`` (Ganeti's hotplug targets were called
    ``hotnic``/``hotdisk`` then), its bus ``pci.0``, its driver follows the
    ``nic_type``/``disk_type`` hvparam (``paravirtual`` is ``virtio-net-pci``/
    ``virtio-blk-pci``; only paravirtual disks are PCI devices, the others
    sit on ``if=<disk_type>``).  Slots 0-2 are reserved, then one each for a
    sound card that needs one, a SCSI controller and the balloon (which
    carries its ``addr`` on the command line since 2.10.1; before, QEMU placed
    it, so 2.10.0 reserved ``1111``).
``2.16+`` (:data:`LAYOUT_NEW`, 2.16 and 3.x)
    A device carries ``"hvinfo": {"driver", "id", "bus", "addr"}`` (SCSI
    disks ``"bus": "scsi.0"`` with ``channel``/``scsi-id``/``lun`` instead of
    ``addr``); the id is ``<type>-<first three groups of the UUID>``, without
    the slot.  The first ``kvm_pci_reservations`` slots (default 12) are
    reserved.  Ganeti 2.16+ reads an old file by giving each ``pci`` device an
    ``hvinfo`` with its old id, so a 2.16+ file may also hold ``hot...`` ids.

:func:`parse_runtime` turns either layout into a :class:`GanetiRuntime`: a
:class:`~kvmslots.model.VMSpec` (machine type from ``-machine``/``-M``,
the root bus mask mirroring Ganeti's reservations) and the NICs and disks as
:class:`GanetiDevice` records, each with the id QEMU knows it by.  Everything
is checked (:func:`validate_runtime`) before :func:`record_ganeti_vm`
writes it, in one transaction; then ``kvmslots reconcile`` (or ``adopt``)
confirms each device against QEMU and the VM is under kvmslots without a
restart.  Devices Ganeti did not place on a PCI slot (SCSI and IDE disks,
NICs without a slot) are listed in :attr:`GanetiRuntime.skipped`; a slot
Ganeti booked for one of them stays reserved.

The layouts were read from Ganeti's own source (``lib/hypervisor/hv_kvm``:
``_GenerateDeviceKVMId``, ``_GenerateKVMRuntime``, ``_UpgradeSerializedRuntime``,
``_GetBusSlots``; ``lib/objects.py``) at v2.10.0, v2.15.2, v2.16.0, v3.1.1;
no Ganeti code is used here.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ._shown import shown
from .devid import (
    PropValue,
    device_id,
    is_passthrough_driver,
    parse_device_id,
    uuid8,
    validate_bus,
    validate_driver,
    validate_props,
    validate_qemu_id,
    validate_uuid,
    validate_vm_name,
)
from .errors import GanetiRuntimeError, InvalidDeviceId, SlotError, StateImportError, ValidationError
from .model import Device, DeviceState, Machine, VMSpec
from .slots import NUM_SLOTS, validate_slot
from .store import EXPORT_FORMAT, EXPORT_VERSION, Store
from .topology import check_records

__all__ = [
    "LAYOUT_OLD",
    "LAYOUT_NEW",
    "RUNTIME_DIR",
    "GanetiDevice",
    "SkippedDevice",
    "GanetiRuntime",
    "parse_runtime",
    "read_runtime",
    "validate_runtime",
    "command_line",
    "export_document",
    "record_ganeti_vm",
    "cmd_import_ganeti",
]

#: Devices carry ``pci`` (Ganeti 2.10-2.15).
LAYOUT_OLD = "2.10-2.15"
#: Devices carry ``hvinfo`` (Ganeti 2.16 and 3.x).
LAYOUT_NEW = "2.16+"
#: Where Ganeti keeps the runtime files (``<instance>.runtime``).
RUNTIME_DIR = "/var/run/ganeti/kvm-hypervisor/conf"

#: Ganeti puts every PCI device on the first PCI bus, SCSI disks on the first SCSI bus.
PCI_BUS = "pci.0"
SCSI_BUS = "scsi.0"
#: ``kvm_pci_reservations`` when hvparams do not say (2.16+: QEMU_DEFAULT_PCI_RESERVATIONS).
DEFAULT_RESERVATIONS = 12
#: 2.10.1-2.15: host bridge, ISA bridge, VGA (``_DEFAULT_PCI_RESERVATIONS = "111..."``).
OLD_BASE_RESERVATIONS = 3
#: Sound cards 2.11-2.15 reserve a slot for (``_SOUNDHW_WITH_PCI_SLOT``).
SOUNDHW_WITH_PCI_SLOT = frozenset({"ac97", "es1370", "hda"})
#: QEMU's i440FX ``pc`` has its host bridge in slot 0 and PIIX3 in slot 1, VGA in 2 unless ``-vga none``.
BUILTIN_SLOTS = frozenset({0, 1})
VGA_SLOT = 2
PARAVIRTUAL = "paravirtual"
#: Ganeti's ``HT_NIC_NE2K_ISA``: an ISA card, never on the PCI bus.
ISA_NIC = "ne2k_isa"
_KINDS = ("nic", "disk")
_PCI_DISK_DRIVER = "virtio-blk-pci"
_PCI_NIC_DRIVER = "virtio-net-pci"
_ADDR_RE = re.compile(r"(?:0x)?([0-9a-fA-F]{1,2})(?:\.([0-7]))?")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_MACHINE_OPTIONS = ("-machine", "--machine", "-M")
_DEVICE_OPTIONS = ("-device", "--device")


# --------------------------------------------------------------------------- result objects


@dataclass(frozen=True)
class GanetiDevice:
    """A NIC or disk Ganeti placed on a PCI slot: what kvmslots records for it.

    ``kind`` is Ganeti's hotplug target (``nic``/``disk``) and the kvmslots
    device type; ``index`` its position in the runtime's NIC or disk list;
    ``qemu_id`` the id exactly as QEMU knows it (``hotnic-...-pci-5`` in the
    old layout, ``hvinfo.id`` in the new one); ``hvinfo`` what Ganeti built
    the ``-device`` option from (None in the old layout).
    """

    kind: str
    index: int
    uuid: str
    driver: str
    bus: str
    slot: int
    qemu_id: str
    props: Mapping[str, PropValue] = field(default_factory=dict)
    function: int = 0
    hvinfo: Mapping[str, Any] | None = None

    @property
    def dev_type(self) -> str:
        """The kvmslots device type: Ganeti's hotplug target, the same as ``kind``."""
        return self.kind

    @property
    def id_is_derived(self) -> bool:
        """Is ``qemu_id`` the id kvmslots would derive itself (``<type>-<uuid8>-pci-<slot>``)?"""
        try:
            return self.qemu_id == device_id(self.kind, self.uuid, self.slot)
        except ValidationError:
            return False

    def to_device(self, state: DeviceState = DeviceState.PLANNED) -> Device:
        """The kvmslots record: the id is kept as Ganeti gave it unless kvmslots derives the same one."""
        return Device(
            self.uuid, self.kind, self.driver, dict(self.props), self.bus, self.slot, state, self.function, False,
            given_id=None if self.id_is_derived else self.qemu_id,
        )

    def to_json(self) -> dict[str, Any]:
        """The device as ``import --ganeti-runtime --json`` shows it; ``id`` is the id QEMU knows it by."""
        return {
            "kind": self.kind, "index": self.index, "uuid": self.uuid, "driver": self.driver, "bus": self.bus,
            "slot": self.slot, "function": self.function, "id": self.qemu_id, "props": dict(self.props),
        }  # fmt: skip


@dataclass(frozen=True)
class SkippedDevice:
    """A NIC or disk that is not on a PCI slot of its own, and why; ``booked`` the slot Ganeti
    nevertheless booked for it (kept reserved), if any."""

    kind: str
    index: int
    uuid: str | None
    reason: str
    booked: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The skipped device and why, as ``import --ganeti-runtime --json`` shows it (``uuid`` and ``booked``
        may be None)."""
        return {"kind": self.kind, "index": self.index, "uuid": self.uuid, "reason": self.reason,
                "booked": self.booked}


@dataclass(frozen=True)
class GanetiRuntime:
    """A Ganeti runtime file, read: the VM, its PCI devices, and how the mask was made.

    ``reserved`` are the slots Ganeti keeps for QEMU's own devices (the
    reservation count, or 2.10-2.15's base and implicit ones); ``foreign``
    the root-bus slots the command line gives devices kvmslots does not
    manage (balloon, guest agent, ...); ``booked`` slots Ganeti booked for
    skipped devices.  All of them are in ``vm.mask`` except ``unmasked``:
    reserved slots an imported device sits on (a mask bit cannot cover a
    recorded device; the device holds the slot instead).
    """

    source: str
    layout: str
    instance: str | None
    vm: VMSpec
    devices: tuple[GanetiDevice, ...]
    skipped: tuple[SkippedDevice, ...]
    reserved: tuple[int, ...]
    builtin: tuple[int, ...]
    foreign: Mapping[int, str]
    foreign_ids: tuple[str, ...]
    booked: Mapping[int, str]
    unmasked: tuple[int, ...]
    kvm_cmd: tuple[str, ...]
    hvparams: Mapping[str, Any]
    nics: tuple[Mapping[str, Any], ...]
    disks: tuple[tuple[Mapping[str, Any], str | None, str | None], ...]
    notes: tuple[str, ...] = ()

    def device(self, kind: str, index: int) -> GanetiDevice | None:
        """The *index*-th NIC or disk (*kind* ``nic`` or ``disk``), if Ganeti placed it on a PCI slot; None
        when it was skipped or there is no such device."""
        for dev in self.devices:
            if dev.kind == kind and dev.index == index:
                return dev
        return None

    def to_json(self) -> dict[str, Any]:
        """What was read, as ``import --ganeti-runtime --json`` prints it: the VM, its devices, the skipped
        ones and how the mask was made (slot keys as text); not the raw command line, hvparams, NICs or disks."""
        return {
            "source": self.source,
            "layout": self.layout,
            "instance": self.instance,
            "vm": self.vm.to_json(),
            "devices": [d.to_json() for d in self.devices],
            "skipped": [s.to_json() for s in self.skipped],
            "reserved": list(self.reserved),
            "foreign": {str(slot): what for slot, what in sorted(self.foreign.items())},
            "booked": {str(slot): what for slot, what in sorted(self.booked.items())},
            "unmasked": list(self.unmasked),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- parsing


class _Problem(Exception):
    """One thing wrong with the file; becomes a GanetiRuntimeError naming the file."""

    def __init__(self, message: str, ids: Iterable[str] = ()) -> None:
        self.ids = tuple(ids)
        super().__init__(message)


def read_runtime(path: str | Path, vm: str) -> GanetiRuntime:
    """Read and check the runtime file at *path* (``-``: stdin) as VM *vm*."""
    where = str(path)
    try:
        text = sys.stdin.read() if where == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GanetiRuntimeError(
            f"Cannot read Ganeti runtime file {where}: {exc.strerror or exc}", where, vm=vm
        ) from None
    except UnicodeDecodeError as exc:
        raise GanetiRuntimeError(f"Ganeti runtime file {where} is not UTF-8 text: {exc}", where, vm=vm) from None
    return parse_runtime(text, vm, source=where)


def parse_runtime(text: str | bytes, vm: str, *, source: str = "<text>") -> GanetiRuntime:
    """Parse a Ganeti KVM runtime file of either layout as VM *vm*; checked whole.

    :class:`GanetiRuntimeError` (naming *source* and the problem) for
    anything that is not a runtime file Ganeti could have written, or that
    could not be recorded as it stands.
    """
    try:
        validate_vm_name(vm)
    except ValidationError as exc:
        raise GanetiRuntimeError(f"{source}: {exc}", source) from None
    try:
        runtime = _parse(text, vm, source)
    except _Problem as exc:
        raise GanetiRuntimeError(f"Ganeti runtime file {source}: {exc}", source, exc.ids, vm=vm) from None
    validate_runtime(runtime)
    return runtime


def _parse(text: str | bytes, vm_name: str, source: str) -> GanetiRuntime:
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Problem(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise _Problem("nested too deeply to be a runtime file") from None
    if not isinstance(data, list) or len(data) not in (3, 4):
        raise _Problem("must be a JSON list [kvm_cmd, nics, hvparams, disks] (disks may be missing in files "
                       f"written before Ganeti 2.8), got {_kind(data)}")
    raw_cmd, raw_nics, hvparams = data[:3]
    raw_disks = data[3] if len(data) == 4 else []
    kvm_cmd = _command(raw_cmd)
    if not isinstance(raw_nics, list) or not all(isinstance(n, dict) for n in raw_nics):
        raise _Problem(f"the NICs (item 2) must be a list of objects, got {_kind(raw_nics)}")
    if not isinstance(hvparams, dict):
        raise _Problem(f"the hypervisor parameters (item 3) must be an object, got {_kind(hvparams)}")
    if not isinstance(raw_disks, list):
        raise _Problem(f"the disks (item 4) must be a list, got {_kind(raw_disks)}")
    disks: list[tuple[Mapping[str, Any], str | None, str | None]] = []
    for index, entry in enumerate(raw_disks):
        if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], dict)
                or not all(part is None or isinstance(part, str) for part in entry[1:])):
            raise _Problem(f"disk {index} must be a [disk object, link, uri] triple, got {shown(entry)}")
        disks.append((entry[0], entry[1], entry[2]))

    devices_raw = [("nic", i, n) for i, n in enumerate(raw_nics)] + [("disk", i, d[0]) for i, d in enumerate(disks)]
    new = "kvm_pci_reservations" in hvparams or any("hvinfo" in dev for _, _, dev in devices_raw)
    layout = LAYOUT_NEW if new else LAYOUT_OLD
    notes: list[str] = []

    machine = _machine(kvm_cmd, notes)
    instance = _option(kvm_cmd, ("-name",))
    options = _device_options(kvm_cmd)
    vga = not (("-vga", "none") in pairwise(kvm_cmd) or "-nodefaults" in kvm_cmd)
    builtin = set(BUILTIN_SLOTS) | ({VGA_SLOT} if vga else set())

    devices: list[GanetiDevice] = []
    skipped: list[SkippedDevice] = []
    for kind, index, raw in devices_raw:
        placed = _device(kind, index, raw, hvparams, new)
        if isinstance(placed, GanetiDevice):
            devices.append(placed)
        else:
            skipped.append(placed)

    # Ganeti's reservations
    if new:
        count = hvparams.get("kvm_pci_reservations", DEFAULT_RESERVATIONS)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= NUM_SLOTS:
            raise _Problem(f"kvm_pci_reservations must be an integer 0-{NUM_SLOTS}, got {shown(count)}")
        reserved = set(range(count))
    else:
        reserved = set(range(OLD_BASE_RESERVATIONS))
        implicit = []
        if hvparams.get("soundhw") in SOUNDHW_WITH_PCI_SLOT:
            implicit.append(f"sound card {hvparams['soundhw']}")
        if hvparams.get("disk_type") == "scsi":
            implicit.append("SCSI controller")
        implicit += [f"balloon ({opt.text})" for opt in options if opt.option == "-balloon" and opt.addr is None]
        for what in implicit:  # QEMU puts them at the lowest free slots, and Ganeti reserved those
            slot = min(s for s in range(NUM_SLOTS) if s not in reserved)
            reserved.add(slot)
            notes.append(f"slot {slot} reserved for the {what}, which QEMU places itself")
    foreign: dict[int, str] = {}
    foreign_ids: list[str] = []
    for opt in options:
        if opt.id:
            foreign_ids.append(opt.id)
        if opt.addr is not None and opt.bus in (None, PCI_BUS):
            slot = opt.addr
            if slot in foreign:
                raise _Problem(f"the command line puts {foreign[slot]} and {opt.text} both at slot {slot}")
            foreign[slot] = opt.text
    booked: dict[int, str] = {}
    for skip in skipped:
        if skip.booked is not None:
            what = f"{skip.kind} {skip.index}" + (f" ({skip.uuid})" if skip.uuid else "")
            if skip.booked in booked:
                raise _Problem(f"slot {skip.booked} is booked twice, for {booked[skip.booked]} and {what}")
            booked[skip.booked] = what

    masked = builtin | reserved | set(foreign) | set(booked)
    occupied = {d.slot for d in devices}
    unmasked = sorted(occupied & (reserved - builtin))
    if unmasked:
        notes.append(
            f"Ganeti reserves slot(s) {', '.join(map(str, unmasked))} but its own devices sit there; "
            "they are recorded there and left out of the mask"
        )
    mask = "".join("1" if s in masked and s not in unmasked else "0" for s in range(NUM_SLOTS))
    try:
        vm = VMSpec(vm_name, machine, mask)
    except ValidationError as exc:
        raise _Problem(str(exc)) from None
    return GanetiRuntime(
        source=source,
        layout=layout,
        instance=instance,
        vm=vm,
        devices=tuple(devices),
        skipped=tuple(skipped),
        reserved=tuple(sorted(reserved)),
        builtin=tuple(sorted(builtin)),
        foreign=foreign,
        foreign_ids=tuple(foreign_ids),
        booked=booked,
        unmasked=tuple(unmasked),
        kvm_cmd=tuple(kvm_cmd),
        hvparams=dict(hvparams),
        nics=tuple(raw_nics),
        disks=tuple(disks),
        notes=tuple(notes),
    )


def _kind(value: object) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__ if value is not None else "null"


def _command(raw: object) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise _Problem(f"the KVM command line (item 1) must be a non-empty list, got {_kind(raw)}")
    cmd = []
    for index, arg in enumerate(raw):
        # Ganeti stores -m as a number; everything else is text
        if isinstance(arg, bool) or not isinstance(arg, (str, int)):
            raise _Problem(f"command line argument {index} must be text or a number, got {shown(arg)}")
        if isinstance(arg, str) and "\0" in arg:
            raise _Problem(f"command line argument {index} holds a NUL character")
        cmd.append(str(arg))
    return cmd


def _option(cmd: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last occurrence of an option (QEMU lets a later one win)."""
    value = None
    for arg, nxt in pairwise(cmd):
        if arg in names:
            value = nxt
    return value


def _split_option(text: str) -> list[str]:
    """QEMU's ``a,b=c`` syntax, where ``,,`` is a literal comma."""
    return [part.replace("\0", ",") for part in text.replace(",,", "\0").split(",")]


def _machine(cmd: Sequence[str], notes: list[str]) -> str:
    value = _option(cmd, _MACHINE_OPTIONS)
    if value is None:
        notes.append("the command line names no machine type: QEMU's default 'pc' is assumed")
        return "pc"
    parts = _split_option(value)
    machine = parts[0] if parts and "=" not in parts[0] else None
    for part in parts:
        if part.startswith("type="):
            machine = part[len("type="):]
    if not machine:
        raise _Problem(f"-machine {value!r} names no machine type")
    return machine


@dataclass(frozen=True)
class _Option:
    option: str
    text: str
    id: str | None
    bus: str | None
    addr: int | None


def _device_options(cmd: Sequence[str]) -> list[_Option]:
    """The ``-device`` (and old ``-balloon``) options of the command line: what kvmslots does not manage."""
    found = []
    for arg, value in pairwise(cmd):
        if arg not in _DEVICE_OPTIONS and arg != "-balloon":
            continue
        parts = _split_option(value)
        props = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
        addr = None
        if "addr" in props:
            match = _ADDR_RE.fullmatch(props["addr"])
            if not match or int(match[1], 16) >= NUM_SLOTS:
                raise _Problem(f"{arg} {value!r} has a PCI address QEMU would refuse")
            addr = int(match[1], 16)
        name = f"{arg} {value}"
        found.append(_Option(arg, name, props.get("id"), props.get("bus"), addr))
    return found


def _device(kind: str, index: int, raw: Mapping[str, Any], hvparams: Mapping[str, Any],
            new: bool) -> GanetiDevice | SkippedDevice:
    what = f"{kind} {index}"
    raw_uuid = raw.get("uuid")
    if raw_uuid is None:
        # Ganeti gives a NIC from before 2.8 a random UUID each time it reads the file: no identity to record
        return SkippedDevice(kind, index, None, "it has no UUID (a device from before Ganeti 2.8)",
                             None if "hvinfo" in raw else _old_slot(raw, what))
    if not isinstance(raw_uuid, str):
        raise _Problem(f"{what} has a UUID that is not text: {shown(raw_uuid)}")
    try:
        uuid = validate_uuid(raw_uuid)
    except ValidationError as exc:
        raise _Problem(f"{what}: {exc}") from None
    props: dict[str, PropValue] = {}
    if kind == "nic" and "mac" in raw:
        mac = raw["mac"]
        if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
            raise _Problem(f"{what} ({uuid}) has a bad MAC address {shown(mac)}")
        props["mac"] = mac
    if "hvinfo" in raw:
        return _new_device(kind, index, uuid, raw["hvinfo"], props, what)
    slot = _old_slot(raw, what)
    if slot is None:
        return SkippedDevice(kind, index, uuid, "Ganeti gave it no PCI slot (QEMU placed it, without an id)")
    hv_key = "nic_type" if kind == "nic" else "disk_type"
    hv_type = hvparams.get(hv_key)
    if not isinstance(hv_type, str) or not hv_type:
        raise _Problem(f"{what} ({uuid}) carries a PCI slot but the hypervisor parameters have no {hv_key}")
    # the old _GenerateDeviceKVMId, with the hotplug target names of that time (as 2.16+ upgrades them)
    qemu_id = f"hot{kind}-{raw_uuid.split('-')[0]}-pci-{slot}"
    if kind == "nic":
        if hv_type == ISA_NIC:
            return SkippedDevice(kind, index, uuid, f"nic_type {ISA_NIC} is an ISA card", slot)
        driver = _PCI_NIC_DRIVER if hv_type == PARAVIRTUAL else hv_type
    else:
        if hv_type != PARAVIRTUAL:
            return SkippedDevice(kind, index, uuid, f"disk_type {hv_type}: the disk is on if={hv_type}, "
                                 "not a PCI device of its own", slot)
        driver = _PCI_DISK_DRIVER
    return GanetiDevice(kind, index, uuid, driver, PCI_BUS, slot, qemu_id, props, 0, None)


def _old_slot(raw: Mapping[str, Any], what: str) -> int | None:
    slot = raw.get("pci")
    if slot is None:
        return None
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < NUM_SLOTS:
        raise _Problem(f"{what} has PCI slot {shown(slot)}; a slot is an integer 0-{NUM_SLOTS - 1}")
    return slot


def _new_device(kind: str, index: int, uuid: str, hvinfo: object, props: dict[str, PropValue],
                what: str) -> GanetiDevice | SkippedDevice:
    if not isinstance(hvinfo, dict):
        raise _Problem(f"{what} ({uuid}) has hvinfo that is not an object: {shown(hvinfo)}")
    if not hvinfo:
        return SkippedDevice(kind, index, uuid, "its hvinfo is empty: Ganeti let QEMU place it, without an id")
    for key in ("driver", "id", "bus"):
        if not isinstance(hvinfo.get(key), str) or not hvinfo[key]:
            raise _Problem(f"{what} ({uuid}) has no {key!r} in its hvinfo {shown(hvinfo)}")
    driver, qemu_id, bus = hvinfo["driver"], hvinfo["id"], hvinfo["bus"]
    if bus == SCSI_BUS:
        return SkippedDevice(kind, index, uuid, f"it is on the SCSI bus {SCSI_BUS} (target "
                             f"{hvinfo.get('scsi-id', '?')}), not on a PCI slot")
    if bus != PCI_BUS:
        raise _Problem(f"{what} ({uuid}) is on bus {bus!r}; Ganeti places devices on {PCI_BUS} or {SCSI_BUS}")
    addr = hvinfo.get("addr")
    match = _ADDR_RE.fullmatch(addr) if isinstance(addr, str) and addr.startswith("0x") else None
    if not match or match[2] is not None:
        raise _Problem(f"{what} ({uuid}) has addr {shown(addr)}; Ganeti writes a slot as hex text such as '0xc'")
    slot = int(match[1], 16)
    if slot >= NUM_SLOTS:
        raise _Problem(f"{what} ({uuid}) has addr {addr}: slot {slot} is out of range 0-{NUM_SLOTS - 1}")
    if kind == "disk" and driver != _PCI_DISK_DRIVER:
        return SkippedDevice(kind, index, uuid, f"driver {driver}: Ganeti booked slot {slot} but the disk is not "
                             "a PCI device of its own", slot)
    if kind == "nic" and driver == ISA_NIC:
        return SkippedDevice(kind, index, uuid, f"driver {ISA_NIC} is an ISA card", slot)
    return GanetiDevice(kind, index, uuid, driver, bus, slot, qemu_id, props, 0, dict(hvinfo))


# --------------------------------------------------------------------------- validation


def validate_runtime(runtime: GanetiRuntime) -> GanetiRuntime:
    """Check a parsed runtime whole; :class:`GanetiRuntimeError` names the first problem.

    Every device: a valid UUID, driver, bus and slot, function 0, a well-formed
    QEMU id that names its own UUID (and, for ``...-pci-<slot>`` ids, its
    slot); no UUID, id or slot twice (ids also against the command line's
    own devices); nothing on a slot QEMU's built-in devices, the command line
    or a skipped device holds; the mask exactly Ganeti's reservations (minus
    the slots its devices sit on); and the records fit the VM
    (:func:`~kvmslots.topology.check_records`).
    """
    source = runtime.source

    def fail(message: str, ids: Iterable[str] = (), dev: GanetiDevice | None = None) -> GanetiRuntimeError:
        facts: dict[str, Any] = {"vm": runtime.vm.name}
        if dev is not None:  # the facts of the device at fault
            facts.update(uuid=dev.uuid, device_id=dev.qemu_id, bus=dev.bus, slot=dev.slot)
        return GanetiRuntimeError(f"Ganeti runtime file {source}: {message}", source, tuple(ids), **facts)

    vm = runtime.vm
    if vm.family is not Machine.I440FX:
        raise fail(f"machine {vm.machine!r} has no {PCI_BUS} bus, where Ganeti places its devices "
                   "(Ganeti supports i440FX 'pc' machines only)")
    uuids: dict[str, str] = {}
    ids: dict[str, str] = {}
    slots: dict[tuple[str, int], str] = {}
    foreign_ids = set(runtime.foreign_ids)
    records: list[Device] = []
    for dev in runtime.devices:
        what = f"{dev.kind} {dev.index} ({dev.uuid})"
        try:
            if dev.kind not in _KINDS:
                raise ValidationError(f"kind must be nic or disk, got {shown(dev.kind)}")
            if validate_uuid(dev.uuid) != dev.uuid:
                raise ValidationError(f"UUID {dev.uuid} is not in canonical lowercase form")
            validate_driver(dev.driver)
            if is_passthrough_driver(dev.driver):
                raise ValidationError(f"{dev.driver} is a passthrough driver; Ganeti NICs and disks are emulated")
            validate_bus(dev.bus)
            validate_slot(dev.slot)
            if dev.function != 0:
                raise ValidationError(f"function {dev.function}: Ganeti never shares a slot")
            validate_qemu_id(dev.qemu_id)
            validate_props(dev.props, dev.driver)
        except ValidationError as exc:
            raise fail(f"{what}: {exc}", [dev.qemu_id] if isinstance(dev.qemu_id, str) else [], dev) from None
        if dev.bus != PCI_BUS:
            raise fail(f"{what} is on bus {dev.bus!r}, not {PCI_BUS}", [dev.qemu_id], dev)
        _check_id_names_device(dev, fail)
        if dev.uuid in uuids:
            raise fail(
                f"UUID {dev.uuid} belongs to both {uuids[dev.uuid]} and {dev.kind} {dev.index}", [dev.qemu_id], dev
            )
        if dev.qemu_id in ids or dev.qemu_id in foreign_ids:
            other = ids.get(dev.qemu_id, "a -device option of the command line")
            raise fail(f"QEMU id {dev.qemu_id} is given twice: {what} and {other}", [dev.qemu_id], dev)
        key = (dev.bus, dev.slot)
        if key in slots:
            raise fail(f"{what} and {slots[key]} are both at slot {dev.slot} of {dev.bus}",
                       [dev.qemu_id, _id_of(runtime, slots[key])], dev)
        if dev.slot in runtime.builtin:
            raise fail(f"{what} ({dev.qemu_id}) is at slot {dev.slot}, where QEMU's built-in "
                       f"{'VGA' if dev.slot == VGA_SLOT else 'host bridge or ISA bridge'} sits", [dev.qemu_id], dev)
        if dev.slot in runtime.foreign:
            raise fail(f"{what} ({dev.qemu_id}) is at slot {dev.slot}, which the command line gives to "
                       f"{runtime.foreign[dev.slot]}", [dev.qemu_id], dev)
        if dev.slot in runtime.booked:
            raise fail(f"{what} ({dev.qemu_id}) is at slot {dev.slot}, which Ganeti booked for "
                       f"{runtime.booked[dev.slot]}", [dev.qemu_id], dev)
        uuids[dev.uuid] = f"{dev.kind} {dev.index}"
        ids[dev.qemu_id] = what
        slots[key] = what
        records.append(dev.to_device())
    for skip in runtime.skipped:
        if skip.uuid is not None and skip.uuid in uuids:
            raise fail(f"UUID {skip.uuid} belongs to both {uuids[skip.uuid]} and {skip.kind} {skip.index}")
        if skip.uuid is not None:
            uuids[skip.uuid] = f"{skip.kind} {skip.index}"
    occupied = {dev.slot for dev in runtime.devices}
    masked = set(runtime.builtin) | set(runtime.reserved) | set(runtime.foreign) | set(runtime.booked)
    if set(runtime.unmasked) != occupied & (set(runtime.reserved) - set(runtime.builtin)):
        raise fail(f"unmasked slots {list(runtime.unmasked)} are not the reserved slots its devices hold")
    expected = "".join("1" if s in masked - set(runtime.unmasked) else "0" for s in range(NUM_SLOTS))
    if vm.mask != expected:
        raise fail(f"mask {vm.mask} is not Ganeti's reservations {expected}")
    try:
        check_records(vm, [], records)
    except (ValidationError, SlotError) as exc:
        raise fail(f"the devices do not fit VM {vm.name!r}: {exc}") from None
    return runtime


def _id_of(runtime: GanetiRuntime, what: str) -> str:
    for dev in runtime.devices:
        if f"{dev.kind} {dev.index} ({dev.uuid})" == what:
            return dev.qemu_id
    return what


def _check_id_names_device(dev: GanetiDevice, fail: Callable[..., GanetiRuntimeError]) -> None:
    """Ganeti's ids name the device: ``[hot]<kind>-<uuid8>-pci-<slot>`` (2.10-2.15, and old devices
    in a 2.16+ file) or ``<kind>-<first three UUID groups>`` (2.16+).  Anything else is not the
    id Ganeti gave this device."""
    what = f"{dev.kind} {dev.index} ({dev.uuid})"
    try:
        id_type, id_uuid8, id_slot = parse_device_id(dev.qemu_id.lower())
    except InvalidDeviceId:
        expected = f"{dev.kind}-{dev.uuid.rsplit('-', 2)[0]}"
        if dev.qemu_id.lower() != expected:
            raise fail(f"{what} has QEMU id {dev.qemu_id}, which is not the id Ganeti gives it "
                       f"({expected}, or hot{dev.kind}-{uuid8(dev.uuid)}-pci-<slot>)", [dev.qemu_id], dev) from None
        return
    if id_type not in (dev.kind, f"hot{dev.kind}") or id_uuid8 != uuid8(dev.uuid):
        raise fail(f"{what} has QEMU id {dev.qemu_id}, which names another device", [dev.qemu_id], dev)
    if id_slot != dev.slot:
        raise fail(f"{what} has QEMU id {dev.qemu_id}, which says slot {id_slot}, but it is at slot {dev.slot}",
                   [dev.qemu_id], dev)


# --------------------------------------------------------------------------- the command line


def command_line(
    runtime: GanetiRuntime,
    *,
    netdev: str = "user",
    disk_files: Mapping[str, str] | None = None,
) -> list[str]:
    """The KVM command line of the instance: the runtime's own, plus the NIC and disk options
    Ganeti appends when it starts it, with the ``-device`` options exactly as Ganeti builds
    them (driver, id, bus, addr, MAC).

    What Ganeti opens at start time is not in the file and is replaced: each NIC's
    backend is ``-netdev <netdev>,id=<the id Ganeti uses>`` (Ganeti: a tap file
    descriptor), and each disk is ``-drive file=<path>,format=raw,if=none,id=<id>`` where
    *path* is ``disk_files[uuid]`` or else the link (or URI) the file records.
    """
    files = {validate_uuid(uuid): path for uuid, path in (disk_files or {}).items()}
    argv = list(runtime.kvm_cmd)
    hv = runtime.hvparams
    if not runtime.nics:
        argv += ["-net", "none"]
    for index, raw in enumerate(runtime.nics):
        dev = runtime.device("nic", index)
        mac = raw.get("mac")
        mac_part = f",mac={mac}" if isinstance(mac, str) else ""
        if dev is not None:
            backend = dev.qemu_id
            if dev.hvinfo is None:  # 2.10-2.15: "<model>,mac=..,id=..,bus=pci.0,addr=0x5,netdev=.."
                option = f"{dev.driver}{mac_part},id={dev.qemu_id},bus={dev.bus},addr={dev.slot:#x},netdev={backend}"
            else:  # 2.16+: the hvinfo string, then netdev and mac
                option = _hvinfo_option(dev.hvinfo) + f",netdev={backend}{mac_part}"
        else:
            backend = f"netdev{index}"
            nic_type = hv.get("nic_type", PARAVIRTUAL)
            model = _PCI_NIC_DRIVER if nic_type == PARAVIRTUAL else str(nic_type)
            option = f"{model},netdev={backend}{mac_part}"
        argv += ["-netdev", f"{netdev},id={backend}", "-device", option]
    disk_type = str(hv.get("disk_type", PARAVIRTUAL))
    for index, (raw, link, uri) in enumerate(runtime.disks):
        uuid = raw.get("uuid")
        path = files.get(validate_uuid(uuid)) if isinstance(uuid, str) else None
        if path is None:
            params = raw.get("params")
            userspace = isinstance(params, dict) and params.get("access") == "userspace"
            path = uri if uri and userspace else link
        if not path:
            raise GanetiRuntimeError(f"disk {index} of {runtime.source} has no link or URI to open", runtime.source)
        drive = f"file={_qemu_text(path)},format=raw"
        dev = runtime.device("disk", index)
        hvinfo = raw.get("hvinfo")
        if dev is not None:
            if dev.hvinfo is None:
                option = f"{dev.driver},drive={dev.qemu_id},id={dev.qemu_id},bus={dev.bus},addr={dev.slot:#x}"
            else:
                option = _hvinfo_option(dev.hvinfo) + f",drive={dev.qemu_id}"
            argv += ["-device", option, "-drive", f"{drive},if=none,id={dev.qemu_id}"]
        elif isinstance(hvinfo, dict) and isinstance(hvinfo.get("id"), str):
            drive_id = hvinfo["id"]
            other: str | None
            if disk_type == "ide":  # 3.x: "ide-hd,drive=<id>", the hvinfo slot only booked
                other = f"ide-hd,drive={drive_id}"
            elif hvinfo.get("bus") == SCSI_BUS:
                other = _hvinfo_option(hvinfo) + f",drive={drive_id}"
            else:
                other = None
            if other is None:
                argv += ["-drive", f"{drive},if={disk_type}"]
            else:
                argv += ["-device", other, "-drive", f"{drive},if=none,id={drive_id}"]
        else:
            argv += ["-drive", f"{drive},if={'virtio' if disk_type == PARAVIRTUAL else disk_type}"]
    return argv


def _hvinfo_option(hvinfo: Mapping[str, Any]) -> str:
    """``driver,key=value,...`` in hvinfo's own order (Ganeti's ``_GenerateDeviceHVInfoStr``)."""
    items = dict(hvinfo)
    driver = str(items.pop("driver"))
    return driver + "".join(f",{key}={value}" for key, value in items.items())


def _qemu_text(text: str) -> str:
    return text.replace(",", ",,")


# --------------------------------------------------------------------------- recording


def export_document(runtime: GanetiRuntime, state: DeviceState = DeviceState.PLANNED) -> dict[str, Any]:
    """The runtime as a kvmslots export document (the one :meth:`Store.import_vm` reads)."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "vm": runtime.vm.to_json(),
        "controllers": [],
        "devices": [dev.to_device(state).to_json() for dev in runtime.devices],
    }


def record_ganeti_vm(store: Store, runtime: GanetiRuntime, *, replace: bool = False) -> VMSpec:
    """Record the instance as VM ``runtime.vm.name``: all or nothing.

    Devices are recorded ``planned`` at their Ganeti slots, with the ids QEMU
    knows them by (kept as given where kvmslots would derive another one);
    run :func:`~kvmslots.hotplug.reconcile` (``kvmslots reconcile VM --qmp
    SOCKET``) or ``adopt`` next to confirm them against QEMU, which makes them
    ``attached``.  An existing VM of that name is a
    :class:`~kvmslots.errors.StateConflict` unless *replace*.
    """
    validate_runtime(runtime)
    try:
        return store.import_vm(export_document(runtime), replace=replace)
    except GanetiRuntimeError:
        raise
    except StateImportError as exc:
        raise GanetiRuntimeError(f"Ganeti runtime file {runtime.source}: {exc}", runtime.source) from None


def cmd_import_ganeti(args: Any, store: Store, out: Any) -> int:
    """``kvmslots import --ganeti-runtime FILE VM [--replace]``; *out* is the CLI's ``Output``."""
    path = args.ganeti_runtime
    vm = getattr(args, "vm", None) or getattr(args, "file", None)
    if not vm:
        raise GanetiRuntimeError(
            f"name the VM to record {path} as: kvmslots import --ganeti-runtime FILE VM", str(path)
        )
    runtime = read_runtime(path, vm)
    record_ganeti_vm(store, runtime, replace=bool(getattr(args, "replace", False)))
    data = runtime.to_json()

    def text() -> str:
        origin = f"Ganeti instance {runtime.instance}" if runtime.instance else "the Ganeti instance"
        head = (f"imported {origin} ({runtime.layout} runtime) as {runtime.vm.name}: {len(runtime.devices)} "
                f"device(s), machine {runtime.vm.machine}, mask {runtime.vm.mask}")
        lines = [head]
        lines += [f"  {d.qemu_id} ({d.kind} {d.uuid}, {d.driver}) at {d.bus} slot {d.slot}" for d in runtime.devices]
        lines += [f"  skipped {s.kind} {s.index}" + (f" ({s.uuid})" if s.uuid else "") + f": {s.reason}"
                  for s in runtime.skipped]
        lines += [f"  note: {note}" for note in runtime.notes]
        lines.append(f"the devices are 'planned' until confirmed: kvmslots reconcile {runtime.vm.name} --qmp SOCKET")
        return "\n".join(lines)

    out.emit(data, text)
    return 0
